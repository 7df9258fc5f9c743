"""Images from files and bytes, read the one way every entry point reads them: a known format decoded
by Pillow's own code, a pixel count checked from the header before decoding, a truncated file caught
at load, and a message that names the input. The emotion classifier, the server and DreamBooth's
instance and class images and sample.py's --init-img and --mask all come through `load_image`."""
from __future__ import annotations

import io
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
# The formats read here (IMAGE_SUFFIXES are their file names), all decoded by Pillow's own code. Any
# other format is refused from its header, before decoding: EPS and PostScript in particular, which
# Pillow hands to Ghostscript, an external program, to rasterise. MPO is a camera JPEG with extra frames.
FORMATS = ("JPEG", "MPO", "PNG", "GIF", "BMP", "TIFF", "WEBP", "PPM")
EXTERNAL_PROGRAMS = {"EPS": "Ghostscript"}   # formats Pillow reads only by running another program
# The pixel limit of the files the scripts read (DreamBooth's photos, sample.py's --init-img and --mask):
# Pillow's own decompression-bomb limit, refused here from the header with a message naming the file.
MAX_IMAGE_PIXELS = 89_478_485


class ImageError(ValueError):
    """An input that is not a readable image. The message names it."""


class ImageTooLarge(ImageError):
    """An image with more pixels than the caller allows, told from its header before decoding."""


def load_image(source: str | Path | bytes | Image.Image, *, name: str | None = None,
               max_pixels: int | None = None) -> Image.Image:
    """A path, raw bytes or a PIL image -> an RGB PIL image, as transformers' `load_image` does.

    EXIF orientation is applied, then any mode (L, LA, P, RGBA, CMYK, I;16, ...) is converted with
    PIL's `convert("RGB")` (transparency is dropped, not composited, exactly as transformers does).
    Files and bytes must be in one of FORMATS, and with `max_pixels` hold at most that many pixels
    (ImageTooLarge): both are checked from the header, before any pixel is decoded. The decoded file
    is closed before returning, so only the RGB image stays in memory.
    """
    label = name or (str(source) if isinstance(source, (str, Path)) else "<image bytes>")
    if isinstance(source, Image.Image):
        return _to_rgb(source, label)
    try:
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
    except OSError as e:
        raise ImageError(f"{label}: cannot read ({e.strerror or e})") from e
    if not data:
        raise ImageError(f"{label}: empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as image:   # reads the header only
            _check_header(image, label, max_pixels)
            image.load()  # decode now, so a truncated file fails here and not later
            return _to_rgb(image, label, in_place=True)
    except UnidentifiedImageError as e:  # PIL's own message names a BytesIO object, not the input
        raise ImageError(f"{label}: not a readable image: {len(data)} bytes beginning {data[:8]!r} are not an "
                         "image in any format Pillow reads") from e
    except Image.DecompressionBombError as e:     # over twice Pillow's own limit: refused by Image.open
        limit = f"; the limit here is {max_pixels} pixels" if max_pixels else ""
        raise ImageTooLarge(f"{label}: image too large ({e}{limit})") from e
    except ImageError:
        raise
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{label}: not a readable image ({e})") from e


def resized_size(w: int, h: int, resolution: int) -> tuple[int, int]:
    """(W, H) of a w x h image resized so its shorter side is `resolution`, as torchvision's
    `Resize(resolution)` in diffusers' scripts computes it: the longer side int(resolution * long / short),
    truncated (17 x 23 at 16 -> 16 x 21, where rounding would give 22)."""
    longer = int(resolution * max(w, h) / min(w, h))
    return (resolution, longer) if w <= h else (longer, resolution)


def header_pixels(path: str | Path) -> int:
    """width x height from a file's header, without decoding it (0 for a file that does not open as an
    image: `load_image` names its problem when it is read)."""
    try:
        with Image.open(path) as image:
            width, height = image.size
        return width * height
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return 0


def _check_header(image: Image.Image, label: str, max_pixels: int | None) -> None:
    """The format and the pixel count, both known from the header alone."""
    if image.format not in FORMATS:
        program = EXTERNAL_PROGRAMS.get(image.format)
        why = f" (Pillow would run {program}, an external program, to read it)" if program else ""
        raise ImageError(f"{label}: {image.format} images are not read here{why}; "
                         f"send one of {', '.join(FORMATS)}")
    width, height = image.size
    if max_pixels and width * height > max_pixels:
        raise ImageTooLarge(f"{label}: image too large: {width}x{height} = {width * height} pixels, over "
                            f"the limit of {max_pixels} pixels")


def _to_rgb(image: Image.Image, label: str, *, in_place: bool = False) -> Image.Image:
    """EXIF orientation applied, then convert("RGB"), in transformers' order. in_place transposes `image`
    itself (one just decoded here, which nobody else holds) instead of a copy: one full-size copy fewer."""
    try:
        if in_place:
            ImageOps.exif_transpose(image, in_place=True)
        else:
            image = ImageOps.exif_transpose(image)
        return image.convert("RGB")
    except (OSError, ValueError) as e:
        raise ImageError(f"{label}: cannot convert to RGB ({e})") from e
