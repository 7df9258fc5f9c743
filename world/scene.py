"""One scene of the tiny world: what it holds (the vocabulary) and how it is drawn.

A scene is one shape, in one named colour, size and position, on a plain background of another
named colour. Everything a caption can say about it is in `Scene`; `draw` turns it into pixels.
A scene may also carry a disc of a second colour at the shape's centre (`centre`): the two-colour
objects that only the VAE decoder's fine-tuning sees (world/world.py's `TwoColourWorld`); captions
never mention it, and the world's ordinary scenes have none.

Geometry is written in "shape units": a shape of radius 1 centred on (0, 0), y pointing down, and
scaled by the size's radius (a fraction of the image side). So the same tables draw a 64x64 or a
32x32 world. Shapes are drawn `supersample` times larger and shrunk with a box filter (each output
pixel is the mean of the supersample x supersample pixels it covers): antialiased edges whose
half-covered pixels sit halfway between the two colours, which the checker relies on.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from PIL import Image, ImageDraw

# ---- the vocabulary ----------------------------------------------------------------------------------
# Named colours (sRGB 0..255), chosen far apart in CIELAB (smallest pairwise distance: purple/blue,
# about 36 Delta-E) so a blurred or noisy pixel still has an unambiguous nearest name.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "orange": (245, 145, 30),
    "yellow": (245, 225, 50),
    "green": (50, 170, 70),
    "blue": (45, 90, 215),
    "purple": (140, 70, 190),
    "white": (245, 245, 245),
    "black": (30, 30, 30),
}

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")

# Radius of each size as a fraction of the image side (64 px: 7, 10 and 13 px).
SIZES: dict[str, float] = {"small": 7 / 64, "medium": 10 / 64, "large": 13 / 64}

# A 3 x 3 grid of positions: name -> (column, row), each 0, 1 or 2.
POSITIONS: dict[str, tuple[int, int]] = {
    "top left": (0, 0), "top": (1, 0), "top right": (2, 0),
    "left": (0, 1), "center": (1, 1), "right": (2, 1),
    "bottom left": (0, 2), "bottom": (1, 2), "bottom right": (2, 2),
}
GRID_CENTRES = (18 / 64, 32 / 64, 46 / 64)  # centre of each column / row, as a fraction of the side
JITTER = 2 / 64     # the centre moves up to this far (fraction of the side) from its grid point
MARGIN = 4 / 64     # ... but the shape always stays this far from the image border

# Colour + shape combinations that never appear in training draws, one per shape and each in a
# different colour, so "a blue circle" tests composition: blue and circle were both seen, never together.
HELD_OUT: tuple[tuple[str, str], ...] = (
    ("blue", "circle"), ("yellow", "square"), ("green", "triangle"), ("red", "star"), ("purple", "cross"),
)


@dataclass(frozen=True)
class Scene:
    colour: str        # the shape's colour, a key of COLOURS
    shape: str         # one of SHAPES
    size: str          # a key of SIZES
    position: str      # a key of POSITIONS
    background: str    # a key of COLOURS, never the shape's colour
    dx: float = 0.0    # jitter of the centre from its grid point, fraction of the side (|dx| <= JITTER)
    dy: float = 0.0
    centre: str | None = None   # colour of a disc at the shape's centre (a two-colour object), or None
    centre_radius: float = 0.42  # the disc's radius in shape units (the star's outer radius is 1.15)

    def __post_init__(self):
        for name, value, allowed in (("colour", self.colour, COLOURS), ("shape", self.shape, SHAPES),
                                     ("size", self.size, SIZES), ("position", self.position, POSITIONS),
                                     ("background", self.background, COLOURS)):
            if value not in allowed:
                raise ValueError(f"Scene {name}={value!r}: choose one of {', '.join(allowed)}")
        if self.background == self.colour:
            raise ValueError(f"Scene background={self.background!r} equals the shape's colour")
        if self.centre is not None and (self.centre not in COLOURS or self.centre == self.colour):
            raise ValueError(f"Scene centre={self.centre!r}: a key of COLOURS other than the shape's colour, or None")

    def attributes(self) -> dict[str, str]:
        """The words a caption may use, by attribute name."""
        return {"colour": self.colour, "shape": self.shape, "size": self.size,
                "position": self.position, "background": self.background}


# ---- geometry in shape units (radius 1, centre (0, 0), y down) --------------------------------------
def _regular_points(n: int, radius: float, start_deg: float = -90.0) -> list[tuple[float, float]]:
    return [(radius * math.cos(math.radians(start_deg + 360.0 * k / n)),
             radius * math.sin(math.radians(start_deg + 360.0 * k / n))) for k in range(n)]


def _centred(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Shift a polygon so its bounding box is centred on (0, 0): a scene's position is its box's centre."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    cx, cy = (min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2
    return [(x - cx, y - cy) for x, y in points]


def _star(outer: float, inner: float, points: int = 5) -> list[tuple[float, float]]:
    outer_pts, inner_pts = _regular_points(points, outer), _regular_points(points, inner, -90.0 + 180.0 / points)
    return [p for pair in zip(outer_pts, inner_pts) for p in pair]


def _cross(arm: float, half_width: float) -> list[tuple[float, float]]:
    a, w = arm, half_width
    return [(-w, -a), (w, -a), (w, -w), (a, -w), (a, w), (w, w), (w, a), (-w, a), (-w, w), (-a, w), (-a, -w), (-w, -w)]


# Each polygon is scaled so the shapes look about equally big at one size; the circle is an ellipse
# of radius 1. Factors: square half-side 0.9 (area 3.2, the circle's 3.1); triangle (pointing up)
# circumradius 1.2; star (5 points, inner radius 0.45 of the outer) outer radius 1.15; plus-shaped
# cross arms 1.0 long and 0.35 half-wide.
POLYGONS: dict[str, list[tuple[float, float]]] = {
    "square": [(-0.9, -0.9), (0.9, -0.9), (0.9, 0.9), (-0.9, 0.9)],
    "triangle": _centred(_regular_points(3, 1.2)),
    "star": _centred(_star(1.15, 0.45 * 1.15)),
    "cross": _cross(1.0, 0.35),
}


def half_extent(shape: str) -> float:
    """Half the longer side of the shape's bounding box, in shape units (the circle's is 1)."""
    if shape == "circle":
        return 1.0
    xs, ys = zip(*POLYGONS[shape])
    return max(max(xs) - min(xs), max(ys) - min(ys)) / 2


def unit_area(shape: str) -> float:
    """The shape's area in shape units (the circle's is pi), by the shoelace formula."""
    if shape == "circle":
        return math.pi
    xs, ys = zip(*POLYGONS[shape])
    return 0.5 * abs(sum(xs[k] * ys[k - 1] - xs[k - 1] * ys[k] for k in range(len(xs))))


def centre(scene: Scene) -> tuple[float, float]:
    """The shape's bounding-box centre as fractions of the image side, kept MARGIN inside the border."""
    column, row = POSITIONS[scene.position]
    reach = SIZES[scene.size] * half_extent(scene.shape) + MARGIN
    x = min(max(GRID_CENTRES[column] + scene.dx, reach), 1 - reach)
    y = min(max(GRID_CENTRES[row] + scene.dy, reach), 1 - reach)
    return x, y


def draw(scene: Scene, *, image_size: int = 64, supersample: int = 4) -> Image.Image:
    """Render `scene` as an RGB image of image_size x image_size pixels."""
    big = image_size * supersample
    image = Image.new("RGB", (big, big), COLOURS[scene.background])
    pen = ImageDraw.Draw(image)
    cx, cy = (c * big for c in centre(scene))
    radius = SIZES[scene.size] * big
    fill = COLOURS[scene.colour]
    if scene.shape == "circle":
        pen.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
    else:
        pen.polygon([(cx + radius * x, cy + radius * y) for x, y in POLYGONS[scene.shape]], fill=fill)
    if scene.centre is not None:
        r = scene.centre_radius * radius
        pen.ellipse((cx - r, cy - r, cx + r, cy + r), fill=COLOURS[scene.centre])
    if supersample == 1:
        return image
    return image.resize((image_size, image_size), Image.Resampling.BOX)  # (big, big) -> (size, size)
