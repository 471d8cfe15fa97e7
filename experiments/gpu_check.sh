#!/usr/bin/env bash
# The prepared run on a lent GPU machine (issue #10): installs the carried wheels, then
# runs experiments/gpu_bench.py (its header says how to download the wheels into .whl/,
# and gives the device call). Arguments go to gpu_bench.py, e.g.
#
#   bash experiments/gpu_check.sh --budget_s 420 --profile_dir /tmp/prof
#
# JSON lines: stdout and $OUT/bench.jsonl; nvidia-smi: $OUT/gpu.txt; stderr: $OUT/stderr.log
# (its tail is printed if the script fails).
set -u
OUT=${OUT:-/tmp/out}; export OUT; mkdir -p "$OUT"
SITE=${SITE:-/tmp/site}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target "$SITE" .whl/*.whl || { echo "wheel install failed: is .whl/ carried?"; exit 1; }
export PYTHONPATH=$SITE:$PWD PYTHONUNBUFFERED=1
# grain's generated protobuf code needs protobuf >= 5.28.3: install ours only if the image's
# protobuf is older (replacing it otherwise could break the image's own packages).
if ! python3 -c 'import grain' 2>"$OUT/grain_import.log"; then
  cat "$OUT/grain_import.log"
  if ls .whl/protobuf/*.whl >/dev/null 2>&1; then
    echo "import grain failed: installing .whl/protobuf"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" .whl/protobuf/*.whl || exit 1
  fi
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv \
  2>&1 | tee "$OUT/gpu.txt"
python3 experiments/gpu_bench.py "$@" 2>"$OUT/stderr.log"
rc=$?
if [ "$rc" != 0 ]; then echo "gpu_bench.py exit code $rc; end of stderr:"; tail -n 25 "$OUT/stderr.log"; fi
exit "$rc"
