"""Drawing primitives of the synthetic shapes dataset: object masks, colours, clutter.

Every function takes an explicit ``numpy.random.Generator`` and draws with Pillow, so the output
depends on the generator state only (no global random state), which keeps generation
deterministic by seed.
"""

import colorsys
from typing import Tuple

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "CLASS_NAMES",
    "CLASS_HUES",
    "render_shape_mask",
    "sample_object_colour",
    "draw_background",
    "add_sensor_noise",
]

# One shape per class, each with its own colour family (hue centre in [0, 1)), so that both the
# outline and the colour identify the class and a small detector learns it in minutes.
CLASS_NAMES = ("circle", "square", "triangle", "cross", "ring", "diamond")
CLASS_HUES = (0.0, 0.62, 0.33, 0.13, 0.83, 0.5)  # red, blue, green, amber, magenta, cyan

# Relative thickness of the cross arms and of the ring band, as fractions of the object size.
_CROSS_ARM_RANGE = (0.26, 0.38)
_RING_BAND_RANGE = (0.22, 0.34)


def _hsv_to_rgb(hue: float, saturation: float, value: float) -> np.ndarray:
    red, green, blue = colorsys.hsv_to_rgb(hue % 1.0, saturation, value)
    return np.array([red, green, blue], dtype=np.float32) * 255.0


def render_shape_mask(
    class_index: int, width: int, height: int, rng: np.random.Generator
) -> np.ndarray:
    """
    Draw the full (unoccluded) silhouette of one object filling a ``width`` x ``height`` box.

    Args:
        class_index: index into :data:`CLASS_NAMES`.
        width, height: box size in pixels, both >= 2.
        rng: source of the per-object variation (triangle orientation, arm and band thickness).

    Returns:
        bool array of shape (height, width); True where the object covers the pixel.
    """
    if not 0 <= class_index < len(CLASS_NAMES):
        raise ValueError(f"class_index must be in [0, {len(CLASS_NAMES)}), got {class_index}")
    if width < 2 or height < 2:
        raise ValueError(f"width and height must be >= 2, got width={width}, height={height}")
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    right, bottom = width - 1, height - 1
    name = CLASS_NAMES[class_index]
    if name == "circle":
        draw.ellipse((0, 0, right, bottom), fill=255)
    elif name == "square":
        draw.rectangle((0, 0, right, bottom), fill=255)
    elif name == "triangle":
        # Pointing up or down: the orientation varies, the box stays the full object box.
        if rng.random() < 0.5:
            draw.polygon([(0, bottom), (right / 2, 0), (right, bottom)], fill=255)
        else:
            draw.polygon([(0, 0), (right, 0), (right / 2, bottom)], fill=255)
    elif name == "cross":
        arm = rng.uniform(*_CROSS_ARM_RANGE)
        half_w, half_h = max(width * arm / 2, 0.5), max(height * arm / 2, 0.5)
        draw.rectangle((0, bottom / 2 - half_h, right, bottom / 2 + half_h), fill=255)
        draw.rectangle((right / 2 - half_w, 0, right / 2 + half_w, bottom), fill=255)
    elif name == "ring":
        draw.ellipse((0, 0, right, bottom), fill=255)
        band = rng.uniform(*_RING_BAND_RANGE)
        inset_x, inset_y = width * band / 2, height * band / 2
        if min(width, height) >= 8:  # a smaller ring has no room for a visible hole
            draw.ellipse((inset_x, inset_y, right - inset_x, bottom - inset_y), fill=0)
    else:  # diamond
        draw.polygon(
            [(right / 2, 0), (right, bottom / 2), (right / 2, bottom), (0, bottom / 2)], 255
        )
    return np.asarray(canvas) > 0


def sample_object_colour(class_index: int, rng: np.random.Generator) -> np.ndarray:
    """
    A shade of the class colour family: hue within +-0.03 of the class hue, saturated and
    bright, so objects stand out from the greyish background and from the distractor strokes.

    Returns:
        float32 array (3,) of RGB values in [0, 255].
    """
    hue = CLASS_HUES[class_index] + rng.uniform(-0.03, 0.03)
    return _hsv_to_rgb(hue, rng.uniform(0.65, 1.0), rng.uniform(0.6, 1.0))


def _texture(
    height: int, width: int, rng: np.random.Generator, *, cell: int, amplitude: float
) -> np.ndarray:
    """
    Smooth random field (height, width, 3) around 0, about one blob per ``cell`` pixels. Mostly
    luminance with a weaker colour part, so the background stays greyish next to the objects.
    """
    grid_shape = (height // cell + 2, width // cell + 2)
    grid = rng.normal(0.0, 1.0, size=grid_shape + (1,)) + rng.normal(0.0, 0.3, grid_shape + (3,))
    grid = np.clip(grid * amplitude + 128.0, 0, 255).astype(np.uint8)
    smooth = Image.fromarray(grid).resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(smooth, dtype=np.float32) - 128.0


def draw_background(
    height: int, width: int, rng: np.random.Generator, *, num_strokes: Tuple[int, int] = (2, 6)
) -> np.ndarray:
    """
    Clutter: a low-saturation base colour, a smooth random texture at two scales, and a few
    distractor lines and arcs. The strokes are thin and weakly coloured, so they are clutter
    a detector must learn to ignore, never something that looks like an object.

    Args:
        height, width: image size in pixels.
        rng: random generator.
        num_strokes: inclusive range of the number of distractor strokes.

    Returns:
        float32 array (height, width, 3), RGB in [0, 255].
    """
    base = _hsv_to_rgb(rng.random(), rng.uniform(0.0, 0.25), rng.uniform(0.3, 0.75))
    coarse = _texture(height, width, rng, cell=48, amplitude=25.0)
    pixels = base + coarse + _texture(height, width, rng, cell=6, amplitude=10.0)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(num_strokes[0], num_strokes[1] + 1))):
        colour = tuple(
            int(c) for c in _hsv_to_rgb(rng.random(), rng.uniform(0, 0.45), rng.uniform(0.2, 0.9))
        )
        stroke_width = int(rng.integers(1, 4))
        x0, x1 = rng.uniform(0, width, size=2)
        y0, y1 = rng.uniform(0, height, size=2)
        if rng.random() < 0.6:
            draw.line((x0, y0, x1, y1), fill=colour, width=stroke_width)
        else:
            left, right = sorted((x0, x1))
            top, bottom = sorted((y0, y1))
            start = float(rng.uniform(0, 360))
            end = start + float(rng.uniform(40, 200))  # an open arc, so it is never a ring
            draw.arc(
                (left, top, right + 1, bottom + 1), start, end, fill=colour, width=stroke_width
            )
    return np.asarray(image, dtype=np.float32)


def add_sensor_noise(pixels: np.ndarray, rng: np.random.Generator, *, std: float) -> np.ndarray:
    """Per-pixel Gaussian noise over the whole image; returns uint8 (height, width, 3)."""
    noisy = pixels + rng.normal(0.0, std, size=pixels.shape).astype(np.float32)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)
