"""`python -m porting trace`: every module's output of one component, under the checkpoint's names.

Forward hooks on every module that holds a tensor (directly or in a child) record its output (the
first tensor of a tuple or output object, as a hook on the reference would see it) and, for the few
reference wrappers that need it, its input. The model runs in its plain reference form: speed
rewrites that skip a module (the VAE's sub-pixel upsampler) are switched off, and every module that
owns a weight must have run, or the trace stops naming it.

`--precision bf16` runs the component with bf16 weights, as a transformers or diffusers user with
`dtype=torch.bfloat16` does: the float inputs (pixels, latents, text states) are cast to bf16, ids and
timesteps stay as given (a timestep is a number: 411 in bf16 would be 412), and the outputs are bf16.

`--backward` (the inputs then hold a `target` shaped as the component's output) runs the same forward
with autograd on, takes DreamBooth's objective, diffusers' `train_dreambooth.py`
`F.mse_loss(model_pred.float(), target.float(), reduction="mean")`, and writes after the module outputs
the loss (`loss`) and every parameter's gradient as `grad:<checkpoint key>`, in the order backward
finishes them (the output end first), in the file's shapes and in the weights' precision.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from common.files import check_writable
from common.precision import DTYPES
from common.state_dict import CheckpointError, read_safetensors, write_safetensors
from porting.components import Component, TraceError, check_inputs, load_component
from porting.names import checkpoint_names, checkpoint_tensors

PRECISIONS = ("fp32", "bf16")          # names in common/precision.py's one map (DTYPES)
TARGET = "target"                      # --backward: the inputs' tensor the output is compared with
GRAD = "grad:"                         # --backward: a gradient's key is this + the parameter's name


def first_tensor(value):
    """The hidden states of whatever a module returns: a tensor, a tuple, a dataclass or a dict."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)):
        items = value
    elif dataclasses.is_dataclass(value):
        items = [getattr(value, f.name) for f in dataclasses.fields(value)]
    elif isinstance(value, dict):
        items = list(value.values())
    else:
        return None
    for item in items:
        found = first_tensor(item)
        if found is not None:
            return found
    return None


def _in_scope(name: str, component: Component) -> bool:
    return any(s == "" or name == s or name.startswith(s + ".") for s in component.scope)


def _strip(name: str, component: Component) -> str | None:
    for s in component.strip:
        if name + "." == s:
            return None           # the component's own top module (`decoder`): its output is the last one's
        name = name.removeprefix(s)
    return name


def _map_like(x: torch.Tensor, module: str, outputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, H*W, C) tokens -> (B, C, H, W), the size read off the nearest enclosing module's map: what a
    1x1 conv gives where we use a Linear (LDM's VAE attention)."""
    parts = module.split(".")
    for i in range(len(parts) - 1, 0, -1):
        outer = outputs.get(".".join(parts[:i]))
        if outer is not None and outer.ndim == 4:
            B, _, H, W = outer.shape
            return x.transpose(1, 2).reshape(B, x.shape[-1], H, W)
    return x


def trace(component: Component, inputs: dict[str, torch.Tensor], *, names: str = "checkpoint",
          precision: str = "fp32", backward: bool = False) -> dict[str, torch.Tensor]:
    """{name: activation} in forward order (a module's output counts when its forward ends); with
    backward, then `loss` and {grad:<name>: gradient} in backward order. inputs["target"] is the
    backward's target (and is left alone without backward)."""
    if names not in ("checkpoint", "ours"):
        raise TraceError(f"--names {names!r}: choose checkpoint or ours")
    if precision not in PRECISIONS:
        raise TraceError(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    inputs = dict(inputs)
    target = inputs.pop(TARGET, None)
    if backward and target is None:
        raise TraceError(f"--backward: the inputs hold no {TARGET!r} (what the output is compared with)")
    if backward and not target.is_floating_point():
        raise TraceError(f"--backward: target has dtype {target.dtype}; a float tensor shaped as the output is needed")
    inputs = check_inputs(component, inputs)
    dtype = DTYPES[precision]
    model = component.model.to(dtype).eval()     # as loaded: the plain path (diffusion/speed.py is not applied)
    # the activations in the precision; ids and timesteps are numbers, kept as given (see above)
    inputs = {k: v.to(dtype) if component.inputs[k].kind == "float" else v for k, v in inputs.items()}

    state_keys = list(model.state_dict().keys())
    traced = {}
    for name, module in model.named_modules():
        if name and _in_scope(name, component) and any(True for _ in module.parameters()):
            traced[name] = module
    modules = {n: [k for k in state_keys if k.startswith(n + ".")] for n in traced}
    outputs, seen_inputs, order, clock = {}, {}, {}, [0]

    def pre(name):
        def hook(module, args):
            if args and isinstance(args[0], torch.Tensor):
                seen_inputs[name] = args[0].detach().clone()
                clock[0] += 1
                order.setdefault(name + "<", clock[0])
        return hook

    def post(name):
        def hook(module, args, output):
            y = first_tensor(output)
            if y is not None:
                outputs[name] = y.detach().clone()
                clock[0] += 1
                order[name] = clock[0]
        return hook

    handles = []
    for name, module in traced.items():
        handles += [module.register_forward_pre_hook(pre(name)), module.register_forward_hook(post(name))]
    params = {n: p for n, p in model.named_parameters() if _in_scope(n, component)}
    if backward:
        for name, p in model.named_parameters():
            p.grad = None
            p.requires_grad_(name in params)
    try:
        with torch.set_grad_enabled(backward):
            output = component.run(inputs)
    finally:
        for h in handles:
            h.remove()
    owners = [n for n, m in traced.items() if any(True for _ in m.parameters(recurse=False))]
    skipped = [n for n in owners if n not in outputs]
    if skipped:
        raise TraceError(f"modules holding weights did not run, so the trace would miss them: {', '.join(skipped[:10])}")

    if names == "ours":
        rows = [(n, n, outputs[n], order[n]) for n in outputs]
    else:
        when = {n: order[n] for n in outputs}
        rows = []
        for ckpt, ours, what, x in checkpoint_names(component, modules, outputs, seen_inputs, when):
            weight = component.shapes.get(ckpt + ".weight")
            if weight is not None and len(weight) == 4 and x.ndim == 3:
                x = _map_like(x, ours, outputs)
            rows.append((ckpt, ours, x, order[ours + "<"] if what == "input" else order[ours]))
    out = {}
    for name, _, x, _ in sorted(rows, key=lambda r: (r[3], -r[0].count("."))):
        short = _strip(name, component)
        if short:
            out[short] = x.contiguous().clone()   # each its own memory (one output can sit under two names)
    if backward:
        loss, grads = loss_and_gradients(component, first_tensor(output), target, params)
        out["loss"] = loss
        grads = grads if names == "ours" else checkpoint_tensors(component, grads)
        out.update({GRAD + k: g.contiguous() for k, g in grads.items()})
    return out


def loss_and_gradients(component: Component, output: torch.Tensor, target: torch.Tensor,
                       params: dict[str, torch.nn.Parameter]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DreamBooth's (DDPM's) objective on the output and {our parameter: its gradient} in the order the
    backward pass finishes them. A parameter the loss does not reach has gradient zero."""
    if tuple(target.shape) != tuple(output.shape):
        raise TraceError(f"--backward: target has shape {tuple(target.shape)}; the {component.name}'s output "
                         f"has shape {tuple(output.shape)}")
    done = []
    handles = [p.register_post_accumulate_grad_hook(lambda p, name=name: done.append(name)) for name, p in params.items()]
    try:
        # diffusers' train_dreambooth.py: F.mse_loss(model_pred.float(), target.float(), reduction="mean")
        loss = torch.nn.functional.mse_loss(output.float(), target.float(), reduction="mean")
        loss.backward()
    finally:
        for h in handles:
            h.remove()
    grads = {}
    for name in dict.fromkeys(done + list(params)):      # then any the loss does not reach
        p = params[name]
        grads[name] = p.grad if p.grad is not None else torch.zeros_like(p, requires_grad=False)
        p.grad = None                                    # the trace owns it now
    return loss.detach(), grads


def write_trace(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """safetensors keeps no insertion order, so the forward order travels in the metadata; the file is the
    same bytes for the same trace (`write_safetensors` sorts the metadata)."""
    write_safetensors(path, {k: v.contiguous().clone() for k, v in tensors.items()},
                      {**metadata, "order": json.dumps(list(tensors))})


def run_trace(*, model: str, component: str, inputs: str, out: str, precision: str = "fp32",
              names: str = "checkpoint", config_dir: str | None = None, backward: bool = False
              ) -> dict[str, torch.Tensor]:
    out_path = Path(out)
    if out_path.suffix != ".safetensors":
        raise TraceError(f"--out {out}: must end in .safetensors")
    if not out_path.parent.is_dir():
        raise TraceError(f"--out {out}: folder {out_path.parent} does not exist")
    if out_path.is_dir():
        raise TraceError(f"--out {out}: is a folder")
    try:
        check_writable(out_path.parent, f"--out {out}: its folder")      # before any work, not at the end
    except ValueError as e:
        raise TraceError(str(e)) from None
    try:
        given = read_safetensors(inputs)
    except CheckpointError as e:
        raise TraceError(f"--inputs: {e}") from None
    if backward and TARGET not in given:   # before loading the model
        raise TraceError(f"--backward: {inputs} holds no {TARGET!r} tensor (what the output is compared with: "
                         f"loss = mean((output - target)^2)); it holds {', '.join(sorted(given)) or 'nothing'}")
    comp = load_component(model, component, config_dir=config_dir)
    tensors = trace(comp, given, names=names, precision=precision, backward=backward)
    try:
        write_trace(out_path, tensors, {"model": str(model), "component": component, "layout": comp.layout,
                                        "names": names, "precision": precision,
                                        **({"loss": "F.mse_loss(output.float(), target.float())"} if backward else {})})
    except OSError as e:   # a disk that filled meanwhile: named by the flag, not by atomic_write's temporary
        raise TraceError(f"--out {out}: cannot write it ({e.strerror or e})") from None
    return tensors
