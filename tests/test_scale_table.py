"""Scale tables: round trip, validation, refusal of another model's table, TP split/merge."""

from __future__ import annotations

import json
import os
from dataclasses import replace

import numpy as np
import pytest

from turboquant_trt.format import LayerFormat, ModelFormat
from turboquant_trt.model_loading import ModelIdentity
from turboquant_trt.reference import LayerTables, rotation_signs
from turboquant_trt.scale_table import ScaleTable, ScaleTableError, merge_tp, split_tp


def identity(kv_heads=4, layers=3, d=64, name="m", theta=10000.0):
    return ModelIdentity(name=name, model_type="llama", architecture="LlamaForCausalLM",
                         num_layers=layers, num_heads=kv_heads * 2, num_kv_heads=kv_heads,
                         head_dim=d, hidden_size=kv_heads * 2 * d,
                         rope={"rope_theta": theta}, config_hash=f"h{kv_heads}{layers}{theta}")


def make_table(ident=None, seed=0, recent=0):
    ident = ident or identity()
    rng = np.random.default_rng(seed)
    H, d = ident.num_kv_heads, ident.head_dim
    bits = (2, 3, 4, 8)
    layers, tables = [], []
    for li in range(ident.num_layers):
        layers.append(LayerFormat(d, tuple(rng.choice(bits, H)), tuple(rng.choice(bits, H)),
                                  sink_tokens=int(rng.integers(0, 4)), recent_tokens=recent,
                                  k_scale_exp=tuple(rng.integers(-64, 49, H)),
                                  v_scale_exp=tuple(rng.integers(-64, 49, H))))
        tables.append(LayerTables(rng.normal(0, 1, (H, d)), rng.uniform(0.2, 5, (H, d)),
                                  rng.normal(0, 1, (H, d)), rng.uniform(0.2, 5, (H, d)),
                                  rng.uniform(0.8, 1.3, H), rng.uniform(0.8, 1.3, H),
                                  rotation_signs(d, li)))
    return ScaleTable(ident, ModelFormat(tuple(layers)), tables,
                      {"data": {"source": "test"}})


def assert_same(a: ScaleTable, b: ScaleTable):
    assert a.identity == b.identity
    assert a.format == b.format
    assert a.recent_tokens == b.recent_tokens
    for ta, tb in zip(a.tables, b.tables):
        for n in ("k_mean", "k_smooth", "v_mean", "v_smooth", "k_clip", "v_clip", "signs"):
            np.testing.assert_array_equal(getattr(ta, n), getattr(tb, n))


def test_round_trip_and_manifest(tmp_path):
    t = make_table(recent=4)
    st, js = t.save(str(tmp_path / "tab"))
    assert os.path.basename(st) == "tab.safetensors" and os.path.basename(js) == "tab.json"
    man = json.load(open(js))
    assert man["kind"] == "turboquant-scale-table" and man["format_version"] == 4
    assert man["model"]["num_kv_heads"] == 4 and man["model"]["rope"] == {"rope_theta": 10000.0}
    assert len(man["format"]["layers"]) == 3 and man["recent_tokens"] == 4
    # the fp16 ring of the 4-token window is counted: 4 tokens x K and V x 16 bits per sequence
    no_window = ModelFormat(tuple(replace(lf, recent_tokens=0) for lf in t.format.layers))
    assert abs(man["bits_per_element"] - (no_window.bits_per_element() + 4 * 16 / 1024)) < 1e-5
    assert all(lf["recent_tokens"] == 4 for lf in man["format"]["layers"])
    # the one-byte scales' exponents per KV head, K and V
    for lf, lj in zip(t.format.layers, man["format"]["layers"]):
        assert lj["k_scale_exp"] == list(lf.k_scale_exp) and lj["v_scale_exp"] == list(lf.v_scale_exp)
        assert len(lj["k_scale_exp"]) == 4
    for path in (str(tmp_path / "tab"), st, js):
        assert_same(ScaleTable.load(path, t.identity), t)
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tq-")]  # no temp files left


def test_refuses_table_of_another_model(tmp_path):
    t = make_table()
    t.save(str(tmp_path / "tab"))
    other = identity(kv_heads=2, name="other")
    with pytest.raises(ScaleTableError, match="made for model 'm'.*not for 'other'.*num_kv_heads"):
        ScaleTable.load(str(tmp_path / "tab"), other)
    rope = identity(theta=500000.0, name="m2")
    with pytest.raises(ScaleTableError, match="rope"):
        ScaleTable.load(str(tmp_path / "tab"), rope)


def test_corrupt_or_missing_files(tmp_path):
    t = make_table()
    st, js = t.save(str(tmp_path / "tab"))
    with pytest.raises(ScaleTableError, match="not found"):
        ScaleTable.load(str(tmp_path / "nope"))
    # tensors of another table under this manifest
    make_table(seed=5).save(str(tmp_path / "other"))
    os.replace(tmp_path / "other.safetensors", st)
    with pytest.raises(ScaleTableError, match="sha256"):
        ScaleTable.load(str(tmp_path / "tab"))
    with open(js, "w") as f:
        f.write("{not json")
    with pytest.raises(ScaleTableError, match="JSON"):
        ScaleTable.load(str(tmp_path / "tab"))
    with open(js, "w") as f:
        json.dump({"kind": "something else"}, f)
    with pytest.raises(ScaleTableError, match="not a turboquant scale table"):
        ScaleTable.load(str(tmp_path / "tab"))


def test_invalid_tensors_refused(tmp_path):
    from safetensors.numpy import load_file, save_file

    t = make_table()
    st, js = t.save(str(tmp_path / "tab"))
    tensors = load_file(st)
    tensors["layers.1.k_smooth"][0, 0] = -1.0
    save_file(tensors, st)
    man = json.load(open(js))
    man.pop("safetensors_sha256")
    json.dump(man, open(js, "w"))
    with pytest.raises(ScaleTableError, match="layer 1.*positive"):
        ScaleTable.load(str(tmp_path / "tab"))
    del tensors["layers.2.signs"]
    tensors["layers.1.k_smooth"][0, 0] = 1.0
    save_file(tensors, st)
    with pytest.raises(ScaleTableError, match="lacks tensor layers.2.signs"):
        ScaleTable.load(str(tmp_path / "tab"))


def test_unwritable_output_leaves_nothing(tmp_path):
    t = make_table()
    with pytest.raises(ScaleTableError, match="does not exist"):
        t.save(str(tmp_path / "missing-dir" / "tab"))
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o500)
    try:
        if os.access(ro, os.W_OK):  # running as root: permissions do not apply
            pytest.skip("directory permissions are not enforced for this user")
        with pytest.raises(ScaleTableError, match="cannot write"):
            t.save(str(ro / "tab"))
        assert os.listdir(ro) == []
    finally:
        os.chmod(ro, 0o700)


@pytest.mark.parametrize("kv_heads,tp", [(4, 1), (4, 2), (4, 4), (2, 4), (1, 2), (8, 2)])
def test_tp_split_reassembles(kv_heads, tp, tmp_path):
    t = make_table(identity(kv_heads=kv_heads))
    shards = split_tp(t, tp)
    assert len(shards) == tp
    for r, s in enumerate(shards):
        assert s.tp["rank"] == r and s.tp["size"] == tp
        heads = s.tp["kv_heads"]
        assert s.format.layers[0].kv_heads == len(heads) == max(kv_heads // tp, 1)
        for li in range(t.identity.num_layers):
            np.testing.assert_array_equal(s.tables[li].k_mean, t.tables[li].k_mean[heads])
            assert s.format.layers[li].v_bits == tuple(t.format.layers[li].v_bits[h] for h in heads)
            # each head's scale exponents go with the head
            for name in ("k_scale_exp", "v_scale_exp"):
                whole = getattr(t.format.layers[li], name)
                assert getattr(s.format.layers[li], name) == tuple(whole[h] for h in heads)
    # shards are saved and loaded like tables, then reassemble exactly
    merged = merge_tp([ScaleTable.load(s.save(str(tmp_path / f"rank{r}"))[1])
                       for r, s in enumerate(reversed(shards))][::-1])
    assert_same(merged, t)
    with pytest.raises(ScaleTableError, match="tensor-parallel shard"):
        shards[0].check_model(t.identity)


def test_version_2_table_refused(tmp_path):
    t = make_table()
    st, js = t.save(str(tmp_path / "tab"))
    man = json.load(open(js))
    for v in (2, 1, 5, 99, None):
        man["format_version"] = v
        json.dump(man, open(js, "w"))
        with pytest.raises(ScaleTableError, match=f"made for KV format version {v!r}; this "
                                                  "turboquant reads versions 3 to 4: re-run "
                                                  "turboquant calibrate"):
            ScaleTable.load(str(tmp_path / "tab"))


def test_version_3_table_read_as_version_4(tmp_path):
    """Version 4 changed only how 8-bit codes are written: a version 3 table has the same fields."""
    t = make_table()
    st, js = t.save(str(tmp_path / "tab"))
    man = json.load(open(js))
    assert man["format_version"] == 4
    man["format_version"] = 3
    json.dump(man, open(js, "w"))
    back = ScaleTable.load(str(tmp_path / "tab"))
    assert back.format == t.format


def test_tp_split_errors():
    t = make_table(identity(kv_heads=4))
    with pytest.raises(ScaleTableError, match="cannot split 4 KV heads over 3"):
        split_tp(t, 3)
    with pytest.raises(ScaleTableError, match="every rank"):
        merge_tp(split_tp(t, 2)[:1])
