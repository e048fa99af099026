"""
focus_detr.allocator: when and how a command restarts itself with jemalloc preloaded. The
decisions are tested with a recording ``execve``; a real restart runs in a subprocess where
jemalloc is installed.
"""

import os
import subprocess
import sys
import textwrap

import pytest
from helpers import REPO_ROOT

from focus_detr import allocator
from focus_detr.allocator import (
    allocator_mode,
    describe_allocator,
    find_jemalloc,
    loaded_allocator,
    reexec_with_preferred_allocator,
)

JEMALLOC = find_jemalloc(os.environ)
needs_jemalloc = pytest.mark.skipif(JEMALLOC is None, reason="jemalloc is not installed here")


class _Recorder:
    def __init__(self):
        self.calls = []

    def __call__(self, executable, argv, env):
        self.calls.append((executable, argv, env))


@pytest.fixture
def fake_library(tmp_path):
    path = tmp_path / "libjemalloc.so.2"
    path.write_bytes(b"")
    return str(path)


@pytest.fixture
def system_process(monkeypatch):
    """This test process as if it ran on the system's malloc (CI may run it under jemalloc)."""
    monkeypatch.setattr(allocator, "loaded_allocator", lambda: "system")


def _restart(environ, argv=("python", "train_net.py", "--resume")):
    recorder = _Recorder()
    kept = reexec_with_preferred_allocator(environ=environ, argv=list(argv), execve=recorder)
    return kept, recorder.calls


@pytest.mark.parametrize(
    "value, mode", [("", "auto"), ("JEMALLOC", "jemalloc"), (" system", "system")]
)
def test_mode_from_the_environment(value, mode):
    assert allocator_mode({"FOCUS_DETR_ALLOCATOR": value}) == mode
    assert allocator_mode({}) == "auto"


def test_an_unknown_mode_is_rejected_with_its_value():
    with pytest.raises(ValueError, match="FOCUS_DETR_ALLOCATOR='tcmalloc' is not one of auto"):
        allocator_mode({"FOCUS_DETR_ALLOCATOR": "tcmalloc"})
    with pytest.raises(ValueError, match="tcmalloc"):
        _restart({"FOCUS_DETR_ALLOCATOR": "tcmalloc"})


def test_an_explicit_library_path_is_searched_first_and_must_exist(fake_library, tmp_path):
    assert find_jemalloc({"FOCUS_DETR_JEMALLOC": fake_library}) == fake_library
    missing = str(tmp_path / "nowhere.so")
    with pytest.raises(FileNotFoundError, match="nowhere.so"):
        find_jemalloc({"FOCUS_DETR_JEMALLOC": missing})


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD restart is Linux's")
def test_auto_restarts_the_same_command_with_jemalloc_preloaded(fake_library, system_process):
    environ = {"FOCUS_DETR_JEMALLOC": fake_library, "LD_PRELOAD": "libother.so", "HOME": "/h"}
    kept, calls = _restart(environ)
    assert kept == "jemalloc"
    [(executable, argv, env)] = calls
    assert executable == sys.executable
    assert argv == ["python", "train_net.py", "--resume"]
    # jemalloc first, what the user preloaded kept after it
    assert env["LD_PRELOAD"] == f"{fake_library}:libother.so"
    assert env["HOME"] == "/h"
    assert "MALLOC_CONF" not in env
    assert env["FOCUS_DETR_ALLOCATOR_RESTARTED"] == "1"
    assert "LD_PRELOAD" in environ and environ["LD_PRELOAD"] == "libother.so"  # not modified

    # the user's own jemalloc options win
    _, [(_, _, env)] = _restart(dict(environ, MALLOC_CONF="narenas:1"))
    assert env["MALLOC_CONF"] == "narenas:1"


def test_no_restart_when_not_wanted_or_not_possible(fake_library, system_process):
    found = {"FOCUS_DETR_JEMALLOC": fake_library}
    # asked for the system's malloc
    assert _restart(dict(found, FOCUS_DETR_ALLOCATOR="system")) == ("system", [])
    # already restarted once (the preload did not take): never a loop
    assert _restart(dict(found, FOCUS_DETR_ALLOCATOR_RESTARTED="1")) == ("system", [])
    # no command line to restart (Python < 3.10 has no sys.orig_argv)
    assert _restart(found, argv=()) == ("system", [])


def test_a_program_read_from_stdin_is_not_restarted(fake_library, system_process, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["-"])
    assert _restart({"FOCUS_DETR_JEMALLOC": fake_library}, argv=["python", "-"]) == ("system", [])


def test_no_restart_without_jemalloc_unless_it_is_required(monkeypatch, system_process):
    monkeypatch.setattr(allocator, "find_jemalloc", lambda environ: None)
    assert _restart({}) == ("system", [])
    with pytest.raises(RuntimeError, match="FOCUS_DETR_ALLOCATOR=jemalloc but no jemalloc"):
        _restart({"FOCUS_DETR_ALLOCATOR": "jemalloc"})
    with pytest.raises(RuntimeError, match="restarted True"):
        _restart({"FOCUS_DETR_ALLOCATOR": "jemalloc", "FOCUS_DETR_ALLOCATOR_RESTARTED": "1"})


def test_no_restart_when_jemalloc_is_already_loaded(monkeypatch, fake_library):
    monkeypatch.setattr(allocator, "loaded_allocator", lambda: "jemalloc")
    assert _restart({"FOCUS_DETR_JEMALLOC": fake_library}) == ("jemalloc", [])
    # inherited from a restarted parent: still jemalloc, whatever the mode says
    assert _restart({"FOCUS_DETR_ALLOCATOR": "system"}) == ("jemalloc", [])


def test_the_mapped_jemallocs_are_read_from_the_process_maps(tmp_path):
    maps = tmp_path / "maps"
    maps.write_text(
        "7f00-7f01 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6\n"
        "7f02-7f03 r-xp 0 08:01 2 /opt/my lib/libjemalloc.so.2\n"
        "7f03-7f04 r--p 0 08:01 2 /opt/my lib/libjemalloc.so.2\n"
        "7f05-7f06 r-xp 0 08:01 3 /usr/lib/libjemalloc.so.2 (deleted)\n"
    )
    assert allocator._mapped_jemallocs(str(maps)) == [
        "/opt/my lib/libjemalloc.so.2",
        "/usr/lib/libjemalloc.so.2",  # replaced on disk since it was loaded
    ]
    # mapped but not loadable: not the allocator
    assert loaded_allocator(str(maps)) == "system"
    maps.write_text("7f00-7f01 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6\n")
    assert allocator._mapped_jemallocs(str(maps)) == []
    assert loaded_allocator(str(maps)) == "system"
    assert allocator._mapped_jemallocs(str(tmp_path / "no-maps")) == []


class _Library:
    _name = "/lib/libjemalloc.so.2"


def test_describe_allocator_names_the_allocator_and_why(monkeypatch, tmp_path):
    monkeypatch.setattr(allocator, "_jemalloc_serving_malloc", lambda: None)
    assert "FOCUS_DETR_ALLOCATOR=system" in describe_allocator({"FOCUS_DETR_ALLOCATOR": "system"})
    monkeypatch.setattr(allocator, "find_jemalloc", lambda environ: None)
    assert "jemalloc not found (apt install libjemalloc2" in describe_allocator({})
    monkeypatch.setattr(allocator, "find_jemalloc", lambda environ: "/lib/libjemalloc.so.2")
    assert "jemalloc /lib/libjemalloc.so.2 is installed but not preloaded" in describe_allocator({})
    monkeypatch.undo()
    monkeypatch.setattr(allocator, "_jemalloc_serving_malloc", lambda: None)
    missing = str(tmp_path / "nowhere.so")
    assert f"{missing!r}: no such file" in describe_allocator({"FOCUS_DETR_JEMALLOC": missing})

    monkeypatch.setattr(allocator, "_jemalloc_serving_malloc", lambda: _Library())
    described = describe_allocator({"MALLOC_CONF": "x:1"})
    assert described == "memory allocator: jemalloc /lib/libjemalloc.so.2 (MALLOC_CONF='x:1')"
    assert describe_allocator({}).endswith("(MALLOC_CONF unset)")


_PROGRAM = textwrap.dedent("""
    import os, sys
    from focus_detr.allocator import loaded_allocator, reexec_with_preferred_allocator
    print("pid", os.getpid(), flush=True)
    reexec_with_preferred_allocator()
    print("kept", loaded_allocator(), os.getpid(), os.environ.get("MALLOC_CONF", ""), sys.argv[1:])
    """)


def _run(tmp_path, **env):
    program = tmp_path / "program.py"
    program.write_text(_PROGRAM)
    environ = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MALLOC_CONF")}
    environ = {k: v for k, v in environ.items() if not k.startswith("FOCUS_DETR_ALLOC")}
    environ.update(env, PYTHONPATH=str(REPO_ROOT))
    result = subprocess.run(
        [sys.executable, str(program), "--flag", "x y"],
        env=environ,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.split("\n")


@needs_jemalloc
def test_a_real_restart_keeps_the_pid_and_the_arguments_and_loads_jemalloc(tmp_path):
    pid_before, pid_again, kept, _ = _run(tmp_path)
    pid = pid_before.split()[1]
    assert pid_again == pid_before  # the restarted program starts over, in the same process
    assert kept == f"kept jemalloc {pid}  ['--flag', 'x y']"


def test_a_real_run_keeps_the_system_malloc_when_asked(tmp_path):
    pid_before, kept, _ = _run(tmp_path, FOCUS_DETR_ALLOCATOR="system")
    assert kept == f"kept system {pid_before.split()[1]}  ['--flag', 'x y']"


_PURGE_PROGRAM = textwrap.dedent("""
    import os
    from focus_detr.allocator import jemalloc_purge, jemalloc_set_decay, loaded_allocator

    def rss():
        return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") >> 20

    def allocate_and_free():
        # 128 MiB in 4 MiB blocks (jemalloc's arenas) and 64 MiB in one (its oversize arena)
        blocks = [bytes([i]) * (4 << 20) for i in range(32)] + [b"y" * (64 << 20)]
        used = rss()
        del blocks
        return used, rss()

    assert loaded_allocator() == "jemalloc"
    base = rss()
    jemalloc_set_decay(0, 0)
    print("decay 0:", *allocate_and_free(), flush=True)
    jemalloc_set_decay(-1, -1)
    print("decay off:", *allocate_and_free(), flush=True)
    assert jemalloc_purge()
    print("base", base, "purged", rss())
    """)


@needs_jemalloc
def test_jemalloc_decay_and_purge_really_keep_and_return_pages(tmp_path):
    program = tmp_path / "purge.py"
    program.write_text(_PURGE_PROGRAM)
    environ = {k: v for k, v in os.environ.items() if k != "MALLOC_CONF"}
    environ.update(LD_PRELOAD=JEMALLOC, PYTHONPATH=str(REPO_ROOT), FOCUS_DETR_ALLOCATOR="system")
    result = subprocess.run(
        [sys.executable, str(program)], env=environ, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    immediate, kept, purged = result.stdout.splitlines()
    used, freed = map(int, immediate.split()[-2:])
    assert used - freed > 150, result.stdout  # returned at once with decay 0
    used, freed = map(int, kept.split()[-2:])
    assert used - freed < 20, result.stdout  # kept with decay off
    base, after = int(purged.split()[1]), int(purged.split()[3])
    assert after - base < 30 < freed - base, result.stdout  # returned by the purge


def test_without_jemalloc_the_purge_and_decay_calls_do_nothing(monkeypatch):
    monkeypatch.setattr(allocator, "_mallctl", lambda: None)
    assert not allocator.jemalloc_purge()
    assert not allocator.jemalloc_set_decay(-1, -1)
    assert allocator.jemalloc_default_decay() is None
