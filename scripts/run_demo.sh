#!/usr/bin/env bash
# The README's main command: set up whatever is missing, generate the built-in synthetic dataset,
# train and evaluate the demo config on it (with jemalloc preloaded where it is installed), and
# draw predictions and token selections. A second run into the same folder resumes the first
# (--resume): an interrupted run continues where it stopped, a complete one is evaluated again and
# its pictures redrawn; nothing of it is trained over. Give another OUTPUT_DIR to train anew.
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
if [ -e "$OUTPUT_DIR/last_checkpoint" ] || compgen -G "$OUTPUT_DIR/model_*.pth" >/dev/null; then
  echo "[demo] $OUTPUT_DIR holds a run: resuming it (a complete run is only evaluated again);" \
    "to train anew, give another folder: bash scripts/run_demo.sh OTHER_DIR"
else
  echo "[demo] training from scratch into $OUTPUT_DIR"
fi
"$PYTHON" train_net.py --config-file "$CONFIG" --resume train.output_dir="$OUTPUT_DIR" "$@"
"$PYTHON" -m focus_detr.demo --config-file "$CONFIG" --weights "$OUTPUT_DIR/model_final.pth" \
  --val-images 4 --output "$OUTPUT_DIR/pictures" "$@"
echo "[demo] metrics: $OUTPUT_DIR/metrics.json, pictures: $OUTPUT_DIR/pictures"
