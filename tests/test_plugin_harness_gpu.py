"""GPU harness test of the TensorRT plugin library (libturboquant_trt_plugin.so).

No TensorRT runtime is involved: tests/harness/plugin_harness.cpp loads the library with dlopen,
takes the creator from getCreators(), creates the plugin from fields (build phase), recreates it
from getFieldsToSerialize() in the runtime phase (the field round trip), then runs onShapeChange()
and enqueue() on device buffers for a prefill step, several decode steps, a mixed step (chunked
prefill beside generation requests) and more decode steps.

This file builds the case (random fp16 q/k/v, random calibrated-looking scale tables, a shuffled
block table, a pool shared with another layer) and checks, against turboquant_trt.reference:
  * the pool bytes the plugin wrote equal the reference quantizer's bytes (every position's
    codes in the 32-slot tiles and its scales; format version 2), and nothing outside this
    layer's part of each block was touched;
  * the sink copies and the recent-token rings equal the reference's fp16 transformed values;
  * every step's attention output matches float64 attention over the same dequantized cache, each
    query reading its last w positions in fp16 when the case has a window (relative error <= 2e-3;
    the output itself is fp16), and differs from unquantized attention
    by the expected quantization error (so the test cannot pass on an unquantized path).

Needs: an NVIDIA GPU, nvcc, cmake and TensorRT headers (TRT_INCLUDE_DIR). Skipped otherwise.
TURBOQUANT_PLUGIN_BUILD (a build folder made by build_scripts/build_plugin.sh --harness) reuses
an existing build instead of compiling here.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from turboquant_trt.format import FORMAT_VERSION, LayerFormat
from turboquant_trt.reference import (LayerQuantizer, LayerTables, PagedPool, reference_attention,
                                      rotation_signs)

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = ("TurboQuantAttention", "1", "turboquant")

pytestmark = pytest.mark.gpu


def _gpu_available() -> bool:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False
    return subprocess.run([smi, "-L"], capture_output=True).returncode == 0


def _trt_include() -> str | None:
    d = os.environ.get("TRT_INCLUDE_DIR")
    return d if d and (Path(d) / "NvInferRuntime.h").exists() else None


@pytest.fixture(scope="module")
def built() -> tuple[Path, Path]:
    if not _gpu_available():
        pytest.skip("needs an NVIDIA GPU (nvidia-smi -L failed or is missing)")
    prebuilt = os.environ.get("TURBOQUANT_PLUGIN_BUILD")
    if prebuilt:
        build = Path(prebuilt)
    else:
        inc = _trt_include()
        if inc is None:
            pytest.skip("TensorRT headers not found: set TRT_INCLUDE_DIR to a folder with NvInferRuntime.h")
        if shutil.which("nvcc") is None or shutil.which("cmake") is None:
            pytest.skip("needs nvcc and cmake to build the plugin library")
        build = ROOT / "build" / "plugin-harness"
        r = subprocess.run([str(ROOT / "build_scripts" / "build_plugin.sh"), "--trt-include", inc,
                            "--build-dir", str(build), "--harness", "--native-arch"],
                           capture_output=True, text=True)
        assert r.returncode == 0, f"build_plugin.sh failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    lib = build / "libturboquant_trt_plugin.so"
    harness = build / "plugin_harness"
    assert lib.exists() and harness.exists(), f"missing {lib} or {harness}"
    return lib, harness


@dataclass
class Case:
    name: str
    head_dim: int
    q_heads: int
    k_bits: tuple
    v_bits: tuple
    tokens_per_block: int
    sink_tokens: int
    prompt_lens: tuple      # prefill step: one context request each
    decode_steps: int       # before and after the mixed step
    chunk: int              # the mixed step: request 0 adds `chunk` tokens, the others one each
    max_seq_len: int = 0    # the plugin field; 0: the longest final length + 7
    layer: int = 5
    recent_tokens: int = 0  # the recent-token window (docs/format.md §5.2)


CASES = [
    # SmolLM2-135M's attention shape: 9 query / 3 KV heads, d=64; mixed bits; 4 sink tokens;
    # max_seq_len 4096 makes decode split the key range (256 keys per split at least), so short
    # requests leave splits empty and the long one spans several.
    Case("smollm2_d64", 64, 9, (4, 3, 3), (3, 2, 4), 32, 4, (37, 5, 700), 3, 9, max_seq_len=4096),
    # d=128, GQA 4, 8 KV heads, every bit width, T=64 (partial blocks), no sinks.
    Case("gqa4_d128", 128, 32, (2, 3, 4, 8, 3, 3, 2, 4), (3, 2, 8, 4, 3, 2, 3, 4), 64, 0, (200, 1, 129, 64), 3, 17),
    # The same shapes with a recent-token window: the calibration's default 16 tokens, and 8.
    Case("smollm2_d64_w16", 64, 9, (4, 3, 3), (3, 2, 4), 32, 4, (37, 5, 700), 3, 9, max_seq_len=4096,
         recent_tokens=16),
    Case("gqa4_d128_w8", 128, 32, (3,) * 8, (3,) * 8, 64, 0, (200, 1, 129, 64), 3, 17, recent_tokens=8),
]


def _fp16(x) -> np.ndarray:
    return np.asarray(x, np.float32).astype(np.float16)


def _tables(rng, h, d, layer) -> dict[str, np.ndarray]:
    return {
        "k_mean": _fp16(rng.normal(0, 0.5, (h, d))),
        "k_smooth": _fp16(np.exp(rng.normal(0, 0.3, (h, d)))),
        "v_mean": _fp16(rng.normal(0, 0.2, (h, d))),
        "v_smooth": _fp16(np.exp(rng.normal(0, 0.2, (h, d)))),
        "k_clip": _fp16(rng.uniform(0.85, 1.0, h)),
        "v_clip": _fp16(rng.uniform(0.85, 1.0, h)),
        "signs": _fp16(rotation_signs(d, layer)),
    }


def _write(path: Path, arr: np.ndarray) -> str:
    np.ascontiguousarray(arr).tofile(path)
    return path.name


def _tensor_line(kind: str, name: str, arr: np.ndarray, fname: str) -> str:
    dtype = {np.float16: "fp16", np.int32: "int32"}[arr.dtype.type]
    return f"{kind} {name} {dtype} {arr.ndim} {' '.join(str(s) for s in arr.shape)} {fname}"


def _rows(pool: PagedPool, fmt: LayerFormat, blk: int, r: int) -> bytes:
    """Everything stored for slot r of block blk (all heads: K and V codes from their tiles, scales)."""
    lay = pool.layout
    out = b""
    for h in range(fmt.kv_heads):
        out += pool.token_codes(blk, r, "k", h).tobytes() + pool.token_codes(blk, r, "v", h).tobytes()
        for off in (lay.k_meta[h], lay.v_meta[h]):
            out += pool._array(blk, off, fmt.meta_bytes)[r].tobytes()
    return out


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_plugin_prefill_then_decode(case: Case, built, tmp_path: Path) -> None:
    lib, harness = built
    seed = int.from_bytes(os.urandom(4), "little")  # fresh data every run; printed to replay one
    print(f"{case.name}: seed {seed}")
    rng = np.random.default_rng(seed)
    d, hq, h, t, ns = case.head_dim, case.q_heads, len(case.k_bits), case.tokens_per_block, case.sink_tokens
    w = case.recent_tokens
    # a scale exponent E per head and K/V (docs/format.md §3.1), as a calibrated table has
    exps = [tuple(int(x) for x in rng.integers(-12, -7, h)) for _ in range(2)]
    fmt = LayerFormat(head_dim=d, k_bits=case.k_bits, v_bits=case.v_bits, sink_tokens=ns, recent_tokens=w,
                      k_scale_exp=exps[0], v_scale_exp=exps[1])
    tabs = _tables(rng, h, d, case.layer)
    ltabs = LayerTables(**{k: v.astype(np.float32) for k, v in tabs.items()})
    quant = LayerQuantizer(fmt, ltabs, case.layer)

    # The requests' token counts per step: prefill, decodes, mixed (chunked prefill), decodes.
    b = len(case.prompt_lens)
    steps = [[("ctx", n) for n in case.prompt_lens]]
    steps += [[("gen", 1)] * b for _ in range(case.decode_steps)]
    steps += [[("ctx", case.chunk)] + [("gen", 1)] * (b - 1)]
    steps += [[("gen", 1)] * b for _ in range(case.decode_steps)]
    final_lens = [sum(s[i][1] for s in steps) for i in range(b)]
    max_seq_len = case.max_seq_len or max(final_lens) + 7

    # Paged pool shared with another layer: this layer sits at layer_offset inside each block.
    layout = fmt.block_layout(t)
    layer_offset = 1024
    block_stride = layer_offset + layout.block_bytes + 256
    blocks_needed = [math.ceil(n / t) for n in final_lens]
    max_blocks = max(blocks_needed) + 1
    num_blocks = sum(blocks_needed) + 5
    perm = rng.permutation(num_blocks).astype(np.int32)
    block_table = np.empty((b, max_blocks), np.int32)
    spare = list(perm[sum(blocks_needed):])
    used = 0
    for i in range(b):
        block_table[i, :blocks_needed[i]] = perm[used:used + blocks_needed[i]]
        used += blocks_needed[i]
        for j in range(blocks_needed[i], max_blocks):  # never read: spare physical blocks
            block_table[i, j] = spare[(i + j) % len(spare)]
    num_slots = b + 2
    seq_slots = rng.permutation(num_slots)[:b].astype(np.int32)

    ref = PagedPool(quant, num_blocks, t, num_slots, block_stride=block_stride, layer_offset=layer_offset)
    pool0 = ref.pool.copy()
    assert pool0.size % 4 == 0
    sink0 = np.full((num_slots, h, 2, max(ns, 1), d), np.nan, np.float16)
    recent0 = np.full((num_slots, h, 2, max(w, 1), d), np.nan, np.float16)

    case_dir = tmp_path / "case"
    out_dir = tmp_path / "out"
    case_dir.mkdir()
    out_dir.mkdir()
    lines = [f"plugin {' '.join(PLUGIN)}"]
    fields = [("format_version", "int32", [FORMAT_VERSION]), ("layer_index", "int32", [case.layer]),
              ("num_q_heads", "int32", [hq]), ("num_kv_heads", "int32", [h]), ("head_dim", "int32", [d]),
              ("tokens_per_block", "int32", [t]), ("k_bits", "int32", list(case.k_bits)),
              ("v_bits", "int32", list(case.v_bits)), ("k_scale_exp", "int32", list(fmt.k_scale_exp)),
              ("v_scale_exp", "int32", list(fmt.v_scale_exp)), ("sink_tokens", "int32", [ns]),
              ("recent_tokens", "int32", [w]),
              ("max_seq_len", "int32", [max_seq_len]), ("layer_offset", "int64", [layer_offset]),
              ("norm_correction", "int32", [1])]
    lines += [f"field {n} {ty} {len(v)} {' '.join(map(str, v))}" for n, ty, v in fields]
    lines.append(_tensor_line("static", "kv_pool", pool0.view(np.int32).reshape(num_blocks, -1),
                              _write(case_dir / "kv_pool.bin", pool0)))
    lines.append(_tensor_line("static", "sink_pool", sink0, _write(case_dir / "sink_pool.bin", sink0)))
    lines.append(_tensor_line("static", "recent_pool", recent0, _write(case_dir / "recent_pool.bin", recent0)))
    for name, arr in tabs.items():
        lines.append(_tensor_line("static", name, arr, _write(case_dir / f"{name}.bin", arr)))

    expected_inputs = []  # per step: (q [N,Hq,d], positions [N], request of each row, seq_lens)
    # every token's fp16 transformed K/V by request and position: what the window reads
    exact_k = [np.zeros((n, h, d), np.float32) for n in final_lens]
    exact_v = [np.zeros((n, h, d), np.float32) for n in final_lens]
    lens = [0] * b
    for si, step in enumerate(steps):
        n_new = [n for _, n in step]
        n_tok = sum(n_new)
        q = _fp16(rng.normal(0, 1, (n_tok, hq, d)))
        k = _fp16(rng.normal(0, 1, (n_tok, h, d)) * 1.5 + rng.normal(0, 1, (1, h, d)))
        v = _fp16(rng.normal(0, 1, (n_tok, h, d)))
        positions = np.concatenate([np.arange(lens[i], lens[i] + n_new[i]) for i in range(b)])
        seq_of_row = np.concatenate([np.full(n_new[i], i) for i in range(b)])
        for i in range(b):
            lens[i] += n_new[i]
        seq_lens = np.array(lens, np.int32)
        ctx_lens = np.array([n if kind == "ctx" else case.prompt_lens[i] for i, (kind, n) in enumerate(step)],
                            np.int32)  # generation rows carry the prompt length: the plugin must ignore it
        req_types = np.array([0 if kind == "ctx" else 1 for kind, _ in step], np.int32)
        qkv = np.concatenate([q.reshape(n_tok, -1), k.reshape(n_tok, -1), v.reshape(n_tok, -1)], axis=1)
        lines.append(f"step {n_tok} {b}")
        for name, arr in (("qkv", qkv), ("seq_lens", seq_lens), ("ctx_lens", ctx_lens),
                          ("request_types", req_types), ("block_table", block_table), ("seq_slots", seq_slots)):
            lines.append(_tensor_line("tensor", name, arr, _write(case_dir / f"s{si}_{name}.bin", arr)))
        ref.write(k.astype(np.float32), v.astype(np.float32), positions, block_table, seq_of_row, seq_slots)
        tk = quant.transform(k.astype(np.float32), "k").astype(np.float16).astype(np.float32)
        tv = quant.transform(v.astype(np.float32), "v").astype(np.float16).astype(np.float32)
        for i in range(b):
            sel = seq_of_row == i
            exact_k[i][positions[sel]] = tk[sel]
            exact_v[i][positions[sel]] = tv[sel]
        expected_inputs.append((q, k, v, positions, seq_of_row, seq_lens.copy()))
    (case_dir / "case.txt").write_text("\n".join(lines) + "\n")

    run = subprocess.run([str(harness), str(lib), str(case_dir), str(out_dir)], capture_output=True, text=True)
    print(run.stdout[-6000:])
    assert run.returncode == 0, f"harness failed:\n{run.stdout[-6000:]}\n{run.stderr[-3000:]}"
    assert "field round trip" in run.stdout and "HARNESS OK" in run.stdout

    # ---- pool bytes: every position's slot equals the reference's; nothing else was touched ----
    got_pool = np.fromfile(out_dir / "kv_pool.bin", np.uint8).reshape(num_blocks, block_stride)
    got_sink = np.fromfile(out_dir / "sink_pool.bin", np.float16).reshape(sink0.shape)
    mine = PagedPool(quant, num_blocks, t, num_slots, block_stride=block_stride, layer_offset=layer_offset)
    mine.pool = got_pool
    mine.sinks = got_sink
    outside = np.ones(block_stride, bool)
    outside[layer_offset:layer_offset + layout.block_bytes] = False
    assert np.array_equal(got_pool[:, outside], pool0[:, outside]), "plugin wrote outside its layer's block part"
    rows = mismatched = 0
    for i in range(b):
        for p in range(final_lens[i]):  # sink positions are written to the block too
            blk, r = block_table[i, p // t], p % t
            rows += 1
            mismatched += _rows(mine, fmt, blk, r) != _rows(ref, fmt, blk, r)
    print(f"{case.name}: {rows} token rows compared, {mismatched} differ from the reference bytes")
    assert mismatched == 0, f"{mismatched} of {rows} token rows differ from the reference quantizer's bytes"
    if ns:
        for i in range(b):
            s = seq_slots[i]
            np.testing.assert_array_equal(got_sink[s, :, :, :ns], ref.sinks[s, :, :, :ns])
    if w:  # the ring holds each request's last w positions, as the reference's
        got_recent = np.fromfile(out_dir / "recent_pool.bin", np.float16).reshape(recent0.shape)
        for i in range(b):
            s = seq_slots[i]
            held = ref.recent_positions[s] >= 0
            assert held.sum() == min(w, final_lens[i])
            np.testing.assert_array_equal(got_recent[s][:, :, held].view(np.uint16),
                                          ref.recent[s][:, :, held].view(np.uint16))
        print(f"{case.name}: recent-token rings equal the reference's")
    # codes and sinks as stored; with a window each query reads its last w positions from exact_k/v
    codes_view = copy.copy(mine)
    codes_view.q = LayerQuantizer(dataclasses.replace(fmt, recent_tokens=0), ltabs, case.layer)

    # ---- attention outputs ----------------------------------------------------------------
    worst = 0.0
    for si, (q, k, v, positions, seq_of_row, seq_lens) in enumerate(expected_inputs):
        got = np.fromfile(out_dir / f"out_{si}.bin", np.float16).reshape(len(q), hq, d).astype(np.float64)
        assert np.isfinite(got).all(), f"step {si}: output has NaN/Inf (unwritten rows?)"
        exp = np.empty_like(got)
        for i in range(b):
            sel = seq_of_row == i
            n = int(seq_lens[i])
            ks, vs = codes_view.read(block_table[i], n, int(seq_slots[i]))
            exp[sel] = reference_attention(quant, q[sel].astype(np.float32), ks, vs, q_positions=positions[sel],
                                           k_exact=exact_k[i][:n], v_exact=exact_v[i][:n])
        err = np.linalg.norm(got - exp) / np.linalg.norm(exp)
        worst = max(worst, err)
        assert err <= 2e-3, f"step {si}: relative error {err:.2e} vs float64 attention over the same cache"
    print(f"{case.name}: worst relative error over {len(steps)} steps: {worst:.2e}")

    # The same check against unquantized attention must show the quantization error.
    q, k, v, positions, seq_of_row, seq_lens = expected_inputs[-1]
    got = np.fromfile(out_dir / f"out_{len(steps) - 1}.bin", np.float16).reshape(len(q), hq, d).astype(np.float64)
    assert got.shape[0] == b
    # full-precision K/V of every token of every request, in order of position
    kv_all = {i: ([], []) for i in range(b)}
    for (_, k_s, v_s, pos_s, seq_s, _) in expected_inputs:
        for row in np.argsort(pos_s, kind="stable"):
            kv_all[seq_s[row]][0].append(k_s[row])
            kv_all[seq_s[row]][1].append(v_s[row])
    errs = []
    for i in range(b):
        kf = np.stack(kv_all[i][0]).astype(np.float32)
        vf = np.stack(kv_all[i][1]).astype(np.float32)
        exact = reference_attention(quant, q[i:i + 1].astype(np.float32), quant.transform(kf, "k"),
                                    quant.transform(vf, "v"))
        errs.append(np.linalg.norm(got[i:i + 1] - exact) / np.linalg.norm(exact))
    print(f"{case.name}: relative difference to unquantized attention: {max(errs):.2e}")
    assert max(errs) > 5 * 2e-3, "output equals unquantized attention: the quantized cache was not used"
