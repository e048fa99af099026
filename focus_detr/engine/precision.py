"""
Mixed precision of training: ``train.amp.enabled`` = ``True``, ``False`` or ``"auto"``.

``"auto"`` decides from what the device reports, without running anything:

* CUDA: autocast on GPUs with tensor cores (compute capability 7.0 or higher): bfloat16 from
  8.0 on (float32's exponent range, no loss scaling), float16 with a gradient scaler before;
  float32 below 7.0.
* CPU: bfloat16 autocast where the cores execute bfloat16 natively and this process may use
  those instructions, float32 elsewhere (emulated bfloat16 is many times slower than float32).
  Native means: the CPU has AMX tiles or AVX512-BF16 (``torch.cpu``), torch's CPU capability is
  AVX512 (``ATEN_CPU_CAPABILITY`` can lower it) and ``ONEDNN_MAX_CPU_ISA``, when set, admits
  ``AVX512_CORE_BF16`` (``AVX512_CORE_AMX`` for a CPU with AMX alone).
* other devices: float32.

``True`` uses autocast in the dtype "auto" would pick on a capable device of that type (bfloat16
on the CPU, float16 on CUDA below compute capability 8.0) without looking at the hardware.
The decision is logged in one line that says why.
"""

import logging
import os
from typing import Mapping, NamedTuple, Optional, Union

import torch
from detectron2.utils import comm
from omegaconf import OmegaConf

__all__ = ["AmpChoice", "amp_from_config", "cpu_bfloat16_support", "resolve_amp"]

logger = logging.getLogger(__name__)

# oneDNN's ONEDNN_MAX_CPU_ISA values for x86, lowest first; "ALL" (its default) limits nothing
_ONEDNN_ISAS = (
    "SSE41 AVX AVX2 AVX2_VNNI AVX2_VNNI_2 AVX512_CORE AVX512_CORE_VNNI AVX512_CORE_BF16 "
    "AVX512_CORE_FP16 AVX512_CORE_AMX AVX512_CORE_AMX_FP16 ALL"
).split()
# oneDNN's newer names of the same levels
_ONEDNN_ALIASES = {
    "DEFAULT": "ALL",
    "AVX10_1_512": "AVX512_CORE_FP16",
    "AVX10_1_512_AMX": "AVX512_CORE_AMX",
    "AVX10_1_512_AMX_FP16": "AVX512_CORE_AMX_FP16",
}
_ISA_VARIABLES = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")


class AmpChoice(NamedTuple):
    """``enabled``: run forward and loss under autocast in ``dtype`` (None when disabled)."""

    enabled: bool
    dtype: Optional[torch.dtype]
    reason: str


def cpu_bfloat16_support(environ: Mapping[str, str] = os.environ) -> AmpChoice:
    """
    Whether this process runs bfloat16 natively on the CPU (module doc), with the reason: the
    instructions found, torch's CPU capability and the limits set in ``environ``. An
    ``ONEDNN_MAX_CPU_ISA`` value that oneDNN does not have gives float32, the value named.
    """
    amx = torch.cpu._is_amx_tile_supported()
    avx512_bf16 = torch.cpu._is_avx512_bf16_supported()
    capability = torch.backends.cpu.get_cpu_capability()
    found = [name for name, present in (("AMX", amx), ("AVX512-BF16", avx512_bf16)) if present]
    facts = [" and ".join(found) or "no AMX or AVX512-BF16", f"torch CPU capability {capability}"]
    facts = "; ".join(facts + [f"{k}={environ[k]}" for k in _ISA_VARIABLES if environ.get(k)])
    limit = environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper() or "ALL"
    limit = _ONEDNN_ALIASES.get(limit, limit)
    if not found:
        return AmpChoice(False, None, f"bfloat16 would be emulated on this CPU ({facts})")
    if capability != "AVX512":
        return AmpChoice(False, None, f"torch's CPU kernels are limited below AVX512 ({facts})")
    if limit not in _ONEDNN_ISAS:
        known = ", ".join(_ONEDNN_ISAS + list(_ONEDNN_ALIASES))
        reason = f"ONEDNN_MAX_CPU_ISA={environ['ONEDNN_MAX_CPU_ISA']!r} is none of {known}"
        return AmpChoice(False, None, f"{reason} ({facts})")
    level = _ONEDNN_ISAS.index(limit)
    if (avx512_bf16 and level >= _ONEDNN_ISAS.index("AVX512_CORE_BF16")) or (
        amx and level >= _ONEDNN_ISAS.index("AVX512_CORE_AMX")
    ):
        return AmpChoice(True, torch.bfloat16, f"the CPU runs bfloat16 natively ({facts})")
    return AmpChoice(False, None, f"oneDNN is limited below bfloat16 instructions ({facts})")


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


def _auto(device: torch.device) -> AmpChoice:
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if major < 7:
            return AmpChoice(False, None, f"compute capability {major}.{minor} has no tensor cores")
        dtype = _default_dtype(device)
        return AmpChoice(True, dtype, f"tensor cores of compute capability {major}.{minor}")
    if device.type == "cpu":
        return cpu_bfloat16_support()
    return AmpChoice(False, None, f"no automatic choice for device type {device.type!r}")


def resolve_amp(setting: Union[bool, str], device: Union[str, torch.device]) -> AmpChoice:
    """
    Decide whether to train under autocast on ``device`` and in which dtype, and log it in one
    line. ``setting``: ``True`` / ``False`` force autocast on / off; ``"auto"`` decides from the
    device (module doc).
    """
    _check_setting(setting)
    device = torch.device(device)
    if setting == "auto":
        choice = _auto(device)
    elif setting:
        choice = AmpChoice(True, _default_dtype(device), "forced by train.amp.enabled=True")
    else:
        choice = AmpChoice(False, None, "forced by train.amp.enabled=False")
    precision = f"{str(choice.dtype).replace('torch.', '')} autocast" if choice.enabled else None
    how = "auto" if setting == "auto" else "forced"
    logger.info(f"Precision on {device} ({how}): {precision or 'float32'}, {choice.reason}")
    return choice


def amp_from_config(cfg, device: Union[str, torch.device]) -> AmpChoice:
    """
    :func:`resolve_amp` for ``cfg.train.amp.enabled`` (default False). With several processes
    rank 0 decides ``"auto"`` for all of them: every process trains in the same precision.
    """
    setting = OmegaConf.select(cfg, "train.amp.enabled", default=False)
    _check_setting(setting)
    if setting != "auto" or comm.get_world_size() == 1:
        return resolve_amp(setting, device)
    choice = resolve_amp(setting, device) if comm.is_main_process() else None
    return comm.all_gather(choice)[0]
