"""DreamBooth's evaluation (Ruiz et al. 2023, sec. 4.1, Tables 1 and 3), with our own DINO and CLIP.

    DINO    subject fidelity: the mean cosine similarity of the DINO ViT-S/16 [CLS] embeddings of every
            (generated, real) pair of images                                  pairwise_mean(G_dino, R_dino)
    CLIP-I  the same with CLIP image embeddings                               pairwise_mean(G_clip, R_clip)
    CLIP-T  prompt fidelity: the mean cosine similarity of each generated image's CLIP embedding with
            its own prompt's CLIP text embedding                              paired_mean(G_clip, T_clip)
    PRES    prior preservation: DINO between the fine-tuned model's images of the plain class
            ("a dog") and the real subject; lower is less drift towards it    pairwise_mean(C_dino, R_dino)
    real_dino, real_clip_i   the paper's "Real Images" row: the same over pairs of two different real
            images, the ceiling a model can reach

Embeddings are taken in batches (`Embedder`), in bf16 under autocast where the device computes it
natively (common/precision.py), and the similarities in float64.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from clip.model_weights import LoadedCLIP
from clip.tokenizer import CLIPTokenizer
from common.images import load_image
from common.precision import autocast
from vit.dino import dino_pixels
from vit.preprocess import preprocess_resize_crop
from vit.weights import LoadedViT


def pairwise_mean(a: torch.Tensor, b: torch.Tensor, *, distinct: bool = False) -> float:
    """Mean of cos(a_i, b_j) over every pair (i, j); distinct=True: a and b are one set, pairs i != j."""
    a, b = F.normalize(a.double(), dim=-1), F.normalize(b.double(), dim=-1)
    similarity = a @ b.T                                          # (len(a), len(b))
    if distinct:
        similarity = similarity[~torch.eye(len(a), dtype=torch.bool, device=a.device)]
    return similarity.mean().item()


def paired_mean(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean of cos(a_i, b_i): each row with its own partner."""
    return F.cosine_similarity(a.double(), b.double(), dim=-1).mean().item()


@dataclass
class Embedder:
    """DINO and CLIP, loaded; turns image files and prompts into embeddings, `batch_size` at a time."""
    dino: LoadedViT
    clip: LoadedCLIP
    tokenizer: CLIPTokenizer
    device: torch.device
    precision: str = "fp32"                # "fp32" or "bf16" (autocast)
    batch_size: int = 16
    progress: Callable[[int], None] = lambda n: None   # told how many images or prompts each batch held

    def _batches(self, items: list) -> Iterator[list]:
        for start in range(0, len(items), self.batch_size):
            yield items[start:start + self.batch_size]

    def _run(self, items: list, prepare: Callable, forward: Callable) -> torch.Tensor:
        out = []
        with torch.no_grad(), autocast(self.precision, self.device):
            for batch in self._batches(items):
                out.append(forward(prepare(batch).to(self.device)).float().cpu())
                self.progress(len(batch))
        return torch.cat(out)

    def dino_images(self, files: list[Path]) -> torch.Tensor:
        """(N, D) DINO [CLS] embeddings (vit/dino.py: DINO's evaluation transform)."""
        return self._run(files, lambda b: dino_pixels([load_image(f) for f in b]), self.dino.model)

    def clip_images(self, files: list[Path]) -> torch.Tensor:
        """(N, P) CLIP image embeddings (clip/preprocess.py: CLIPImageProcessor's transform)."""
        return self._run(files, lambda b: preprocess_resize_crop([load_image(f) for f in b], self.clip.preprocess),
                         self.clip.model.get_image_features)

    def clip_texts(self, prompts: list[str]) -> torch.Tensor:
        """(N, P) CLIP text embeddings; prompts longer than the model's positions are truncated, as
        transformers' CLIPTokenizer(truncation=True) does."""
        length = min(self.tokenizer.model_max_length, self.clip.model.config.text.max_position_embeddings)
        return self._run(prompts, lambda b: self.tokenizer(b, max_length=length), self.clip.model.get_text_features)


def scores(embedder: Embedder, *, real: list[Path], generated: list[Path], prompts: list[str],
           class_generated: list[Path] | None = None) -> dict:
    """DreamBooth's numbers for one subject: dino, clip_i, clip_t (and pres with class_generated),
    real_dino / real_clip_i (with at least two real images), and the same per prompt.

    prompts[k] is the prompt of generated[k], as CLIP-T will read it (the identifier kept or dropped by the caller)."""
    R_dino, G_dino = embedder.dino_images(real), embedder.dino_images(generated)
    R_clip, G_clip = embedder.clip_images(real), embedder.clip_images(generated)
    T_clip = embedder.clip_texts(prompts)
    out = {"dino": pairwise_mean(G_dino, R_dino), "clip_i": pairwise_mean(G_clip, R_clip),
           "clip_t": paired_mean(G_clip, T_clip)}
    if class_generated:
        out["pres"] = pairwise_mean(embedder.dino_images(class_generated), R_dino)
    if len(real) > 1:
        out["real_dino"] = pairwise_mean(R_dino, R_dino, distinct=True)
        out["real_clip_i"] = pairwise_mean(R_clip, R_clip, distinct=True)
    per_prompt = []
    for prompt in dict.fromkeys(prompts):                       # in first-seen order
        rows = torch.tensor([p == prompt for p in prompts])
        per_prompt.append({"prompt": prompt, "images": int(rows.sum()),
                           "dino": pairwise_mean(G_dino[rows], R_dino), "clip_i": pairwise_mean(G_clip[rows], R_clip),
                           "clip_t": paired_mean(G_clip[rows], T_clip[rows])})
    out["per_prompt"] = per_prompt
    return out


def amount_of_work(n_real: int, n_generated: int, n_class: int) -> int:
    """How many images and prompts `scores` embeds (a progress bar's total): real and generated images
    through DINO and CLIP, the prompts through CLIP, the class images through DINO."""
    return 2 * n_real + 3 * n_generated + n_class
