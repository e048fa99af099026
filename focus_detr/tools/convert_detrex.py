"""
Convert a Focus-DETR checkpoint trained with detrex (``projects/focus_detr``) to this package.

    python -m focus_detr.tools.convert_detrex INPUT.pth OUTPUT.pth [--full-unpickle] [--overwrite]

INPUT is what detectron2's checkpointer writes (``{"model": state_dict, ...}``) or a bare state
dict. OUTPUT is ``{"model": state_dict}`` with this package's names, for
``train.init_checkpoint`` or ``DetectionCheckpointer(model).load(OUTPUT)``; build the model
from the config of the same backbone (R50, R101: detectron2 ``ResNet``; Swin-T/S/B/L: detectron2
``SwinTransformer``, whose names both packages share, so backbone keys are kept as they are).

detrex keeps some modules under several names: every head of ``class_embed`` / ``bbox_embed``
also under ``transformer.decoder``, and the two-stage class head also as
``enhance_MCSP_layerlist.{l}`` and ``transformer.encoder.enhance_MCSP.{l}`` (the multi-category
score predictor). Every copy must be identical (else the checkpoint is not one this model can
reproduce) and is stored once. Unknown keys, missing parts and shapes that do not fit the others
(all sizes are read from the checkpoint: channels, classes, layers, levels, queries) stop the
conversion with a ``ValueError`` naming the key.
"""

import argparse
import pickle
import re
import sys
from collections import defaultdict
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from ..utils.output_files import OutputPathError, check_output_file
from .detrex_names import BACKBONE_PATTERNS, DECODER_LAYERS, NAME_TABLE

__all__ = ["convert_detrex_state_dict", "load_state_dict", "main"]

_DIM = re.compile(r"^(\d*)([A-Z][A-Z0-9]*)([+-]\d+)?$")


def _source_regex(source: str) -> "re.Pattern":
    return re.compile(re.escape(source).replace(re.escape("{i}"), r"(?P<i>\d+)"))


_COMPILED = tuple(_source_regex(entry.source) for entry in NAME_TABLE)


class _Dims:
    """The named sizes of a checkpoint, each bound by the first tensor that uses it."""

    def __init__(self):
        self.values: Dict[str, int] = {}
        self.sources: Dict[str, str] = {}

    def check(self, key: str, shape: Sequence[int], spec: Sequence[Union[int, str]]) -> None:
        """ValueError naming ``key`` unless ``shape`` fits ``spec`` and the sizes bound so far."""
        if len(shape) != len(spec) or not all(map(self._fits, shape, spec, [key] * len(spec))):
            bound = ", ".join(f"{n}={v} (from {self.sources[n]})" for n, v in self.values.items())
            raise ValueError(
                f"{key} has shape {list(shape)}, which does not fit {list(spec)}; sizes read "
                f"so far: {bound or 'none'}"
            )

    def _fits(self, size: int, dim: Union[int, str], key: str) -> bool:
        if dim == "*":
            return True
        if isinstance(dim, int):
            return size == dim
        coefficient, name, offset = _DIM.fullmatch(dim).groups()
        value, remainder = divmod(size - int(offset or 0), int(coefficient or 1))
        if remainder != 0 or value <= 0:
            return False
        if name not in self.values:
            self.values[name], self.sources[name] = value, key
        return self.values[name] == value


def _head_names(index: int, num_decoder_layers: int, key: str) -> Dict[str, str]:
    if index < num_decoder_layers:
        return {
            "class_head": f"decoder.class_heads.{index}",
            "box_head": f"decoder.box_heads.{index}",
        }
    if index == num_decoder_layers:
        return {"class_head": "query_selection.class_head", "box_head": "query_selection.box_head"}
    raise ValueError(
        f"{key}: detrex has one head per decoder layer plus the two-stage head, i.e. indices "
        f"0..{num_decoder_layers} for {num_decoder_layers} decoder layers, got {index}"
    )


def _match_keys(state_dict: Mapping[str, torch.Tensor]) -> List[Tuple[int, str, Optional[int]]]:
    """(table index, key, index ``{i}`` or None) of every non-backbone key, in table order."""
    matched, unknown = [], []
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{key} is a {type(value).__name__}, not a tensor")
        if key.startswith("backbone."):
            if not any(pattern.fullmatch(key) for pattern in BACKBONE_PATTERNS):
                unknown.append(key)
            continue
        for index, regex in enumerate(_COMPILED):
            match = regex.fullmatch(key)
            if match is not None:
                layer = int(match["i"]) if "i" in regex.groupindex else None
                matched.append((index, key, layer))
                break
        else:
            unknown.append(key)
    if unknown:
        more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
        raise ValueError(
            f"unknown keys for a detrex Focus-DETR with a ResNet or Swin backbone: "
            f"{unknown[:10]}{more}"
        )
    return sorted(matched, key=lambda item: item[0])


def _check_complete(matched: List[Tuple[int, str, Optional[int]]]) -> Dict[str, List[int]]:
    """ValueError listing missing keys; returns the indices of every ``{i}`` group."""
    seen: Dict[int, set] = defaultdict(set)
    for index, _, layer in matched:
        seen[index].add(layer)
    groups: Dict[str, set] = defaultdict(set)
    for index, entry in enumerate(NAME_TABLE):
        if entry.kind != "alias" and "{i}" in entry.source:
            groups[entry.source.split("{i}")[0]] |= seen[index]
    missing = []
    for index, entry in enumerate(NAME_TABLE):
        if entry.kind == "alias":
            continue
        if "{i}" not in entry.source:
            missing += [] if seen[index] else [entry.source]
            continue
        expected = groups[entry.source.split("{i}")[0]]
        if not expected and entry.kind == "required":
            expected = {0}
        missing += [entry.source.format(i=i) for i in sorted(expected - seen[index])]
    if missing:
        more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise ValueError(f"missing keys of a detrex Focus-DETR: {missing[:10]}{more}")
    for group, indices in groups.items():
        if indices != set(range(len(indices))):
            raise ValueError(
                f"{group}{{i}}: indices {sorted(indices)} are not 0..{len(indices) - 1}"
            )
    return {group: sorted(indices) for group, indices in groups.items()}


def convert_detrex_state_dict(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """
    Args:
        state_dict: the model state dict of a detrex ``FOCUS_DETR`` (R50, R101 or Swin).

    Returns:
        A new state dict with this package's names (backbone keys unchanged), every module
        that detrex stores under several names stored once; same tensors, same dtypes.

    Raises:
        ValueError: naming the first offending key: unknown, missing, a shape that does not fit
            the sizes of the other tensors, a non-tensor value, or two detrex names of one module
            whose values differ.
    """
    matched = _match_keys(state_dict)
    groups = _check_complete(matched)
    num_decoder_layers = len(groups[DECODER_LAYERS.split("{i}")[0]])
    for heads in ("class_embed.", "bbox_embed."):
        if len(groups[heads]) != num_decoder_layers + 1:
            raise ValueError(
                f"{heads}{{i}} has {len(groups[heads])} heads, expected one per decoder layer "
                f"({num_decoder_layers}) plus the two-stage head"
            )
    converted = {key: value for key, value in state_dict.items() if key.startswith("backbone.")}
    origin: Dict[str, str] = {}
    dims = _Dims()
    for index, key, layer in matched:
        entry, tensor = NAME_TABLE[index], state_dict[key]
        dims.check(key, tuple(tensor.shape), entry.shape)
        fields = {} if layer is None else {"i": layer}
        if "_head}" in entry.target:
            fields.update(_head_names(layer, num_decoder_layers, key))
        target = entry.target.format(**fields)
        if target not in converted:
            converted[target], origin[target] = tensor, key
        elif not _identical(converted[target], tensor):
            raise ValueError(
                f"{key} differs from {origin[target]}: detrex shares one module under both names "
                f"and this package stores it once as {target}; the checkpoint is inconsistent"
            )
    return converted


def _identical(first: torch.Tensor, second: torch.Tensor) -> bool:
    return (
        first.shape == second.shape and first.dtype == second.dtype and torch.equal(first, second)
    )


def load_state_dict(path: str, *, full_unpickle: bool = False) -> Mapping[str, torch.Tensor]:
    """
    The model state dict of a detectron2 checkpoint (``{"model": ...}``) or a bare state dict.

    Args:
        path: a ``torch.save`` file.
        full_unpickle: allow arbitrary pickled objects (only for files you trust); default:
            tensors and plain containers only.
    """
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=not full_unpickle)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"{path} holds objects other than tensors and containers ({error}); if you trust "
            f"the file, convert it with --full-unpickle"
        ) from error
    if isinstance(checkpoint, Mapping) and isinstance(checkpoint.get("model"), Mapping):
        return checkpoint["model"]
    if isinstance(checkpoint, Mapping):
        return checkpoint
    raise ValueError(
        f"{path} holds a {type(checkpoint).__name__}, expected a state dict or a "
        f"{{'model': state dict}} checkpoint"
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m focus_detr.tools.convert_detrex",
        description="Convert a detrex Focus-DETR checkpoint to focus_detr parameter names.",
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
