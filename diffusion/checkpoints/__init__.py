"""Reading and writing Stable Diffusion v1 checkpoints: `load.py` (a diffusers folder or an original
single file, strictly), `single_file.py` (the original layout's key rules and shape inference),
`configs.py` (configs without weights), `ckpt.py` and `pickle_allowlist.py` (Lightning .ckpt files read
without running their pickles), `save.py` (both layouts written back) and `convert.py`
(`python -m diffusion.checkpoints.convert`: .ckpt to .safetensors)."""
