"""Learning-rate factors for ``detectron2.solver.get_default_optimizer_params``."""

from typing import Sequence, Union

__all__ = ["lr_factor_by_prefix"]


def lr_factor_by_prefix(
    name: str, *, prefixes: Union[str, Sequence[str]] = "backbone.", factor: float = 0.1
) -> float:
    """
    ``factor`` for parameters whose name starts with one of ``prefixes``, 1 otherwise. Use it as
    ``lr_factor_func=functools.partial(lr_factor_by_prefix, prefixes="backbone.", factor=0.1)``
    (a partial, not a lambda, so the config can be saved and reloaded).
    """
    if isinstance(prefixes, str):
        prefixes = (prefixes,)
    return factor if any(name.startswith(prefix) for prefix in prefixes) else 1.0
