"""python -m focus_detr.tools.analyze end to end on two tiny configs (Focus and dense)."""

import json
import os
import types

import helpers
import pytest
import torch
from detectron2.config import LazyConfig, instantiate

from focus_detr.analysis.evaluation import evaluate_box_ap
from focus_detr.analysis.inputs import dataset_inputs, random_inputs
from focus_detr.analysis.models import MODEL_PARTS, build_analysis_model, load_analyzed_configs
from focus_detr.data import CLASS_NAMES
from focus_detr.modeling import compute_foreground_targets
from focus_detr.tools import analyze

pytestmark = pytest.mark.usefixtures("single_thread")

FIELDS = ("parameters", "gflops", "latency", "peak_memory_mib", "tokens", "ratios")


FOCUS_RANGES = [(-1.0, 12.0), (12.0, 24.0), (24.0, 48.0), (48.0, float("inf"))]


def _write_config(folder, names, encoder: str, **encoder_values) -> str:
    """The tiny training config of ``helpers`` with the tiny model of ``encoder`` as YAML."""
    cfg = helpers.tiny_train_config(folder / f"output_{encoder}", names)
    cfg.model = helpers.tiny_model_config(encoder=encoder, num_classes=len(CLASS_NAMES))
    for key, value in encoder_values.items():
        cfg.model.encoder[key] = value
    path = str(folder / f"{encoder}.yaml")
    LazyConfig.save(cfg, path)
    return path


def _save_weights(config_file: str, path: str, seed: int) -> str:
    torch.manual_seed(seed)
    model = instantiate(LazyConfig.load(config_file).model)
    torch.save({"model": model.state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Focus (keep ratio 0.3) and dense tiny configs on a tiny shapes dataset, with weights."""
    folder = tmp_path_factory.mktemp("analyze")
    names = helpers.register_tiny_shapes(folder / "shapes", f"test_analyze_{os.getpid()}")
    # foreground ranges other than the defaults: the token quality of every config uses them
    focus = _write_config(folder, names, "focus", keep_ratio=0.3, foreground_ranges=FOCUS_RANGES)
    dense = _write_config(folder, names, "dense")
    weights = [
        _save_weights(focus, str(folder / "focus.pth"), 0),
        _save_weights(dense, str(folder / "dense.pth"), 1),
    ]
    return types.SimpleNamespace(
        folder=folder, names=names, configs=[focus, dense], weights=weights
    )


def _run(argv, capsys):
    assert analyze.main([str(arg) for arg in argv]) == 0
    return capsys.readouterr().out


@pytest.fixture(scope="module")
def fixed_size_report(tiny, tmp_path_factory):
    """The analysis of both configs on a random 96x128 image with a baseline (and memory)."""
    output = tmp_path_factory.mktemp("fixed")
    argv = ["--config-file", *tiny.configs, "--names", "focus", "dense", "--size", 96, 128]
    argv += ["--threads", 1, "--warmup", 1, "--iters", 2, "--device", "cpu"]
    argv += ["--baseline", "dense", "--output", output]
    assert analyze.main([str(arg) for arg in argv]) == 0
    with open(output / "analysis.json") as f:
        report = json.load(f)
    with open(output / "analysis.md") as f:
        markdown = f.read()
    return report, markdown


def test_report_has_every_field(fixed_size_report):
    report, markdown = fixed_size_report
    assert report["baseline"] == "dense"
    assert report["machine"]["torch threads"] == "1" and "cpu" in report["machine"]
    assert report["machine"]["cpu flags"] and report["machine"]["allocator"]
    assert {"timing", "FLOPs", "memory", "devices"} <= set(report["settings"])
    focus, dense = report["configs"]
    assert (focus["encoder"], dense["encoder"]) == ("FocusEncoder", "DenseEncoder")
    assert (focus["keep_ratio"], dense["keep_ratio"]) == (0.3, None)
    for config in (focus, dense):
        assert set(FIELDS) <= set(config), config.keys()
        latency = config["latency"]["cpu"]
        assert 0 < latency["encoder_ms"] < latency["model_ms"] and latency["forwards"] == 2
        assert len(latency["model_ms_all"]) == len(latency["encoder_ms_all"]) == 2
        assert latency["model_ms_min"] == min(latency["model_ms_all"]) <= latency["model_ms"]
        assert latency["encoder_ms_min"] == min(latency["encoder_ms_all"])
        assert config["peak_memory_mib"]["cpu"] > 0
        assert config["tokens"]["images"] == 1 and config["token_quality"] is None
        assert len(config["tokens"]["updated_per_layer"]) == 2
        assert config["input"] == "random 96x128 image"
        assert set(config["ratios"]) == {
            "parameters",
            "model_gflops",
            "encoder_gflops",
            "model_latency_cpu",
            "encoder_latency_cpu",
            "peak_memory_cpu",
        }
    assert all(value == 1.0 for value in dense["ratios"].values())
    assert focus["ratios"]["encoder_gflops"] == pytest.approx(
        focus["gflops"]["encoder"] / dense["gflops"]["encoder"]
    )
    for title in ("## Parameters", "## GFLOPs", "## Latency", "## Ratios to dense", "## Tokens"):
        assert title in markdown
    assert "Needs ground truth" in markdown


def test_gflops_parts_add_up_and_focus_encoder_is_cheaper(fixed_size_report):
    report, _ = fixed_size_report
    focus, dense = report["configs"]
    for config in (focus, dense):
        gflops = config["gflops"]
        parts = [gflops[part] for part in MODEL_PARTS]
        assert all(value > 0 for value in parts)
        assert sum(parts) + gflops["other"] == pytest.approx(gflops["total"], rel=1e-9)
        # what no part's forward called (position embedding, post-processing) is a remainder
        assert 0 <= gflops["other"] < 0.01 * gflops["total"]
        assert "aten::topk" in config["uncounted_ops"]
        params = config["parameters"]
        assert sum(params[part] for part in (*MODEL_PARTS, "other")) == params["total"]
    assert focus["gflops"]["encoder"] < dense["gflops"]["encoder"]
    # same backbone, neck and decoder
    for part in ("backbone", "neck", "decoder"):
        assert focus["gflops"][part] == pytest.approx(dense["gflops"][part])


def test_tokens_updated_match_the_encoder_output(fixed_size_report):
    report, _ = fixed_size_report
    focus, dense = report["configs"]
    image = random_inputs((96, 128))[0][0]
    model = helpers.build_tiny_model(encoder="focus", num_classes=len(CLASS_NAMES))
    model.encoder.keep_ratio = 0.3
    with torch.no_grad():
        _, details = model.eval().inference([image], return_details=True)
    counts = details.encoder.tokens_updated(details.features.padding_mask)[:, 0]
    assert focus["tokens"]["updated_per_layer"] == counts.double().tolist()
    valid = float((~details.features.padding_mask).sum())
    assert focus["tokens"]["valid_tokens"] == valid
    assert dense["tokens"]["updated_per_layer"] == [valid, valid]


def test_token_quality_on_dataset_images_with_weights(tiny, tmp_path, capsys):
    argv = ["--config-file", *tiny.configs, "--weights", *tiny.weights]
    argv += ["--dataset", tiny.names["val"], "--num-images", 2, "--no-memory"]
    argv += ["--warmup", 0, "--iters", 1, "--output", tmp_path]
    out = _run(argv, capsys)
    assert "## Token quality" in out and "Needs ground truth" not in out
    with open(tmp_path / "analysis.json") as f:
        report = json.load(f)
    # one definition of the foreground for both configs: the Focus config's ranges
    assert report["configs"][0]["token_quality"]["ranges"] == (
        report["configs"][1]["token_quality"]["ranges"]
    )
    # the same images, through the test mapper keeping the boxes, with the same weights
    for config_file, weights, result in zip(tiny.configs, tiny.weights, report["configs"]):
        assert result["weights"] == weights
        cfg = LazyConfig.load(config_file)
        inputs, _ = dataset_inputs(cfg, tiny.names["val"], 2)
        model = instantiate(cfg.model)
        model.load_state_dict(torch.load(weights, weights_only=True)["model"])
        model.eval()
        ranges = FOCUS_RANGES
        covered, total = 0, 0
        with torch.no_grad():
            for item in inputs:
                _, details = model.inference([{"image": item["image"]}], return_details=True)
                features, padding = details.features, details.features.padding_mask
                foreground = (
                    compute_foreground_targets(
                        [item["instances"].gt_boxes.tensor],
                        features.level_shapes,
                        features.strides,
                        ranges,
                    ).bool()
                    & ~padding
                )
                total += int(foreground.sum())
                covered += torch.stack(
                    [
                        (details.encoder.updated_mask(layer, padding) & foreground).sum()
                        for layer in range(details.encoder.num_layers)
                    ]
                )
        quality = result["token_quality"]
        assert quality["images"] == 2 and quality["foreground_tokens"] == total > 0
        assert quality["foreground_share_per_layer"] == pytest.approx(
            (covered.double() / total).tolist()
        )
    # dense: every valid token, hence every foreground token
    assert report["configs"][1]["token_quality"]["foreground_share_per_layer"] == [1.0, 1.0]


def test_a_three_level_hybrid_next_to_focus(tiny, tmp_path, capsys):
    # RT-DETR's hybrid encoder (3 levels) and Focus (4 levels) in one analysis on dataset images
    hybrid = _write_config(tiny.folder, tiny.names, "hybrid")
    argv = ["--config-file", tiny.configs[0], hybrid, "--names", "focus", "hybrid"]
    argv += ["--dataset", tiny.names["val"], "--num-images", 2, "--no-memory"]
    argv += ["--warmup", 0, "--iters", 1, "--baseline", "focus", "--output", tmp_path]
    out = _run(argv, capsys)
    assert "| hybrid |" in out
    with open(tmp_path / "analysis.json") as f:
        focus, result = json.load(f)["configs"]
    assert (result["encoder"], result["keep_ratio"]) == ("HybridEncoder", None)
    # no position or level embedding: "other" is the denoising label embedding alone
    assert result["gflops"]["other"] == 0
    assert result["parameters"]["other"] == len(CLASS_NAMES) * 32
    assert all(result["gflops"][part] > 0 for part in MODEL_PARTS)
    # AIFI (the coarsest level), the top-down pass (all), the bottom-up pass (all but level 0)
    assert len(result["tokens"]["updated_per_layer"]) == 3
    assert result["tokens"]["updated_share_per_layer"][1] == 1.0
    # Focus's 4 foreground ranges, fitted to 3 levels: the coarsest takes every larger object
    assert focus["token_quality"]["ranges"] == ["(-1, 12]", "(12, 24]", "(24, 48]", "(48, inf]"]
    assert result["token_quality"]["ranges"] == ["(-1, 12]", "(12, 24]", "(24, inf]"]
    cfg = LazyConfig.load(hybrid)
    inputs, _ = dataset_inputs(cfg, tiny.names["val"], 2)
    torch.manual_seed(0)
    model = instantiate(cfg.model).eval()
    covered, total = torch.zeros(3, dtype=torch.int64), 0
    with torch.no_grad():
        for item in inputs:
            _, details = model.inference([{"image": item["image"]}], return_details=True)
            features = details.features
            foreground = (
                compute_foreground_targets(
                    [item["instances"].gt_boxes.tensor],
                    features.level_shapes,
                    features.strides,
                    FOCUS_RANGES[:2] + [(24.0, float("inf"))],
                ).bool()
                & ~features.padding_mask
            )
            starts = features.level_starts
            total += int(foreground.sum())
            covered += torch.stack(
                [
                    foreground[:, starts[2] :].sum(),
                    foreground.sum(),
                    foreground[:, starts[1] :].sum(),
                ]
            )
    quality = result["token_quality"]
    assert quality["foreground_tokens"] == total > 0
    assert quality["foreground_share_per_layer"] == pytest.approx((covered / total).tolist())


def test_keep_ratio_sweep_writes_the_table_and_plot(tiny, tmp_path, capsys):
    argv = ["--config-file", *tiny.configs, "--names", "focus", "dense"]
    argv += ["--size", 64, 64, "--no-memory", "--warmup", 0, "--iters", 1]
    argv += ["--sweep-keep-ratio", 0.2, 0.8, "--eval-images", 2, "--output", tmp_path]
    out = _run(argv, capsys)
    assert "## Keep-ratio sweep" in out
    with open(tmp_path / "analysis.json") as f:
        report = json.load(f)
    points = report["sweep"]
    assert "(first 2 images)" in report["sweep_evaluation"]
    assert [(p["name"], p["keep_ratio"]) for p in points] == [
        ("focus", 0.2),
        ("focus", 0.8),
        ("dense", None),
    ]
    for point in points:
        assert 0.0 <= point["AP"] <= 100.0 and 0.0 <= point["AP50"] <= 100.0
        assert point["model_ms"] > 0 and point["encoder_gflops"] > 0
    assert points[0]["encoder_gflops"] < points[1]["encoder_gflops"]
    assert points[2]["gflops"] == report["configs"][1]["gflops"]["total"]
    # the config's own keep ratio is restored for the main table
    assert report["configs"][0]["keep_ratio"] == 0.3
    assert report["files"]["plot"] == "keep_ratio_sweep.png"
    with open(tmp_path / "keep_ratio_sweep.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_several_runs_of_a_config_are_each_evaluated(tiny, tmp_path, capsys):
    focus, dense = tiny.configs
    second = _save_weights(focus, str(tmp_path / "focus_seed1.pth"), 5)
    runs = f"{tiny.weights[0]},{second}"
    argv = ["--config-file", focus, dense, "--names", "focus", "dense", "--weights", runs, ""]
    argv += ["--size", 64, 64, "--no-memory", "--warmup", 0, "--iters", 1, "--eval-images", 2]
    out = _run(argv + ["--output", tmp_path], capsys)
    with open(tmp_path / "analysis.json") as f:
        focus_report, dense_report = json.load(f)["configs"]
    runs = focus_report["seed_runs"]
    assert runs["weights"] == [tiny.weights[0], second] and "seed_runs" not in dense_report
    assert focus_report["weights"] == tiny.weights[0]  # the first run is the one analyzed
    # each run evaluated on its own: the same numbers as evaluating that checkpoint alone
    configs = load_analyzed_configs([focus], weights=[second])
    model = build_analysis_model(configs[0], torch.device("cpu"))
    expected = evaluate_box_ap(configs[0].cfg, model, num_images=2)
    assert (runs["AP"][1], runs["AP50"][1]) == (expected["AP"], expected["AP50"])
    table = out.split("## AP over runs (one checkpoint per training seed)")[1]
    mean = (runs["AP"][0] + runs["AP"][1]) / 2
    deviation = abs(runs["AP"][0] - runs["AP"][1]) / 2**0.5
    assert f"| focus | 2 | {mean:.2f} ± {deviation:.2f} |" in table
    err = _error(["--config-file", focus, "--weights", f"{tiny.weights[0]},"], capsys)
    assert "an empty entry in the list" in err
    err = _error(
        ["--config-file", focus, "--weights", f"{tiny.weights[0]},{tmp_path}/x.pth"], capsys
    )
    assert f"weights file of focus not found: {tmp_path}/x.pth" in err


def _error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        code = analyze.main([str(arg) for arg in argv])
        raise SystemExit(code)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_bad_inputs_error_clearly(tiny, tmp_path, capsys):
    focus, dense = tiny.configs
    missing = tmp_path / "missing.py"
    assert f"config file not found: {missing}" in _error(["--config-file", missing], capsys)
    err = _error(["--config-file", focus, dense, "--weights", tiny.weights[0]], capsys)
    assert "--weights gives 1 value(s)" in err and "for 2 config" in err
    err = _error(["--config-file", focus, "--weights", tmp_path / "nope.pth"], capsys)
    assert "weights file of focus not found" in err
    err = _error(["--config-file", dense, "--sweep-keep-ratio", 0.2, "--output", tmp_path], capsys)
    assert "--sweep-keep-ratio needs an encoder" in err and "dense (DenseEncoder)" in err
    err = _error(["--config-file", focus, "--sweep-keep-ratio", 1.5, "--output", tmp_path], capsys)
    assert "must be in (0, 1], got 1.5" in err
    assert "give --output" in _error(["--config-file", focus, "--sweep-keep-ratio", 0.2], capsys)
    err = _error(["--config-file", focus, dense, "--baseline", "lite"], capsys)
    assert "--baseline 'lite'" in err
    err = _error(["--config-file", focus, dense, "--names", "a"], capsys)
    assert "--names gives 1 name(s)" in err
    err = _error(["--config-file", focus, "--dataset", "no_such_dataset", "--no-memory"], capsys)
    assert "dataset 'no_such_dataset' is not registered" in err
    err = _error(["--config-file", focus, "--size", 0, 64], capsys)
    assert "--size needs positive" in err
    err = _error(["--config-file", focus, "--eval-images", 0], capsys)
    assert "--eval-images must be >= 1, got 0" in err
    if not torch.cuda.is_available():
        assert "CUDA is not available" in _error(
            ["--config-file", focus, "--device", "cuda"], capsys
        )


def test_trailing_overrides_apply_to_every_config(tiny):
    argv = ["--config-file", *tiny.configs, "--names", "a", "b", "--sweep-keep-ratio", "0.5"]
    argv += ["model.decoder.num_layers=1", "--output", "out", "model.num_select=7"]
    args = analyze.parse_args(argv)
    assert args.opts == ["model.decoder.num_layers=1", "model.num_select=7"]
    assert args.sweep_keep_ratio == [0.5] and args.names == ["a", "b"]
    configs = load_analyzed_configs(args.config_file, names=args.names, overrides=args.opts)
    assert [(c.cfg.model.decoder.num_layers, c.cfg.model.num_select) for c in configs] == [
        (1, 7),
        (1, 7),
    ]
    assert [c.weights for c in configs] == [None, None]
    configs = load_analyzed_configs(tiny.configs, weights=["none", ""])
    assert [c.weights for c in configs] == [None, None]
