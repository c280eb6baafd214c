"""The format: validation, layout and byte accounting against real packed output."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from turboquant_trt.cli import cli
from turboquant_trt.format import (
    ALIGN,
    FORMAT_VERSION,
    PRESETS,
    FormatError,
    KVFormat,
    LayerFormat,
    ModelFormat,
    preset,
)
from turboquant_trt.reference import pack_codes, unpack_codes
from turboquant_trt.reference import LayerQuantizer, PagedPool, pack_tile, tile_bytes, unpack_tile

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
    for t in (0, 1, 3, 8, 16, 48, 256):
        with pytest.raises(FormatError, match=f"tokens_per_block={t} is not supported; allowed: 32, 64, 128"):
            lf.block_layout(t)
    with pytest.raises(FormatError, match="allowed: 32, 64, 128"):
        PagedPool(LayerQuantizer(lf), num_blocks=2, tokens_per_block=16, num_slots=1)
    with pytest.raises(FormatError, match="unknown preset"):
        preset("k5v5")


def test_presets_include_five_x():
    comp = {n: preset(n, 128).compression() for n in PRESETS}
    assert max(comp.values()) >= 5.0
    assert comp["k3v3"] >= 5.0  # 3.156 bits at d=128, tables included
    assert comp["k8v8"] < comp["k4v4"] < comp["k3v3"] < comp["k2v2"]


@settings(max_examples=60, deadline=None)
@given(kb=st.lists(BITS, min_size=1, max_size=4), d=DIMS, t=st.sampled_from([32, 64, 128]),
       kind=st.sampled_from(["turbo", "uniform"]), seed=st.integers(0, 2**31))
def test_accounting_equals_real_bytes(kb, d, t, kind, seed):
    rng = np.random.default_rng(seed)
    vb = list(rng.choice([2, 3, 4, 8], size=len(kb)))
    gs = 0 if kind == "turbo" else int(rng.choice([g for g in (8, 32, 64, d) if d % g == 0]))
    exps = tuple(int(e) for e in rng.integers(-64, 49, size=2 * len(kb)))
    lf = LayerFormat(d, tuple(kb), tuple(vb), kind=kind, group_size=gs,
                     k_scale_exp=exps[:len(kb)], v_scale_exp=exps[len(kb):])
    q = LayerQuantizer(lf)
    n = 5
    x = rng.standard_normal((n, lf.kv_heads, d)).astype(np.float32)
    ek, ev = q.encode(x, "k"), q.encode(x, "v")
    real = sum(a.nbytes for a in ek.codes + ek.meta + ev.codes + ev.meta)
    assert real == n * lf.bytes_per_token(ref_tokens=0)
    if kind == "turbo":  # one byte of metadata per vector: the scale8 code
        assert all(m.shape == (n, 1) and m.dtype == np.uint8 for m in ek.meta + ev.meta)
    # bits/element without amortized parts is exactly the byte count
    assert lf.bits_per_element(ref_tokens=0) * 2 * d * lf.kv_heads * n == pytest.approx(real * 8)
    lay = lf.block_layout(t)
    offsets = sorted(lay.k_codes + lay.v_codes + lay.k_meta + lay.v_meta)
    assert all(o % 16 == 0 for o in offsets) and lay.block_bytes % 16 == 0
    assert lay.block_bytes == t * lf.bytes_per_token(ref_tokens=0)  # T >= 32: no padding


def _v1_layout(lf: LayerFormat, t: int) -> tuple:
    """Version 1's block offsets (docs/format.md §5 of v1), written out independently."""
    off, heads = 0, []
    pad = lambda n: -(-n // ALIGN) * ALIGN  # noqa: E731
    for kb, vb in zip(lf.k_bits, lf.v_bits):
        kc = off
        vc = kc + pad(t * lf.head_dim * kb // 8)
        km = vc + pad(t * lf.head_dim * vb // 8)
        vm = km + pad(t * lf.meta_bytes)
        off = vm + pad(t * lf.meta_bytes)
        heads.append((kc, vc, km, vm))
    return tuple(heads), off


@pytest.mark.parametrize("t", [32, 64, 128])
def test_block_layout_offsets_unchanged_from_v1(t):
    rng = np.random.default_rng(t)
    for _ in range(30):
        h = int(rng.integers(1, 9))
        d = int(rng.choice([64, 128, 256]))
        kind = str(rng.choice(["turbo", "uniform"]))
        lf = LayerFormat(d, tuple(rng.choice([2, 3, 4, 8], h)), tuple(rng.choice([2, 3, 4, 8], h)),
                         kind=kind, group_size=0 if kind == "turbo" else 32)
        lay = lf.block_layout(t)
        heads, total = _v1_layout(lf, t)
        assert tuple(zip(lay.k_codes, lay.v_codes, lay.k_meta, lay.v_meta)) == heads
        assert lay.block_bytes == total
        for i, (kb, vb) in enumerate(zip(lf.k_bits, lf.v_bits)):  # a head's codes are whole tiles
            assert lay.v_codes[i] - lay.k_codes[i] == t // 32 * tile_bytes(d, kb)
            assert lay.k_meta[i] - lay.v_codes[i] == t // 32 * tile_bytes(d, vb)


def test_amortized_parts_counted():
    f = KVFormat(3, 3, head_dim=64, sink_tokens=4)
    base = (24 + 24 + 1 + 1) * 8 / 128  # codes + one-byte scales (format version 3)
    sinks = 4 * 2 * 64 * 2 * 8 / 1024 / 128
    tables = (8 * 64 + 4 + 2) * 8 / 1024 / 128  # mu, s: fp16 [d] x 4; clips: fp16 x 2; E_k, E_v
    assert f.bits_per_element() == pytest.approx(base + sinks + tables)
    assert f.bits_per_element(tables=False) == pytest.approx(base + sinks)
    m = ModelFormat((LayerFormat(64, (8,), (8,)), LayerFormat(64, (2,), (2,))))
    assert m.bits_per_element(0) == pytest.approx((8.125 + 2.125) / 2)
    assert ModelFormat.from_dict(json.loads(m.to_json())) == m
    assert FORMAT_VERSION == 4 and json.loads(m.to_json())["format_version"] == 4
    for v in (1, 2, 99):
        with pytest.raises(FormatError, match=f"format_version {v} is not supported"):
            ModelFormat.from_dict({"format_version": v, "layers": []})


def test_paged_pool_tokens_land_where_layout_says():
    rng = np.random.default_rng(7)
    lf = LayerFormat(64, (3, 8), (2, 4), sink_tokens=2)
    q = LayerQuantizer(lf, layer=3)
    t, n = 32, 75
    pool = PagedPool(q, num_blocks=6, tokens_per_block=t, num_slots=3)
    bt = np.array([[5, 0, 2]])
    k = rng.standard_normal((n, 2, 64)).astype(np.float32)
    v = rng.standard_normal((n, 2, 64)).astype(np.float32)
    pool.write(k, v, np.arange(n), bt, np.zeros(n, int), np.array([2]))
    ek, ev = q.encode(k, "k"), q.encode(v, "v")
    lay = pool.layout
    # token 70 -> block table column 2 (block 2), row 6 of tile 0: K head 1 (8 bits) has its codes
    # in the tile at the head's K codes offset
    start = lay.k_codes[1]
    tile = pool.pool[2, start:start + tile_bytes(64, 8)]
    codes70 = unpack_tile(tile, 8, "k", 64)[6]
    np.testing.assert_array_equal(codes70, ek.codes[1][70])  # 8-bit per-vector packing = codes
    # token 40 -> block 0, row 8: V head 0 (2 bits); meta rows are plain rows
    vt = unpack_tile(pool.pool[0, lay.v_codes[0]:lay.v_codes[0] + tile_bytes(64, 2)], 2, "v", 64)
    np.testing.assert_array_equal(pool.token_codes(0, 8, "v", 0), vt[8])
    np.testing.assert_array_equal(pack_codes(vt[8], 2), ev.codes[0][40])
    assert lf.meta_bytes == 1 and ev.meta[0].shape == (n, 1) and ev.meta[0].dtype == np.uint8
    np.testing.assert_array_equal(pool.pool[0, lay.v_meta[0] + 8: lay.v_meta[0] + 9], ev.meta[0][40])
    ks, vs = pool.read(bt[0], n, 2)
    np.testing.assert_array_equal(ks[2:], q.decode_transformed(ek, "k")[2:])
    np.testing.assert_array_equal(vs[2:], q.decode_transformed(ev, "v")[2:])
    # sinks are the fp16 transformed values, unquantized; their codes are in the block as well
    np.testing.assert_array_equal(ks[:2], q.transform(k, "k")[:2].astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(pack_codes(pool.token_codes(5, 1, "k", 0), 3), ek.codes[0][1])
    untouched = np.ones(6, bool)
    untouched[[5, 0, 2]] = False
    assert np.all(pool.pool[untouched] == 0xA5)


@pytest.mark.parametrize("t", [32, 64, 128])
def test_paged_pool_partial_tiles_of_a_reused_block(t):
    """Writes into a block full of garbage change only the written tokens' bits and rows."""
    rng = np.random.default_rng(t + 1)
    d = 64
    lf = LayerFormat(d, (3, 4, 2), (8, 3, 2), sink_tokens=1)
    q = LayerQuantizer(lf, layer=1)
    pool = PagedPool(q, num_blocks=3, tokens_per_block=t, num_slots=1)
    pool.pool[:] = rng.integers(0, 256, size=pool.pool.shape, dtype=np.uint8)
    before = pool.pool.copy()
    bt = np.array([[2, 0]])
    m = t // 2 + 5  # block 2 full; block 0 holds m tokens (a partial tile, after full ones for T > 32)
    n = t + m
    k = rng.standard_normal((n, 3, d)).astype(np.float32)
    v = rng.standard_normal((n, 3, d)).astype(np.float32)
    order = rng.permutation(n)  # any order, in two calls
    for part in (order[: n // 2], order[n // 2:]):
        pool.write(k[part], v[part], part, bt, np.zeros(len(part), int), np.array([0]))
    ks, vs = pool.read(bt[0], n, 0)
    ek, ev = q.encode(k, "k"), q.encode(v, "v")
    np.testing.assert_array_equal(ks[1:], q.decode_transformed(ek, "k")[1:])
    np.testing.assert_array_equal(vs[1:], q.decode_transformed(ev, "v")[1:])
    assert np.array_equal(pool.pool[1], before[1])
    # block 0, expected bytes: the garbage's codes with rows 0..36 replaced, packed again
    lay = pool.layout
    for h in range(3):
        for which, enc, bits, off in (("k", ek, lf.k_bits[h], lay.k_codes[h]),
                                      ("v", ev, lf.v_bits[h], lay.v_codes[h])):
            tb = tile_bytes(d, bits)
            codes = np.concatenate([unpack_tile(before[0, off + i * tb: off + (i + 1) * tb], bits, which, d)
                                    for i in range(t // 32)])
            codes[:m] = unpack_codes(enc.codes[h][t:], bits, d)
            want = np.concatenate([pack_tile(codes[i * 32:(i + 1) * 32], bits, which)
                                   for i in range(t // 32)])
            np.testing.assert_array_equal(pool.pool[0, off: off + t // 32 * tb], want)
            np.testing.assert_array_equal(pool.block_codes(0, which, h), codes)
            # block 2 is full, sink position 0 included
            np.testing.assert_array_equal(pool.block_codes(2, which, h),
                                          unpack_codes(enc.codes[h][:t], bits, d))
        for off, enc in ((lay.k_meta[h], ek), (lay.v_meta[h], ev)):
            mb = lf.meta_bytes  # 1: the one-byte scale
            rows = pool.pool[0, off: off + mb * t].reshape(t, mb)
            np.testing.assert_array_equal(rows[:m], enc.meta[h][t:])
            np.testing.assert_array_equal(rows[m:], before[0, off + mb * m: off + mb * t].reshape(-1, mb))


def test_formats_cli_table_and_json():
    r = CliRunner().invoke(cli, ["formats", "--json", "--head-dim", "64", "--sink-tokens", "4"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.output)
    assert {x["preset"] for x in rows} == set(PRESETS)
    k3v3 = next(x for x in rows if x["preset"] == "k3v3")
    assert k3v3["bytes_per_token_head"] == 24 + 24 + 1 + 1
    assert k3v3["bits_per_element"] == pytest.approx(preset("k3v3", 64, 4).bits_per_element(), abs=1e-4)
    r = CliRunner().invoke(cli, ["formats"])
    assert r.exit_code == 0 and "k2v2" in r.output and "compression" in r.output
    r = CliRunner().invoke(cli, ["--version"])
    assert r.exit_code == 0 and "turboquant" in r.output


def test_formats_cli_counts_the_window():
    def k3v3(*extra):
        r = CliRunner().invoke(cli, ["formats", "--json", "--head-dim", "64", *extra])
        assert r.exit_code == 0, r.output
        return next(x for x in json.loads(r.output) if x["preset"] == "k3v3")
    plain, windowed = k3v3(), k3v3("--recent-tokens", "16")
    # 16 tokens x K,V x 64 channels x 2 bytes over 1024 tokens = 4 bytes per token-head = 0.25 bits
    assert windowed["recent_tokens"] == 16
    assert windowed["bits_per_element"] - plain["bits_per_element"] == pytest.approx(0.25, abs=2e-4)
    assert windowed["bytes_per_token_head"] == plain["bytes_per_token_head"]
    r = CliRunner().invoke(cli, ["formats", "--recent-tokens", "65"])
    assert r.exit_code != 0 and "65" in r.output


# -- recent-token window (docs/format.md §5.2) ---------------------------------------------------

@pytest.mark.parametrize("w", [-1, 65])
def test_recent_tokens_out_of_range_is_refused(w):
    with pytest.raises(FormatError, match="recent_tokens=.* between 0 and 64"):
        LayerFormat(64, (3,), (3,), recent_tokens=w)
    with pytest.raises(FormatError, match="recent_tokens"):
        KVFormat(3, 3, head_dim=64, recent_tokens=w)


@pytest.mark.parametrize("d,w,ns", [(64, 8, 1), (128, 16, 0), (256, 64, 4)])
def test_recent_ring_accounting(d, w, ns):
    lf = LayerFormat(d, (3, 4), (2, 8), sink_tokens=ns, recent_tokens=w)
    base = LayerFormat(d, (3, 4), (2, 8), sink_tokens=ns)
    # per sequence and head: w tokens x (K, V) x d fp16 values, spread over ref_tokens
    ring_bits = 8 * (w * 2 * d * 2 / 1024) / (2 * d)
    assert ring_bits == pytest.approx(16 * w / 1024)
    assert lf.bits_per_element() == pytest.approx(base.bits_per_element() + ring_bits)
    assert lf.bits_per_element(ref_tokens=2048) == pytest.approx(
        base.bits_per_element(ref_tokens=2048) + 16 * w / 2048)
    # the block does not change: the ring is a separate per-sequence array
    assert lf.block_layout(64) == base.block_layout(64)
    assert lf.bytes_per_token(0) == base.bytes_per_token(0)


def test_recent_tokens_round_trip():
    lf = LayerFormat(64, (3, 2), (4, 4), sink_tokens=2, recent_tokens=8)
    mf = ModelFormat((lf, LayerFormat(64, (3, 2), (4, 4))))
    back = ModelFormat.from_dict(json.loads(mf.to_json()))
    assert back == mf and back.layers[0].recent_tokens == 8 and back.layers[1].recent_tokens == 0
    assert mf.recent_tokens == 8
    assert KVFormat(3, 3, head_dim=64, recent_tokens=4).layer(2).recent_tokens == 4
    assert preset("k3v3", head_dim=64, recent_tokens=8).recent_tokens == 8
    # a version 2 layer written before the field existed reads as "no window"
    d = lf.to_dict()
    del d["recent_tokens"]
    assert LayerFormat.from_dict(d).recent_tokens == 0


def test_recent_ring_bytes_match_a_written_pool():
    """The accounting's ring term equals the bytes of the reference pool's ring."""
    lf = LayerFormat(64, (3, 4, 2), (8, 3, 2), sink_tokens=1, recent_tokens=8)
    pool = PagedPool(LayerQuantizer(lf), num_blocks=4, tokens_per_block=32, num_slots=5)
    per_slot = pool.recent[0].nbytes  # one sequence, every head
    assert per_slot == 8 * 2 * 64 * 2 * 3
    ring_only = lf.bytes_per_token(1024) - LayerFormat(64, (3, 4, 2), (8, 3, 2),
                                                       sink_tokens=1).bytes_per_token(1024)
    assert ring_only == pytest.approx(per_slot / 1024)


# -- the one-byte scale's exponents (docs/format.md §3.1, version 3) -----------------------------

def test_turbo_metadata_is_one_byte():
    # turbo k3v3 at d = 128: 48 + 48 bytes of codes, one scale byte each for K and V
    assert KVFormat(3, 3, head_dim=128).bytes_per_token_head() == 48 + 48 + 1 + 1
    assert preset("k2v2", 64).bytes_per_token_head() == 16 + 16 + 1 + 1
    lf = KVFormat(3, 3, head_dim=128).layer(1)
    assert lf.meta_bytes == 1 and lf.bits_per_element(0) == 8 * 98 / 256
    # uniform keeps its fp16 scale and zero per group (4 bytes per group)
    assert KVFormat(3, 3, kind="uniform", group_size=32, head_dim=128).layer(1).meta_bytes == 16
    # k2v2 at d = 64 without tables or sinks: 2.125 bits, 7.53x
    assert preset("k2v2", 64).bits_per_element(0, tables=False) == 2.125
    # the tables: mu, s (fp16 [d]) x 4, two fp16 clips, two one-byte exponents per head
    one = LayerFormat(64, (3,), (3,))
    assert (one.bytes_per_token(1024, tables=True) - one.bytes_per_token(1024)) * 1024 == \
        pytest.approx(8 * 64 + 4 + 2)


def test_scale_exponents_default_and_validation():
    lf = LayerFormat(64, (3, 2), (4, 3))
    assert lf.k_scale_exp == (-10, -10) and lf.v_scale_exp == (-10, -10)
    assert KVFormat(3, 3, head_dim=64, scale_exp=-7).layer(3).v_scale_exp == (-7, -7, -7)
    assert KVFormat(3, 3, head_dim=64).layer(2).k_scale_exp == (-10, -10)
    ok = LayerFormat(64, (3, 2), (4, 3), k_scale_exp=(-64, 48), v_scale_exp=[np.int64(0), 5])
    assert ok.k_scale_exp == (-64, 48) and ok.v_scale_exp == (0, 5)
    assert all(type(e) is int for e in ok.v_scale_exp)
    with pytest.raises(FormatError, match=r"k_scale_exp lists 1 exponents for 2 KV heads"):
        LayerFormat(64, (3, 2), (4, 3), k_scale_exp=(-10,))
    with pytest.raises(FormatError, match=r"v_scale_exp\[1\]=49 is out of range.*-64 and 48"):
        LayerFormat(64, (3, 2), (4, 3), v_scale_exp=(0, 49))
    with pytest.raises(FormatError, match=r"k_scale_exp\[0\]=-65 is out of range"):
        LayerFormat(64, (3, 2), (4, 3), k_scale_exp=(-65, 0))
    for bad in (1.5, "3", None, True):
        with pytest.raises(FormatError, match="must be an integer between -64 and 48"):
            LayerFormat(64, (3, 2), (4, 3), k_scale_exp=(bad, 0))
    with pytest.raises(FormatError, match="scale_exp=49 is out of range"):
        KVFormat(3, 3, head_dim=64, scale_exp=49)


def test_scale_exponents_round_trip():
    lf = LayerFormat(64, (3, 2), (4, 8), sink_tokens=1, recent_tokens=4,
                     k_scale_exp=(-64, 48), v_scale_exp=(-3, -12))
    mf = ModelFormat((lf, LayerFormat(64, (2, 2), (2, 2))))
    d = json.loads(mf.to_json())
    assert d["format_version"] == 4
    assert d["layers"][0]["k_scale_exp"] == [-64, 48] and d["layers"][0]["v_scale_exp"] == [-3, -12]
    assert d["layers"][1]["k_scale_exp"] == [-10, -10]
    back = ModelFormat.from_dict(d)
    assert back == mf and back.layers[0].v_scale_exp == (-3, -12)
    # the exponents are part of the table, not of the block: the layout does not change
    assert lf.block_layout(64) == LayerFormat(64, (3, 2), (4, 8)).block_layout(64)
