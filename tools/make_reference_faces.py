"""Dev-only: reference outputs of OpenCV's Haar face detector for tests/test_faces.py.

Runs OpenCV's own `CascadeClassifier.detectMultiScale` (and `groupRectangles`, `resize`,
`FileStorage`) on the fixture images and writes what it finds to tests/fixtures/faces/reference.json.
The tests compare faces/ (which never imports cv2) against these numbers.

Needs opencv-python-headless 4.x (requirements-dev.txt pins 4.14): OpenCV 5 moved the Haar cascade
detector out of the main package.

    .venv-dev/bin/python tools/make_reference_faces.py [--skimage-data DIR]

--skimage-data: the `skimage/data` folder of a scikit-image wheel (`pip download scikit-image`,
unzip). Given, the fixture photographs are re-made from it (astronaut and camera: public domain /
CC0; chelsea and coffee: CC0, per skimage/data/_fetchers.py) together with synthetic images of the
astronaut's face pasted at several sizes. Not given, the committed images are reused.

Every image is converted to gray with Pillow (convert("L")) and that same gray array is given to
OpenCV, so the comparison checks the detector, not two colour conversions.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

import cv2

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "fixtures" / "faces"
CASCADE = ROOT / "faces" / "haarcascade_frontalface_default.xml"

PHOTOS = {  # fixture name -> file in skimage/data (licence per skimage/data/_fetchers.py)
    "astronaut.jpg": "astronaut.png",    # NASA, public domain
    "camera.jpg": "camera.png",          # CC0, Lav Varshney
    "chelsea.jpg": "chelsea.png",        # CC0, Stefan van der Walt
    "coffee.jpg": "coffee.png",          # CC0, Rachel Michetti
}
ASTRONAUT_FACE = (150, 30, 150, 170)     # (x, y, w, h) crop around the face OpenCV finds at (177, 66, 95, 95)

# (scale_factor, min_neighbors, min_size, max_size): the default, raw hits, coarse, bounded sizes
RUNS = [
    (1.1, 3, (30, 30), None),
    (1.1, 0, (24, 24), None),
    (1.2, 5, (24, 24), None),
    (1.05, 2, (40, 40), (160, 160)),
]
GROUP_THRESHOLDS = (1, 2, 3, 5)
# Other kinds of cascade, to test those paths: the first stages of other OpenCV cascades (same Intel
# licence), written out with only the features they use. alt2: depth-2 trees; smile: tilted features
# and a 36x18 window; eye_tree_eyeglasses: trees over tilted features, 20x20.
SUBSET_CASCADES = [  # (source, stages kept, scale_factor, min_size)
    ("haarcascade_frontalface_alt2.xml", 10, 1.2, (40, 40)),
    ("haarcascade_smile.xml", 16, 1.2, (72, 36)),
    ("haarcascade_eye_tree_eyeglasses.xml", 14, 1.2, (30, 30)),
]
SUBSET_IMAGES = ("astronaut.jpg", "pasted_faces_on_coffee.jpg")
RESIZE_SIZES = [(55, 43), (50, 39), (31, 24), (24, 24), (13, 9), (61, 47)]


def _synthetic(astronaut: Image.Image, background: Image.Image) -> dict[str, Image.Image]:
    """Astronaut faces pasted at several sizes (one mirrored) on plain and photographic grounds."""
    x, y, w, h = ASTRONAUT_FACE
    face = astronaut.crop((x, y, x + w, y + h))
    rng = np.random.default_rng(9)
    ramp = np.linspace(60, 200, 640)[None, :, None] + rng.normal(0, 12, (480, 640, 1))
    plain = Image.fromarray(np.clip(np.repeat(ramp, 3, axis=2), 0, 255).astype(np.uint8))
    for width, (px, py) in zip((48, 80, 128, 200), ((30, 40), (120, 300), (250, 60), (420, 230))):
        plain.paste(face.resize((width, round(width * h / w)), Image.LANCZOS), (px, py))
    photo = background.resize((480, 320), Image.LANCZOS).filter(ImageFilter.GaussianBlur(1))
    photo.paste(face.resize((70, round(70 * h / w)), Image.LANCZOS).transpose(Image.FLIP_LEFT_RIGHT), (40, 60))
    photo.paste(face.resize((150, round(150 * h / w)), Image.LANCZOS), (260, 80))
    return {"pasted_faces_640x480.jpg": plain, "pasted_faces_on_coffee.jpg": photo}


def make_images(skimage_data: Path) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    images = {name: Image.open(skimage_data / source) for name, source in PHOTOS.items()}
    for name, image in images.items():
        image.convert("RGB" if image.mode != "L" else "L").save(OUT / name, quality=88)
    for name, image in _synthetic(images["astronaut.jpg"].convert("RGB"), images["coffee.jpg"].convert("RGB")).items():
        image.save(OUT / name, quality=88)


def subset_name(source: str, n_stages: int) -> str:
    return source.replace("haarcascade_", "").replace(".xml", f"_first_{n_stages}_stages.xml")


def make_subset_cascade(source: str, n_stages: int) -> Path:
    """The first n_stages stages of an OpenCV cascade, features renumbered, as a new cascade file."""
    root = ET.parse(Path(cv2.data.haarcascades) / source).getroot()
    cascade = root.find("cascade")
    stages = cascade.find("stages")
    for stage in list(stages)[n_stages:]:
        stages.remove(stage)
    cascade.find("stageNum").text = str(n_stages)
    used: dict[int, int] = {}                       # old feature index -> new
    for nodes in stages.iter("internalNodes"):
        numbers = nodes.text.split()
        for i in range(2, len(numbers), 4):
            numbers[i] = str(used.setdefault(int(numbers[i]), len(used)))
        nodes.text = " ".join(numbers)
    features = cascade.find("features")
    kept = [list(features)[old] for old in sorted(used, key=used.get)]
    for feature in list(features):
        features.remove(feature)
    features.extend(kept)
    header = (f"<?xml version=\"1.0\"?>\n<!-- The first {n_stages} stages of OpenCV's {source} "
              f"(opencv-python-headless {cv2.__version__}), with only the features they use, made by "
              f"tools/make_reference_faces.py. Licence: the Intel License Agreement, as in "
              f"faces/LICENSE-haarcascade.txt. -->\n")
    path = OUT / subset_name(source, n_stages)
    path.write_text(header + ET.tostring(root, encoding="unicode") + "\n")
    return path


def _boxes(found) -> list[list[int]]:
    return sorted(np.asarray(found, dtype=np.int64).reshape(-1, 4).tolist())


def _cascade_facts() -> dict:
    """Counts read by OpenCV's own XML reader (FileStorage), to check our parser against."""
    fs = cv2.FileStorage(str(CASCADE), cv2.FILE_STORAGE_READ)
    root = fs.getNode("cascade")
    stages = root.getNode("stages")
    features = root.getNode("features")
    facts = {
        "window": [int(root.getNode("width").real()), int(root.getNode("height").real())],
        "stage_weak_counts": [stages.at(i).getNode("weakClassifiers").size() for i in range(stages.size())],
        "stage_thresholds": [float(np.float32(stages.at(i).getNode("stageThreshold").real()))
                             for i in range(stages.size())],
        "feature_rect_counts": [features.at(i).getNode("rects").size() for i in range(features.size())],
    }
    fs.release()
    return facts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skimage-data", type=Path, help="skimage/data folder to re-make the images from")
    args = parser.parse_args()
    if not hasattr(cv2, "CascadeClassifier"):
        raise SystemExit(f"OpenCV {cv2.__version__} has no CascadeClassifier; install opencv-python-headless 4.x "
                         f"in a separate environment (see this file's docstring)")
    if args.skimage_data:
        make_images(args.skimage_data)
    cv2.setNumThreads(1)
    detector = cv2.CascadeClassifier(str(CASCADE))
    if detector.empty():
        raise SystemExit(f"OpenCV could not load {CASCADE}")

    reference = {"opencv_version": cv2.__version__,
                 "cascade_sha256": hashlib.sha256(CASCADE.read_bytes()).hexdigest(),
                 "cascade": _cascade_facts(), "images": {}}
    for path in sorted(OUT.glob("*.jpg")):
        gray = np.asarray(Image.open(path).convert("L"))
        entry = {"size": [gray.shape[1], gray.shape[0]],
                 "gray_sha256": hashlib.sha256(gray.tobytes()).hexdigest(), "runs": []}
        for scale_factor, min_neighbors, min_size, max_size in RUNS:
            found = detector.detectMultiScale(gray, scaleFactor=scale_factor, minNeighbors=min_neighbors,
                                              minSize=min_size, maxSize=max_size or (0, 0))
            entry["runs"].append({"scale_factor": scale_factor, "min_neighbors": min_neighbors,
                                  "min_size": list(min_size), "max_size": list(max_size) if max_size else None,
                                  "boxes": _boxes(found)})
        raw = np.asarray(detector.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=0, minSize=(24, 24)))
        raw = raw.reshape(-1, 4).tolist()
        entry["grouping"] = {"hits": raw, "grouped": {
            str(t): _boxes(cv2.groupRectangles(raw, t, 0.2)[0]) if raw else [] for t in GROUP_THRESHOLDS}}
        reference["images"][path.name] = entry
        print(path.name, gray.shape, [len(r["boxes"]) for r in entry["runs"]])

    reference["subset_cascades"] = {}
    for source, n_stages, scale_factor, min_size in SUBSET_CASCADES:
        other = cv2.CascadeClassifier(str(make_subset_cascade(source, n_stages)))
        runs = {}
        for name in SUBSET_IMAGES:
            gray = np.asarray(Image.open(OUT / name).convert("L"))
            runs[name] = {k: _boxes(other.detectMultiScale(gray, scaleFactor=scale_factor, minNeighbors=n,
                                                           minSize=min_size)) for k, n in (("raw", 0), ("grouped", 3))}
        reference["subset_cascades"][subset_name(source, n_stages)] = {
            "stages": n_stages, "scale_factor": scale_factor, "min_size": list(min_size), "images": runs}
        print(subset_name(source, n_stages), {k: (len(v["raw"]), len(v["grouped"])) for k, v in runs.items()})

    rng = np.random.default_rng(3)
    tilted_source = rng.integers(0, 256, (19, 27), dtype=np.uint8)
    reference["tilted_integral"] = {"source": tilted_source.tolist(),
                                    "tilted": cv2.integral3(tilted_source)[2].tolist()}

    rng = np.random.default_rng(3)
    source = rng.integers(0, 256, (47, 61), dtype=np.uint8)
    reference["resize"] = {"source": source.tolist(), "outputs": {
        f"{w}x{h}": cv2.resize(source, (w, h), interpolation=cv2.INTER_LINEAR_EXACT).tolist() for w, h in RESIZE_SIZES}}

    tmp = OUT / "reference.json.tmp"
    with open(tmp, "w") as f:
        json.dump(reference, f, separators=(",", ":"))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, OUT / "reference.json")
    print("wrote", OUT / "reference.json")


if __name__ == "__main__":
    main()
