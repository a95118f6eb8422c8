#!/usr/bin/env bash
# The FP8 round on the device machine (issue 25), from the repository root: FP8 GPU tests, the accuracy
# script on a trained model, then W8B throughput in bf16 and FP8 side by side (same call, same card).
#   STAGES="tests accuracy w8b kvonly itl" bash tests/gpu/fp8_round.sh
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
bench() {  # name, args...
  local name=$1; shift
  timeout "${BENCH_TIMEOUT:-240}" python3 -m scheduler_svc.cli bench throughput --compare "" --out "$OUT/$name.json" "$@" 2>&1 \
    | grep -v -e '^\s*$' -e 'it/s\]' -e 'Warning' | tee "$OUT/$name.log" | tail -n 6
}
for stage in ${STAGES:-tests accuracy w8b}; do
  echo "=== $stage $(date +%T)"
  case $stage in
    tests) timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider -o addopts="" -x \
             tests/kernels/test_fp8_kernels.py tests/gpu_worker/test_fp8.py 2>&1 | tee "$OUT/pytest.log" | tail -n 15 ;;
    accuracy) timeout 200 python3 -m scheduler_svc.bench.fp8_accuracy --out "$OUT/accuracy.json" 2>&1 \
             | grep -v Warning | tee "$OUT/accuracy.log" | tail -n 8 ;;
    w8b) bench w8b-bf16 --workload W8B
         bench w8b-fp8 --workload W8B --quantization fp8 --kv-cache-dtype fp8 ;;
    parts) timeout 150 python3 -m scheduler_svc.bench.fp8_parts 2>&1 | tee "$OUT/parts.log" | tail -n 20 ;;
    kvonly) bench w8b-fp8kv --workload W8B --kv-cache-dtype fp8 ;;
    itl) bench itl-bf16 --workload W8B --num-prompts 1 --output-len 128
         bench itl-fp8 --workload W8B --num-prompts 1 --output-len 128 --quantization fp8 ;;
  esac
done
echo "=== done $(date +%T)"
