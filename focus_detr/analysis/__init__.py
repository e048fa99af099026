"""
The analysis of ``python -m focus_detr.tools.analyze``: configs and models, inputs, parameter and
FLOP counts per part, latency and peak memory, token statistics, AP evaluation, the keep-ratio
sweep and the report.
"""

from .counts import FlopCount, count_flops, count_flops_per_image, count_parameters
from .evaluation import evaluate_box_ap
from .inputs import dataset_inputs, random_inputs
from .measure import measure_latency, measure_peak_memory
from .models import AnalysisError, AnalyzedConfig, load_analyzed_configs
from .runner import AnalysisSettings, analyze_config, baseline_ratios
from .tokens import TokenStatistics, collect_token_statistics

__all__ = [
    "AnalysisError",
    "AnalysisSettings",
    "AnalyzedConfig",
    "FlopCount",
    "TokenStatistics",
    "analyze_config",
    "baseline_ratios",
    "collect_token_statistics",
    "count_flops",
    "count_flops_per_image",
    "count_parameters",
    "dataset_inputs",
    "evaluate_box_ap",
    "load_analyzed_configs",
    "measure_latency",
    "measure_peak_memory",
    "random_inputs",
]
