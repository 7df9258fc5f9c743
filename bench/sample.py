"""Whole-process text to image: `python sample.py` as a user runs it, against diffusers'
StableDiffusionPipeline as its users run it, from process start to PNG files on disk.

    flock /tmp/bench.lock .venv-dev/bin/python bench/sample.py [--pairs 3] [--cases 256-4-bf16-1,...]
    flock /tmp/bench.lock .venv-dev/bin/python bench/sample.py --model sd21 [--cases 768-4-bf16-1,...]
    flock /tmp/bench.lock .venv-dev/bin/python bench/sample.py --model sdxl [--cases 512-4-bf16-1,...]

The model is a full-size SD v1.5 diffusers folder (every tensor of the public one, its configs, the
real CLIP vocabulary) with random weights, written once into --workdir by diffusers' own
`save_pretrained` (fp32 safetensors, as runwayml/stable-diffusion-v1-5 ships them); with --model sd21,
stabilityai/stable-diffusion-2-1's (the 865M-parameter UNet with Linear projections and upcast attention,
OpenCLIP ViT-H/14's 23-layer text tower, v-prediction, 768x768 by default); with --model sdxl,
stabilityai/stable-diffusion-xl-base-1.0's (the 2.57B-parameter UNet, CLIP ViT-L/14 and OpenCLIP ViT-bigG/14,
1024x1024 by default), saved in bf16 (6.9 GB; an fp32 case converts on load, on both sides). Each case
(size, steps, precision, images per prompt) runs:
- ours:  python sample.py --ckpt FOLDER --prompt P --H S --W S --ddim_steps N --n_samples K --precision X
- theirs: a script doing what diffusers' docs show: `StableDiffusionPipeline.from_pretrained(FOLDER,
  torch_dtype=X, safety_checker=None)`, DDIMScheduler from its config (sample.py's default sampler),
  `pipe(P, height=S, width=S, num_inference_steps=N, num_images_per_prompt=K,
  generator=torch.Generator().manual_seed(42)).images`, each image saved as PNG.
  SDXL: ours with --sampler euler, theirs StableDiffusionXLPipeline.from_pretrained(FOLDER, torch_dtype=X) with
  the folder's own scheduler (SDXL base's EulerDiscreteScheduler), the micro-conditioning left to each default.
Both with guidance 7.5 and the same interpreter (so the same torch). Each run is its own process;
wall time from spawn to exit, and the process's peak resident memory (wait4's ru_maxrss). The two
sides alternate, --pairs times (the order flips each pair); printed: medians, ratios (time: theirs /
ours, > 1 means ours is faster; memory: ours / theirs, < 1 means ours is leaner) and a Markdown table.
This machine is shared and noisy: compare only figures from one run.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.whole_process import alternate, in_child, machine, skip_emulated, summary, table_row  # noqa: E402

PROMPT = "a photograph of an astronaut riding a horse"
CASES = {"sd15": ["256-4-fp32-1", "256-4-bf16-1", "256-4-fp32-4", "256-4-bf16-4",   # size-steps-precision-images
                  "512-20-fp32-1", "512-20-bf16-1", "512-20-fp32-4", "512-20-bf16-4"],
         "sd21": ["768-4-fp32-1", "768-4-bf16-1", "768-20-fp32-1", "768-20-bf16-1"],
         "sdxl": ["512-4-bf16-1", "512-4-fp32-1", "1024-2-bf16-1"]}
SAMPLER = {"sd15": "ddim", "sd21": "ddim", "sdxl": "euler"}       # what diffusers' side runs: see THEIRS

THEIRS = ("import sys; from tools.reference_models import sample_with_pipeline; "
          "sample_with_pipeline(*sys.argv[1:])")


def prepare(workdir: str, model: str = "sd15") -> dict:
    """In a child process (in_child): the model folder, and which precisions this CPU computes in hardware."""
    from tools import reference_models
    write = {"sd15": reference_models.write_random_sd15, "sd21": reference_models.write_random_sd21,
             "sdxl": reference_models.write_random_sdxl}[model]
    return {"folder": str(write(Path(workdir) / model)), **machine()}


def commands(case: str, folder: Path, out: Path, model: str = "sd15") -> dict[str, list[str]]:
    size, steps, precision, n = case.split("-")
    ours = [sys.executable, "sample.py", "--ckpt", str(folder), "--prompt", PROMPT, "--H", size, "--W", size,
            "--sampler", SAMPLER[model], "--ddim_steps", steps, "--n_samples", n, "--precision", precision,
            "--seed", "42", "--scale", "7.5", "--outdir", str(out / "ours")]
    theirs = [sys.executable, "-c", THEIRS, str(folder), str(out), size, steps, precision, n, PROMPT]
    return {"ours": ours, "diffusers": theirs}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=sorted(CASES), default="sd15",
                   help="the full-size random model: SD v1.5, SD 2.1 (768x768, v-prediction) or SDXL base (bf16)")
    p.add_argument("--workdir", default=None, help="where the full-size random model is kept (default /tmp/MODEL-random)")
    p.add_argument("--pairs", type=int, default=3, help="alternating pairs per case (median over them)")
    p.add_argument("--cases", default=None, help="comma-separated, from " + "; ".join(
        f"{model}: {', '.join(cases)}" for model, cases in CASES.items()) + " (default: all of --model's)")
    p.add_argument("--emulated_bf16", action="store_true", help="run the bf16 cases on a CPU without bf16 too")
    args = p.parse_args()
    setup = in_child("bench.sample:prepare", args.workdir or f"/tmp/{args.model}-random", args.model)
    print(f"machine: {setup['cpu']}", flush=True)
    folder = Path(setup["folder"])
    cases = [c for c in (args.cases or ",".join(CASES[args.model])).split(",") if c]
    cases = skip_emulated(cases, lambda c: c.split("-")[2], setup["native"], run_anyway=args.emulated_bf16,
                          flag="--emulated_bf16", reference="diffusers")
    rows = []
    for case in cases:
        t, m = alternate(lambda side, out: (commands(case, folder, out, args.model)[side], None),
                         sides=("ours", "diffusers"), pairs=args.pairs, label=case)
        rows.append((case, t, m))
        print(summary(case, t, m), flush=True)
    print("\n| case (size, steps, precision, images) | ours | diffusers | speed (theirs / ours) "
          "| peak RSS ours / diffusers |\n| --- | --- | --- | --- | --- |")
    for case, t, m in rows:
        size, steps, precision, n = case.split("-")
        print(table_row(f"{size}x{size}, {steps} steps, {precision}, {n} image{'s' if n != '1' else ''}", t, m))

if __name__ == "__main__":
    main()
