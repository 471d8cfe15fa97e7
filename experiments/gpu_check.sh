#!/usr/bin/env bash
# One prepared run on a lent H200 (issue: throughput). Prepare the wheels the GPU
# image lacks ONCE on the development machine, in the repo root:
#
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 -d .whl grain==0.2.18 ml_collections==1.1.0 array_record==0.8.6 \
#     portpicker tensorboardX
#
# then call the device tool's run with carry=[".whl"], timeout_s=540 and the command
#   bash experiments/gpu_check.sh
# Every JSON line lands in $OUT/bench.jsonl; copy the figures into experiments/RESULTS.md.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
bench() { timeout "$1" python3 experiments/benchmark.py --config configs/cifar10.py "${@:2}" 2>>"$OUT/stderr.log" \
  | grep '^{' | tee -a "$OUT/bench.jsonl"; }
# Cheapest first, so a short lease still yields figures.
bench 150 --batch_size 64 --repeats 5                                           # fp32 (TF32), as shipped
bench 150 --batch_size 256 --repeats 5 --config.model.compute_dtype=bfloat16
bench 150 --batch_size 1024 --repeats 3 --config.model.compute_dtype=bfloat16 --config.model.remat=True
timeout 60 python3 experiments/compile_scaling.py --config configs/cifar10.py --scales 1,2 --batch_size 64 \
  2>>"$OUT/stderr.log" | tee -a "$OUT/bench.jsonl"
