#!/usr/bin/env bash
# Where the time goes, on the device machine, from the repository root:
#   bash tests/gpu/profile_round.sh [WORKLOAD...]      (default: W06 WU)
# Serving W06 at concurrency 256 with the process profiler (CPU per process, py-spy stacks), then the
# worker's kernel profile of decode and prefill steps for each workload. Logs and JSON go to $OUT.
# Needs the wheels of tests/gpu/fetch_wheels.sh in .whl/ (py-spy among them for stack samples).
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PATH=/tmp/site/bin:$PATH
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
quiet() { grep -v -e '^\s*$' -e 'it/s\]' -e 's/it\]' -e '"level": "warning"'; }
if [ "${SKIP_SERVING:-0}" != 1 ]; then
  python3 -m scheduler_svc.cli bench serving --workload W06 --concurrency 256 --offline-too \
    --profile-dir "$OUT/prof-serving-W06" --out "$OUT/serving-W06.json" 2>&1 | quiet | tee "$OUT/serving-W06.log" \
    | tail -n 60
fi
for w in "${@:-W06 WU}"; do
  for ww in $w; do
    python3 -m scheduler_svc.cli bench throughput --workload "$ww" --profile-steps "${WINDOWS:-prefill:20:2,decode:120:5}" \
      --out "$OUT/profile-$ww.json" 2>&1 | quiet | tee "$OUT/profile-$ww.log" | tail -n 70
  done
done
