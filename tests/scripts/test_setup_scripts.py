"""
The set-up scripts: setup_env.sh leaves the caller's shell options alone and runs only $PYTHON,
check_cuda_build.sh runs $PYTHON, run_demo.sh preloads jemalloc where it is installed, and the
detectron2 and torch wheels are installed only when their sha256 is the pinned one. Fake
interpreters stand in for Python, so nothing is installed.
"""

import hashlib
import importlib.util
import os
import re
import shutil
import stat
import subprocess
import sys
import zipfile

import pytest
from helpers import REPO_ROOT

SCRIPTS = REPO_ROOT / "scripts"

# Logs its arguments (and LD_PRELOAD for the demo's commands); fails when they match $FAKE_FAIL
# (a grep -E pattern); answers scripts/check_env.py with $FAKE_FOUND; else prints a version.
_FAKE_PYTHON = """#!/usr/bin/env bash
echo "$*" >> "$FAKE_LOG"
if [ -n "${FAKE_FAIL:-}" ] && echo "$*" | grep -Eq "$FAKE_FAIL"; then exit 1; fi
case "$*" in
  *check_env.py*) printf "%b" "${FAKE_FOUND:-}"; exit 0;;
  *train_net.py*|*focus_detr.demo*) echo "LD_PRELOAD=${LD_PRELOAD:-}" >> "$FAKE_LOG"; exit 0;;
esac
echo 2.14.1
"""

# Logs its arguments to $FAKE_APT_LOG; fails when $FAKE_APT_FAIL is set, else creates the file
# $FAKE_APT_CREATES (if set).
_FAKE_APT = """#!/usr/bin/env bash
echo "$*" >> "$FAKE_APT_LOG"
[ -z "${FAKE_APT_FAIL:-}" ] || exit 1
[ -z "${FAKE_APT_CREATES:-}" ] || touch "$FAKE_APT_CREATES"
"""

_TORCH_OK = "torch ok 2.14.1 0.29.1\\n"
_ALL_OK = _TORCH_OK + "detectron2 ok\\nfocus_detr ok\\ndevtools ok\\n"
_NOTHING_ELSE = "detectron2 missing x\\nfocus_detr missing x\\n"


def _executable(path, text):
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


@pytest.fixture
def fakes(tmp_path):
    """
    A fake interpreter (logging to fake.log), a python3 on PATH that must not run, fake apt-get
    (logging to apt.log), id (uid $FAKE_UID, default 1000) and ldconfig (prints $FAKE_LDCONFIG),
    so that nothing is installed; jemalloc is looked for in the empty folder lib/ only.
    """
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    python = _executable(bin_dir / "fake-python", _FAKE_PYTHON)
    for name in ("python3", "python"):
        _executable(bin_dir / name, f'#!/usr/bin/env bash\necho "$*" >> {tmp_path}/wrong.log\n')
    _executable(bin_dir / "apt-get", _FAKE_APT)
    _executable(bin_dir / "id", '#!/usr/bin/env bash\necho "${FAKE_UID:-1000}"\n')
    _executable(bin_dir / "ldconfig", '#!/usr/bin/env bash\nprintf "%b" "${FAKE_LDCONFIG:-}"\n')
    (tmp_path / "lib").mkdir()
    env = dict(
        os.environ,
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        FAKE_LOG=str(tmp_path / "fake.log"),
        FAKE_APT_LOG=str(tmp_path / "apt.log"),
        PYTHON=str(python),
        FOCUS_DETR_LIB_DIRS=str(tmp_path / "lib"),
    )
    for name in ("FOCUS_DETR_TORCH_PAIR", "CONDA_PREFIX", "LD_PRELOAD"):
        env.pop(name, None)
    return env


def _log(env):
    path = env["FAKE_LOG"]
    return open(path).read().splitlines() if os.path.exists(path) else []


def _bash(script, env, cwd):
    return subprocess.run(
        ["bash", "-c", script], env=env, cwd=cwd, capture_output=True, text=True, timeout=120
    )


def _repository_copy(tmp_path):
    """What setup_env.sh reads, in a folder of its own: its build stamp lands there."""
    root = tmp_path / "repo"
    shutil.copytree(SCRIPTS, root / "scripts")
    shutil.copy(REPO_ROOT / "setup.py", root / "setup.py")
    shutil.copytree(REPO_ROOT / "focus_detr" / "csrc", root / "focus_detr" / "csrc")
    return root


_OPTIONS = 'options() { set -o; shopt; echo "$-"; }'


@pytest.mark.parametrize("fail", ["", "torch", "sys.version_info"])
def test_sourcing_and_running_setup_keeps_the_callers_shell_options(tmp_path, fakes, fail):
    root = _repository_copy(tmp_path)
    fakes["FAKE_FAIL"] = fail if fail == "sys.version_info" else ""
    torch_found = "torch missing x\\n" if fail == "torch" else _TORCH_OK
    fakes["FAKE_FOUND"] = torch_found + _NOTHING_ELSE
    result = _bash(
        f"""{_OPTIONS}
        before="$(options)"
        source scripts/setup_env.sh
        [ "$(options)" = "$before" ] || {{ echo "sourcing changed options"; exit 3; }}
        focus_detr_setup; status=$?
        [ "$(options)" = "$before" ] || {{ echo "focus_detr_setup changed options"; exit 4; }}
        echo "status=$status PYTHON=$PYTHON"
        """,
        fakes,
        root,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    calls = _log(fakes)
    assert not (tmp_path / "wrong.log").exists(), "an interpreter other than $PYTHON ran"
    if fail == "sys.version_info":
        assert "status=1" in result.stdout and "is too old" in result.stderr
        return
    assert f"status=0 PYTHON={fakes['PYTHON']}" in result.stdout, result.stderr
    assert any("install_detectron2.py" in call for call in calls)
    assert any("pip install --quiet --no-build-isolation -e ." in call for call in calls)
    assert (root / "build" / ".focus_detr_extension_stamp").exists()
    requirements = root / "scripts" / "requirements-torch.txt"
    hashed = f"-m pip install --quiet --require-hashes --no-deps -r {requirements}"
    if fail:  # no working torch: the hash-checked wheels, then their dependencies
        index = calls.index(hashed)
        assert calls[index + 1] == "-m pip install --quiet torch==2.14.1 torchvision==0.29.1"
    else:
        assert hashed not in calls


def test_setup_with_everything_in_place_checks_in_one_interpreter_and_installs_nothing(
    tmp_path, fakes
):
    root = _repository_copy(tmp_path)
    fakes["FAKE_FOUND"] = _TORCH_OK + _NOTHING_ELSE
    first = _bash("source scripts/setup_env.sh && focus_detr_setup --dev", fakes, root)
    assert first.returncode == 0, first.stdout + first.stderr
    assert any("install_detectron2.py" in call for call in _log(fakes))
    os.remove(fakes["FAKE_LOG"])

    fakes["FAKE_FOUND"] = _ALL_OK  # what check_env.py reports once the first run installed it
    (tmp_path / "lib" / "libjemalloc.so.2").touch()
    second = _bash("source scripts/setup_env.sh && focus_detr_setup --dev", fakes, root)
    assert second.returncode == 0, second.stdout + second.stderr
    calls = _log(fakes)
    assert len(calls) == 2, calls  # the version check and one check_env.py
    assert "check_env.py" in calls[1] and calls[1].endswith("--dev")
    assert "torch/torchvision: 2.14.1 0.29.1 (kept)" in second.stdout
    assert "with its extension (kept)" in second.stdout
    assert f"jemalloc: {tmp_path}/lib/libjemalloc.so.2 (kept)" in second.stdout
    assert not os.path.exists(fakes["FAKE_APT_LOG"])

    # a changed kernel source changes the stamp: rebuilt although the package imports
    kernel = root / "focus_detr" / "csrc" / "ms_deform_attn.cpp"
    kernel.write_text(kernel.read_text() + "\n// changed\n")
    os.remove(fakes["FAKE_LOG"])
    third = _bash("source scripts/setup_env.sh && focus_detr_setup --dev", fakes, root)
    assert third.returncode == 0, third.stdout + third.stderr
    assert any("pip install --quiet --no-build-isolation -e ." in call for call in _log(fakes))


def test_check_env_reports_each_component(tmp_path):
    script = SCRIPTS / "check_env.py"
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path), "--dev"],
        cwd="/",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines())
    assert sorted(lines) == ["detectron2", "devtools", "focus_detr", "torch"]
    import torch

    assert lines["torch"].startswith(f"ok {torch.__version__} ")
    assert lines["detectron2"] == "ok"
    # this interpreter's focus_detr is not under tmp_path: reported missing, with where it is
    assert lines["focus_detr"].startswith("missing ")


@pytest.mark.parametrize(
    "uid, apt_fails, installs, said",
    [
        ("0", "", True, "jemalloc: installed libjemalloc2 ({lib}/libjemalloc.so.2)"),
        ("0", "1", True, "apt-get could not install libjemalloc2"),
        ("1000", "", False, "install it with apt install libjemalloc2 or conda install jemalloc"),
    ],
)
def test_setup_installs_a_missing_jemalloc_only_as_root_with_apt(
    tmp_path, fakes, uid, apt_fails, installs, said
):
    root = _repository_copy(tmp_path)
    (root / "build").mkdir()
    lib = tmp_path / "lib"
    fakes.update(
        FAKE_FOUND=_ALL_OK,
        FAKE_UID=uid,
        FAKE_APT_FAIL=apt_fails,
        FAKE_APT_CREATES=str(lib / "libjemalloc.so.2"),
    )
    result = _bash("source scripts/setup_env.sh && focus_detr_setup", fakes, root)
    # never fatal: training runs on the system's malloc without it
    assert result.returncode == 0, result.stdout + result.stderr
    assert said.format(lib=lib) in result.stdout
    apt = _log(dict(FAKE_LOG=fakes["FAKE_APT_LOG"]))
    if installs:
        assert "install -y -qq --no-install-recommends libjemalloc2" in apt
        # a failed install updates the package lists and tries again (the fake fails both)
        assert apt[1:] == (["update -qq"] if apt_fails else []), apt
    else:
        assert apt == []


def test_jemalloc_is_found_in_conda_then_the_library_folders_then_by_ldconfig(tmp_path, fakes):
    conda, system = tmp_path / "conda", tmp_path / "system"
    (conda / "lib").mkdir(parents=True)
    system.mkdir()
    fakes.update(
        FOCUS_DETR_LIB_DIRS=f"{tmp_path}/lib {system}",
        FAKE_LDCONFIG="\\tlibc.so.6 (libc6,x86-64) => /ld/libc.so.6\\n"
        "\\tlibjemalloc.so.2 (libc6,x86-64) => /ld/libjemalloc.so.2\\n",
    )

    def found():
        result = _bash("source scripts/setup_env.sh && focus_detr_find_jemalloc", fakes, REPO_ROOT)
        assert result.returncode == 0, result.stderr
        return result.stdout

    assert found() == "/ld/libjemalloc.so.2\n"
    (system / "libjemalloc.so.2").touch()
    assert found() == f"{system}/libjemalloc.so.2\n"
    (conda / "lib" / "libjemalloc.so.2").touch()
    fakes["CONDA_PREFIX"] = str(conda)
    assert found() == f"{conda}/lib/libjemalloc.so.2\n"
    fakes.update(CONDA_PREFIX=str(tmp_path), FOCUS_DETR_LIB_DIRS=str(tmp_path), FAKE_LDCONFIG="")
    assert found() == ""


@pytest.mark.parametrize("installed", [True, False])
def test_run_demo_preloads_jemalloc_where_it_is_installed(tmp_path, fakes, installed):
    root = _repository_copy(tmp_path)
    library = tmp_path / "lib" / "libjemalloc.so.2"
    if installed:
        library.write_bytes(b"")  # not loadable: the loader skips it with a message
    fakes["FAKE_FOUND"] = _ALL_OK
    result = _bash("bash scripts/run_demo.sh out train.max_iter=5", fakes, root)
    assert result.returncode == 0, result.stdout + result.stderr
    calls = _log(fakes)
    train = next(i for i, call in enumerate(calls) if call.startswith("train_net.py"))
    assert "train.output_dir=out train.max_iter=5" in calls[train]
    demo = next(i for i, call in enumerate(calls) if call.startswith("-m focus_detr.demo"))
    # training and the pictures both run with it
    expected = f"LD_PRELOAD={library if installed else ''}"
    assert calls[train + 1] == calls[demo + 1] == expected
    said = f"jemalloc (LD_PRELOAD={library})" if installed else "the system's malloc (jemalloc"
    assert f"[setup] memory allocator: {said}" in result.stdout


def test_run_demo_a_second_time_resumes_the_first_run_and_says_so(tmp_path, fakes):
    root = _repository_copy(tmp_path)
    fakes["FAKE_FOUND"] = _ALL_OK
    result = _bash("bash scripts/run_demo.sh out", fakes, root)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[demo] training from scratch into out" in result.stdout
    # the first run's checkpoints: the second run resumes it (train_net.py evaluates a complete
    # run without training it; an interrupted one continues)
    (root / "out").mkdir()
    (root / "out" / "last_checkpoint").write_text("model_final.pth")
    result = _bash("bash scripts/run_demo.sh out", fakes, root)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[demo] out holds a run: resuming it" in result.stdout
    assert "bash scripts/run_demo.sh OTHER_DIR" in result.stdout
    runs = [call for call in _log(fakes) if call.startswith("train_net.py")]
    assert len(runs) == 2 and all("--resume train.output_dir=out" in run for run in runs)


def test_preloading_twice_keeps_one_jemalloc_and_the_callers_preloads(tmp_path, fakes):
    library = tmp_path / "lib" / "libjemalloc.so.2"
    library.write_bytes(b"")
    result = _bash(
        """source scripts/setup_env.sh
        LD_PRELOAD=/other.so
        focus_detr_preload_jemalloc >/dev/null
        focus_detr_preload_jemalloc >/dev/null
        printf '%s' "$LD_PRELOAD" """,
        fakes,
        REPO_ROOT,
    )
    assert result.stdout == f"{library}:/other.so"


def test_setup_without_an_interpreter_fails_without_leaving_the_shell(tmp_path, fakes):
    fakes["PYTHON"] = str(tmp_path / "no-such-python")
    result = _bash(
        f"""{_OPTIONS}
        before="$(options)"
        source scripts/setup_env.sh
        focus_detr_setup --dev || echo "returned $?"
        [ "$(options)" = "$before" ] && echo "options kept"
        """,
        fakes,
        REPO_ROOT,
    )
    assert "returned 1" in result.stdout and "options kept" in result.stdout
    assert f"no Python interpreter '{tmp_path}/no-such-python'" in result.stderr


def test_check_cuda_build_compiles_with_python(tmp_path, fakes):
    cuda_home = tmp_path / "cuda"
    (cuda_home / "bin").mkdir(parents=True)
    _executable(cuda_home / "bin" / "nvcc", "#!/usr/bin/env bash\necho 'release 13.0'\n")
    fakes.update(CUDA_HOME=str(cuda_home), FAKE_FAIL="build_ext")
    result = _bash("bash scripts/check_cuda_build.sh", fakes, REPO_ROOT)
    assert result.returncode == 1 and "FAILED" in result.stderr
    assert any(call.startswith("setup.py build_ext") for call in _log(fakes))
    assert not (tmp_path / "wrong.log").exists()


@pytest.fixture(scope="module")
def installer():
    spec = importlib.util.spec_from_file_location(
        "install_detectron2", SCRIPTS / "install_detectron2.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fake_wheel(path):
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr("detectron2/__init__.py", "__version__ = 'fake'\n")
        wheel.writestr("tools/train_net.py", "")
        wheel.writestr("sal_detectron2-0.7.2.dist-info/METADATA", "Name: sal-detectron2\n")
    return path


def test_a_detectron2_wheel_with_another_hash_is_not_unpacked(tmp_path, installer):
    wheel = _fake_wheel(tmp_path / installer.WHEEL_FILE)
    actual = hashlib.sha256(wheel.read_bytes()).hexdigest()
    target = tmp_path / "site-packages"
    target.mkdir()
    argv = ["--force", "--wheel", str(wheel), "--target", str(target), "--no-requirements"]
    with pytest.raises(SystemExit, match=f"sha256 {actual}, expected {installer.WHEEL_SHA256}"):
        installer.main(argv)
    assert list(target.iterdir()) == []


def test_the_pinned_detectron2_wheel_is_unpacked_without_its_tools(
    tmp_path, installer, monkeypatch
):
    wheel = _fake_wheel(tmp_path / installer.WHEEL_FILE)
    monkeypatch.setattr(installer, "WHEEL_SHA256", hashlib.sha256(wheel.read_bytes()).hexdigest())
    target = tmp_path / "site-packages"
    argv = ["--force", "--wheel", str(wheel), "--target", str(target), "--no-requirements"]
    assert installer.main(argv) == 0
    assert sorted(p.name for p in target.iterdir()) == [
        "detectron2",
        "sal_detectron2-0.7.2.dist-info",
    ]


def test_pip_refuses_torch_wheels_with_other_bytes(tmp_path, fakes):
    requirements = (SCRIPTS / "requirements-torch.txt").read_text()
    pins = dict(re.findall(r"^(torch|torchvision)==(\S+) \\$", requirements, re.MULTILINE))
    setup = (SCRIPTS / "setup_env.sh").read_text()
    assert f"torch=={pins['torch']} torchvision=={pins['torchvision']}" in setup
    assert len(re.findall(r"--hash=sha256:[0-9a-f]{64}", requirements)) >= 2 * 16
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for name, version in pins.items():
        _fake_wheel(wheels / f"{name}-{version}-py3-none-any.whl")
    result = subprocess.run(
        [
            sys.executable,
            "-m", "pip", "install", "--isolated", "--dry-run", "--ignore-installed",
            "--require-hashes", "--no-deps", "--no-index", "--find-links", str(wheels),
            "-r", str(SCRIPTS / "requirements-torch.txt"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert result.returncode != 0
    assert "DO NOT MATCH THE HASHES" in result.stderr, result.stderr
