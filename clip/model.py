"""CLIP's joint image-text space (Radford et al. 2021, sec. 2.3 and Figure 3's pseudocode):

    I_f = image_encoder(I)           vision_model(pixels).pooled_output     (B, D_image)
    T_f = text_encoder(T)            text_model(ids).pooled_output          (B, D_text)
    I_e = l2_normalize(I_f @ W_i)    visual_projection, a bias-free Linear  (B, P)
    T_e = l2_normalize(T_f @ W_t)    text_projection, a bias-free Linear    (B, P)
    logits = I_e @ T_e^T * exp(t)    t = logit_scale

`get_image_features` / `get_text_features` return I_f @ W_i and T_f @ W_t before the normalisation, as
transformers' methods of the same names do; a cosine similarity normalises them (dreambooth/metrics.py).

A full CLIPModel file holds both towers, both projections and logit_scale; transformers'
CLIPVisionModelWithProjection and CLIPTextModelWithProjection files hold one tower and its projection.
The model is built with the parts its file holds (clip/model_weights.py loads it strictly).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from clip.text_model import CLIPTextConfig, CLIPTextModel
from clip.vision_model import CLIPVisionConfig, CLIPVisionModel

LOGIT_SCALE_INIT = math.log(1 / 0.07)   # the paper's initial temperature 0.07 (transformers' 2.6592)


@dataclass
class CLIPConfig:
    text: CLIPTextConfig | None           # None: no text tower (a CLIPVisionModelWithProjection file)
    vision: CLIPVisionConfig | None       # None: no image tower (a CLIPTextModelWithProjection file)
    projection_dim: int = 512             # P, the width of the joint space (768 for ViT-L/14)
    logit_scale: bool = True              # a full CLIPModel holds the temperature; the one-tower files do not

    def __post_init__(self):
        if self.text is None and self.vision is None:
            raise ValueError("a CLIP model needs at least one tower")
        if not isinstance(self.projection_dim, int) or self.projection_dim < 1:
            raise ValueError(f"projection_dim={self.projection_dim!r}: must be an integer >= 1")

    @property
    def parts(self) -> str:
        """"image and text", "image" or "text": the towers this model holds."""
        return " and ".join(n for n, c in (("image", self.vision), ("text", self.text)) if c is not None)


class CLIPModel(nn.Module):
    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.config = config
        P = config.projection_dim
        self.vision_model = self.visual_projection = self.text_model = self.text_projection = None
        if config.vision is not None:
            self.vision_model = CLIPVisionModel(config.vision)
            self.visual_projection = nn.Linear(config.vision.hidden_size, P, bias=False)   # W_i
        if config.text is not None:
            self.text_model = CLIPTextModel(config.text)
            self.text_projection = nn.Linear(config.text.hidden_size, P, bias=False)       # W_t
        if config.logit_scale:
            self.logit_scale = nn.Parameter(torch.tensor(LOGIT_SCALE_INIT))

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalised pixels (clip/preprocess.py) -> (B, P) image embeddings, not normalised."""
        if self.vision_model is None:
            raise ValueError("this CLIP model has no image tower (a CLIPTextModelWithProjection file)")
        return self.visual_projection(self.vision_model(pixel_values).pooled_output)

    def get_text_features(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids (clip/tokenizer.py) -> (B, P) text embeddings, not normalised."""
        if self.text_model is None:
            raise ValueError("this CLIP model has no text tower (a CLIPVisionModelWithProjection file)")
        return self.text_projection(self.text_model(input_ids).pooled_output)
