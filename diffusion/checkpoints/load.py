"""Loading Stable Diffusion v1 and 2.x from their two public layouts, strictly, by key mapping.

    load_stable_diffusion("stable-diffusion-v1-5/")                    a diffusers folder
    load_stable_diffusion("v1-5-pruned-emaonly.safetensors")           an original single file
    load_stable_diffusion("sd-v1-4.ckpt", use_ema=True)                (read without unpickling code)
    load_stable_diffusion("model.safetensors", config_dir="sd15/")     configs from sd15/{unet,vae,text_encoder}/
                                                                       (and sd15/tokenizer/ when present)
    load_stable_diffusion("sd15/", variant="fp16")                     diffusion_pytorch_model.fp16.safetensors ...
    load_stable_diffusion("v2-1_768-ema-pruned.safetensors")           SD 2.x: v-prediction, 768x768
    load_stable_diffusion("v2-1_512-ema-pruned.safetensors", prediction_type="epsilon")   SD 2.x-base, 512x512
    load_stable_diffusion("sd_xl_base_1.0.safetensors")                SDXL: two text encoders, 1024x1024

A folder's weights may also be sharded (an index and its shards, read as one) or, in a repo published
without safetensors, pickles read by the restricted unpickler (common/state_dict.py `find_weights`).

A diffusers folder needs no renaming at all (our attributes carry diffusers' names), except old VAE
folders' attention names; the single file goes through the key tables in `diffusion/checkpoints/single_file.py`.
Every model is loaded with `common.state_dict.load_strict`: a missing, unexpected or mis-shaped
tensor stops the load with an error that names it.

What the model predicts (`prediction_type`: the noise, or v) is not in a single file. A folder's
scheduler_config.json says it; for a single file it is the `prediction_type` argument (sample.py and
train_dreambooth.py --prediction_type), else the --config folder's scheduler_config.json, else the
family's: epsilon for SD v1, v_prediction for SD 2.x (`single_file_prediction_type`). diffusers'
from_single_file (0.42) reads every SD 2.x file with stabilityai/stable-diffusion-2-1's configs, so it
too takes v_prediction (and 768x768) unless told; our epsilon also takes 2.1-base's 512x512 and no
upcast attention, where diffusers keeps 2.1's (`single_file.infer_unet_config`). A prediction type given
for a folder, or with a --config folder, that its scheduler_config.json contradicts is refused naming both.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from common.files import read_json
from common.hub_cache import cache_hint
from common.state_dict import CheckpointError, empty_model, find_weights, load_strict, read_safetensors, rename
from diffusion.checkpoints import single_file
from diffusion.checkpoints.ckpt import read_checkpoint, read_weights
from diffusion.models.unet import UNet2DConditionModel, UNetConfig
from diffusion.models.vae import AutoencoderKL, VAEConfig

# SD v1's scheduler/scheduler_config.json (runwayml/stable-diffusion-v1-5), for single files, which
# carry no scheduler config of their own (their schedule buffers say the same: scaled_linear).
# "leading" as diffusers' single-file loading gives it (tests/test_sample.py checks every sampler's
# images from a single file against diffusers' from_single_file).
SD_V1_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "timestep_spacing": "leading", "steps_offset": 1, "set_alpha_to_one": False, "clip_sample": False,
    "prediction_type": "epsilon",
}
# SD 2.x's scheduler_config.json as stabilityai/stable-diffusion-2-1 publishes it (2.1-base's is the same
# with prediction_type "epsilon"), the one diffusers' from_single_file reads for every SD 2.x file. It names
# no timestep_spacing: each sampler takes its diffusers class's default (diffusion/samplers/sigmas.py), as
# `OtherScheduler.from_config(pipe.scheduler.config)` gives after from_single_file.
SD_V2_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "steps_offset": 1, "set_alpha_to_one": False, "clip_sample": False, "prediction_type": "v_prediction",
}
# stabilityai/stable-diffusion-xl-base-1.0's scheduler/scheduler_config.json (EulerDiscreteScheduler), the one
# diffusers' from_single_file reads for an SDXL base file.
SDXL_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "timestep_spacing": "leading", "steps_offset": 1, "set_alpha_to_one": False, "clip_sample": False,
    "prediction_type": "epsilon", "interpolation_type": "linear", "use_karras_sigmas": False, "sample_max_value": 1.0,
    "skip_prk_steps": True, "trained_betas": None,
}
SCHEDULER_CONFIGS = {"sd1": SD_V1_SCHEDULER_CONFIG, "sd2": SD_V2_SCHEDULER_CONFIG,   # a single file's, by family
                     "sdxl": SDXL_SCHEDULER_CONFIG}
PREDICTION_TYPES = ("epsilon", "v_prediction")   # what --prediction_type takes
FOLDER_FILES = {"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors",
                "text_encoder": "model.safetensors"}                      # the names we write
FOLDER_LAYOUTS = {"unet": "diffusers", "vae": "diffusers", "text_encoder": "transformers",   # how each is read
                  "text_encoder_2": "transformers"}                                        # (the last: SDXL's)
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")


@dataclass
class StableDiffusionModels:
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: torch.nn.Module   # clip.text_model.CLIPTextModel
    tokenizer: object               # clip.tokenizer.CLIPTokenizer
    scheduler_config: dict          # diffusers scheduler_config.json fields
    source: str                     # the path loaded
    layout: str                     # "diffusers" or "single_file"
    files: dict = field(default_factory=dict)   # part -> the weights file read (a variant, an index, a .bin)
    # SDXL: the second text encoder (clip.text_model.CLIPTextModelWithProjection, OpenCLIP ViT-bigG/14) and its
    # tokenizer; and the pipeline's model_index.json option: the unconditional half's states and pooled embedding
    # are zeros when no negative prompt is given (StableDiffusionXLPipeline's default, True).
    text_encoder_2: torch.nn.Module | None = None
    tokenizer_2: object = None
    force_zeros_for_empty_prompt: bool = False

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None

    @property
    def text_encoders(self) -> tuple:
        """The text encoders the model has: (text_encoder,) or SDXL's (text_encoder, text_encoder_2)."""
        return (self.text_encoder,) if self.text_encoder_2 is None else (self.text_encoder, self.text_encoder_2)


def load_stable_diffusion(path: str | Path, *, config_dir: str | Path | None = None,
                          use_ema: bool = False, dtype: torch.dtype = torch.float32,
                          variant: str | None = None, prediction_type: str | None = None) -> StableDiffusionModels:
    """Every model of an SD v1 or 2.x checkpoint, in eval mode, on the CPU, its weights in `dtype` (as
    diffusers' `torch_dtype`). Tensors already in `dtype` stay on the file's pages (no copy; see
    `common.state_dict.read_safetensors`); the others are converted one by one. `variant` ("fp16"):
    a folder's variant files, as diffusers' `from_pretrained(variant=...)` picks them (`part_variants`).
    `prediction_type` ("epsilon" or "v_prediction"): a single file's (see the module's docstring)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint (a diffusers folder or a single .safetensors/.ckpt file)")
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"--prediction_type {prediction_type}: must be one of {', '.join(PREDICTION_TYPES)}")
    if path.is_dir():
        if config_dir is not None:
            raise ValueError(f"--config {config_dir}: only for single-file checkpoints; {path} is a folder "
                             "with its own configs")
        if use_ema:
            raise ValueError(f"--use_ema: {path} is a diffusers folder, which holds one set of UNet weights")
        folder_prediction_type(path, prediction_type)
        models = _load_folder(path, dtype, variant)
    else:
        if variant is not None:
            raise ValueError(f"--variant {variant}: only for a diffusers folder; {path} is a single file")
        models = _load_single_file(path, config_dir=None if config_dir is None else Path(config_dir), use_ema=use_ema,
                                   dtype=dtype, prediction_type=prediction_type)
    for m in (models.unet, models.vae, *models.text_encoders):
        m.eval()
    return models


# ------------------------------------------------------------------------------ prediction type, text width
def _said_by(scheduler_json: Path, given: str | None) -> str | None:
    """The prediction type a scheduler_config.json says (diffusers' default, epsilon, when it names none),
    or None if there is no such file; a different `given` one is refused naming both."""
    if not scheduler_json.is_file():
        return None
    said = read_json(scheduler_json).get("prediction_type", "epsilon")
    if given is not None and given != said:
        raise ValueError(f"--prediction_type {given}: {scheduler_json} says prediction_type {said!r}; a model "
                         "trained for one cannot sample as the other (drop the flag, or give a config that says so)")
    return said


def folder_prediction_type(folder: Path, given: str | None) -> str:
    """A folder's prediction type: its scheduler_config.json's (a different `given` one is refused)."""
    return _said_by(folder / "scheduler" / "scheduler_config.json", given) or "epsilon"


def single_file_prediction_type(keys, given: str | None, config_dir: Path | None) -> str:
    """A single file's prediction type: `given`, else the --config folder's scheduler_config.json's (which
    must agree with `given`), else its family's (`single_file.family` of its tensor names): SD v1 epsilon,
    SD 2.x v_prediction, as diffusers' from_single_file takes it."""
    said = _said_by(config_dir / "scheduler" / "scheduler_config.json", given) if config_dir is not None else None
    return given or said or SCHEDULER_CONFIGS[single_file.family(keys)]["prediction_type"]


def check_text_width(unet_config: UNetConfig, text_width: int, *, source: str,
                     pooled_width: int | None = None) -> None:
    """The UNet's cross-attention must read states as wide as the text encoder's: an SD 2.x text encoder
    (1024) beside an SD v1 UNet (768), or the reverse, is two models' parts, refused before any sampling.
    SDXL: `text_width` is the two encoders' widths summed (768 + 1280), and `pooled_width` the second's
    projection, which the UNet's micro-conditioning reads (1280); None for one text encoder."""
    if text_width != unet_config.cross_attention_dim:
        raise CheckpointError(f"{source}: the text encoder's states are {text_width} wide but the UNet's "
                              f"cross-attention reads {unet_config.cross_attention_dim}-wide ones (cross_attention_dim): "
                              "they are parts of different models (SD v1's CLIP ViT-L/14 is 768 wide, SD 2.x's "
                              "OpenCLIP ViT-H/14 1024, SDXL's two 768 + 1280)")
    if pooled_width != unet_config.pooled_text_dim:
        raise CheckpointError(f"{source}: the UNet's micro-conditioning reads a pooled text embedding "
                              f"{unet_config.pooled_text_dim or 'of no'} width (addition_embed_type "
                              f"{unet_config.addition_embed_type!r}) but the text encoders give "
                              f"{pooled_width or 'none'}: they are parts of different models (SDXL's UNet and "
                              "its two text encoders go together)")


# ------------------------------------------------------------------------------ diffusers folder
def weights_file(folder: Path, part: str, variant: str | None = None) -> Path:
    """The weights file of `part` ("unet", "vae", "text_encoder") in a diffusers folder: safetensors, sharded
    or not, else a pickle; with `variant`, that variant's (common/state_dict.py `find_weights`)."""
    return find_weights(folder / part, FOLDER_LAYOUTS[part], variant=variant)


def part_variants(folder: Path, index: dict, variant: str | None) -> dict[str, str | None]:
    """What diffusers' DiffusionPipeline.from_pretrained(variant=...) reads (0.42, _identify_model_variants):
    a component whose folder holds a file named `<name>.<variant>.<...>` loads that variant, every other
    component its plain files; when no component of model_index.json has the variant, it is an error."""
    if variant is None:
        return {part: None for part in FOLDER_LAYOUTS}
    having = {name for name in index if (folder / name).is_dir()
              and any(p.name.split(".")[1:2] == [variant] for p in (folder / name).iterdir())}
    if not having:
        raise CheckpointError(f"{folder}: --variant {variant}: no component of this pipeline has {variant} files "
                              f"(such as unet/diffusion_pytorch_model.{variant}.safetensors){cache_hint(folder)}")
    return {part: variant if part in having else None for part in FOLDER_LAYOUTS}


def not_a_pipeline(folder: Path) -> str:
    """What to say about a folder that is not a diffusers pipeline: the single files it holds, if any (a
    repo that publishes both layouts, downloaded with only its single file)."""
    singles = sorted(p.name for p in folder.iterdir() if p.suffix in SINGLE_FILE_SUFFIXES) if folder.is_dir() else []
    return ((f"; it holds the single file{'s' * (len(singles) > 1)} {', '.join(singles)}: give one of them as "
             "the checkpoint" if singles else "") + cache_hint(folder))


# Every model is built on the meta device (no memory, no random initialisation) and takes the file's
# tensors themselves as its weights (common.state_dict.load_strict).
def load_unet_folder(folder: Path, dtype: torch.dtype = torch.float32, variant: str | None = None
                     ) -> UNet2DConditionModel:
    with empty_model():
        unet = UNet2DConditionModel(config=UNetConfig.from_json(folder / "unet" / "config.json"))
    file = weights_file(folder, "unet", variant)
    load_strict(unet, read_weights(file, dtype=dtype), source=str(file), dtype=dtype)
    return unet


def load_vae_folder(folder: Path, dtype: torch.dtype = torch.float32, variant: str | None = None) -> AutoencoderKL:
    with empty_model():
        vae = AutoencoderKL(config=VAEConfig.from_json(folder / "vae" / "config.json"))
    file = weights_file(folder, "vae", variant)
    tensors = rename(read_weights(file, dtype=dtype), single_file.DEPRECATED_VAE_ATTENTION_KEYS)
    load_strict(vae, single_file.vae_attention_as_linear(tensors), source=str(file), dtype=dtype)
    return vae


def folder_parts(folder: Path, index: dict) -> tuple[str, ...]:
    """The weight-bearing parts of a pipeline folder: SD v1/2's three, or SDXL's four (model_index.json names a
    text_encoder_2). SDXL's refiner (no first text encoder, an aesthetic-score conditioning) is refused by name."""
    if index.get("requires_aesthetics_score") or (index.get("text_encoder_2") and not any(index.get("text_encoder") or [])):
        raise CheckpointError(f"{folder}: this is SDXL's refiner (one text encoder, text_encoder_2, and an aesthetic-score "
                              "conditioning), which is not supported: give SDXL's base model (two text encoders)")
    for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        if name not in index:
            raise ValueError(f"{folder / 'model_index.json'}: no {name!r} entry; not an SD v1, 2.x or SDXL pipeline folder")
    sdxl = bool(index.get("text_encoder_2"))
    if sdxl and not index.get("tokenizer_2"):
        raise ValueError(f"{folder / 'model_index.json'}: text_encoder_2 without tokenizer_2; not an SDXL pipeline folder")
    return tuple(part for part in FOLDER_LAYOUTS if part != "text_encoder_2" or sdxl)


def folder_text_widths(folder: Path) -> tuple[int, int | None] | None:
    """(the width of the text states the UNet reads, the pooled embedding's width or None) from a folder's text
    encoder config.json files (SDXL: both encoders' widths summed, the second's projection_dim); None when a
    config is missing."""
    from clip.text_model import CLIPTextConfig
    jsons = [folder / "text_encoder" / "config.json"] + ([folder / "text_encoder_2" / "config.json"]
                                                          if (folder / "text_encoder_2").is_dir() else [])
    if not all(j.is_file() for j in jsons):
        return None
    configs = [CLIPTextConfig.from_json(j) for j in jsons]
    return sum(c.hidden_size for c in configs), (configs[1].projection_dim if len(configs) == 2 else None)


def _load_folder(folder: Path, dtype: torch.dtype, variant: str | None = None) -> StableDiffusionModels:
    from clip.tokenizer import CLIPTokenizer
    from clip.weights import load_text_encoder

    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"{folder}: no model_index.json, so not a diffusers folder{not_a_pipeline(folder)}")
    index = read_json(folder / "model_index.json")
    parts = folder_parts(folder, index)
    variants = part_variants(folder, index, variant)
    files = {part: weights_file(folder, part, variants[part]) for part in parts}   # all found, then read
    widths = folder_text_widths(folder)
    if widths is not None:   # the pairing, before reading any weights
        check_text_width(UNetConfig.from_json(folder / "unet" / "config.json"), widths[0], pooled_width=widths[1],
                         source=str(folder))
    sdxl = "text_encoder_2" in parts
    return StableDiffusionModels(
        unet=load_unet_folder(folder, dtype, variants["unet"]), vae=load_vae_folder(folder, dtype, variants["vae"]),
        text_encoder=load_text_encoder(folder / "text_encoder", dtype=dtype, variant=variants["text_encoder"]),
        tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"),
        scheduler_config=read_json(folder / "scheduler" / "scheduler_config.json"),
        source=str(folder), layout="diffusers", files=files,
        text_encoder_2=load_text_encoder(folder / "text_encoder_2", dtype=dtype, variant=variants["text_encoder_2"],
                                         with_projection=True) if sdxl else None,
        tokenizer_2=CLIPTokenizer.from_pretrained(folder / "tokenizer_2") if sdxl else None,
        # StableDiffusionXLPipeline's __init__ default, True, where model_index.json does not say
        force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", True)) if sdxl else False)


# ------------------------------------------------------------------------------ original single file
def read_single_file(path: Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return read_safetensors(path, dtype=dtype)
    if path.suffix not in SINGLE_FILE_SUFFIXES:
        raise CheckpointError(f"{path}: unknown checkpoint type {path.suffix!r}; expected a diffusers folder "
                              f"or one of {', '.join(SINGLE_FILE_SUFFIXES)}")
    return read_checkpoint(path)   # a restricted unpickler: never runs code from the file


def load_unet_single_file(unet_tensors: dict, config: UNetConfig, *, source: str,
                          dtype: torch.dtype = torch.float32) -> UNet2DConditionModel:
    with empty_model():
        unet = UNet2DConditionModel(config=config)
    load_strict(unet, rename(unet_tensors, single_file.unet_table(config)), source=f"{source} (UNet)",
                dtype=dtype)
    return unet


def load_vae_single_file(vae_tensors: dict, config: VAEConfig, *, source: str,
                         dtype: torch.dtype = torch.float32) -> AutoencoderKL:
    with empty_model():
        vae = AutoencoderKL(config=config)
    tensors = single_file.vae_attention_as_linear(rename(vae_tensors, single_file.vae_table(config)))
    load_strict(vae, tensors, source=f"{source} (VAE)", dtype=dtype)
    return vae


def load_text_encoder_single_file(text_tensors: dict, config, *, source: str, dtype: torch.dtype = torch.float32,
                                  with_projection: bool = False):
    """The CLIP text model from the file's `cond_stage_model.*` tensors (clip/ maps SD v1's and SD 2.x's), or one
    of SDXL's `conditioner.embedders.N.*` towers (`with_projection`: the second, CLIPTextModelWithProjection)."""
    from clip.text_model import CLIPTextModel, CLIPTextModelWithProjection
    from clip.weights import OPENCLIP_PREFIX, SDXL_OPENCLIP_PREFIX, config_from_state_dict, text_encoder_state_dict

    tensors = text_encoder_state_dict(text_tensors, source=source, with_projection=with_projection,
                                      num_layers=config.num_hidden_layers if config is not None else None)
    if config is None:
        config = config_from_state_dict(tensors, openclip=any(k.startswith((OPENCLIP_PREFIX, SDXL_OPENCLIP_PREFIX))
                                                              for k in text_tensors))
    with empty_model():
        model = (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)
    load_strict(model, tensors, source=source, dtype=dtype)
    return model


def single_file_text_widths(shapes: dict[str, tuple[int, ...]]) -> tuple[int, int | None] | None:
    """(the text states' width, the pooled embedding's or None) a single file's towers give, off their shapes
    (SDXL: the two towers' widths summed, and the OpenCLIP projection's (D, P) output width); None if none."""
    widths = [s[1] for k, s in shapes.items() if k.startswith((single_file.COND_PREFIX, single_file.CONDITIONER_PREFIX))
              and k.endswith("token_embedding.weight")]
    projection = shapes.get(single_file.SDXL_OPENCLIP_PREFIX + "text_projection")
    if not widths:
        return None
    return sum(widths), (projection[1] if projection is not None else None)


def _load_single_file(path: Path, *, config_dir: Path | None, use_ema: bool, dtype: torch.dtype,
                      prediction_type: str | None = None) -> StableDiffusionModels:
    from clip.text_model import CLIPTextConfig
    from clip.tokenizer import SD2_PAD_TOKEN, CLIPTokenizer

    source = str(path)
    unet_t, vae_t, text_t = single_file.split_single_file(read_single_file(path, dtype), use_ema=use_ema,
                                                            source=source)
    family = single_file.family(text_t, source=source)
    sdxl = family == "sdxl"
    text_parts = ("text_encoder", "text_encoder_2") if sdxl else ("text_encoder",)
    prediction_type = single_file_prediction_type(text_t, prediction_type, config_dir)
    if config_dir is not None:
        for name in ("unet", "vae", *text_parts):
            if not (config_dir / name / "config.json").is_file():
                raise FileNotFoundError(f"--config {config_dir}: no {name}/config.json in it (the folder must hold "
                                        f"unet/, vae/ and {'/, '.join(text_parts)}/ config.json files, as a diffusers "
                                        "folder does)")
        unet_cfg = UNetConfig.from_json(config_dir / "unet" / "config.json")
        vae_cfg = VAEConfig.from_json(config_dir / "vae" / "config.json")
        text_cfgs = [CLIPTextConfig.from_json(config_dir / name / "config.json") for name in text_parts]
    else:  # SD v1 (8 UNet heads), SD 2.1 or SDXL base (64-wide heads) conventions for what the shapes cannot say
        unet_cfg = single_file.infer_unet_config(unet_t, source=source, prediction_type=prediction_type)
        vae_cfg = single_file.infer_vae_config(vae_t, source=source, sdxl=sdxl)
        text_cfgs = [None] * len(text_parts)  # inferred by clip/ from the shapes
    widths = single_file_text_widths({k: tuple(v.shape) for k, v in text_t.items()})
    if widths is not None:
        check_text_width(unet_cfg, widths[0], pooled_width=widths[1], source=source)

    # A single file carries no tokenizer: a --config folder laid out like a diffusers folder may hold this
    # model's own tokenizer/ (SDXL: and tokenizer_2/); otherwise the shipped OpenAI CLIP vocabulary, padded as its
    # family's tokenizer (an OpenCLIP tower's with "!": SD 2.x's, SDXL's second).
    def tokenizer(name: str, openclip: bool):
        if config_dir is not None and (config_dir / name).is_dir():
            return CLIPTokenizer.from_pretrained(config_dir / name)
        return CLIPTokenizer.from_pretrained(None, pad_token=SD2_PAD_TOKEN if openclip else None)

    if sdxl:
        towers = [{k: v for k, v in text_t.items() if k.startswith(prefix)}
                  for prefix in (single_file.SDXL_CLIP_PREFIX, single_file.SDXL_OPENCLIP_PREFIX)]
    else:
        towers = [text_t]
    encoders = [load_text_encoder_single_file(tower, cfg, source=f"{source} ({name})", dtype=dtype,
                                              with_projection=name == "text_encoder_2")
                for tower, cfg, name in zip(towers, text_cfgs, text_parts)]
    return StableDiffusionModels(
        unet=load_unet_single_file(unet_t, unet_cfg, source=source, dtype=dtype),
        vae=load_vae_single_file(vae_t, vae_cfg, source=source, dtype=dtype),
        text_encoder=encoders[0], tokenizer=tokenizer("tokenizer", family == "sd2"),
        scheduler_config=dict(SCHEDULER_CONFIGS[family], prediction_type=prediction_type),
        source=source, layout="single_file", files={part: path for part in ("unet", "vae", *text_parts)},
        text_encoder_2=encoders[1] if sdxl else None, tokenizer_2=tokenizer("tokenizer_2", True) if sdxl else None,
        force_zeros_for_empty_prompt=sdxl)   # StableDiffusionXLPipeline's default
