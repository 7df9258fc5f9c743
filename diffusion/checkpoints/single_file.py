"""The original CompVis/LDM single-file layout (`v1-5-pruned-emaonly.safetensors`, `sd-v1-4.ckpt`,
SD 2.x's `v2-1_768-ema-pruned.safetensors`): key mapping onto our (diffusers-named) modules, EMA
selection, and architecture inferred from shapes.

One file holds three models under three prefixes, plus LDM's DDPM schedule buffers:

    model.diffusion_model.*        the UNet, in LDM's flat `input_blocks` / `output_blocks` lists
    first_stage_model.*            the VAE; its mid-block attention stored as 1x1 convolutions
    cond_stage_model.transformer.* SD v1: the CLIP text model, in transformers' names (`text_model.*`)
    cond_stage_model.model.*       SD 2.x: the OpenCLIP model in its own names (clip/weights.py maps both)
    model_ema.*                    (full checkpoints) EMA copies of the UNet, dots removed from names
    betas, alphas_cumprod, ...     the training schedule: recognised and ignored (sampling recomputes it)

SDXL's files (sgm, the generative-models repository) keep the UNet and VAE prefixes and hold two text towers
under `conditioner.embedders.0.transformer.*` (OpenAI's ViT-L/14, transformers' names) and
`conditioner.embedders.1.model.*` (OpenCLIP ViT-bigG/14, its own names; clip/weights.py maps both). Their UNet
adds `label_emb.0.{0,2}` (diffusers' `add_embedding.linear_{1,2}`, the micro-conditioning) and nests
`transformer_depth` blocks in each spatial transformer (`transformer_blocks.{d}`, the same inner names).
SDXL's refiner holds one tower, OpenCLIP's at `conditioner.embedders.0.model.*`, and an aesthetic-score
conditioning: not modelled, refused by name (`family`).

The text tower says the family (`family`): SD 2.x's files are the ones with OpenCLIP's, SDXL's the ones with
the conditioner's two, and what the shapes cannot tell of them comes from SD 2.1's or SDXL base's configs,
as diffusers' from_single_file takes them.

LDM numbers the UNet's blocks in one flat list per direction; diffusers (and we) nest them by
resolution level. For SD v1 (4 levels, 2 ResNets per level going down, 3 going up):

    input_blocks.0.0                    conv_in
    input_blocks.{1,2}.{0,1}            down_blocks.0.{resnets,attentions}.{0,1}
    input_blocks.3.0.op                 down_blocks.0.downsamplers.0.conv
    input_blocks.{4,5}, .6, .{7,8}, .9  the same for levels 1 and 2;  input_blocks.{10,11}.0: level 3
    middle_block.{0,1,2}                mid_block.resnets.0, mid_block.attentions.0, mid_block.resnets.1
    output_blocks.{0,1,2}.0             up_blocks.0.resnets.{0,1,2};  output_blocks.2.1.conv: its upsampler
    output_blocks.{3,4,5}.{0,1}         up_blocks.1.{resnets,attentions}.{0,1,2}; output_blocks.5.2.conv: upsampler
    ...                                 and so on to output_blocks.11
    time_embed.{0,2}, out.{0,2}         time_embedding.linear_{1,2}, conv_norm_out / conv_out

`unet_table(config)` writes that table for any config (common/state_dict.py's KeyTable, read in both
directions: loading and saving); inside a block the names are fixed (`UNET_RESNET_NAMES`; a spatial
transformer's inner names are the same in both layouts). `vae_table(config)` is the VAE's.
"""
from __future__ import annotations

import re

import torch

from common.state_dict import CheckpointError, KeyTable, listing
from diffusion.models.unet import (CROSS_DOWN, CROSS_UP, SD_V2 as UNET_SD_V2, SD_V2_BASE as UNET_SD_V2_BASE, TEXT_TIME,
                                   TIME_IDS, UNetConfig)
from diffusion.models.vae import VAEConfig

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
COND_PREFIX = "cond_stage_model."             # the text tower: SD v1's or SD 2.x's, below
TEXT_PREFIX = "cond_stage_model.transformer." # SD v1's CLIP, in transformers' names
OPENCLIP_PREFIX = "cond_stage_model.model."   # SD 2.x's OpenCLIP (clip/weights.py OPENCLIP_PREFIX)
CONDITIONER_PREFIX = "conditioner.embedders." # SDXL's text towers, below
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."    # SDXL's ViT-L/14 (text_model.* below it)
SDXL_OPENCLIP_PREFIX = "conditioner.embedders.1.model."      # SDXL's ViT-bigG/14 (clip/weights.py)
REFINER_OPENCLIP_PREFIX = "conditioner.embedders.0.model."   # SDXL refiner's only tower
SDXL_TIME_EMBED_DIM = 256  # SDXL's addition_time_embed_dim (sgm's ConcatTimestepEmbedderND outdim): not in any shape
EMA_PREFIX = "model_ema."
SD_V2_HEAD_WIDTH = 64    # SD 2.x's LDM config: num_head_channels 64 (SD v1's: num_heads 8)
# LDM's DDPM registers these 12 schedule buffers; SD v1's sampling recomputes the schedule from
# scheduler_config instead. model_ema.{decay,num_updates} are the EMA's own bookkeeping.
IGNORED = {"betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
           "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
           "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
           "posterior_mean_coef1", "posterior_mean_coef2", "model_ema.decay", "model_ema.num_updates"}

# Inside an LDM ResBlock: (our name, LDM name). in_layers/out_layers are nn.Sequentials whose
# SiLU and dropout slots hold no weights, hence the gaps in the numbering.
UNET_RESNET_NAMES = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
                     ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection")]


def unet_blocks(config: UNetConfig) -> list[tuple[str, str, bool]]:
    """(our module prefix, LDM module prefix, is a ResNet) for every block, by walking LDM's flat lists."""
    n, layers = len(config.block_out_channels), config.layers_per_block
    table = [("time_embedding.linear_1", "time_embed.0", False), ("time_embedding.linear_2", "time_embed.2", False),
             ("conv_in", "input_blocks.0.0", False), ("conv_norm_out", "out.0", False), ("conv_out", "out.2", False),
             ("mid_block.resnets.0", "middle_block.0", True), ("mid_block.attentions.0", "middle_block.1", False),
             ("mid_block.resnets.1", "middle_block.2", True)]
    if config.addition_embed_type == TEXT_TIME:   # sgm's label_emb: Sequential(Sequential(Linear, SiLU, Linear))
        table += [("add_embedding.linear_1", "label_emb.0.0", False), ("add_embedding.linear_2", "label_emb.0.2", False)]
    k = 1  # input_blocks.0 is conv_in
    for level in range(n):
        for j in range(layers):
            table.append((f"down_blocks.{level}.resnets.{j}", f"input_blocks.{k}.0", True))
            if config.down_block_types[level] == CROSS_DOWN:
                table.append((f"down_blocks.{level}.attentions.{j}", f"input_blocks.{k}.1", False))
            k += 1
        if level < n - 1:
            table.append((f"down_blocks.{level}.downsamplers.0.conv", f"input_blocks.{k}.0.op", False))
            k += 1
    k = 0
    for i in range(n):
        cross = config.up_block_types[i] == CROSS_UP
        for j in range(layers + 1):
            table.append((f"up_blocks.{i}.resnets.{j}", f"output_blocks.{k}.0", True))
            if cross:
                table.append((f"up_blocks.{i}.attentions.{j}", f"output_blocks.{k}.1", False))
            k += 1
        if i < n - 1:  # the upsampler sits in the level's last block, after the attention if any
            table.append((f"up_blocks.{i}.upsamplers.0.conv", f"output_blocks.{k - 1}.{2 if cross else 1}.conv", False))
    return table


def unet_table(config: UNetConfig) -> KeyTable:
    """Our UNet names <-> LDM's: a ResNet's tensors one by one, any other block whole (`{rest}`)."""
    rows = []
    for ours, ldm, is_resnet in unet_blocks(config):
        if is_resnet:
            rows += [(f"{ours}.{a}.{{w}}", f"{UNET_PREFIX}{ldm}.{b}.{{w}}") for a, b in UNET_RESNET_NAMES]
        else:
            rows.append((f"{ours}.{{rest}}", f"{UNET_PREFIX}{ldm}.{{rest}}"))
    return KeyTable(rows)


def vae_table(config: VAEConfig) -> KeyTable:
    """Our VAE names <-> LDM's. The decoder's `up` list runs from the HIGHEST resolution (up.0 is the
    last level applied), diffusers' `up_blocks` in the order applied, hence the reversal."""
    n, p = len(config.block_out_channels), VAE_PREFIX
    rows = [
        ("{coder}.conv_in.{w}", p + "{coder}.conv_in.{w}"),
        ("{coder}.conv_out.{w}", p + "{coder}.conv_out.{w}"),
        ("{coder}.conv_norm_out.{w}", p + "{coder}.norm_out.{w}"),
        ("{coder}.mid_block.resnets.0.{rest}", p + "{coder}.mid.block_1.{rest}"),
        ("{coder}.mid_block.resnets.1.{rest}", p + "{coder}.mid.block_2.{rest}"),
        ("{coder}.mid_block.attentions.0.group_norm.{w}", p + "{coder}.mid.attn_1.norm.{w}"),
        ("{coder}.mid_block.attentions.0.to_q.{w}", p + "{coder}.mid.attn_1.q.{w}"),
        ("{coder}.mid_block.attentions.0.to_k.{w}", p + "{coder}.mid.attn_1.k.{w}"),
        ("{coder}.mid_block.attentions.0.to_v.{w}", p + "{coder}.mid.attn_1.v.{w}"),
        ("{coder}.mid_block.attentions.0.to_out.0.{w}", p + "{coder}.mid.attn_1.proj_out.{w}"),
        ("encoder.down_blocks.{i}.resnets.{j}.conv_shortcut.{w}", p + "encoder.down.{i}.block.{j}.nin_shortcut.{w}"),
        ("encoder.down_blocks.{i}.resnets.{j}.{rest}", p + "encoder.down.{i}.block.{j}.{rest}"),
        ("encoder.down_blocks.{i}.downsamplers.0.conv.{w}", p + "encoder.down.{i}.downsample.conv.{w}"),
        ("quant_conv.{w}", p + "quant_conv.{w}"),
        ("post_quant_conv.{w}", p + "post_quant_conv.{w}"),
    ]
    for i in range(n):
        up = f"{p}decoder.up.{n - 1 - i}"
        rows += [
            (f"decoder.up_blocks.{i}.resnets.{{j}}.conv_shortcut.{{w}}", up + ".block.{j}.nin_shortcut.{w}"),
            (f"decoder.up_blocks.{i}.resnets.{{j}}.{{rest}}", up + ".block.{j}.{rest}"),
            (f"decoder.up_blocks.{i}.upsamplers.0.conv.{{w}}", up + ".upsample.conv.{w}"),
        ]
    return KeyTable(rows)


# Old diffusers VAE folders (saved before diffusers 0.14) name the mid attention's projections
# query/key/value/proj_attn; current ones to_q/to_k/to_v/to_out.0. Every other name is ours already.
DEPRECATED_VAE_ATTENTION_KEYS = KeyTable([
    ("{coder}.mid_block.attentions.0.to_q.{w}", "{coder}.mid_block.attentions.0.query.{w}"),
    ("{coder}.mid_block.attentions.0.to_k.{w}", "{coder}.mid_block.attentions.0.key.{w}"),
    ("{coder}.mid_block.attentions.0.to_v.{w}", "{coder}.mid_block.attentions.0.value.{w}"),
    ("{coder}.mid_block.attentions.0.to_out.0.{w}", "{coder}.mid_block.attentions.0.proj_attn.{w}"),
])
VAE_ATTENTION_LINEAR = re.compile(r".*mid_block\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight")


def vae_attention_as_linear(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LDM keeps the VAE attention's q/k/v/out as 1x1 convolutions, (C, C, 1, 1): the same linear
    maps as our (C, C) Linear weights, so drop the two unit dimensions."""
    return {k: (v[:, :, 0, 0] if VAE_ATTENTION_LINEAR.fullmatch(k) and v.ndim == 4 and v.shape[2:] == (1, 1) else v)
            for k, v in state_dict.items()}


def ema_name(key: str) -> str:
    """Where LDM's EMA keeps the copy of UNet tensor `key`: LitEma names its buffers after the
    parameters of `model` with the dots removed (`model.diffusion_model.out.0.weight` ->
    `model_ema.diffusion_modelout0weight`)."""
    return EMA_PREFIX + key.removeprefix("model.").replace(".", "")


def split_single_file(tensors: dict[str, torch.Tensor], *, use_ema: bool, source: str
                      ) -> tuple[dict, dict, dict]:
    """(unet, vae, text) tensors, still in LDM names with their prefixes. With `use_ema`, every UNet
    tensor is replaced by its EMA copy (all must be present). Unrecognised keys are errors."""
    unet = {k: v for k, v in tensors.items() if k.startswith(UNET_PREFIX)}
    vae = {k: v for k, v in tensors.items() if k.startswith(VAE_PREFIX)}
    text = {k: v for k, v in tensors.items() if k.startswith((COND_PREFIX, CONDITIONER_PREFIX))}
    ema = {k for k in tensors if k.startswith(EMA_PREFIX) and k not in IGNORED}
    family(tensors, source=source)    # an SDXL refiner is refused here, by name
    unknown = sorted(set(tensors) - set(unet) - set(vae) - set(text) - ema - IGNORED)
    if unknown:
        raise CheckpointError(f"{source}: unexpected {len(unknown)} tensors outside the UNet/VAE/text "
                              f"encoder prefixes: {listing(unknown)}")
    for name, part in (("UNet (model.diffusion_model.*)", unet), ("VAE (first_stage_model.*)", vae),
                       ("text encoder (cond_stage_model.transformer.*, cond_stage_model.model.* or "
                        "conditioner.embedders.*)", text)):
        if not part:
            raise CheckpointError(f"{source}: no {name} tensors; is this an SD v1, 2.x or SDXL single-file checkpoint?")
    if use_ema:
        if not ema:
            raise CheckpointError(f"{source}: --use_ema given but the file has no EMA weights (model_ema.*)")
        missing = sorted(ema_name(k) for k in unet if ema_name(k) not in ema)
        if missing:
            raise CheckpointError(f"{source}: EMA copy missing for {len(missing)} UNet tensors: "
                                  f"{', '.join(missing[:20])}")
        unet = {k: tensors[ema_name(k)] for k in unet}
    return unet, vae, text


def family(keys, *, source: str = "checkpoint") -> str:
    """"sdxl" for a single file with SDXL's two towers, "sd2" for one whose text tower is OpenCLIP's (SD 2.x),
    else "sd1". SDXL's refiner (its one tower OpenCLIP's, under conditioner.embedders.0.model.) is refused."""
    keys = list(keys)
    if any(k.startswith(REFINER_OPENCLIP_PREFIX) for k in keys):
        raise CheckpointError(f"{source}: this is SDXL's refiner (one text encoder, OpenCLIP ViT-bigG/14 at "
                              f"{REFINER_OPENCLIP_PREFIX}*, and an aesthetic-score conditioning), which is not "
                              "supported: give SDXL's base model (two text encoders)")
    if any(k.startswith(SDXL_OPENCLIP_PREFIX) for k in keys):
        return "sdxl"
    return "sd2" if any(k.startswith(OPENCLIP_PREFIX) for k in keys) else "sd1"


def _count(keys, pattern: str) -> set[int]:
    return {int(m.group(1)) for k in keys if (m := re.fullmatch(pattern, k))}


def _check_groups(channels, groups: int, *, source: str, model: str) -> None:
    if any(c % groups for c in channels):
        raise CheckpointError(f"{source}: {model} widths {tuple(channels)} do not split into SD v1's {groups} "
                              "GroupNorm groups, and the group count cannot be read off the shapes: pass --config DIR with "
                              f"this model's {model.lower()}/config.json")


def infer_unet_config(unet: dict[str, torch.Tensor], *, source: str, prediction_type: str = "epsilon") -> UNetConfig:
    """A UNetConfig from the tensor shapes of an LDM UNet. What shapes cannot tell takes SD v1's
    value: 8 heads (SD v1's `num_heads: 8`), 32 GroupNorm groups, the timestep embedding. A UNet whose
    spatial transformers project with Linear layers (proj_in stored (C, C)) is SD 2.x's: 64-wide heads
    (its `num_head_channels: 64`), and, as the public config of its `prediction_type` says, SD 2.1's
    96 x 96 latents with upcast attention (v_prediction) or 2.1-base's 64 x 64 without (epsilon)."""
    p = re.escape(UNET_PREFIX)
    try:
        conv_in = unet[UNET_PREFIX + "input_blocks.0.0.weight"]
        conv_out = unet[UNET_PREFIX + "out.2.weight"]
        downsamples = sorted(_count(unet, rf"{p}input_blocks\.(\d+)\.0\.op\.weight"))
        n_levels = len(downsamples) + 1
        n_input = max(_count(unet, rf"{p}input_blocks\.(\d+)\..+"))  # = n_levels * layers + n_levels - 1
        layers = (n_input - (n_levels - 1)) // n_levels
        channels, cross = [], []
        for level in range(n_levels):
            k = 1 + level * (layers + 1)  # the level's first input block
            channels.append(unet[f"{UNET_PREFIX}input_blocks.{k}.0.out_layers.3.weight"].shape[0])
            cross.append(f"{UNET_PREFIX}input_blocks.{k}.1.proj_in.weight" in unet)
        up_cross = [f"{UNET_PREFIX}output_blocks.{i * (layers + 1)}.1.proj_in.weight" in unet for i in range(n_levels)]
        context = unet[UNET_PREFIX + "middle_block.1.transformer_blocks.0.attn2.to_k.weight"].shape[1]
        linear = unet[UNET_PREFIX + "middle_block.1.proj_in.weight"].ndim == 2
        label_emb = unet.get(UNET_PREFIX + "label_emb.0.0.weight")
        depths = []   # transformer blocks per level (sgm's transformer_depth); 1 where a level has no attention
        for level in range(n_levels):
            k = 1 + level * (layers + 1)
            found = _count(unet, rf"{p}input_blocks\.{k}\.1\.transformer_blocks\.(\d+)\..+")
            depths.append(max(found) + 1 if found else 1)
    except KeyError as e:
        raise CheckpointError(f"{source}: cannot infer the UNet architecture, no tensor {e.args[0]}") from None
    _check_groups(channels, UNetConfig.norm_num_groups, source=source, model="UNet")
    sd2 = {}
    if linear:
        if any(c % SD_V2_HEAD_WIDTH for c in channels):
            raise CheckpointError(f"{source}: UNet widths {tuple(channels)} do not split into SD 2.x's "
                                  f"{SD_V2_HEAD_WIDTH}-wide attention heads, and the head count cannot be read off the "
                                  "shapes: pass --config DIR with this model's unet/config.json")
        sd2 = dict(UNET_SD_V2, attention_head_dim=tuple(c // SD_V2_HEAD_WIDTH for c in channels),
                   **(UNET_SD_V2_BASE if prediction_type == "epsilon" else {}))
        sd2.pop("cross_attention_dim")
    if label_emb is not None:   # SDXL: micro-conditioning, per-level depth, SDXL base's 128 x 128 latents
        sd2 = dict(sd2, addition_embed_type=TEXT_TIME, addition_time_embed_dim=SDXL_TIME_EMBED_DIM,
                   projection_class_embeddings_input_dim=label_emb.shape[1], upcast_attention=None, sample_size=128,
                   transformer_layers_per_block=depths[0] if len(set(depths)) == 1 else tuple(depths))
        if label_emb.shape[1] <= TIME_IDS * SDXL_TIME_EMBED_DIM:
            raise CheckpointError(f"{source}: {UNET_PREFIX}label_emb.0.0.weight reads {label_emb.shape[1]} features, "
                                  f"no more than SDXL's {TIME_IDS} x {SDXL_TIME_EMBED_DIM} size and crop features: pass "
                                  "--config DIR with this model's unet/config.json")
    return UNetConfig(**{**dict(in_channels=conv_in.shape[1], out_channels=conv_out.shape[0],
                                block_out_channels=tuple(channels), layers_per_block=layers,
                                cross_attention_dim=context,
                                down_block_types=tuple(CROSS_DOWN if c else "DownBlock2D" for c in cross),
                                up_block_types=tuple(CROSS_UP if c else "UpBlock2D" for c in up_cross)), **sd2})


def infer_vae_config(vae: dict[str, torch.Tensor], *, source: str, sdxl: bool = False) -> VAEConfig:
    """A VAEConfig from the tensor shapes of an LDM VAE (GroupNorm groups: SD v1's 32). `sdxl`: SDXL's VAE,
    SD v1's architecture retrained, with its own latent scale (VAEConfig.sdxl), which no shape tells."""
    p = re.escape(VAE_PREFIX)
    try:
        n_levels = len(_count(vae, rf"{p}encoder\.down\.(\d+)\..+"))
        layers = len(_count(vae, rf"{p}encoder\.down\.0\.block\.(\d+)\..+"))
        channels = tuple(vae[f"{VAE_PREFIX}encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in range(n_levels))
        _check_groups(channels, VAEConfig.norm_num_groups, source=source, model="VAE")
        return VAEConfig(in_channels=vae[VAE_PREFIX + "encoder.conv_in.weight"].shape[1],
                         out_channels=vae[VAE_PREFIX + "decoder.conv_out.weight"].shape[0],
                         block_out_channels=channels, layers_per_block=layers,
                         latent_channels=vae[VAE_PREFIX + "post_quant_conv.weight"].shape[0],
                         down_block_types=("DownEncoderBlock2D",) * n_levels,
                         up_block_types=("UpDecoderBlock2D",) * n_levels,
                         **({"scaling_factor": VAEConfig.sdxl().scaling_factor,
                             "sample_size": VAEConfig.sdxl().sample_size} if sdxl else {}))
    except KeyError as e:
        raise CheckpointError(f"{source}: cannot infer the VAE architecture, no tensor {e.args[0]}") from None
