#!/usr/bin/env bash
# Every GPU check of the real-scale work in one call on a lent GPU machine (README, "Run on
# a cluster", Memory): the placement tests' GPU cases, benchmarks/scale on the GPU (bf16, 311M
# parameters) and a study on a num_gpus=1 Ray actor (benchmarks/gpu_workers).
#
#   here:   .venv/bin/python scripts/gpu_kit.py           # once: .whl/, 48 MiB
#   there:  bash scripts/gpu_check.sh                     # carry [".whl"]; logs in $OUT
#   here:   bash scripts/gpu_check.sh --rehearse          # the same on the CPU, small sizes
#
# The step limits add up to 570 s, inside a call's 600 (timeout_s=600).
# The rehearsal installs the kit built for this machine's Python (gpu_kit.py --python 3.11
# --dest DIR, then KIT=DIR PY=python-of-a-venv-with-the-image's-packages) and checks that
# everything imports and runs before device time is spent.
set -uo pipefail
cd "$(dirname "$0")/.."
KIT=$(realpath "${KIT:-.whl}")
PY=${PY:-python3}
OUT=${OUT:-/tmp/gpu-check}
SITE=${SITE:-/tmp/evomerge-site}
mkdir -p "$OUT" "$SITE"
if [[ ${1:-} == --rehearse ]]; then  # the limits are for the GPU machine's 16 cores
    device=cpu size=small trials=2 slower=4 cases="cpu and fixed and (ties or linear)"
else
    device=cuda size=full trials=5 slower=1 cases="cuda or synchronizes"
fi

"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" "$KIT"/*.whl || exit 1
"$PY" -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter='tar')" \
    "$KIT"/ray-*.tar.xz "$SITE" || exit 1
export PYTHONPATH="$SITE:$PWD" PYTHONUNBUFFERED=1 EVOMERGE_CACHE="$KIT/cache"
"$PY" scripts/gpu_kit.py --adopt-zoo || exit 1

failed=()
step() {  # step NAME SECONDS COMMAND...: run it with a time limit, its log to $OUT/NAME.log
    local name=$1 limit=$(($2 * slower)) start=$SECONDS
    shift 2
    echo "== $name: $*"
    timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1 || failed+=("$name")
    tail -n 40 "$OUT/$name.log"
    echo "== $name: $((SECONDS - start)) s"
}

{ nvidia-smi || true; "$PY" -c "import torch, ray; print(torch.__version__, ray.__version__)"; } \
    >"$OUT/machine.log" 2>&1
step placement 120 "$PY" -m pytest -q -p no:cacheprovider tests/test_placement.py -k "$cases"
step scale 300 "$PY" -m benchmarks.scale --size "$size" --device "$device" --trials "$trials"
if [[ $device == cuda ]]; then
    step study 150 "$PY" -m benchmarks.gpu_workers --study-trials 8 --reps 3
else  # gpu_workers needs CUDA: the study path (Ray actors, Optuna, SQLite) on the CPU
    step study 150 "$PY" -m pytest -q -p no:cacheprovider \
        tests/test_coordinator.py::test_search_runs_records_and_rescores -k sqlite
fi
echo "failed: ${failed[*]:-none}"
[[ ${#failed[@]} -eq 0 ]]
