"""What train_dreambooth.py's loop calls: `data.py` (instance photos, generated class images, crops and
per-example generators) and `steps.py` (the loop's named steps: models, trainable parameters, batch,
denoising prediction and loss, optimizer step, training state)."""
