"""Face boxes -> crops for the emotion classifier, and a picture of the result for a person to check.

The emotion ViT was trained on face crops, not whole photos, so predict_emotion.py --faces and
serve_emotion.py's {"faces": true} detect faces (faces/detect.py), cut each box out with a margin
around it (`crop_box`), classify the crops, and can draw the boxes and top labels (`draw_faces`).
"""
from __future__ import annotations

from PIL import Image, ImageDraw

from .detect import detect_faces

Box = tuple[int, int, int, int]
DEFAULT_MARGIN = 0.2      # predict_emotion.py --face_margin and serve_emotion.py's {"faces": true}
BOX_COLOUR = (255, 40, 40)
LABEL_COLOUR = (255, 255, 255)


def parse_box(text: str) -> Box:
    """'x,y,w,h' (non-negative integers, w and h >= 1) -> (x, y, w, h)."""
    parts = text.split(",")
    try:
        x, y, w, h = (int(p) for p in parts)
    except ValueError:
        raise ValueError(f"{text!r}: expected x,y,w,h as four integers, e.g. 10,20,64,64") from None
    if x < 0 or y < 0 or w < 1 or h < 1:
        raise ValueError(f"{text!r}: x and y must be >= 0 and w, h >= 1")
    return x, y, w, h


def check_inside(box: Box, size: tuple[int, int]) -> None:
    """Raise ValueError unless the box lies inside an image of `size` (width, height)."""
    x, y, w, h = box
    if x + w > size[0] or y + h > size[1]:
        raise ValueError(f"box {x},{y},{w},{h} lies outside the {size[0]}x{size[1]} image")


def crop_box(box: Box, margin: float, size: tuple[int, int]) -> Box:
    """The box grown by `margin` times its width/height on every side, clipped to the image."""
    x, y, w, h = box
    dx, dy = round(margin * w), round(margin * h)
    x0, y0 = max(x - dx, 0), max(y - dy, 0)
    x1, y1 = min(x + w + dx, size[0]), min(y + h + dy, size[1])
    return x0, y0, x1 - x0, y1 - y0


def crop(image: Image.Image, box: Box) -> Image.Image:
    x, y, w, h = box
    return image.crop((x, y, x + w, y + h))


def face_crops(image: Image.Image, margin: float = DEFAULT_MARGIN, *,
               max_detect_side: int | None = None) -> list[tuple[Box, Image.Image]]:
    """(detected box, crop grown by `margin`) for each face found in the image, with the detector's
    default parameters; detection on a copy of at most max_detect_side pixels a side, the crops cut
    from the image itself. ValueError for an image smaller than the detection window."""
    return [(box, crop(image, crop_box(box, margin, image.size)))
            for box in detect_faces(image, max_side=max_detect_side)]


def draw_faces(image: Image.Image, faces: list[dict]) -> Image.Image:
    """A copy of `image` with each face's box and its top label and score drawn on it.

    `faces` are predict_emotion.py's {"box": [x, y, w, h], "predictions": [{"label", "score"}, ...]}."""
    canvas = image.convert("RGB")
    draw = ImageDraw.Draw(canvas)
    thickness = max(2, round(min(canvas.size) / 200))
    for face in faces:
        x, y, w, h = face["box"]
        draw.rectangle((x, y, x + w - 1, y + h - 1), outline=BOX_COLOUR, width=thickness)
        if face.get("predictions"):
            top = face["predictions"][0]
            text = f"{top['label']} {top['score']:.2f}"
            left, top_y, right, bottom = draw.textbbox((0, 0), text)
            text_w, text_h = right - left, bottom - top_y
            ty = y - text_h - 4 if y >= text_h + 4 else y + h     # above the box, else below it
            draw.rectangle((x, ty, x + text_w + 4, ty + text_h + 4), fill=BOX_COLOUR)
            draw.text((x + 2 - left, ty + 2 - top_y), text, fill=LABEL_COLOUR)
    return canvas
