"""What a training run does with a careless user and a hostile machine (issue 22): it never deletes or
overwrites another run's checkpoints, it continues from the newest checkpoint that reads, it leaves no
stale temporaries and no duplicate metrics, it stops on a non-finite loss (or skips and counts it), a
full disk names the file and the intact previous checkpoint, and bad numbers are refused by name.

The runs are train_emotion.py's tiny ones (seconds each); both trainers share these mechanisms
(common/training.py), and train_dreambooth.py's wiring is checked on its own fixtures where it differs."""
from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

import pytest
import torch
from PIL import Image

import train_emotion
from common.files import atomic_write, check_writable, read_json
from common.run_config import finish_run_record
from common.state_dict import write_safetensors
from common.training import Checkpoints, MetricsLog, list_checkpoints

TINY = ["--image_size", "32", "--num_synthetic_train", "48", "--num_synthetic_eval", "14",
        "--train_batch_size", "8", "--lr_warmup_steps", "2", "--device", "cpu"]


def train(out: Path, *extra: str) -> int:
    return train_emotion.main([*TINY, "--output_dir", str(out), *extra])


def steps_logged(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)]


# ---- another run's state is never lost --------------------------------------------------------------------
def test_a_new_run_refuses_a_folder_holding_another_runs_state(tmp_path, capsys):
    out = tmp_path / "run"
    assert train(out, "--max_train_steps", "4", "--checkpointing_steps", "2") == 0
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    capsys.readouterr()
    assert train(out, "--max_train_steps", "2") == 2
    err = capsys.readouterr().err
    assert "--output_dir" in err and "checkpoint-4.pt" in err and "--overwrite_output_dir" in err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before    # nothing touched


def test_pruning_removes_only_this_runs_checkpoints(tmp_path):
    """The data-loss bug: a second run in a used folder pruned by step number across runs and deleted
    the first run's newest checkpoints. With --overwrite_output_dir it now prunes only its own."""
    out = tmp_path / "run"
    assert train(out, "--max_train_steps", "6", "--checkpointing_steps", "2") == 0
    theirs = {s: (out / f"checkpoint-{s}.pt").read_bytes() for s in (2, 4, 6)}
    assert train(out, "--max_train_steps", "3", "--checkpointing_steps", "1", "--checkpoints_total_limit", "1",
                 "--overwrite_output_dir") == 0
    # ours: 1, 2, 3 written, only 3 kept (2 was overwritten by ours, then pruned as ours); theirs: 4 and 6 intact
    assert [s for s, _ in list_checkpoints(out)] == [3, 4, 6]
    assert all((out / f"checkpoint-{s}.pt").read_bytes() == theirs[s] for s in (4, 6))


def test_resume_keeps_pruning_its_own_checkpoints(tmp_path):
    out = tmp_path / "run"
    flags = ["--max_train_steps", "6", "--checkpointing_steps", "1", "--checkpoints_total_limit", "2"]
    assert train(out, *flags) == 0
    assert [s for s, _ in list_checkpoints(out)] == [5, 6]
    (out / "checkpoint-6.pt").unlink()
    (out / "checkpoint-3.pt").write_bytes(b"a file of this run's name that it no longer owns")
    assert train(out, *flags, "--resume_from_checkpoint", "latest") == 0
    # the run's own 5 and 6 are its newest two; checkpoint-3 had been pruned by the run, so the file now
    # there is not the run's and stays (checkpoint-5 lists [4, 5], the steps the run kept)
    assert [s for s, _ in list_checkpoints(out)] == [3, 5, 6]


def test_latest_falls_back_past_a_checkpoint_that_does_not_read(tmp_path, capsys):
    out = tmp_path / "run"
    assert train(out, "--max_train_steps", "4", "--checkpointing_steps", "2") == 0
    (out / "checkpoint-4.pt").write_bytes(b"torn by a full disk")
    capsys.readouterr()
    assert train(out, "--max_train_steps", "4", "--checkpointing_steps", "2", "--resume_from_checkpoint", "latest") == 0
    err = capsys.readouterr().err
    assert "skipping" in err and "checkpoint-4.pt" in err and "resumed from" in err and "checkpoint-2.pt" in err


def test_metrics_continue_from_the_resumed_step_without_duplicates(tmp_path):
    out = tmp_path / "run"
    assert train(out, "--max_train_steps", "4", "--checkpointing_steps", "2") == 0
    (out / "checkpoint-4.pt").unlink()                             # as if it had died before step 4's save
    assert train(out, "--max_train_steps", "4", "--checkpointing_steps", "2", "--resume_from_checkpoint", "latest") == 0
    assert steps_logged(out) == [1, 2, 3, 4]


def test_stale_temporaries_are_removed_and_named(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    stale = out / ".checkpoint-8.pt.a1b2c3d4.tmp"                  # what a SIGKILL mid-write leaves
    stale.write_bytes(b"x" * 1000)
    mine = out / ".notes.tmp"                                       # not of our naming: left alone
    mine.write_text("keep")
    assert train(out, "--max_train_steps", "1") == 0
    assert not stale.exists() and mine.exists()
    assert str(stale) in capsys.readouterr().err


# ---- non-finite losses and numbers --------------------------------------------------------------------
@pytest.fixture
def nan_at_step_2(monkeypatch):
    """The class-weighted loss becomes NaN on the third micro-batch (optimizer step 2, batch 1)."""
    import vit.emotion_steps
    real, calls = vit.emotion_steps.weighted_cross_entropy, []

    def poisoned(*a, **k):
        calls.append(1)
        loss = real(*a, **k)
        return loss * float("nan") if len(calls) == 2 else loss
    monkeypatch.setattr(train_emotion, "weighted_cross_entropy", poisoned)


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_checkpoint(tmp_path, capsys, nan_at_step_2):
    out = tmp_path / "run"
    assert train(out, "--max_train_steps", "4", "--checkpointing_steps", "1") == 2
    err = capsys.readouterr().err
    assert "loss at step 2 is not finite" in err and "--skip_nonfinite_steps" in err
    assert [s for s, _ in list_checkpoints(out)] == [1]
    assert json.loads((out / "run_info.json").read_text())["status"] == "failed: non-finite loss"
    assert "NaN" not in (out / "metrics.jsonl").read_text()


def test_skip_nonfinite_steps_counts_them_in_strict_json(tmp_path, nan_at_step_2):
    out = tmp_path / "run"
    assert train(out, "--max_train_steps", "4", "--skip_nonfinite_steps") == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "lr" in line]
    assert [r["skipped_nonfinite_steps"] for r in records] == [0, 1, 1, 1]
    assert records[1]["loss"] is None and records[1]["grad_norm"] is None
    for line in (out / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c} in metrics.jsonl"))


@pytest.mark.parametrize("flag", ["--learning_rate", "--weight_decay", "--max_grad_norm"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_number_flags_must_be_finite(tmp_path, capsys, flag, value):
    with pytest.raises(SystemExit):
        train(tmp_path / "run", f"{flag}={value}")
    err = capsys.readouterr().err
    assert flag in err and "not a finite number" in err
    assert not (tmp_path / "run").exists()


def test_config_values_must_be_finite_and_flat(tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text("learning_rate = nan\n")
    with pytest.raises(SystemExit):
        train(tmp_path / "run", "--config", str(config))
    assert "learning_rate" in (err := capsys.readouterr().err) and "finite" in err
    config.write_text("x = " + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(SystemExit):
        train(tmp_path / "run", "--config", str(config))
    assert str(config) in capsys.readouterr().err


# ---- the disk ------------------------------------------------------------------------------------------
def test_a_full_disk_names_the_file_and_the_intact_checkpoint(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    real_save = torch.save

    def full_disk(obj, f, *a, **k):
        if "checkpoint-2" in str(f):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)
    monkeypatch.setattr(torch, "save", full_disk)
    assert train(out, "--max_train_steps", "4", "--checkpointing_steps", "1") == 2
    err = capsys.readouterr().err
    assert "checkpoint-2.pt" in err and "No space left on device" in err and "checkpoint-1.pt is intact" in err
    assert json.loads((out / "run_info.json").read_text())["status"].startswith("failed: ")
    assert [s for s, _ in list_checkpoints(out)] == [1] and not list(out.glob(".*.tmp"))


def test_output_folder_that_is_a_file_is_named(tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    assert train(tmp_path / "a_file") == 2
    assert "--output_dir" in (err := capsys.readouterr().err) and "it is a file" in err
    assert train(tmp_path / "a_file" / "run") == 2
    assert "which is a file" in capsys.readouterr().err


def _write_safetensors(folder: Path) -> Path:
    write_safetensors(folder / "model.safetensors", {"w": torch.zeros(2)}, {"format": "pt"})
    return folder / "model.safetensors"


def _torch_save(folder: Path) -> Path:
    return Checkpoints(folder).save(1, {"w": torch.zeros(2)})


def _json(folder: Path) -> Path:
    finish_run_record(folder, {"command": "python train_emotion.py"})
    return folder / "run_info.json"


def _png(folder: Path) -> Path:
    image = Image.new("RGB", (4, 4))
    atomic_write(folder / "class-00000.png", lambda tmp: image.save(tmp, format="PNG"))   # as dreambooth/data.py
    return folder / "class-00000.png"


@pytest.mark.parametrize("write", [_write_safetensors, _torch_save, _json, _png],
                         ids=["safetensors", "torch.save", "json", "png"])
def test_written_files_honour_the_umask(tmp_path, write):
    """Every writer through atomic_write gives what open() would: 0644 under umask 022. mkstemp alone
    gives 0600, and safetensors replaces the temporary with a new 0600 file of its own."""
    old = os.umask(0o022)
    try:
        path = write(tmp_path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644, oct(stat.S_IMODE(path.stat().st_mode))


def test_checkpoints_never_prune_a_file_of_another_run(tmp_path):
    (tmp_path / "checkpoint-1.pt").write_bytes(b"another run's")
    ours = Checkpoints(tmp_path, total_limit=1)
    for step in (5, 6, 7):
        ours.save(step, {"step": step})
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1, 7]


def test_metrics_log_rewinds_to_the_start_step(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 6))
                                            + '{"step": 6, "lo')            # a torn last line
    log = MetricsLog(tmp_path, start_step=3)
    log.log({"step": 4, "loss": 0.5})
    with pytest.raises(ValueError, match="not finite"):
        log.log({"step": 5, "loss": float("nan")})
    log.close()
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def test_read_json_names_the_file(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="config.json: not a readable JSON file"):
        read_json(bad)
    bad.write_text("[" * 100_000)
    with pytest.raises(ValueError, match="config.json"):
        read_json(bad)
    with pytest.raises(ValueError, match="a_file"):
        (tmp_path / "a_file").write_text("")
        check_writable(tmp_path / "a_file" / "sub", "--output_dir")
