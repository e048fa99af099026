"""Seconds per training step (or per inference) of a config's model, by precision and by module.

    python -m focus_detr.tools.benchmark_train --config-file CFG [--iters N] [--warmup W]
        [--precision fp32 bf16 auto] [--threads T] [--with-loader] [--profile]
        [--output FILE.md] [KEY=VALUE ...]  (config overrides)
    python -m focus_detr.tools.benchmark_train --config-file CFG --inference
        (--size H W | --val-image) [--weights PATH] [same options]

Training: builds the config's model, optimizer and training loader; fetches the batches before
timing (data loading excluded; ``--with-loader`` also times the steps with the live loader) and
times ``DETRTrainer.run_step`` as training runs it (forward and loss sum under autocast,
backward, grad clipping at ``train.clip_grad.max_norm``, optimizer step, EMA) after warm-up
steps, with the same batches and initial weights for every precision. Inference: eval mode,
no_grad, one image. Like ``train_net.py`` it restarts itself with jemalloc where it is installed
(``focus_detr.allocator``; ``FOCUS_DETR_ALLOCATOR=system`` keeps the system's malloc) and applies
training's allocator policy (``AllocatorPurgeHook``) between steps. Prints a markdown report:
machine (CPU model, instruction-set flags and limits, torch threads), allocator, s/iter and
images/s per precision, and per-module breakdown.
"""

import argparse
import copy
import itertools
import sys
import time
from typing import List, Optional, Sequence, Tuple

from focus_detr.allocator import describe_allocator, reexec_with_preferred_allocator

if __name__ == "__main__":
    # an allocator is chosen when a process starts: restart before torch loads
    reexec_with_preferred_allocator()

import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.utils.env import seed_all_rng
from detectron2.utils.events import EventStorage
from omegaconf import OmegaConf

from focus_detr.engine import DETRTrainer, ModelEMA, build_model, build_resumable_train_loader
from focus_detr.engine.checkpoint import SafeCheckpointer
from focus_detr.engine.hooks import AllocatorPurgeHook
from focus_detr.engine.precision import resolve_amp
from focus_detr.tools.benchmark_report import TimedRun, format_report
from focus_detr.tools.machine import describe_machine
from focus_detr.tools.step_timer import StepTimer, section_names

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
LABELS = {"fp32": "float32", "bf16": "bfloat16 autocast", "fp16": "float16 autocast"}
PROFILE_STEPS = 3


def resolve_precisions(names: Sequence[str], cfg, device: torch.device) -> Tuple[List[str], str]:
    """The precisions to time (``auto`` replaced by its choice, no repeats) and a note on auto."""
    keys, note = [], ""
    for name in names:
        if name == "auto":
            choice = resolve_amp(
                "auto",
                device,
                hidden_dim=int(OmegaConf.select(cfg, "model.hidden_dim", default=256)),
                ffn_dim=int(OmegaConf.select(cfg, "model.encoder.ffn_dim", default=1024)),
            )
            name = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[choice.dtype]
            note = f"auto: {LABELS[name]} ({choice.reason})"
        if name not in keys:
            keys.append(name)
    return keys, note


def _synchronizer(device: torch.device):
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


def _autocast(device: torch.device, key: str):
    dtype = PRECISIONS[key]
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def build_trainer(cfg, model, optimizer, key: str, data) -> DETRTrainer:
    """The trainer of ``do_train`` (clipping, EMA) in precision ``key``, on ``data``."""
    clip = OmegaConf.select(cfg, "train.clip_grad.enabled", default=True)
    ema = None
    if OmegaConf.select(cfg, "train.ema.enabled", default=False):
        ema = ModelEMA(
            model,
            decay=OmegaConf.select(cfg, "train.ema.decay", default=0.9998),
            warmup=OmegaConf.select(cfg, "train.ema.warmup", default=2000),
        )
    return DETRTrainer(
        model,
        data,
        optimizer,
        clip_grad_max_norm=(
            OmegaConf.select(cfg, "train.clip_grad.max_norm", default=0.1) if clip else None
        ),
        amp=PRECISIONS[key] is not None,
        amp_dtype=PRECISIONS[key],
        ema=ema,
    )


def _print_profile(label: str, run_steps) -> None:
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profile:
        run_steps()
    print(f"\n## torch.profiler, {label}: {PROFILE_STEPS} steps, top 25 by self CPU time\n")
    print(profile.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


def time_training(cfg, model, optimizer, batches, key: str, args, loader=None) -> TimedRun:
    """Warm-up, then ``args.iters`` timed trainer steps on ``batches`` (or on ``loader``)."""
    device = next(model.parameters()).device
    sync = _synchronizer(device)
    trainer = build_trainer(cfg, model, optimizer, key, loader if loader is not None else batches)
    timer = StepTimer(model, optimizer=optimizer, trainer=trainer, synchronize=sync)
    # the allocator policy of training, between (untimed) steps
    allocator_policy = AllocatorPurgeHook()
    allocator_policy.trainer = trainer
    trainer.start_iter = 0  # what TrainerBase.train sets: the policy starts after step 0
    times: List[float] = []
    with EventStorage(0) as storage:
        trainer.storage = storage
        for iteration in range(args.warmup + args.iters):
            if iteration == args.warmup:
                timer.reset()
            trainer.iter = storage.iter = iteration
            sync()
            start = time.perf_counter()
            trainer.run_step()
            sync()
            times.append(time.perf_counter() - start)
            allocator_policy.after_step()
        data = [value for value, _ in storage.history("data_time").values()[-args.iters :]]
        totals = dict(timer.totals)
        if args.profile and loader is None:
            _print_profile(LABELS[key], lambda: [trainer.run_step() for _ in range(PROFILE_STEPS)])
    allocator_policy.after_train()
    timer.remove()
    label = LABELS[key] + (", live loader" if loader is not None else "")
    return TimedRun(
        label, len(batches[0]), times[args.warmup :], totals, data if loader is not None else None
    )


def time_inference(model, inputs, key: str, args) -> TimedRun:
    """Warm-up, then ``args.iters`` timed forwards of ``inputs`` in eval mode, no_grad."""
    device = next(model.parameters()).device
    sync = _synchronizer(device)
    timer = StepTimer(model, synchronize=sync)
    times: List[float] = []

    def forward() -> None:
        with torch.no_grad(), _autocast(device, key):
            model(inputs)

    for iteration in range(args.warmup + args.iters):
        if iteration == args.warmup:
            timer.reset()
        sync()
        start = time.perf_counter()
        forward()
        sync()
        times.append(time.perf_counter() - start)
    totals = dict(timer.totals)
    if args.profile:
        _print_profile(LABELS[key], lambda: [forward() for _ in range(PROFILE_STEPS)])
    timer.remove()
    return TimedRun(LABELS[key], len(inputs), times[args.warmup :], totals)


def _inference_inputs(cfg, args) -> Tuple[List[dict], str]:
    if args.val_image:
        inputs = next(iter(instantiate(cfg.dataloader.test)))[:1]
        height, width = inputs[0]["image"].shape[-2:]
        name = OmegaConf.select(cfg, "dataloader.test.dataset.names")
        return inputs, f"first image of {name} (test loader), {height}x{width} after resizing"
    height, width = args.size
    generator = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator)
    return [{"image": image, "height": height, "width": width}], f"random {height}x{width} image"


def run(cfg, args) -> str:
    """Build, time and return the markdown report."""
    seed_all_rng(0)
    model = build_model(cfg)
    device = next(model.parameters()).device
    keys, auto_note = resolve_precisions(args.precision, cfg, device)
    notes = [f"config: {args.config_file}", f"device: {device}", describe_allocator()]
    notes += [auto_note] if auto_note else []
    runs: List[TimedRun] = []
    if args.inference:
        if args.weights:
            SafeCheckpointer(model).load(args.weights)
        model.eval()
        inputs, described = _inference_inputs(cfg, args)
        weights = f"weights {args.weights}" if args.weights else "random weights"
        notes += [f"input: {described}, batch 1, {weights}"]
        notes += [f"timing: {args.warmup} warm-up + {args.iters} timed forwards, eval, no_grad"]
        runs = [time_inference(model, inputs, key, args) for key in keys]
    else:
        cfg.optimizer.params.model = model
        optimizer = instantiate(cfg.optimizer)
        loader = build_resumable_train_loader(cfg.dataloader.train, seed=0)
        extra = PROFILE_STEPS if args.profile else 0
        batches = list(itertools.islice(loader, args.warmup + args.iters + extra))
        clip = OmegaConf.select(cfg, "train.clip_grad.max_norm", default=0.1)
        if not OmegaConf.select(cfg, "train.clip_grad.enabled", default=True):
            clip = "off"
        notes += [
            f"data: {len(batches)} batches of {len(batches[0])} images from the training loader,"
            " fetched before timing (data loading excluded)",
            f"step: DETRTrainer.run_step (forward + loss sum under autocast, backward, grad "
            f"clipping max_norm {clip}, {type(optimizer).__name__} step); LR schedule not run",
            f"timing: {args.warmup} warm-up + {args.iters} timed steps per precision, same "
            "batches and initial weights for each",
        ]
        model_state = copy.deepcopy(model.state_dict())
        optimizer_state = copy.deepcopy(optimizer.state_dict())
        sources = [None] + ([loader] if args.with_loader else [])
        for key, source in itertools.product(keys, sources):
            model.load_state_dict(model_state)
            optimizer.load_state_dict(optimizer_state)
            seed_all_rng(0)
            runs.append(time_training(cfg, model.train(), optimizer, batches, key, args, source))
    notes += ["breakdown: module forwards from forward pre/post hooks (without nested timed ones)"]
    sections = section_names(model, training=not args.inference)
    kind = "Inference" if args.inference else "Training-step"
    title = f"{kind} benchmark of {args.config_file}"
    return format_report(
        title=title, machine=describe_machine(device), notes=notes, runs=runs, sections=sections
    )


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--iters", type=int, default=5, help="timed iterations (default 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed first (default 2)")
    parser.add_argument(
        "--precision",
        nargs="+",
        choices=["fp32", "bf16", "fp16", "auto"],
        default=["fp32", "bf16", "auto"],
        help="default: fp32 bf16 auto (auto: what train.amp.enabled='auto' picks)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--with-loader", action="store_true", help="also time with the loader")
    parser.add_argument("--profile", action="store_true", help="torch.profiler table per run")
    parser.add_argument("--output", metavar="FILE.md", help="also write the report there")
    parser.add_argument("--inference", action="store_true", help="time inference, not training")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="inference image")
    source.add_argument("--val-image", action="store_true", help="first image of the test set")
    parser.add_argument("--weights", default="", help="inference: checkpoint to load")
    argv = sys.argv[1:] if argv is None else list(argv)
    # config overrides (KEY=VALUE) anywhere, also right after --precision's values
    overrides = [arg for arg in argv if "=" in arg and not arg.startswith("-")]
    args = parser.parse_args([arg for arg in argv if arg not in overrides])
    args.opts = overrides
    if args.iters < 1 or args.warmup < 0:
        parser.error(f"need --iters >= 1 and --warmup >= 0, got {args.iters}, {args.warmup}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if args.inference and not (args.size or args.val_image):
        parser.error("--inference needs --size H W or --val-image")
    if not args.inference and (args.size or args.val_image or args.weights):
        parser.error("--size, --val-image and --weights need --inference")
    if args.size and min(args.size) < 1:
        parser.error(f"--size needs positive H W, got {args.size}")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    cfg = LazyConfig.apply_overrides(LazyConfig.load(args.config_file), args.opts)
    report = run(cfg, args)
    print(report, end="")
    if args.output:
        with open(args.output, "w") as output:
            output.write(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
