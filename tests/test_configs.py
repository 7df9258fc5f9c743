"""The one config policy (common/configs.py), the same for the six configs (UNet, VAE, scheduler, CLIP
text and image towers, ViT): every public config.json loads and gives the preset it describes; an unknown key is refused
by name; an option this implementation does not model is accepted only at the value it implements."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from clip.text_model import CLIPTextConfig
from clip.vision_model import CLIPVisionConfig
from diffusion.models.unet import UNetConfig
from diffusion.models.vae import VAEConfig
from diffusion.schedule import ScheduleConfig
from vit.model import EMOTION_LABELS, ViTConfig

FIXTURES = Path(__file__).parent / "fixtures"
PUBLIC = FIXTURES / "public_configs"
SD = PUBLIC / "runwayml--stable-diffusion-v1-5"

# config -> (its from_json, a public file of it; the image tower: a CLIPVisionModelWithProjection file
# transformers wrote, whose keys are the tower's own, where a CLIPModel file nests them in vision_config)
CONFIGS = {
    "unet": (UNetConfig.from_json, SD / "unet" / "config.json"),
    "vae": (VAEConfig.from_json, SD / "vae" / "config.json"),
    "scheduler": (ScheduleConfig.from_json, SD / "scheduler" / "scheduler_config.json"),
    "clip_text": (CLIPTextConfig.from_json, SD / "text_encoder" / "config.json"),
    "clip_vision": (CLIPVisionConfig.from_json, FIXTURES / "clip_model" / "b32_vision" / "config.json"),
    "vit": (ViTConfig.from_json, PUBLIC / "dima806--facial_emotions_image_detection" / "config.json"),
}


def test_the_public_configs_give_the_presets():
    assert UNetConfig.from_json(SD / "unet" / "config.json") == UNetConfig.sd_v1()
    assert VAEConfig.from_json(SD / "vae" / "config.json") == VAEConfig.sd_v1()
    assert ScheduleConfig.from_json(SD / "scheduler" / "scheduler_config.json") == ScheduleConfig.sd_v1()
    assert CLIPTextConfig.from_json(SD / "text_encoder" / "config.json") == CLIPTextConfig.vit_l14()
    # the CLIPModel config, with every PretrainedConfig option of transformers 4.16 in its text_config
    assert CLIPTextConfig.from_json(PUBLIC / "openai--clip-vit-large-patch14" / "config.json") == CLIPTextConfig.vit_l14()
    assert CLIPVisionConfig.from_json(PUBLIC / "openai--clip-vit-large-patch14" / "config.json") == CLIPVisionConfig.vit_l14()
    assert ViTConfig.from_json(PUBLIC / "dima806--facial_emotions_image_detection" / "config.json") == ViTConfig.b16()
    in21k = ViTConfig.from_json(PUBLIC / "google--vit-base-patch16-224-in21k" / "config.json")
    assert in21k == ViTConfig.b16(labels=["LABEL_0", "LABEL_1"])   # no labels: transformers' two defaults
    assert ViTConfig.b16().labels == list(EMOTION_LABELS)


ROOT = Path(__file__).parent.parent
READERS = {"unet": UNetConfig.from_json, "vae": VAEConfig.from_json, "scheduler": ScheduleConfig.from_json,
           "text_encoder": CLIPTextConfig.from_json}
WRITTEN = [  # (config, how it is read): written by diffusers 0.42 / transformers 5.24, or by this project
    *[(path, READERS[path.parent.name]) for folder in (FIXTURES / "sd" / "tiny_diffusers", ROOT / "embedded" / "world_sd")
      for path in sorted(folder.glob("[!t]*/*config.json")) + [folder / "text_encoder" / "config.json"]],
    *[(FIXTURES / "clip" / name / "config.json", CLIPTextConfig.from_json) for name in ("text_encoder", "clip_model")],
    *[(FIXTURES / "vit" / name / "config.json", ViTConfig.from_json) for name in ("hf_classifier", "hf_vitmodel")],
    *[(FIXTURES / "clip_model" / name / "config.json", CLIPVisionConfig.from_json) for name in ("l14", "b32_vision")],
    (FIXTURES / "dino" / "hf_vitmodel" / "config.json", ViTConfig.from_json),
    (ROOT / "embedded" / "emotion_vit" / "config.json", ViTConfig.from_json),
]


@pytest.mark.parametrize("path, read", WRITTEN, ids=[str(p.relative_to(ROOT)) for p, _ in WRITTEN])
def test_the_configs_the_libraries_and_we_write_load(path, read):
    read(path)


@pytest.mark.parametrize("name", CONFIGS)
def test_an_unknown_key_is_refused_by_name(tmp_path, name):
    from_json, public = CONFIGS[name]
    config = json.loads(public.read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "attention_heads_dim": 8}))   # a typo
    with pytest.raises(ValueError, match=rf"config.json: unknown config field\(s\) attention_heads_dim"):
        from_json(tmp_path / "config.json")


@pytest.mark.parametrize("name, key, value", [
    ("unet", "dual_cross_attention", True),           # (SD 2.x's use_linear_projection is read now)
    ("vae", "shift_factor", 0.1),
    ("scheduler", "thresholding", True),
    ("scheduler", "rescale_betas_zero_snr", True),
    ("clip_text", "pruned_heads", {"0": [1]}),
    ("vit", "pruned_heads", {"0": [1]}),
])
def test_an_option_not_modelled_is_accepted_only_at_our_value(tmp_path, name, key, value):
    from_json, public = CONFIGS[name]
    config = json.loads(public.read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, key: value}))
    with pytest.raises(ValueError, match=rf"config.json: {key}=.* is not supported"):
        from_json(tmp_path / "config.json")


def test_ignorable_keys_are_listed_not_guessed():
    """Library bookkeeping and the options of other diffusers schedulers load; a key merely starting with
    an underscore is not bookkeeping."""
    sd_scheduler = json.loads((SD / "scheduler" / "scheduler_config.json").read_text())
    dpm = {**sd_scheduler, "_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "dpmsolver++",
           "solver_order": 2, "use_karras_sigmas": True, "lower_order_final": True}
    assert ScheduleConfig.from_dict(dpm) == ScheduleConfig.sd_v1()
    with pytest.raises(ValueError, match="unknown config field.*_my_note"):
        UNetConfig.from_dict({**json.loads((SD / "unet" / "config.json").read_text()), "_my_note": "x"})
