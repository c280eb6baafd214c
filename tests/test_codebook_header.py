"""The C++ codebook header equals the Python reference's codebooks, bit for bit (CPU only)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from turboquant_trt.format import SUPPORTED_BITS
from turboquant_trt.reference import codebook, codebook_boundaries, codebook_int8

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


def _int8_arrays(text: str) -> dict[str, np.ndarray]:
    out = {}
    for m in re.finditer(r"constexpr signed char (\w+)\[(\d+)\] = \{(.*?)\};", text, re.S):
        vals = [int(v) for v in m.group(3).split(",") if v.strip()]
        assert len(vals) == int(m.group(2)), m.group(1)
        out[m.group(1)] = np.array(vals, dtype=np.int64)
    return out


def _scalars(text: str) -> dict[str, float]:
    return {m.group(1): float.fromhex(m.group(2))
            for m in re.finditer(r"constexpr float (\w+) = ([-0-9a-fx.p+]+)f;", text)}


def test_header_values_equal_python_codebooks():
    text = HEADER.read_text()
    arrays, ints, scalars = _arrays(text), _int8_arrays(text), _scalars(text)
    for b in SUPPORTED_BITS:
        e, lam = codebook_int8(b)
        got_e = ints[f"kCodebookInt8{b}"]
        assert np.array_equal(got_e, e.astype(np.int64))
        got_lam = scalars[f"kCodebookLambda{b}"]
        assert np.float32(got_lam) == lam and got_lam == float(lam)
        c = codebook(b)
        beta = codebook_boundaries(b)
        got_c = arrays[f"kCodebook{b}"]
        got_b = arrays[f"kBoundaries{b}"]
        # exact: every header value is an fp32 written in hexadecimal
        assert np.array_equal(got_c.astype(np.float32), c) and np.array_equal(got_c, c.astype(np.float64))
        assert np.array_equal(got_b.astype(np.float32), beta) and np.array_equal(got_b, beta.astype(np.float64))


def test_header_codebook_is_int8_table_over_lambda():
    # what a kernel would compute from the int8 table and the scale equals the header's fp32 table
    text = HEADER.read_text()
    arrays, ints, scalars = _arrays(text), _int8_arrays(text), _scalars(text)
    for b in SUPPORTED_BITS:
        e = ints[f"kCodebookInt8{b}"]
        assert e.min() >= -128 and e.max() <= 127 and np.all(np.diff(e) > 0)
        c = e.astype(np.float32) / np.float32(scalars[f"kCodebookLambda{b}"])
        assert np.array_equal(c, arrays[f"kCodebook{b}"].astype(np.float32))
        mid = ((c[:-1] + c[1:]) * np.float32(0.5)).astype(np.float32)
        assert np.array_equal(mid, arrays[f"kBoundaries{b}"].astype(np.float32))


def test_codebooks_symmetric_except_8_bits():
    # 2, 3, 4 bits: e_b is symmetric; 8 bits: e_8 = m - 128 runs from -128 to 127
    for b in SUPPORTED_BITS:
        c = codebook(b)
        if b == 8:
            assert c[0] == -4.0 and c[-1] == 3.96875 and c[128] == 0.0
        else:
            assert np.array_equal(c, -c[::-1])


def test_generator_reproduces_the_checked_in_header():
    import importlib.util
    spec = importlib.util.spec_from_file_location("gen_codebooks", ROOT / "build_scripts" / "gen_codebooks.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.render() == HEADER.read_text(), "run python build_scripts/gen_codebooks.py"


def test_header_scale8_tables_equal_python():
    # the one-byte scale's grid and midpoints (docs/format.md §3.1), exact fp32 values
    from turboquant_trt.reference import scale8_tables

    arrays = _arrays(HEADER.read_text())
    f, m = scale8_tables()
    for name, want in (("kScale8Frac", f), ("kScale8Mid", m)):
        got = arrays[name]
        assert np.array_equal(got.astype(np.float32), want) and np.array_equal(got, want.astype(np.float64))
