"""What every training script here shares: the learning-rate schedule, the optimizer step, the fp16
loss scaler, DDP, seeding and RNG state, checkpoints, stop-on-signal, and the metrics log.

The training loops themselves (train_emotion.py, train_dreambooth.py) stay in their scripts, top to
bottom; this file only holds the small pieces that would otherwise be copied between them.

Checkpoints are one file per optimizer step, `checkpoint-<step>.pt`, written by `torch.save` and read
back with `torch.load(weights_only=True)`: that unpickler accepts tensors and plain containers only
(dict, list, tuple, int, float, str, bool, None), so a training checkpoint cannot run code when it is
loaded. Model weights meant for other programs are exported as safetensors instead.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import random
import re
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as torch_dist
from torch.nn.parallel import DistributedDataParallel as DDP

from common.files import atomic_write, remove_stale_temporaries
from common.run_config import check_resume_config, finish_run_record

CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)\.pt")

LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")
REPORT_TO = ("jsonl", "tensorboard")


# ---- the flags every diffusion trainer shares ---------------------------------------------------------
def add_run_flags(add_argument) -> None:
    """--report_to and the flags of checkpoints and resuming (train_dreambooth.py, train_textual_inversion.py)."""
    a = add_argument
    a("--report_to", default="jsonl", choices=REPORT_TO,
      help="metrics.jsonl is always written; 'tensorboard' adds event files (needs the tensorboard package)")
    a("--checkpointing_steps", type=int, default=500, help="save the full training state every N steps")
    a("--checkpoints_total_limit", type=int, help="keep only the newest N checkpoints")
    a("--resume_from_checkpoint", help="a checkpoint file, or 'latest' in --output_dir (the newest that reads)")
    a("--overwrite_output_dir", action="store_true",
      help="write into an --output_dir that holds another run's state (its checkpoints are never pruned)")
    a("--skip_nonfinite_steps", action="store_true",
      help="skip an optimizer step whose loss is NaN/inf (counted in metrics.jsonl) instead of stopping the run")
    a("--allow_config_change", action="store_true", help="resume even when run-shaping settings changed")


def check_run_flags(args, parser) -> None:
    """The flags the two diffusion trainers share (add_run_flags', the seed, AdamW's and the learning rate's),
    checked before any file is read: a bad value is parser.error's one line naming the flag (exit 2)."""
    from common.flags import SEED_MAX, check_seed
    try:
        MetricsLog.check(args.report_to)
        check_seed(args.seed, low=0, high=SEED_MAX // 2)   # numpy's SeedSequence needs >= 0; seed + k must fit
    except ValueError as e:
        parser.error(str(e))
    for name in ("checkpointing_steps", "checkpoints_total_limit"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} {getattr(args, name)}: must be at least 1")
    if args.learning_rate is not None and args.learning_rate <= 0:
        parser.error(f"--learning_rate {args.learning_rate}: must be > 0")
    if args.lr_warmup_steps < 0:
        parser.error(f"--lr_warmup_steps {args.lr_warmup_steps}: must be >= 0")
    for name in ("adam_beta1", "adam_beta2"):   # torch's AdamW: [0, 1)
        if not 0.0 <= getattr(args, name) < 1.0:
            parser.error(f"--{name} {getattr(args, name)}: must be in [0, 1) (Adam's decay rate)")
    for name in ("adam_epsilon", "adam_weight_decay"):   # None: the model family's default (train_dreambooth.py)
        if getattr(args, name) is not None and getattr(args, name) < 0:
            parser.error(f"--{name} {getattr(args, name)}: must be >= 0")


# ---- learning rate -----------------------------------------------------------------------------------
def learning_rate(step: int, *, total: int, peak: float, schedule: str, warmup: int) -> float:
    """The learning rate of optimizer step `step` (0-based), as diffusers' and transformers'
    get_scheduler compute it: "constant" ignores the warmup; the others rise linearly from 0 over
    `warmup` steps (step / warmup), then stay ("constant_with_warmup"), or fall to 0 at `total` in a
    straight line ("linear") or along half a cosine ("cosine", Loshchilov & Hutter 2017, eq. 5
    without restarts)."""
    if schedule not in LR_SCHEDULERS:
        raise ValueError(f"--lr_scheduler {schedule!r}: choose one of {', '.join(LR_SCHEDULERS)}")
    if schedule == "constant":
        return peak
    if step < warmup:
        return peak * step / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return peak * (1.0 - progress)
    if schedule == "cosine":
        return peak * 0.5 * (1.0 + math.cos(math.pi * progress))
    return peak


def count_steps(examples: int, *, global_batch: int, max_train_steps: int | None, num_train_epochs: int,
                what: str) -> tuple[int, int]:
    """(optimizer steps per epoch, optimizer steps in all): an epoch is as many whole global batches
    (--train_batch_size x --gradient_accumulation_steps x processes) as `examples` holds; the run lasts
    --max_train_steps, or else --num_train_epochs epochs. A ValueError when not one global batch fits."""
    steps_per_epoch = examples // global_batch
    if steps_per_epoch == 0:
        raise ValueError(f"{examples} {what} are fewer than one global batch of {global_batch} "
                         "(--train_batch_size x --gradient_accumulation_steps x processes)")
    return steps_per_epoch, max_train_steps or num_train_epochs * steps_per_epoch


# ---- the optimizer ---------------------------------------------------------------------------------
def adamw(params, **hyperparameters) -> torch.optim.AdamW:
    """torch's AdamW (Loshchilov & Hutter 2019), in its fused form wherever torch has one (floating-point
    parameters on a CPU or a CUDA device): one kernel per group of tensors instead of about ten small
    operations per tensor. The same arithmetic, differing from the per-tensor loop in float rounding only
    (tests/test_optimizer.py); on the demo's 2.8M-parameter model, one CPU thread, 46 -> 16 ms a step."""
    params = list(params)
    tensors = [p for item in params for p in (item["params"] if isinstance(item, dict) else [item])]
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in tensors)
    return torch.optim.AdamW(params, fused=fused or None, **hyperparameters)


# ---- the optimizer step ----------------------------------------------------------------------------
def optimizer_step(optimizer, scaler, params: list, *, lr: float, max_grad_norm: float) -> torch.Tensor:
    """Set the learning rate (times a group's `lr_scale`, where it has its own peak rate), clip the global
    gradient norm (0: no clipping), step, zero the gradients. Returns the gradient norm before clipping."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    scaler.unscale_(optimizer)                      # so clipping sees the true gradient
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm or float("inf"))
    scaler.step(optimizer)                          # skipped if fp16 gradients overflowed
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


class NonFiniteLoss(Exception):
    """A step's loss is NaN or infinite and the run does not skip such steps; the message is the user's."""


def finish_step(loss_sums: torch.Tensor, *, names: tuple[str, ...], micro_batches: int, step: int, skipped: int,
                lr: float, dist: "Distributed", optimizer, scaler, params: list, max_grad_norm: float,
                skip_nonfinite: bool) -> dict:
    """The end of optimizer step `step` (0-based), with the same verdict on every process: this
    process's sums over its micro-batches of the loss and its parts ((K,), named by the first K `names`)
    are averaged over processes and micro-batches; when every mean is finite, `optimizer_step` at `lr`.
    When one is not, NonFiniteLoss (the run stops), or with `skip_nonfinite` (--skip_nonfinite_steps)
    the gradients are dropped and the step counts as skipped.

    Returns the step's metrics record but for what only its script knows: "step" (the steps now done),
    each name's mean (None for a skipped step: metrics.jsonl is strict JSON), "lr", "grad_norm" (before
    clipping; None for a skipped step) and "skipped_nonfinite_steps" (the count so far, from `skipped`)."""
    means = all_reduce_sum(loss_sums, dist).cpu() / (dist.world_size * micro_batches)   # (K,)
    if bool(torch.isfinite(means).all()):
        losses = means.tolist()
        grad_norm = optimizer_step(optimizer, scaler, params, lr=lr, max_grad_norm=max_grad_norm).item()
    elif skip_nonfinite:
        optimizer.zero_grad(set_to_none=True)
        losses, grad_norm, skipped = [None] * len(means), None, skipped + 1
    else:
        raise NonFiniteLoss(nonfinite_loss_message(step + 1, means.tolist()))
    return {"step": step + 1, **dict(zip(names, losses)), "lr": lr, "grad_norm": grad_norm,
            "skipped_nonfinite_steps": skipped}


# ---- mixed precision -------------------------------------------------------------------------------
def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """A loss scaler for fp16 on CUDA (fp16 gradients underflow without it); a pass-through otherwise.

    bf16 has fp32's exponent range and needs no scaling. On CPU, fp16 autocast runs without a scaler.
    """
    enabled = precision == "fp16" and device.type == "cuda"
    return torch.amp.GradScaler(device.type, enabled=enabled)


# ---- distributed data parallel ---------------------------------------------------------------------
@dataclass
class Distributed:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str = "auto") -> Distributed:
    """Read torchrun's RANK / LOCAL_RANK / WORLD_SIZE and join the process group (NCCL on CUDA, gloo on
    CPU). Without torchrun: one process. `device`: "auto" (CUDA when present), "cpu" or "cuda"."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"--device {device!r}: choose auto, cpu or cuda")
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda and local_rank >= torch.cuda.device_count():
        # NCCL refuses two processes on one GPU ("Duplicate GPU detected"): one process per device.
        raise ValueError(f"LOCAL_RANK {local_rank} has no GPU: torchrun started more processes on this machine "
                         f"than its {torch.cuda.device_count()} CUDA device(s); use --nproc_per_node "
                         f"{torch.cuda.device_count()} or --device cpu")
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world_size > 1:
        torch_dist.init_process_group(backend="nccl" if use_cuda else "gloo", rank=rank, world_size=world_size)
    return Distributed(rank=rank, local_rank=local_rank, world_size=world_size, device=dev)


def teardown_distributed(dist: Distributed) -> None:
    if dist.enabled and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor, dist: Distributed) -> torch.Tensor:
    """The sum over every process (the tensor itself with one process). Returns a new tensor."""
    t = t.clone()
    if dist.enabled:
        torch_dist.all_reduce(t, op=torch_dist.ReduceOp.SUM)
    return t


def barrier(dist: Distributed) -> None:
    if dist.enabled:
        torch_dist.barrier()


@contextlib.contextmanager
def gradient_sync(models: list[torch.nn.Module], *, sync: bool):
    """DDP all-reduces gradients during backward. With gradient accumulation only the last micro-batch
    needs that: for the others (`sync=False`) every DDP-wrapped model in `models` skips it (no_sync);
    the gradients stay local and are summed into the next backward. Plain modules are left alone."""
    with contextlib.ExitStack() as stack:
        if not sync:
            for model in models:
                if isinstance(model, DDP):
                    stack.enter_context(model.no_sync())
        yield


# ---- seeds and RNG state -----------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def rng_state() -> dict:
    """Every global random generator's state, as plain Python containers and tensors."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [kind, keys.tolist(), pos, has_gauss, gauss],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- checkpoints ---------------------------------------------------------------------
def list_checkpoints(folder: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint in `folder`, oldest first. Temporary files of an
    interrupted write start with a dot and never match."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m[1]), p) for p in folder.iterdir() if (m := CHECKPOINT_NAME.fullmatch(p.name))]
    return sorted(found)


RUN_MARKERS = ("run_info.json", "metrics.jsonl", "model_index.json", "model.safetensors")  # what any run leaves


def check_output_dir(folder: str | Path, *, resuming: bool, overwrite: bool) -> None:
    """A new run refuses an output folder that holds another run's state (checkpoints, a run record,
    metrics, a model), which it would otherwise overwrite or prune, unless it resumes that run or
    --overwrite_output_dir says to write over it. A ValueError naming what was found."""
    folder = Path(folder)
    if resuming or overwrite or not folder.is_dir():
        return
    found = [p.name for _, p in list_checkpoints(folder)] + [m for m in RUN_MARKERS if (folder / m).exists()]
    if found:
        raise ValueError(f"--output_dir {folder}: holds another run's state ({', '.join(found[:6])}"
                         f"{', ...' if len(found) > 6 else ''}); continue it with --resume_from_checkpoint latest, "
                         "write over it with --overwrite_output_dir, or choose another folder")


class Checkpoints:
    """This run's `checkpoint-<step>.pt` files in its output folder.

    Each is written atomically. `total_limit` prunes to the newest N checkpoints OF THIS RUN: the
    steps it saved are kept in every checkpoint ("checkpoint_steps") and carried across resumes, and
    no other file of the folder is ever deleted. `resume` finds the state to continue from, skipping
    (and naming) a newest checkpoint that does not read, e.g. one torn by a full disk."""

    def __init__(self, folder: str | Path, *, total_limit: int | None = None):
        self.folder, self.total_limit, self.steps = Path(folder), total_limit, []

    def save(self, step: int, state: dict) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"checkpoint-{step}.pt"
        steps = [s for s in self.steps if s != step] + [step]
        kept = steps[-self.total_limit:] if self.total_limit else steps   # what this checkpoint says is the run's
        try:
            atomic_write(path, lambda tmp: torch.save({**state, "checkpoint_steps": kept}, tmp))
        except OSError as e:
            intact = f"checkpoint-{self.steps[-1]}.pt is intact" if self.steps else "no earlier checkpoint was saved"
            raise OSError(e.errno, f"cannot write {path} ({e.strerror or e}); {intact}") from None
        for old in steps[:len(steps) - len(kept)]:
            (self.folder / f"checkpoint-{old}.pt").unlink(missing_ok=True)
        self.steps = kept
        return path

    def resume(self, value: str | None) -> tuple[Path, dict] | None:
        """--resume_from_checkpoint: a file, a folder (its newest readable checkpoint) or "latest" (the
        newest readable one in the output folder; None when there is none). Warnings name what was skipped."""
        if not value:
            return None
        path = Path(value)
        if value != "latest" and not path.is_dir():
            if not path.is_file():
                raise FileNotFoundError(f"--resume_from_checkpoint {value}: no such file")
            return self._adopt(path, load_checkpoint(path))
        folder = self.folder if value == "latest" else path
        found = list_checkpoints(folder)
        if not found and value != "latest":
            raise FileNotFoundError(f"--resume_from_checkpoint {value}: no checkpoint-<step>.pt in this folder")
        skipped = []
        for _, candidate in reversed(found):
            try:
                state = load_checkpoint(candidate)
            except ValueError as e:
                print(f"warning: skipping {candidate}, which does not read: {e}", file=sys.stderr)
                skipped.append(candidate.name)
                continue
            return self._adopt(candidate, state)
        if skipped:
            raise ValueError(f"--resume_from_checkpoint {value}: no checkpoint in {folder} reads "
                             f"({', '.join(skipped)} skipped)")
        return None

    def _adopt(self, path: Path, state: dict) -> tuple[Path, dict]:
        named = CHECKPOINT_NAME.fullmatch(path.name)
        if path.parent.resolve() == self.folder.resolve() and named:   # this run's own earlier checkpoints
            self.steps = list(state.get("checkpoint_steps", [int(named[1])]))
        return path, state


def resume(checkpoints: Checkpoints, value: str | None, *, restore, run_settings: dict, run_shaping: tuple,
           allow_change: bool) -> tuple[object, int] | None:
    """--resume_from_checkpoint `value`: the checkpoint `Checkpoints.resume` finds, its run-shaping
    settings compared with this run's (`check_resume_config`: named, and refused unless `allow_change`),
    its state loaded back by `restore(state)` (the script's restore_training_state), then every RNG state.

    Returns (what `restore` returned, the steps skipped so far for a non-finite loss), or None to start
    from scratch (no `value`, or "latest" in a folder with no checkpoint yet). A ValueError carries the
    line for the user: no such file, no checkpoint that reads, settings changed, or a state that does
    not fit this run's models."""
    try:
        found = checkpoints.resume(value)
    except FileNotFoundError as e:
        raise ValueError(str(e)) from None
    if found is None:
        if value:
            print(f"no checkpoint in {checkpoints.folder}; starting from scratch", file=sys.stderr)
        return None
    path, state = found
    for line in check_resume_config(state["run_settings"], run_settings, run_shaping, checkpoint=path,
                                    allow_change=allow_change):
        print(f"warning: changed since the checkpoint:{line}", file=sys.stderr)
    try:
        restored = restore(state)
    except (KeyError, RuntimeError, ValueError) as e:   # a CheckpointError is a ValueError
        raise ValueError(f"--resume_from_checkpoint {path}: does not fit this run ({e})") from None
    set_rng_state(state["rng"])
    print(f"resumed from {path} at step {state['step']}", file=sys.stderr)
    return restored, state.get("skipped_nonfinite_steps", 0)


def load_checkpoint(path: str | Path) -> dict:
    """A training state, read with torch's restricted unpickler; one holding NaN or infinity (a run stops
    before it would save one, so the file is corrupt) is refused like a torn one, naming the tensor."""
    from common.state_dict import check_finite
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file
        raise ValueError(f"{path}: not a readable training checkpoint ({e})") from e
    check_finite(dict(_tensors(state)), source=str(path))   # a CheckpointError is a ValueError
    return state


def _tensors(value, prefix: str = ""):
    """(dotted name, tensor) of every tensor in nested dicts and lists."""
    if isinstance(value, torch.Tensor):
        yield prefix, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _tensors(v, f"{prefix}.{i}" if prefix else str(i))


def save_training_state(dist: Distributed, checkpoints: Checkpoints, step: int, state: dict) -> str | None:
    """checkpoint-<step>.pt, written by the main process (the RNG states saved are its own: every
    process seeds the same way, and the data randomness is keyed by seed, epoch and position).
    Returns None, or on every process the reason the write failed (the checkpoint before it is
    intact), so that all of them stop together."""
    error = None
    if dist.is_main:
        try:
            checkpoints.save(step, state)
        except OSError as e:
            error = e.strerror or str(e)
    failed = all_reduce_sum(torch.tensor([1.0 if error else 0.0]), dist).item() > 0
    return (error or "the main process could not write its checkpoint") if failed else None


def report_stale_temporaries(dist: Distributed, *folders: str | Path) -> None:
    """Remove (on the main process) and name the temporary files that a crash mid-write left in
    `folders` (GBs at SD scale); ours are found by name (common/files.py)."""
    if dist.is_main:
        for folder in folders:
            for stale in remove_stale_temporaries(folder):
                print(f"removed {stale}, a temporary file left by an interrupted write", file=sys.stderr)


# ---- ending a run -----------------------------------------------------------------------------------------
def fail(message: str, dist: Distributed | None = None) -> int:
    """A user mistake or a run that cannot go on: one line on stderr, exit status 2, no traceback."""
    print(f"error: {message}", file=sys.stderr)
    if dist is not None:
        teardown_distributed(dist)
    return 2


def fail_run(message: str, *, reason: str, dist: Distributed, log: "MetricsLog", output_dir: str | Path,
             info: dict | None, step: int) -> int:
    """`fail` for a run that has started: run_info.json says it failed (and why), the log is closed."""
    if dist.is_main:
        finish_run_record(output_dir, info, status=f"failed: {reason}", step=step)
    log.close()
    return fail(message, dist)


def stopped_run(signum: int, *, dist: Distributed, log: "MetricsLog", output_dir: str | Path, info: dict | None,
                step: int) -> int:
    """The end of a run stopped by SIGINT/SIGTERM after saving its state: recorded, exit 128 + signum."""
    print(f"stopped by signal {signum} at step {step}; resume with --resume_from_checkpoint latest", file=sys.stderr)
    if dist.is_main:
        finish_run_record(output_dir, info, status=f"stopped by signal {signum}", step=step)
    log.close()
    teardown_distributed(dist)
    return 128 + signum


def nonfinite_loss_message(step: int, losses) -> str:
    return (f"the loss at step {step} is not finite ({losses}); stopped, and the last checkpoint is kept: "
            "resume from it with a lower --learning_rate, or pass --skip_nonfinite_steps")


# ---- stop on SIGINT / SIGTERM -----------------------------------------------------------------------
class StopOnSignal:
    """Turns SIGINT (Ctrl-C) and SIGTERM (sent by schedulers and by torchrun on shutdown) into a flag the
    loop checks after each optimizer step, so it can write a checkpoint and exit cleanly.

        with StopOnSignal() as stop:
            ... if stop.signum: save; exit
    """

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

    def _handle(self, signum, frame):
        self.signum = signum

    def __enter__(self) -> "StopOnSignal":
        for s in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # only the main thread may install handlers
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def stop_requested(stop: StopOnSignal, dist: Distributed) -> bool:
    """True on every process when any process got a signal, so all of them stop at the same step."""
    flag = torch.tensor([1.0 if stop.signum else 0.0])
    return bool(all_reduce_sum(flag, dist).item() > 0)


# ---- metrics -------------------------------------------------------------------------------------------
class MetricsLog:
    """One JSON object per line in `metrics.jsonl`, always; with report_to="tensorboard" also
    TensorBoard event files in `tensorboard/` (needs the optional tensorboard package, imported only
    then). Only the main process writes.

    The log continues from `start_step`: records of later steps (written before a crash by the run
    being resumed, or by an earlier run in the folder) are dropped first, so every step appears once.
    Values must be finite: the file is strict JSON (no NaN or Infinity)."""

    def __init__(self, folder: str | Path, *, enabled: bool = True, report_to: str = "jsonl", start_step: int = 0):
        self.check(report_to)
        self.file, self.tensorboard = None, None
        if not enabled:
            return
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "metrics.jsonl"
        if path.exists():
            kept = [line for line in path.read_text().splitlines(keepends=True) if _step_of(line) <= start_step]
            atomic_write(path, lambda tmp: Path(tmp).write_text("".join(kept)))
        self.file = open(path, "a")
        if report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter
            self.tensorboard = SummaryWriter(str(folder / "tensorboard"))

    @staticmethod
    def check(report_to: str) -> None:
        """--report_to before any work: a known value, and tensorboard installed when it is asked for."""
        if report_to not in REPORT_TO:
            raise ValueError(f"--report_to {report_to!r}: choose one of {', '.join(REPORT_TO)}")
        if report_to == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
            raise ValueError("--report_to tensorboard: the tensorboard package is not installed "
                             "(pip install tensorboard); the default, --report_to jsonl, needs nothing")

    def log(self, record: dict) -> None:
        if self.file is None:
            return
        try:
            line = json.dumps(record, allow_nan=False)
        except ValueError:
            raise ValueError(f"metrics.jsonl: a value of step {record.get('step')} is not finite: {record}") from None
        self.file.write(line + "\n")
        self.file.flush()
        if self.tensorboard is not None and "step" in record:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


def _step_of(line: str) -> float:
    """The step of one metrics.jsonl line (infinity for a line that does not parse: a torn last line)."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf
