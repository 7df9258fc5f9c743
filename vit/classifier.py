"""Batch image classification with a loaded ViT: precision, int8, scores, top-k and threshold.

Used by predict_emotion.py and serve_emotion.py. Scores follow transformers' image-classification
pipeline: logits in float32, then softmax (or sigmoid / none), labels sorted by score.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn as nn
from PIL import Image

from common.precision import DTYPES
from vit.preprocess import preprocess
from vit.weights import load_vit

FUNCTIONS = ("softmax", "sigmoid", "none")
# What predict_emotion.py and serve_emotion.py say instead of writing NaN or Infinity, which are not JSON.
NON_FINITE = "the model gave a non-finite score (NaN or infinity): its weights or its --dtype overflowed"


class ImageClassifier:
    def __init__(self, path: str | Path, *, device: str = "cpu", dtype: str = "fp32", quantize: str | None = None):
        if dtype not in DTYPES:
            raise ValueError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
        if quantize not in (None, "int8"):
            raise ValueError(f"--quantize {quantize!r}: only int8 is supported")
        if quantize and (device != "cpu" or dtype != "fp32"):
            raise ValueError("--quantize int8 runs on the CPU in fp32 (dynamic int8 Linear layers); "
                             "drop --device/--dtype or --quantize")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"--device {device}: CUDA is not available on this machine")
        loaded = load_vit(path)
        self.path, self.layout = str(path), loaded.layout
        self.preprocess_config = loaded.preprocess
        self.labels = list(loaded.model.config.labels)
        self.device, self.dtype_name, self.quantize = device, dtype, quantize
        model = loaded.model.to(device=device, dtype=DTYPES[dtype])
        if quantize == "int8":
            # Dynamic quantisation: Linear weights stored as int8 (per tensor), activations quantised on
            # the fly, int8 matmuls by fbgemm/onednn. torch marks torch.ao.quantization deprecated in
            # favour of the torchao package, which is not among our dependencies; it still ships in 2.13.
            from torch.ao.quantization import quantize_dynamic
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", (DeprecationWarning, UserWarning))
                model = quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
        self.model = model.eval()

    def pixel_values(self, images: list[Image.Image]) -> torch.Tensor:
        return preprocess(images, self.preprocess_config)

    @torch.inference_mode()
    def logits(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, num_labels) float32 logits."""
        x = pixel_values.to(device=self.device, dtype=DTYPES[self.dtype_name])
        return self.model(x).float().cpu()

    def scores(self, images: list[Image.Image], function_to_apply: str = "softmax") -> torch.Tensor:
        """RGB images -> (B, num_labels) scores."""
        return apply_function(self.logits(self.pixel_values(images)), function_to_apply)

    def predict(self, images: list[Image.Image], *, top_k: int | None = 5, threshold: float | None = None,
                function_to_apply: str = "softmax") -> list[list[dict]]:
        """For each image, [{"label", "score"}, ...] sorted by score: the top_k, or all >= threshold."""
        return [rank(s, self.labels, top_k=top_k, threshold=threshold)
                for s in self.scores(images, function_to_apply)]


def apply_function(logits: torch.Tensor, name: str) -> torch.Tensor:
    if name == "softmax":
        return torch.softmax(logits.double(), dim=-1).float()
    if name == "sigmoid":
        return torch.sigmoid(logits.double()).float()
    if name == "none":
        return logits
    raise ValueError(f"function_to_apply {name!r}: choose one of {', '.join(FUNCTIONS)}")


def rank(scores: torch.Tensor, labels: list[str], *, top_k: int | None = 5,
         threshold: float | None = None) -> list[dict]:
    """Labels sorted by score; the first top_k (capped at the number of labels), or those >= threshold."""
    values = scores.tolist()          # Python floats once: indexing a tensor per label costs a dispatch each
    order = sorted(range(len(labels)), key=lambda i: -values[i])
    ranked = [{"label": labels[i], "score": values[i]} for i in order]
    if threshold is not None:
        return [r for r in ranked if r["score"] >= threshold]
    return ranked[: min(top_k, len(labels))] if top_k is not None else ranked
