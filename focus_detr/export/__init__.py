"""
Export of a two-stage DETR (Focus-DETR) for deployment: ``torch.export`` (.pt2) and ONNX.

:class:`DetectorExportWrapper` turns the detector into ``image (3, H, W) -> boxes (K, 4),
scores (K,), classes (K,)`` for a fixed H x W; :func:`export_torch` and :func:`export_onnx`
write it; ``python -m focus_detr.tools.export`` is the command line. The ONNX translation of the
deformable attention lives in :mod:`focus_detr.export.onnx_msda` (needs onnxscript).
"""

from .compare import DetectionComparison, compare_detections
from .exporters import (
    INPUT_NAME,
    OUTPUT_NAMES,
    count_msda_nodes,
    export_onnx,
    export_onnx_module,
    export_torch,
    run_onnx,
    run_torch_export,
)
from .wrapper import DetectorExportWrapper

__all__ = [
    "INPUT_NAME",
    "OUTPUT_NAMES",
    "DetectionComparison",
    "DetectorExportWrapper",
    "compare_detections",
    "count_msda_nodes",
    "export_onnx",
    "export_onnx_module",
    "export_torch",
    "run_onnx",
    "run_torch_export",
]
