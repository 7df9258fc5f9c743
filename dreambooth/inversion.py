"""The named steps of train_textual_inversion.py (Gal et al. 2022, "An Image is Worth One Word"), as diffusers'
examples/textual_inversion/textual_inversion.py trains it, in the order its loop calls them:

    ids = add_placeholder(models, token, num_vectors=n, initializer=...)   the new word: n rows, each a copy
                                                                           of the initializer word's row
    rows = train_new_rows(models, first=ids[0], ...)   only the new rows learn (`NewRows`), all else frozen
    images = load_square_images(files, resolution, ...)                   each photo resized once
    batch, prompts = make_examples(...)                a flip and a template ("a photo of a {}") per example
    states = encode_prompts(...)                       the prompts' CLIP states, through the new rows
    pred, target, t = denoising_prediction(...)        VAE latents, noise, one UNet call (dreambooth/steps.py)
    loss = denoising_loss(pred, target)                the MSE: Gal et al. eq. 2, the LDM loss with the
                                                       text states the only thing that moves
    save_embedding(...)                                learned_embeds.safetensors (clip/textual_inversion.py)

Only the new rows learn. diffusers gives the whole token embedding to AdamW and, after every step, copies
the original values back into every other row. Here the new rows are their own parameter (`NewRows`), so
the optimizer, the gradients, the checkpoints and DDP hold n x D numbers instead of V x D (49408 x 768 for
SD v1: 38M numbers, 150 MB, and AdamW's two states as much again). AdamW works element by element, so each
new row gets the same update either way, weight decay included; tests/test_training_parity.py holds the
two to the same loss, gradient and rows.

Every random draw of one example (its template, its flip, and the forward process's latent sample, noise and
timestep) comes from that example's own generator (`dreambooth.data.example_generator`), so one process and
N processes draw the same numbers and a resumed run draws what the uninterrupted run would have; diffusers'
script draws them from Python's and torch's global generators.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from clip.textual_inversion import grow_token_embedding, vector_tokens
from dreambooth.data import decode_image, example_generator
from dreambooth.steps import Batch

# diffusers' examples/textual_inversion/textual_inversion.py: imagenet_templates_small (--learnable_property
# object) and imagenet_style_templates_small (style), from rinongal's textual_inversion (ldm/data/personalized.py).
OBJECT_TEMPLATES = (
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
    "a photo of the cool {}", "a close-up photo of a {}", "a bright photo of the {}", "a cropped photo of a {}",
    "a photo of the {}", "a good photo of the {}", "a photo of one {}", "a close-up photo of the {}",
    "a rendition of the {}", "a photo of the clean {}", "a rendition of a {}", "a photo of a nice {}",
    "a good photo of a {}", "a photo of the nice {}", "a photo of the small {}", "a photo of the weird {}",
    "a photo of the large {}", "a photo of a cool {}", "a photo of a small {}",
)
STYLE_TEMPLATES = (
    "a painting in the style of {}", "a rendering in the style of {}", "a cropped painting in the style of {}",
    "the painting in the style of {}", "a clean painting in the style of {}", "a dirty painting in the style of {}",
    "a dark painting in the style of {}", "a picture in the style of {}", "a cool painting in the style of {}",
    "a close-up painting in the style of {}", "a bright painting in the style of {}",
    "a cropped painting in the style of {}", "a good painting in the style of {}",
    "a close-up painting in the style of {}", "a rendition in the style of {}", "a nice painting in the style of {}",
    "a small painting in the style of {}", "a weird painting in the style of {}",
    "a large painting in the style of {}",
)
TEMPLATE_SETS = {"object": OBJECT_TEMPLATES, "style": STYLE_TEMPLATES}
FLIP_P = 0.5    # the script's RandomHorizontalFlip(p=0.5), always on


# ---- the new word ---------------------------------------------------------------------------------------------
def initializer_id(tokenizer, word: str) -> int:
    """The id of --initializer_token, which must be one token (diffusers: "The initializer token must be a
    single token."); a ValueError names the flag and how the tokenizer splits the word."""
    ids = tokenizer([word], padding=False)[0][1:-1]                      # without the start and end tokens
    if len(ids) != 1:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise ValueError(f"--initializer_token {word!r}: the tokenizer makes {len(ids)} tokens of it ({pieces}); "
                         "it must be one (a common word such as 'toy' or 'dog')")
    return ids[0]


def check_placeholder(tokenizer, token: str, num_vectors: int) -> list[str]:
    """The placeholder's tokens (tok, tok_1, ... for --num_vectors), refused when the tokenizer has one of them
    already, as diffusers' script refuses it. Returns them."""
    tokens = vector_tokens(token, num_vectors)
    known = [t for t in tokens if t in tokenizer]
    if known or not token.strip() or token != token.strip():
        why = f"{known[0]!r} is already in the tokenizer's vocabulary" if known else "it is empty or has spaces at its ends"
        raise ValueError(f"--placeholder_token {token!r}: {why}; choose a word the tokenizer does not know, such "
                         "as <cat-toy>")
    return tokens


def add_placeholder(models, token: str, *, num_vectors: int, initializer: str) -> list[int]:
    """The new word: its `num_vectors` tokens taught to the tokenizer, each with a new row of the token
    embedding equal to the initializer word's row (as the script initialises it). Returns their ids."""
    tokenizer, text_encoder = models.tokenizer, models.text_encoder
    tokens = check_placeholder(tokenizer, token, num_vectors)
    start = initializer_id(tokenizer, initializer)
    row = text_encoder.token_embedding.weight[start].detach()                    # (D,)
    grow_token_embedding(text_encoder, row.expand(num_vectors, -1), first=len(tokenizer))
    return tokenizer.add_tokens(tokens)


class NewRows(nn.Module):
    """A token embedding whose rows `first` on are a parameter of their own (`rows`, trained) and the rest a
    frozen one (`frozen`): the same lookup as the nn.Embedding it replaces, ids (B, T) -> (B, T, D)."""

    def __init__(self, embedding: nn.Embedding, first: int):
        super().__init__()
        weight = embedding.weight.detach()
        self.first, self.embedding_dim = first, weight.shape[1]
        self.num_embeddings = weight.shape[0]
        self.frozen = nn.Parameter(weight[:first], requires_grad=False)      # (V, D)
        self.rows = nn.Parameter(weight[first:].clone())                     # (n, D)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        new = (ids >= self.first)[..., None]                                 # (B, T, 1)
        old = F.embedding(ids.clamp(max=self.first - 1), self.frozen)        # (B, T, D)
        return torch.where(new, F.embedding((ids - self.first).clamp(min=0), self.rows), old)

    @property
    def weight(self) -> torch.Tensor:
        return torch.cat([self.frozen, self.rows])                           # (V + n, D)


def train_new_rows(models, *, first: int, gradient_checkpointing: bool, precision: str) -> NewRows:
    """Everything frozen but the token embedding's rows `first` on (the placeholder's), which become the
    text encoder's `NewRows`; the frozen UNet and VAE are stored in `precision` (the script's weight_dtype),
    the text encoder in fp32 (its new rows are the master weights; autocast runs it in `precision`).
    With `gradient_checkpointing` the text encoder and the UNet recompute their activations in backward (the
    UNet too: the gradient reaches the rows through it). Returns the new rows' module."""
    from common.precision import DTYPES
    for frozen in (models.unet, models.vae, models.text_encoder):
        frozen.requires_grad_(False)
    for frozen in (models.unet, models.vae):
        frozen.to(DTYPES[precision])
    models.vae.eval()
    models.text_encoder.token_embedding = rows = NewRows(models.text_encoder.token_embedding, first)
    models.text_encoder.train()
    if gradient_checkpointing:
        models.unet.enable_gradient_checkpointing()
        models.text_encoder.enable_gradient_checkpointing()
    return rows


def merge_new_rows(models) -> None:
    """The text encoder's plain nn.Embedding again, with the trained rows (for sampling with the word)."""
    rows = models.text_encoder.token_embedding
    if isinstance(rows, NewRows):
        merged = nn.Embedding(rows.num_embeddings, rows.embedding_dim, device=rows.rows.device, dtype=rows.rows.dtype)
        with torch.no_grad():
            merged.weight.copy_(rows.weight)
        merged.requires_grad_(False)
        models.text_encoder.token_embedding = merged


# ---- the data -------------------------------------------------------------------------------------------------
def load_square_image(file: Path, resolution: int, *, center_crop: bool, flag: str) -> torch.Tensor:
    """(3, r, r) uint8, as the script's dataset makes it before its flip: the photo in RGB (EXIF orientation
    applied, which the script does not do), with --center_crop first cut to the centred square of its shorter
    side, then resized to r x r with PIL's bicubic filter (without --center_crop the whole photo is squeezed
    to a square: the script's behaviour, which keeps every pixel and changes the aspect)."""
    from PIL import Image
    with decode_image(file, flag=flag) as im:
        pixels = np.asarray(im)                                                 # (H, W, 3) uint8
    if center_crop:
        h, w, side = pixels.shape[0], pixels.shape[1], min(pixels.shape[:2])
        pixels = pixels[(h - side) // 2:(h + side) // 2, (w - side) // 2:(w + side) // 2]
    square = Image.fromarray(pixels).resize((resolution, resolution), resample=Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(square).copy()).permute(2, 0, 1)         # (3, r, r)


def to_pixels(image: torch.Tensor) -> torch.Tensor:
    """uint8 (3, r, r) -> float32 in [-1, 1] as the script computes it: (image / 127.5 - 1.0) in float64, then
    rounded to float32 once."""
    return (image.double() / 127.5 - 1.0).float()


def make_examples(positions: range, *, order: torch.Tensor, epoch: int, seed: int, images: list, templates,
                  placeholder: str, choices: list | None = None) -> tuple[Batch, list[str]]:
    """The examples at `positions` of the epoch's `order` (an epoch is --repeats passes over the photos:
    example k shows photo order[k] % n, as the script's dataset of n x repeats items): for each, from its
    own generator, a template (uniform, as random.choice) and a horizontal flip (probability FLIP_P).
    `placeholder`: the text put in the template, the new word's tokens joined by spaces ("tok tok_1 ...", as
    the script writes it). `choices`: (photo, template, flip) per example, given instead of drawn (a reference
    script's, for a test or a port); the generators are made all the same, for the draws that follow.
    Returns the batch (pixels (B, 3, r, r) in [-1, 1]) and its B prompts."""
    pixels, prompts, crops, generators = [], [], [], []
    for n, k in enumerate(positions):
        g = example_generator(seed, epoch, k)
        i = int(order[k]) % len(images)
        t = int(torch.randint(len(templates), (1,), generator=g))
        flip = bool(torch.rand((1,), generator=g) < FLIP_P)
        if choices is not None:
            i, t, flip = choices[n]
        image = images[i].flip(-1) if flip else images[i]                     # (3, r, r), mirrored left-right
        pixels.append(to_pixels(image))
        prompts.append(templates[t].format(placeholder))
        crops.append(("instance", i, flip))                                   # what LatentCache keys on
        generators.append(g)
    return Batch(pixels=torch.stack(pixels), generators=generators, crops=crops), prompts


# ---- the training state -----------------------------------------------------------------------------------
def training_state(rows: NewRows, optimizer, scaler, *, step: int, rng: dict, run_settings: dict) -> dict:
    """Everything a resumed run needs to continue bit for bit: the new rows (not the frozen model), the
    optimizer and scaler, the step, the RNG states and the run's settings."""
    return {"rows": rows.rows.detach().clone(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
            "step": step, "rng": rng, "run_settings": run_settings}


def restore_training_state(state: dict, rows: NewRows, optimizer, scaler) -> int:
    if tuple(state["rows"].shape) != tuple(rows.rows.shape):
        raise ValueError(f"the checkpoint's rows are {tuple(state['rows'].shape)}, this run's "
                         f"{tuple(rows.rows.shape)}")
    with torch.no_grad():
        rows.rows.copy_(state["rows"])
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    return state["step"]
