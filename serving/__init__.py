"""Serving a model over HTTP, for serve_emotion.py: request batching (batcher.py), what a POST body may
hold (body.py, multipart.py), bounded connections (connections.py), and giving a large decode's memory
back (memory.py)."""
