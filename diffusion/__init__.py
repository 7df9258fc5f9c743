"""Stable Diffusion v1, by folder:

    models/        the UNet, its blocks and attention, the VAE
    samplers/      DDIM, PLMS, DPM-Solver++ 2M (Karras), Euler, Euler a, behind one interface and a registry (`make_sampler`)
    checkpoints/   loading and saving both public layouts, the safe .ckpt reader, conversion
    schedule.py    the noise schedule and the forward process (DDPM eq. 4)
    pipeline.py    text to image: prompts -> text states -> sampled latents -> pixels
    speed.py       the speed transformations (sub-pixel upsampler, memory layout) applied to built models
"""
