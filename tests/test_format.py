"""The format: validation, layout and byte accounting against real packed output."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from turboquant_trt.cli import cli
from turboquant_trt.format import (
    PRESETS,
    FormatError,
    KVFormat,
    LayerFormat,
    ModelFormat,
    code_bytes,
    preset,
)
from turboquant_trt.reference import LayerQuantizer, PagedPool

BITS = st.sampled_from([2, 3, 4, 8])
DIMS = st.sampled_from([64, 128, 256])


@pytest.mark.parametrize("kwargs, needle", [
    ({"k_bits": 5}, "allowed bit widths: (2, 3, 4, 8)"),
    ({"v_bits": 1}, "allowed bit widths"),
    ({"head_dim": 96}, "allowed: (64, 128, 256)"),
    ({"kind": "uniform", "group_size": 48}, "divides head_dim=128"),
    ({"kind": "uniform", "group_size": 12}, "multiple of 8"),
    ({"kind": "turbo", "group_size": 32}, "one scale per vector"),
    ({"kind": "turbo", "rotation": False}, "needs rotation=True"),
    ({"kind": "nf4"}, "allowed kinds"),
    ({"sink_tokens": 17}, "between 0 and 16"),
])
def test_invalid_configs_say_what_is_allowed(kwargs, needle):
    with pytest.raises(FormatError) as e:
        KVFormat(**kwargs)
    assert needle in str(e.value)


def test_layer_format_validation():
    with pytest.raises(FormatError, match="same, non-zero"):
        LayerFormat(64, (3, 3), (3,))
    with pytest.raises(FormatError, match=r"k_bits\[1\]=5"):
        LayerFormat(64, (3, 5), (3, 3))
    lf = LayerFormat(64, (3, 2), (4, 3))
    for t in (0, 3, 256):
        with pytest.raises(FormatError, match="power of two"):
            lf.block_layout(t)
    with pytest.raises(FormatError, match="unknown preset"):
        preset("k5v5")


def test_presets_include_five_x():
    comp = {n: preset(n, 128).compression() for n in PRESETS}
    assert max(comp.values()) >= 5.0
    assert comp["k3v3"] >= 5.0  # 3.156 bits at d=128, tables included
    assert comp["k8v8"] < comp["k4v4"] < comp["k3v3"] < comp["k2v2"]


@settings(max_examples=60, deadline=None)
@given(kb=st.lists(BITS, min_size=1, max_size=4), d=DIMS, t=st.sampled_from([1, 2, 4, 8, 16, 64, 128]),
       kind=st.sampled_from(["turbo", "uniform"]), seed=st.integers(0, 2**31))
def test_accounting_equals_real_bytes(kb, d, t, kind, seed):
    rng = np.random.default_rng(seed)
    vb = list(rng.choice([2, 3, 4, 8], size=len(kb)))
    gs = 0 if kind == "turbo" else int(rng.choice([g for g in (8, 32, 64, d) if d % g == 0]))
    lf = LayerFormat(d, tuple(kb), tuple(vb), kind=kind, group_size=gs)
    q = LayerQuantizer(lf)
    n = 5
    x = rng.standard_normal((n, lf.kv_heads, d)).astype(np.float32)
    ek, ev = q.encode(x, "k"), q.encode(x, "v")
    real = sum(a.nbytes for a in ek.codes + ek.meta + ev.codes + ev.meta)
    assert real == n * lf.bytes_per_token(ref_tokens=0)
    # bits/element without amortized parts is exactly the byte count
    assert lf.bits_per_element(ref_tokens=0) * 2 * d * lf.kv_heads * n == pytest.approx(real * 8)
    lay = lf.block_layout(t)
    offsets = sorted(lay.k_codes + lay.v_codes + lay.k_meta + lay.v_meta)
    assert all(o % 16 == 0 for o in offsets) and lay.block_bytes % 16 == 0
    if t * lf.meta_bytes % 16 == 0 and all(t * code_bytes(d, b) % 16 == 0 for b in kb + vb):
        assert lay.block_bytes == t * lf.bytes_per_token(ref_tokens=0)  # no padding
    else:
        assert lay.block_bytes >= t * lf.bytes_per_token(ref_tokens=0)


def test_amortized_parts_counted():
    f = KVFormat(3, 3, head_dim=64, sink_tokens=4)
    base = (24 + 24 + 2 + 2) * 8 / 128
    sinks = 4 * 2 * 64 * 2 * 8 / 1024 / 128
    tables = (8 * 64 + 4) * 8 / 1024 / 128
    assert f.bits_per_element() == pytest.approx(base + sinks + tables)
    assert f.bits_per_element(tables=False) == pytest.approx(base + sinks)
    m = ModelFormat((LayerFormat(64, (8,), (8,)), LayerFormat(64, (2,), (2,))))
    assert m.bits_per_element(0) == pytest.approx((8.25 + 2.25) / 2)
    assert ModelFormat.from_dict(json.loads(m.to_json())) == m
    with pytest.raises(FormatError, match="format_version"):
        ModelFormat.from_dict({"format_version": 99, "layers": []})


def test_paged_pool_rows_land_where_layout_says():
    rng = np.random.default_rng(7)
    lf = LayerFormat(64, (3, 8), (2, 4), sink_tokens=2)
    q = LayerQuantizer(lf, layer=3)
    t, n = 4, 11
    pool = PagedPool(q, num_blocks=6, tokens_per_block=t, num_slots=3)
    bt = np.array([[5, 0, 2]])
    k = rng.standard_normal((n, 2, 64)).astype(np.float32)
    v = rng.standard_normal((n, 2, 64)).astype(np.float32)
    pool.write(k, v, np.arange(n), bt, np.zeros(n, int), np.array([2]))
    ek = q.encode(k, "k")
    lay = pool.layout
    # token 9 -> block table column 2 (block 2), row 1
    cb = code_bytes(64, 8)
    start = lay.k_codes[1] + 1 * cb
    assert np.array_equal(pool.pool[2, start:start + cb], ek.codes[1][9])
    ks, vs = pool.read(bt[0], n, 2)
    direct = q.decode_transformed(ek, "k")
    np.testing.assert_array_equal(ks[2:], direct[2:])
    # sinks are the fp16 transformed values, unquantized
    np.testing.assert_array_equal(ks[:2], q.transform(k, "k")[:2].astype(np.float16).astype(np.float32))
    untouched = np.ones(6, bool)
    untouched[[5, 0, 2]] = False
    assert np.all(pool.pool[untouched] == 0xA5)


def test_formats_cli_table_and_json():
    r = CliRunner().invoke(cli, ["formats", "--json", "--head-dim", "64", "--sink-tokens", "4"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.output)
    assert {x["preset"] for x in rows} == set(PRESETS)
    k3v3 = next(x for x in rows if x["preset"] == "k3v3")
    assert k3v3["bytes_per_token_head"] == 52
    assert k3v3["bits_per_element"] == pytest.approx(preset("k3v3", 64, 4).bits_per_element(), abs=1e-4)
    r = CliRunner().invoke(cli, ["formats"])
    assert r.exit_code == 0 and "k2v2" in r.output and "compression" in r.output
    r = CliRunner().invoke(cli, ["--version"])
    assert r.exit_code == 0 and "turboquant" in r.output
