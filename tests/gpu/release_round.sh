#!/usr/bin/env bash
# One device call that checks a merged main: the GPU tests, W06 throughput now and at a baseline commit
# (same call, same card: the "within noise of before" checks), the constrained-decoding benchmark, and
# the FP8 KV-only run, and W8B's ITL tail with and without a prefill cap (stage itltail: two W8B rate
# sweeps, best given a call of its own). From the repository root, with the wheels in .whl/ (tests/gpu/fetch_wheels.sh)
# and the baseline tree in $BASE (e.g. `git archive e986828 | tar -x -C .gpuwork/base`):
#   BASE=.gpuwork/base STAGES="tests w06 constrained maskfill kvonly" bash tests/gpu/release_round.sh
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONUNBUFFERED=1
ROOT=$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
bench() {  # tree, name, args...
  local tree=$1 name=$2; shift 2
  (cd "$tree" && PYTHONPATH=/tmp/site:$PWD timeout "${BENCH_TIMEOUT:-150}" python3 -m scheduler_svc.cli bench \
    throughput --compare "" --out "$OUT/$name.json" "$@" 2>&1) \
    | grep -v -e '^\s*$' -e 'it/s\]' -e 'Warning' | tee "$OUT/$name.log" | tail -n 5
}
status=0
for stage in ${STAGES:-tests w06 constrained kvonly}; do
  echo "=== $stage $(date +%T)"
  case $stage in
    tests)
      xdist=()
      python3 -c 'import xdist' 2>/dev/null && xdist=(-n "${XDIST:-8}")
      PYTHONPATH=/tmp/site:$ROOT timeout "${TESTS_TIMEOUT:-240}" python3 -m pytest -q -m gpu -p no:cacheprovider \
        -o addopts="" "${xdist[@]}" 2>&1 | tee "$OUT/pytest.log" | tail -n 25
      status=${PIPESTATUS[0]} ;;
    w06)  # the same workload on the baseline tree and on this one, back to back, twice each
      for i in $(seq "${W06_REPEATS:-2}"); do
        bench "${BASE:?BASE names the baseline tree}" "w06-base-$i" --workload W06
        bench "$ROOT" "w06-now-$i" --workload W06
      done ;;
    constrained)  # the same batch unconstrained, then every request under the schema (issue 24's -10% target)
      bench "$ROOT" w06-b64 --workload W06 --num-prompts 256 --max-num-seqs 64
      bench "$ROOT" w06-constrained --workload W06 --num-prompts 256 --max-num-seqs 64 \
        --json-schema scheduler_svc/bench/w06_schema.json ;;
    maskfill)  # the per-step mask cost on this host's cores, W06's vocabulary, serial and batched fill
      PYTHONPATH=/tmp/site:$ROOT python3 -c "from pathlib import Path
from scheduler_svc.bench.throughput import write_shape_config
write_shape_config('qwen3-0.6b', Path('/tmp/w06_shape'), 4096)"
      for t in 1 "$(nproc)"; do
        PYTHONPATH=/tmp/site:$ROOT python3 -m scheduler_svc.bench.mask_fill --rows 64 --model /tmp/w06_shape \
          --device cuda --threads "$t" --json "$OUT/maskfill-$t.json" 2>&1 | tail -n 4
      done ;;
    kvonly) bench "$ROOT" w8b-fp8kv --workload W8B --kv-cache-dtype fp8 ;;
    itltail)  # issue 25 item 5: W8B's ITL tail under Poisson arrivals, without and with a prefill cap while
      # decoding (--max-prefill-tokens-with-decodes); "% of peak" against the same run's all-at-once rate
      for cap in 0 ${PREFILL_CAP:-1024}; do
        (cd "$ROOT" && PYTHONPATH=/tmp/site:$ROOT timeout "${SERVING_TIMEOUT:-240}" python3 -m scheduler_svc.cli \
          bench serving --workload W8B --concurrency 256 --gateways 4 --client-processes 4 \
          --request-rates "${RATES:-inf,20,40}" --max-prefill-tokens-with-decodes "$cap" \
          --out "$OUT/s8b-cap$cap.json" 2>&1) | grep -v -e '^\s*$' -e 'it/s\]' | tail -n 8
      done ;;
  esac
done
echo "=== done $(date +%T)"
exit $status
