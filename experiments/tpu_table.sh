#!/usr/bin/env bash
# The compiles behind experiments/RESULTS.md, "The TPU program, compiled without a TPU"
# (issue #26), one at a time (each DenseFlow-74-10 compile takes 13+ GB of host memory).
# A variant whose JSON file exists is skipped, so the script resumes where it stopped; one
# that XLA:TPU refuses (a program that does not fit the chip's HBM ends in one `error:`
# line) leaves that line and XLA's own first line in LABEL.error.txt and is not tried
# again either. A compile that dies otherwise (killed for memory, a traceback) leaves only
# its log and is tried again on the next run.
#
# Raw lines made before this script (commands kept here; not rerun by it):
#   v5e_f32_b64          --target v5e --topology 2x2 --programs train
#                        --config.train.batch_size=256 --config.model.precision=default
#                        (Dec 7, code before the one-reduction BatchNorm)
#   v5e_pod256_high_b16  --target v5e --topology 16x16 --programs train
#                        --config.train.batch_size=4096
#   v4_8cores_high_b32   --target v4 --topology 2x2x1 --programs train
#                        --config.train.batch_size=256 (libtpu's default chip config then:
#                        one device per TensorCore, 8 devices)
#   bash experiments/tpu_table.sh [LABEL ...]     (no labels: all of them, in this order)
# Needs the venv of the `tpu` extra: python -m venv .venv-tpu-compile &&
# .venv-tpu-compile/bin/pip install -e ".[tpu]"
set -u
cd "$(dirname "$0")/.."
PY=${DENSEFLOW_TPU_COMPILE_PYTHON:-.venv-tpu-compile/bin/python}
OUT=experiments/results/tpu_compile
LOGS=${TPU_TABLE_LOGS:-/tmp/tpu_table_logs}
if ! [ -x "$PY" ]; then
  echo "error: no $PY: make the venv first (python -m venv .venv-tpu-compile &&" \
       ".venv-tpu-compile/bin/pip install -e \".[tpu]\"), or name its Python in" \
       "DENSEFLOW_TPU_COMPILE_PYTHON" >&2
  exit 2
fi
mkdir -p "$OUT" "$LOGS"

# label | target | topology | programs | config overrides (64 images per chip on 4 chips = 256)
VARIANTS="
v5e_high_b64|v5e|2x2|train|--config.train.batch_size=256
v4_high_b64|v4|2x2x1|train|--config.train.batch_size=256
v5p_high_b64|v5p|2x2x1|train|--config.train.batch_size=256
v6e_high_b64|v6e|2x2|train|--config.train.batch_size=256
v5e_high_b32|v5e|2x2|train|--config.train.batch_size=128
v5e_bf16_b64|v5e|2x2|train|--config.train.batch_size=256 --config.model.compute_dtype=bfloat16
v5e_high_b48|v5e|2x2|train|--config.train.batch_size=192
v5e_eval_sample|v5e|2x2|eval,sample|
v4_bf16_b64|v4|2x2x1|train|--config.train.batch_size=256 --config.model.compute_dtype=bfloat16
v5p_bf16_b64|v5p|2x2x1|train|--config.train.batch_size=256 --config.model.compute_dtype=bfloat16
v6e_bf16_b64|v6e|2x2|train|--config.train.batch_size=256 --config.model.compute_dtype=bfloat16
"
wanted=" $* "
echo "$VARIANTS" | while IFS='|' read -r label target topology programs overrides; do
  [ -z "$label" ] && continue
  [ $# -gt 0 ] && [[ "$wanted" != *" $label "* ]] && continue
  [ -s "$OUT/$label.jsonl" ] || [ -s "$OUT/$label.error.txt" ] && { echo "skip $label (done)"; continue; }
  echo "$(date -u +%H:%M:%S) $label"
  # shellcheck disable=SC2086
  "$PY" experiments/accel_compile.py --config configs/cifar10.py --target "$target" \
      --topology "$topology" --programs "$programs" --label "$label" $overrides \
      > "$OUT/$label.jsonl.part" 2> "$LOGS/$label.log" < /dev/null
  status=$?
  if [ $status -eq 0 ]; then mv "$OUT/$label.jsonl.part" "$OUT/$label.jsonl"
  else
    rm -f "$OUT/$label.jsonl.part"
    grep -e '^error:' -e '^XLA said:' "$LOGS/$label.log" > "$OUT/$label.error.txt" ||
      rm -f "$OUT/$label.error.txt"   # no refusal: it died otherwise, try again next time
    echo "  $label: exit $status (log: $LOGS/$label.log)"; tail -n 2 "$LOGS/$label.log"
  fi
done
