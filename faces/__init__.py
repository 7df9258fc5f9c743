"""A from-scratch Viola-Jones face detector that reads OpenCV's public Haar cascade.

    from faces import detect_faces
    boxes = detect_faces(pil_image)          # [(x, y, w, h), ...] in image pixels

Files: cascade.py (parsing the XML), integral.py (integral images, plain and tilted), resize.py
(OpenCV's bilinear pyramid resize), evaluate.py (the cascade's arithmetic on many windows at once),
scan.py (which windows are tried on each pyramid level), group.py (merging hits), detect.py (the
multi-scale driver), crops.py (face crops and drawings for predict_emotion.py / serve_emotion.py),
__main__.py (python -m faces). OpenCV is never imported here; the tests compare against its
recorded outputs (tools/make_reference_faces.py).
"""
from .cascade import CascadeError, HaarCascade, load_cascade
from .detect import detect_candidates, detect_faces, default_cascade

__all__ = ["CascadeError", "HaarCascade", "load_cascade", "detect_faces", "detect_candidates", "default_cascade"]
