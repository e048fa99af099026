"""
The parts of ``python -m focus_detr.tools.analyze``: configs and models, inputs, parameter and
FLOP counts, latency, peak memory, token statistics, AP evaluation, the keep-ratio sweep and the
report.
"""

from .evaluation import evaluate_box_ap
from .flops import FlopCount, count_flops, count_flops_per_image
from .inputs import dataset_inputs, random_inputs
from .models import AnalysisError, AnalyzedConfig, load_analyzed_configs
from .parameters import count_parameters
from .runner import AnalysisSettings, analyze_config, baseline_ratios
from .timing import Latency, measure_latency
from .tokens import TokenStatistics, collect_token_statistics, foreground_coverage

__all__ = [
    "AnalysisError",
    "AnalysisSettings",
    "AnalyzedConfig",
    "FlopCount",
    "Latency",
    "TokenStatistics",
    "analyze_config",
    "baseline_ratios",
    "collect_token_statistics",
    "count_flops",
    "count_flops_per_image",
    "count_parameters",
    "dataset_inputs",
    "evaluate_box_ap",
    "foreground_coverage",
    "load_analyzed_configs",
    "measure_latency",
    "random_inputs",
]
