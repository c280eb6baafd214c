"""The reference quantizer: packing, rotation, codebooks, error bounds, the attention identities."""

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from turboquant_trt.cli import cli
from turboquant_trt.format import FormatError, LayerFormat
from turboquant_trt.reference import (
    DEFAULT_SCALE_EXP,
    LayerQuantizer,
    _lloyd_max_f64,
    LayerTables,
    codebook,
    codebook_boundaries,
    codebook_int8,
    codebook_mse,
    gaussian_mse,
    hadamard,
    lloyd_max_codebook,
    ordered_sum,
    pack_codes,
    pack_tile,
    dequantize_turbo,
    quantize_turbo,
    quantize_uniform,
    dequantize_uniform,
    read_tile_slot,
    reference_attention,
    rotate,
    rotation_signs,
    scale8_decode,
    tile_bytes,
    tile_position,
    unpack_codes,
    unpack_tile,
    unrotate,
    write_tile_slot,
)

BITS = st.sampled_from([2, 3, 4, 8])
DIMS = st.sampled_from([64, 128, 256])


@settings(max_examples=80, deadline=None)
@given(bits=BITS, d=DIMS, n=st.integers(1, 9), seed=st.integers(0, 2**31))
def test_pack_unpack_exact_inverse(bits, d, n, seed):
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 1 << bits, size=(n, d), dtype=np.uint8)
    packed = pack_codes(codes, bits)
    assert packed.shape == (n, d * bits // 8) and packed.dtype == np.uint8
    np.testing.assert_array_equal(unpack_codes(packed, bits, d), codes)
    # and the other way round: every byte string is a valid packing
    raw = rng.integers(0, 256, size=packed.shape, dtype=np.uint8)
    np.testing.assert_array_equal(pack_codes(unpack_codes(raw, bits, d), bits), raw)


def test_packing_bit_order_matches_the_document():
    d = 64
    codes = np.zeros(d, np.uint8)
    codes[0], codes[1], codes[5], codes[9] = 5, 3, 6, 7  # 3-bit codes
    p = pack_codes(codes, 3)
    # low plane: code & 3 at byte i/4, bits 2*(i%4); high plane: code >> 2 at byte d/4 + i/8, bit i%8
    assert p[0] == (1 | 3 << 2)  # codes 0 (low 01) and 1 (low 11)
    assert p[1] == (2 << 2)      # code 5 -> low 10 at i%4 = 1
    assert p[2] == (3 << 2)      # code 9 -> low 11
    assert p[16] == (1 << 0) | (1 << 5)  # high bits of codes 0 and 5
    assert p[17] == (1 << 1)             # high bit of code 9
    assert pack_codes(np.array([1, 15] * 32, np.uint8), 4)[0] == 0xF1
    with pytest.raises(FormatError, match="does not fit"):
        pack_codes(np.full(64, 4, np.uint8), 2)


@settings(max_examples=30, deadline=None)
@given(d=DIMS, seed=st.integers(0, 2**31), layer=st.integers(0, 100))
def test_rotation_orthogonal_and_inverse(d, seed, layer):
    rng = np.random.default_rng(seed)
    signs = rotation_signs(d, layer)
    x = rng.standard_normal((6, d)).astype(np.float32) * rng.uniform(0.01, 100)
    y = rotate(x, signs)
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), np.linalg.norm(x, axis=1), rtol=2e-6)
    np.testing.assert_allclose(y @ y.T, x @ x.T, rtol=1e-4, atol=1e-4 * float(np.max(np.abs(x @ x.T))))
    np.testing.assert_allclose(unrotate(y, signs), x, rtol=0, atol=2e-6 * float(np.max(np.abs(x))) * math.sqrt(d))
    # against the dense Sylvester matrix in float64
    i = np.arange(d)
    h = np.array([[(-1) ** bin(a & b).count("1") for b in i] for a in i], np.float64)
    np.testing.assert_allclose(hadamard(x), x.astype(np.float64) @ h.T / math.sqrt(d), rtol=1e-5, atol=1e-4)


def test_lloyd_max_matches_published_values():
    np.testing.assert_allclose(lloyd_max_codebook(2)[2:], [0.4528, 1.5104], atol=2e-4)
    np.testing.assert_allclose(lloyd_max_codebook(3)[4:], [0.2451, 0.7560, 1.3440, 2.1520], atol=2e-4)
    assert gaussian_mse(2) == pytest.approx(0.1175, abs=2e-4)
    assert gaussian_mse(3) == pytest.approx(0.03455, abs=1e-4)
    assert gaussian_mse(4) == pytest.approx(0.009497, abs=3e-5)
    for b in (2, 3, 4, 8):
        c = lloyd_max_codebook(b)
        assert c.dtype == np.float32 and len(c) == 1 << b and np.all(np.diff(c) > 0)
        np.testing.assert_array_equal(c, -c[::-1])


def test_v2_codebooks_are_int8_tables_over_lambda():
    e2, l2 = codebook_int8(2)
    e3, l3 = codebook_int8(3)
    e8, l8 = codebook_int8(8)
    assert e3.dtype == np.int8 and isinstance(l3, np.float32)
    assert e3.tolist() == [-127, -79, -45, -14, 14, 45, 79, 127]
    assert e2.tolist() == [-127, -38, 38, 127]
    assert e8.tolist() == [m - 128 for m in range(256)] and l8 == np.float32(32.0)
    for b in (2, 3, 4):
        lm = np.asarray(_lloyd_max_f64(b), np.float64)  # LM_b in float64
        e, lam = codebook_int8(b)
        lam64 = 127.0 / lm[-1]
        assert lam == np.float32(lam64)
        # e_b = round_half_even(LM_b * lambda_b) in float64 (no product is near a half here)
        assert np.array_equal(e, np.rint(lm * lam64)) and np.all(np.abs(lm * lam64 % 1 - 0.5) > 0.01)
        assert e[-1] == 127 and e[0] == -127 and np.array_equal(e, -e[::-1]) and np.all(np.diff(e) > 0)
        assert codebook_boundaries(b)[(1 << (b - 1)) - 1] == 0.0
        # rounding to the int8 grid costs almost nothing against Lloyd-Max
        assert gaussian_mse(b) < codebook_mse(b) < 1.003 * gaussian_mse(b)
    assert codebook_int8(4)[0].tolist() == [-127, -96, -75, -58, -44, -31, -18, -6,
                                            6, 18, 31, 44, 58, 75, 96, 127]
    for b in (2, 3, 4, 8):
        e, lam = codebook_int8(b)
        c = codebook(b)
        assert c.dtype == np.float32 and len(c) == 1 << b
        # fp32 division, element by element
        assert all(c[m] == np.float32(np.float32(int(e[m])) / lam) for m in range(len(c)))
        beta = codebook_boundaries(b)
        assert beta.dtype == np.float32
        assert all(beta[j] == np.float32((c[j] + c[j + 1]) / np.float32(2)) for j in range(len(beta)))
    c8 = codebook(8)
    assert c8[0] == -4.0 and c8[-1] == 3.96875 and np.all(np.diff(c8) == np.float32(1 / 32))
    with pytest.raises(FormatError, match="allowed"):
        codebook_int8(5)


def test_quantizer_uses_the_v2_codebook():
    rng = np.random.default_rng(2)
    y = rng.standard_normal((200, 64)).astype(np.float32)
    for b in (2, 3, 4, 8):
        codes, scale = quantize_turbo(y, b, norm_correction=False)
        n = np.sqrt(np.sum(y.astype(np.float64) ** 2, -1))
        # 8-bit codes are taken against the stored scale (format version 4)
        u = y / scale8_decode(scale, DEFAULT_SCALE_EXP)[:, None] if b == 8 else y / n[:, None] * 8.0
        # the nearest level of c_b (away from boundaries, where fp32 rounding could decide)
        c = codebook(b).astype(np.float64)
        near = np.argmin(np.abs(u[..., None] - c), axis=-1)
        dist = np.abs(u[..., None] - c)
        gap = np.sort(dist, -1)[..., 1] - np.sort(dist, -1)[..., 0]
        clear = gap > 1e-4
        assert clear.mean() > 0.9 and np.array_equal(codes[clear], near[clear])
    # a zero vector: scale 0 for every width (8 bits has a zero level, 0/0 must not happen)
    for b in (2, 3, 4, 8):
        codes, scale = quantize_turbo(np.zeros((1, 64), np.float32), b)
        assert scale.dtype == np.uint8 and scale[0] == 0
        assert np.all(dequantize_turbo(codes, scale, b) == 0)


# E[(2^u - 1)^2] for u uniform in [-1/32, 1/32]: the one-byte scale's mean squared relative error
SCALE8_REL_MSE = float(np.mean((np.exp2(np.linspace(-1 / 32, 1 / 32, 100001)) - 1) ** 2))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("d", [64, 128])
def test_turbo_mse_follows_gaussian_theory(bits, d):
    rng = np.random.default_rng(bits * 1000 + d)
    x = rng.standard_normal((4000, d)).astype(np.float32)
    y = rotate(x, rotation_signs(d, 0))  # still i.i.d. Gaussian
    for nc in (False, True):
        codes, scale = quantize_turbo(y, bits, norm_correction=nc)
        yq = dequantize_turbo(codes, scale, bits)
        rel = np.sum((yq - y) ** 2) / np.sum(y ** 2)
        # finite d and the per-vector norm move it a little; the one-byte scale adds the mean
        # squared relative error of a log grid of 16 steps per octave (u uniform in ±1/32). At 8
        # bits (format version 4) the codes are taken against the stored absmax scale s: uniform
        # rounding with step s/32, s^2/12288 per coordinate
        if bits == 8:
            s = scale8_decode(scale, DEFAULT_SCALE_EXP).astype(np.float64)
            theory = d * np.sum(s ** 2) / 12288 / np.sum(y.astype(np.float64) ** 2)
        else:
            theory = codebook_mse(bits) + SCALE8_REL_MSE
        assert 0.8 * theory < rel < 1.15 * theory + 2e-6, (nc, rel, theory)


def test_more_bits_less_error_and_inner_products():
    rng = np.random.default_rng(11)
    d = 128
    lf = {b: LayerQuantizer(LayerFormat(d, (b,), (b,))) for b in (2, 3, 4, 8)}
    k = rng.standard_normal((3000, 1, d)).astype(np.float32)
    q = rng.standard_normal((3000, d)).astype(np.float32)
    errs, ip_errs = [], []
    for b, lq in lf.items():
        kq = lq.fake_quant(k, "k")[:, 0]
        errs.append(np.mean((kq - k[:, 0]) ** 2))
        ip = np.sum(q * k[:, 0], -1)
        ipq = np.sum(q * kq, -1)
        ip_errs.append(np.mean((ipq - ip) ** 2))
        # q·k error variance ≈ |q|^2 |k|^2 D / d for rotated Gaussian data, D the relative error
        # per coordinate: D_b + the scale's rounding; at 8 bits (absmax scale, codes against the
        # stored scale) the measured coordinate error: the error does not add up along q
        rel = codebook_mse(b) + SCALE8_REL_MSE if b != 8 else errs[-1] / np.mean(k[:, 0] ** 2)
        expect = np.mean(np.sum(q * q, -1) * np.sum(k[:, 0] ** 2, -1)) * rel / d
        assert 0.6 * expect < ip_errs[-1] < 1.6 * expect, (b, ip_errs[-1], expect)
        assert abs(np.mean(ipq - ip)) < 4 * math.sqrt(ip_errs[-1] / len(ip))  # no bias
    assert errs == sorted(errs, reverse=True) and ip_errs == sorted(ip_errs, reverse=True)


@settings(max_examples=30, deadline=None)
@given(bits=BITS, g=st.sampled_from([8, 32, 64]), seed=st.integers(0, 2**31))
def test_uniform_error_bounded_by_half_step(bits, g, seed):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((20, 64)) * rng.uniform(0.1, 10)).astype(np.float32)
    codes, meta = quantize_uniform(x, bits, g)
    xq = dequantize_uniform(codes, meta, g)
    step = np.repeat(meta[..., 0].astype(np.float32), g, axis=-1)
    zero = np.repeat(meta[..., 1].astype(np.float32), g, axis=-1)
    # fp16 rounding of zero and scale moves the grid by at most a few fp16 ulps of the range
    slack = 2e-3 * (np.abs(zero) + step * (1 << bits))
    assert np.all(np.abs(xq - x) <= step / 2 + slack)


def test_transform_identities_with_random_tables():
    """q_t·k_t = q·k − q·μk, attention over unquantized transformed K/V = plain attention."""
    rng = np.random.default_rng(3)
    hkv, g, d, n = 2, 3, 64, 37
    tables = LayerTables(
        k_mean=rng.standard_normal((hkv, d)), k_smooth=rng.uniform(0.3, 3, (hkv, d)),
        v_mean=rng.standard_normal((hkv, d)), v_smooth=rng.uniform(0.3, 3, (hkv, d)),
        k_clip=np.ones(hkv), v_clip=np.ones(hkv), signs=rotation_signs(d, 9))
    lq = LayerQuantizer(LayerFormat(d, (8,) * hkv, (8,) * hkv), tables)
    k = rng.standard_normal((n, hkv, d)).astype(np.float32)
    v = rng.standard_normal((n, hkv, d)).astype(np.float32)
    q = rng.standard_normal((4, hkv * g, d)).astype(np.float32)
    kt, vt, qt = lq.transform(k, "k"), lq.transform(v, "v"), lq.transform_q(q)
    np.testing.assert_allclose(lq.untransform(kt, "k"), k, atol=2e-5)
    lhs = np.einsum("nhd,lhd->nhl", qt, np.repeat(kt, g, 1))
    kk = np.repeat(k, g, 1)
    rhs = np.einsum("nhd,lhd->nhl", q, kk) - np.einsum("nhd,hd->nh", q, np.repeat(tables.k_mean, g, 0))[..., None]
    np.testing.assert_allclose(lhs, rhs, rtol=1e-4, atol=1e-3)
    out = reference_attention(lq, q, kt, vt)
    logits = np.einsum("nhd,lhd->hnl", q.astype(np.float64), kk) / 8
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    plain = np.einsum("hnl,lhd->nhd", w, np.repeat(v, g, 1))
    np.testing.assert_allclose(out, plain, rtol=1e-4, atol=1e-4)


def test_fake_quant_keeps_sink_tokens_near_exact():
    rng = np.random.default_rng(5)
    lq = LayerQuantizer(LayerFormat(64, (2,), (2,), sink_tokens=3))
    x = rng.standard_normal((10, 1, 64)).astype(np.float32)
    fq = lq.fake_quant(x, "k", positions=np.arange(10))
    err = np.abs(fq - x).max(axis=(1, 2))
    assert np.all(err[:3] < 3e-3) and np.all(err[3:] > 0.05)


def test_quantize_cli_random_and_files(tmp_path):
    r = CliRunner().invoke(cli, ["quantize", "--bits", "3", "--bits", "4", "--vectors", "500", "--json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.output)["rows"]
    assert [x["bits"] for x in rows] == [3, 4] and rows[0]["rel_mse"] > rows[1]["rel_mse"]
    x = np.random.default_rng(0).standard_normal((50, 2, 64)).astype(np.float32)
    np.save(tmp_path / "k.npy", x)
    r = CliRunner().invoke(cli, ["quantize", "--input", str(tmp_path / "k.npy"), "--kind", "uniform",
                                 "--group-size", "32", "--bits", "4"])
    assert r.exit_code == 0 and "uniform" in r.output, r.output
    from safetensors.numpy import save_file
    save_file({"a": x, "b": x[:, 0]}, str(tmp_path / "kv.safetensors"))
    r = CliRunner().invoke(cli, ["quantize", "--input", str(tmp_path / "kv.safetensors")])
    assert r.exit_code == 2 and "choose one with --tensor" in r.output
    r = CliRunner().invoke(cli, ["quantize", "--input", str(tmp_path / "kv.safetensors"), "--tensor", "b"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, ["quantize", "--input", str(tmp_path / "missing.npy")])
    assert r.exit_code == 2 and "does not exist" in r.output
    np.save(tmp_path / "bad.npy", np.zeros((4, 96), np.float32))
    r = CliRunner().invoke(cli, ["quantize", "--input", str(tmp_path / "bad.npy")])
    assert r.exit_code == 2 and "head_dim" in r.output
    r = CliRunner().invoke(cli, ["quantize", "--kind", "uniform", "--group-size", "48"])
    assert r.exit_code == 2 and "divides head_dim" in r.output


@pytest.mark.parametrize("d", [64, 128, 256])
def test_ordered_sum_is_the_documented_order(d):
    rng = np.random.default_rng(d)
    x = (rng.standard_normal((5, d)) * 10 ** rng.uniform(-3, 3, (5, d))).astype(np.float32)
    f = np.float32
    for row, got in zip(x, ordered_sum(x)):
        total = None
        for h in range(0, d, 128):
            r = [f(row[h + j]) for j in range(8)]
            for i in range(8, min(d, 128), 8):
                r = [f(r[j] + row[h + i + j]) for j in range(8)]
            s = f(f(f(r[0] + r[1]) + f(r[2] + r[3])) + f(f(r[4] + r[5]) + f(r[6] + r[7])))
            total = s if total is None else f(total + s)
        assert got == total


# ---------------------------------------------------------------------------------------------
# The pool's tile layout (docs/format.md §5.1)
# ---------------------------------------------------------------------------------------------

def _unit_codes(words: np.ndarray, bits: int) -> np.ndarray:
    """The 32 codes [j, n] of one unit given as little-endian uint32 words, as the format reads
    them (written independently of the reference: word-level shifts and masks)."""
    out = np.zeros((4, 8), np.uint32)
    w = [int(x) for x in words]
    for j in range(4):
        for n in range(8):
            if bits == 2:
                v = (w[j // 2] >> (4 * n + 2 * (j % 2))) & 3
            elif bits == 3:
                v = (w[j] >> (4 * n)) & 7 if j < 3 else sum(((w[k] >> (4 * n + 3)) & 1) << k for k in range(3))
            elif bits == 4:
                v = (w[j] >> (4 * n)) & 15
            else:
                v = (w[2 * j + n // 4] >> (8 * (n % 4))) & 255
            out[j, n] = v
    return out


def _kernel_view(tile: np.ndarray, which: str, d: int, bits: int) -> np.ndarray:
    """Decode a tile the way the decode kernel's lanes see it: lane (g, t), register rho holds
    codes y = 0..3 of unit rho // 8 at (j = (rho % 8) // 2, n = 4 * (rho % 2) + y); K register
    rho = (i * d/32 + s) * 2 + h is (slot g + 8i, channels 32s + 16h + 4t + y); V register
    rho = 4m + 2kh + rh is (channel 16m + 8rh + g, slots 16kh + 4t + y)."""
    chunk = d * bits // 8
    out = np.full((32, d), -1, np.int64)
    for lane in range(32):
        g, t = lane // 4, lane % 4
        units = [_unit_codes(tile[lane * chunk + u * 4 * bits: lane * chunk + (u + 1) * 4 * bits]
                             .view("<u4"), bits) for u in range(d // 32)]
        for rho in range(d // 4):
            for y in range(4):
                code = units[rho // 8][(rho % 8) // 2, 4 * (rho % 2) + y]
                if which == "k":
                    i, rest = divmod(rho, 2 * (d // 32))
                    s, h = divmod(rest, 2)
                    slot, ch = g + 8 * i, 32 * s + 16 * h + 4 * t + y
                else:
                    m, rest = divmod(rho, 4)
                    kh, rh = divmod(rest, 2)
                    slot, ch = 16 * kh + 4 * t + y, 16 * m + 8 * rh + g
                assert out[slot, ch] == -1, "a code is read twice"
                out[slot, ch] = code
    assert np.all(out >= 0), "a code is never read"
    return out


@pytest.mark.parametrize("which", ["k", "v"])
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_tile_layout_is_a_bijection(which, d, bits):
    # every (slot, channel) has its own position, and every bit of the tile belongs to one code
    tau, c = np.meshgrid(np.arange(32), np.arange(d), indexing="ij")
    lane, unit, j, n = tile_position(which, tau, c, d)
    assert lane.min() == 0 and lane.max() == 31 and unit.max() == d // 32 - 1
    assert j.max() == 3 and n.max() == 7
    key = ((lane * (d // 32) + unit) * 4 + j) * 8 + n
    assert len(np.unique(key)) == 32 * d
    # give every code bit (slot, channel, k) a number 1..N and pack one bit of the numbers at a
    # time: a tile bit then reads back the number of the one code bit stored there (0: none)
    nbits = 32 * d * bits
    ids = np.arange(1, nbits + 1).reshape(32, d, bits)
    got = np.zeros(tile_bytes(d, bits) * 8, np.int64)
    for r in range(int(nbits).bit_length()):
        plane = (ids >> r) & 1
        codes = np.sum(plane << np.arange(bits), axis=-1).astype(np.uint8)
        got |= np.unpackbits(pack_tile(codes, bits, which), bitorder="little").astype(np.int64) << r
    assert tile_bytes(d, bits) * 8 == nbits and sorted(got.tolist()) == list(range(1, nbits + 1))


@pytest.mark.parametrize("which", ["k", "v"])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_tile_round_trip_and_kernel_view(which, d, bits):
    rng = np.random.default_rng(bits * 7 + d + (which == "v"))
    codes = rng.integers(0, 1 << bits, size=(32, d), dtype=np.uint8)
    tile = pack_tile(codes, bits, which)
    assert tile.dtype == np.uint8 and tile.shape == (32 * d * bits // 8,)
    np.testing.assert_array_equal(unpack_tile(tile, bits, which, d), codes)
    np.testing.assert_array_equal(_kernel_view(tile, which, d, bits), codes)
    # every byte string is a tile
    raw = rng.integers(0, 256, size=tile.shape, dtype=np.uint8)
    np.testing.assert_array_equal(pack_tile(unpack_tile(raw, bits, which, d), bits, which), raw)
    for slot in (0, 13, 31):
        np.testing.assert_array_equal(read_tile_slot(tile, slot, bits, which, d), codes[slot])


def test_tile_positions_by_hand():
    # K, slot 9, channel 37, d = 128: g = 9 % 8 = 1, i = 1, s = 1, h = (37 % 32) // 16 = 0,
    # t = (37 % 16) // 4 = 1, y = 1; rho = (1 * 4 + 1) * 2 + 0 = 10
    # -> L = 4g + t = 5, U = 10 // 8 = 1, j = (10 % 8) // 2 = 1, n = 4 * 0 + 1 = 1
    assert tile_position("k", 9, 37, 128) == (5, 1, 1, 1)
    # V, slot 9, channel 37, d = 128: m = 2, rh = 0, g = 5, kh = 0, t = 2, y = 1; rho = 8
    # -> L = 22, U = 1, j = 0, n = 1
    assert tile_position("v", 9, 37, 128) == (22, 1, 0, 1)
    # K, slot 2, channel 117, d = 128: g = 2, i = 0, s = 3, h = 1, t = 1, y = 1; rho = 7
    # -> L = 9, U = 0, j = 3, n = 5 (the split selector of 3-bit codes)
    assert tile_position("k", 2, 117, 128) == (9, 0, 3, 5)

    def one(which, slot, ch, bits, code):
        codes = np.zeros((32, 128), np.uint8)
        codes[slot, ch] = code
        t = pack_tile(codes, bits, which)
        return {int(i): int(t[i]) for i in np.flatnonzero(t)}

    # lane chunk 5 starts at 5 * 48 = 240, unit 1 at +12, word W1 at +4: bits 4..6 of byte 256
    assert one("k", 9, 37, 3, 0b101) == {256: 0b101 << 4}
    # j = 3: bit k of the code in bit 4n + 3 = 23 of word W_k (byte 2 of the word, bit 7)
    # lane chunk 9 at 9 * 48 = 432, unit 0: words at 432, 436, 440
    assert one("k", 2, 117, 3, 0b101) == {434: 0x80, 442: 0x80}
    assert one("k", 2, 117, 3, 0b010) == {438: 0x80}
    # 2 bits: lane 5 at 5 * 32 = 160, unit 1 at +8: W0 bits 4n + 2(j % 2) = 6..7 of byte 168
    assert one("k", 9, 37, 2, 0b11) == {168: 0b11 << 6}
    # 4 bits, V: lane 22 at 22 * 64 = 1408, unit 1 at +16, W0 bits 4..7 (high nibble)
    assert one("v", 9, 37, 4, 0xC) == {1424: 0xC0}
    # 8 bits: byte 8j + n = 9 of unit 1 of lane 5: 5 * 128 + 32 + 9
    assert one("k", 9, 37, 8, 0xA7) == {681: 0xA7}


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_writing_a_slot_keeps_every_other_slot(bits):
    rng = np.random.default_rng(bits)
    d = 64
    for which in ("k", "v"):
        garbage = rng.integers(0, 256, size=tile_bytes(d, bits), dtype=np.uint8)
        tile = garbage.copy()
        expect = unpack_tile(garbage, bits, which, d)
        for slot in rng.permutation(32)[:11]:
            new = rng.integers(0, 1 << bits, size=d, dtype=np.uint8)
            write_tile_slot(tile, int(slot), new, bits, which)
            expect[slot] = new
            np.testing.assert_array_equal(unpack_tile(tile, bits, which, d), expect)
        # the bytes are exactly the packing of old codes with the written slots replaced
        np.testing.assert_array_equal(tile, pack_tile(expect, bits, which))
    if bits < 8:
        with pytest.raises(FormatError, match="does not fit"):
            write_tile_slot(tile, 0, np.full(d, 1 << bits, np.uint8), bits, "k")
    with pytest.raises(FormatError, match="not one tile"):
        unpack_tile(np.zeros(10, np.uint8), bits, "k", d)
    with pytest.raises(FormatError, match="'k' or 'v'"):
        pack_tile(np.zeros((32, d), np.uint8), bits, "q")


# -- recent-token window (docs/format.md §5.2) ---------------------------------------------------

def _window_setup(w=5, d=64, seed=11):
    rng = np.random.default_rng(seed)
    H = 2
    lf = LayerFormat(d, (3, 8), (2, 4), sink_tokens=2, recent_tokens=w)
    lt = LayerTables(rng.normal(0, 1, (H, d)), rng.uniform(0.5, 2, (H, d)), rng.normal(0, 1, (H, d)),
                     rng.uniform(0.5, 2, (H, d)), rng.uniform(0.8, 1.2, H), rng.uniform(0.8, 1.2, H),
                     rotation_signs(d, 3))
    return LayerQuantizer(lf, lt, 3), rng


def test_paged_pool_recent_ring_write_and_read():
    from turboquant_trt.reference import PagedPool

    q, rng = _window_setup(w=5)
    fmt = q.fmt
    L, T = 45, 32
    k = rng.normal(0, 2, (L, 2, 64)).astype(np.float32)
    v = rng.normal(0, 2, (L, 2, 64)).astype(np.float32)
    pool = PagedPool(q, num_blocks=4, tokens_per_block=T, num_slots=3)
    bt = np.array([[3, 1]], np.int32)
    slot = np.array([2], np.int32)
    yk, yv = q.transform(k, "k"), q.transform(v, "v")
    codes_only_k = q.decode_transformed(q.encode_transformed(yk, "k"), "k")
    codes_only_v = q.decode_transformed(q.encode_transformed(yv, "v"), "v")
    written = 0
    for n in (1, 9, 3, 1, 31):  # chunks, some longer than the window
        pos = np.arange(written, written + n)
        pool.write(k[pos], v[pos], pos, bt, np.zeros(n, np.int64), slot)
        written += n
        ks, vs = pool.read(bt[0], written, 2)
        for p in range(written):
            if p < fmt.sink_tokens or p >= written - 5:  # fp16 copies, transformed domain
                np.testing.assert_array_equal(ks[p], yk[p].astype(np.float16).astype(np.float32))
                np.testing.assert_array_equal(vs[p], yv[p].astype(np.float16).astype(np.float32))
            else:
                np.testing.assert_array_equal(ks[p], codes_only_k[p])
                np.testing.assert_array_equal(vs[p], codes_only_v[p])
        # ring index p % w holds position p for the last w positions
        for p in range(max(0, written - 5), written):
            np.testing.assert_array_equal(pool.recent[2, :, 0, p % 5], yk[p].astype(np.float16))
            assert pool.recent_positions[2, p % 5] == p
        # the codes of window positions are written too (a token leaving the window needs nothing)
        for p in range(max(0, written - 5), written):
            blk, r = bt[0, p // T], p % T
            for h, b in enumerate(fmt.k_bits):
                np.testing.assert_array_equal(
                    pool.token_codes(blk, r, "k", h),
                    unpack_codes(q.encode_transformed(yk[p:p + 1], "k").codes[h][0], b, 64))
    assert np.isnan(pool.recent[0]).all() and np.isnan(pool.recent[1]).all()  # other slots
    with pytest.raises(FormatError, match="recent ring of slot 2 holds position"):
        pool.read(bt[0], written - 2, 2)  # the ring no longer holds what that length needs


def test_reference_attention_with_window_matches_per_query_attention():
    q, rng = _window_setup(w=4)
    L, hq = 23, 4
    k = rng.normal(0, 2, (L, 2, 64)).astype(np.float32)
    v = rng.normal(0, 2, (L, 2, 64)).astype(np.float32)
    qs = rng.normal(0, 1, (L, hq, 64)).astype(np.float32)
    yk, yv = q.transform(k, "k"), q.transform(v, "v")
    kq = q.decode_transformed(q.encode_transformed(yk, "k"), "k")
    vq = q.decode_transformed(q.encode_transformed(yv, "v"), "v")
    k16, v16 = (y.astype(np.float16).astype(np.float32) for y in (yk, yv))
    got = reference_attention(q, qs, kq, vq, np.arange(L), k_exact=k16, v_exact=v16)
    # independently: each query p alone, over the cache as read at length p + 1
    for p in range(L):
        kk = np.where((np.arange(p + 1) >= p + 1 - 4)[:, None, None], k16[:p + 1], kq[:p + 1])
        vv = np.where((np.arange(p + 1) >= p + 1 - 4)[:, None, None], v16[:p + 1], vq[:p + 1])
        want = reference_attention(q, qs[p:p + 1], kk, vv)
        np.testing.assert_allclose(got[p], want[0], rtol=1e-10, atol=1e-10)
    plain = reference_attention(q, qs, kq, vq, np.arange(L))
    assert np.abs(plain - got).max() > 1e-3  # the window changes the result
    with pytest.raises(FormatError, match="needs q_positions"):
        reference_attention(q, qs, kq, vq, None, k_exact=k16, v_exact=v16)


def test_window_kernel_tests_can_fail_when_the_ring_is_ignored():
    """tests/test_kernels_gpu.py::test_decode_reads_recent_window compares the kernel with the
    reference within 1e-3. On data like its (short sequences inside the window, long ones beyond)
    the attention output with the fp16 window and with codes in its place differ by far more, so a
    kernel that read the codes instead of the ring would fail that test."""
    import copy
    import dataclasses

    from turboquant_trt.reference import PagedPool, reference_attention

    rng = np.random.default_rng(7)
    d, h, g, t, w = 64, 2, 4, 32, 16
    lens = [1, 15, 16, 17, 200]
    fmt = LayerFormat(d, (3,) * h, (3,) * h, recent_tokens=w)
    tables = LayerTables.identity(h, d, 3)
    quant = LayerQuantizer(fmt, tables)
    need = [math.ceil(n / t) for n in lens]
    bt = np.zeros((len(lens), max(need)), np.int32)
    start = np.concatenate([[0], np.cumsum(need)])
    for b, n in enumerate(need):
        bt[b, :n] = np.arange(start[b], start[b] + n)
    pool = PagedPool(quant, int(start[-1]), t, num_slots=len(lens))
    for b, n in enumerate(lens):
        k = rng.normal(0, 1, (n, h, d)) + rng.normal(0, 2, (1, h, d))
        v = rng.normal(0, 1, (n, h, d)) + rng.normal(0, 2, (1, h, d))
        pool.write(k, v, np.arange(n), bt, np.full(n, b), np.arange(len(lens)))
    codes_view = copy.copy(pool)  # the same bytes read as if there were no window
    codes_view.q = LayerQuantizer(dataclasses.replace(fmt, recent_tokens=0), tables)
    q = rng.normal(0, 2, (len(lens), h * g, d))
    want = np.concatenate([reference_attention(quant, q[b:b + 1], *pool.read(bt[b], n, b))
                           for b, n in enumerate(lens)])
    codes = np.concatenate([reference_attention(quant, q[b:b + 1], *codes_view.read(bt[b], n, b))
                            for b, n in enumerate(lens)])
    assert np.linalg.norm(codes - want) / np.linalg.norm(want) > 20 * 1e-3
