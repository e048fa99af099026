"""`python -m focus_detr.tools.benchmark_msda` runs end to end (on tiny levels here)."""

import json

from focus_detr.layers.ms_deform_attn_op import compiled_kernel_available
from focus_detr.tools import benchmark_msda


def test_benchmark_runs_on_tiny_levels(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(benchmark_msda, "LEVELS", ((5, 7), (3, 4)))
    path = tmp_path / "msda.json"
    assert benchmark_msda.main(["--repeats", "1", "--warmup", "0", "--json", str(path)]) == 0
    table = capsys.readouterr().out
    report = json.loads(path.read_text())
    results = report["results"]
    assert report["problem"]["queries"] == 5 * 7 + 3 * 4
    for name in ("reference", "key-aware"):
        assert set(results[name]) == {"forward_ms", "forward_backward_ms"}, name
        assert name in table
    if compiled_kernel_available("cpu"):
        assert report["max_abs_difference_compiled_vs_reference"] < 1e-4
        assert set(report["ratios"]) >= {"reference/compiled", "key-aware/compiled"}
    else:
        assert results["compiled"] == "not built"
