"""Write an export wrapper as a ``torch.export`` program (.pt2) or an ONNX model, and run them."""

import logging
import os
from typing import Optional, Sequence, Tuple

import numpy as np
import torch

from ..layers import msda_backend
from ..layers.ms_deform_attn_op import FORWARD_OP
from .wrapper import DetectorExportWrapper

__all__ = [
    "INPUT_NAME",
    "OUTPUT_NAMES",
    "count_msda_nodes",
    "export_onnx",
    "export_onnx_module",
    "export_torch",
    "run_onnx",
    "run_torch_export",
]

INPUT_NAME = "image"
OUTPUT_NAMES = ("boxes", "scores", "classes")

Detections = Tuple[np.ndarray, np.ndarray, np.ndarray]


def count_msda_nodes(program: "torch.export.ExportedProgram") -> int:
    """How many ``focus_detr::ms_deform_attn`` calls the program's graph holds."""
    return sum(
        1
        for node in program.graph.nodes
        if node.op == "call_function" and node.target == FORWARD_OP
    )


def export_torch(
    wrapper: DetectorExportWrapper, image: torch.Tensor, path: str
) -> "torch.export.ExportedProgram":
    """
    ``torch.export`` the wrapper for ``image``'s shape and save it to ``path`` (.pt2). The
    deformable attention stays one ``focus_detr::ms_deform_attn`` node per attention layer
    (its compiled kernels, or its PyTorch implementation, run when the program runs), whatever
    the backend chosen with ``set_msda_backend``.

    Args:
        wrapper: the export wrapper.
        image: (3, H, W) example input (its values do not matter, its shape is fixed).
        path: output file.

    Returns:
        The exported program.
    """
    # the op, not the reference's grid_sample calls (FOCUS_DETR_MSDA_BACKEND=reference)
    with torch.no_grad(), msda_backend("auto"):
        program = torch.export.export(wrapper, (image,), strict=False)
    torch.export.save(program, path)
    return program


def export_onnx(wrapper: DetectorExportWrapper, image: torch.Tensor, path: str) -> None:
    """
    Export the wrapper to ONNX for ``image``'s shape (see :func:`export_onnx_module`): input
    ``image``, outputs ``boxes``, ``scores``, ``classes``.

    Args:
        wrapper: the export wrapper.
        image: (3, H, W) example input (its values do not matter, its shape is fixed).
        path: output .onnx file.
    """
    export_onnx_module(
        wrapper, (image,), path, input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES)
    )


def export_onnx_module(
    module: torch.nn.Module,
    args: Tuple[torch.Tensor, ...],
    path: str,
    *,
    input_names: Sequence[str],
    output_names: Optional[Sequence[str]] = None,
) -> None:
    """
    Export ``module`` to ONNX with the ``torch.export``-based exporter (``dynamo=True``), in
    which ``focus_detr::ms_deform_attn`` becomes standard ONNX operators around ``GridSample``
    (:mod:`focus_detr.export.onnx_msda`); checked with ``onnx.checker`` and saved as one file
    with its weights.

    The exporter's own graph optimisation is replaced by constant folding alone: with
    onnxscript 0.7.2 its rewrite rule that fuses two successive ``Clip`` nodes names the merged
    bounds after the input, and two such fusions on one value (the decoder's ``inverse_sigmoid``
    of the same box, computed twice) leave a ``Clip`` reading a bound that no longer exists,
    which onnxruntime rejects. onnxruntime fuses operators itself when it loads the model.

    Args:
        module: what to export.
        args: example inputs (their shapes are fixed in the model).
        path: output .onnx file.
        input_names, output_names: names of the graph's inputs and outputs.
    """
    import onnx
    import onnxscript.optimizer

    from .onnx_msda import ONNX_OPSET, ONNX_TRANSLATIONS

    # the op, translated below, not the reference (whose level sizes are read with tolist())
    with torch.no_grad(), msda_backend("auto"):
        program = torch.onnx.export(
            module,
            tuple(args),
            dynamo=True,
            opset_version=ONNX_OPSET,
            input_names=list(input_names),
            output_names=None if output_names is None else list(output_names),
            custom_translation_table=ONNX_TRANSLATIONS,
            optimize=False,
            verbose=False,
        )
    folding_logger = logging.getLogger("onnxscript.optimizer")
    level = folding_logger.level
    folding_logger.setLevel(logging.ERROR)  # "Skipping constant folding for op Split ..."
    try:
        # the CastLike of every scalar constant, shapes; then what no output needs
        onnxscript.optimizer.fold_constants(program.model)
        onnxscript.optimizer.remove_unused_nodes(program.model)
    finally:
        folding_logger.setLevel(level)
    program.save(path, external_data=False)
    onnx.checker.check_model(path)


def run_onnx(path: str, image: torch.Tensor) -> Detections:
    """Run an exported ONNX model with onnxruntime on the CPU: (boxes, scores, classes)."""
    import onnxruntime

    if not os.path.isfile(path):
        raise FileNotFoundError(f"ONNX model not found: {path}")
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    array = image.detach().to("cpu", torch.float32).numpy()
    boxes, scores, classes = session.run(list(OUTPUT_NAMES), {INPUT_NAME: array})
    return boxes, scores, classes


def run_torch_export(path: str, image: torch.Tensor) -> Detections:
    """Load a saved ``torch.export`` program and run it: (boxes, scores, classes) as numpy."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"torch.export program not found: {path}")
    module = torch.export.load(path).module()
    with torch.no_grad():
        outputs = module(image)
    return tuple(output.detach().cpu().numpy() for output in outputs)
