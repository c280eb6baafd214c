#!/usr/bin/env python3
"""Decode attention over the quantized cache vs torch fp16 SDPA (same process, same shapes).

Prints ms, bytes read per second, the fraction of the card's read bandwidth (measured at the start
of the run), the speedup, the write kernel's time against decode, and what the write adds to a
write + decode step (as the plugin runs one). Same as `turboquant bench kernels`.

    python benchmarks/bench_decode.py [--iters 50] [--json out.json]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from turboquant_trt.cli_bench import kernels_cmd  # noqa: E402

if __name__ == "__main__":
    kernels_cmd()
