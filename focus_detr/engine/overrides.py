"""
Command-line config overrides that name only existing keys.

detectron2's ``LazyConfig.apply_overrides`` creates a key that does not exist, so a mistyped key
(``train.max_iterr=2``) is accepted and ignored. :func:`apply_overrides` first checks every key:
it must exist in the config, or be an argument of the object a ``LazyCall`` node builds (its
``_target_``: ``model.neck_num_groups=8`` sets an argument the config leaves at its default),
else :class:`ConfigOverrideError` names it and the nearest valid key. A new key is added on
purpose with a leading ``+`` (Hydra's syntax, which detectron2's parser accepts):
``+train.my_option=1``; ``+`` on an existing key is an error too.
"""

import difflib
import inspect
from typing import List, Optional, Sequence

from detectron2.config import LazyConfig
from detectron2.utils.registry import locate
from omegaconf import DictConfig, ListConfig, OmegaConf

__all__ = ["ConfigOverrideError", "apply_overrides", "check_override_keys"]

_ABSENT = object()


class ConfigOverrideError(ValueError):
    """A command-line override names a key the config does not have (or adds one it has)."""


def _paths(node, prefix: str = "") -> List[str]:
    """Every key of ``node``, dotted, parents included (list items by index)."""
    if isinstance(node, DictConfig):
        items = [(str(key), node._get_node(key)) for key in node.keys()]
    elif isinstance(node, ListConfig):
        items = [(str(index), node._get_node(index)) for index in range(len(node))]
    else:
        return []
    paths = []
    for key, child in items:
        path = f"{prefix}{key}"
        paths.append(path)
        paths += _paths(child, path + ".")
    return paths


def _select(cfg, key: str):
    return OmegaConf.select(
        cfg, key, default=_ABSENT, throw_on_resolution_failure=False, throw_on_missing=False
    )


def _target_arguments(node) -> Optional[List[str]]:
    """
    The keyword arguments of the ``_target_`` of a LazyCall ``node``; None when it has no
    target, or when the target takes any keyword (``**kwargs``) or cannot be inspected. A class
    whose ``__init__`` passes ``**kwargs`` on to its base classes' takes theirs as well.
    """
    if not isinstance(node, DictConfig) or "_target_" not in node:
        return None
    target = node._get_node("_target_")._value()
    try:
        target = locate(target) if isinstance(target, str) else target
        signatures = [inspect.signature(target)]
        if isinstance(target, type):
            signatures = [
                inspect.signature(cls.__init__) for cls in target.__mro__ if "__init__" in vars(cls)
            ]
    except Exception:
        return None
    names = []
    for signature in signatures:
        parameters = list(signature.parameters.values())
        names += [
            p.name
            for p in parameters
            if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
            and p.name != "self"
        ]
        if not any(p.kind == inspect.Parameter.VAR_KEYWORD for p in parameters):
            return names
    return None  # **kwargs all the way up (or into a function): any keyword may be meant


def _valid(cfg, key: str) -> bool:
    if _select(cfg, key) is not _ABSENT:
        return True
    parent, _, leaf = key.rpartition(".")
    node = _select(cfg, parent) if parent else cfg
    if node is _ABSENT or not isinstance(node, DictConfig) or "_target_" not in node:
        return False
    arguments = _target_arguments(node)
    return arguments is None or leaf in arguments


def _nearest(cfg, key: str) -> List[str]:
    """The valid keys closest to ``key``: among its siblings first, else among all keys."""
    parent, _, leaf = key.rpartition(".")
    node = _select(cfg, parent) if parent else _ABSENT
    if isinstance(node, DictConfig):
        siblings = [path for path in _paths(node) if "." not in path]
        siblings += _target_arguments(node) or []
        close = difflib.get_close_matches(leaf, siblings, n=1)
        if close:
            return [f"{parent}.{close[0]}"]
    return difflib.get_close_matches(key, _paths(cfg), n=1, cutoff=0.6)


def check_override_keys(cfg, overrides: Sequence[str]) -> None:
    """Raise :class:`ConfigOverrideError` for the first override whose key breaks the rule above."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    for override, parsed in zip(overrides, OverridesParser.create().parse_overrides(overrides)):
        key = parsed.key_or_group
        exists = _select(cfg, key) is not _ABSENT
        if parsed.is_add() and exists:
            raise ConfigOverrideError(
                f"Override {override!r} adds the key {key!r}, which the config has already: "
                f"drop the '+' to change its value"
            )
        if parsed.is_add() or parsed.is_force_add() or _valid(cfg, key):
            continue
        close = _nearest(cfg, key)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigOverrideError(
            f"Override {override!r}: {key!r} is neither a key of the config nor an argument of "
            f"the object it builds{hint} (to add a new key on purpose, write +{override})"
        )


def apply_overrides(cfg, overrides: Sequence[str]):
    """:func:`check_override_keys`, then detectron2's ``LazyConfig.apply_overrides``."""
    overrides = list(overrides)
    check_override_keys(cfg, overrides)
    return LazyConfig.apply_overrides(cfg, overrides)
