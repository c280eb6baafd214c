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
    LayerQuantizer,
    LayerTables,
    codebook_boundaries,
    gaussian_mse,
    hadamard,
    lloyd_max_codebook,
    ordered_sum,
    pack_codes,
    quantize_turbo,
    quantize_uniform,
    dequantize_uniform,
    reference_attention,
    rotate,
    rotation_signs,
    unpack_codes,
    unrotate,
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


def test_codebooks_match_published_lloyd_max_values():
    np.testing.assert_allclose(lloyd_max_codebook(2)[2:], [0.4528, 1.5104], atol=2e-4)
    np.testing.assert_allclose(lloyd_max_codebook(3)[4:], [0.2451, 0.7560, 1.3440, 2.1520], atol=2e-4)
    assert gaussian_mse(2) == pytest.approx(0.1175, abs=2e-4)
    assert gaussian_mse(3) == pytest.approx(0.03455, abs=1e-4)
    assert gaussian_mse(4) == pytest.approx(0.009497, abs=3e-5)
    for b in (2, 3, 4, 8):
        c = lloyd_max_codebook(b)
        assert c.dtype == np.float32 and len(c) == 1 << b and np.all(np.diff(c) > 0)
        np.testing.assert_array_equal(c, -c[::-1])
        assert codebook_boundaries(b)[(1 << (b - 1)) - 1] == 0.0


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("d", [64, 128])
def test_turbo_mse_follows_lloyd_max_theory(bits, d):
    rng = np.random.default_rng(bits * 1000 + d)
    x = rng.standard_normal((4000, d)).astype(np.float32)
    y = rotate(x, rotation_signs(d, 0))  # still i.i.d. Gaussian
    for nc in (False, True):
        codes, scale = quantize_turbo(y, bits, norm_correction=nc)
        yq = scale.astype(np.float32)[:, None] * lloyd_max_codebook(bits)[codes]
        rel = np.sum((yq - y) ** 2) / np.sum(y ** 2)
        theory = gaussian_mse(bits)
        # finite d and the per-vector norm move it a little; fp16 scales add ~1e-7
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
        # q·k error variance ≈ |q|^2 |k|^2 D_b / d for rotated Gaussian data
        expect = np.mean(np.sum(q * q, -1) * np.sum(k[:, 0] ** 2, -1)) * gaussian_mse(b) / d
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
