"""Seeded synthetic faces for the 7 expressions: the data `train_emotion.py` trains on by default.

Each face is drawn the way a person sketches an expression, with Pillow, at `SUPERSAMPLE` times the
output size and then shrunk (so strokes are anti-aliased), and finally stored like FER2013: a small
grayscale square.

    what varies per face (every class)      what tells the expressions apart
    ---------------------------------       ---------------------------------------------------------
    face width/height, skin tone,            mouth: smile arc (happy), frown arc (sad), flat line
    position, scale, rotation,                      (neutral), tight line (angry), round O (surprise),
    background colour and gradient,                 wide open slot (fear), one-sided sneer (disgust)
    noise, hair line, eye spacing            brows: level, raised and arched, inner ends down (V),
                                                    inner ends up (worried)
                                             eyes:  normal, wide, narrowed

`make_face(label, seed)` is a pure function of its arguments: the same (label, seed) gives the same
image on every machine (Python's `random.Random`, numpy's seeded generator and Pillow's drawing are all deterministic).
`synthetic_faces(n, seed)` draws n faces with the labels cycling through the classes, so every class
gets the same share.
"""
from __future__ import annotations

import math
import random

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from vit.model import EMOTION_LABELS

OUTPUT_SIZE = 48    # FER2013's image side
SUPERSAMPLE = 4     # draw at 4x, then shrink with a box filter: anti-aliased strokes


def _lerp(rng: random.Random, lo: float, hi: float) -> float:
    return lo + (hi - lo) * rng.random()


def _arc(draw, cx, cy, half_width, bend, width, fill):
    """A parabola through both mouth corners, drawn as a polyline. Image y grows downwards, so bend > 0
    puts the middle below the corners (a smile) and bend < 0 above them (a frown)."""
    points = []
    for i in range(17):
        t = -1 + 2 * i / 16                                  # -1 .. 1 across the mouth
        points.append((cx + t * half_width, cy + bend * (1 - t * t)))
    draw.line(points, fill=fill, width=width, joint="curve")


def _brow(draw, cx, cy, half_len, inner_drop, side, arch, width, fill):
    """One eyebrow over the eye at (cx, cy). inner_drop > 0 pulls the end nearest the nose down (angry),
    < 0 lifts it (worried). `side` is -1 for the face's left-hand brow (image left), +1 for the right."""
    inner_x, outer_x = cx - side * half_len, cx + side * half_len
    points = []
    for i in range(9):
        t = i / 8                                             # 0 at the inner end, 1 at the outer end
        x = inner_x + (outer_x - inner_x) * t
        y = cy + inner_drop * (1 - t) - inner_drop * t - arch * math.sin(math.pi * t)
        points.append((x, y))
    draw.line(points, fill=fill, width=width, joint="curve")


# Per expression: the features a person would draw. Ranges are sampled per face so that no two faces
# of a class are identical. Units are fractions of the face height H (so they scale with the face).
#   mouth: kind, bend (+ smile / - frown, in H), half width (in H)
#   brow:  inner_drop (in H; + is an angry V), lift above the eye (in H), arch (in H)
#   eye:   radius (in H), openness (height / width of the eye ellipse)
EXPRESSIONS = {
    "happy":    dict(mouth=("arc", (0.10, 0.14), (0.20, 0.26)), brow=((-0.01, 0.01), (0.13, 0.16), (0.02, 0.035)),
                     eye=((0.05, 0.06), (0.45, 0.65))),
    "sad":      dict(mouth=("arc", (-0.12, -0.08), (0.16, 0.22)), brow=((-0.10, -0.07), (0.12, 0.15), (0.0, 0.01)),
                     eye=((0.045, 0.055), (0.5, 0.7))),
    "neutral":  dict(mouth=("arc", (-0.008, 0.008), (0.16, 0.22)), brow=((-0.008, 0.008), (0.13, 0.16), (0.0, 0.01)),
                     eye=((0.05, 0.06), (0.8, 1.0))),
    "angry":    dict(mouth=("tight", (-0.03, -0.015), (0.12, 0.16)), brow=((0.07, 0.10), (0.08, 0.10), (0.0, 0.01)),
                     eye=((0.05, 0.06), (0.35, 0.5))),
    "surprise": dict(mouth=("o", (0.16, 0.20), (0.08, 0.10)), brow=((-0.01, 0.01), (0.22, 0.26), (0.03, 0.05)),
                     eye=((0.065, 0.08), (1.0, 1.15))),
    "fear":     dict(mouth=("wide", (0.09, 0.12), (0.18, 0.22)), brow=((-0.10, -0.07), (0.21, 0.25), (0.0, 0.01)),
                     eye=((0.065, 0.08), (1.0, 1.15))),
    "disgust":  dict(mouth=("sneer", (0.08, 0.11), (0.16, 0.20)), brow=((0.035, 0.055), (0.10, 0.12), (0.0, 0.01)),
                     eye=((0.045, 0.055), (0.3, 0.45))),
}
assert set(EXPRESSIONS) == set(EMOTION_LABELS), "one drawing recipe per emotion label"


def make_face(label: str, seed: int, *, size: int = OUTPUT_SIZE) -> Image.Image:
    """One grayscale ("L") face of `size` x `size` showing `label`, fully determined by (label, seed)."""
    if label not in EXPRESSIONS:
        raise ValueError(f"unknown expression {label!r}; choose one of {', '.join(EXPRESSIONS)}")
    rng = random.Random(f"{label}/{seed}")       # string seeds hash deterministically (not via hash())
    S = size * SUPERSAMPLE
    recipe = EXPRESSIONS[label]

    # Background: a colour and a vertical gradient towards a second colour.
    top = tuple(rng.randrange(0, 256) for _ in range(3))
    bottom = tuple(rng.randrange(0, 256) for _ in range(3))
    gradient = Image.linear_gradient("L").resize((S, S))                  # 0 at the top, 255 at the bottom
    image = Image.composite(Image.new("RGB", (S, S), bottom), Image.new("RGB", (S, S), top), gradient)

    # The face is drawn on its own layer around the canvas centre, then rotated, scaled and moved.
    H = S * _lerp(rng, 0.78, 0.9)                                       # face height before scaling
    W = H * _lerp(rng, 0.78, 0.9)
    skin_light = _lerp(rng, 0.35, 1.0)                                   # dark to light skin
    skin = (int(90 + 150 * skin_light), int(55 + 140 * skin_light), int(35 + 130 * skin_light))
    ink = tuple(int(c * _lerp(rng, 0.05, 0.2)) for c in skin)          # features darker than the skin
    layer = Image.new("RGBA", (S, S), (0, 0, 0, 0))
    d = ImageDraw.Draw(layer)
    cx, cy = S / 2, S / 2
    d.ellipse([cx - W / 2, cy - H / 2, cx + W / 2, cy + H / 2], fill=skin + (255,))
    if rng.random() < 0.5:                                               # a hair cap over the forehead
        hair = tuple(rng.randrange(0, 120) for _ in range(3)) + (255,)
        d.chord([cx - W / 2, cy - H / 2, cx + W / 2, cy + H * _lerp(rng, -0.2, 0.0)], 180, 360, fill=hair)
    stroke = max(1, round(H * _lerp(rng, 0.045, 0.06)))

    # Eyes: ellipses, wide or narrowed by the expression's openness, with a dark pupil.
    eye_y = cy - H * _lerp(rng, 0.06, 0.12)
    eye_dx = W * _lerp(rng, 0.18, 0.24)
    (r_lo, r_hi), (o_lo, o_hi) = recipe["eye"]
    r, openness = H * _lerp(rng, r_lo, r_hi), _lerp(rng, o_lo, o_hi)
    for side in (-1, 1):
        ex = cx + side * eye_dx
        d.ellipse([ex - r * 1.3, eye_y - r * openness, ex + r * 1.3, eye_y + r * openness], fill=(245, 245, 240, 255))
        p = r * min(openness, 0.8) * 0.8
        d.ellipse([ex - p, eye_y - p, ex + p, eye_y + p], fill=ink + (255,))

    # Brows.
    (i_lo, i_hi), (l_lo, l_hi), (a_lo, a_hi) = recipe["brow"]
    inner_drop, lift, arch = H * _lerp(rng, i_lo, i_hi), H * _lerp(rng, l_lo, l_hi), H * _lerp(rng, a_lo, a_hi)
    for side in (-1, 1):
        _brow(d, cx + side * eye_dx, eye_y - lift, r * 1.6, inner_drop, side, arch, stroke + 1, ink + (255,))

    # Nose: a short line and, for disgust, wrinkle marks beside it.
    nose_y = cy + H * _lerp(rng, 0.05, 0.09)
    d.line([(cx, eye_y + r), (cx + W * 0.03, nose_y)], fill=ink + (255,), width=max(1, stroke - 1))
    if label == "disgust":
        for side in (-1, 1):                   # wrinkles either side of the nose
            d.line([(cx + side * W * 0.07, nose_y - H * 0.07), (cx + side * W * 0.13, nose_y)],
                   fill=ink + (255,), width=stroke)

    # Mouth.
    kind, (b_lo, b_hi), (w_lo, w_hi) = recipe["mouth"]
    mouth_y = cy + H * _lerp(rng, 0.22, 0.28)
    bend, half = H * _lerp(rng, b_lo, b_hi), H * _lerp(rng, w_lo, w_hi)
    if kind == "arc":                          # smile (bend > 0), frown (< 0), flat (~ 0)
        _arc(d, cx, mouth_y, half, bend, stroke, ink + (255,))
    elif kind == "tight":                      # pressed lips: a short thick line, corners slightly down
        _arc(d, cx, mouth_y, half, bend, stroke * 2, ink + (255,))
    elif kind == "o":                          # round open mouth: bend is its height
        d.ellipse([cx - half, mouth_y - bend / 2, cx + half, mouth_y + bend / 2], fill=(60, 20, 20, 255),
                  outline=ink + (255,), width=stroke)
    elif kind == "wide":                       # stretched open mouth, wider than tall
        d.rounded_rectangle([cx - half, mouth_y - bend / 2, cx + half, mouth_y + bend / 2], radius=bend / 3,
                            fill=(60, 20, 20, 255), outline=ink + (255,), width=stroke)
    else:                                      # "sneer": flat on one side, the other corner pulled up
        side = rng.choice((-1, 1))
        points = [(cx + side * t * half, mouth_y - bend * max(0.0, t) ** 2 * 2.0)
                  for t in (-1 + 2 * i / 16 for i in range(17))]
        d.line(points, fill=ink + (255,), width=stroke, joint="curve")

    # Pose: rotate about the centre, scale, and move; then paste over the background.
    angle = _lerp(rng, -10, 10)
    scale = _lerp(rng, 0.92, 1.05)
    layer = layer.rotate(angle, resample=Image.Resampling.BILINEAR)
    new = max(1, round(S * scale))
    layer = layer.resize((new, new), resample=Image.Resampling.BILINEAR)
    shift = S * 0.05
    x0 = round((S - new) / 2 + _lerp(rng, -shift, shift))
    y0 = round((S - new) / 2 + _lerp(rng, -shift, shift))
    image.paste(layer, (x0, y0), layer)

    # Shrink to the output size, blur a little, add pixel noise, store as FER does: grayscale.
    image = image.resize((size, size), resample=Image.Resampling.BOX).convert("L")
    if rng.random() < 0.15:
        image = image.filter(ImageFilter.GaussianBlur(_lerp(rng, 0.3, 0.6)))
    sigma = _lerp(rng, 0.0, 5.0)
    noise = np.random.default_rng(rng.getrandbits(64)).normal(0.0, sigma, (size, size))
    return Image.fromarray(np.clip(np.rint(np.asarray(image, dtype=np.float64) + noise), 0, 255).astype(np.uint8))


def synthetic_faces(n: int, seed: int, *, labels: tuple[str, ...] = EMOTION_LABELS,
                    size: int = OUTPUT_SIZE) -> list[tuple[Image.Image, int]]:
    """n (image, label index) pairs, face i showing labels[i % len(labels)], drawn from seed `seed`."""
    return [(make_face(labels[i % len(labels)], seed * 1_000_003 + i, size=size), i % len(labels))
            for i in range(n)]
