#!/usr/bin/env bash
# Build the TurboQuant TensorRT plugin library (libturboquant_trt_plugin.so) against TensorRT headers.
#
#   build_scripts/build_plugin.sh --trt-include /usr/include/x86_64-linux-gnu
#   build_scripts/build_plugin.sh --trt-include /opt/trt-headers/11/include --build-dir build/plugin-11
#
# Options:
#   --trt-include DIR   folder with NvInferRuntime.h (default: $TRT_INCLUDE_DIR)
#   --build-dir DIR     where to build (default: build/plugin); the library is copied to DIR/
#   --archs LIST        CMAKE_CUDA_ARCHITECTURES (default: $TURBOQUANT_CUDA_ARCHS or "80;89;90a;100")
#   --native-arch       build for the GPU of this machine only (fast; for tests)
#   --harness           also build tests/harness/plugin_harness into DIR/
#   -j N                parallel jobs (default 4)
# After building, it checks that the library exports only getCreators and setLoggerFinder and
# needs no TensorRT library.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TRT_INC="${TRT_INCLUDE_DIR:-}"
BUILD="$ROOT/build/plugin"
ARCHS="${TURBOQUANT_CUDA_ARCHS:-80;89;90a;100}"
HARNESS=0
JOBS=4

die() { echo "build_plugin.sh: $*" >&2; exit 1; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --trt-include) TRT_INC="${2:?--trt-include needs a folder}"; shift 2 ;;
    --build-dir) BUILD="${2:?--build-dir needs a folder}"; shift 2 ;;
    --archs) ARCHS="${2:?--archs needs a list}"; shift 2 ;;
    --native-arch) ARCHS="native"; shift ;;
    --harness) HARNESS=1; shift ;;
    -j) JOBS="${2:?-j needs a number}"; shift 2 ;;
    -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done

[[ -n "$TRT_INC" ]] || die "no TensorRT headers: pass --trt-include DIR or set TRT_INCLUDE_DIR (the folder with NvInferRuntime.h)"
[[ -f "$TRT_INC/NvInferRuntime.h" ]] || die "$TRT_INC/NvInferRuntime.h not found"
command -v cmake >/dev/null || die "cmake not found"
command -v nvcc >/dev/null || die "nvcc not found (install the CUDA toolkit or add it to PATH)"
TRT_INC="$(cd "$TRT_INC" && pwd)"
mkdir -p "$BUILD"
BUILD="$(cd "$BUILD" && pwd)"

echo "== configure (TensorRT headers: $TRT_INC, CUDA archs: $ARCHS)"
cmake -S "$ROOT/plugin_src" -B "$BUILD/cmake" -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_CUDA_ARCHITECTURES="$ARCHS" -DTRT_INCLUDE_DIR="$TRT_INC"
echo "== build"
cmake --build "$BUILD/cmake" --target turboquant_trt_plugin -j "$JOBS"
LIB="$(find "$BUILD/cmake" -name libturboquant_trt_plugin.so -print -quit)"
[[ -n "$LIB" ]] || die "the build produced no libturboquant_trt_plugin.so"
cp -f "$LIB" "$BUILD/libturboquant_trt_plugin.so.tmp"
mv -f "$BUILD/libturboquant_trt_plugin.so.tmp" "$BUILD/libturboquant_trt_plugin.so"

echo "== check exports and dependencies"
EXPORTS="$(nm -D --defined-only "$BUILD/libturboquant_trt_plugin.so" | awk '$2 ~ /^[TW]$/ {print $3}' | sort | tr '\n' ' ')"
[[ "$EXPORTS" == "getCreators setLoggerFinder " ]] || die "unexpected exported functions: $EXPORTS"
if readelf -d "$BUILD/libturboquant_trt_plugin.so" | grep NEEDED | grep -qi nvinfer; then
  die "the library depends on a TensorRT library"
fi
readelf -d "$BUILD/libturboquant_trt_plugin.so" | awk '/NEEDED/ {print "   needs", $5}'
echo "   exports: $EXPORTS"

if [[ "$HARNESS" == 1 ]]; then
  echo "== harness"
  cmake -S "$ROOT/tests/harness" -B "$BUILD/harness" -DCMAKE_BUILD_TYPE=Release -DTRT_INCLUDE_DIR="$TRT_INC"
  cmake --build "$BUILD/harness" -j "$JOBS"
  cp -f "$BUILD/harness/plugin_harness" "$BUILD/plugin_harness"
fi
echo "built $BUILD/libturboquant_trt_plugin.so"
