#!/usr/bin/env bash
# Compile check of the CUDA kernels of focus_detr._C without a GPU (FORCE_CUDA=1).
# Builds into a temporary directory (the in-place build of the source tree is left alone) and
# exits non-zero when the compilation fails. Takes several minutes on 2 cores.
#
# Environment: PYTHON (default python3), CUDA_HOME (default /usr/local/cuda), TORCH_CUDA_ARCH_LIST
# (default "8.0;9.0"), KEEP_CUDA_BUILD=1 keeps the temporary directory.
set -euo pipefail

PYTHON="${PYTHON:-python3}"

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}"
export FORCE_CUDA=1

if [[ ! -x "${CUDA_HOME}/bin/nvcc" ]]; then
    echo "check_cuda_build: no nvcc at ${CUDA_HOME}/bin/nvcc (set CUDA_HOME)" >&2
    exit 1
fi

work_dir="$(mktemp -d -t focus_detr_cuda_build.XXXXXX)"
if [[ "${KEEP_CUDA_BUILD:-0}" != "1" ]]; then
    trap 'rm -rf "${work_dir}"' EXIT
fi

echo "check_cuda_build: nvcc $("${CUDA_HOME}/bin/nvcc" --version | tail -n 1)," \
    "TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST}, build dir ${work_dir}"
start=$(date +%s)
cd "${repo_root}"
if ! "${PYTHON}" setup.py build_ext --build-temp "${work_dir}/temp" --build-lib "${work_dir}/lib" \
    > "${work_dir}/build.log" 2>&1; then
    tail -n 60 "${work_dir}/build.log" >&2
    echo "check_cuda_build: FAILED after $(( $(date +%s) - start )) s" >&2
    exit 1
fi
library="$(find "${work_dir}/lib" -name '_C*.so' | head -n 1)"
if [[ -z "${library}" ]]; then
    echo "check_cuda_build: the build succeeded but produced no focus_detr/_C*.so" >&2
    exit 1
fi
symbols="$(nm -D -C "${library}")"  # not piped into grep -q: pipefail would see SIGPIPE
if [[ "${symbols}" != *"ms_deform_attn_forward_cuda"* ]]; then
    echo "check_cuda_build: ${library} has no CUDA kernels (was WITH_CUDA defined?)" >&2
    exit 1
fi
warnings="$(grep -ci "warning" "${work_dir}/build.log" || true)"
echo "check_cuda_build: OK in $(( $(date +%s) - start )) s ($(basename "${library}"), ${warnings} compiler warning lines)"
