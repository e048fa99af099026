#!/usr/bin/env bash
# Idempotent set-up of everything focus-detr needs, in the Python environment of $PYTHON
# (default: python3). Sourced by scripts/run_demo.sh and scripts/run_tests.sh; can run alone:
#     bash scripts/setup_env.sh [--dev]
# Each step checks first and only installs what is missing or broken:
#   1. a torch/torchvision pair whose compiled ops load (else torch==2.14.1 torchvision==0.29.1),
#   2. detectron2 when it is not importable (an importable detectron2 is never replaced),
#   3. with --dev: pytest, black, isort, flake8, and onnx/onnxscript/onnxruntime (export tests),
#   4. this package, editable, with its C++ (and, with a GPU or FORCE_CUDA=1, CUDA) extension,
#      rebuilt when the kernel sources or the torch version changed,
#   5. jemalloc, which run_demo.sh preloads: when it is missing and this is root with apt-get,
#      Debian's libjemalloc2; otherwise how to install it is printed (never fatal).
# Sourcing it defines focus_detr_setup, focus_detr_find_jemalloc and focus_detr_preload_jemalloc
# and sets FOCUS_DETR_ROOT, FOCUS_DETR_LIB_DIRS and PYTHON, nothing else: no shell option
# (set -e, pipefail, ...) of the caller changes. focus_detr_setup runs its steps in a
# subshell with `set -euo pipefail`; on failure it returns 1 (it never exits the caller's shell)
# and on success sets PYTHON to the interpreter's absolute path. Every interpreter it runs is
# $PYTHON.

FOCUS_DETR_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
# folders searched for libjemalloc.so.2 after the active conda environment, before `ldconfig -p`
FOCUS_DETR_LIB_DIRS="${FOCUS_DETR_LIB_DIRS:-/usr/lib/x86_64-linux-gnu /usr/lib/aarch64-linux-gnu /usr/lib64 /usr/lib /usr/local/lib}"

# Prints the path of libjemalloc.so.2 ($CONDA_PREFIX/lib, FOCUS_DETR_LIB_DIRS, then `ldconfig -p`),
# nothing when there is none.
focus_detr_find_jemalloc() {
  local dir
  for dir in ${CONDA_PREFIX:+"$CONDA_PREFIX/lib"} $FOCUS_DETR_LIB_DIRS; do
    if [ -f "$dir/libjemalloc.so.2" ]; then
      echo "$dir/libjemalloc.so.2"
      return 0
    fi
  done
  { ldconfig -p 2>/dev/null || true; } | awk '$1 == "libjemalloc.so.2" { print $NF; exit }'
}

# Exports LD_PRELOAD with jemalloc in front when it is found, for the commands the caller starts:
# glibc's malloc fragments in long CPU runs on images of changing sizes, jemalloc does not
# (docs/benchmarks.md, "Memory").
focus_detr_preload_jemalloc() {
  local library
  library="$(focus_detr_find_jemalloc)"
  if [ -z "$library" ]; then
    _focus_detr_say "memory allocator: the system's malloc (jemalloc not found)"
    return 0
  fi
  case ":${LD_PRELOAD:-}:" in
    *":$library:"*) ;;
    *) export LD_PRELOAD="$library${LD_PRELOAD:+:$LD_PRELOAD}" ;;
  esac
  _focus_detr_say "memory allocator: jemalloc (LD_PRELOAD=$LD_PRELOAD)"
}

focus_detr_setup() {
  # absolute, so that checks can run from / (where this checkout cannot shadow the install)
  local resolved
  if ! resolved="$(command -v "$PYTHON" 2>/dev/null)"; then
    echo "[setup] FAILED: no Python interpreter '$PYTHON'" >&2
    echo "[setup] what to do: install Python >= 3.9 or set PYTHON=/path/to/python" >&2
    return 1
  fi
  PYTHON="$(cd "$(dirname "$resolved")" && pwd)/$(basename "$resolved")"
  (set -euo pipefail && _focus_detr_setup_steps "$@")
}

_focus_detr_say() { echo "[setup] $*"; }
_focus_detr_fail() {
  echo "[setup] FAILED: $1" >&2
  echo "[setup] what to do: $2" >&2
  exit 1 # the subshell of focus_detr_setup
}

_focus_detr_setup_steps() {
  local dev=0
  [ "${1:-}" = "--dev" ] && dev=1
  local TORCH_PAIR="${FOCUS_DETR_TORCH_PAIR:-torch==2.14.1 torchvision==0.29.1}"
  "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 9))' \
    || _focus_detr_fail "$("$PYTHON" --version 2>&1) is too old" "use Python >= 3.9 (set PYTHON=...)"

  # What is there already: one interpreter checks every component (scripts/check_env.py), from /
  # so that this checkout cannot shadow the installed package.
  local found
  found="$(cd / && "$PYTHON" "$FOCUS_DETR_ROOT/scripts/check_env.py" "$FOCUS_DETR_ROOT" \
    $([ "$dev" = 1 ] && echo --dev) 2>/dev/null)" || found=""
  _focus_detr_found() { echo "$found" | grep -q "^$1 ok"; }

  # 1. torch + torchvision whose compiled ops load together.
  local torch_version
  if _focus_detr_found torch; then
    _focus_detr_say "torch/torchvision: $(echo "$found" | sed -n 's/^torch ok //p') (kept)"
    torch_version="$(echo "$found" | sed -n 's/^torch ok \([^ ]*\).*/\1/p')"
  else
    if [ -n "${FOCUS_DETR_TORCH_PAIR:-}" ]; then
      _focus_detr_say "torch/torchvision missing or their compiled ops do not load: installing $TORCH_PAIR (FOCUS_DETR_TORCH_PAIR, not hash-checked)"
      # shellcheck disable=SC2086
      "$PYTHON" -m pip install --quiet $TORCH_PAIR \
        || _focus_detr_fail "pip install $TORCH_PAIR" "check the network/pip index, or install a matching torch/torchvision pair yourself and rerun"
    else
      _focus_detr_say "torch/torchvision missing or their compiled ops do not load: installing $TORCH_PAIR, wheels checked against scripts/requirements-torch.txt"
      "$PYTHON" -m pip install --quiet --require-hashes --no-deps -r "$FOCUS_DETR_ROOT/scripts/requirements-torch.txt" \
        || _focus_detr_fail "pip install --require-hashes -r scripts/requirements-torch.txt" "a hash mismatch means the downloaded wheels are not the pinned ones; without a wheel for this Python/platform install a torch/torchvision pair yourself (or set FOCUS_DETR_TORCH_PAIR) and rerun"
      # their dependencies, at the versions the verified wheels' metadata pins
      # shellcheck disable=SC2086
      "$PYTHON" -m pip install --quiet $TORCH_PAIR \
        || _focus_detr_fail "pip install the dependencies of $TORCH_PAIR" "check the network/pip index and rerun"
    fi
    torch_version="$("$PYTHON" -c 'import torch; print(torch.__version__)')" \
      || _focus_detr_fail "torch was installed but does not import" "run: $PYTHON -c 'import torch' to see the error"
  fi

  # 2. detectron2 (fills in only what is missing).
  if _focus_detr_found detectron2; then
    _focus_detr_say "detectron2: importable (kept)"
  else
    "$PYTHON" "$FOCUS_DETR_ROOT/scripts/install_detectron2.py" \
      || _focus_detr_fail "installing detectron2" "install detectron2 from source (https://github.com/facebookresearch/detectron2) and rerun"
    "$PYTHON" -c 'import detectron2.config, detectron2.engine, detectron2.evaluation' >/dev/null 2>&1 \
      || _focus_detr_fail "detectron2 is installed but does not import" "run: $PYTHON -c 'import detectron2.engine' to see the error"
  fi

  # 3. test and lint tools.
  if [ "$dev" = 1 ] && ! _focus_detr_found devtools; then
    _focus_detr_say "installing pytest, black, isort, flake8, onnx, onnxscript, onnxruntime"
    "$PYTHON" -m pip install --quiet pytest black isort flake8 \
      "onnx==1.23.2" "onnxscript==0.7.2" "onnxruntime==1.32.0" \
      || _focus_detr_fail "pip install pytest black isort flake8 onnx onnxscript onnxruntime" "install them yourself and rerun"
  fi

  # 4. this package and its extension, rebuilt when sources or torch changed.
  local stamp_file="$FOCUS_DETR_ROOT/build/.focus_detr_extension_stamp"
  local stamp
  stamp="$(cd "$FOCUS_DETR_ROOT" && { echo "$torch_version"; echo "FORCE_CUDA=${FORCE_CUDA:-0}"; cat setup.py; find focus_detr/csrc -type f -print0 | sort -z | xargs -0 cat; } | sha256sum | cut -d' ' -f1)"
  if [ -f "$stamp_file" ] && [ "$(cat "$stamp_file")" = "$stamp" ] && _focus_detr_found focus_detr; then
    _focus_detr_say "focus_detr: installed from $FOCUS_DETR_ROOT with its extension (kept)"
  else
    _focus_detr_say "building and installing focus_detr (editable) with its extension (C++ kernels; CUDA ones too with a GPU or FORCE_CUDA=1)"
    (cd "$FOCUS_DETR_ROOT" && "$PYTHON" -m pip install --quiet --no-build-isolation -e .) \
      || _focus_detr_fail "building the focus_detr extension" "read the compiler output above; FOCUS_DETR_NO_EXTENSION=1 installs the pure-PyTorch package"
    mkdir -p "$(dirname "$stamp_file")"
    echo "$stamp" >"$stamp_file"
    (cd / && "$PYTHON" -c 'import focus_detr.layers') \
      || _focus_detr_fail "import focus_detr after installing it" "run: $PYTHON -c 'import focus_detr.layers' to see the error"
  fi

  # 5. jemalloc, which run_demo.sh preloads.
  local jemalloc
  jemalloc="$(focus_detr_find_jemalloc)"
  if [ -n "$jemalloc" ]; then
    _focus_detr_say "jemalloc: $jemalloc (kept)"
  elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    _focus_detr_say "jemalloc missing: installing Debian's libjemalloc2 with apt-get"
    # at most 5 minutes each: a machine without access to Debian's mirrors goes on without it
    local apt_install="timeout 300 apt-get install -y -qq --no-install-recommends libjemalloc2"
    if DEBIAN_FRONTEND=noninteractive $apt_install >/dev/null 2>&1 \
      || { timeout 300 apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive $apt_install >/dev/null 2>&1; }; then
      _focus_detr_say "jemalloc: installed libjemalloc2 ($(focus_detr_find_jemalloc))"
    else
      _focus_detr_say "jemalloc: apt-get could not install libjemalloc2; training runs on the system's malloc"
    fi
  else
    _focus_detr_say "jemalloc not found: training runs on the system's malloc, whose memory grows in long CPU runs; install it with apt install libjemalloc2 or conda install jemalloc"
  fi
  _focus_detr_say "ready"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  focus_detr_setup "$@"
fi
