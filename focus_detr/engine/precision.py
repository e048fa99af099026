"""
Mixed precision chosen for the machine: ``train.amp.enabled`` = ``True``, ``False`` or ``"auto"``.

``"auto"`` on the CPU times the model's dominant ops (a transformer feed-forward block of the
model's sizes and a 3x3 convolution block, forward and backward) in float32 and under bfloat16
autocast, and uses bfloat16 only when it is measured faster: CPUs without native bfloat16
instructions (or a process limited by ``ATEN_CPU_CAPABILITY`` / ``ONEDNN_MAX_CPU_ISA``) emulate it,
many times slower than float32. When that timing does not show emulated bfloat16 and the model is
given (training), the model's own training step on a batch of the config's size decides
(``step_probe``): channels-last convolutions, the parts autocast leaves in float32 and the casts
can make a step slower than its ops. On CUDA ``"auto"`` uses autocast on GPUs with tensor cores
(compute capability >= 7.0): bfloat16 from 8.0 on (float32's exponent range, no loss scaling),
float16 with a gradient scaler before. Forced ``True`` uses the same dtype without the question.
"""

import functools
import logging
import os
import time
from typing import Callable, NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from detectron2.utils import comm
from omegaconf import OmegaConf

__all__ = ["AmpChoice", "ProbeResult", "amp_from_config", "measure_cpu_bfloat16", "resolve_amp"]

logger = logging.getLogger(__name__)

# bfloat16 is chosen when its op timing is at least this much faster. The casts autocast adds and
# the parts of a step it leaves in float32 (deformable attention, matching, losses, optimizer) eat
# much of an op-level gain: on a Sapphire Rapids core (AMX), ops 2.3x faster made the demo's step
# 1.4x faster, while for a 32-channel test model ops 1.25x faster made its step slower.
MIN_SPEEDUP = 1.5
# With the model's own training step timed (amp_from_config with the model), bfloat16 is chosen
# when that step is at least this much faster: it already includes every cast and float32 part.
MIN_STEP_SPEEDUP = 1.05
# bfloat16 this many times slower than float32 on the screening problems ends the timing: emulated
# bfloat16 is 10-100x slower per op (a second and more per run of the full problems), native
# bfloat16 about as fast as float32 on these small problems.
CLEARLY_SLOWER = 3.0
# Size of the timed problems of the model's sizes: multiply-accumulates of one linear layer / one
# convolution, each weight used on 256-8192 tokens / 256-4096 pixels.
_LINEAR_MACS = 2**26
_CONV_MACS = 2**25
# Screening problems, the same for every model: ~10M multiply-accumulates per layer (tens of ms
# per run with emulated bfloat16, ~1 ms with native or float32), each weight used 64-256 times.
_SCREEN_FFN = dict(tokens=256, hidden=128, ffn=256)
_SCREEN_CONV = dict(channels=128, size=8)
# Timed runs of each problem and dtype: at least MIN_RUNS, then more while both dtypes together
# took less than the problem's budget (seconds), up to MAX_RUNS.
MIN_RUNS, MAX_RUNS = 2, 10
_SCREEN_BUDGET_S, _FULL_BUDGET_S = 0.05, 0.12
_ISA_VARIABLES = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")


class AmpChoice(NamedTuple):
    """``enabled``: run forward and loss under autocast in ``dtype`` (None when disabled)."""

    enabled: bool
    dtype: Optional[torch.dtype]
    reason: str


class ProbeResult(NamedTuple):
    """Seconds of one forward+backward of the timed ops, float32 and bfloat16 autocast."""

    float32_s: float
    bfloat16_s: float
    stopped_early: bool  # bfloat16 was clearly slower on the screening problems
    description: str  # what was timed


def _ffn_block(*, tokens: int, hidden: int, ffn: int, generator: torch.Generator):
    """LayerNorm(x + W2 relu(W1 x)) on (tokens, hidden): the encoder / decoder FFN."""
    x = torch.randn(tokens, hidden, generator=generator)
    w1 = torch.randn(ffn, hidden, generator=generator) / hidden**0.5
    w2 = torch.randn(hidden, ffn, generator=generator) / ffn**0.5
    leaves = [t.requires_grad_() for t in (x, w1, torch.zeros(ffn), w2, torch.zeros(hidden))]

    def step() -> None:
        for leaf in leaves:
            leaf.grad = None
        x, w1, b1, w2, b2 = leaves
        y = F.layer_norm(x + F.linear(F.relu(F.linear(x, w1, b1)), w2, b2), (hidden,))
        y.float().square().mean().backward()

    return step, f"FFN {hidden}->{ffn}->{hidden} on {tokens} tokens"


def _conv_block(*, channels: int, size: int, generator: torch.Generator):
    """relu(BatchNorm(conv3x3(x))) on (1, channels, size, size): a backbone block."""
    x = torch.randn(1, channels, size, size, generator=generator)
    weight = torch.randn(channels, channels, 3, 3, generator=generator) / (3 * channels**0.5)
    leaves = [t.requires_grad_() for t in (x, weight, torch.ones(channels), torch.zeros(channels))]

    def step() -> None:
        for leaf in leaves:
            leaf.grad = None
        x, weight, gamma, beta = leaves
        y = F.conv2d(x, weight, padding=1)
        y = F.relu(F.batch_norm(y, None, None, gamma, beta, training=True))
        y.float().square().mean().backward()

    return step, f"3x3 conv + BN + ReLU of {channels} ch at {size}x{size}"


def _compare(step: Callable[[], None], budget_s: float) -> Tuple[float, float, int]:
    """
    Fastest run of ``step`` in float32 and in bfloat16 autocast after a warm-up run of each,
    runs interleaved (``MIN_RUNS`` .. ``MAX_RUNS``, more while within ``budget_s``). Other
    processes only ever add time to a run: on a busy machine the fastest of several runs is the
    closest to the ops' own cost, a median is not. Returns (float32 s, bfloat16 s, runs).
    """
    bfloat16 = torch.autocast("cpu", dtype=torch.bfloat16)
    step()
    with bfloat16:
        step()
    best32 = best16 = float("inf")
    runs, spent = 0, 0.0
    while runs < MIN_RUNS or (runs < MAX_RUNS and spent < budget_s):
        start = time.perf_counter()
        step()
        middle = time.perf_counter()
        with bfloat16:
            step()
        end = time.perf_counter()
        best32, best16 = min(best32, middle - start), min(best16, end - middle)
        runs, spent = runs + 1, spent + end - start
    return best32, best16, runs


@functools.lru_cache(maxsize=None)
def _measure(hidden_dim: int, ffn_dim: int) -> ProbeResult:
    generator = torch.Generator().manual_seed(0)
    tokens = min(8192, max(256, _LINEAR_MACS // (hidden_dim * ffn_dim)))
    size = min(64, max(16, round((_CONV_MACS / hidden_dim**2) ** 0.5)))
    # Screening problems first: emulated bfloat16 shows on them at a fraction of the cost.
    for step, problem in (
        _ffn_block(generator=generator, **_SCREEN_FFN),
        _conv_block(generator=generator, **_SCREEN_CONV),
    ):
        time32, time16, runs = _compare(step, _SCREEN_BUDGET_S)
        if time16 > CLEARLY_SLOWER * time32:
            how = f"fastest of {runs} runs of {problem}, forward+backward, 1 thread"
            return ProbeResult(time32, time16, True, how)
    total32 = total16 = 0.0
    timed = []
    for step, problem in (
        _ffn_block(tokens=tokens, hidden=hidden_dim, ffn=ffn_dim, generator=generator),
        _conv_block(channels=hidden_dim, size=size, generator=generator),
    ):
        time32, time16, runs = _compare(step, _FULL_BUDGET_S)
        total32, total16 = total32 + time32, total16 + time16
        timed.append(f"{problem} (fastest of {runs} runs)")
    how = " + ".join(timed) + ", forward+backward, 1 thread"
    return ProbeResult(total32, total16, False, how)


def measure_cpu_bfloat16(*, hidden_dim: int = 256, ffn_dim: int = 1024) -> ProbeResult:
    """
    Time the model's dominant ops on the CPU, forward and backward, in float32 and under
    bfloat16 autocast: a fraction of a second, cached per sizes. Uses its own random generator
    (the global random state is kept).

    The timing runs on one thread. What decides is whether the cores execute bfloat16 natively
    or emulate it, the same on one thread as on all; and a single thread is not stalled by a
    sibling thread that another process took the core from, as the threads of one op are on a
    busy machine (there, timings with all threads came out 10-40x too slow and at random).
    """
    if hidden_dim < 1 or ffn_dim < 1:
        raise ValueError(f"need hidden_dim, ffn_dim >= 1, got {hidden_dim}, {ffn_dim}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.enable_grad():
            return _measure(int(hidden_dim), int(ffn_dim))
    finally:
        torch.set_num_threads(threads)


def _cpu_isa() -> str:
    limits = [f"{name}={os.environ[name]}" for name in _ISA_VARIABLES if name in os.environ]
    return ", ".join([f"torch CPU capability {torch.backends.cpu.get_cpu_capability()}"] + limits)


def _check_setting(setting) -> None:
    if not (isinstance(setting, bool) or setting == "auto"):
        raise ValueError(
            f"train.amp.enabled must be True, False or 'auto', got {setting!r} "
            f"({type(setting).__name__})"
        )


def _default_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 8:
        return torch.float16
    return torch.bfloat16


def _auto(device: torch.device, probe, hidden_dim: int, ffn_dim: int, step_probe=None) -> AmpChoice:
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if major < 7:
            reason = f"compute capability {major}.{minor} has no tensor cores"
            return AmpChoice(False, None, reason)
        dtype = _default_dtype(device)
        return AmpChoice(True, dtype, f"tensor cores of compute capability {major}.{minor}")
    if device.type != "cpu":
        return AmpChoice(False, None, f"no measured choice for device type {device.type!r}")
    result = (probe or measure_cpu_bfloat16)(hidden_dim=hidden_dim, ffn_dim=ffn_dim)
    threshold = MIN_SPEEDUP
    if step_probe is not None and not result.stopped_early:
        # bfloat16 is not emulated: the model's own step decides (channels-last convolutions,
        # the float32 parts and the casts can make it slower than the op timing promises)
        result, threshold = step_probe(), MIN_STEP_SPEEDUP
    speedup = result.float32_s / max(result.bfloat16_s, 1e-9)
    times = (
        f"float32 {1000 * result.float32_s:.2f} ms, bfloat16 {1000 * result.bfloat16_s:.2f} ms"
        f"{' (stopped early)' if result.stopped_early else ''}; {result.description}; "
        f"{_cpu_isa()}"
    )
    if speedup >= threshold:
        return AmpChoice(True, torch.bfloat16, f"bfloat16 measured {speedup:.2f}x faster: {times}")
    if speedup >= 1.0:
        measured = f"only {speedup:.2f}x faster (< {threshold}x)"
    else:
        measured = f"{1 / speedup:.2f}x slower"
    return AmpChoice(False, None, f"bfloat16 measured {measured}: {times}")


def resolve_amp(
    setting: Union[bool, str],
    device: Union[str, torch.device],
    *,
    probe: Optional[Callable[..., ProbeResult]] = None,
    hidden_dim: int = 256,
    ffn_dim: int = 1024,
    step_probe: Optional[Callable[[], ProbeResult]] = None,
) -> AmpChoice:
    """
    Decide whether to train under autocast on ``device`` and in which dtype, and log it once.

    Args:
        setting: ``True`` / ``False`` force autocast on / off; ``"auto"`` decides (module doc).
        probe: the CPU timing, called as ``probe(hidden_dim=, ffn_dim=)`` and returning a
            :class:`ProbeResult`; default :func:`measure_cpu_bfloat16`.
        hidden_dim, ffn_dim: the model's channels and feed-forward width (sizes of the timing).
        step_probe: optional timing of the model's own training step (a zero-argument callable
            returning a :class:`ProbeResult`, e.g. ``step_probe.model_step_probe``): when the op
            timing does not show emulated bfloat16, this decides, with ``MIN_STEP_SPEEDUP``.
    """
    _check_setting(setting)
    device = torch.device(device)
    if setting == "auto":
        choice = _auto(device, probe, hidden_dim, ffn_dim, step_probe)
        how = "auto"
    elif setting:
        choice = AmpChoice(True, _default_dtype(device), "forced by train.amp.enabled=True")
        how = "forced"
    else:
        choice = AmpChoice(False, None, "forced by train.amp.enabled=False")
        how = "forced"
    precision = f"{str(choice.dtype).replace('torch.', '')} autocast" if choice.enabled else None
    logger.info(f"Precision on {device} ({how}): {precision or 'float32'}, {choice.reason}")
    return choice


def amp_from_config(
    cfg, device: Union[str, torch.device], model: Optional[torch.nn.Module] = None
) -> AmpChoice:
    """
    :func:`resolve_amp` for ``cfg.train.amp.enabled`` (default False) with the sizes of
    ``cfg.model`` (``hidden_dim``, ``encoder.ffn_dim``). Given the (not yet data-parallel)
    ``model``, "auto" on the CPU also times its own training step on a batch of the config's
    image size. With several processes rank 0 decides ``"auto"`` for all of them: every process
    trains in the same precision.
    """
    setting = OmegaConf.select(cfg, "train.amp.enabled", default=False)
    _check_setting(setting)
    sizes = dict(
        hidden_dim=int(OmegaConf.select(cfg, "model.hidden_dim", default=256)),
        ffn_dim=int(OmegaConf.select(cfg, "model.encoder.ffn_dim", default=1024)),
    )
    if setting == "auto" and model is not None and torch.device(device).type == "cpu":
        from .step_probe import model_step_probe  # step_probe imports this module

        sizes["step_probe"] = model_step_probe(model, cfg)
    if setting != "auto" or comm.get_world_size() == 1:
        return resolve_amp(setting, device, **sizes)
    choice = resolve_amp(setting, device, **sizes) if comm.is_main_process() else None
    return comm.all_gather(choice)[0]
