"""The C++ codebook header equals the Python reference's codebooks, bit for bit (CPU only)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from turboquant_trt.format import SUPPORTED_BITS
from turboquant_trt.reference import codebook_boundaries, lloyd_max_codebook

ROOT = Path(__file__).resolve().parents[1]
HEADER = ROOT / "plugin_src" / "include" / "turboquant" / "codebooks.h"


def _arrays(text: str) -> dict[str, np.ndarray]:
    out = {}
    for m in re.finditer(r"constexpr float (\w+)\[(\d+)\] = \{(.*?)\};", text, re.S):
        vals = [v.strip().rstrip("f") for v in m.group(3).split(",") if v.strip()]
        arr = np.array([float.fromhex(v) for v in vals], dtype=np.float64)
        assert len(arr) == int(m.group(2)), m.group(1)
        out[m.group(1)] = arr
    return out


def test_header_values_equal_python_codebooks():
    arrays = _arrays(HEADER.read_text())
    for b in SUPPORTED_BITS:
        c = lloyd_max_codebook(b)
        beta = codebook_boundaries(b)
        got_c = arrays[f"kCodebook{b}"]
        got_b = arrays[f"kBoundaries{b}"]
        # exact: every header value is an fp32 written in hexadecimal
        assert np.array_equal(got_c.astype(np.float32), c) and np.array_equal(got_c, c.astype(np.float64))
        assert np.array_equal(got_b.astype(np.float32), beta) and np.array_equal(got_b, beta.astype(np.float64))


def test_codebooks_are_symmetric_as_the_kernels_assume():
    # the 4-bit decode path looks up |c| in the upper half and takes the sign from the code's top bit
    for b in SUPPORTED_BITS:
        c = lloyd_max_codebook(b)
        assert np.array_equal(c, -c[::-1])


def test_generator_reproduces_the_checked_in_header():
    import importlib.util
    spec = importlib.util.spec_from_file_location("gen_codebooks", ROOT / "build_scripts" / "gen_codebooks.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.render() == HEADER.read_text(), "run python build_scripts/gen_codebooks.py"
