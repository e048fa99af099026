"""The demo loop: predict every image, write its pictures."""

import os
from typing import Callable, List, Optional, Sequence

from focus_detr.data.images import ImageReadError, read_image
from focus_detr.utils.output_files import OutputPathError, check_not_an_input

from .drawing import draw_predictions, draw_token_selection, save_png
from .inputs import DemoInputError, output_names
from .predictor import FocusDETRPredictor

__all__ = ["run_demo"]


def run_demo(
    predictor: FocusDETRPredictor,
    image_files: Sequence[str],
    *,
    output_dir: str,
    metadata=None,
    score_threshold: float = 0.3,
    log: Optional[Callable[[str], None]] = print,
) -> List[str]:
    """
    For every image write ``<name>_predictions.png`` (detections with a score of at least
    ``score_threshold``) and, when the encoder has a token selector, ``<name>_tokens.png``
    (per-level foreground probabilities and the tokens kept by every encoder layer). Pictures of
    an earlier run of the same images are replaced; an input image never is (checked before
    anything is written). An image that cannot be read, or that the model fails on, stops the
    demo with its path.

    Args:
        predictor: the loaded model.
        image_files: image paths; ``<name>`` is the file stem, made unique.
        output_dir: created if needed.
        metadata: detectron2 ``Metadata`` with ``thing_classes`` for the labels.
        score_threshold: in [0, 1].
        log: called with every path written and with notes; None for silence.

    Returns:
        The paths written, in order.
    """
    if not 0.0 <= score_threshold <= 1.0:
        raise DemoInputError(f"score threshold must be in [0, 1], got {score_threshold}")
    if not image_files:
        raise DemoInputError("no input images")
    log = log or (lambda message: None)
    names = output_names(image_files)
    for name in names:
        for kind in ("predictions", "tokens"):
            try:
                check_not_an_input(
                    os.path.join(output_dir, f"{name}_{kind}.png"),
                    image_files,
                    hint="choose another --output folder",
                )
            except OutputPathError as error:
                raise DemoInputError(str(error)) from error
    os.makedirs(output_dir, exist_ok=True)
    written: List[str] = []
    noted_no_selector = False
    for path, name in zip(image_files, names):
        try:
            image = read_image(path, format=predictor.input_format)
        except ImageReadError as error:
            raise DemoInputError(str(error)) from error
        try:
            prediction = predictor(image)
        except Exception as error:
            raise DemoInputError(
                f"the model failed on image {path}: {type(error).__name__}: {error}"
            ) from error

        predictions_file = os.path.join(output_dir, f"{name}_predictions.png")
        picture = draw_predictions(
            prediction.image_rgb,
            prediction.instances,
            metadata=metadata,
            score_threshold=score_threshold,
        )
        save_png(picture, predictions_file)
        written.append(predictions_file)
        log(predictions_file)

        if prediction.tokens.foreground_logits is None:
            if not noted_no_selector:
                log("note: the encoder has no token selector; no token pictures are written")
                noted_no_selector = True
            continue
        tokens_file = os.path.join(output_dir, f"{name}_tokens.png")
        draw_token_selection(
            prediction.image_rgb, prediction.tokens, tokens_file, title=os.path.basename(path)
        )
        written.append(tokens_file)
        log(tokens_file)
    return written
