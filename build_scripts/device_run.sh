#!/usr/bin/env bash
# Build for the H100 (sm_90a) on the GPU machine itself, then run the GPU tests and/or the decode
# benchmark. Logs go to $OUT (default ./out).
#   build_scripts/device_run.sh [tests|bench|all] [extra pytest args]
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-all}
shift || true
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export TURBOQUANT_COMMIT=${TURBOQUANT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)} # set it when the copy's git metadata may be stale: the bench records it
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv | tee "$OUT/gpu.txt"
t0=$(date +%s)
BUILD=${BUILD:-build/cmake}
if ! { cmake -S plugin_src -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90a \
        -DTURBOQUANT_CTAS_PER_SM="${CTAS:-}" && cmake --build "$BUILD" -j 16 --target turboquant; } > "$OUT/build${CTAS:-}.log" 2>&1; then
  tail -60 "$OUT/build.log"; exit 1
fi
echo "build: $(( $(date +%s) - t0 )) s"
export TURBOQUANT_LIB=$PWD/$BUILD/libturboquant.so
rc=0
if [[ $MODE == tests || $MODE == all ]]; then
  python3 -m pytest -q -s -m gpu tests/test_kernels_gpu.py -p no:cacheprovider "$@" 2>&1 | tee "$OUT/tests.log"
  rc=${PIPESTATUS[0]}
  grep -E "^(write|decode|context) " "$OUT/tests.log" > "$OUT/test_errors.txt" || true
fi
if [[ $MODE == bench || $MODE == all ]]; then
  python3 benchmarks/bench_decode.py ${BENCH_ARGS:-} --json "$OUT/bench${CTAS:-}.json" 2>&1 | tee "$OUT/bench${CTAS:-}.log"
  rc=$(( rc | PIPESTATUS[0] ))
fi
exit $rc
