"""
Convert a Focus-DETR checkpoint trained with detrex (``projects/focus_detr``) to this package.

    python -m focus_detr.tools.convert_detrex INPUT.pth OUTPUT.pth [--full-unpickle] [--overwrite]

INPUT is what detectron2's checkpointer writes (``{"model": state_dict, ...}``) or a bare state
dict. OUTPUT is ``{"model": state_dict}`` with this package's names, for
``train.init_checkpoint`` or ``DetectionCheckpointer(model).load(OUTPUT)``: build the model from
the config of the same backbone (R50, R101, Swin-T/S/B/L). The modules detrex stores under
several names are checked to be identical and stored once; an unknown or missing key, or a shape
that does not fit the others, stops the conversion with the key's name.
"""

import argparse
import sys
from typing import Optional, Sequence

import torch

from focus_detr.detrex import convert_detrex_state_dict, load_state_dict
from focus_detr.utils.output_files import OutputPathError, check_output_file


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m focus_detr.tools.convert_detrex",
        description=__doc__.strip().splitlines()[0],
    )
    parser.add_argument("input", help="detrex checkpoint (.pth): {'model': ...} or a state dict")
    parser.add_argument("output", help="converted checkpoint to write: {'model': state dict}")
    parser.add_argument(
        "--full-unpickle",
        action="store_true",
        help="load INPUT with full pickle support (runs code from the file: trusted files only)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace OUTPUT when it exists or is INPUT (never done without this flag)",
    )
    args = parser.parse_args(argv)
    try:
        check_output_file(args.output, inputs=(args.input,), overwrite=args.overwrite)
        state_dict = load_state_dict(args.input, full_unpickle=args.full_unpickle)
        converted = convert_detrex_state_dict(state_dict)
    except (ValueError, OutputPathError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    torch.save({"model": converted}, args.output)
    print(
        f"{args.input}: {len(state_dict)} detrex tensors -> {len(converted)} tensors "
        f"({len(state_dict) - len(converted)} shared copies merged) in {args.output}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
