"""The CUDA paths: skipped where no GPU is present (CI has none); run by hand on a GPU machine with
`python -m pytest -q tests/test_cuda.py`.

What only CUDA exercises: fp16 training through a live GradScaler (on the CPU the scaler is a
pass-through), exact resume with the scaler's state, torchrun's one-process-per-GPU rule (DDP over NCCL
itself needs two GPUs: NCCL refuses two processes on one), and inference on the GPU against the
same reference tensors and images the CPU tests use. fp32 on the GPU is compared at the CPU tests'
tolerances, so a TF32 shortcut or a device-dependent draw of noise would show here."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

import sample  # noqa: E402
import train_dreambooth  # noqa: E402
import train_emotion  # noqa: E402
from common.training import load_checkpoint  # noqa: E402
from test_sample import FOLDER, SINGLE, _argv, _assert_close, _reference, _runs  # noqa: E402
from test_train_dreambooth import args_for, tensors  # noqa: E402
from test_train_dreambooth import data  # noqa: E402,F401  (the instance photos fixture)
from test_train_emotion import losses, weights  # noqa: E402
from test_vit import REF, VIT, max_diff  # noqa: E402
from vit.classifier import ImageClassifier  # noqa: E402
from vit.weights import load_vit  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# As the CPU autocast test: 8 faces of 16x16 (4 patches), memorised in a few steps.
EMOTION = ["--image_size", "16", "--num_synthetic_train", "8", "--num_synthetic_eval", "7",
           "--train_batch_size", "8", "--lr_warmup_steps", "2", "--device", "cuda", "--max_train_steps", "12",
           "--checkpointing_steps", "6", "--learning_rate", "2e-3", "--lr_scheduler", "constant",
           "--augmentation", "off"]


# ---- inference ------------------------------------------------------------------------------------------
def test_vit_on_cuda_equals_reference():
    model = load_vit(VIT / "hf_classifier").model.cuda().eval()
    with torch.no_grad():
        logits = model(REF["pixel_values_32"].cuda()).cpu()
    assert max_diff(logits, REF["hf_classifier_logits"]) <= 1e-4
    for dtype in ("fp16", "bf16"):
        half = ImageClassifier(VIT / "hf_classifier", device="cuda", dtype=dtype).logits(REF["pixel_values_32"])
        assert torch.equal(half.argmax(-1).cpu(), REF["hf_classifier_logits"].argmax(-1)), dtype
        assert max_diff(half.cpu(), REF["hf_classifier_logits"]) < 0.1, dtype


@pytest.mark.parametrize("run", [pytest.param(r, id=r["name"]) for r in _runs(single_prompt=True)])
def test_sample_py_on_cuda_equals_diffusers(run, tmp_path):
    """The diffusers reference images were made on the CPU; the same seed gives them on the GPU (the
    latents and the DDIM noise are drawn from a CPU generator, as diffusers draws them)."""
    argv = _argv(run, FOLDER, tmp_path)
    argv[argv.index("--device") + 1] = "cuda"
    written = sample.main(argv)
    n = run["num_images_per_prompt"]
    _assert_close([np.asarray(Image.open(p)) for p in written[:n]], _reference(run), f"{run['name']} (cuda)")


@pytest.mark.parametrize("precision, mean_limit", [("fp16", 1.0), ("bf16", 3.0)])
def test_sample_py_half_precision_on_cuda_stays_close(precision, mean_limit, tmp_path):
    """Autocast changes the numbers, so the bar is the mean |diff| per pixel (in 1/255). On the CPU these
    runs differ from the fp32 reference by at most 0.19 (fp16) and 1.68 (bf16)."""
    run = next(r for r in _runs(single_prompt=True) if r["name"] == "ddim_eta0.8_lighthouse_48x32")
    argv = _argv(run, SINGLE, tmp_path) + ["--config", str(FOLDER), "--precision", precision]
    argv[argv.index("--device") + 1] = "cuda"
    ours = [np.asarray(Image.open(p)).astype(int) for p in sample.main(argv)[:run["num_images_per_prompt"]]]
    for a, b in zip(ours, _reference(run)):
        assert np.abs(a - b.astype(int)).mean() <= mean_limit, precision


# ---- train_emotion.py ---------------------------------------------------------------------------------
def test_train_emotion_fp16_scaler_on_cuda_learns_and_resumes_exactly(tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    args = [*EMOTION, "--mixed_precision", "fp16"]
    assert train_emotion.main([*args, "--output_dir", str(full)]) == 0
    scaler = load_checkpoint(full / "checkpoint-6.pt")["scaler"]
    assert scaler and scaler["scale"] > 1.0, f"the GradScaler was not live on CUDA: {scaler}"
    curve = [logged[0] for _, logged in sorted(losses(full).items())]
    assert all(np.isfinite(curve)) and sum(curve[-3:]) < 0.5 * sum(curve[:3]), curve
    resumed.mkdir()
    shutil.copy(full / "checkpoint-6.pt", resumed / "checkpoint-6.pt")      # as if stopped there
    assert train_emotion.main([*args, "--output_dir", str(resumed), "--resume_from_checkpoint", "latest"]) == 0
    a, b = weights(full), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_more_processes_than_gpus_is_refused_by_name(tmp_path):
    """NCCL cannot put two processes on one GPU (it stops with "Duplicate GPU detected"); our setup
    names the problem and the fix before any process group is made."""
    n = torch.cuda.device_count() + 1
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
                          "train_emotion.py", *EMOTION, "--output_dir", str(tmp_path / "ddp")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    assert f"LOCAL_RANK {n - 1} has no GPU" in run.stdout + run.stderr, run.stderr[-3000:]


# ---- train_dreambooth.py -----------------------------------------------------------------------------
def test_train_dreambooth_fp16_scaler_on_cuda_resumes_exactly(data, tmp_path):  # noqa: F811
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    extra = ["--max_train_steps", "4", "--checkpointing_steps", "2", "--device", "cuda",
             "--mixed_precision", "fp16", "--train_text_encoder", "--with_prior_preservation",
             "--class_prompt", "a photo of dog", "--num_class_images", "2", "--class_data_dir",
             str(tmp_path / "class")]
    assert train_dreambooth.main(args_for(data, full, *extra)) == 0
    scaler = load_checkpoint(full / "checkpoint-2.pt")["scaler"]
    assert scaler and scaler["scale"] > 1.0, f"the GradScaler was not live on CUDA: {scaler}"
    resumed.mkdir()
    shutil.copy(full / "checkpoint-2.pt", resumed / "checkpoint-2.pt")
    assert train_dreambooth.main(args_for(data, resumed, *extra, "--resume_from_checkpoint", "latest")) == 0
    for part in ("unet", "text_encoder"):
        a, b = tensors(full, part), tensors(resumed, part)
        assert all(torch.equal(a[k], b[k]) for k in a), part
    assert any(not torch.equal(a, b) for a, b in zip(tensors(full, "unet").values(),
                                                     tensors(FOLDER, "unet").values()))
