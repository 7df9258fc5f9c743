"""Evaluation report for a classifier: accuracy, per-class precision / recall / F1 / support (the table
the dima806 model card shows, as scikit-learn's `classification_report` prints it), macro F1, and a
confusion matrix printed as text and drawn as a PNG with Pillow.

    r = evaluate(model, dataset, ...)       the confusion matrix over a held-out set (all processes) -> report
    write_report(r, output_dir)             printed, eval_report.json and confusion_matrix.png
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont
from torch.utils.data import DataLoader

from common.precision import autocast
from common.training import Distributed, all_reduce_sum


@torch.no_grad()
def evaluate(model, dataset, *, batch_size: int, num_workers: int, precision: str, dist: Distributed) -> dict:
    """Scores on `dataset`: each process takes every world_size-th image (no padding, so no image is
    counted twice) and the confusion matrices are summed over processes."""
    model.eval()
    indices = list(range(dist.rank, len(dataset), dist.world_size))
    loader = DataLoader(dataset, batch_size=batch_size, sampler=indices, num_workers=num_workers)
    n = model.config.num_labels
    cm = torch.zeros(n, n, dtype=torch.long)
    for pixels, targets in loader:
        with autocast(precision, dist.device):
            logits = model(pixels.to(dist.device))                            # (B, num_labels)
        cm += confusion_matrix(logits.argmax(-1).cpu(), targets, n)
    model.train()
    return report(all_reduce_sum(cm.to(dist.device), dist).cpu(), list(model.config.labels))


def write_report(r: dict, output_dir: Path) -> None:
    """The report printed, saved as `eval_report.json`, and its confusion matrix drawn as `confusion_matrix.png`."""
    print(format_report(r))
    (output_dir / "eval_report.json").write_text(json.dumps(r, indent=2) + "\n")
    png = draw_confusion_matrix(r["confusion_matrix"], r["labels"], output_dir / "confusion_matrix.png")
    print(f"evaluation report: {output_dir / 'eval_report.json'}, confusion matrix: {png}")


def confusion_matrix(predictions: torch.Tensor, targets: torch.Tensor, num_labels: int) -> torch.Tensor:
    """(num_labels, num_labels) int64 counts; row = true label, column = predicted label."""
    flat = targets.long() * num_labels + predictions.long()
    return torch.bincount(flat, minlength=num_labels * num_labels).reshape(num_labels, num_labels)


def report(cm: torch.Tensor, labels: list[str]) -> dict:
    """Scores from a confusion matrix. A class never predicted (or absent) gets precision (recall) 0,
    as scikit-learn does with zero_division=0."""
    cm = cm.double()
    tp, predicted, support = cm.diag(), cm.sum(0), cm.sum(1)
    precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), torch.zeros_like(tp))
    recall = torch.where(support > 0, tp / support.clamp(min=1), torch.zeros_like(tp))
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp(min=1e-12),
                     torch.zeros_like(tp))
    total = support.sum().item()
    per_class = {label: {"precision": precision[i].item(), "recall": recall[i].item(), "f1": f1[i].item(),
                         "support": int(support[i].item())} for i, label in enumerate(labels)}
    weights = support / max(total, 1)
    return {
        "accuracy": tp.sum().item() / max(total, 1), "macro_f1": f1.mean().item(),
        "weighted_f1": (f1 * weights).sum().item(), "support": int(total),
        "per_class": per_class, "confusion_matrix": cm.long().tolist(), "labels": list(labels),
    }


def format_report(r: dict) -> str:
    width = max(12, *(len(label) for label in r["labels"]))
    lines = [f"{'':>{width}}  precision    recall  f1-score   support", ""]
    for label, s in r["per_class"].items():
        lines.append(f"{label:>{width}}  {s['precision']:9.4f} {s['recall']:9.4f} {s['f1']:9.4f} {s['support']:9d}")
    lines += ["", f"{'accuracy':>{width}}  {'':9} {'':9} {r['accuracy']:9.4f} {r['support']:9d}",
              f"{'macro f1':>{width}}  {'':9} {'':9} {r['macro_f1']:9.4f} {r['support']:9d}",
              f"{'weighted f1':>{width}}  {'':9} {'':9} {r['weighted_f1']:9.4f} {r['support']:9d}", "",
              "confusion matrix (rows: true label, columns: predicted)"]
    short = [label[:7] for label in r["labels"]]
    lines.append(f"{'':>{width}}  " + " ".join(f"{s:>7}" for s in short))
    for label, row in zip(r["labels"], r["confusion_matrix"]):
        lines.append(f"{label:>{width}}  " + " ".join(f"{v:7d}" for v in row))
    return "\n".join(lines)


def draw_confusion_matrix(cm: list[list[int]], labels: list[str], path: str | Path, *, cell: int = 56) -> Path:
    """A PNG of the confusion matrix: each cell shaded by its share of the true class's row, with its
    count written in it; true labels down the left, predicted labels along the top."""
    n = len(labels)
    font = ImageFont.load_default()
    margin = 8 + max(int(font.getlength(label)) for label in labels)
    image = Image.new("RGB", (margin + n * cell + 8, margin + n * cell + 24), "white")
    d = ImageDraw.Draw(image)
    d.text((margin, 4), "predicted ->", fill="black", font=font)
    for j, label in enumerate(labels):                                  # column headers
        d.text((margin + j * cell + 4, margin - 14), label[:8], fill="black", font=font)
    for i, row in enumerate(cm):
        total = max(sum(row), 1)
        d.text((4, margin + i * cell + cell // 2 - 6), labels[i], fill="black", font=font)
        for j, count in enumerate(row):
            share = count / total
            shade = int(255 * (1 - share))
            x0, y0 = margin + j * cell, margin + i * cell
            d.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], fill=(shade, shade, 255), outline=(200, 200, 200))
            d.text((x0 + 6, y0 + cell // 2 - 6), str(count), fill="white" if share > 0.5 else "black", font=font)
    d.text((4, margin + n * cell + 6), "rows: true label", fill="black", font=font)
    path = Path(path)
    image.save(path)
    return path
