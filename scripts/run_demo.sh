#!/usr/bin/env bash
# The README's main command: set up whatever is missing, generate the built-in synthetic dataset,
# train and evaluate the demo config on it (with jemalloc preloaded where it is installed), and
# draw predictions and token selections.
#     bash scripts/run_demo.sh [OUTPUT_DIR] [config overrides, e.g. train.max_iter=100]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=setup_env.sh
source "$ROOT/scripts/setup_env.sh"
focus_detr_setup
focus_detr_preload_jemalloc
cd "$ROOT"
OUTPUT_DIR="${1:-output/demo_shapes}"
shift || true
CONFIG=configs/focus_detr_demo_shapes.py
"$PYTHON" train_net.py --config-file "$CONFIG" train.output_dir="$OUTPUT_DIR" "$@"
"$PYTHON" -m focus_detr.demo --config-file "$CONFIG" --weights "$OUTPUT_DIR/model_final.pth" \
  --val-images 4 --output "$OUTPUT_DIR/pictures" "$@"
echo "[demo] metrics: $OUTPUT_DIR/metrics.json, pictures: $OUTPUT_DIR/pictures"
