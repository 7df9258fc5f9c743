"""A worked port: CLIP's text encoder (SD v1's) in numpy alone, layer by layer against our trace.

    python -m porting.numpy_clip MODEL_DIR IN.safetensors OUT.safetensors
    python -m porting trace --model MODEL_DIR --component text_encoder --inputs IN.safetensors --out ref.safetensors
    python -m porting compare ref.safetensors OUT.safetensors

It reads the transformers-layout file directly (config.json + model.safetensors, keys under
`text_model.`) and dumps every layer under the same names, so the compare tool lines it up with our
trace. Each function is one module of clip/text_model.py; no torch anywhere.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file


def layer_norm(x, w, b, eps):                   # over the last axis, biased variance, like torch
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * w + b


def linear(x, w, b):                            # torch's Linear weight is (out, in): x @ W^T
    return x @ w.T + b


def quick_gelu(x):                              # OpenAI CLIP: x * sigmoid(1.702 x), not the exact GELU
    return x / (1 + np.exp(-1.702 * x))


def attention(x, p, heads, dump, name):
    B, T, D = x.shape
    q, k, v = (linear(x, p[f"{name}.{n}.weight"], p[f"{name}.{n}.bias"]) for n in ("q_proj", "k_proj", "v_proj"))
    for n, t in zip(("q_proj", "k_proj", "v_proj"), (q, k, v)):
        dump[f"{name}.{n}"] = t
    split = lambda t: t.reshape(B, T, heads, D // heads).transpose(0, 2, 1, 3)      # (B, H, T, hd)
    q, k, v = split(q), split(k), split(v)
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(D // heads)                       # (B, H, T, T)
    scores = scores + np.triu(np.full((T, T), -np.inf), k=1)                         # causal: no look ahead
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    y = (weights @ v).transpose(0, 2, 1, 3).reshape(B, T, D)
    out = dump[f"{name}.out_proj"] = linear(y, p[f"{name}.out_proj.weight"], p[f"{name}.out_proj.bias"])
    dump[name] = out
    return out


def text_encoder(input_ids: np.ndarray, p: dict, config: dict, prefix: str = "text_model.") -> dict[str, np.ndarray]:
    """input_ids (B, T) -> {module name: output}, the last being final_layer_norm (last_hidden_state)."""
    dump, eps, heads = {}, config["layer_norm_eps"], config["num_attention_heads"]
    e = prefix + "embeddings."
    tok = dump[e + "token_embedding"] = p[e + "token_embedding.weight"][input_ids]          # (B, T, D)
    pos = dump[e + "position_embedding"] = p[e + "position_embedding.weight"][: input_ids.shape[1]]  # (T, D)
    x = tok + pos
    for i in range(config["num_hidden_layers"]):
        n = f"{prefix}encoder.layers.{i}"
        h = dump[f"{n}.layer_norm1"] = layer_norm(x, p[f"{n}.layer_norm1.weight"], p[f"{n}.layer_norm1.bias"], eps)
        x = x + attention(h, p, heads, dump, f"{n}.self_attn")
        h = dump[f"{n}.layer_norm2"] = layer_norm(x, p[f"{n}.layer_norm2.weight"], p[f"{n}.layer_norm2.bias"], eps)
        h = dump[f"{n}.mlp.fc1"] = linear(h, p[f"{n}.mlp.fc1.weight"], p[f"{n}.mlp.fc1.bias"])
        h = dump[f"{n}.mlp.fc2"] = linear(quick_gelu(h), p[f"{n}.mlp.fc2.weight"], p[f"{n}.mlp.fc2.bias"])
        x = dump[n] = x + h
    f = prefix + "final_layer_norm"
    dump[f] = layer_norm(x, p[f + ".weight"], p[f + ".bias"], eps)
    return dump


def main(argv: list[str]) -> None:
    folder, inputs, out = map(Path, argv)
    config = json.loads((folder / "config.json").read_text())
    params = {k: v.astype(np.float64) for k, v in load_file(str(folder / "model.safetensors")).items()}
    dump = text_encoder(load_file(str(inputs))["input_ids"], params, config)
    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in dump.items()}, str(out),
              metadata={"order": json.dumps(list(dump))})


if __name__ == "__main__":
    main(sys.argv[1:])
