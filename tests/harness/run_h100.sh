#!/usr/bin/env bash
# The plugin's GPU run as done on the project's H100 (one device call): builds the plugin and the
# harness against TensorRT 10.14 headers, runs tests/test_plugin_harness_gpu.py, then rebuilds the
# plugin and harness against TensorRT 11 headers in the same build folder (the kernels are not
# rebuilt) and runs the test again. Logs go to $OUT (default ./out).
#
#   tests/harness/run_h100.sh HEADERS_10_14 HEADERS_11
set -uo pipefail
H1014="${1:?usage: run_h100.sh TRT_10_14_INCLUDE TRT_11_INCLUDE}"
H11="${2:?usage: run_h100.sh TRT_10_14_INCLUDE TRT_11_INCLUDE}"
OUT="${OUT:-out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1
nvidia-smi -L | tee "$OUT/gpu.txt"
git log -1 --format='commit %H %cd' 2>/dev/null | tee -a "$OUT/gpu.txt"
rc=0
for v in 10.14 11; do
  inc="$H1014"; [[ "$v" == 11 ]] && inc="$H11"
  start=$(date +%s)
  if ! build_scripts/build_plugin.sh --trt-include "$inc" --build-dir build/plugin-h100 --archs 90a --harness -j 16 \
      > "$OUT/build_$v.log" 2>&1; then
    echo "== TensorRT $v headers: BUILD FAILED"; tail -40 "$OUT/build_$v.log"; rc=1; continue
  fi
  echo "== TensorRT $v headers: built in $(( $(date +%s) - start )) s"
  grep -E "exports:|needs" "$OUT/build_$v.log"
  TURBOQUANT_PLUGIN_BUILD=build/plugin-h100 python3 -m pytest -v -s -p no:cacheprovider \
    tests/test_plugin_harness_gpu.py > "$OUT/harness_$v.log" 2>&1
  r=$?
  grep -vE "^\[trt-log" "$OUT/harness_$v.log" | grep -E "seed|creator|round trip|workspace|rows compared|relative|enqueue ok|FAIL|Error|error|passed|failed" | head -80
  [[ $r -eq 0 ]] || rc=1
done
exit $rc
