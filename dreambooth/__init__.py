"""What train_dreambooth.py's loop calls: `data.py` (instance photos, generated class images, crops and
per-example generators) and `steps.py` (the loop's named steps: models, trainable parameters, batch,
denoising prediction and loss, optimizer step, training state).

And the paper's evaluation, `python -m dreambooth.evaluate` (docs/evaluation.md): `metrics.py` (DINO,
CLIP-I, CLIP-T, PRES), `scoring.py` and `evaluate.py` (scoring folders of images), `benchmark.py` (the
dataset's protocol: generate, then score), `prompts.py` (prompts.jsonl and the benchmark's prompts)."""
