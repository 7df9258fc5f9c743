"""The networks of Stable Diffusion v1, written as the papers and diffusers' code describe them:
`unet.py` (the U of down, middle and up blocks), `unet_blocks.py` (timestep embedding, ResNet blocks,
up/down samplers), `attention.py` (the spatial transformer: self- and cross-attention, GEGLU) and
`vae.py` (the KL autoencoder and its Gaussian posterior). Attribute names follow diffusers', so a
diffusers folder loads with no renaming."""
