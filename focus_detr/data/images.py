"""
The one image reader of training, evaluation and the demo.

detectron2's ``read_image`` converts with ``PIL.Image.convert``, which clips 16-bit and 32-bit
pixel values to 255: a 16-bit grayscale PNG becomes an all-white image, a float image all
black. :func:`read_image` scales them instead, and rejects what it cannot convert, naming the
file and the mode:

* 8-bit modes (``1``, ``L``, ``P``, ``PA``, ``LA``, ``RGB``, ``RGBA``, ``RGBa``, ``RGBX``,
  ``CMYK``, ``YCbCr``) are converted by Pillow; an alpha channel is dropped (the colour
  channels as stored, as detectron2 and OpenCV read them);
* 16-bit grayscale (``I;16``, ``I;16L``, ``I;16B``, ``I;16N``) is scaled from 0..65535 to
  0..255;
* 32-bit integer (``I``) is read as 16-bit values (Pillow's mode for some 16-bit files) and
  scaled the same way; values outside 0..65535 are rejected;
* 32-bit float (``F``) is scaled from 0..1 to 0..255; values outside 0..1, NaN or infinity are
  rejected;
* any other mode (``LAB``, ``HSV``, ``La``, ...) is rejected.

The EXIF orientation is applied, as detectron2 does. Errors while decoding (a truncated file)
are raised as :class:`ImageReadError` naming the file.
"""

from typing import Optional

import numpy as np
from detectron2.utils.file_io import PathManager
from PIL import Image, ImageOps

__all__ = ["ImageReadError", "SUPPORTED_MODES", "read_image", "unsupported_mode"]

_EIGHT_BIT_MODES = ("1", "L", "P", "PA", "LA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr")
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
SUPPORTED_MODES = _EIGHT_BIT_MODES + _SIXTEEN_BIT_MODES + ("I", "F")
_FORMATS = ("RGB", "BGR", "L")
_ORIENTATION = 0x0112  # the EXIF tag


class ImageReadError(ValueError):
    """An image file cannot be decoded or converted; the message names the file."""


def unsupported_mode(mode: str) -> Optional[str]:
    """Why an image of Pillow ``mode`` cannot be read, or None when it can."""
    if mode in SUPPORTED_MODES:
        return None
    return f"its mode {mode!r} is not one of the supported modes {', '.join(SUPPORTED_MODES)}"


def _scaled_to_8_bit(image: Image.Image, path: str) -> Image.Image:
    """A 16-bit, 32-bit integer or float image as an 8-bit ``L`` image (see the module doc)."""
    pixels = np.asarray(image)
    if image.mode == "F":
        if not np.isfinite(pixels).all() or pixels.min() < 0 or pixels.max() > 1:
            raise ImageReadError(
                f"Image {path} has mode 'F' (32-bit float) with values in "
                f"[{pixels.min()}, {pixels.max()}]: only values in [0, 1] are read"
            )
        gray = np.rint(pixels.astype(np.float64) * 255)
    else:
        if pixels.size and (pixels.min() < 0 or pixels.max() > 65535):
            raise ImageReadError(
                f"Image {path} has mode {image.mode!r} with values in [{pixels.min()}, "
                f"{pixels.max()}]: only 16-bit values (0..65535) are read"
            )
        gray = (pixels.astype(np.int64) * 255 + 32767) // 65535
    return Image.fromarray(gray.astype(np.uint8), mode="L")


def read_image(path: str, format: str = "RGB") -> np.ndarray:
    """
    Args:
        path: image file (local, or any path detectron2's ``PathManager`` opens).
        format: "RGB", "BGR" or "L".

    Returns:
        (H, W, 3) uint8 for "RGB" and "BGR", (H, W, 1) uint8 for "L".

    Raises:
        ImageReadError: the file cannot be decoded, or its mode or values cannot be converted
            (see the module doc); the message names the file.
    """
    if format not in _FORMATS:
        raise ValueError(f"format must be one of {_FORMATS}, got {format!r}")
    try:
        with PathManager.open(path, "rb") as f:
            image = Image.open(f)
            image.load()
            if image.getexif().get(_ORIENTATION, 1) != 1:
                image = ImageOps.exif_transpose(image)
    except Exception as error:
        raise ImageReadError(
            f"Cannot read image {path}: {type(error).__name__}: {error}"
        ) from error
    reason = unsupported_mode(image.mode)
    if reason is not None:
        raise ImageReadError(f"Cannot read image {path}: {reason}")
    if image.mode in _SIXTEEN_BIT_MODES + ("I", "F"):
        image = _scaled_to_8_bit(image, path)
    try:
        image = image.convert("L" if format == "L" else "RGB")
    except Exception as error:
        raise ImageReadError(
            f"Cannot convert image {path} of mode {image.mode!r} to {format}: {error}"
        ) from error
    pixels = np.asarray(image)
    if format == "L":
        return pixels[:, :, None]
    return np.ascontiguousarray(pixels[:, :, ::-1]) if format == "BGR" else pixels
