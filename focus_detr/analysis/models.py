"""The configs an analysis compares: loading, naming, weights and the model parts counted."""

import os
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.utils.registry import locate
from omegaconf import OmegaConf

from focus_detr.engine import apply_overrides, load_for_eval
from focus_detr.modeling import DETREncoder

__all__ = [
    "MODEL_PARTS",
    "OTHER_PART",
    "AnalysisError",
    "AnalyzedConfig",
    "build_analysis_model",
    "encoder_class",
    "encoder_keep_ratio",
    "has_keep_ratio",
    "load_analyzed_configs",
    "resolve_name",
]

# Children of TwoStageDETR counted separately (parameters, FLOPs), in the order of a forward.
# "query_selection" holds the two-stage heads; the decoder holds its own class and box heads.
MODEL_PARTS = ("backbone", "neck", "encoder", "query_selection", "decoder")
# Everything else: level embedding, denoising embedding, position embedding, pre- and
# post-processing.
OTHER_PART = "other"

# ``--weights`` values meaning "keep the random initial weights"
RANDOM_WEIGHTS = ("", "none")


class AnalysisError(ValueError):
    """Bad input to the analysis, with a message naming the offending value."""


@dataclass
class AnalyzedConfig:
    """
    One config of the comparison.

    Attributes:
        name: label in tables and plots (unique in a run).
        config_file: the LazyConfig file.
        weights: checkpoint to load, or None for the random initial weights.
        cfg: the loaded config with the run's overrides applied.
        seed_weights: every checkpoint given for the config (``weights`` first) when several
            runs of it (e.g. training seeds) are compared; empty otherwise.
    """

    name: str
    config_file: str
    weights: Optional[str]
    cfg: object
    seed_weights: Tuple[str, ...] = ()


def _default_name(config_file: str) -> str:
    return os.path.splitext(os.path.basename(config_file))[0]


def load_analyzed_configs(
    config_files: Sequence[str],
    *,
    weights: Optional[Sequence[str]] = None,
    names: Optional[Sequence[str]] = None,
    overrides: Sequence[str] = (),
) -> List[AnalyzedConfig]:
    """
    Load every config with the same overrides and pair it with its weights and name.

    Args:
        config_files: LazyConfig files (.py or .yaml).
        weights: one checkpoint per config, in the same order; "" or "none" for random weights;
            several checkpoints of one config (runs with other seeds) separated by commas: the
            first is analyzed, all are evaluated for AP. None: random weights for all.
        names: one label per config; default: the file name without extension.
        overrides: ``key=value`` config overrides applied to every config.

    Raises:
        AnalysisError: a missing config or weights file, or counts that do not match.
    """
    config_files = list(config_files)
    if not config_files:
        raise AnalysisError("need at least one config file")
    weights = [""] * len(config_files) if weights is None else list(weights)
    if len(weights) != len(config_files):
        raise AnalysisError(
            f"--weights gives {len(weights)} value(s) {weights} for {len(config_files)} config "
            f"file(s) {config_files}: give one per config, in the same order ('' or 'none' for "
            "random weights)"
        )
    names = [_default_name(path) for path in config_files] if names is None else list(names)
    if len(names) != len(config_files):
        raise AnalysisError(
            f"--names gives {len(names)} name(s) {names} for {len(config_files)} config file(s)"
        )
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise AnalysisError(f"names must be unique, {duplicates} repeat: pass --names")
    configs = []
    for name, config_file, path in zip(names, config_files, weights):
        if not os.path.isfile(config_file):
            raise AnalysisError(f"config file not found: {config_file}")
        runs = tuple(part.strip() for part in path.split(",")) if "," in path else ()
        if any(run.lower() in RANDOM_WEIGHTS for run in runs):
            raise AnalysisError(f"weights of {name}: an empty entry in the list {path!r}")
        path = None if path.strip().lower() in RANDOM_WEIGHTS else (runs[0] if runs else path)
        for file in runs or ([path] if path is not None else []):
            if "://" not in file and not os.path.isfile(file):
                raise AnalysisError(f"weights file of {name} not found: {file}")
        cfg = apply_overrides(LazyConfig.load(config_file), list(overrides))
        configs.append(AnalyzedConfig(name, config_file, path, cfg, seed_weights=runs))
    return configs


def resolve_name(name: str, names: Sequence[str], *, option: str = "--baseline") -> str:
    """
    ``name`` if it is one of ``names``, else the only name that starts with it (``dino`` for
    ``dino_r50_4scale_12ep``).

    Raises:
        AnalysisError: no name or several names match.
    """
    if name in names:
        return name
    matches = [candidate for candidate in names if candidate.startswith(name)]
    if len(matches) != 1:
        found = "none" if not matches else f"several: {matches}"
        raise AnalysisError(f"{option} {name!r} must name one config of {list(names)}; {found}")
    return matches[0]


def build_analysis_model(config: AnalyzedConfig, device: torch.device) -> torch.nn.Module:
    """``cfg.model`` on ``device`` in eval mode, with the config's weights (EMA when saved)."""
    model = instantiate(config.cfg.model).to(device)
    if config.weights is not None:
        load_for_eval(config.cfg, model, config.weights)
    return model.eval()


def encoder_class(cfg) -> type:
    """The class of ``cfg.model.encoder`` (its LazyCall target), without building the model."""
    target = OmegaConf.select(cfg, "model.encoder._target_", default=None)
    cls = locate(target) if isinstance(target, str) else target
    if not isinstance(cls, type):
        raise AnalysisError(f"model.encoder of the config is no LazyCall of a class: {target!r}")
    return cls


def has_keep_ratio(cls: type) -> bool:
    """Whether encoders of class ``cls`` have a ``keep_ratio`` that may be changed after
    training, as the encoder interface declares it (``DETREncoder.has_keep_ratio``)."""
    return issubclass(cls, DETREncoder) and cls.has_keep_ratio


def encoder_keep_ratio(model: torch.nn.Module) -> Optional[float]:
    """The encoder's keep ratio when it has one that may change after training, else None."""
    return model.encoder.keep_ratio if has_keep_ratio(type(model.encoder)) else None
