"""A porter's kit: every layer of every component checkable against a port, under the checkpoint's own names.

    python -m porting trace   --model PATH --component unet --inputs in.safetensors --out trace.safetensors [--backward]
    python -m porting compare trace.safetensors my_port_dump.safetensors [--rtol 1e-4]
    python -m porting mapping --layout ldm-unet            (checkpoint key, our key, shape, transform) as TSV

`components.py` loads one component of a checkpoint and pairs its tensors with ours (by the loaders'
own key tables), `names.py` turns that pairing into module names (and our gradients into the file's
keys), `trace.py` records every module's output (with --backward, the loss and every gradient),
`compare.py` lines two traces up, `mapping.py` prints the key tables, and `numpy_clip.py` is a worked
example: the CLIP text encoder ported to numpy and checked with the compare tool.
docs/porting.md is the guide.
"""
