"""
Keeps ``torch.compile``'s on-disk cache from serving CPU code built for another instruction set.

Inductor generates C++ for the vector width it picks from the CPU and from the environment variable
``ATEN_CPU_CAPABILITY``, but its FX graph cache key (torch 2.14) includes neither: a graph compiled
under one capability is then reused under another, and the reused kernels compute wrong values or
corrupt memory (seen: a ``masked_fill`` after a matrix product compiled under the native AVX-512
capability and reused under ``ATEN_CPU_CAPABILITY=avx2`` left half of the masked channels
unmasked). Importing :mod:`focus_detr` adds the capability in use to
``torch.compiler.config.cache_key_tag`` (keeping any tag the user set), so that every capability
gets its own cache entries.
"""

import torch

__all__ = ["tag_compile_cache_with_cpu_capability"]


def tag_compile_cache_with_cpu_capability() -> str:
    """
    Append ``cpu_capability=<ATen CPU capability>`` to ``torch.compiler.config.cache_key_tag``
    unless it is there already.

    Returns:
        the tag in use afterwards ("" when this torch has no ``cache_key_tag``).
    """
    compiler_config = getattr(torch.compiler, "config", None)
    if compiler_config is None or not hasattr(compiler_config, "cache_key_tag"):
        return ""
    tag = f"cpu_capability={torch.backends.cpu.get_cpu_capability()}"
    parts = [part for part in compiler_config.cache_key_tag.split("|") if part]
    if tag not in parts:
        compiler_config.cache_key_tag = "|".join(parts + [tag])
    return compiler_config.cache_key_tag
