"""The tiny world (world/): deterministic per seed, held-out pairs never drawn for training, captions
that say what is drawn, and a checker that reads the scene back, clean and blurred + noisy."""
import re

import numpy as np
import pytest
from PIL import Image

from world import COLOURS, HELD_OUT, POSITIONS, SHAPES, SIZES, Scene, World, combinations, draw
from world.__main__ import main as preview
from world.captions import TEMPLATES, WHERE, all_captions
from world.checker import check
from world.evaluate import degrade, evaluate


def test_same_seed_same_samples_in_any_order():
    a, b = World(7), World(7)
    for i in (5, 0, 123456):
        image_a, caption_a, attrs_a = a.sample(i)
        image_b, caption_b, attrs_b = b.sample(i)
        assert image_a.tobytes() == image_b.tobytes() and caption_a == caption_b and attrs_a == attrs_b
    assert [World(8).sample(i)[2] for i in range(8)] != [World(7).sample(i)[2] for i in range(8)]


def test_batches_resume_at_any_step():
    world = World(1)
    batch = world.batch(3, 4)
    assert batch.images.shape == (4, 64, 64, 3) and batch.images.dtype == np.uint8
    for k in range(4):
        image, caption, attrs = world.sample(12 + k)
        assert np.array_equal(batch.images[k], np.asarray(image))
        assert batch.captions[k] == caption and batch.attributes[k] == attrs
    resumed = next(world.batches(4, start_step=3))
    assert np.array_equal(resumed.images, batch.images) and resumed.captions == batch.captions


def test_held_out_pairs_never_in_training_draws():
    assert len(set(HELD_OUT)) == len(HELD_OUT) == len(SHAPES)
    train = {(a["colour"], a["shape"]) for a in (World(0).scene(i)[0].attributes() for i in range(3000))}
    assert not train & set(HELD_OUT)
    assert train == set(combinations("train"))  # every other pair is drawn
    held = {(s.colour, s.shape) for s, _ in (World(0, split="held_out").scene(i) for i in range(200))}
    assert held == set(HELD_OUT)
    # composition is testable: every held-out colour and shape is seen in training with something else
    assert {c for c, _ in train} == set(COLOURS) and {s for _, s in train} == set(SHAPES)


def test_every_attribute_value_is_drawn():
    scenes = [World(2, split="all").scene(i) for i in range(2000)]
    assert {s.size for s, _ in scenes} == set(SIZES)
    assert {s.position for s, _ in scenes} == set(POSITIONS)
    assert {s.background for s, _ in scenes} == set(COLOURS)
    assert {t for _, t in scenes} == set(range(len(TEMPLATES)))
    assert all(s.background != s.colour for s, _ in scenes)


def test_captions_say_what_is_drawn():
    for i in range(300):
        scene, template = World(3, split="all").scene(i)
        for text in all_captions(scene):
            words = text.split()
            assert scene.shape in words, text                    # every phrasing names the shape
            named = [c for c in COLOURS if c in words]
            assert set(named) <= {scene.colour, scene.background}, text
            if scene.background in named and scene.background != scene.colour:
                assert f"{scene.background} background" in text, text
            named_sizes = [s for s in SIZES if s in words]
            assert named_sizes in ([], [scene.size]), text
            assert not re.search(r"\ba [aeiou]", text), text     # "an orange", never "a orange"
            if any(w in text for w in ("on the", "at the", "in the middle")):
                assert WHERE[scene.position] in text, text
    scene = Scene(colour="red", shape="circle", size="small", position="left", background="blue")
    assert all_captions(scene)[0] == "a small red circle on the left, blue background"
    assert World(0).sample(0)[1] in all_captions(World(0).scene(0)[0])


def test_bad_scene_or_split_names_the_field():
    with pytest.raises(ValueError, match="shape='hexagon'"):
        Scene(colour="red", shape="hexagon", size="small", position="left", background="blue")
    with pytest.raises(ValueError, match="background='red' equals"):
        Scene(colour="red", shape="star", size="small", position="left", background="red")
    with pytest.raises(ValueError, match="split='test'"):
        World(0, split="test")


def test_shapes_stay_inside_the_border():
    for shape in SHAPES:
        for position in ("top left", "bottom right"):
            scene = Scene(colour="white", shape=shape, size="large", position=position, background="black",
                          dx=-0.1 if position == "top left" else 0.1, dy=-0.1 if position == "top left" else 0.1)
            pixels = np.asarray(draw(scene))
            frame = np.concatenate([pixels[:3].reshape(-1, 3), pixels[-3:].reshape(-1, 3),
                                    pixels[:, :3].reshape(-1, 3), pixels[:, -3:].reshape(-1, 3)])
            assert (frame == COLOURS["black"]).all(), (shape, position)


def test_checker_reads_clean_world_images():
    result = evaluate(World(11, split="all"), 400)
    assert result["accuracy"] == {name: 1.0 for name in result["accuracy"]}, result["accuracy"]


def test_checker_reads_blurred_noisy_world_images():
    # Gaussian blur sigma 1 px + noise sigma 0.05: 100% colour and shape on 3000 images
    # (python -m world.evaluate --n 3000 --blur 1.0 --noise 0.05); here >= 99% of 300.
    result = evaluate(World(12, split="all"), 300, blur=1.0, noise=0.05, seed=12)
    assert result["accuracy"]["colour"] >= 0.99 and result["accuracy"]["shape"] >= 0.99, result["accuracy"]
    assert result["accuracy"]["position"] >= 0.99, result["accuracy"]


def test_checker_finds_nothing_on_a_plain_image():
    plain = np.empty((64, 64, 3), np.uint8)
    plain[:] = COLOURS["green"]
    found = check(degrade(plain, blur=0, noise=0.03, rng=np.random.default_rng(0)))
    assert (found.colour, found.shape, found.background) == (None, None, "green")


def test_checker_names_no_shape_for_a_ring():
    yy, xx = np.mgrid[:64, :64]
    r2 = (yy - 32) ** 2 + (xx - 32) ** 2
    ring = np.zeros((64, 64, 3))
    ring[(r2 < 15 ** 2) & (r2 > 8 ** 2)] = 1.0
    found = check(ring)
    assert (found.colour, found.shape, found.size, found.background) == ("white", None, None, "black")


def test_checker_accepts_pil_and_arrays():
    image, _, attrs = World(5).sample(0)
    for form in (image, np.asarray(image), np.asarray(image) / 255.0):
        found = check(form)
        assert (found.colour, found.shape) == (attrs["colour"], attrs["shape"])
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        check(np.zeros((64, 64)))


def test_preview_writes_a_grid(tmp_path, capsys):
    preview(["--n", "5", "--out", str(tmp_path), "--scale", "1"])
    sheet = Image.open(tmp_path / "grid.png")
    assert sheet.size == (3 * (64 + 4) + 4, 2 * (64 + 4) + 4)
    lines = (tmp_path / "captions.txt").read_text().splitlines()
    assert len(lines) == 5 and lines[0].split("\t")[1] == World(0).sample(0)[1]
    assert "grid.png" in capsys.readouterr().out
