"""Analyze one config (costs, speed, memory, tokens, keep-ratio sweep) and compare configs."""

import gc
import logging
from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .counts import count_flops_per_image, count_parameters
from .evaluation import evaluate_box_ap
from .inputs import dataset_inputs, random_inputs
from .measure import (
    cpu_peak_memory_supported,
    measure_cpu_peak_memory,
    measure_latency,
    measure_peak_memory,
)
from .models import (
    AnalysisError,
    AnalyzedConfig,
    build_analysis_model,
    encoder_class,
    encoder_keep_ratio,
    has_keep_ratio,
    resolve_name,
)
from .tokens import collect_token_statistics

__all__ = ["AnalysisSettings", "analyze_config", "baseline_ratios", "check_evaluation"]
__all__ += ["check_sweep"]
__all__ += ["shared_foreground_ranges"]

logger = logging.getLogger(__name__)
_GIGA = 1e9


@dataclass
class AnalysisSettings:
    """
    What to measure and on which inputs.

    Attributes:
        size: (H, W) of the random input image; None with ``dataset``.
        dataset: registered dataset whose first ``num_images`` images are the inputs.
        num_images: images of ``dataset`` (None: 1).
        eval_images: test images the sweep evaluates AP on (None: the whole test set).
        devices: devices timed (the first also runs the token statistics and the sweep).
        warmup, iters: untimed and timed passes over the inputs.
        memory: measure the peak memory.
        sweep_keep_ratios: keep ratios of the accuracy-for-speed sweep (None: no sweep).
        overrides: the config overrides (for the CPU memory subprocess).
        foreground_ranges: the object-size ranges of the foreground tokens for the token
            quality of EVERY config (one definition for a like-for-like comparison); None: each
            encoder's own (Focus's ``foreground_loss.ranges``, else the default ranges).
    """

    size: Optional[Tuple[int, int]] = None
    dataset: Optional[str] = None
    num_images: Optional[int] = None
    eval_images: Optional[int] = None
    devices: List[torch.device] = field(default_factory=lambda: [torch.device("cpu")])
    warmup: int = 2
    iters: int = 5
    memory: bool = True
    sweep_keep_ratios: Optional[List[float]] = None
    overrides: Sequence[str] = ()
    foreground_ranges: Optional[List[Tuple[float, float]]] = None

    def inputs(self, cfg) -> Tuple[List[Dict], str]:
        """The inputs of a config, and their description."""
        if self.dataset is not None:
            return dataset_inputs(cfg, self.dataset, self.num_images or 1)
        return random_inputs(self.size or (800, 1333))


def shared_foreground_ranges(configs: Sequence[AnalyzedConfig], name: Optional[str] = None):
    """
    One definition of the foreground tokens for the token quality of every config: the ranges of
    the config ``name``, else of the first config whose encoder has foreground ranges (Focus);
    None when no config has them (each encoder then uses the default ranges).
    """
    candidates = configs
    if name is not None:
        names, option = [config.name for config in configs], "--foreground-ranges-of"
        candidates = [configs[names.index(resolve_name(name, names, option=option))]]
    for config in candidates:
        model = build_analysis_model(config, torch.device("cpu"))
        ranges = getattr(getattr(model.encoder, "foreground_loss", None), "ranges", None)
        if ranges is not None:
            return [tuple(pair) for pair in ranges]
        if name is not None:
            raise AnalysisError(
                f"--foreground-ranges-of {name}: its encoder has no foreground ranges"
            )
    return None


def check_evaluation(configs: Sequence[AnalyzedConfig], option: str) -> None:
    """AnalysisError unless every config has a test loader and an evaluator (``option`` needs
    them to evaluate AP)."""
    for config in configs:
        dataloader = getattr(config.cfg, "dataloader", None) or {}
        if "test" not in dataloader or "evaluator" not in dataloader:
            raise AnalysisError(
                f"{option} evaluates AP with the config's dataloader.test and "
                f"dataloader.evaluator; {config.name} ({config.config_file}) lacks them"
            )


def check_sweep(configs: Sequence[AnalyzedConfig]) -> None:
    """AnalysisError unless every config has a test loader and an evaluator and the encoder
    of some config has a keep ratio (checked on the configs, before any model is built)."""
    check_evaluation(configs, "--sweep-keep-ratio")
    classes = {config.name: encoder_class(config.cfg) for config in configs}
    if not any(has_keep_ratio(cls) for cls in classes.values()):
        listed = ", ".join(f"{name} ({cls.__name__})" for name, cls in classes.items())
        raise AnalysisError(
            "--sweep-keep-ratio needs an encoder whose keep ratio can change at inference "
            f"(FocusEncoder, SparseEncoder); none of {listed} has one"
        )


def _gflops(parts: Dict[str, float]) -> Dict[str, float]:
    return {key: value / _GIGA for key, value in parts.items()}


def _measure_speed(model, inputs, settings: AnalysisSettings, device) -> Dict[str, float]:
    model.to(device)
    return measure_latency(model, inputs, warmup=settings.warmup, iters=settings.iters)


def _sweep(config, model, inputs, settings: AnalysisSettings, result) -> List[Dict]:
    """One point per keep ratio (or one point for an encoder without): AP, AP50, GFLOPs,
    latency on the first device."""
    device = settings.devices[0]
    original = encoder_keep_ratio(model)
    values = [None] if original is None else settings.sweep_keep_ratios
    points = []
    for value in values:
        if value is not None:
            model.encoder.keep_ratio = value
            model.to("cpu")
            gflops = _gflops(count_flops_per_image(model, inputs).parts)
            latency = _measure_speed(model, inputs, settings, device)
        else:
            gflops, latency = result["gflops"], result["latency"][str(device)]
        model.to(device)
        logger.info(f"{config.name}: evaluating keep ratio {value}")
        ap = evaluate_box_ap(config.cfg, model, num_images=settings.eval_images)
        points.append(
            {
                "name": config.name,
                "keep_ratio": value,
                **ap,
                "gflops": gflops["total"],
                "encoder_gflops": gflops["encoder"],
                "device": str(device),
                "model_ms": latency["model_ms"],
                "encoder_ms": latency["encoder_ms"],
            }
        )
    if original is not None:
        model.encoder.keep_ratio = original
    return points


def _evaluate_runs(config: AnalyzedConfig, settings: AnalysisSettings) -> Dict[str, List]:
    """AP and AP50 of every checkpoint of ``config.seed_weights`` (the config's test loader and
    evaluator, the first ``settings.eval_images`` images), on the first device."""
    runs: Dict[str, List] = {"weights": list(config.seed_weights), "AP": [], "AP50": []}
    for weights in config.seed_weights:
        run = replace(config, weights=weights)
        model = build_analysis_model(run, settings.devices[0])
        logger.info(f"{config.name}: evaluating {weights}")
        ap = evaluate_box_ap(config.cfg, model, num_images=settings.eval_images)
        runs["AP"].append(ap["AP"])
        runs["AP50"].append(ap["AP50"])
        del model
    return runs


def analyze_config(config: AnalyzedConfig, settings: AnalysisSettings) -> Dict:
    """
    Everything the report shows of one config, JSON-ready: parameters, GFLOPs per part,
    latency and peak memory per device, tokens updated per encoder layer, token quality (with
    dataset inputs), sweep points (with ``settings.sweep_keep_ratios``) and the AP / AP50 of
    every run of ``config.seed_weights``.
    """
    inputs, described = settings.inputs(config.cfg)
    model = build_analysis_model(config, torch.device("cpu"))
    keep_ratio = encoder_keep_ratio(model)
    result: Dict = {
        "name": config.name,
        "config_file": config.config_file,
        "weights": config.weights,
        "encoder": type(model.encoder).__name__,
        "keep_ratio": keep_ratio,
        "input": described,
        "parameters": count_parameters(model),
    }
    logger.info(f"{config.name}: counting FLOPs on {described}")
    flops = count_flops_per_image(model, inputs)
    result["gflops"] = _gflops(flops.parts)
    result["uncounted_ops"] = flops.uncounted_ops
    result["latency"], result["peak_memory_mib"] = {}, {}
    for index, device in enumerate(settings.devices):
        model.to(device)
        if index == 0:
            statistics = collect_token_statistics(model, inputs, settings.foreground_ranges)
            result["tokens"] = statistics.tokens_summary()
            result["token_quality"] = statistics.quality_summary()
        logger.info(f"{config.name}: timing on {device}")
        result["latency"][str(device)] = _measure_speed(model, inputs, settings, device)
        if settings.memory and device.type == "cuda":
            result["peak_memory_mib"][str(device)] = measure_peak_memory(model, inputs)
    if settings.sweep_keep_ratios:
        result["sweep"] = _sweep(config, model, inputs, settings, result)
    if config.seed_weights:
        result["seed_runs"] = _evaluate_runs(config, settings)
    del model
    gc.collect()
    if settings.memory and any(device.type == "cpu" for device in settings.devices):
        if cpu_peak_memory_supported():
            logger.info(f"{config.name}: measuring CPU peak memory in a fresh process")
            result["peak_memory_mib"]["cpu"] = measure_cpu_peak_memory(
                config.config_file,
                weights=config.weights,
                overrides=settings.overrides,
                inputs=inputs,
                threads=torch.get_num_threads(),
            )
        else:
            logger.warning("CPU peak memory needs Linux's /proc/self/clear_refs: not measured")
    return result


def _ratio(value: Optional[float], base: Optional[float]) -> Optional[float]:
    if value is None or base is None or base == 0:
        return None
    return value / base


def baseline_ratios(result: Dict, baseline: Dict) -> Dict[str, Optional[float]]:
    """
    ``result``'s costs divided by ``baseline``'s: parameters, model and encoder GFLOPs, and per
    timed device model and encoder latency and peak memory.
    """
    ratios = {
        "parameters": _ratio(result["parameters"]["total"], baseline["parameters"]["total"]),
        "model_gflops": _ratio(result["gflops"]["total"], baseline["gflops"]["total"]),
        "encoder_gflops": _ratio(result["gflops"]["encoder"], baseline["gflops"]["encoder"]),
    }
    for device, latency in result["latency"].items():
        base = baseline["latency"].get(device, {})
        ratios[f"model_latency_{device}"] = _ratio(latency["model_ms"], base.get("model_ms"))
        ratios[f"encoder_latency_{device}"] = _ratio(latency["encoder_ms"], base.get("encoder_ms"))
    for device, memory in result["peak_memory_mib"].items():
        ratios[f"peak_memory_{device}"] = _ratio(memory, baseline["peak_memory_mib"].get(device))
    return ratios
