"""A from-scratch Viola-Jones face detector that reads OpenCV's public Haar cascade.

    from faces import detect_faces
    boxes = detect_faces(pil_image)          # [(x, y, w, h), ...] in image pixels

Files: cascade.py (parsing the XML), integral.py (integral images), resize.py (OpenCV's bilinear
pyramid resize), evaluate.py (the cascade on every window, vectorised), group.py (merging hits),
detect.py (the multi-scale driver). OpenCV is never imported here; tests compare against its
recorded outputs (tools/make_reference_faces.py).
"""
from .cascade import CascadeError, HaarCascade, load_cascade
from .detect import detect_candidates, detect_faces, default_cascade

__all__ = ["CascadeError", "HaarCascade", "load_cascade", "detect_faces", "detect_candidates", "default_cascade"]
