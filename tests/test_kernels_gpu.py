"""GPU tests of the CUDA kernels against the numpy reference (docs/format.md).

Write kernel: the pool bytes equal turboquant_trt.reference.PagedPool's bytes (codes in 32-slot
tiles, so the tokens of one tile share 32-bit words; one-byte log scales with a random exponent E
per head, format version 4: 8-bit codes taken again against the stored scale); pools start as
reused blocks full of random bits, which the writers must keep in every slot they do not own).
Attention: float64 reference attention over the same dequantized cache, relative error <= 1e-3
(fp16 output). Every test draws fresh random data, poisons outputs, and uses block tables whose
unused entries point far outside the pool. Skipped without a CUDA GPU.
"""

from __future__ import annotations

import copy
import ctypes
import dataclasses
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]

from turboquant_trt import kernels as K  # noqa: E402
from turboquant_trt.format import LayerFormat  # noqa: E402
from turboquant_trt.reference import (  # noqa: E402
    LayerQuantizer,
    LayerTables,
    PagedPool,
    reference_attention,
    rotation_signs,
    write_tile_slot,
)
from turboquant_trt.format import TILE_TOKENS  # noqa: E402

BAD_BLOCK = 1 << 28  # unused block-table entries: any read through them faults
REL_TOL = 1e-3


def _rng() -> np.random.Generator:
    return np.random.default_rng()  # fresh data every run


def _tables(h: int, d: int, rng, plain: bool = False) -> LayerTables:
    layer = int(rng.integers(0, 30))
    if plain:
        return LayerTables.identity(h, d, layer)
    return LayerTables(
        k_mean=rng.normal(0, 0.5, (h, d)), k_smooth=rng.uniform(0.5, 2.0, (h, d)),
        v_mean=rng.normal(0, 0.5, (h, d)), v_smooth=rng.uniform(0.5, 2.0, (h, d)),
        k_clip=rng.uniform(0.8, 1.2, h), v_clip=rng.uniform(0.8, 1.2, h),
        signs=rotation_signs(d, layer))


def _exps(fmt: LayerFormat, rng, lo: int = -12, hi: int = -8, k=None, v=None) -> LayerFormat:
    """The format with a random scale exponent E per head and K/V (docs/format.md §3.1); the
    test data's scales (about 2^-2 .. 2^4) then lie inside the 16 octaves, tiny ones below."""
    def draw():
        return tuple(int(x) for x in rng.integers(lo, hi + 1, fmt.kv_heads))
    return dataclasses.replace(fmt, k_scale_exp=k or draw(), v_scale_exp=v or draw())


def _block_tables(lens, t, rng, spare=3):
    need = [max(1, math.ceil(n / t)) for n in lens]
    num_blocks = sum(need) + spare
    perm = rng.permutation(num_blocks)
    width = max(need) + 1
    bt = np.full((len(lens), width), BAD_BLOCK, np.int32)
    i = 0
    for b, n in enumerate(need):
        bt[b, :n] = perm[i:i + n]
        i += n
    return bt, num_blocks


def _kv(n, h, d, rng, scale=1.0):
    x = rng.normal(0, 1, (n, h, d)) * scale
    x += rng.normal(0, 2, (1, h, d))  # a per-channel offset, like real keys
    x[:, :, rng.integers(0, d, 3)] *= 6  # outlier channels
    return x.astype(np.float16)


def _to_gpu(x, dtype=None):
    return torch.from_numpy(np.ascontiguousarray(x)).to("cuda", dtype=dtype)


def _reused_pool(quant, num_blocks, t, num_slots, rng) -> PagedPool:
    """A reference pool whose blocks hold random bits (a reused pool: stale tokens everywhere)."""
    ref = PagedPool(quant, num_blocks, t, num_slots=num_slots)
    ref.pool[:] = rng.integers(0, 256, ref.pool.shape, dtype=np.uint8)
    return ref


def _setup(fmt, tables, t, lens, rng, slots=None):
    """A reference pool holding random K/V for every position of every sequence, and its GPU twin."""
    bt, num_blocks = _block_tables(lens, t, rng)
    quant = LayerQuantizer(fmt, tables)
    ref = _reused_pool(quant, num_blocks, t, len(lens), rng)
    slots = np.arange(len(lens), dtype=np.int32) if slots is None else slots
    data = []
    for b, n in enumerate(lens):
        k = _kv(n, fmt.kv_heads, fmt.head_dim, rng)
        v = _kv(n, fmt.kv_heads, fmt.head_dim, rng)
        ref.write(k.astype(np.float32), v.astype(np.float32), np.arange(n), bt, np.full(n, b), slots)
        data.append((k, v))
    layer = K.KernelLayer.allocate(fmt, num_blocks, t, len(lens), tables)
    layer.pool.copy_(_to_gpu(ref.pool))
    layer.sink_pool.copy_(_to_gpu(ref.sinks))
    layer.recent_pool.copy_(_to_gpu(ref.recent))
    return quant, ref, layer, bt, slots, data


def _mismatching_bytes(layer, ref, ks, vs, bt, lens) -> int:
    """Writes each sequence's K/V (ks[b], vs[b]: positions 0..n-1, the values the kernel read)
    through the reference pool, then counts the GPU pool's bytes that differ from the reference's."""
    slots = np.arange(len(lens), dtype=np.int32)
    for b, n in enumerate(lens):
        ref.write(np.asarray(ks[b], np.float32), np.asarray(vs[b], np.float32), np.arange(n), bt,
                  np.full(n, b), slots)
    torch.cuda.synchronize()
    return int((layer.pool.cpu().numpy() != ref.pool).sum())


def _rel(out, ref):
    out = out.double().cpu().numpy()
    assert np.isfinite(out).all(), "output has NaN/Inf (unwritten or broken)"
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


# ---------------------------------------------------------------------------------------------
# write kernel: bytes
# ---------------------------------------------------------------------------------------------

WRITE_CASES = [
    # d, k_bits, v_bits, T, sinks, norm_correction
    (128, (3,) * 4, (3,) * 4, 32, 0, True),
    (128, (2,) * 4, (4,) * 4, 64, 4, True),
    (128, (4, 3, 2, 8), (8, 2, 3, 4), 128, 2, True),
    (64, (3,) * 3, (3,) * 3, 64, 4, False),
    (64, (2, 8, 4), (4, 3, 8), 32, 0, True),
    (128, (8,) * 2, (8,) * 2, 32, 16, False),
    (64, (3,) * 2, (2,) * 2, 128, 1, True),
]


@pytest.mark.parametrize("d,kb,vb,t,ns,nc", WRITE_CASES)
@pytest.mark.parametrize("act", ["fp16", "bf16"])
def test_write_bytes_match_reference(d, kb, vb, t, ns, nc, act):
    _check_write(d, kb, vb, t, ns, nc, act, 0)


@pytest.mark.parametrize("d,kb,vb,t,ns,w", [
    (128, (3,) * 2, (3,) * 2, 64, 0, 16),
    (128, (4, 2), (2, 4), 32, 4, 8),
    (64, (3,) * 3, (3,) * 3, 128, 2, 64),
    (64, (8,), (2,), 32, 0, 1),
])
def test_write_recent_ring_matches_reference(d, kb, vb, t, ns, w):
    _check_write(d, kb, vb, t, ns, True, "fp16", w)


def _check_write(d, kb, vb, t, ns, nc, act, w):
    """Prefill then one decode step through the write kernel; pool, sink and ring bytes must equal
    the reference's."""
    rng = _rng()
    fmt = _exps(LayerFormat(d, kb, vb, sink_tokens=ns, norm_correction=nc, recent_tokens=w), rng)
    tables = _tables(fmt.kv_heads, d, rng)
    lens = [int(x) for x in rng.integers(1, 300, 5)] + [ns + 1, 1, 2 * t + 1] + ([w, w + 1] if w else [])
    bt, num_blocks = _block_tables(lens, t, rng)
    quant = LayerQuantizer(fmt, tables)
    ref = _reused_pool(quant, num_blocks, t, len(lens), rng)
    layer = K.KernelLayer.allocate(fmt, num_blocks, t, len(lens), tables)
    layer.pool.copy_(_to_gpu(ref.pool))
    tdt = torch.float16 if act == "fp16" else torch.bfloat16
    # prefill: all but the last token of each sequence in one call (cu_q_lens; the 32 tokens of a
    # tile are written by concurrent warps), then one decode step
    ks, vs = [], []
    for n in lens:
        ks.append(_kv(n, fmt.kv_heads, d, rng))
        vs.append(_kv(n, fmt.kv_heads, d, rng))
    pre = [n - 1 for n in lens]
    cu = np.concatenate([[0], np.cumsum(pre)]).astype(np.int32)
    kp = _to_gpu(np.concatenate([k[:-1] for k in ks]), tdt)
    vp = _to_gpu(np.concatenate([v[:-1] for v in vs]), tdt)
    K.quantize_kv(layer, kp, vp, bt, pre, cu_q_lens=cu, max_q_len=max(pre))
    kd = _to_gpu(np.stack([k[-1] for k in ks]), tdt)
    vd = _to_gpu(np.stack([v[-1] for v in vs]), tdt)
    K.quantize_kv(layer, kd, vd, bt, lens)
    # the reference sees exactly what the kernel read (fp16/bf16 values)
    seen = [[torch.from_numpy(x).to(tdt).float().numpy() for x in xs] for xs in (ks, vs)]
    bad_bytes = _mismatching_bytes(layer, ref, *seen, bt, lens)
    n_vec = sum(lens) * fmt.kv_heads * 2
    print(f"write d={d} kb={kb} vb={vb} T={t} ns={ns} w={w} nc={nc} {act}: "
          f"{bad_bytes} mismatching bytes of {layer.pool.numel()} ({n_vec} vectors)")
    assert bad_bytes == 0, f"{bad_bytes} bytes differ from the reference"
    sink_got = layer.sink_pool.cpu().numpy()
    assert np.array_equal(sink_got.view(np.uint16), ref.sinks.view(np.uint16)), "sink pool differs"
    if w:
        ring = layer.recent_pool.cpu().numpy().view(np.uint16)
        want = ref.recent.view(np.uint16)
        held = ref.recent_positions >= 0  # [slot, w]: entries that hold a position
        for b, n in enumerate(lens):
            assert held[b].sum() == min(n, w)
            assert np.array_equal(ring[b][:, :, held[b]], want[b][:, :, held[b]]), f"ring of sequence {b} differs"


@pytest.mark.parametrize("d", [64, 128])
def test_write_from_unaligned_strided_rows(d):
    """k and v rows at an odd token stride, 2 bytes off 8-byte alignment: the write kernel's
    element-by-element load path (aligned inputs take the vector loads)."""
    rng = _rng()
    fmt = _exps(LayerFormat(d, (3, 8), (4, 2), sink_tokens=2, norm_correction=True), rng)
    h, t = fmt.kv_heads, 64
    tables = _tables(h, d, rng)
    lens = [int(x) for x in rng.integers(1, 200, 3)] + [1, 70]
    bt, num_blocks = _block_tables(lens, t, rng)
    quant = LayerQuantizer(fmt, tables)
    ref = _reused_pool(quant, num_blocks, t, len(lens), rng)
    layer = K.KernelLayer.allocate(fmt, num_blocks, t, len(lens), tables)
    layer.pool.copy_(_to_gpu(ref.pool))
    ks = [_kv(n, h, d, rng) for n in lens]
    vs = [_kv(n, h, d, rng) for n in lens]

    def strided(x):
        # [n, h, d] -> a view of a NaN-filled buffer with token stride h*d + 1, starting one element in
        buf = torch.full((x.shape[0], h * d + 1), float("nan"), dtype=torch.float16, device="cuda")
        view = buf[:, 1:].unflatten(1, (h, d))
        view.copy_(_to_gpu(x))
        return view

    pre = [n - 1 for n in lens]
    cu = np.concatenate([[0], np.cumsum(pre)]).astype(np.int32)
    kp = strided(np.concatenate([k[:-1] for k in ks]))
    vp = strided(np.concatenate([v[:-1] for v in vs]))
    assert kp.stride(0) % 4 != 0 and kp.data_ptr() % 8 != 0
    K.quantize_kv(layer, kp, vp, bt, pre, cu_q_lens=cu, max_q_len=max(pre))
    K.quantize_kv(layer, strided(np.stack([k[-1] for k in ks])), strided(np.stack([v[-1] for v in vs])), bt, lens)
    bad = _mismatching_bytes(layer, ref, ks, vs, bt, lens)
    print(f"write from unaligned strided rows d={d}: {bad} mismatching bytes")
    assert bad == 0
    assert np.array_equal(layer.sink_pool.cpu().numpy().view(np.uint16), ref.sinks.view(np.uint16)), "sink pool differs"


@pytest.mark.parametrize("t", [32, 128])
def test_write_zero_and_tiny_vectors(t):
    """Zero vectors (8-bit: every code at the zero level, scale 0) and tiny ones, beside normal ones."""
    rng = _rng()
    d = 128
    # E per head (docs/format.md §3.1): head 0 flushes the tiny vectors' scales up to 2^E; heads 1
    # and 2 (16 octaves ending at 2^-0.1 and 2^-2.1) clip the normal ones to the top step
    fmt = LayerFormat(d, (8, 3, 2), (4, 8, 8), sink_tokens=0, norm_correction=True,
                      k_scale_exp=(-6, -16, -18), v_scale_exp=(-7, -15, -18))
    tables = _tables(3, d, rng, plain=True)
    lens = [int(rng.integers(40, 100)), 33]
    bt, num_blocks = _block_tables(lens, t, rng)
    quant = LayerQuantizer(fmt, tables)
    ref = _reused_pool(quant, num_blocks, t, len(lens), rng)
    layer = K.KernelLayer.allocate(fmt, num_blocks, t, len(lens), tables)
    layer.pool.copy_(_to_gpu(ref.pool))
    ks = [_kv(n, 3, d, rng) for n in lens]
    vs = [_kv(n, 3, d, rng) for n in lens]
    for x in ks + vs:
        rows = rng.choice(x.shape[0], size=x.shape[0] // 3, replace=False)
        x[rows[: len(rows) // 2]] = 0                      # zero vectors
        x[rows[len(rows) // 2:]] *= np.float16(1e-4)        # tiny ones
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    K.quantize_kv(layer, _to_gpu(np.concatenate(ks)), _to_gpu(np.concatenate(vs)), bt, lens,
                  cu_q_lens=cu, max_q_len=max(lens))
    bad = _mismatching_bytes(layer, ref, ks, vs, bt, lens)
    print(f"write zero/tiny vectors T={t}: {bad} mismatching bytes")
    assert bad == 0


# ---------------------------------------------------------------------------------------------
# decode attention
# ---------------------------------------------------------------------------------------------

DECODE_CASES = [
    # d, H, g, bits (k, v), T, sinks, lens
    (128, 8, 4, (3, 3), 64, 0, [1, 17, 333, 1501]),
    (128, 2, 4, (3, 3), 32, 4, [2, 63, 64, 65, 129, 700]),
    (64, 3, 3, (3, 3), 32, 0, [5, 999, 257]),           # SmolLM2's heads
    (128, 2, 1, (4, 2), 64, 2, [3, 40, 77]),
    (128, 2, 8, (2, 4), 128, 0, [9, 300]),
    (64, 1, 16, (8, 8), 32, 3, [11, 130, 1025]),
    (64, 4, 4, (4, 4), 64, 16, [16, 17, 31, 500]),
    (128, 2, 4, (8, 3), 128, 0, [127, 128, 129, 2050]),
    (64, 2, 8, (2, 2), 128, 1, [1, 2, 3, 4000]),
]


def _decode_error(rng, fmt, tables, g, t, lens, num_sms, finish="counters") -> tuple[float, int]:
    """Relative error of decode_attention (poisoned output, fresh random queries) against the
    float64 reference over the same dequantized cache, and the number of splits used. With the
    finish counters (finish="counters") the call must also leave every counter at 0."""
    h, d = fmt.kv_heads, fmt.head_dim
    quant, ref, layer, bt, slots, _ = _setup(fmt, tables, t, lens, rng)
    q = (rng.normal(0, 1, (len(lens), h * g, d)) * 2).astype(np.float16)
    out = torch.full((len(lens), h * g, d), float("nan"), dtype=torch.float16, device="cuda")
    counters = None
    if finish == "counters":
        counters = torch.zeros(K.library().tq_decode_finish_counters(len(lens), h * g, h), dtype=torch.int32,
                               device="cuda")
    K.decode_attention(layer, _to_gpu(q), bt, lens, max(lens), out=out, num_sms=num_sms, finish=finish,
                       finish_counters=counters)
    torch.cuda.synchronize()
    if counters is not None:
        assert int(counters.count_nonzero()) == 0, "the finish must leave its counters at 0"
    want = np.concatenate([
        reference_attention(quant, q[b:b + 1].astype(np.float32), *ref.read(bt[b], n, slots[b]))
        for b, n in enumerate(lens)])
    return _rel(out, want), K.library().tq_decode_num_splits(len(lens), h * g, h, d, max(lens), num_sms)


@pytest.mark.parametrize("d,h,g,bits,t,ns,lens", DECODE_CASES)
@pytest.mark.parametrize("num_sms,finish", [(0, "counters"), (1, "counters"), (0, "kernel"), (1, "kernel")])
def test_decode_matches_float64_reference(d, h, g, bits, t, ns, lens, num_sms, finish):
    """Both finishes: the split kernel's last CTA per row with counters, or the reduce kernel."""
    rng = _rng()
    fmt = _exps(LayerFormat(d, (bits[0],) * h, (bits[1],) * h, sink_tokens=ns,
                            norm_correction=bool(rng.integers(0, 2))), rng)
    tables = _tables(h, d, rng, plain=bool(rng.integers(0, 4) == 0))
    err, splits = _decode_error(rng, fmt, tables, g, t, lens, num_sms, finish)
    print(f"decode d={d} H={h} g={g} bits={bits} T={t} ns={ns} splits={splits} finish={finish}: rel err {err:.2e}")
    assert err <= REL_TOL


@pytest.mark.parametrize("bits", [(3, 3), (8, 8), (8, 3), (2, 4)])
def test_decode_cta_width_follows_shared_memory(bits):
    """With num_sms = 1 one (sequence, KV head) fills the device, so the four-head d=128 kernel
    plans one CTA of 16 warps where its 16 pipelines fit in shared memory (3-bit codes: 16 splits)
    and must fall back to CTAs of 4 where they do not (8-bit codes): the launch has to pick a width
    whose shared memory the device allows, and the result is checked either way."""
    rng = _rng()
    fmt = _exps(LayerFormat(128, (bits[0],), (bits[1],), sink_tokens=0, norm_correction=True), rng)
    tables = _tables(1, 128, rng)
    err, splits = _decode_error(rng, fmt, tables, 4, 64, [3001], 1)
    print(f"decode CTA width d=128 H=1 g=4 bits={bits} L=3001 num_sms=1 (splits {splits} if 16 warps fit): rel err {err:.2e}")
    assert err <= REL_TOL


RECENT_CASES = [
    # d, H, g, bits (k, v), T, sinks, w, lens
    (128, 2, 4, (3, 3), 64, 0, 16, [1, 15, 16, 17, 333, 1501]),
    (128, 8, 4, (3, 3), 32, 4, 8, [2, 5, 9, 12, 700]),
    (64, 3, 3, (3, 3), 64, 0, 64, [63, 64, 65, 999]),
    (64, 1, 16, (2, 4), 128, 16, 32, [16, 30, 47, 48, 49, 2050]),
    (128, 2, 1, (8, 2), 32, 1, 1, [1, 2, 3, 100]),
]


@pytest.mark.parametrize("d,h,g,bits,t,ns,w,lens", RECENT_CASES)
@pytest.mark.parametrize("num_sms", [0, 1])
def test_decode_reads_recent_window(d, h, g, bits, t, ns, w, lens, num_sms):
    """The last w positions come from the fp16 ring (ref.read substitutes them likewise); the ring
    holds values the codes do not, so reading the codes there instead fails the tolerance."""
    rng = _rng()
    fmt = _exps(LayerFormat(d, (bits[0],) * h, (bits[1],) * h, sink_tokens=ns, recent_tokens=w), rng)
    err, splits = _decode_error(rng, fmt, _tables(h, d, rng), g, t, lens, num_sms)
    print(f"decode window d={d} H={h} g={g} bits={bits} T={t} ns={ns} w={w} splits={splits}: "
          f"rel err {err:.2e}")
    assert err <= REL_TOL


@pytest.mark.parametrize("num_sms", [
    0,  # 157 splits of 128 keys: more than 32 CTA partials per row (the reduce kernel's CTA path;
        # the finish's second (max, sum) pair per lane)
    1,  # 12 splits of 1,696 keys with diffuse attention: p' must keep its bits over long splits
])
@pytest.mark.parametrize("finish", ["counters", "kernel"])
def test_decode_long_sequence(num_sms, finish):
    rng = _rng()
    d, h = 128, 1
    fmt = _exps(LayerFormat(d, (3,) * h, (3,) * h, sink_tokens=2), rng)
    err, splits = _decode_error(rng, fmt, _tables(h, d, rng), 4, 64, [20000, 7], num_sms, finish)
    print(f"decode long d={d} splits={splits} finish={finish}: rel err {err:.2e}")
    assert err <= REL_TOL


def test_decode_mixed_bits_per_head_and_bf16():
    rng = _rng()
    d, h, g = 128, 4, 4
    fmt = _exps(LayerFormat(d, (3, 2, 4, 3), (3, 4, 2, 8), sink_tokens=2), rng)
    tables = _tables(h, d, rng)
    lens = [7, 190, 801]
    quant, ref, layer, bt, slots, _ = _setup(fmt, tables, 32, lens, rng)
    q = rng.normal(0, 1, (len(lens), h * g, d)).astype(np.float16)
    want = np.concatenate([
        reference_attention(quant, q[b:b + 1].astype(np.float32), *ref.read(bt[b], n, slots[b]))
        for b, n in enumerate(lens)])
    out = torch.full((len(lens), h * g, d), float("nan"), dtype=torch.float16, device="cuda")
    K.decode_attention(layer, _to_gpu(q), bt, lens, max(lens), out=out)
    assert _rel(out, want) <= REL_TOL
    # bf16 in and out: the output's own rounding (8 bits of mantissa) dominates
    qb = _to_gpu(q.astype(np.float32), torch.bfloat16)
    outb = torch.full_like(qb, float("nan"))
    K.decode_attention(layer, qb, bt, lens, max(lens), out=outb)
    wantb = np.concatenate([
        reference_attention(quant, qb[b:b + 1].float().cpu().numpy(), *ref.read(bt[b], n, slots[b]))
        for b, n in enumerate(lens)])
    assert _rel(outb, wantb) <= 6e-3


@pytest.mark.parametrize("w", [0, 16])
def test_decode_right_behind_the_write_reads_the_new_token(w):
    """A decode step as the plugin runs it: the write kernel stores each sequence's new token and
    decode attention follows on the same stream with no host wait in between (on sm_90+ the split
    kernel is a programmatic dependent launch that may start while the write kernel runs, and must
    wait for it before it reads the cache). Each new key lies along its KV head's queries and is
    long, so the new token carries most of the attention: a decode that read its slot (random
    bytes; with w = 16 the ring entry) before the write landed is far off, as the same decode run
    before the write shows. What it checks is the step's result: on the H200 (2026-11-28) a scratch
    build whose split kernel never waited for the write passed too, because the write lands before
    the split kernel reaches the newest position, so a missing wait need not fail here.
    The write kernel also zeroes the decode's finish counters (as the plugin's decode step had it
    before the decode wrote the new tokens itself), here poisoned first: with a counter left
    non-zero no CTA would finish its row and the output stays NaN."""
    rng = _rng()
    d, h, g, t = 128, 8, 4, 64
    fmt = _exps(LayerFormat(d, (3,) * h, (3,) * h, sink_tokens=2, norm_correction=True, recent_tokens=w), rng)
    tables = _tables(h, d, rng)
    lens = [int(x) for x in rng.integers(700, 2500, 8)]
    bt, num_blocks = _block_tables(lens, t, rng)
    quant = LayerQuantizer(fmt, tables)
    ref = _reused_pool(quant, num_blocks, t, len(lens), rng)
    slots = np.arange(len(lens), dtype=np.int32)
    q = rng.normal(0, 1, (len(lens), h * g, d)).astype(np.float16)
    ks, vs = [], []
    for b, n in enumerate(lens):
        k, v = _kv(n, h, d, rng), _kv(n, h, d, rng)
        for kh in range(h):
            along = q[b, kh * g:(kh + 1) * g].astype(np.float32).sum(0)
            k[-1, kh] = (along / np.linalg.norm(along) * 40).astype(np.float16)
        ref.write(k[:-1].astype(np.float32), v[:-1].astype(np.float32), np.arange(n - 1), bt,
                  np.full(n - 1, b), slots)
        ks.append(k)
        vs.append(v)
    layer = K.KernelLayer.allocate(fmt, num_blocks, t, len(lens), tables)
    layer.pool.copy_(_to_gpu(ref.pool))
    layer.sink_pool.copy_(_to_gpu(ref.sinks))
    layer.recent_pool.copy_(_to_gpu(ref.recent))
    # every input on the GPU first: no copy may sit between the two kernels on the stream
    bt_g, lens_g, slot_g, q_g = _to_gpu(bt), _to_gpu(np.array(lens, np.int32)), _to_gpu(slots), _to_gpu(q)
    kd = _to_gpu(np.stack([k[-1] for k in ks]))
    vd = _to_gpu(np.stack([v[-1] for v in vs]))
    stale = torch.full((len(lens), h * g, d), float("nan"), dtype=torch.float16, device="cuda")
    out = torch.full_like(stale, float("nan"))
    counters = torch.full((K.library().tq_decode_finish_counters(len(lens), h * g, h),), 12345,
                          dtype=torch.int32, device="cuda")
    K.decode_attention(layer, q_g, bt_g, lens_g, max(lens), seq_slot=slot_g, out=stale, finish="kernel")
    torch.cuda.synchronize()
    K.quantize_kv(layer, kd, vd, bt_g, lens_g, seq_slot=slot_g, zero_words=counters)
    K.decode_attention(layer, q_g, bt_g, lens_g, max(lens), seq_slot=slot_g, out=out, finish_counters=counters)
    torch.cuda.synchronize()
    assert int(counters.count_nonzero()) == 0
    for b, n in enumerate(lens):
        ref.write(ks[b][-1:].astype(np.float32), vs[b][-1:].astype(np.float32), np.array([n - 1]), bt,
                  np.array([b]), slots)
    want = np.concatenate([
        reference_attention(quant, q[b:b + 1].astype(np.float32), *ref.read(bt[b], n, slots[b]))
        for b, n in enumerate(lens)])
    err, err_stale = _rel(out, want), _rel(stale, want)
    print(f"decode right behind the write w={w}: rel err {err:.2e} (before the write: {err_stale:.2e})")
    assert err_stale > 0.1, "the new token should dominate: this test could not see a stale read"
    assert err <= REL_TOL


FUSED_WRITE_CASES = [
    # d, H, g, bits (k, v), T, sinks, w, lens (None: 8 random lengths 700-2500), num_sms, act
    (128, 8, 4, (3, 3), 64, 2, 0, None, 0, "fp16"),
    (128, 8, 4, (3, 3), 64, 1, 16, None, 0, "fp16"),
    (64, 3, 3, (3, 3), 32, 0, 0, [1, 2, 33, 65, 999], 0, "fp16"),  # new tokens in a split's first tiles
    (128, 1, 4, (3, 3), 64, 4, 0, [3001], 1, "fp16"),                # one CTA of 16 warps
    (128, 2, 4, (3, 3), 64, 4, 0, [1, 3, 5, 40, 3001], 1, "fp16"),  # sinks: new tokens below 4
    (128, 2, 8, (2, 4), 128, 1, 16, [9, 300, 17], 0, "fp16"),       # 8 heads per CTA, k_bits != v_bits
    (64, 1, 16, (8, 8), 32, 3, 0, [2, 11, 130, 1025], 0, "fp16"),   # 16 heads per KV head: write kernel first
    (128, 2, 1, (8, 2), 32, 1, 1, [1, 2, 3, 100], 0, "fp16"),
    (128, 4, 4, (4, 3), 64, 2, 16, [50, 700, 1300], 0, "bf16"),
]


@pytest.mark.parametrize("d,h,g,bits,t,ns,w,lens,num_sms,act", FUSED_WRITE_CASES)
def test_decode_writes_the_new_token(d, h, g, bits, t, ns, w, lens, num_sms, act):
    """decode_attention(k=, v=): the decode writes each sequence's new token (position
    seq_lens[b] - 1) itself, in the CTA that holds that position (or, with more than 8 query heads
    per KV head, with the write kernel first), then reads it. The pool, sink rows and ring must
    equal the reference's bytes everywhere (so nothing else was touched), and the output the
    float64 reference. Each new key lies along its KV head's queries and is long, so a read of the
    slot before the write (as the same decode without k, v shows) is far off. The finish counters
    must be left at 0, as the plugin keeps them across steps."""
    rng = _rng()
    fmt = _exps(LayerFormat(d, (bits[0],) * h, (bits[1],) * h, sink_tokens=ns, norm_correction=bool(rng.integers(0, 2)),
                            recent_tokens=w), rng)
    tables = _tables(h, d, rng)
    lens = lens or [int(x) for x in rng.integers(700, 2500, 8)]
    dtype = torch.bfloat16 if act == "bf16" else torch.float16
    bt, num_blocks = _block_tables(lens, t, rng)
    quant = LayerQuantizer(fmt, tables)
    ref = _reused_pool(quant, num_blocks, t, len(lens), rng)
    slots = np.arange(len(lens), dtype=np.int32)
    q_g = _to_gpu((rng.normal(0, 1, (len(lens), h * g, d)) * 2).astype(np.float32), dtype)
    q = q_g.float().cpu().numpy()  # the values the kernel reads (bf16: rounded)
    new_k, new_v = [], []
    for b, n in enumerate(lens):
        k, v = _kv(n, h, d, rng), _kv(n, h, d, rng)
        for kh in range(h):
            along = q[b, kh * g:(kh + 1) * g].sum(0)
            k[-1, kh] = (along / np.linalg.norm(along) * 40).astype(np.float16)
        if n > 1:  # a sequence of length 1 has only its new token
            ref.write(k[:-1].astype(np.float32), v[:-1].astype(np.float32), np.arange(n - 1), bt,
                      np.full(n - 1, b), slots)
        new_k.append(k[-1])
        new_v.append(v[-1])
    layer = K.KernelLayer.allocate(fmt, num_blocks, t, len(lens), tables)
    layer.pool.copy_(_to_gpu(ref.pool))
    layer.sink_pool.copy_(_to_gpu(ref.sinks))
    layer.recent_pool.copy_(_to_gpu(ref.recent))
    bt_g, lens_g, slot_g = _to_gpu(bt), _to_gpu(np.array(lens, np.int32)), _to_gpu(slots)
    kd = _to_gpu(np.stack(new_k).astype(np.float32), dtype)
    vd = _to_gpu(np.stack(new_v).astype(np.float32), dtype)
    stale = torch.full((len(lens), h * g, d), float("nan"), dtype=dtype, device="cuda")
    out = torch.full_like(stale, float("nan"))
    counters = torch.zeros((K.library().tq_decode_finish_counters(len(lens), h * g, h),), dtype=torch.int32,
                           device="cuda")
    K.decode_attention(layer, q_g, bt_g, lens_g, max(lens), seq_slot=slot_g, out=stale, num_sms=num_sms,
                       finish="kernel")
    K.decode_attention(layer, q_g, bt_g, lens_g, max(lens), seq_slot=slot_g, out=out, num_sms=num_sms,
                       finish_counters=counters, k=kd, v=vd)
    torch.cuda.synchronize()
    assert int(counters.count_nonzero()) == 0
    for b, n in enumerate(lens):
        ref.write(kd[b:b + 1].float().cpu().numpy(), vd[b:b + 1].float().cpu().numpy(), np.array([n - 1]), bt,
                  np.array([b]), slots)
    pool_diff = int((layer.pool.cpu().numpy() != ref.pool).sum())
    sink_diff = int((layer.sink_pool.view(torch.int16).cpu().numpy() != ref.sinks.view(np.int16)).sum())
    ring_diff = int((layer.recent_pool.view(torch.int16).cpu().numpy() != ref.recent.view(np.int16)).sum())
    want = np.concatenate([
        reference_attention(quant, q[b:b + 1], *ref.read(bt[b], n, slots[b])) for b, n in enumerate(lens)])
    err = _rel(out, want)
    # before the write the new slot holds random bits, and its sink row or ring entry may be NaN
    stale_np = stale.double().cpu().numpy()
    err_stale = (float(np.linalg.norm(stale_np - want) / np.linalg.norm(want)) if np.isfinite(stale_np).all()
                 else float("inf"))
    splits = K.library().tq_decode_num_splits(len(lens), h * g, h, d, max(lens), num_sms)
    print(f"decode writes the new token d={d} H={h} g={g} bits={bits} T={t} ns={ns} w={w} {act} splits={splits}: "
          f"pool/sink/ring bytes differing {pool_diff}/{sink_diff}/{ring_diff}, rel err {err:.2e} "
          f"(before the write: {err_stale:.2e})")
    assert err_stale > 0.1, "the new token should dominate: this test could not see a stale read"
    assert pool_diff == 0 and sink_diff == 0 and ring_diff == 0
    assert err <= (6e-3 if act == "bf16" else REL_TOL)


# ---------------------------------------------------------------------------------------------
# context (chunked prefill) attention: writes the new K/V, then causal attention over all of it
# ---------------------------------------------------------------------------------------------

CONTEXT_CASES = [
    # d, H, g, bits, T, sinks, prefix lens, new-token counts
    (128, 2, 4, (3, 3), 32, 0, [0, 37, 300], [25, 1, 70]),
    (64, 3, 3, (3, 3), 64, 4, [0, 100], [130, 9]),
    (128, 1, 8, (4, 2), 128, 2, [5, 0], [3, 40]),
    (64, 2, 1, (2, 8), 32, 0, [513, 0], [17, 200]),
    (128, 2, 16, (3, 4), 128, 16, [0, 3], [33, 64]),
    (64, 4, 2, (8, 4), 32, 0, [31, 1, 64, 0], [33, 31, 1, 95]),
    (128, 3, 5, (2, 3), 64, 3, [7, 0, 95], [1, 97, 40]),
    (128, 1, 12, (4, 8), 32, 1, [40, 0], [50, 129]),
    (64, 2, 4, (8, 2), 128, 0, [1000, 250], [300, 7]),
]


@pytest.mark.parametrize("d,h,g,bits,t,ns,prefix,new", CONTEXT_CASES)
def test_context_chunked_prefill_matches_reference(d, h, g, bits, t, ns, prefix, new):
    _check_context(d, h, g, bits, t, ns, prefix, new, 0)


CONTEXT_WINDOW_CASES = [
    # d, H, g, bits, T, sinks, window, prefix lens, new-token counts
    (128, 2, 4, (3, 3), 32, 0, 16, [0, 37, 300], [25, 1, 70]),
    (64, 3, 3, (3, 3), 64, 4, 8, [0, 100], [130, 9]),
    (128, 1, 8, (4, 2), 128, 2, 64, [5, 0, 70], [3, 40, 100]),
    (64, 2, 1, (2, 8), 32, 0, 1, [513, 0], [17, 200]),
    (128, 2, 16, (3, 4), 128, 16, 32, [0, 3, 20], [33, 64, 5]),
    (64, 4, 2, (8, 4), 32, 0, 64, [1000, 250], [300, 7]),
]


@pytest.mark.parametrize("d,h,g,bits,t,ns,w,prefix,new", CONTEXT_WINDOW_CASES)
def test_context_recent_window_matches_reference(d, h, g, bits, t, ns, w, prefix, new):
    """Each query at position p reads keys p - w < j <= p in fp16 (the chunk's own tokens and the
    ring's earlier ones); afterwards the ring holds each sequence's last w positions."""
    _check_context(d, h, g, bits, t, ns, prefix, new, w)


def _check_context(d, h, g, bits, t, ns, prefix, new, w):
    rng = _rng()
    fmt = _exps(LayerFormat(d, (bits[0],) * h, (bits[1],) * h, sink_tokens=ns, recent_tokens=w), rng)
    tables = _tables(h, d, rng)
    lens = [p + n for p, n in zip(prefix, new)]
    bt, num_blocks = _block_tables(lens, t, rng)
    quant = LayerQuantizer(fmt, tables)
    ref = _reused_pool(quant, num_blocks, t, len(lens), rng)
    slots = np.arange(len(lens), dtype=np.int32)
    layer = K.KernelLayer.allocate(fmt, num_blocks, t, len(lens), tables)
    news_k, news_v, exact = [], [], []
    pre = PagedPool(quant, num_blocks, t, num_slots=len(lens))  # the ring as the prefix left it
    for b, (p, n) in enumerate(zip(prefix, new)):
        k = _kv(p + n, h, d, rng)
        v = _kv(p + n, h, d, rng)
        ref.write(k.astype(np.float32), v.astype(np.float32), np.arange(p + n), bt,
                  np.full(p + n, b), slots)
        if w and p:
            pre.write(k[:p].astype(np.float32), v[:p].astype(np.float32), np.arange(p), bt,
                      np.full(p, b), slots)
        exact.append(tuple(quant.transform(x.astype(np.float32), kind).astype(np.float16).astype(np.float32)
                           for x, kind in ((k, "k"), (v, "v"))))
        news_k.append(k[p:])
        news_v.append(v[p:])
    # the GPU pool starts as the reference's bytes with the new tokens' slots scrubbed (random
    # codes in their tile bits, 0x5A scales; NaN in the sink pool), so the kernel must write them
    scrub = PagedPool(quant, num_blocks, t, num_slots=len(lens))
    scrub.pool = ref.pool.copy()
    lay = fmt.block_layout(t)
    for b, (p, n) in enumerate(zip(prefix, new)):
        for pos in range(p, p + n):
            blk, r = bt[b, pos // t], pos % t
            for hh in range(h):
                for which, nb in (("k", fmt.k_bits[hh]), ("v", fmt.v_bits[hh])):
                    write_tile_slot(scrub.tile(blk, which, hh, r // TILE_TOKENS), r % TILE_TOKENS,
                                    rng.integers(0, 1 << nb, d).astype(np.uint8), nb, which)
                for off in (lay.k_meta[hh], lay.v_meta[hh]):
                    mb = fmt.meta_bytes
                    scrub.pool[blk, off + mb * r: off + mb * (r + 1)] = 0x5A
    pool_np = scrub.pool
    layer.pool.copy_(_to_gpu(pool_np))
    sinks_np = ref.sinks.copy()
    for b, (p, n) in enumerate(zip(prefix, new)):
        for pos in range(p, min(p + n, ns)):
            sinks_np[b, :, :, pos] = np.nan
    layer.sink_pool.copy_(_to_gpu(sinks_np))
    layer.recent_pool.copy_(_to_gpu(pre.recent))

    q_new = [rng.normal(0, 1, (n, h * g, d)).astype(np.float16) for n in new]
    q = _to_gpu(np.concatenate(q_new))
    k_new = _to_gpu(np.concatenate(news_k))
    v_new = _to_gpu(np.concatenate(news_v))
    out = torch.full_like(q, float("nan"))
    K.context_attention(layer, q, k_new, v_new, bt, new, lens, max(new), max(lens), out=out)
    torch.cuda.synchronize()
    # the kernel's writes equal the reference bytes
    assert int((layer.pool.cpu().numpy() != ref.pool).sum()) == 0
    if w:
        ring = layer.recent_pool.cpu().numpy().view(np.uint16)
        held = ref.recent_positions >= 0
        for b in range(len(lens)):
            assert np.array_equal(ring[b][:, :, held[b]], ref.recent.view(np.uint16)[b][:, :, held[b]]), \
                f"ring of sequence {b} differs"
        # per query position its own window (reference_attention), over the codes and the sinks
        codes_view = copy.copy(ref)
        codes_view.q = LayerQuantizer(dataclasses.replace(fmt, recent_tokens=0), tables)
        want = np.concatenate([
            reference_attention(quant, q_new[b].astype(np.float32), *codes_view.read(bt[b], p + n, slots[b]),
                                q_positions=np.arange(p, p + n), k_exact=exact[b][0], v_exact=exact[b][1])
            for b, (p, n) in enumerate(zip(prefix, new))])
    else:
        want = np.concatenate([
            reference_attention(quant, q_new[b].astype(np.float32), *ref.read(bt[b], p + n, slots[b]),
                                q_positions=np.arange(p, p + n))
            for b, (p, n) in enumerate(zip(prefix, new))])
    err = _rel(out, want)
    print(f"context d={d} H={h} g={g} bits={bits} T={t} ns={ns} w={w} prefix={prefix} new={new}: "
          f"rel err {err:.2e}")
    assert err <= REL_TOL


@pytest.mark.parametrize("d,kb,vb,t,ns,w,lens", [
    (128, (3, 4), (2, 8), 32, 3, 0, [5, 77, 300]),
    (64, (8, 2, 3), (4, 3, 2), 64, 0, 0, [1, 64, 65, 191]),
    (128, (2,), (4,), 128, 16, 0, [16, 17, 129, 400]),
    (128, (3, 3), (3, 3), 64, 2, 16, [1, 16, 17, 300]),
])
def test_dequantize_matches_reference_read(d, kb, vb, t, ns, w, lens):
    rng = _rng()
    fmt = _exps(LayerFormat(d, kb, vb, sink_tokens=ns, recent_tokens=w), rng)
    quant, ref, layer, bt, slots, _ = _setup(fmt, _tables(len(kb), d, rng), t, lens, rng)
    ko, vo = K.dequantize_kv(layer, bt, lens, max(lens))
    torch.cuda.synchronize()
    for b, n in enumerate(lens):
        kr, vr = ref.read(bt[b], n, slots[b])
        kg = ko[b, :, :n].transpose(0, 1).float().cpu().numpy()
        vg = vo[b, :, :n].transpose(0, 1).float().cpu().numpy()
        np.testing.assert_array_equal(kg, kr.astype(np.float16).astype(np.float32))
        np.testing.assert_array_equal(vg, vr.astype(np.float16).astype(np.float32))


def test_bad_arguments_raise_clear_errors():
    fmt = LayerFormat(128, (3,), (3,))
    layer = K.KernelLayer.allocate(fmt, 4, 32, 1)
    with pytest.raises(K.KernelError, match="query heads"):
        K.decode_attention(layer, torch.zeros((1, 17, 128), dtype=torch.float16, device="cuda"),
                           np.zeros((1, 2), np.int32), [1], 1)
    # the format stores codes in tiles of 32 slots: other block sizes are refused
    layer.tokens_per_block = 16
    k = torch.zeros((1, 1, 128), dtype=torch.float16, device="cuda")
    with pytest.raises(K.KernelError, match="tokens_per_block"):
        K.quantize_kv(layer, k, k, np.zeros((1, 2), np.int32), [1])
    layer.tokens_per_block = 32
    # finish counters and the words the write zeroes: int32 on the device, enough of them
    q17 = torch.zeros((1, 1, 128), dtype=torch.float16, device="cuda")
    with pytest.raises(K.KernelError, match="finish_counters"):
        K.decode_attention(layer, q17, np.zeros((1, 2), np.int32), [1], 1,
                           finish_counters=torch.zeros(0, dtype=torch.int32, device="cuda"))
    with pytest.raises(K.KernelError, match="finish"):
        K.decode_attention(layer, q17, np.zeros((1, 2), np.int32), [1], 1, finish="reduce")
    with pytest.raises(K.KernelError, match="zero_words"):
        K.quantize_kv(layer, k, k, np.zeros((1, 2), np.int32), [1],
                      zero_words=torch.zeros(4, dtype=torch.int64, device="cuda"))
    with pytest.raises(K.KernelError, match="zero_words"):  # the C API: decode writes only
        K.quantize_kv(layer, k, k, np.zeros((1, 2), np.int32), [1], cu_q_lens=[0, 1], max_q_len=1,
                      zero_words=torch.zeros(4, dtype=torch.int32, device="cuda"))
    # with a recent-token window context attention must write the new tokens itself: refused
    # without write_kv, in Python and in C
    win = K.KernelLayer.allocate(LayerFormat(128, (3,), (3,), recent_tokens=8), 4, 32, 1)
    q = torch.zeros((2, 1, 128), dtype=torch.float16, device="cuda")
    with pytest.raises(K.KernelError, match="write_kv"):
        K.context_attention(win, q, q, q, np.zeros((1, 2), np.int32), [2], [2], 2, 2, write_kv=False)
    s = win.c_struct(K._i32(np.zeros((1, 2), np.int32), "cuda"), K._i32([0], "cuda"))
    rc = K.library().tq_context_attention(ctypes.byref(s), q.data_ptr(), 128, q.data_ptr(), 128,
                                          q.data_ptr(), 128, q.data_ptr(), 128, 0, 0, 1, 1, 2, 2, 2,
                                          0.0, 0, 0, 0, 0, 0)
    assert rc != 0 and b"write_kv" in K.library().tq_last_error()
    # the attention kernels read sink and ring rows as 16-byte vectors: a ring 2 bytes off is refused
    win.recent_pool = torch.full((win.recent_pool.numel() + 8,), float("nan"), dtype=torch.float16,
                                 device="cuda")[1:1 + win.recent_pool.numel()].view(win.recent_pool.shape)
    with pytest.raises(K.KernelError, match="16-byte aligned"):
        K.decode_attention(win, q[:1], np.zeros((1, 2), np.int32), [2], 2)
