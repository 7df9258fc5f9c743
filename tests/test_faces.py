"""faces/ against OpenCV 4.14's CascadeClassifier, through the outputs recorded by
tools/make_reference_faces.py in tests/fixtures/faces/reference.json (cv2 is never imported here).

The detector follows OpenCV's arithmetic step by step, so beyond the issue's criterion (every
OpenCV box matched by one of ours with IoU >= 0.9, and no extra boxes) we also check the raw,
ungrouped window hits for equality, and the resize and grouping steps on their own.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from faces import CascadeError, detect_faces, load_cascade
from faces.cascade import DEFAULT_CASCADE, STAGE_THRESHOLD_EPS
from faces.group import group_rectangles
from faces.integral import integral_images, tilted_integral
from faces.resize import resize_bilinear

FIXTURES = Path(__file__).parent / "fixtures" / "faces"
REFERENCE = json.loads((FIXTURES / "reference.json").read_text())
IMAGES = sorted(REFERENCE["images"])
MIN_IOU = 0.9


def _gray(name: str) -> np.ndarray:
    gray = np.asarray(Image.open(FIXTURES / name).convert("L"))
    expected = REFERENCE["images"][name]["gray_sha256"]
    assert hashlib.sha256(gray.tobytes()).hexdigest() == expected, (
        f"{name}: Pillow decodes this JPEG to other pixels than the generator's Pillow did; "
        f"the recorded OpenCV boxes are for those pixels")
    return gray


def _iou(a, b) -> float:
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    inter_w = max(0, min(ax + aw, bx + bw) - max(ax, bx))
    inter_h = max(0, min(ay + ah, by + bh) - max(ay, by))
    inter = inter_w * inter_h
    return inter / (aw * ah + bw * bh - inter)


def test_shipped_cascade_is_opencvs_file():
    assert hashlib.sha256(DEFAULT_CASCADE.read_bytes()).hexdigest() == REFERENCE["cascade_sha256"]


def test_parser_matches_opencv_filestorage_counts():
    """Every stage's weak-classifier count and threshold, every feature's rectangle count, as
    OpenCV's own XML reader saw them."""
    facts = REFERENCE["cascade"]
    cascade = load_cascade()
    assert list(cascade.window) == facts["window"] == [24, 24]
    assert [len(s.trees) for s in cascade.stages] == facts["stage_weak_counts"]
    assert len(cascade.stages) == 25 and sum(facts["stage_weak_counts"]) == 2913
    expected = np.float32(facts["stage_thresholds"]) - STAGE_THRESHOLD_EPS
    assert [s.threshold for s in cascade.stages] == expected.tolist()
    assert [len(f.rects) for f in cascade.features] == facts["feature_rect_counts"]
    assert len(cascade.features) == 2913 and cascade.is_stump_cascade and not cascade.has_tilted_features
    first = cascade.stages[0].trees[0]     # "0 -1 0 -3.1511999666690826e-02" / "2.0875380039215088 -2.2172100543975830"
    assert (first.left, first.right, first.feature) == ((0,), (-1,), (0,))
    assert first.threshold == (float(np.float32(-3.1511999666690826e-02)),)
    assert first.leaves == (float(np.float32(2.0875380039215088)), float(np.float32(-2.2172100543975830)))
    assert cascade.features[0].rects == ((6, 4, 12, 9), (6, 7, 12, 3)) and cascade.features[0].weights == (-1.0, 3.0)


@pytest.mark.parametrize("name", IMAGES)
def test_boxes_match_opencv(name):
    gray = _gray(name)
    for run in REFERENCE["images"][name]["runs"]:
        ours = detect_faces(gray, scale_factor=run["scale_factor"], min_neighbors=run["min_neighbors"],
                            min_size=tuple(run["min_size"]),
                            max_size=tuple(run["max_size"]) if run["max_size"] else None)
        theirs = run["boxes"]
        where = f"{name} with {({k: v for k, v in run.items() if k != 'boxes'})}"
        assert len(ours) == len(theirs), f"{where}: {len(ours)} boxes, OpenCV {len(theirs)}: {ours} vs {theirs}"
        for box in theirs:
            best = max((_iou(box, mine) for mine in ours), default=0.0)
            assert best >= MIN_IOU, f"{where}: OpenCV box {box} matched only with IoU {best:.3f}"
        if run["min_neighbors"] == 0:    # raw window hits: the very same set
            assert sorted(map(list, ours)) == theirs, where


def test_faces_are_found_where_pasted():
    boxes = detect_faces(_gray("pasted_faces_640x480.jpg"))
    assert len(boxes) == 4
    assert sorted(w for _, _, w, _ in boxes)[0] >= 30        # min_size (30, 30) by default


@pytest.mark.parametrize("name", IMAGES)
def test_grouping_matches_opencv(name):
    grouping = REFERENCE["images"][name]["grouping"]
    for threshold, expected in grouping["grouped"].items():
        assert sorted(map(list, group_rectangles(grouping["hits"], int(threshold)))) == expected, threshold


def test_resize_is_bit_exact_with_opencv():
    source = np.array(REFERENCE["resize"]["source"], dtype=np.uint8)
    for size, expected in REFERENCE["resize"]["outputs"].items():
        width, height = map(int, size.split("x"))
        np.testing.assert_array_equal(resize_bilinear(source, width, height), np.array(expected, dtype=np.uint8),
                                      err_msg=size)


def test_integral_images_against_direct_sums():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (13, 17), dtype=np.uint8)
    sums, squares = integral_images(image)
    assert sums.shape == squares.shape == (14, 18)
    for y0, x0, y1, x1 in [(0, 0, 13, 17), (2, 3, 9, 11), (5, 5, 6, 6)]:
        box = image[y0:y1, x0:x1].astype(np.int64)
        assert sums[y1, x1] - sums[y0, x1] - sums[y1, x0] + sums[y0, x0] == box.sum()
        assert squares[y1, x1] - squares[y0, x1] - squares[y1, x0] + squares[y0, x0] == (box * box).sum()


def test_colour_inputs_agree_with_gray():
    rgb = Image.open(FIXTURES / "astronaut.jpg").convert("RGB")
    gray = np.asarray(rgb.convert("L"))
    expected = detect_faces(gray)
    assert detect_faces(rgb) == expected == detect_faces(np.asarray(rgb))
    assert len(expected) == 1


# ---- bad input ------------------------------------------------------------------------------

def test_file_that_is_not_a_cascade(tmp_path):
    not_xml = tmp_path / "photo.xml"
    not_xml.write_bytes(b"\xff\xd8\xff\xe0 a jpeg, not xml")
    with pytest.raises(CascadeError, match="photo.xml.*not a well-formed XML"):
        load_cascade(not_xml)
    other_xml = tmp_path / "settings.xml"
    other_xml.write_text("<config><value>3</value></config>")
    with pytest.raises(CascadeError, match="settings.xml: not an OpenCV cascade"):
        load_cascade(other_xml)
    lbp = tmp_path / "lbp.xml"
    lbp.write_text("<opencv_storage><cascade><stageType>BOOST</stageType><featureType>LBP</featureType>"
                   "</cascade></opencv_storage>")
    with pytest.raises(CascadeError, match="lbp.xml: only BOOST stages over HAAR features"):
        load_cascade(lbp)
    with pytest.raises(CascadeError, match="missing.xml: no such cascade file"):
        load_cascade(tmp_path / "missing.xml")


def test_truncated_cascade(tmp_path):
    text = DEFAULT_CASCADE.read_text()
    truncated = tmp_path / "truncated.xml"
    truncated.write_text(text[: len(text) // 2])
    with pytest.raises(CascadeError, match="truncated.xml.*truncated"):
        load_cascade(truncated)
    # cut at a tag boundary, so the XML is well formed but the features are gone
    cut = text.index("<features>")
    no_features = tmp_path / "no_features.xml"
    no_features.write_text(text[:cut] + "</cascade></opencv_storage>")
    with pytest.raises(CascadeError, match="no_features.xml: missing <features>"):
        load_cascade(no_features)


def test_tiny_image_and_bad_parameters():
    with pytest.raises(ValueError, match="1x1, smaller than the 24x24 detection window"):
        detect_faces(Image.new("L", (1, 1)))
    gray = np.zeros((40, 40), dtype=np.uint8)
    assert detect_faces(gray) == []           # a flat image: every window is rejected as flat
    with pytest.raises(ValueError, match="scale_factor must be > 1"):
        detect_faces(gray, scale_factor=1.0)
    with pytest.raises(ValueError, match="min_neighbors"):
        detect_faces(gray, min_neighbors=-1)
    with pytest.raises(ValueError, match="uint8"):
        detect_faces(gray.astype(np.float32))


def test_command_line(tmp_path, capsys):
    from faces.__main__ import main
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    code = main([str(FIXTURES / "pasted_faces_640x480.jpg"), str(broken), "--min_size", "40x40"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 1 and len(lines[0]["faces"]) == 3 and str(broken) in lines[1]["error"]
    assert main(["--cascade", str(tmp_path / "none.xml"), str(broken)]) == 2
    assert "--cascade" in capsys.readouterr().err


SUBSETS = REFERENCE["subset_cascades"]


@pytest.mark.parametrize("file, name", [(f, n) for f in sorted(SUBSETS) for n in sorted(SUBSETS[f]["images"])])
def test_other_cascades_match_opencv(file, name):
    """The first stages of three other OpenCV cascades: depth-2 trees (frontalface_alt2), tilted
    features in a 36x18 window (smile), trees over tilted features (eye_tree_eyeglasses)."""
    cascade = load_cascade(FIXTURES / file)
    entry = SUBSETS[file]
    assert len(cascade.stages) == entry["stages"]
    kind = {"frontalface_alt2": (False, False), "smile": (True, True), "eye_tree_eyeglasses": (False, True)}
    stumps, tilted = next(v for k, v in kind.items() if file.startswith(k))
    assert (cascade.is_stump_cascade, cascade.has_tilted_features) == (stumps, tilted)
    gray = _gray(name)
    for key, min_neighbors in (("raw", 0), ("grouped", 3)):
        boxes = detect_faces(gray, scale_factor=entry["scale_factor"], min_neighbors=min_neighbors,
                             min_size=tuple(entry["min_size"]), cascade=cascade)
        assert sorted(map(list, boxes)) == entry["images"][name][key], key


def test_tilted_integral_equals_opencv():
    source = np.array(REFERENCE["tilted_integral"]["source"], dtype=np.uint8)
    np.testing.assert_array_equal(tilted_integral(source), np.array(REFERENCE["tilted_integral"]["tilted"]))


def test_levels_scanned_in_groups_give_the_same_hits(monkeypatch):
    """A large photo's levels are scanned in groups that fit a memory budget: same hits."""
    import faces.scan
    monkeypatch.setattr(faces.scan, "MAX_BUFFER_VALUES", 60_000)   # about 2 small levels per group
    run = REFERENCE["images"]["pasted_faces_on_coffee.jpg"]["runs"][1]
    assert run["min_neighbors"] == 0
    raw = detect_faces(_gray("pasted_faces_on_coffee.jpg"), scale_factor=run["scale_factor"], min_neighbors=0,
                       min_size=tuple(run["min_size"]))
    assert sorted(map(list, raw)) == run["boxes"]


def test_stage_sum_shortcut_is_exact_or_not_taken(monkeypatch):
    """The dot-product stage sum is used only when float64 makes it exact; the leaf-by-leaf sum
    that replaces it otherwise gives the same hits."""
    from faces import evaluate
    assert evaluate._sums_are_exact(np.float32([2.0875380, -1.8633940]), np.float32([-2.2172100, 1.3272049]))
    assert not evaluate._sums_are_exact(np.float32([1e-30, 0.5]), np.float32([1.0, 0.25]))
    monkeypatch.setattr(evaluate, "_sums_are_exact", lambda left, right: False)
    run = REFERENCE["images"]["pasted_faces_on_coffee.jpg"]["runs"][1]
    raw = detect_faces(_gray("pasted_faces_on_coffee.jpg"), scale_factor=run["scale_factor"], min_neighbors=0,
                       min_size=tuple(run["min_size"]), cascade=load_cascade())   # a new object: packed anew
    assert sorted(map(list, raw)) == run["boxes"]


def test_max_side_detects_on_a_shrunk_copy_and_maps_boxes_back(tmp_path, capsys):
    """An image of 2x2 blocks shrunk back to half size is the original exactly, so the boxes found on
    the copy, scaled back, are the original's doubled (min_size is in the big image's pixels)."""
    from faces.__main__ import main
    gray = _gray("pasted_faces_640x480.jpg")
    double = np.repeat(np.repeat(gray, 2, axis=0), 2, axis=1)                     # (960, 1280)
    expected = [tuple(2 * v for v in box) for box in detect_faces(gray)]
    assert len(expected) == 4
    assert detect_faces(double, max_side=640, min_size=(60, 60)) == expected
    assert detect_faces(gray, max_side=640) == detect_faces(gray)                 # not over: untouched
    path = tmp_path / "double.png"
    Image.fromarray(double).save(path)
    assert main([str(path), "--max_detect_side", "640", "--min_size", "60x60"]) == 0
    assert json.loads(capsys.readouterr().out)["faces"] == [list(b) for b in expected]
    with pytest.raises(SystemExit):
        main([str(path), "--max_detect_side", "0"])
    assert "--max_detect_side 0: must be at least 1" in capsys.readouterr().err
