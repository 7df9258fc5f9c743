"""Whole-process emotion classification of a folder: `python predict_emotion.py` as a user runs it, against
transformers' image-classification pipeline as its users run it, from process start to JSON on disk.

    flock /tmp/bench.lock .venv-dev/bin/python bench/predict_emotion.py [--pairs 3] [--cases b16-fp32,...]

64 synthetic face-like JPEGs of varied sizes (vit/synthetic_faces.py's faces, 160 to 800 pixels wide, 3:4 to
4:3) are written once into --workdir. Each case (model, precision) runs:
- ours:  python predict_emotion.py --model FOLDER --batch_size 8 --dtype X FACES/ > ours.jsonl
- theirs: what transformers' docs show, `pipeline("image-classification", model=FOLDER, dtype=X)` called on
  the 64 paths with batch_size=8 and top_k=5, each result written as one JSON line
  (tools/reference_models.py's classify_with_pipeline).
Models: "embedded" is embedded/emotion_vit, the small ViT predict_emotion.py uses when --model is not
given (4 layers, width 192, 48x48); "b16" is a full-size ViT-B/16 (dima806's size: 12 layers, width 768,
224x224) with random weights, written once into --workdir by transformers' save_pretrained, or the folder
--model names (a real dima806 checkout, say). Both sides run with the same interpreter (so the same torch).
Each run is its own process; wall time from spawn to exit, and the process's peak resident memory (wait4's
ru_maxrss). The two sides alternate, --pairs times (the order flips each pair); printed: medians, ratios
(time: theirs / ours, > 1 means ours is faster; memory: ours / theirs, < 1 means ours is leaner), whether
both gave the same top label for every image (and the largest score difference), and a Markdown table.
This machine is shared and noisy: compare only figures from one run.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.whole_process import alternate, in_child, machine, skip_emulated, summary, table_row  # noqa: E402

N_IMAGES = 64   # --images' default
CASES = ["embedded-fp32", "b16-fp32", "b16-bf16", "b16-fp16"]   # model-precision
THEIRS = ("import sys; from tools.reference_models import classify_with_pipeline; "
          "classify_with_pipeline(*sys.argv[1:])")


def write_faces(folder: Path, n: int) -> Path:
    """n face JPEGs, each a seeded synthetic face (vit/synthetic_faces.py) drawn at 128x128 and resized
    to 160-800 pixels wide at an aspect ratio of 3:4 to 4:3, as photos come; written once."""
    if len(list(folder.glob("*.jpg"))) == n:
        return folder
    from PIL import Image

    from vit.model import EMOTION_LABELS
    from vit.synthetic_faces import make_face
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    for i in range(n):
        side = rng.randrange(160, 801)
        aspect = rng.uniform(0.75, 4 / 3)
        face = make_face(EMOTION_LABELS[i % len(EMOTION_LABELS)], i, size=128).convert("RGB")
        face.resize((side, round(side * aspect)), Image.BICUBIC).save(folder / f"face-{i:03d}.jpg", quality=90)
    return folder


def prepare(workdir: str, images: str, model: str, b16: str) -> dict:
    """In a child process (bench/whole_process.py's in_child): the faces, the model folders (with `b16` "yes", the
    full-size one: --model, else the random ViT-B/16, written once) and which precisions this CPU computes in
    hardware."""
    from embedded import EMOTION_VIT
    from tools.reference_models import write_vit_classifier
    from vit.model import EMOTION_LABELS
    faces = write_faces(Path(workdir) / f"faces-{images}", int(images))
    folders = {"embedded": str(EMOTION_VIT)}
    if b16 == "yes":
        folders["b16"] = model or str(write_vit_classifier(Path(workdir) / "vit-b16", labels=list(EMOTION_LABELS)))
    return {"faces": str(faces), "folders": folders, **machine()}


def agreement(ours: Path, theirs: Path) -> str:
    """How the two sides' last outputs compare: same images, same top label, largest score difference."""
    a = [json.loads(line) for line in ours.read_text().splitlines()]
    b = [json.loads(line) for line in theirs.read_text().splitlines()]
    if [x["image"] for x in a] != [x["image"] for x in b]:
        return f"different images: ours {len(a)}, theirs {len(b)}"
    same = sum(x["predictions"][0]["label"] == y["predictions"][0]["label"] for x, y in zip(a, b))
    diff = max(abs(p["score"] - {q["label"]: q["score"] for q in y["predictions"]}.get(p["label"], 0.0))
               for x, y in zip(a, b) for p in x["predictions"])
    return f"top label the same for {same}/{len(a)} images, largest score difference {diff:.1e}"


def commands(case: str, folders: dict[str, Path], faces: Path, out: Path, batch_size: int) -> dict[str, list[str]]:
    model, precision = case.split("-")
    ours = [sys.executable, "predict_emotion.py", "--model", str(folders[model]), "--batch_size", str(batch_size),
            "--dtype", precision, str(faces)]
    theirs = [sys.executable, "-c", THEIRS, str(folders[model]), str(faces), str(out / "transformers.jsonl"),
              precision, str(batch_size)]
    return {"ours": ours, "transformers": theirs}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default="/tmp/emotion-bench", help="where the faces and the random ViT-B/16 are kept")
    p.add_argument("--model", help="a full-size transformers ViT folder for the b16 cases (default: a random "
                                   "ViT-B/16 written into --workdir)")
    p.add_argument("--pairs", type=int, default=3, help="alternating pairs per case (median over them)")
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from {', '.join(CASES)}")
    p.add_argument("--batch_size", type=int, default=8, help="images per forward pass, both sides (ours' default)")
    p.add_argument("--images", type=int, default=N_IMAGES, help="how many face JPEGs to classify")
    p.add_argument("--emulated", action="store_true", help="run the bf16/fp16 cases on a CPU without them too")
    args = p.parse_args()
    from tools.reference_models import version
    if version("transformers") is None:
        raise SystemExit("transformers is not installed: pip install -r requirements-dev.txt")
    cases = [c for c in args.cases.split(",") if c]
    for case in cases:
        if case not in CASES:
            raise SystemExit(f"--cases {case}: choose from {', '.join(CASES)}")
    b16 = "yes" if any(c.startswith("b16") for c in cases) else "no"
    setup = in_child("bench.predict_emotion:prepare", args.workdir, str(args.images), args.model or "", b16)
    print(f"machine: {setup['cpu']}", flush=True)
    faces, folders = Path(setup["faces"]), {name: Path(f) for name, f in setup["folders"].items()}
    cases = skip_emulated(cases, lambda c: c.split("-")[1], setup["native"], run_anyway=args.emulated,
                          flag="--emulated", reference="transformers")
    rows = []
    for case in cases:
        with tempfile.TemporaryDirectory() as tmp:   # both sides' last outputs, compared after the pairs
            kept = Path(tmp)
            t, m = alternate(lambda side, out: (commands(case, folders, faces, kept, args.batch_size)[side],
                                                kept / "ours.jsonl" if side == "ours" else None),
                             sides=("ours", "transformers"), pairs=args.pairs, label=case)
            same = agreement(kept / "ours.jsonl", kept / "transformers.jsonl")
        rows.append((case, t, m))
        print(f"{summary(case, t, m)}; {same}", flush=True)
    print(f"\n| case ({args.images} images, batch {args.batch_size}) | ours | transformers | speed (theirs / ours) "
          "| peak RSS ours / transformers |\n| --- | --- | --- | --- | --- |")
    for case, t, m in rows:
        model, precision = case.split("-")
        name = "embedded ViT (48x48, 4 layers)" if model == "embedded" else "ViT-B/16 (224x224)"
        print(table_row(f"{name}, {precision}", t, m))

if __name__ == "__main__":
    main()
