"""The TensorRT-independent plugin core (plugin_src/core), built and run with cmake + a C++ compiler.

This is how the core's C++ unit tests run in CI: no TensorRT and no CUDA are needed. The test also
checks that the core's block layout and constants agree with the Python format module, and that
docs/plugin.md documents every field and input the core defines.
"""

from __future__ import annotations

import random
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from turboquant_trt import format as tqf

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "plugin_src" / "core"

pytestmark = pytest.mark.skipif(
    shutil.which("cmake") is None or (shutil.which("g++") is None and shutil.which("c++") is None),
    reason="cmake and a C++ compiler are needed to build plugin_src/core",
)


@pytest.fixture(scope="module")
def core_build(tmp_path_factory) -> Path:
    build = tmp_path_factory.mktemp("plugin_core_build")
    cfg = subprocess.run(
        ["cmake", "-S", str(CORE), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release"],
        capture_output=True, text=True)
    assert cfg.returncode == 0, f"cmake configure failed:\n{cfg.stdout}\n{cfg.stderr}"
    bld = subprocess.run(["cmake", "--build", str(build), "-j2"], capture_output=True, text=True)
    assert bld.returncode == 0, f"build failed:\n{bld.stdout}\n{bld.stderr}"
    return build


def test_core_unit_tests(core_build: Path) -> None:
    run = subprocess.run([str(core_build / "test_attention_core")], capture_output=True, text=True)
    assert run.returncode == 0, f"core unit tests failed:\n{run.stdout}\n{run.stderr}"
    assert "0 failures" in run.stdout
    assert "FAIL" not in run.stdout


def _constants(core_build: Path) -> list[list[str]]:
    out = subprocess.run([str(core_build / "core_layout_tool"), "--constants"],
                         capture_output=True, text=True, check=True).stdout
    return [line.split() for line in out.splitlines()]


def test_core_constants_match_python_format(core_build: Path) -> None:
    consts = {row[0]: row[1] for row in _constants(core_build) if len(row) == 2}
    assert int(consts["format_version"]) == tqf.FORMAT_VERSION
    assert int(consts["max_sink_tokens"]) == tqf.MAX_SINK_TOKENS
    assert int(consts["max_tokens_per_block"]) == tqf.MAX_TOKENS_PER_BLOCK
    assert int(consts["align"]) == tqf.ALIGN


def _core_layout(core_build: Path, head_dim: int, t: int, kb, vb) -> tuple[list, int]:
    out = subprocess.run(
        [str(core_build / "core_layout_tool"), str(head_dim), str(t),
         ",".join(map(str, kb)), ",".join(map(str, vb))],
        capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split("\n")
    heads = [tuple(int(x) for x in ln.split()[1:]) for ln in lines if ln and ln[0].isdigit()]
    total = int(next(ln for ln in lines if ln.startswith("block_bytes")).split()[1])
    return heads, total


def test_block_layout_matches_python_reference(core_build: Path) -> None:
    rng = random.Random(20261127)
    for _ in range(40):
        d = rng.choice((64, 128))  # the head dims the kernels (and so the plugin) support
        t = 1 << rng.randrange(5, 8)  # 32, 64, 128 (format version 2: whole tiles of 32 slots)
        h = rng.randrange(1, 9)
        kb = [rng.choice(tqf.SUPPORTED_BITS) for _ in range(h)]
        vb = [rng.choice(tqf.SUPPORTED_BITS) for _ in range(h)]
        heads, total = _core_layout(core_build, d, t, kb, vb)
        ref = tqf.LayerFormat(head_dim=d, k_bits=tuple(kb), v_bits=tuple(vb)).block_layout(t)
        assert total == ref.block_bytes, (d, t, kb, vb)
        for i, (kc, vc, km, vm) in enumerate(heads):
            assert (kc, vc, km, vm) == (ref.k_codes[i], ref.v_codes[i], ref.k_meta[i], ref.v_meta[i])


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("bits", tqf.SUPPORTED_BITS)
def test_tile_positions_match_python_reference(core_build: Path, head_dim: int, bits: int) -> None:
    """format.h's tile mapping (what the CUDA write, dequantize and context kernels use) puts every
    code bit of a 32-slot tile where turboquant_trt.reference does (docs/format.md §5.1)."""
    from turboquant_trt.reference import _tile_bitmap

    out = subprocess.run([str(core_build / "core_layout_tool"), "--tile", str(head_dim), str(bits)],
                         capture_output=True, text=True, check=True).stdout
    got = np.array(out.split(), dtype=np.int64).reshape(-1, 6)
    assert len(got) == 2 * tqf.TILE_TOKENS * head_dim * bits
    for which in (0, 1):
        rows = got[got[:, 0] == which]
        byte = np.zeros((tqf.TILE_TOKENS, head_dim, bits), np.int64)
        bit = np.zeros_like(byte)
        byte[rows[:, 1], rows[:, 2], rows[:, 3]] = rows[:, 4]
        bit[rows[:, 1], rows[:, 2], rows[:, 3]] = rows[:, 5]
        ref_byte, ref_bit = _tile_bitmap("kv"[which], head_dim, bits)
        assert np.array_equal(byte, ref_byte), f"{'KV'[which]} byte positions differ"
        assert np.array_equal(bit, ref_bit), f"{'KV'[which]} bit positions differ"


def test_layout_tool_rejects_invalid_format(core_build: Path) -> None:
    out = subprocess.run([str(core_build / "core_layout_tool"), "96", "16", "3", "3"],
                         capture_output=True, text=True)
    assert out.returncode == 1
    assert "head_dim=96" in out.stderr


def test_docs_plugin_lists_every_field_and_input(core_build: Path) -> None:
    doc = (ROOT / "docs" / "plugin.md").read_text()
    rows = _constants(core_build)
    fields = [r[1] for r in rows if r[0] == "field"]
    inputs = [r[2] for r in rows if r[0] == "input"]
    assert fields and inputs
    for name in fields + inputs:
        assert re.search(rf"`{re.escape(name)}`", doc), f"docs/plugin.md does not document `{name}`"
    consts = {r[0]: r[1] for r in rows if len(r) == 2}
    assert consts["plugin_name"] in doc and consts["plugin_namespace"] in doc
