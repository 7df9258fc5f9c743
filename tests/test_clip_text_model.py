"""CLIP text encoder against transformers' CLIPTextModel on a tiny random checkpoint, in every layout.

Reference tensors: tests/fixtures/clip/reference_outputs.safetensors (tools/make_reference_clip.py).
The tiny model (vocab 1000, width 32, 3 layers, 4 heads) has every weight perturbed off its init.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from clip.text_model import CLIPTextConfig, CLIPTextModel, quick_gelu
from clip.weights import load_text_encoder

FIXTURES = Path(__file__).parent / "fixtures" / "clip"
REF = load_file(FIXTURES / "reference_outputs.safetensors")
TOL = 1e-4
TINY = CLIPTextConfig.from_json(FIXTURES / "text_encoder" / "config.json")

LAYOUTS = {
    "sd_v1_folder": lambda: load_text_encoder(FIXTURES / "text_encoder"),
    "sd_v1_single_file": lambda: load_text_encoder(FIXTURES / "sd_v1_single_file.safetensors", config=TINY),
    "clip_model_folder": lambda: load_text_encoder(FIXTURES / "clip_model"),
}


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, f"shape {tuple(a.shape)} vs reference {tuple(b.shape)}"
    return (a - b).abs().max().item()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_outputs_match_transformers(layout):
    model = LAYOUTS[layout]()
    with torch.no_grad():
        out = model(REF["input_ids"], output_hidden_states=True)
    assert _max_diff(out.last_hidden_state, REF["last_hidden_state"]) <= TOL
    assert _max_diff(out.pooled_output, REF["pooled_output"]) <= TOL
    assert len(out.hidden_states) == TINY.num_hidden_layers + 1
    assert _max_diff(torch.stack(out.hidden_states), REF["hidden_states"]) <= TOL


def test_shorter_sequence():
    model = LAYOUTS["sd_v1_folder"]()
    with torch.no_grad():
        out = model(REF["short_input_ids"])
    assert out.hidden_states is None
    assert _max_diff(out.last_hidden_state, REF["short_last_hidden_state"]) <= TOL
    assert _max_diff(out.pooled_output, REF["short_pooled_output"]) <= TOL


def test_pooling_rules():
    """eos_token_id=2 (legacy configs): the largest id; otherwise the first position of eos_token_id."""
    model = LAYOUTS["sd_v1_folder"]()
    assert model.config.eos_token_id == 2
    model.config = replace(model.config, eos_token_id=997)
    with torch.no_grad():
        pooled = model(REF["input_ids"]).pooled_output
    assert _max_diff(pooled, REF["pooled_output_eos_997"]) <= TOL
    assert _max_diff(pooled[2], REF["pooled_output"][2]) > 1e-2  # the rules pick different rows there


def test_gelu_variant():
    model = CLIPTextModel(replace(TINY, hidden_act="gelu"))
    model.load_state_dict(LAYOUTS["sd_v1_folder"]().state_dict())
    with torch.no_grad():
        assert _max_diff(model(REF["input_ids"]).last_hidden_state, REF["gelu_last_hidden_state"]) <= TOL


def test_clip_skip_is_final_norm_of_an_earlier_layer():
    model = LAYOUTS["sd_v1_folder"]().eval()
    with torch.no_grad():
        out = model(REF["input_ids"], output_hidden_states=True)
        assert torch.allclose(model.final_layer_norm(out.hidden_states[-1]), out.last_hidden_state)


def test_bf16_runs_close():
    """0.030 from fp32 on AVX512+bf16 (native bf16): the bound holds on every kind of CPU."""
    model = LAYOUTS["sd_v1_folder"]().to(torch.bfloat16)
    with torch.no_grad():
        out = model(REF["input_ids"])
    assert out.last_hidden_state.dtype == torch.bfloat16
    assert _max_diff(out.last_hidden_state.float(), REF["last_hidden_state"]) < 0.1  # bf16 keeps ~3 digits


def test_caller_ids_untouched():
    model = LAYOUTS["sd_v1_folder"]()
    ids = REF["input_ids"].clone()
    model(ids)
    assert torch.equal(ids, REF["input_ids"])


def test_bad_inputs():
    model = CLIPTextModel(TINY)
    with pytest.raises(ValueError, match="78 tokens; this model has 77 positions"):
        model(torch.zeros(1, 78, dtype=torch.long))
    with pytest.raises(ValueError, match="integer tensor"):
        model(torch.zeros(1, 5))
    with pytest.raises(ValueError, match="integer tensor"):
        model(torch.zeros(5, dtype=torch.long))


def test_config_presets_and_json():
    config = CLIPTextConfig.vit_l14()
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.head_dim) == (768, 12, 12, 64)
    assert (config.vocab_size, config.max_position_embeddings, config.intermediate_size) == (49408, 77, 3072)
    assert config.hidden_act == "quick_gelu" and config.eos_token_id == 2
    assert CLIPTextConfig.from_dict({"text_config": {"hidden_size": 64, "num_attention_heads": 2}}).hidden_size == 64
    with pytest.raises(ValueError, match="hidden_act='relu'"):
        CLIPTextConfig(hidden_act="relu")
    with pytest.raises(ValueError, match="not divisible"):
        CLIPTextConfig(hidden_size=100, num_attention_heads=12)


def test_quick_gelu():
    x = torch.linspace(-4, 4, 9)
    assert torch.allclose(quick_gelu(x), x * torch.sigmoid(1.702 * x))
