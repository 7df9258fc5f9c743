"""The --sampler flag outside sample.py: train_dreambooth.py's class and validation images, and the
class-image generator with a stochastic sampler (euler_a), which must stay deterministic and resumable."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import train_dreambooth
from dreambooth.data import generate_class_images
from diffusion.checkpoints.load import load_stable_diffusion

FOLDER = Path(__file__).parent / "fixtures" / "sd" / "tiny_diffusers"


pytestmark = pytest.mark.usefixtures("one_thread")


def _args(*extra: str):
    parser = train_dreambooth.build_parser()
    args = parser.parse_args(["--pretrained_model_name_or_path", "x", "--instance_data_dir", "x",
                              "--instance_prompt", "a sks dog", *extra])
    train_dreambooth.check_args(args, parser)
    return args


def test_train_dreambooth_sampler_flag():
    assert _args().sampler == "ddim"
    assert _args("--sampler", "dpmpp_2m_karras").sampler == "dpmpp_2m_karras"
    assert _args("--plms").sampler == "plms"                 # the alias, recorded as the sampler
    with pytest.raises(SystemExit):
        _args("--sampler", "heun")
    with pytest.raises(SystemExit):
        _args("--sampler", "euler", "--plms")


def test_euler_a_class_images_are_deterministic_and_resumable(tmp_path):
    models = load_stable_diffusion(FOLDER)
    make = lambda folder, indices: generate_class_images(
        models, folder, indices, prompt="a photo of a dog", resolution=16, seed=3, batch_size=2, steps=3,
        guidance_scale=7.5, progress=False, sampler="euler_a")
    make(tmp_path / "a", [0, 1, 2])
    before = {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()}
    (tmp_path / "a" / "class-00001.png").unlink()
    make(tmp_path / "a", [1])                                  # the gap is refilled with the same image
    assert {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()} == before
    torch.manual_seed(12345)                                   # the global RNG plays no part
    make(tmp_path / "b", [2])
    assert (tmp_path / "b" / "class-00002.png").read_bytes() == before["class-00002.png"]


def test_score_table_and_plot(tmp_path):
    """world.score --report: the table's last column is the fewest steps reaching DDIM-50's score."""
    from PIL import Image

    from world.score import plot, table
    row = lambda sampler, steps, both: {"sampler": sampler, "steps": steps, "all": {"both": both}}
    rows = [row("ddim", 10, 0.5), row("ddim", 50, 0.8), row("dpmpp_2m", 10, 0.81), row("dpmpp_2m", 50, 0.82),
            row("euler", 10, 0.4), row("euler", 50, 0.7)]
    lines = table(rows).splitlines()
    assert lines[0] == "| sampler | 10 steps | 50 steps | reaches DDIM-50 at |"
    assert lines[2:] == ["| ddim | 50.0% | 80.0% | 50 |", "| dpmpp_2m | 81.0% | 82.0% | 10 |",
                         "| euler | 40.0% | 70.0% | not within 50 |"]
    plot(rows, str(tmp_path / "plot.png"))
    assert Image.open(tmp_path / "plot.png").size == (640, 400)
