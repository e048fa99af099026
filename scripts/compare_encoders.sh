#!/usr/bin/env bash
# The encoder comparison on the built-in dataset (docs/benchmarks.md, "Encoders compared"):
# trains the five demo-size encoders (dense DINO, Sparse DETR, Lite DETR, Focus, RT-DETR's hybrid
# encoder on 3 levels) with the demo's schedule on one decoder, then measures them with the
# analysis tool: AP, AP50, GFLOPs, latency, tokens updated per layer, token quality (the Focus
# config's foreground ranges for all; the 3-level model takes the finest three), and the
# keep-ratio sweep of Focus and Sparse DETR (AP against GFLOPs). Every encoder is trained once
# per seed of SEEDS (default "0 1 2"); the analysis measures the first seed's model and reports
# the AP / AP50 of every seed (mean, standard deviation, range).
#     [SEEDS="0 1 2"] bash scripts/compare_encoders.sh [OUTPUT_DIR] [config overrides for training]
# A model already trained in OUTPUT_DIR (its model_final.pth exists) is reused, not retrained.
# Every encoder trains in float32 (train.amp.enabled=False) so that the five runs compute alike on
# any CPU ("auto" picks bfloat16 where the CPU has it). Override it after OUTPUT_DIR like any
# config value.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=setup_env.sh
source "$ROOT/scripts/setup_env.sh"
focus_detr_setup
focus_detr_preload_jemalloc
cd "$ROOT"
OUTPUT_DIR="${1:-output/compare_encoders}"
shift || true

NAMES=(focus dino sparse lite hybrid)
CONFIGS=(
  configs/focus_detr_demo_shapes.py
  configs/dino_demo_shapes.py
  configs/sparse_detr_demo_shapes.py
  configs/lite_detr_demo_shapes.py
  configs/rtdetr_hybrid_demo_shapes.py
)
read -r -a SEED_LIST <<< "${SEEDS:-0 1 2}"
WEIGHTS=()
for i in "${!NAMES[@]}"; do
  runs=""
  for seed in "${SEED_LIST[@]}"; do
    out="$OUTPUT_DIR/${NAMES[$i]}/seed$seed"
    if [ ! -f "$out/model_final.pth" ]; then
      echo "[compare] training ${NAMES[$i]} (${CONFIGS[$i]}), seed $seed, into $out"
      "$PYTHON" train_net.py --config-file "${CONFIGS[$i]}" --resume train.output_dir="$out" \
        train.seed="$seed" train.amp.enabled=False "$@"
    fi
    runs="${runs:+$runs,}$out/model_final.pth"
  done
  WEIGHTS+=("$runs")
done

echo "[compare] analysis (one process, one machine) into $OUTPUT_DIR/analysis"
"$PYTHON" -m focus_detr.tools.analyze --config-file "${CONFIGS[@]}" --weights "${WEIGHTS[@]}" \
  --names "${NAMES[@]}" --baseline dino --dataset focus_detr_shapes_val --num-images 20 \
  --threads 2 --sweep-keep-ratio 0.1 0.2 0.3 0.5 0.7 1.0 --output "$OUTPUT_DIR/analysis"
echo "[compare] table: $OUTPUT_DIR/analysis/analysis.md"
