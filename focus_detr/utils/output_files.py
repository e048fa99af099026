"""
Checks for the files a tool writes: never over one of its inputs, never over an existing file
without an explicit flag. Call them before any slow work, so that a mistake costs nothing.
"""

import os
from typing import Iterable, Optional

__all__ = ["OutputPathError", "check_not_an_input", "check_output_file"]


class OutputPathError(ValueError):
    """An output path would replace an input or an existing file."""


def _same_file(a: str, b: str) -> bool:
    if os.path.exists(a) and os.path.exists(b):
        return os.path.samefile(a, b)  # hard links and symbolic links included
    return os.path.realpath(a) == os.path.realpath(b)


def check_not_an_input(
    path: str, inputs: Iterable[Optional[str]], *, hint: str = "choose another output path"
) -> None:
    """Raise :class:`OutputPathError` when ``path`` is the same file as one of ``inputs``."""
    for source in inputs:
        if source and _same_file(path, source):
            raise OutputPathError(
                f"The output {path} is the input {source}: writing it would destroy the input; "
                f"{hint}"
            )


def check_output_file(
    path: str,
    *,
    inputs: Iterable[Optional[str]] = (),
    overwrite: bool = False,
    flag: str = "--overwrite",
) -> None:
    """
    Raise :class:`OutputPathError` unless ``path`` may be written: it is none of ``inputs``
    (compared as files: links and relative paths resolved) and does not exist. ``overwrite``
    (the user's ``flag``) allows both.
    """
    if overwrite:
        return
    check_not_an_input(path, inputs, hint=f"choose another output path (or add {flag})")
    if os.path.lexists(path):
        raise OutputPathError(
            f"The output {path} exists: choose another output path, or add {flag} to replace it"
        )
