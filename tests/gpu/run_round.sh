#!/usr/bin/env bash
# One round of GPU checks and timings on the device machine, run from the repository root:
#   bash tests/gpu/run_round.sh [pytest-args...]
# Installs the wheels the GPU image lacks from .whl/ (fetched beforehand, where there is network, with
# tests/gpu/fetch_wheels.sh), runs the GPU tests, then the throughput benchmarks named in $BENCH
# (default: none), writing logs under $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
if ! compgen -G ".whl/*.whl" >/dev/null; then
  echo "run_round.sh: no wheels in .whl/; run bash tests/gpu/fetch_wheels.sh where PyPI is reachable" >&2
  exit 1
fi
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
status=0
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  # Spread over $XDIST processes (pytest-xdist is on the GPU image): the GPU tests are mostly engine
  # start-ups of tiny models, which overlap well; each engine takes a fixed 1 GiB KV pool, so they
  # share the GPU without racing to size their pools.
  xdist=()
  python3 -c 'import xdist' 2>/dev/null && xdist=(-n "${XDIST:-8}")
  python3 -m pytest -q -m gpu -p no:cacheprovider -o addopts="" "${xdist[@]}" --durations=15 "$@" 2>&1 \
    | tee "$OUT/pytest.log" | tail -n 40
  status=${PIPESTATUS[0]}
fi
for w in ${BENCH:-}; do
  python3 -m scheduler_svc.cli bench throughput --workload "$w" --compare "${COMPARE:-hf-static,hf-cb}" \
    --out "$OUT/bench-$w.json" 2>&1 | grep -v -e '^\s*$' -e 'it/s\]' | tee "$OUT/bench-$w.log" | tail -n 12
done
exit $status
