"""Dev-only: write tests/fixtures/ckpt/, a tiny Lightning-style `.ckpt` and what it must read back as.

    .venv-dev/bin/python tools/make_reference_ckpt.py

Lightning is not installed anywhere in this project, so a stand-in `ModelCheckpoint` class is put in
`sys.modules` under Lightning's module path: the pickle then names exactly the global that SD v1's
published `.ckpt` files name. The file is laid out like `sd-v1-4-full-ema.ckpt`: `epoch`,
`global_step`, `pytorch-lightning_version`, `state_dict` (model weights under `model.*`, the EMA copy
under `model_ema.*` with dots removed, schedule buffers), `callbacks` keyed by the ModelCheckpoint
*class* holding numpy-scalar metrics, `optimizer_states` and `lr_schedulers`. Numpy scalars are
spelled `numpy.core.multiarray.scalar`, as numpy < 2 (which wrote those files) spelled them. The state
dict covers every storage dtype SD files use and some odd layouts (a transposed view, two tensors
sharing one storage, an empty tensor).

Written: `lightning_small.ckpt` (by torch.save of this torch version, not the tests' one),
`lightning_small.safetensors` (the expected state dict) and `lightning_small.json` (the expected
training state, for the test to compare).
"""
from __future__ import annotations

import json
import pickle
import sys
import types
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "ckpt"
LIGHTNING_MODULE = "pytorch_lightning.callbacks.model_checkpoint"
NUMPY_1_SCALAR_MODULE = "numpy.core.multiarray"


def stand_in_module(dotted: str) -> types.ModuleType:
    """An empty module registered (with its parents) in sys.modules, so pickle can name its members."""
    parts = dotted.split(".")
    for i in range(1, len(parts) + 1):
        sys.modules.setdefault(".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
    return sys.modules[dotted]


class ModelCheckpoint:
    """Stand-in for Lightning's callback; only its name and module path matter to the pickle."""


ModelCheckpoint.__module__ = LIGHTNING_MODULE
stand_in_module(LIGHTNING_MODULE).ModelCheckpoint = ModelCheckpoint


def scalar(dtype: np.dtype, data: bytes) -> np.generic:  # numpy 1.x's name for the scalar rebuilder
    return np.frombuffer(data, dtype=dtype)[0]


scalar.__module__ = NUMPY_1_SCALAR_MODULE


class Numpy1Pickler(pickle.Pickler):
    """Pickles numpy scalars the way numpy 1.x did (`numpy.core.multiarray.scalar`)."""

    def reducer_override(self, obj):
        if isinstance(obj, np.generic):
            return scalar, (obj.dtype, obj.tobytes())
        return NotImplemented


def numpy1_pickle_module() -> types.ModuleType:
    module = types.ModuleType("numpy1_pickle")
    module.Pickler, module.Unpickler, module.load = Numpy1Pickler, pickle.Unpickler, pickle.load
    module.__name__ = "pickle"
    return module


def make_state_dict(gen: torch.Generator) -> OrderedDict[str, torch.Tensor]:
    """SD-style names and every storage dtype; values random so a mixed-up byte would show."""
    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    shared = randn(6, 4)
    sd = OrderedDict()
    sd["betas"] = torch.linspace(0.00085, 0.012, 10, dtype=torch.float64).float()
    sd["alphas_cumprod"] = torch.cumprod(1 - sd["betas"], 0)
    sd["model.diffusion_model.input_blocks.0.0.weight"] = randn(4, 3, 3, 3)
    sd["model.diffusion_model.input_blocks.0.0.bias"] = randn(4)
    sd["model.diffusion_model.out.2.weight"] = randn(3, 4).t()  # a transposed (non-contiguous) view
    sd["first_stage_model.encoder.conv_in.weight"] = randn(5, 3).half()
    sd["first_stage_model.decoder.conv_out.bias"] = randn(3).bfloat16()
    sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(7)[None]  # int64
    sd["cond_stage_model.tokens"] = torch.randint(0, 1000, (5,), generator=gen, dtype=torch.int32)
    sd["cond_stage_model.mask"] = torch.randint(0, 2, (5,), generator=gen).bool()
    sd["cond_stage_model.bytes"] = torch.randint(0, 256, (5,), generator=gen, dtype=torch.uint8)
    sd["shared.first_rows"] = shared[:2]  # two views of one storage
    sd["shared.last_rows"] = shared[3:]
    sd["empty"] = torch.zeros(0, 3)
    sd["model_ema.decay"] = torch.tensor(0.9999)
    sd["model_ema.num_updates"] = torch.tensor(470000, dtype=torch.int32)
    sd["model_ema.diffusion_modelinput_blocks00weight"] = randn(4, 3, 3, 3)
    sd["model_ema.diffusion_modelinput_blocks00bias"] = randn(4)
    return sd


def main() -> None:
    gen = torch.Generator().manual_seed(10)
    sd = make_state_dict(gen)
    weight = sd["model.diffusion_model.input_blocks.0.0.weight"]
    training = {
        "epoch": 6,
        "global_step": 470000,
        "pytorch-lightning_version": "1.4.2",
    }
    callback_state = {
        "monitor": None,
        "best_model_score": None,
        "best_model_path": "/logs/2022-08-01/checkpoints/last.ckpt",
        "current_score": np.float64(0.125),
        "dirpath": "/logs/2022-08-01/checkpoints",
        "last_val": np.float32(2.5),
        "steps": np.int64(470000),
    }
    checkpoint = {
        **training,
        "state_dict": sd,
        "callbacks": {ModelCheckpoint: callback_state},
        "optimizer_states": [{
            "state": {0: {"step": 470000, "exp_avg": torch.randn(weight.shape, generator=gen),
                          "exp_avg_sq": torch.rand(weight.shape, generator=gen)}},
            "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0,
                              "amsgrad": False, "params": [0]}],
        }],
        "lr_schedulers": [{"base_lrs": [1e-4], "last_epoch": 470000, "_step_count": 470001}],
    }
    OUT.mkdir(parents=True, exist_ok=True)
    # numpy 2 has a deprecated `numpy.core` shim; for the save, that name holds our `scalar`.
    real = sys.modules.get(NUMPY_1_SCALAR_MODULE)
    sys.modules[NUMPY_1_SCALAR_MODULE] = types.ModuleType(NUMPY_1_SCALAR_MODULE)
    sys.modules[NUMPY_1_SCALAR_MODULE].scalar = scalar
    try:
        torch.save(checkpoint, OUT / "lightning_small.ckpt", pickle_module=numpy1_pickle_module())
    finally:
        if real is None:
            del sys.modules[NUMPY_1_SCALAR_MODULE]
        else:
            sys.modules[NUMPY_1_SCALAR_MODULE] = real
    save_file({k: v.contiguous().clone() for k, v in sd.items()}, str(OUT / "lightning_small.safetensors"),
              metadata={"format": "pt"})
    expected = {**training,
                "callback_key": f"{LIGHTNING_MODULE}.ModelCheckpoint",
                "callback_state": {k: (v.item() if isinstance(v, np.generic) else v)
                                   for k, v in callback_state.items()},
                "callback_numpy_dtypes": {k: v.dtype.name for k, v in callback_state.items()
                                          if isinstance(v, np.generic)},
                "optimizer_step": 470000,
                "torch_version_that_wrote_it": torch.__version__}
    (OUT / "lightning_small.json").write_text(json.dumps(expected, indent=1) + "\n")
    print(f"wrote {OUT}: " + ", ".join(f"{p.name} {p.stat().st_size} B" for p in sorted(OUT.iterdir())))


if __name__ == "__main__":
    main()
