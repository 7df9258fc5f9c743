"""`python train_dreambooth.py` with no arguments: DreamBooth on the embedded tiny model, end to end.

1. Writes the subject's five instance images (world/subject.py: an orange star with a blue centre,
   which the world never shows) to runs/dreambooth_demo/instance_images/.
2. Runs ten jobs, each a command a user could type (printed when it starts; its output goes to
   runs/dreambooth_demo/logs/JOB.log):
   - class_images: `sample.py` makes 64 images of "a star" with the base model (embedded/world_sd), the
     class images of prior preservation, as the seed repository makes its regularization images with
     its txt2img script;
   - three trainings with train_dreambooth.py: "a sks star" with prior preservation on those class
     images ("with_prior"), a LoRA (--rank) with prior preservation on the same images ("lora"), and the
     first without prior preservation ("no_prior");
   - textual inversion with train_textual_inversion.py (the paper's baseline): a new word, "<subject>",
     learned from the same five images as rows of the text encoder's token embedding, the model frozen;
   - five scorings (`python -m world.dreambooth_demo score`): the base model and the four, the LoRA
     scored as `sample.py --lora` uses it (the base model with the LoRA file fused in), the word as
     `sample.py --embedding` uses it ("a <subject> on a <colour> background").
3. Prints the table, writes demo_report.json and comparison.png (rows: instances, base, with prior, LoRA,
   without prior, textual inversion; columns: the prompts).

The jobs run one per CPU core (up to 4), each on one thread (OMP_NUM_THREADS=1), each as soon as the jobs it
needs are done. On this small model two one-thread processes do about 1.8x the work of one two-thread
process (its operations are too small to split well), and a one-thread process computes the same numbers
whatever the machine's number of cores or load, so the table is the same to the last digit on every rerun.

What is measured (Ruiz et al. 2022, section 4.1 and 4.3):
- subject fidelity: "a sks star on a <colour> background" for four backgrounds (one the instance
  images never had), `FIDELITY_SEEDS` each: colour-histogram similarity to the instance images
  (world/subject.py), the share that looks like the subject, and the share whose background is the
  asked colour (the model still follows the rest of the prompt);
- prior preservation: plain "a star", `PRIOR_SEEDS` images: the share the checker reads as a star,
  how many different colours they come in (the class's variety), and the share that look like the
  subject (language drift: the paper's figure 7 "the class prior is lost" without the prior loss).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from common.files import atomic_write
from common.hub_cache import resolve_model
from diffusion.pipeline import NonFiniteError
from embedded import WORLD_SD
from world.checker import check
from world.subject import instance_images, looks_like_subject, reference_colours, subject_similarity

ROOT = Path(__file__).resolve().parent.parent   # where train_dreambooth.py is
OUT = Path("runs/dreambooth_demo")
# jobs running at once, one CPU thread each: one per core, up to 4 (beyond that the jobs wait on each other)
LANES = min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
INSTANCE_PROMPT, CLASS_PROMPT = "a sks star", "a star"
FIDELITY_BACKGROUNDS = ("white", "green", "black", "red")   # red: a background no instance image had
FIDELITY_SEEDS = 4
PRIOR_SEEDS = 16
SAMPLING_STEPS, GUIDANCE = 50, 7.5                          # sample.py's defaults (DDIM)
NUM_CLASS_IMAGES = 64
# Chosen by the sweeps in docs/dreambooth_demo_sweep.md: a cosine decay to 0 (at a constant rate "a star" fell to
# 44-56% stars whatever the prior weight; decayed, it stays near the base model's 75%), 450 steps (at 300 the
# subject came out in 62-75% of the samples), and the prior loss at its usual weight, 1.
TRAINING = ["--resolution", "64", "--train_batch_size", "4", "--max_train_steps", "450", "--lr_scheduler", "cosine",
            "--lr_warmup_steps", "30", "--seed", "0", "--checkpointing_steps", "100000", "--validation_steps", "100000",
            "--cache_latents"]
# The whole UNet and the text encoder (as the seed repository; the subject went from 44% to 75% at a constant 2e-4).
FULL = ["--train_text_encoder", "--learning_rate", "5e-4"]
# LoRA (diffusers' train_dreambooth_lora.py: rank-r updates of the UNet's attention projections), 10x full
# fine-tuning's rate; with the text encoder's attention adapted too, or at ranks 4 to 16 and rates 1e-3 to 2e-3,
# it learned less of the subject and lost more of "a star" (the sweep).
LORA = ["--rank", "16", "--learning_rate", "4e-3"]
# Textual inversion (train_textual_inversion.py, the paper's baseline): a new word, <subject>, learned as a row of
# the text encoder's token embedding from the same five images, the model frozen; diffusers' object templates
# ("a photo of a {}", ...), the class noun "star" to start from. 200 steps at 1e-3, the sweep's best (see
# docs/dreambooth_demo_sweep.md, "Textual inversion"): every rate and length tried stays at 0% subject.
TI_WORD, TI_STEPS, TI_RATE = "<subject>", 200, "1e-3"
TEXTUAL_INVERSION = ["--placeholder_token", TI_WORD, "--initializer_token", "star", "--resolution", "64",
                     "--train_batch_size", "4", "--max_train_steps", str(TI_STEPS), "--learning_rate", TI_RATE,
                     "--lr_warmup_steps", "0", "--seed", "0", "--cache_latents", "--checkpointing_steps", "100000",
                     "--save_steps", "100000", "--validation_steps", "100000"]
MODELS = ("base", "with_prior", "lora", "no_prior", "textual_inversion")   # the table's rows, the grid's after the instances


def fidelity_prompts(subject: str = INSTANCE_PROMPT) -> list[str]:
    return [f"{subject} on a {colour} background" for colour in FIDELITY_BACKGROUNDS]


# Images denoised in one batch while scoring. A fixed number, so the scores do not depend on the machine (a
# batch's size can change the last bits of its numbers); the demo's 16 fidelity and 16 prior images each
# fit in one batch. Larger counts stream through in batches of this size, each saved and scored as it comes.
SCORE_BATCH = 64


@torch.no_grad()
def sample_images(models, prompt_list: list[str], seeds: int, steps: int = SAMPLING_STEPS, *,
                  batch: int = SCORE_BATCH):
    """`seeds` images of each prompt, prompt by prompt, yielded in batches of at most `batch` images (nothing
    is made or kept for the images of later batches). Image k of prompt i starts from the x_T that
    `generate(models, prompt_list, seed=k)` would give it (row i of randn((P, C, h, w)) seeded k), and a
    batch's images are denoised together (16 images of "a star" on one CPU thread: 19.5 s in one batch
    against about 33 s in 16 batches of one)."""
    from clip.textual_inversion import expand_prompts
    from diffusion.pipeline import decode_to_uint8, denoise, encode_prompts, initial_latents, make_sampler, to_pil
    device = next(models.unet.parameters()).device
    n_prompts, vae_config = len(prompt_list), models.vae.config
    side = models.unet.config.sample_size * vae_config.spatial_factor
    prompt_list = expand_prompts(list(prompt_list), models.tokenizer)   # a multi-vector word spelled out, as generate
    states = encode_prompts(models.text_encoder, models.tokenizer, [""] * n_prompts + prompt_list,
                            device).float()                                    # (2P, 77, D)
    total = n_prompts * seeds
    for start in range(0, total, batch):
        which = [divmod(j, seeds) for j in range(start, min(start + batch, total))]   # (prompt i, seed k)
        latents = torch.cat([initial_latents(n_prompts, channels=models.unet.config.in_channels, height=side,
                                             width=side, factor=vae_config.spatial_factor,
                                             generator=torch.Generator("cpu").manual_seed(k), device=device)[i:i + 1]
                             for i, k in which])                                  # (n, C, h, w)
        rows = torch.tensor([i for i, _ in which], device=device)
        uncond, cond = states[:n_prompts][rows], states[n_prompts:][rows]          # (n, 77, D) each
        latents = denoise(models.unet, latents, cond, uncond, sampler=make_sampler(models.scheduler_config, "ddim"),
                          steps=steps, guidance_scale=GUIDANCE, progress=False)
        yield to_pil(decode_to_uint8(models.vae, latents))


def evaluate(model_dir: Path, loras: list[tuple[str, float]] = (), *, embedding: Path | None = None,
             subject: str = INSTANCE_PROMPT, fidelity_seeds: int = FIDELITY_SEEDS, prior_seeds: int = PRIOR_SEEDS,
             steps: int = SAMPLING_STEPS, out: Path | None = None) -> dict:
    """Scores of one model folder, loaded as sample.py loads it (with `loras`, (file, scale) pairs: those LoRA
    files fused in, as sample.py --lora does; with `embedding`: that textual-inversion file's word added, as
    sample.py --embedding; the speed arrangement of diffusion/speed.py). Its fidelity images ("`subject` on a
    <colour> background") and prior images are saved in `out` as fidelity-NN.png and prior-NN.png as they are
    made, and scored as they come: memory does not grow with the number of images."""
    from diffusion.checkpoints.load import load_stable_diffusion
    from diffusion.checkpoints.lora_files import load_lora_files
    from diffusion.speed import arrange_for_speed
    from common.state_dict import CheckpointError
    models = load_stable_diffusion(model_dir)
    if loras:
        try:
            load_lora_files(models, list(loras))
        except CheckpointError as e:
            raise CheckpointError(f"--lora {e}") from None
    if embedding is not None:
        from clip.textual_inversion import add_embeddings, read_embeddings
        add_embeddings(models.text_encoder, models.tokenizer, read_embeddings([(embedding, None)]))
    for m in (models.unet, models.vae, models.text_encoder):
        m.eval()
    arrange_for_speed(models, device=torch.device("cpu"), precision="fp32")
    reference = reference_colours()
    sums = dict.fromkeys(("subject_similarity", "looks_like_subject", "background_as_asked", "class_is_star",
                          "class_looks_like_subject"), 0.0)
    colours, k = set(), 0
    asked = lambda j: FIDELITY_BACKGROUNDS[j // fidelity_seeds]
    for batch in sample_images(models, fidelity_prompts(subject), fidelity_seeds, steps):
        for image in batch:
            sums["subject_similarity"] += subject_similarity(image, reference)
            sums["looks_like_subject"] += looks_like_subject(image)
            sums["background_as_asked"] += check(image).background == asked(k)
            _save(image, out, f"fidelity-{k:02d}.png")
            k += 1
    k = 0
    for batch in sample_images(models, [CLASS_PROMPT], prior_seeds, steps):
        for image in batch:
            found = check(image)
            sums["class_is_star"] += found.shape == "star"
            colours |= {found.colour} if found.shape == "star" else set()
            sums["class_looks_like_subject"] += looks_like_subject(image)
            _save(image, out, f"prior-{k:02d}.png")
            k += 1
    n_fidelity, n_prior = len(FIDELITY_BACKGROUNDS) * fidelity_seeds, prior_seeds
    return {
        "subject_similarity": sums["subject_similarity"] / n_fidelity,
        "looks_like_subject": sums["looks_like_subject"] / n_fidelity,
        "background_as_asked": sums["background_as_asked"] / n_fidelity,
        "class_is_star": sums["class_is_star"] / n_prior,
        "class_colours": len(colours),
        "class_looks_like_subject": sums["class_looks_like_subject"] / n_prior,
    }


def _save(image, folder: Path | None, name: str) -> None:
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / name)


def comparison_grid(rows: list[list], labels: list[str], headings: list[str]):
    """The instance images, then one row of images per model, each enlarged 2x, with its name on the left;
    above the models' rows, each column's prompt."""
    from PIL import Image, ImageDraw
    side, gap, left, band = 128, 4, 110, 30
    width = left + max(len(r) for r in rows) * (side + gap)
    sheet = Image.new("RGB", (width, band + len(rows) * (side + gap) + gap), (255, 255, 255))
    pen = ImageDraw.Draw(sheet)
    for y, (row, label) in enumerate(zip(rows, labels)):
        top = gap + y * (side + gap) + (band if y > 0 else 0)
        pen.text((6, top + side // 2 - 6), label, fill=(0, 0, 0))
        for x, image in enumerate(row):
            sheet.paste(image.resize((side, side), Image.Resampling.NEAREST), (left + x * (side + gap), top))
    for x, heading in enumerate(headings):       # in the band between the instances and the models
        pen.multiline_text((left + x * (side + gap) + 2, side + 2 * gap + 2), heading, fill=(0, 0, 0), spacing=2)
    return sheet


# ---- the jobs ----------------------------------------------------------------------------------------
@dataclass
class Job:
    name: str
    argv: list[str]                                # run as `python ARGV`: a script of the repository, or -m MODULE
    needs: tuple[str, ...] = ()                    # jobs that must have finished first
    process: subprocess.Popen | None = field(default=None, repr=False)
    started: float = 0.0


def jobs(out: Path) -> list[Job]:
    """The demo's commands, in the order they are started when their needs allow."""
    instance_dir, class_dir = out / "instance_images", out / "class_images" / "samples"
    prior = ["--with_prior_preservation", "--class_prompt", CLASS_PROMPT, "--num_class_images", str(NUM_CLASS_IMAGES),
             "--class_data_dir", str(class_dir)]
    trainings = {"with_prior": [*FULL, *TRAINING, *prior], "lora": [*LORA, *TRAINING, *prior],
                 "no_prior": [*FULL, *TRAINING]}
    train = {name: Job(name, ["train_dreambooth.py", "--pretrained_model_name_or_path", str(WORLD_SD),
                              "--instance_data_dir", str(instance_dir), "--instance_prompt", INSTANCE_PROMPT,
                              "--output_dir", str(out / name), "--overwrite_output_dir", *flags],
                       needs=("class_images",) if "--with_prior_preservation" in flags else ())
             for name, flags in trainings.items()}
    train["textual_inversion"] = Job("textual_inversion", [
        "train_textual_inversion.py", "--pretrained_model_name_or_path", str(WORLD_SD), "--train_data_dir",
        str(instance_dir), "--output_dir", str(out / "textual_inversion"), "--overwrite_output_dir", *TEXTUAL_INVERSION])
    lora_file = out / "lora" / "pytorch_lora_weights.safetensors"
    embedding = out / "textual_inversion" / "learned_embeds.safetensors"
    measures = ["--fidelity_seeds", str(FIDELITY_SEEDS), "--prior_seeds", str(PRIOR_SEEDS),
                "--steps", str(SAMPLING_STEPS)]
    score = {name: Job(f"score_{name}", ["-m", "world.dreambooth_demo", "score", str(folder), *measures,
                                         *(["--lora", str(lora_file)] if name == "lora" else []),
                                         *(["--embedding", str(embedding), "--subject", f"a {TI_WORD}"]
                                           if name == "textual_inversion" else []),
                                         "--out", str(out / "scores" / name)],
                       needs=(name,) if name != "base" else ())
             for name, folder in (("base", WORLD_SD), ("with_prior", out / "with_prior"), ("lora", WORLD_SD),
                                  ("no_prior", out / "no_prior"), ("textual_inversion", WORLD_SD))}
    class_images = Job("class_images", ["sample.py", "--ckpt", str(WORLD_SD), "--prompt", CLASS_PROMPT,
                                        "--n_samples", str(NUM_CLASS_IMAGES), "--ddim_steps", str(SAMPLING_STEPS),
                                        "--scale", str(GUIDANCE), "--seed", "0", "--outdir", str(out / "class_images")])
    # the longest chain first: class images, then the two trainings on them; the rest fills the other lane
    return [class_images, train["no_prior"], train["with_prior"], train["lora"], train["textual_inversion"],
            score["base"], score["no_prior"], score["with_prior"], score["lora"], score["textual_inversion"]]


def command_line(job: Job) -> str:
    return "OMP_NUM_THREADS=1 " + shlex.join(["python", *job.argv])   # quoted as run_info.json's command is


def run_jobs(todo: list[Job], logs: Path, started: float) -> int:
    """Run the jobs, `LANES` at a time, each once the jobs it needs have finished; stop at the first
    failure (the others are stopped too) and show the end of its log. Returns the first failure's exit code."""
    logs.mkdir(parents=True, exist_ok=True)
    # scripts by their path and the package on PYTHONPATH, so the jobs run from the user's folder (paths as given)
    path = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": path}
    clock = lambda: f"[{time.perf_counter() - started:4.0f} s]"
    waiting, running, done = list(todo), [], set()
    try:
        while waiting or running:
            for job in [j for j in waiting if all(n in done for n in j.needs)][:LANES - len(running)]:
                print(f"{clock()} {job.name}: {command_line(job)}", flush=True)
                script = [str(ROOT / job.argv[0])] if job.argv[0].endswith(".py") else job.argv[:1]
                with open(logs / f"{job.name}.log", "w") as log:
                    job.process = subprocess.Popen([sys.executable, *script, *job.argv[1:]], env=env, stdout=log,
                                                   stderr=subprocess.STDOUT)
                job.started = time.perf_counter()
                waiting.remove(job)
                running.append(job)
            finished = next((j for j in running if j.process.poll() is not None), None)
            if finished is None:
                time.sleep(0.2)
                continue
            running.remove(finished)
            if finished.process.returncode != 0:
                for job in running:
                    job.process.terminate()
                    job.process.wait()
                log = logs / f"{finished.name}.log"
                print(f"{clock()} {finished.name} failed (exit {finished.process.returncode}); the end of {log}:")
                print("".join(log.read_text(errors="replace").splitlines(True)[-20:]))
                return finished.process.returncode
            done.add(finished.name)
            print(f"{clock()} {finished.name} done in {time.perf_counter() - finished.started:.0f} s", flush=True)
    except KeyboardInterrupt:   # the jobs got the same Ctrl-C: let them stop as they do on their own
        for job in running:
            job.process.wait()
        print(f"{clock()} stopped; finished: {', '.join(sorted(done)) or 'nothing'}")
        return 130
    return 0


# ---- scoring one model: python -m world.dreambooth_demo score MODEL --out DIR [--lora FILE] -----------------
def score_main(argv: list[str]) -> int:
    from common.files import check_writable
    from diffusion.checkpoints.lora_files import parse_lora_flags
    prog = "python -m world.dreambooth_demo score"
    parser = argparse.ArgumentParser(prog=prog, description="Score one model on the demo's prompts: DIR/scores.json "
                                                            "and its fidelity-NN.png and prior-NN.png samples.")
    parser.add_argument("model", help="a diffusers folder or a repo id of the Hugging Face cache (the base model "
                                      "with --lora)")
    parser.add_argument("--out", type=Path, required=True, help="folder for scores.json and the samples")
    parser.add_argument("--lora", action="append", metavar="FILE[:SCALE]",
                        help="a LoRA file (or folder, or repo id) to fuse into MODEL first at SCALE (default 1.0), "
                             "as sample.py --lora; repeat the flag to stack LoRAs")
    parser.add_argument("--embedding", help="a textual-inversion file whose word to add to MODEL first, as sample.py "
                                            "--embedding")
    parser.add_argument("--subject", default=INSTANCE_PROMPT, help="what the fidelity prompts call the subject: "
                                                                   "'SUBJECT on a <colour> background'")
    parser.add_argument("--fidelity_seeds", type=int, default=FIDELITY_SEEDS, help="images per background")
    parser.add_argument("--prior_seeds", type=int, default=PRIOR_SEEDS, help=f"images of '{CLASS_PROMPT}'")
    parser.add_argument("--steps", type=int, default=SAMPLING_STEPS, help="DDIM steps")
    args = parser.parse_args(argv)
    for flag in ("fidelity_seeds", "prior_seeds", "steps"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} {getattr(args, flag)}: must be >= 1")
    try:   # every flag before any model work; CheckpointError is a ValueError
        args.model = resolve_model(args.model, flag="MODEL")
        loras = parse_lora_flags(args.lora or [])
        check_writable(args.out, "--out")
        check_score_run(args)
        scores = evaluate(args.model, loras, embedding=args.embedding, subject=args.subject,
                          fidelity_seeds=args.fidelity_seeds, prior_seeds=args.prior_seeds,
                          steps=args.steps, out=args.out)
    except (OSError, ValueError) as e:   # the message names the flag or the file
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1 if isinstance(e, NonFiniteError) else 2
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out / "scores.json", lambda tmp: Path(tmp).write_text(json.dumps(scores, indent=2) + "\n"))
    print(json.dumps(scores, indent=2))
    return 0


def check_score_run(args: argparse.Namespace) -> None:
    """The model folder, --steps against its noise schedule, and the memory of one batch of SCORE_BATCH
    images (the weights and the sampling's peak), before any weight is read."""
    from common.flags import UsageError
    from common.memory import check_memory, gb
    from diffusion.checkpoints.configs import check_sampling_steps, read_configs, read_scheduler_config, weights_bytes
    from diffusion.pipeline import sampling_memory
    if not Path(args.model).is_dir():
        raise UsageError(f"MODEL {args.model}: not a diffusers folder"
                         + (" (no such folder)" if not Path(args.model).exists() else ""))
    configs = read_configs(args.model, None, flags=("MODEL", "--config"))
    check_sampling_steps(args.steps, read_scheduler_config(args.model, flag="MODEL"), flag="--steps")
    side = configs[0].sample_size * configs[1].spatial_factor
    batch = min(SCORE_BATCH, max(len(FIDELITY_BACKGROUNDS) * args.fidelity_seeds, args.prior_seeds))
    one = sampling_memory(*configs, images=1, height=side, width=side)
    check_memory(weights_bytes(args.model, configs, 4) + batch * one, device="cpu",
                 what=f"scoring in batches of {batch} images of {side}x{side}",
                 advice=f"about {gb(one)} an image; free memory (the batch size is fixed, so the scores do not "
                        "depend on the machine)")


def read_scores(folder: Path) -> tuple[dict, list, list]:
    from PIL import Image
    scores = json.loads((folder / "scores.json").read_text())
    images = {kind: [Image.open(f).convert("RGB") for f in sorted(folder.glob(f"{kind}-*.png"))]
              for kind in ("fidelity", "prior")}
    return scores, images["fidelity"], images["prior"]


# ---- the demo ----------------------------------------------------------------------------------------
def run(out: Path = OUT) -> int:
    started = time.perf_counter()
    if not (WORLD_SD / "model_index.json").is_file():
        print(f"error: the embedded model {WORLD_SD} is missing (a partial checkout?)")
        return 2
    instance_dir = out / "instance_images"
    instance_dir.mkdir(parents=True, exist_ok=True)
    for k, image in enumerate(instance_images()):
        image.save(instance_dir / f"subject-{k}.png")
    # sample.py numbers its files after those already there: a rerun makes the class images afresh
    shutil.rmtree(out / "class_images", ignore_errors=True)
    print(f"DreamBooth demo: subject = {instance_dir} (5 images); base model = {WORLD_SD}; "
          f"{LANES} jobs at a time, one CPU thread each, their output in {out / 'logs'}")
    code = run_jobs(jobs(out), out / "logs", started)
    if code != 0:
        return code

    results, rows, labels = {}, [], []
    for name in MODELS:
        results[name], fidelity, prior = read_scores(out / "scores" / name)
        rows.append(fidelity[::FIDELITY_SEEDS] + prior[:6])   # one image per background, then 6 "a star"
        labels.append(name.replace("_", " "))
    headings = [f"{INSTANCE_PROMPT} on a\n{c} background" for c in FIDELITY_BACKGROUNDS] + [CLASS_PROMPT] * 6
    comparison_grid([instance_images(), *rows], ["instances", *labels], headings).save(out / "comparison.png")
    atomic_write(out / "demo_report.json", lambda tmp: Path(tmp).write_text(json.dumps(results, indent=2) + "\n"))

    print(f"\n{'':>17} | 'a sks star on a <colour> background' ({len(FIDELITY_BACKGROUNDS) * FIDELITY_SEEDS}) "
          f"| 'a star' ({PRIOR_SEEDS})")
    print(f"{'model':>17} | similarity  subject  background | star  colours  subject")
    for name, s in results.items():
        print(f"{name:>17} | {s['subject_similarity']:10.2f} {s['looks_like_subject']:8.0%} {s['background_as_asked']:11.0%}"
              f" | {s['class_is_star']:4.0%} {s['class_colours']:8d} {s['class_looks_like_subject']:8.0%}")
    print(f"(textual_inversion: 'a {TI_WORD} on a <colour> background', the word learned from the same images; its "
          "model is the base model, unchanged)")
    lora_file = out / "lora" / "pytorch_lora_weights.safetensors"
    embedding = out / "textual_inversion" / "learned_embeds.safetensors"
    print(f"\nwrote {out / 'comparison.png'} (rows: instance images, base, with prior, LoRA, without prior, textual "
          f"inversion), {out / 'demo_report.json'}, the two models {out / 'with_prior'}, {out / 'no_prior'}, the LoRA "
          f"{lora_file} and the embedding {embedding} (python sample.py --ckpt {out / 'with_prior'} --prompt "
          f"'{INSTANCE_PROMPT} on a red background'; python sample.py --lora {lora_file} --prompt ...; "
          f"python sample.py --embedding {embedding} --prompt 'a {TI_WORD} on a red background')")
    print(f"demo took {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] != ["score"]:
        sys.exit("usage: python -m world.dreambooth_demo score MODEL --out DIR [--lora FILE] "
                 "(the demo itself: python train_dreambooth.py with no arguments)")
    sys.exit(score_main(sys.argv[2:]))
