"""The one-byte log scale of kind 'turbo' (docs/format.md §3.1, format versions 3 and 4): enc/dec
against an independent float64 referee, the edge cases, and its use by the quantizers (reference,
torch), with 8-bit codes taken again against the stored scale (version 4)."""

import math

import numpy as np
import pytest
import torch

from turboquant_trt.format import FormatError, LayerFormat
from turboquant_trt.reference import (
    DEFAULT_SCALE_EXP,
    SCALE8_STEPS,
    SCALE_EXP_MAX,
    SCALE_EXP_MIN,
    LayerQuantizer,
    codebook,
    dequantize_turbo,
    quantize_turbo,
    rotate,
    rotation_signs,
    scale8_decode,
    scale8_encode,
    scale8_encode_up,
    scale8_tables,
    scale_exp_for_max,
    turbo_scale,
)

EXPS = [-64, -37, -10, 0, 23, 48]
CODES = np.arange(256)


def _grid(exp: int) -> np.ndarray:
    """The 255 grid values 2^(E + (k-1)/16), k = 1..255, as float64 powers rounded to fp32
    (written out independently of scale8_decode)."""
    k = np.arange(1, 256)
    return np.array([np.float32(2.0 ** (exp + (j - 1) // 16) * np.float32(2.0 ** (((j - 1) % 16) / 16)))
                     for j in k], dtype=np.float64)


def _referee(s: np.ndarray, exp: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute force: the code (1..255) of the grid value nearest to s in the log domain (float64),
    and whether s is within fp32 rounding of the midpoint of two grid values (then the spec's
    fp32 midpoint comparison may pick either neighbour)."""
    lg = np.log2(_grid(exp))
    ls = np.log2(s.astype(np.float64))[:, None]
    dist = np.abs(ls - lg[None, :])
    order = np.argsort(dist, axis=1, kind="stable")
    near = order[:, 0]
    gap = dist[np.arange(len(s)), order[:, 1]] - dist[np.arange(len(s)), near]
    ambiguous = gap < 4e-7  # a few fp32 ulps in log2 (the grid values and midpoints are fp32)
    return near + 1, ambiguous


@pytest.mark.parametrize("exp", EXPS)
def test_encode_is_the_nearest_grid_value_in_the_log_domain(exp):
    rng = np.random.default_rng(1000 + exp)
    # inside the range, around it (both clamps) and a band hugging every midpoint
    inside = np.exp2(rng.uniform(exp, exp + 15.875, 20000))
    around = np.exp2(rng.uniform(exp - 6, exp + 22, 5000))
    mids = np.exp2(exp + (2 * rng.integers(0, 254, 5000) + 1) / 32) * (1 + rng.uniform(-3e-7, 3e-7, 5000))
    s = np.concatenate([inside, around, mids]).astype(np.float32)
    s = s[(s > 0) & np.isfinite(s)]
    got = scale8_encode(s, exp)
    want, amb = _referee(s, exp)
    assert got.dtype == np.uint8 and got.shape == s.shape
    clear = ~amb
    assert clear.mean() > 0.8
    np.testing.assert_array_equal(got[clear].astype(np.int64), want[clear])
    # near a midpoint the spec compares with the fp32 midpoint: one of the two neighbours
    assert np.all(np.abs(got[amb].astype(np.int64) - want[amb]) <= 1)
    # and the rule is exactly "m >= M[i]", ties going up: check the ambiguous ones by the rule
    _, mid = scale8_tables()
    for x, k in zip(s[amb][:200], got[amb][:200]):
        m, e = math.frexp(float(x))
        m, e = np.float32(2 * m), e - 1
        q = 16 * (e - exp) + int(np.sum(m >= mid))
        assert k == 1 + min(max(q, 0), 254)


@pytest.mark.parametrize("exp", EXPS)
def test_decode_values_are_the_grid(exp):
    dec = scale8_decode(CODES, exp)
    assert dec.dtype == np.float32 and dec[0] == 0
    np.testing.assert_array_equal(dec[1:].astype(np.float64), _grid(exp))
    assert np.all(np.diff(dec[1:]) > 0)
    assert dec[1] == 2.0 ** exp and dec[255] == np.float32(2.0 ** (exp + 15)) * np.float32(2 ** (14 / 16))
    # every grid value encodes to itself
    np.testing.assert_array_equal(scale8_encode(dec[1:], exp), CODES[1:])
    # a shift of E is an exact power of two
    if exp + 5 <= SCALE_EXP_MAX:
        np.testing.assert_array_equal(scale8_decode(CODES, exp + 5)[1:], dec[1:] * np.float32(32))


def test_tables_are_the_documented_powers():
    f, m = scale8_tables()
    assert f.dtype == np.float32 and m.dtype == np.float32 and len(f) == len(m) == SCALE8_STEPS == 16
    for i in range(16):
        assert f[i] == np.float32(2.0 ** (i / 16)) and m[i] == np.float32(2.0 ** ((2 * i + 1) / 32))
        assert f[i] < m[i] and (i == 15 or m[i] < f[i + 1])


@pytest.mark.parametrize("exp", [-64, -10, 0, 48])
def test_step_boundaries_ties_go_up(exp):
    _, mid = scale8_tables()
    for j in (0, 3, 15):
        for i in range(16):
            s = np.float32(np.ldexp(mid[i], exp + j))
            below = np.nextafter(s, np.float32(0))
            up = 1 + min(16 * j + i + 1, 254)
            assert scale8_encode(s, exp) == up, (j, i)
            assert scale8_encode(below, exp) == 1 + min(16 * j + i, 254), (j, i)


@pytest.mark.parametrize("exp", EXPS)
def test_edge_cases(exp):
    f32 = np.float32
    tiny = np.finfo(np.float32).smallest_subnormal
    cases = {
        0.0: 0, -0.0: 0, float("nan"): 0, -1.0: 0, float("-inf"): 0, float("inf"): 255,
        float(tiny): 1, float(np.finfo(np.float32).tiny) / 4: 1,           # subnormals
        2.0 ** (exp - 1): 1, 2.0 ** (exp - 30): 1,                         # below 2^E
        float(np.nextafter(f32(2.0 ** exp), f32(0))): 1, 2.0 ** exp: 1,
        2.0 ** exp * 2 ** (1 / 32) * 1.001: 2,                             # the second step
        float(np.finfo(np.float32).max): 255,                              # above the top
        2.0 ** (exp + 16): 255, 2.0 ** (exp + 15.875): 255, 2.0 ** (exp + 15.875) * 1.01: 255,
        2.0 ** (exp + 15.8125) * 1.001: 254,                               # the step below the top
    }
    s = np.array(list(cases), dtype=np.float32)
    got = scale8_encode(s, exp)
    np.testing.assert_array_equal(got, np.array(list(cases.values()), np.uint8), err_msg=str(s))
    assert scale8_decode(np.uint8(0), exp) == 0
    # shapes are kept, also for 0-d input
    assert scale8_encode(np.float32(1.0), exp).shape == ()
    assert scale8_encode(np.ones((2, 3), np.float32), exp).shape == (2, 3)


@pytest.mark.parametrize("exp", EXPS)
def test_round_trip_within_half_a_step(exp):
    rng = np.random.default_rng(77 + exp)
    s = np.exp2(rng.uniform(exp, exp + 15.875, 20000)).astype(np.float32)
    r = scale8_decode(scale8_encode(s, exp), exp).astype(np.float64) / s
    assert np.all(np.abs(np.log2(r)) <= 1 / 32 + 1e-6)
    # the errors are spread over the whole half step (not a coarser grid)
    assert np.abs(np.log2(r)).max() > 0.9 / 32


def test_bad_exponents_refused():
    for e in (SCALE_EXP_MIN - 1, SCALE_EXP_MAX + 1, 1000):
        with pytest.raises(FormatError, match="between -64 and 48"):
            scale8_encode(np.ones(3, np.float32), e)
        with pytest.raises(FormatError, match="between -64 and 48"):
            scale8_decode(np.ones(3, np.uint8), e)
        with pytest.raises(FormatError, match="between -64 and 48"):
            quantize_turbo(np.ones((1, 64), np.float32), 3, scale_exp=e)
    with pytest.raises(FormatError, match="one-byte codes"):
        dequantize_turbo(np.zeros((1, 64), np.uint8), np.ones(1, np.float16), 3)
    with pytest.raises(FormatError, match="one-byte codes"):
        dequantize_turbo(np.zeros((1, 64), np.uint8), np.array([256]), 3)
    # any integer type holding codes 0..255 is read as the same bytes
    codes = np.zeros((2, 64), np.uint8)
    np.testing.assert_array_equal(dequantize_turbo(codes, np.array([7, 200], np.int64), 3, -5),
                                  dequantize_turbo(codes, np.array([7, 200], np.uint8), 3, -5))


def test_calibration_rule_for_e():
    # E = floor(log2 max) - 11, exact at powers of two, clamped, default without data
    assert scale_exp_for_max(1.0) == -11 and scale_exp_for_max(np.nextafter(1.0, 0)) == -12
    assert scale_exp_for_max(2.0 ** 5.5) == 5 - 11 and scale_exp_for_max(3.0) == 1 - 11
    assert scale_exp_for_max(2.0 ** -100) == SCALE_EXP_MIN
    assert scale_exp_for_max(2.0 ** 100) == SCALE_EXP_MAX
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        assert scale_exp_for_max(bad) == DEFAULT_SCALE_EXP
    # the largest scale then sits 11-12 octaves above 2^E: 14.7-29.3x below the top of the grid
    rng = np.random.default_rng(5)
    for m in np.exp2(rng.uniform(-40, 40, 200)):
        e = scale_exp_for_max(m)
        assert 2.0 ** (e + 11) <= m < 2.0 ** (e + 12)
        assert 2 ** 3.875 < 2.0 ** (e + 15.875) / m <= 2 ** 4.875  # 14.7x to 29.3x


def _nearest_level_codes(y: np.ndarray, s: np.ndarray) -> np.ndarray:
    """8-bit codes against the stored scale s, written out independently: u = y / s in fp32 (IEEE
    division), then the level (m - 128) / 32 nearest to u in float64 (lower on a tie), clamped to
    0..255 (docs/format.md §3.1)."""
    u = (y.astype(np.float32) / s.astype(np.float32)[:, None]).astype(np.float64)
    m = np.clip(np.ceil(u * 32 + 128 - 0.5), 0, 255)
    return m.astype(np.uint8)


def test_8bit_scale_is_the_absmax_rounded_up_and_codes_follow_it():
    """Version 4: at 8 bits the scale is max|x_i| / 3.96875 rounded up on the one-byte grid, and
    the codes are taken against the stored scale: no coordinate clips, each is within half a level
    (s/64), and the scale's rounding does not multiply the whole vector. Clip and norm correction
    do not apply."""
    rng = np.random.default_rng(77)
    d = 128
    y = rotate(rng.standard_normal((2000, d)).astype(np.float32), rotation_signs(d, 2))
    y *= np.exp2(rng.uniform(-3, 3, (2000, 1))).astype(np.float32)
    codes, s8 = quantize_turbo(y, 8, True, 1.0, -12)
    s = scale8_decode(s8, -12)
    want = np.abs(y).max(axis=-1).astype(np.float32) / np.float32(3.96875)
    grid = _grid(-12)
    # the smallest grid value >= max|y| / 3.96875, found by search in the float64 grid
    np.testing.assert_array_equal(s, grid[np.searchsorted(grid, want.astype(np.float64), side="left")])
    np.testing.assert_array_equal(codes, _nearest_level_codes(y, s))
    yh = dequantize_turbo(codes, s8, 8, -12)
    assert np.all(np.abs(y) <= np.float32(3.96875) * s[:, None])
    assert np.all(np.abs(yh - y) <= s[:, None] / 64 * (1 + 1e-6))
    for nc, clip in ((False, 1.0), (True, 0.7), (False, 1.3)):
        c2, k2 = quantize_turbo(y, 8, nc, clip, -12)
        np.testing.assert_array_equal(c2, codes)
        np.testing.assert_array_equal(k2, s8)
    # lower bits keep the norm-based codes and scale (norm correction)
    for bits in (2, 3, 4):
        c, k = quantize_turbo(y, bits, True, 1.0, -12)
        c1, scale = turbo_scale(y, bits, True, 1.0)
        np.testing.assert_array_equal(c, c1)
        np.testing.assert_array_equal(k, scale8_encode(scale, -12))


def test_8bit_scale_clamped_from_below_keeps_the_magnitude():
    """A vector whose scale lies below 2^E gets the scale 2^E; its 8-bit codes then shrink with it
    instead of keeping full-range codes (version 3 raised such a vector's magnitude to 2^E * c)."""
    rng = np.random.default_rng(5)
    y = (rng.standard_normal((50, 64)) * 1e-5).astype(np.float32)
    codes, s8 = quantize_turbo(y, 8, True, 1.0, -10)
    assert np.all(s8 == 1)
    yh = dequantize_turbo(codes, s8, 8, -10)
    assert np.all(np.abs(yh - y) <= 2.0 ** -10 / 64 + 1e-9)


def test_8bit_zero_and_huge_vectors():
    y = np.zeros((2, 64), np.float32)
    y[1, 3] = 3e38  # the scale clips at the top of the grid: codes saturate
    codes, s8 = quantize_turbo(y, 8, True, 1.0, 0)
    assert s8[0] == 0 and np.all(codes[0] == 128)
    assert s8[1] == 255 and codes[1, 3] == 255 and np.all(np.delete(codes[1], 3) == 128)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_quantize_turbo_stores_the_encoded_scale(bits):
    rng = np.random.default_rng(bits + 40)
    d = 64
    y = rotate(rng.standard_normal((300, d)).astype(np.float32), rotation_signs(d, 1))
    for nc in (True, False):
        for exp in (-20, -10, -3):
            codes, s8 = quantize_turbo(y, bits, nc, 1.1, exp)
            c2, scale = turbo_scale(y, bits, nc, 1.1)
            assert s8.dtype == np.uint8 and s8.shape == (300,)
            if bits == 8:
                np.testing.assert_array_equal(codes, _nearest_level_codes(y, scale8_decode(s8, exp)))
                np.testing.assert_array_equal(s8, scale8_encode_up(scale, exp))
            else:
                np.testing.assert_array_equal(codes, c2)
                np.testing.assert_array_equal(s8, scale8_encode(scale, exp))
            want = scale8_decode(s8, exp)[:, None] * codebook(bits)[codes]
            np.testing.assert_array_equal(dequantize_turbo(codes, s8, bits, exp), want)
    # data scaled by 2^t with E + t: the same bytes (the grid is relative to 2^E)
    for t in (-9, 13):
        y2 = y * np.float32(2.0 ** t)
        for exp in (-20, -10):
            a = quantize_turbo(y, bits, True, 1.0, exp)
            b = quantize_turbo(y2, bits, True, 1.0, exp + t)
            np.testing.assert_array_equal(a[0], b[0])
            np.testing.assert_array_equal(a[1], b[1])


def test_layer_quantizer_uses_each_heads_exponent():
    rng = np.random.default_rng(9)
    d, H = 64, 3
    # head h's vectors are 2^(6h) times larger; each head's E follows, K and V differ
    kexp, vexp = (-12, -6, 0), (-13, -7, -2)
    lf = LayerFormat(d, (3, 4, 2), (2, 8, 3), k_scale_exp=kexp, v_scale_exp=vexp)
    q = LayerQuantizer(lf, layer=4)
    x = (rng.standard_normal((40, H, d)) * np.exp2(6 * np.arange(H))[None, :, None]).astype(np.float32)
    for which, bits, exps, clip in (("k", lf.k_bits, kexp, q.tables.k_clip),
                                    ("v", lf.v_bits, vexp, q.tables.v_clip)):
        y = q.transform(x, which)
        enc = q.encode_transformed(y, which)
        dec = q.decode_transformed(enc, which)
        for h in range(H):
            codes, s8 = quantize_turbo(y[:, h], bits[h], True, clip[h], exps[h])
            assert enc.meta[h].shape == (40, 1) and enc.meta[h].dtype == np.uint8
            np.testing.assert_array_equal(enc.meta[h][:, 0], s8)
            np.testing.assert_array_equal(dec[:, h], dequantize_turbo(codes, s8, bits[h], exps[h]))
            # the scales sit inside the grid (no clamp), so the norm is kept within half a step
            assert np.all((s8 > 1) & (s8 < 255))
            ratio = np.linalg.norm(dec[:, h], axis=-1) / np.linalg.norm(y[:, h], axis=-1)
            assert np.all(np.abs(np.log2(ratio)) <= 1 / 32 + 1e-5)
    # the default exponent would clamp head 2's scales (2^12 times the data of head 0)
    big = LayerQuantizer(LayerFormat(d, (3, 4, 2), (2, 8, 3)), layer=4).encode(x, "k")
    assert np.all(big.meta[2] == 255)


def test_torch_encoder_equals_reference():
    from turboquant_trt.calibration.torch_quant import scale8_encode_torch, scale8_round

    rng = np.random.default_rng(3)
    for exp in EXPS:
        s = np.exp2(rng.uniform(exp - 8, exp + 24, 30000)).astype(np.float32)
        _, mid = scale8_tables()
        edges = [np.float32(np.ldexp(mid[i], exp + j)) for i in range(16) for j in (0, 7)]
        edges += [np.nextafter(e, np.float32(0)) for e in edges]
        extra = np.array([0, -0.0, np.nan, np.inf, -np.inf, -3, np.finfo(np.float32).smallest_subnormal,
                          np.finfo(np.float32).max] + edges, np.float32)
        s = np.concatenate([s, extra])
        want = scale8_encode(s, exp)
        got = scale8_encode_torch(torch.from_numpy(s), exp).numpy()
        np.testing.assert_array_equal(got, want.astype(np.int64))
        np.testing.assert_array_equal(scale8_round(torch.from_numpy(s), exp).numpy(),
                                      scale8_decode(want, exp))
