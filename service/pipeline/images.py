"""Bytes → validated PIL image → uint8 pixels (C, H, W) in the model card's mode and size. The engine
normalizes them, once per batch (modelcard InputSpec.normalize).

Every failure is a domain error (service/errors.py) whose message says what to change. The pixel
count is checked from the header, before any decoding, so a decompression bomb costs nothing. An EXIF
Orientation (phone photos) is applied after decoding, so the model sees the picture upright.
"""

from __future__ import annotations

import base64
import binascii
import io

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from modelcard import InputSpec
from service.errors import InvalidInput, TooLarge, Unsupported

# Requests with more image bytes than this are decoded and resized in a thread (Pillow releases the GIL
# there, so it runs beside the event loop); smaller ones inline, where a thread hop (~50–100 µs) would
# cost more than the work: a digit PNG is ~300 bytes, a 224² JPEG photo ~15 kB.
INLINE_DECODE_BYTES = 4096
FORMATS = ["PNG", "JPEG", "BMP", "TIFF", "WEBP"]
# Modes we convert from. Others (CMYK, 16/32-bit integer, float) have no single right conversion to
# 8-bit pixels, so we ask the client to convert instead of guessing.
MODES = {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX"}

ORIENTATION = 0x0112  # EXIF: 1 = upright; 2-8 = mirrored and/or rotated by 90° steps
# We enforce our own pixel limit before decoding; PIL's own check would raise mid-way.
Image.MAX_IMAGE_PIXELS = None


def decode(data: bytes, max_pixels: int, name: str = "image") -> Image.Image:
    """Open and fully decode one image file, refusing anything we cannot serve correctly."""
    image = opened(data, max_pixels, name)
    try:
        # Truncated data raises (ImageFile.LOAD_TRUNCATED_IMAGES stays False). No warnings-as-errors
        # here: warning filters are process-wide and this runs beside the event loop's threads.
        image.load()
    except Exception as e:  # noqa: BLE001
        raise InvalidInput(f"{name} is truncated or corrupt ({e}); send the whole file",
                           "invalid_image") from None
    return upright(image)


def probe(data: bytes, max_pixels: int, name: str = "image") -> tuple[int, int, int]:
    """(width, height, bytes per decoded pixel) from the header alone, with decode's checks: what a
    request is priced by before anything is decoded (pipeline/cost.py)."""
    image = opened(data, max_pixels, name)
    return image.width, image.height, len(image.getbands())


def opened(data: bytes, max_pixels: int, name: str) -> Image.Image:
    """The image's header read and checked (format, pixel count, mode); nothing decoded yet."""
    if not data:
        raise InvalidInput(f"{name} is empty", "invalid_image")
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)
    except UnidentifiedImageError:
        raise Unsupported(f"{name} is not an image in a supported format "
                          f"({', '.join(FORMATS)})", "unsupported_image") from None
    except Exception as e:  # noqa: BLE001 - a corrupt header raises many types
        raise InvalidInput(f"{name} could not be read: {e}", "invalid_image") from None
    width, height = image.size
    if width * height > max_pixels:
        raise TooLarge(f"{name} is {width}×{height} = {width * height} pixels, over the limit "
                       f"of {max_pixels}; downscale it", "image_too_large")
    if image.mode not in MODES:
        raise Unsupported(f"{name} has pixel mode {image.mode!r}; send 8-bit greyscale or RGB(A)",
                          "unsupported_mode")
    return image


def upright(image: Image.Image) -> Image.Image:
    """Apply the image's EXIF Orientation, if it has one other than upright: in place, so the only
    extra allocation is the transposed copy that replaces the decoded pixels (a transpose keeps the
    pixel count: the limit checked above holds). Images without one are returned as they are, with
    no copy."""
    try:
        orientation = image.getexif().get(ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - a corrupt EXIF block: the pixels are still good
        return image
    if orientation in range(2, 9):
        ImageOps.exif_transpose(image, in_place=True)
    return image


def from_base64(text: str, name: str) -> bytes:
    """Base64 (or a data: URL) → bytes."""
    try:
        return base64.b64decode(text.split(",", 1)[-1] if text.startswith("data:") else text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput(f"{name} is not valid base64", "invalid_image") from None


def to_mode(image: Image.Image, mode: str) -> Image.Image:
    """Convert to the model's mode; transparent pixels become black (MNIST's paper colour)."""
    if image.mode in ("LA", "PA", "RGBA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        flat = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        image = Image.alpha_composite(flat, rgba)
    return image if image.mode == mode else image.convert(mode)


def pixels(image: Image.Image, invert: bool = False) -> np.ndarray:
    """PIL image → uint8 (C, H, W); `invert`: dark ink on light paper becomes light on dark."""
    x = np.asarray(image)
    x = x[None] if x.ndim == 2 else x.transpose(2, 0, 1)
    return 255 - x if invert else np.ascontiguousarray(x)


def window_pixels(image: Image.Image, spec: InputSpec, invert: bool = False) -> np.ndarray:
    """An image for classification: card mode, resized to the window → uint8 (C, h, w)."""
    image = to_mode(image, spec.mode)
    if image.size != (spec.width, spec.height):
        image = image.resize((spec.width, spec.height), Image.BILINEAR)
    return pixels(image, invert)


def full_pixels(image: Image.Image, spec: InputSpec, invert: bool = False) -> np.ndarray:
    """An image for dense scoring: card mode at its own size → uint8 (C, H, W)."""
    return pixels(to_mode(image, spec.mode), invert)
