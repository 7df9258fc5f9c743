"""Face detection time, faces/ against OpenCV's CascadeClassifier, measured in one run.

    python bench/faces.py [--repeats 7]

Both detectors get the same gray image (the astronaut photo cropped and resized with Pillow to
640x480 and 1280x720, plus the 640x480 synthetic image with four faces) and the same parameters
(scale_factor 1.1, min_neighbors 3, min_size 30x30); each is warmed up once, then timed `--repeats`
times back to back. Prints the median wall time and CPU time of each, the ratio ours/OpenCV (> 1 means
ours is slower), and checks the boxes agree. OpenCV is timed with its default thread pool and
with one thread. OpenCV is optional: it needs opencv-python-headless 4.x (OpenCV 5 has no
CascadeClassifier); without it only ours is timed.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from faces import default_cascade, detect_faces  # noqa: E402
from faces.cascade import DEFAULT_CASCADE  # noqa: E402
from tools.reference_models import opencv  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures" / "faces"
PARAMS = dict(scale_factor=1.1, min_neighbors=3, min_size=(30, 30))


def _photo(width: int, height: int) -> np.ndarray:
    """The astronaut photo (512x512), cropped to the aspect ratio (keeping the face) and resized."""
    photo = Image.open(FIXTURES / "astronaut.jpg").convert("L")
    crop_height = round(photo.width * height / width)
    return np.asarray(photo.crop((0, 0, photo.width, crop_height)).resize((width, height), Image.BILINEAR))


def _images() -> dict[str, np.ndarray]:
    return {"astronaut 640x480": _photo(640, 480),
            "pasted faces 640x480": np.asarray(Image.open(FIXTURES / "pasted_faces_640x480.jpg").convert("L")),
            "astronaut 1280x720": _photo(1280, 720)}


def _time(run, repeats: int) -> tuple[float, float, list]:
    walls, cpus = [], []
    result = run()                                   # warm-up
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        result = run()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    default_cascade()                                # parse the XML once, outside the timings
    cv2, cv_note = opencv()
    print(f"reference: {cv_note}")
    if cv2 is not None:
        detector = cv2.CascadeClassifier(str(DEFAULT_CASCADE))
        default_threads = cv2.getNumThreads()

    for name, gray in _images().items():
        ours_wall, ours_cpu, ours = _time(lambda: detect_faces(gray, **PARAMS), args.repeats)
        line = f"{name:22s} ours {ours_wall * 1000:7.1f} ms wall {ours_cpu * 1000:7.1f} ms cpu"
        if cv2 is not None:
            run_cv = lambda: detector.detectMultiScale(gray, scaleFactor=PARAMS["scale_factor"],
                                                       minNeighbors=PARAMS["min_neighbors"],
                                                       minSize=PARAMS["min_size"])
            cv2.setNumThreads(default_threads)
            cv_wall, cv_cpu, theirs = _time(run_cv, args.repeats)
            cv2.setNumThreads(1)
            one_wall, one_cpu, _ = _time(run_cv, args.repeats)
            same = sorted(map(tuple, np.asarray(theirs).reshape(-1, 4).tolist())) == sorted(ours)
            line += (f" | OpenCV {default_threads} threads {cv_wall * 1000:6.1f} ms wall"
                     f" (ours/OpenCV {ours_wall / cv_wall:4.1f}x), 1 thread {one_wall * 1000:6.1f} ms wall"
                     f" {one_cpu * 1000:6.1f} ms cpu (ours/OpenCV {ours_wall / one_wall:4.1f}x wall,"
                     f" {ours_cpu / one_cpu:4.1f}x cpu) | {len(ours)} faces, same boxes: {same}")
        print(line)


if __name__ == "__main__":
    main()
