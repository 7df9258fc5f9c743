"""Whole-process DreamBooth training: `python train_dreambooth.py` as a user runs it, against diffusers'
examples/dreambooth/train_dreambooth.py as its users run it, from process start to the trained model on disk.

    flock /tmp/bench.lock .venv-dev/bin/python bench/train_dreambooth.py [--pairs 3] [--steps 20] [--resolution 512]

Both sides fine-tune the UNet of the full-size SD v1.5 folder with random weights that bench/sample.py writes
(--workdir; or the SD v1 diffusers folder --model names) for --steps steps at --resolution, batch 1,
gradient checkpointing, learning rate 5e-6 (constant), seed 0, with prior preservation (weight 1.0) on 5
class images already in the class folder (so no class image is generated, and none is timed), and
--mixed_precision (default no: fp32). The 5 instance images are world/subject.py's star, 64x64 PNGs (both
sides resize them to --resolution); the class images are plain stars drawn at --resolution; both written
once into --workdir. Each run:
- ours:  python train_dreambooth.py --pretrained_model_name_or_path FOLDER --instance_data_dir I
         --instance_prompt "a sks star" --with_prior_preservation --class_data_dir C --class_prompt "a star"
         --num_class_images 5 --resolution R --train_batch_size 1 --max_train_steps N --gradient_checkpointing
         --learning_rate 5e-6 --mixed_precision X --seed 0 --output_dir OUT
- theirs: diffusers' script with the same flags. That script is not installed with diffusers;
  tools/reference_models.py's diffusers_dreambooth reproduces its loop at these settings (accelerate, the
  frozen VAE and text encoder in weight_dtype, its dataset, loss, clipping and AdamW; what it leaves out
  does not run at these settings).
Both end by writing the trained model as a diffusers folder (about 4 GB in fp32), removed after each run;
neither writes a training checkpoint (ours is told --checkpointing_steps N+1; the script's 500 is past N).
Same interpreter (so the same torch) for both. Each run is its own process; wall time from spawn to exit,
and the process's peak resident memory (wait4's ru_maxrss). The sides alternate, --pairs times (the order
flips each pair); printed: medians, ratios (time: theirs / ours, > 1 means ours is faster; memory: ours /
theirs, < 1 means ours is leaner) and a Markdown table. At 512x512 in fp32 each run needs about 15 GB
(weights, gradients and AdamW's two moments of 860M parameters). This machine is shared and noisy: compare
only figures from one run.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.whole_process import alternate, in_child, machine, summary, table_row  # noqa: E402

INSTANCE_PROMPT, CLASS_PROMPT = "a sks star", "a star"
NUM_CLASS_IMAGES = 5
CLASS_SCENES = [("red", "white"), ("green", "black"), ("blue", "yellow"), ("purple", "white"), ("yellow", "blue")]
THEIRS = "import sys; from tools.reference_models import diffusers_dreambooth; diffusers_dreambooth(sys.argv[1:])"


def prepare(workdir: str, model: str, resolution: str) -> dict:
    """In a child process (bench/whole_process.py's in_child): the model folder (--model, else bench/sample.py's
    full-size random SD v1.5, written once), the instance and class images (written once), and which
    precisions this CPU computes in hardware."""
    from world.scene import Scene, draw
    from world.subject import instance_images
    data = Path(workdir) / "dreambooth"
    instance, classes = data / "instance", data / f"class-{resolution}"
    for folder, images in ((instance, lambda: instance_images(64)),
                           (classes, lambda: [draw(Scene(colour=c, shape="star", size="large", position="center",
                                                         background=b), image_size=int(resolution))
                                              for c, b in CLASS_SCENES[:NUM_CLASS_IMAGES]])):
        if not folder.is_dir():
            scratch = folder.with_name(folder.name + ".partial")   # renamed into place when complete
            scratch.mkdir(parents=True, exist_ok=True)
            for i, image in enumerate(images()):
                image.save(scratch / f"{folder.name.split('-')[0]}-{i:05d}.png")
            scratch.rename(folder)
    if not model:
        from tools.reference_models import write_random_sd15
        model = str(write_random_sd15(Path(workdir) / "sd15"))
    return {"model": model, "instance": str(instance), "class": str(classes), **machine()}


def commands(setup: dict, args, out: Path) -> dict[str, list[str]]:
    flags = ["--pretrained_model_name_or_path", setup["model"], "--instance_data_dir", setup["instance"],
             "--instance_prompt", INSTANCE_PROMPT, "--with_prior_preservation", "--class_data_dir", setup["class"],
             "--class_prompt", CLASS_PROMPT, "--num_class_images", str(NUM_CLASS_IMAGES),
             "--resolution", str(args.resolution), "--train_batch_size", "1", "--max_train_steps", str(args.steps),
             "--gradient_checkpointing", "--learning_rate", "5e-6", "--mixed_precision", args.mixed_precision,
             "--seed", "0"]
    ours = [sys.executable, "train_dreambooth.py", *flags, "--checkpointing_steps", str(args.steps + 1),
            "--output_dir", str(out / "ours")]
    theirs = [sys.executable, "-c", THEIRS, *flags, "--output_dir", str(out / "diffusers")]
    return {"ours": ours, "diffusers": theirs}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default="/tmp/sd15-random",
                   help="where the full-size random model (bench/sample.py's) and the images are kept")
    p.add_argument("--model", help="an SD v1 diffusers folder to train instead of the random full-size one")
    p.add_argument("--pairs", type=int, default=3, help="alternating pairs (median over them)")
    p.add_argument("--steps", type=int, default=20, help="training steps per run")
    p.add_argument("--resolution", type=int, default=512, help="training resolution (a multiple of 8)")
    p.add_argument("--mixed_precision", default="no", choices=["no", "bf16", "fp16"],
                   help="both sides' --mixed_precision (no: fp32)")
    p.add_argument("--emulated", action="store_true", help="run bf16/fp16 on a CPU without them too")
    args = p.parse_args()
    from tools.reference_models import version
    missing = [name for name in ("diffusers", "transformers", "accelerate", "torchvision") if version(name) is None]
    if missing:
        raise SystemExit(f"{', '.join(missing)} not installed: pip install -r requirements-dev.txt")
    model = str(Path(args.model).resolve()) if args.model else ""
    setup = in_child("bench.train_dreambooth:prepare", args.workdir, model, str(args.resolution))
    print(f"machine: {setup['cpu']}", flush=True)
    precision = {"no": "fp32"}.get(args.mixed_precision, args.mixed_precision)
    if not setup["native"][precision] and not args.emulated:
        raise SystemExit(f"--mixed_precision {args.mixed_precision}: this CPU has no {precision} instructions, so "
                         f"torch emulates {precision} (about 100x slower than fp32, for diffusers as for us); "
                         "--emulated runs it anyway")
    case = f"{args.resolution}-{args.steps}-{precision}"
    t, m = alternate(lambda side, out: (commands(setup, args, out)[side], None), sides=("ours", "diffusers"),
                     pairs=args.pairs, label=case, scratch=args.workdir)   # the trained model: about 4 GB a run
    print(summary(case, t, m))
    print("\n| case (resolution, steps, precision; batch 1 + 1 class image, gradient checkpointing) | ours | diffusers "
          "| speed (theirs / ours) | peak RSS ours / diffusers |\n| --- | --- | --- | --- | --- |")
    print(table_row(f"{args.resolution}x{args.resolution}, {args.steps} steps, {precision}", t, m))

if __name__ == "__main__":
    main()
