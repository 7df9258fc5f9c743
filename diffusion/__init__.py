"""Stable Diffusion v1: hand-written UNet (`unet.py`), VAE (`vae.py`), their loading from a diffusers
folder or an original single file (`weights.py`, `single_file.py`), and the sampler and pipeline."""
