"""The embedded defaults: small models this project trained itself, shipped so that every entry point
runs on a fresh machine with no weights of the user's own (see embedded/README.md for how each was made).

They are demonstrations, not the published models: the emotion ViT has only ever seen the synthetic
cartoon faces of vit/synthetic_faces.py, and the text-to-image model only world/'s coloured shapes.
"""
from pathlib import Path

HERE = Path(__file__).resolve().parent
EMOTION_VIT = HERE / "emotion_vit"   # predict_emotion.py / serve_emotion.py without --model
WORLD_SD = HERE / "world_sd"         # sample.py without --ckpt, train_dreambooth.py's demo
