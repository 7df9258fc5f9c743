"""train_emotion.py: synthetic faces, exact resume (also after SIGKILL mid-write and SIGTERM), DDP = one
process, mixed precision, bad data, evaluation, and repeating a run from its run_config.toml.

Every run here is tiny (a 32x32 input to the small preset, a few dozen images, a few steps)."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import train_emotion
from common.training import list_checkpoints, load_checkpoint
from vit.model import EMOTION_LABELS
from vit.synthetic_faces import make_face, synthetic_faces
from vit.weights import load_vit

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--image_size", "32", "--num_synthetic_train", "48", "--num_synthetic_eval", "14",
        "--train_batch_size", "8", "--lr_warmup_steps", "2", "--device", "cpu"]


def train(out: Path, *extra: str) -> int:
    return train_emotion.main([*TINY, "--output_dir", str(out), *extra])


def losses(out: Path) -> dict[int, list[float]]:
    """step -> every loss logged for it (a resumed run logs again the steps after its checkpoint)."""
    found: dict[int, list[float]] = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            found.setdefault(record["step"], []).append(record["loss"])
    return found


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model.safetensors"))


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def start(out: Path, *extra: str, pause_before_rename: str) -> subprocess.Popen:
    """train_emotion.py in a subprocess, pausing before the rename of a file whose name contains
    NAME for SECONDS (pause_before_rename="NAME:SECONDS"; tests/pause_before_rename.py)."""
    name, seconds = pause_before_rename.rsplit(":", 1)
    return subprocess.Popen([sys.executable, "tests/pause_before_rename.py", name, seconds, "train_emotion.py",
                             *TINY, "--output_dir", str(out), *extra],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(condition, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    t0 = time.monotonic()
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"training exited early ({proc.returncode}):\n{proc.stdout.read()}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            raise AssertionError("timed out waiting for the training subprocess")
        time.sleep(0.05)


# ---- synthetic faces ------------------------------------------------------------------------------
def test_synthetic_faces_are_deterministic_per_seed():
    a = make_face("happy", 7)
    assert a.mode == "L" and a.size == (48, 48)
    assert a.tobytes() == make_face("happy", 7).tobytes()
    assert a.tobytes() != make_face("happy", 8).tobytes()
    assert a.tobytes() != make_face("sad", 7).tobytes()
    faces = synthetic_faces(14, seed=3)
    assert [label for _, label in faces] == list(range(7)) * 2
    assert all(x.tobytes() == y.tobytes() for (x, _), (y, _) in zip(faces, synthetic_faces(14, seed=3)))
    with pytest.raises(ValueError, match="unknown expression 'bored'"):
        make_face("bored", 0)


# ---- a whole run, its outputs, and repeating it from run_config.toml -------------------------------------
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "out"
    assert train(out, "--max_train_steps", "6", "--checkpointing_steps", "2", "--checkpoints_total_limit", "2") == 0
    return out


def test_run_writes_model_report_and_record(finished_run, capsys):
    out = finished_run
    loaded = load_vit(out)
    assert loaded.model.config.labels == list(EMOTION_LABELS) and loaded.preprocess.size == (32, 32)
    assert [s for s, _ in list_checkpoints(out)] == [4, 6]                 # total limit 2 pruned step 2
    assert sorted(losses(out)) == [1, 2, 3, 4, 5, 6]
    report = json.loads((out / "eval_report.json").read_text())
    assert report["support"] == 14 and set(report["per_class"]) == set(EMOTION_LABELS)
    assert Image.open(out / "confusion_matrix.png").size[0] > 100
    info = json.loads((out / "run_info.json").read_text())
    assert info["status"] == "finished" and info["world_size"] == 1 and info["dtype"] == "fp32"
    assert "max_train_steps = 6" in (out / "run_config.toml").read_text()

    assert train_emotion.main(["--eval_only", "--output_dir", str(out), *TINY]) == 0   # evaluates the saved model
    assert "macro f1" in capsys.readouterr().out


def test_run_config_repeats_the_run_bit_for_bit(finished_run, tmp_path):
    again = tmp_path / "again"
    assert train_emotion.main(["--config", str(finished_run / "run_config.toml"), "--output_dir", str(again)]) == 0
    assert_same_weights(finished_run, again)
    assert losses(again) == losses(finished_run)


# ---- exact resume ---------------------------------------------------------------------------------------
def test_sigkill_during_checkpoint_write_then_resume_is_exact(finished_run, tmp_path):
    out = tmp_path / "killed"
    proc = start(out, "--max_train_steps", "6", "--checkpointing_steps", "2", "--checkpoints_total_limit", "2",
                 pause_before_rename="checkpoint-4:60")
    wait_for(lambda: any(p.name.startswith(".checkpoint-4.pt.") for p in out.glob(".*")), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert [s for s, _ in list_checkpoints(out)] == [2]                     # the torn write left no checkpoint-4
    assert load_checkpoint(out / "checkpoint-2.pt")["step"] == 2             # and the previous one is intact

    assert train(out, "--max_train_steps", "6", "--checkpointing_steps", "2", "--checkpoints_total_limit", "2",
                 "--resume_from_checkpoint", "latest") == 0
    curve = losses(out)
    assert all(len(set(v)) == 1 for v in curve.values()), "a step re-run after resume logged another loss"
    assert {s: v[0] for s, v in curve.items()} == {s: v[0] for s, v in losses(finished_run).items()}
    assert_same_weights(finished_run, out)


def test_sigterm_saves_a_checkpoint_and_resume_is_exact(finished_run, tmp_path):
    out = tmp_path / "stopped"
    proc = start(out, "--max_train_steps", "6", "--checkpointing_steps", "2", "--checkpoints_total_limit", "2",
                 pause_before_rename="checkpoint-2:2")
    wait_for(lambda: any(p.name.startswith(".checkpoint-2.pt.") for p in out.glob(".*")), proc)
    proc.send_signal(signal.SIGTERM)              # lands during the paused write of checkpoint 2
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, output
    steps = [s for s, _ in list_checkpoints(out)]
    assert steps[-1] < 6 and "stopped by signal" in output
    assert json.loads((out / "run_info.json").read_text())["status"].startswith("stopped")

    assert train(out, "--max_train_steps", "6", "--checkpointing_steps", "2", "--checkpoints_total_limit", "2",
                 "--resume_from_checkpoint", "latest") == 0
    assert {s: v[-1] for s, v in losses(out).items()} == {s: v[0] for s, v in losses(finished_run).items()}
    assert_same_weights(finished_run, out)


def test_resume_refuses_changed_settings(finished_run, tmp_path, capsys):
    ckpt = finished_run / "checkpoint-4.pt"
    args = ["--output_dir", str(tmp_path / "changed"), "--max_train_steps", "6", "--checkpointing_steps", "2",
            "--resume_from_checkpoint", str(ckpt)]
    assert train(tmp_path / "changed", *args[2:], "--learning_rate", "0.01") == 2
    err = capsys.readouterr().err
    assert "learning_rate: checkpoint 0.0005, now 0.01" in err and "--allow_config_change" in err
    assert train(tmp_path / "changed", *args[2:], "--learning_rate", "0.01", "--allow_config_change") == 0


# ---- data parallel ------------------------------------------------------------------------------------
def test_ddp_two_processes_equal_one_process(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    common = ["--max_train_steps", "3", "--checkpointing_steps", "100", "--learning_rate", "1e-4"]
    assert train_emotion.main([*TINY, "--output_dir", str(one), *common, "--train_batch_size", "8"]) == 0
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "train_emotion.py", *TINY, "--output_dir", str(two), *common, "--train_batch_size", "4"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert json.loads((two / "run_info.json").read_text())["world_size"] == 2
    w1, w2 = weights(one), weights(two)
    worst = max((w1[k] - w2[k]).abs().max().item() for k in w1)
    assert worst <= 1e-5, worst
    for (s1, l1), (s2, l2) in zip(sorted(losses(one).items()), sorted(losses(two).items())):
        assert s1 == s2 and abs(l1[0] - l2[0]) <= 1e-5


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    common = ["--max_train_steps", "3", "--checkpointing_steps", "100", "--learning_rate", "1e-4",
              "--class_weighting", "balanced"]
    assert train(tmp_path / "big", *common, "--train_batch_size", "8") == 0
    assert train(tmp_path / "acc", *common, "--train_batch_size", "4", "--gradient_accumulation_steps", "2") == 0
    w1, w2 = weights(tmp_path / "big"), weights(tmp_path / "acc")
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) <= 1e-5


# ---- mixed precision ----------------------------------------------------------------------------------
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_paths_train(precision, tmp_path):
    # CPU only here: fp16 autocast runs without a GradScaler on CPU; the scaler path needs CUDA.
    out = tmp_path / precision
    # A 16x16 input (4 patches) keeps the slow CPU fp16 kernels cheap; 8 faces, memorised in a few steps.
    assert train(out, "--mixed_precision", precision, "--image_size", "16", "--num_synthetic_train", "8",
                 "--max_train_steps", "12", "--learning_rate", "2e-3", "--lr_scheduler", "constant",
                 "--augmentation", "off", "--checkpointing_steps", "100", "--num_synthetic_eval", "7") == 0
    curve = [v[0] for _, v in sorted(losses(out).items())]
    assert all(torch.isfinite(torch.tensor(curve)))
    assert sum(curve[-3:]) / 3 < 0.5 * sum(curve[:3]) / 3, curve


# ---- bad data -------------------------------------------------------------------------------------------
def _faces(folder: Path, labels: dict[str, int]) -> Path:
    for name, n in labels.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            make_face(name if name in EMOTION_LABELS else "happy", i).save(folder / name / f"{i}.png")
    return folder


def test_bad_data_is_reported_before_training(tmp_path, capsys):
    def run(data_dir):
        return train(tmp_path / "out", "--data_dir", str(data_dir), "--max_train_steps", "1")

    empty = _faces(tmp_path / "empty", {"happy": 3, "sad": 0})
    assert run(empty) == 2 and "sad: class folder has no readable images" in capsys.readouterr().err

    unknown = _faces(tmp_path / "unknown", {"happy": 3, "bored": 2})
    err = (run(unknown), capsys.readouterr().err)[1]
    assert "bored" in err and "not labels of the model" in err

    nothing = tmp_path / "nothing"
    nothing.mkdir()
    assert run(nothing) == 2 and "no class folders" in capsys.readouterr().err
    assert run(tmp_path / "missing") == 2 and "no such folder" in capsys.readouterr().err

    corrupt = _faces(tmp_path / "corrupt", {"happy": 10, "sad": 10})
    (corrupt / "sad" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.warns(UserWarning, match=r"broken\.png"):
        assert train(tmp_path / "out2", "--data_dir", str(corrupt), "--max_train_steps", "1",
                     "--validation_split", "0.2") == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_asked_for_without_a_gpu_is_refused(tmp_path, capsys):
    assert train(tmp_path / "out", "--device", "cuda") == 2
    assert "--device cuda: no CUDA device is available" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_fer_layout_maps_folders_onto_model_labels(tmp_path):
    from vit.emotion_data import load_folder_items
    root = tmp_path / "fer"
    _faces(root / "train", {"Surprise": 2, "angry": 2})
    _faces(root / "test", {"angry": 1})
    train_items, eval_items = load_folder_items(root, list(EMOTION_LABELS), validation_split=0.0, seed=0)
    assert sorted({label for _, label in train_items}) == [EMOTION_LABELS.index("angry"),
                                                            EMOTION_LABELS.index("surprise")]
    assert [label for _, label in eval_items] == [EMOTION_LABELS.index("angry")]
