"""
What scripts/setup_env.sh finds already installed, checked in one interpreter (importing torch
and detectron2 takes seconds; one process per check made a set-up with nothing to do take 18 s).

    python scripts/check_env.py ROOT [--dev]

Prints one line per component, ``<name> ok [details]`` or ``<name> missing [reason]``:

- ``torch``: torch and torchvision import and torchvision's compiled ``nms`` runs with this
  torch; details: the two versions.
- ``detectron2``: ``detectron2.config``, ``.engine`` and ``.evaluation`` import (``unchecked``
  when torch is missing: detectron2 cannot import without it).
- ``focus_detr``: imported from ROOT (not another checkout or a copy in site-packages) with its
  compiled extension loaded.
- ``devtools`` (with ``--dev``): pytest, black, isort, flake8, onnx, onnxscript, onnxruntime.

Run it from a folder outside ROOT, so that the checkout cannot shadow the installed package.
Exit status 0 whatever it finds; the caller decides what to install.
"""

import argparse
import importlib
import importlib.util
import os
import sys

DEV_TOOLS = ("pytest", "black", "isort", "flake8", "onnx", "onnxscript", "onnxruntime")


def _reason(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}".splitlines()[0][:200]


def check_torch() -> str:
    try:
        import torch
        import torchvision
        from torchvision.ops import nms

        nms(torch.zeros(1, 4), torch.zeros(1), 0.5)
    except Exception as error:  # noqa: B902  (any failure means: reinstall)
        return f"torch missing {_reason(error)}"
    return f"torch ok {torch.__version__} {torchvision.__version__}"


def check_detectron2() -> str:
    try:
        for name in ("detectron2.config", "detectron2.engine", "detectron2.evaluation"):
            importlib.import_module(name)
    except Exception as error:  # noqa: B902
        return f"detectron2 missing {_reason(error)}"
    return "detectron2 ok"


def check_focus_detr(root: str) -> str:
    try:
        import focus_detr
        from focus_detr.layers import extension_available
    except Exception as error:  # noqa: B902
        return f"focus_detr missing {_reason(error)}"
    location = os.path.realpath(focus_detr.__file__)
    if not location.startswith(os.path.realpath(root) + os.sep):
        return f"focus_detr missing imported from {location}, not from {root}"
    if not extension_available():
        return "focus_detr missing the compiled extension does not load"
    return "focus_detr ok"


def check_dev_tools() -> str:
    missing = [name for name in DEV_TOOLS if importlib.util.find_spec(name) is None]
    return f"devtools missing {' '.join(missing)}" if missing else "devtools ok"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("root", help="the focus-detr checkout that must provide focus_detr")
    parser.add_argument("--dev", action="store_true", help="check the test and lint tools too")
    args = parser.parse_args(argv)
    torch_line = check_torch()
    lines = [torch_line]
    if torch_line.startswith("torch ok"):
        lines += [check_detectron2(), check_focus_detr(args.root)]
    else:
        lines += ["detectron2 unchecked torch is missing", "focus_detr unchecked torch is missing"]
    if args.dev:
        lines.append(check_dev_tools())
    print("\n".join(lines), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
