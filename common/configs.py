"""One policy for reading a model's public config.json (diffusers' `unet/`, `vae/` and `scheduler/`
configs, transformers' CLIP text and ViT configs): every key of the file is one of

- a field the model reads;
- a `fixed` field: an option of the reference library that this implementation does not model,
  accepted only at the one value it implements (SD v1's, say) and refused by name at any other;
- an `ignored` key: the libraries' own bookkeeping (`_class_name`, `_diffusers_version`,
  `_name_or_path`, `transformers_version`, ...) or an option the format's public files carry that
  changes no number here (each model lists its own, with the reason);

and any other key is refused by name, so that a typo or a feature this project does not implement
never loads silently as a different model.
"""
from __future__ import annotations

from dataclasses import fields
from typing import Any, Iterable, Mapping

# What diffusers writes into every config.json about itself.
DIFFUSERS_METADATA = ("_class_name", "_diffusers_version", "_name_or_path", "_use_default_values")

# What transformers writes into every config.json about itself ...
TRANSFORMERS_METADATA = ("_name_or_path", "_commit_hash", "architectures", "model_type", "transformers_version",
                         "torch_dtype", "dtype", "use_bfloat16")
# ... and the options of its base `PretrainedConfig` that configs written by transformers 4.x carry in
# full (openai/clip-vit-large-patch14's text_config holds them all): generation settings, output
# switches and task bookkeeping. None changes an encoder's forward pass.
TRANSFORMERS_GENERIC = (
    "add_cross_attention", "bad_words_ids", "begin_suppress_tokens", "chunk_size_feed_forward",
    "cross_attention_hidden_size", "decoder_start_token_id", "diversity_penalty", "do_sample", "early_stopping",
    "encoder_no_repeat_ngram_size", "exponential_decay_length_penalty", "finetuning_task", "forced_bos_token_id",
    "forced_eos_token_id", "gradient_checkpointing", "is_decoder", "is_encoder_decoder", "length_penalty",
    "max_length", "min_length", "no_repeat_ngram_size", "num_beam_groups", "num_beams", "num_return_sequences",
    "output_attentions", "output_hidden_states", "output_scores", "prefix", "problem_type",
    "remove_invalid_values", "repetition_penalty", "return_dict", "return_dict_in_generate", "sep_token_id",
    "suppress_tokens", "task_specific_params", "temperature", "tf_legacy_loss", "tie_encoder_decoder",
    "tie_word_embeddings", "tokenizer_class", "top_k", "top_p", "torchscript", "typical_p",
)
# PretrainedConfig options that would change the network: accepted only as transformers writes them.
TRANSFORMERS_FIXED = {"pruned_heads": {}}


def _normalise(value):
    """JSON lists as tuples (the configs' sequence fields are tuples), recursively."""
    return tuple(_normalise(v) for v in value) if isinstance(value, (list, tuple)) else value


def check_config_keys(config: Mapping[str, Any], *, read: Iterable[str], fixed: Mapping[str, Any] | None = None,
                      ignored: Iterable[str] = (), source: str) -> dict[str, Any]:
    """The entries of `config` whose keys are in `read`, once every other key has passed the policy
    above: a `fixed` key at another value, or a key neither read, fixed nor `ignored`, raises a
    ValueError that names it (and `source`, the file or config it came from)."""
    if not isinstance(config, Mapping):
        raise ValueError(f"{source}: expected a JSON object of config fields, not {type(config).__name__}")
    fixed = fixed or {}
    read, ignored = set(read), set(ignored)
    for key, value in config.items():
        if key in fixed and key not in read and _normalise(value) != _normalise(fixed[key]):
            raise ValueError(f"{source}: {key}={value!r} is not supported (this implementation has only "
                             f"{key}={fixed[key]!r})")
    unknown = sorted(set(config) - read - set(fixed) - ignored)
    if unknown:
        raise ValueError(f"{source}: unknown config field(s) {', '.join(unknown)}: not read by this "
                         "implementation nor known to change nothing")
    return {key: value for key, value in config.items() if key in read}


def build(cls, values: Mapping[str, Any], *, source: str):
    """cls(**values), with a value the config refuses (its checks, a wrong type) raised as a ValueError
    that names `source`."""
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: {e}") from e


def config_from_dict(cls, config: Mapping[str, Any], *, fixed: Mapping[str, Any] | None = None,
                     ignored: Iterable[str] = (), defaults: Mapping[str, Any] | None = None, source: str):
    """Dataclass `cls` from a config dict whose keys are the dataclass's field names, under the policy
    above. Keys the dict leaves out take `defaults` (the reference library's, where they differ from
    the dataclass's), else the dataclass's own; JSON lists become tuples."""
    kept = check_config_keys(config, read=[f.name for f in fields(cls)], fixed=fixed, ignored=ignored, source=source)
    return build(cls, {**(defaults or {}), **{key: _normalise(value) for key, value in kept.items()}}, source=source)
