#!/usr/bin/env bash
# Build the CUDA kernels and libturboquant.so with CMake and copy the library into
# turboquant_trt/lib/ (where turboquant_trt.kernels looks for it).
#
#   build_scripts/build_cuda.sh                 # sm_80, sm_89, sm_90a, sm_100
#   ARCHS=90a JOBS=16 build_scripts/build_cuda.sh
#   TRT_INCLUDE_DIR=/opt/trt/include build_scripts/build_cuda.sh   # also the TensorRT plugin
set -euo pipefail
cd "$(dirname "$0")/.."
ARCHS=${ARCHS:-"80;89;90a;100"}
JOBS=${JOBS:-2}
BUILD=${BUILD:-build/cmake}
command -v nvcc >/dev/null || { echo "nvcc not found: install the CUDA toolkit (12.8 or newer)" >&2; exit 1; }
command -v cmake >/dev/null || { echo "cmake not found: install cmake 3.24 or newer" >&2; exit 1; }
args=(-S plugin_src -B "$BUILD" -DCMAKE_BUILD_TYPE=Release "-DCMAKE_CUDA_ARCHITECTURES=$ARCHS")
if [[ -n "${TRT_INCLUDE_DIR:-}" ]]; then args+=("-DTRT_INCLUDE_DIR=$TRT_INCLUDE_DIR"); fi
cmake "${args[@]}"
cmake --build "$BUILD" -j "$JOBS"
mkdir -p turboquant_trt/lib
cp "$BUILD"/libturboquant.so turboquant_trt/lib/
echo "built $BUILD/libturboquant.so -> turboquant_trt/lib/libturboquant.so"
