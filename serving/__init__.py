"""Serving a model over HTTP: request batching (used by serve_emotion.py)."""
