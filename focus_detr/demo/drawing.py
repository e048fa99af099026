"""Pictures of the demo: detections (detectron2 Visualizer) and the token selection."""

import io
from typing import List, Sequence

import matplotlib
import numpy as np
from detectron2.structures import Instances
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from PIL import Image

from .predictor import TokenSelection
from .token_maps import LevelGrid, foreground_maps, kept_token_maps, level_grids

__all__ = ["draw_predictions", "draw_token_selection", "save_png"]

FIGURE_WIDTH_IN = 12.0
DPI = 90
# small images are drawn larger so that the labels stay readable
PREDICTIONS_MIN_LONG_SIDE = 480
# one colour per level (finest first), the matplotlib "tab10" cycle
_LEVEL_COLOURS = matplotlib.colormaps["tab10"].colors


def draw_predictions(
    image_rgb: np.ndarray, instances: Instances, *, metadata=None, score_threshold: float = 0.3
) -> np.ndarray:
    """
    Args:
        image_rgb: (H, W, 3) uint8 RGB image.
        instances: detections in the image's coordinates (pred_boxes, scores, pred_classes).
        metadata: detectron2 ``Metadata`` with ``thing_classes`` (class ids are drawn without).
        score_threshold: detections with a lower score are not drawn.

    Returns:
        (H * s, W * s, 3) uint8 RGB picture, s >= 1 chosen so that the long side is at least
        ``PREDICTIONS_MIN_LONG_SIDE`` pixels (at most 3x) and the labels stay readable.
    """
    try:
        from detectron2.utils.visualizer import Visualizer
    except ModuleNotFoundError as error:  # detectron2's Visualizer imports OpenCV
        raise ModuleNotFoundError(
            f"detectron2's Visualizer needs {error.name}: pip install opencv-python-headless"
        ) from error
    keep = instances[instances.scores >= score_threshold]
    scale = float(np.clip(PREDICTIONS_MIN_LONG_SIDE / max(image_rgb.shape[:2]), 1.0, 3.0))
    visualizer = Visualizer(image_rgb, metadata=metadata, scale=scale)
    return visualizer.draw_instance_predictions(keep).get_image()


def save_png(picture, output_file: str) -> None:
    """
    Save an (H, W, 3) uint8 RGB array or a matplotlib ``Figure`` as a 256-colour PNG: a few
    times smaller than a true-colour one, small enough to commit as documentation.
    """
    if isinstance(picture, Figure):
        buffer = io.BytesIO()
        picture.savefig(buffer, format="png", dpi=DPI)
        buffer.seek(0)
        image = Image.open(buffer).convert("RGB")
    else:
        image = Image.fromarray(np.asarray(picture, dtype=np.uint8))
    image.quantize(256, method=Image.Quantize.FASTOCTREE).save(output_file, optimize=True)


def draw_token_selection(
    image_rgb: np.ndarray, tokens: TokenSelection, output_file: str, *, title: str = ""
) -> None:
    """
    Write a grid figure to ``output_file``: a row with the foreground probability of every
    feature level over the image, and a row with the tokens each encoder layer kept, as dots
    (one colour per level, dot size growing with the stride) over the image.

    Args:
        image_rgb: (H0, W0, 3) uint8 original image in RGB.
        tokens: the encoder's selection; ``foreground_logits`` must not be None.
        output_file: PNG path, written with :func:`save_png`.
        title: figure title.
    """
    if tokens.foreground_logits is None:
        raise ValueError("the encoder has no token selector (foreground_logits is None)")
    grids = level_grids(
        tokens.spatial_shapes, image_size=tokens.image_size, padded_size=tokens.padded_size
    )
    strides = _level_strides(tokens.strides, grids)
    num_layers = len(tokens.layer_indices)
    num_cols = max(len(grids), num_layers, 1)
    num_rows = 2 if num_layers > 0 else 1
    height, width = image_rgb.shape[:2]
    panel_w = 0.88 * FIGURE_WIDTH_IN / num_cols  # less the margins and the colour bar
    # a bare Figure draws with Agg: no pyplot state, no display, whatever the backend setting
    fig = Figure(
        figsize=(FIGURE_WIDTH_IN, num_rows * (panel_w * height / width + 0.6) + 0.4),
        layout="constrained",
    )
    axes = fig.subplots(num_rows, num_cols, squeeze=False)
    if title:
        fig.suptitle(title, fontsize=11)
    # input pixels -> original image pixels (the test transform resized the image)
    scale = (width / tokens.image_size[1], height / tokens.image_size[0])
    _draw_foreground_row(fig, axes[0], image_rgb, tokens, grids, strides, scale)
    if num_layers > 0:
        _draw_layer_row(fig, axes[1], image_rgb, tokens, grids, strides, scale)
    save_png(fig, output_file)


def _draw_foreground_row(fig, axes, image_rgb, tokens, grids, strides, scale) -> None:
    """One panel per level: the foreground probability over the image."""
    height, width = image_rgb.shape[:2]
    heatmap = None
    for level, (grid, probability) in enumerate(
        zip(grids, foreground_maps(tokens.foreground_logits, grids))
    ):
        ax = _image_axes(axes[level], image_rgb)
        heatmap = ax.imshow(
            probability.numpy(),
            cmap="inferno",
            vmin=0.0,
            vmax=1.0,
            alpha=0.6,
            interpolation="nearest",
            extent=(
                0,
                grid.valid_width * grid.stride_x * scale[0],
                grid.valid_height * grid.stride_y * scale[1],
                0,
            ),
        )
        _keep_image_limits(ax, width, height)
        ax.set_title(
            f"foreground, stride {strides[level]} ({grid.valid_height}x{grid.valid_width})",
            fontsize=9,
        )
    for ax in axes[len(grids) :]:
        ax.axis("off")
    fig.colorbar(heatmap, ax=axes[len(grids) - 1], fraction=0.05, pad=0.02)


def _draw_layer_row(fig, axes, image_rgb, tokens, grids, strides, scale) -> None:
    """One panel per encoder layer: a dot on every kept token, one colour per level."""
    height, width = image_rgb.shape[:2]
    num_valid = sum(grid.num_valid for grid in grids)
    # over a dimmed grey image the level colours stay readable whatever the image's colours
    gray = np.repeat(image_rgb.mean(axis=2, keepdims=True) * 0.6, 3, axis=2)
    colours = [_LEVEL_COLOURS[level % len(_LEVEL_COLOURS)] for level in range(len(grids))]
    for layer, (indices, valid) in enumerate(zip(tokens.layer_indices, tokens.layer_valid)):
        ax = _image_axes(axes[layer], gray)
        kept = kept_token_maps(indices, valid, grids)
        for grid, mask, colour in zip(grids, kept, colours):
            rows, cols = np.nonzero(mask.numpy())
            ax.scatter(
                (cols + 0.5) * grid.stride_x * scale[0],
                (rows + 0.5) * grid.stride_y * scale[1],
                s=_marker_size(fig, ax, grid.stride_x * scale[0], width),
                color=colour,
                edgecolors="none",
                alpha=0.9,
            )
        _keep_image_limits(ax, width, height)
        counts = [int(mask.sum()) for mask in kept]
        share = 100.0 * sum(counts) / max(num_valid, 1)
        ax.set_title(f"layer {layer + 1}: {sum(counts)} tokens ({share:.0f}%)", fontsize=9)
        ax.set_xlabel("per level: " + " / ".join(str(count) for count in counts), fontsize=7)
    legend = [
        Line2D([], [], ls="", marker="o", ms=5, color=colour, label=f"stride {stride}")
        for colour, stride in zip(colours, strides)
    ]
    axes[0].legend(handles=legend, loc="lower left", fontsize=6, framealpha=0.7)
    for ax in axes[len(tokens.layer_indices) :]:
        ax.axis("off")


def _level_strides(strides: Sequence[int], grids: Sequence[LevelGrid]) -> List[int]:
    """The model's nominal strides, or the measured ones when the model does not say."""
    if len(strides) == len(grids):
        return [int(s) for s in strides]
    return [int(round(grid.stride_x)) for grid in grids]


def _image_axes(ax, image_rgb: np.ndarray):
    """Show an (H, W, 3) image without ticks."""
    ax.imshow(np.asarray(image_rgb, dtype=np.uint8), interpolation="bilinear")
    ax.set_xticks([])
    ax.set_yticks([])
    return ax


def _keep_image_limits(ax, width: int, height: int) -> None:
    # cells of the last valid row / column may reach past the image: show the image only
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)


def _marker_size(fig, ax, cell_px: float, image_width: int) -> float:
    """Scatter size (points^2) of a dot 0.4 cell wide, 1.5 to 8 points."""
    axes_width_pt = ax.get_position().width * fig.get_figwidth() * 72.0
    diameter = 0.4 * cell_px * axes_width_pt / image_width
    return float(np.clip(diameter, 1.5, 8.0) ** 2)
