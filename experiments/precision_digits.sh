#!/usr/bin/env bash
# bfloat16 vs float32 training from scratch on the digits config (issue #4: "training
# from scratch on the digits config reaches the same bits/dim as float32 within noise").
#
#   bash experiments/precision_digits.sh [SEEDS...]        # default seeds: 0 1
#
# Trains configs/digits.py once per (dtype, seed) into runs/precision/<dtype>-s<seed>
# and prints the last periodic test bits/dim of each run (metrics.jsonl). The
# likelihood terms stay float32 in both (denseflow_jax/precision.py); only convolutions
# and attention change dtype. Existing run directories resume rather than restart.
set -euo pipefail
cd "$(dirname "$0")/.."
SEEDS=("${@:-0 1}")
mkdir -p runs/precision
for seed in ${SEEDS[@]}; do
  for dtype in float32 bfloat16; do
    dir=runs/precision/$dtype-s$seed
    start=$(date +%s)
    python -m denseflow_jax.main --config configs/digits.py --workdir "$dir" \
        --config.seed="$seed" --config.model.compute_dtype="$dtype" > "$dir.log" 2>&1 \
      || { echo "run $dir failed, see $dir.log"; exit 1; }
    bpd=$(python -c "import json,sys; r=[x for x in map(json.loads, open('$dir/metrics.jsonl')) if 'test_bpd' in x]; print(f\"{r[-1]['test_bpd']:.4f} at step {r[-1]['step']}\")")
    echo "$dtype seed $seed: test bpd $bpd, $(( $(date +%s) - start )) s"
  done
done
