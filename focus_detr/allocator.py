"""
The process's memory allocator: jemalloc where it is installed, glibc's malloc otherwise.

Training on images whose sizes change from batch to batch (multi-scale augmentation, mixed
datasets) frees and allocates CPU tensors of ever-different sizes. glibc's malloc fragments under
that pattern: ``python -m focus_detr.tools.soak`` measured the demo model's resident memory
growing by 28 MiB per 1000 iterations with it, and staying flat with jemalloc (README, "Progress
is never lost"). An allocator can only be chosen when a process starts (``LD_PRELOAD``), so
:func:`reexec_with_preferred_allocator` restarts the current command once, with jemalloc
preloaded, before torch is imported; ``train_net.py``, the soak tool and ``benchmark_train``
call it first thing.

This module imports nothing but the standard library, so that the restart costs only the
interpreter's start.

Environment variables:

- ``FOCUS_DETR_ALLOCATOR``: ``auto`` (default: jemalloc when found, else the system allocator),
  ``jemalloc`` (stop with an error when it cannot be found or loaded) or ``system`` (never
  restart).
- ``FOCUS_DETR_JEMALLOC``: path of the jemalloc shared library, searched before the usual places.
- ``MALLOC_CONF``: jemalloc's own options, passed through. During training
  ``focus_detr.engine.AllocatorPurgeHook`` turns jemalloc's gradual return of free pages off and
  returns them all every 50 iterations instead, unless ``MALLOC_CONF`` sets a decay time.
"""

import ctypes
import os
import sys
from typing import Callable, List, Mapping, MutableMapping, Optional, Sequence, Tuple

__all__ = [
    "ALLOCATOR_ENV",
    "JEMALLOC_ENV",
    "allocator_mode",
    "describe_allocator",
    "find_jemalloc",
    "jemalloc_candidates",
    "jemalloc_default_decay",
    "jemalloc_purge",
    "jemalloc_set_decay",
    "loaded_allocator",
    "reexec_with_preferred_allocator",
]

ALLOCATOR_ENV = "FOCUS_DETR_ALLOCATOR"
JEMALLOC_ENV = "FOCUS_DETR_JEMALLOC"
# set in the restarted process: a second restart is never attempted
_RESTARTED_ENV = "FOCUS_DETR_ALLOCATOR_RESTARTED"
MODES = ("auto", "jemalloc", "system")

_LIBRARY_NAMES = ("libjemalloc.so.2", "libjemalloc.so")
_LIBRARY_DIRS = (
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/usr/lib64",
    "/usr/lib",
    "/usr/local/lib",
    "/lib/x86_64-linux-gnu",
    "/lib/aarch64-linux-gnu",
)


def allocator_mode(environ: Mapping[str, str] = os.environ) -> str:
    """
    The requested mode, from ``FOCUS_DETR_ALLOCATOR`` (``auto`` when unset or empty).

    Raises:
        ValueError: naming the value, when it is not one of ``auto``, ``jemalloc``, ``system``.
    """
    mode = environ.get(ALLOCATOR_ENV, "").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(
            f"{ALLOCATOR_ENV}={environ[ALLOCATOR_ENV]!r} is not one of {', '.join(MODES)}"
        )
    return mode


def jemalloc_candidates(environ: Mapping[str, str] = os.environ) -> List[str]:
    """
    Where jemalloc is looked for, in order: ``FOCUS_DETR_JEMALLOC``, the Python environment's own
    ``lib`` folder (conda's ``jemalloc`` package), then the system's library folders.
    """
    candidates = []
    if environ.get(JEMALLOC_ENV):
        candidates.append(environ[JEMALLOC_ENV])
    folders = [os.path.join(sys.prefix, "lib")] + list(_LIBRARY_DIRS)
    for folder in folders:
        candidates += [os.path.join(folder, name) for name in _LIBRARY_NAMES]
    return candidates


def find_jemalloc(environ: Mapping[str, str] = os.environ) -> Optional[str]:
    """
    Path of the first jemalloc shared library found (see :func:`jemalloc_candidates`), or None.

    Raises:
        FileNotFoundError: when ``FOCUS_DETR_JEMALLOC`` names a file that does not exist.
    """
    explicit = environ.get(JEMALLOC_ENV)
    if explicit and not os.path.isfile(explicit):
        raise FileNotFoundError(f"{JEMALLOC_ENV}={explicit!r}: no such file")
    for path in jemalloc_candidates(environ):
        if os.path.isfile(path):
            return os.path.realpath(path)
    return None


def _mapped_jemallocs(maps_file: str = "/proc/self/maps") -> List[str]:
    """Paths of the jemalloc libraries mapped into this process (none off Linux)."""
    paths: List[str] = []
    try:
        with open(maps_file) as maps:
            for line in maps:
                fields = line.split(None, 5)
                if len(fields) == 6 and "libjemalloc" in fields[5]:
                    # a library replaced on disk since it was loaded is listed as "... (deleted)"
                    path = fields[5].strip().removesuffix(" (deleted)")
                    if path not in paths:
                        paths.append(path)
    except OSError:
        pass
    return paths


def _jemalloc_serving_malloc(maps_file: str = "/proc/self/maps") -> Optional[ctypes.CDLL]:
    """
    The jemalloc library mapped into this process whose ``malloc`` the process calls, else None
    (a jemalloc loaded privately by some library, or built with a symbol prefix, does not serve
    the process's ``malloc``).
    """
    try:
        called = ctypes.cast(ctypes.CDLL(None).malloc, ctypes.c_void_p).value
    except (OSError, AttributeError):
        return None
    for path in _mapped_jemallocs(maps_file):
        try:
            library = ctypes.CDLL(path)  # already mapped: the same library, not a second copy
            if ctypes.cast(library.malloc, ctypes.c_void_p).value == called:
                return library
        except (OSError, AttributeError):
            continue
    return None


def loaded_allocator(maps_file: str = "/proc/self/maps") -> str:
    """
    ``"jemalloc"`` when this process's ``malloc`` is jemalloc's, else ``"system"``.
    """
    return "system" if _jemalloc_serving_malloc(maps_file) is None else "jemalloc"


def describe_allocator(environ: Mapping[str, str] = os.environ) -> str:
    """One line for the log: the allocator in use and, for jemalloc, its library and options."""
    library = _jemalloc_serving_malloc()
    if library is not None:
        conf = environ.get("MALLOC_CONF")
        conf = f"MALLOC_CONF={conf!r}" if conf else "MALLOC_CONF unset"
        return f"memory allocator: jemalloc {library._name} ({conf})"
    try:
        found = find_jemalloc(environ)
    except FileNotFoundError as error:
        found, missing = None, str(error)
    else:
        missing = "apt install libjemalloc2, conda install jemalloc"
    if allocator_mode(environ) == "system":
        why = f"{ALLOCATOR_ENV}={environ[ALLOCATOR_ENV]}"
    elif found:
        why = (
            f"jemalloc {found} is installed but not preloaded: Python < 3.10, a program read "
            "from stdin, or LD_PRELOAD failed"
        )
    else:
        why = f"jemalloc not found ({missing})"
    return (
        f"memory allocator: the system's malloc ({why}); its resident memory grows in long runs "
        "on images of changing sizes"
    )


def reexec_with_preferred_allocator(
    *,
    environ: Optional[MutableMapping[str, str]] = None,
    argv: Optional[Sequence[str]] = None,
    execve: Callable = os.execve,
) -> str:
    """
    Restart the current command with jemalloc preloaded, when that is wanted and possible.

    Call it before torch is imported. It returns (without restarting) when the mode is
    ``system``, when jemalloc is already loaded, when it cannot be found (mode ``auto``), off
    Linux, in a process that this function already restarted, or when the command cannot be run
    again (Python < 3.10 has no ``sys.orig_argv``; a program read from stdin). Otherwise it
    replaces the process (same pid) by ``sys.executable`` with the original command line
    (``sys.orig_argv``) and an environment whose ``LD_PRELOAD`` starts with jemalloc; it does not
    return then.

    Args:
        environ: the environment (default ``os.environ``).
        argv: the command line to restart (default ``sys.orig_argv``).
        execve: what replaces the process (tests pass a recorder).

    Returns:
        ``"jemalloc"`` or ``"system"``: the allocator this process keeps (jemalloc in mode
        ``system`` too when the process inherited a jemalloc ``LD_PRELOAD``: unset it to run a
        child of a restarted process on the system's malloc).

    Raises:
        ValueError: ``FOCUS_DETR_ALLOCATOR`` has another value than auto, jemalloc or system.
        FileNotFoundError: ``FOCUS_DETR_JEMALLOC`` names a file that does not exist (any mode
            but ``system``).
        RuntimeError: mode ``jemalloc`` and jemalloc cannot be found or did not load.
    """
    environ = os.environ if environ is None else environ
    mode = allocator_mode(environ)
    if mode == "system":
        # "jemalloc" still when this process inherited a jemalloc LD_PRELOAD from its parent
        return loaded_allocator()
    if loaded_allocator() == "jemalloc":
        return "jemalloc"
    command = getattr(sys, "orig_argv", None) if argv is None else argv  # Python >= 3.10
    if sys.argv[:1] in ([""], ["-"]):
        command = None  # a program read from the terminal or stdin cannot be read again
    if environ.get(_RESTARTED_ENV) or not sys.platform.startswith("linux") or not command:
        if mode == "jemalloc":
            raise RuntimeError(
                f"{ALLOCATOR_ENV}=jemalloc but jemalloc is not loaded (platform {sys.platform}, "
                f"restarted {bool(environ.get(_RESTARTED_ENV))}, "
                f"LD_PRELOAD={environ.get('LD_PRELOAD', '')!r})"
            )
        return "system"
    path = find_jemalloc(environ)
    if path is None:
        if mode == "jemalloc":
            raise RuntimeError(
                f"{ALLOCATOR_ENV}=jemalloc but no jemalloc library was found; looked for "
                f"{', '.join(jemalloc_candidates(environ))} (set {JEMALLOC_ENV}=/path/to/it)"
            )
        return "system"
    env = dict(environ)
    preload = [path] + [p for p in env.get("LD_PRELOAD", "").split(":") if p]
    env["LD_PRELOAD"] = ":".join(preload)
    env[_RESTARTED_ENV] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    execve(sys.executable, list(command), env)
    return "jemalloc"  # only reached when execve is a test's recorder


_ALL_ARENAS = 4096  # jemalloc's MALLCTL_ARENAS_ALL


_MALLCTL: List[Callable] = []  # jemalloc's mallctl once found: a process keeps its malloc


def _mallctl() -> Optional[Callable]:
    """jemalloc's ``mallctl`` when jemalloc serves this process's malloc, else None."""
    if not _MALLCTL:
        library = _jemalloc_serving_malloc()
        if library is None:
            return None
        mallctl = library.mallctl
        mallctl.restype = ctypes.c_int
        mallctl.argtypes = [
            ctypes.c_char_p,
            ctypes.c_void_p,
            ctypes.POINTER(ctypes.c_size_t),
            ctypes.c_void_p,
            ctypes.c_size_t,
        ]
        _MALLCTL.append(mallctl)
    return _MALLCTL[0]


def _check(status: int, name: str) -> None:
    if status != 0:
        raise OSError(status, f"jemalloc mallctl('{name}') failed with status {status}")


def jemalloc_purge() -> bool:
    """
    Return every unused page of every jemalloc arena to the operating system now. False (and
    nothing done) when jemalloc is not loaded.
    """
    mallctl = _mallctl()
    if mallctl is None:
        return False
    name = f"arena.{_ALL_ARENAS}.purge"
    _check(mallctl(name.encode(), None, None, None, 0), name)
    return True


def jemalloc_default_decay() -> Optional[Tuple[int, int]]:
    """
    jemalloc's decay times in milliseconds as the process started with them (its defaults or
    ``MALLOC_CONF``'s): ``(dirty, muzzy)``; None when jemalloc is not loaded.
    """
    mallctl = _mallctl()
    if mallctl is None:
        return None
    values = []
    for name in ("opt.dirty_decay_ms", "opt.muzzy_decay_ms"):  # jemalloc >= 5
        ms = ctypes.c_ssize_t()
        size = ctypes.c_size_t(ctypes.sizeof(ms))
        _check(mallctl(name.encode(), ctypes.byref(ms), ctypes.byref(size), None, 0), name)
        values.append(ms.value)
    return values[0], values[1]


def jemalloc_set_decay(dirty_ms: int, muzzy_ms: int) -> bool:
    """
    Set how long jemalloc keeps unused pages before returning them (``-1``: until
    :func:`jemalloc_purge`), for every existing arena and for arenas created later. False (and
    nothing done) when jemalloc is not loaded.
    """
    mallctl = _mallctl()
    if mallctl is None:
        return False
    count = ctypes.c_uint()
    size = ctypes.c_size_t(ctypes.sizeof(count))
    _check(mallctl(b"arenas.narenas", ctypes.byref(count), ctypes.byref(size), None, 0), "narenas")
    for kind, value in (("dirty", dirty_ms), ("muzzy", muzzy_ms)):
        ms = ctypes.c_ssize_t(value)
        length = ctypes.sizeof(ms)
        # the default of arenas created later
        name = f"arenas.{kind}_decay_ms"
        _check(mallctl(name.encode(), None, None, ctypes.byref(ms), length), name)
        for i in range(count.value):
            # arenas not yet in use answer EFAULT: they take the default above when created
            name = f"arena.{i}.{kind}_decay_ms"
            mallctl(name.encode(), None, None, ctypes.byref(ms), length)
    return True
