#!/usr/bin/env bash
# The demo's training step under each memory allocator, side by side (rounds interleaved):
#   system   : the system's malloc (FOCUS_DETR_ALLOCATOR=system)
#   jemalloc : jemalloc with its own decay (MALLOC_CONF sets jemalloc 5's default decay times, so
#              AllocatorPurgeHook leaves them alone)
#   shipped  : jemalloc with the policy train_net.py applies (decay off, purge every 50 steps)
# 60 timed steps after 3 warm-up ones, so that one purge (after step 49) and the step after it are
# in the mean. Prints the mean seconds per step of each run and each one's ratio to the system malloc of the
# same round. Memory is measured by `python -m focus_detr.tools.soak`, not here.
#     bash scripts/benchmark_allocators.sh [ROUNDS] [benchmark_train options, e.g. --iters 30]
# To approximate a CPU without AVX-512: ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 bash ...
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=setup_env.sh
source "$ROOT/scripts/setup_env.sh"
focus_detr_setup
cd "$ROOT"
ROUNDS="${1:-2}"
shift || true
[[ "$ROUNDS" =~ ^[1-9][0-9]*$ ]] || { echo "ROUNDS must be a positive integer, got '$ROUNDS'" >&2; exit 2; }

step_seconds() { # $1: label; the rest: environment assignments
  local label="$1" report mean
  shift
  report="$(env "$@" "$PYTHON" -m focus_detr.tools.benchmark_train \
    --config-file configs/focus_detr_demo_shapes.py --precision fp32 --iters 60 --warmup 3 \
    --threads 2 "${BENCH_ARGS[@]}" 2>&1)" || { echo "$report" >&2; return 1; }
  mean="$(echo "$report" | awk -F'|' '$2 ~ /^ *float32 *$/ {gsub(/ /, "", $3); print $3; exit}')"
  [ -n "$mean" ] || { echo "$report" >&2; echo "no float32 row in the report above" >&2; return 1; }
  if [ "$label" != system ] && ! echo "$report" | grep -q "^- memory allocator: jemalloc"; then
    echo "$report" | grep "^- memory allocator" >&2
    echo "the $label run needs jemalloc (apt install libjemalloc2, or FOCUS_DETR_JEMALLOC=path)" >&2
    return 1
  fi
  if [ "$label" = system ] && ! echo "$report" | grep -q "^- memory allocator: the system's"; then
    echo "$report" | grep "^- memory allocator" >&2
    echo "the system run did not run on the system's malloc" >&2
    return 1
  fi
  echo "$report" | grep -E "^- (cpu|torch cpu capability|memory allocator):" | sed "s/^/[$label] /" >&2
  echo "$mean"
}

BENCH_ARGS=("$@")
echo "| round | system s/step | jemalloc (own decay) s/step | shipped s/step | jemalloc / system | shipped / system |"
echo "| --- | --- | --- | --- | --- | --- |"
for round in $(seq "$ROUNDS"); do
  system="$(step_seconds system -u LD_PRELOAD FOCUS_DETR_ALLOCATOR=system)"
  own="$(step_seconds jemalloc MALLOC_CONF=dirty_decay_ms:10000,muzzy_decay_ms:0)"
  shipped="$(step_seconds shipped -u MALLOC_CONF -u FOCUS_DETR_ALLOCATOR)"
  awk -v r="$round" -v s="$system" -v o="$own" -v p="$shipped" \
    'BEGIN {printf "| %d | %.4f | %.4f | %.4f | %.3f | %.3f |\n", r, s, o, p, o / s, p / s}'
done
