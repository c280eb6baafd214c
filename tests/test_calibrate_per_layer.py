"""Per-layer recent-token windows chosen jointly with the bit widths (calibrate.allocate_per_layer)."""

from __future__ import annotations

import itertools
import json
import os

import numpy as np
import pytest
import torch

from test_cache import _ids, random_table, tiny_llama
from turboquant_trt.calibrate import (
    CalibrationError,
    CalibrationResult,
    allocate_per_layer,
    build_table,
    build_table_per_layer_window,
    layer_bytes,
    run_calibration,
    with_window,
)
from turboquant_trt.format import LayerFormat, ModelFormat
from turboquant_trt.model_loading import model_identity
from turboquant_trt.scale_table import ScaleTable

BITS = (2, 3, 4, 8)


def _fake_result(L, H, recent, sinks=1, seed=0, scale=1.0):
    """A CalibrationResult with random costs falling with bits (no samples needed by the
    allocator itself)."""
    rng = np.random.default_rng(seed)
    cost, clip = {}, {}
    for li in range(L):
        for h in range(H):
            for w in "kv":
                base = rng.uniform(0.01, 1.0) * scale
                for b in BITS:
                    cost[(li, h, w, b)] = base * 4.0 ** (-b) * rng.uniform(0.7, 1.3)
                    clip[(li, h, w, b)] = 1.0
    return CalibrationResult([], [], cost, clip, 0.0, 0.0, recent, 16, sinks)


def _model_bits(choice, alloc, results, L, H, d):
    layers = []
    for li in range(L):
        r = results[choice[li]]
        layers.append(LayerFormat(d, tuple(alloc[(li, h, "k")] for h in range(H)),
                                  tuple(alloc[(li, h, "v")] for h in range(H)),
                                  sink_tokens=r.sinks, recent_tokens=r.recent))
    return ModelFormat(tuple(layers)).bits_per_element()


def test_exact_minimum_against_exhaustive_search():
    """Two layers, one KV head, windows {0, 8, 32} whose sensitivities differ: the knapsack
    finds the same minimum as trying every combination of windows and bits."""
    L, H, d = 2, 1, 64
    # a window lowers the costs (by a different factor per layer and window)
    base = _fake_result(L, H, 0, seed=1)
    results = [base]
    for i, w in enumerate((8, 32)):
        r = _fake_result(L, H, w, seed=1)
        rng = np.random.default_rng(10 + i)
        r.cost = {k: v * rng.uniform(0.05, 0.9) for k, v in base.cost.items()}
        results.append(r)
    for budget in (2.4, 2.8, 3.2, 3.7, 4.5, 6.0, 8.2):
        a = allocate_per_layer(results, L, H, d, budget)
        got_bits = _model_bits(a.choice, a.bits, results, L, H, d)
        assert got_bits <= budget + 1e-12
        best = None
        for ch in itertools.product(range(len(results)), repeat=L):
            for bs in itertools.product(BITS, repeat=2 * L * H):
                alloc = {(li, 0, w): bs[2 * li + j] for li in range(L) for j, w in enumerate("kv")}
                if _model_bits(ch, alloc, results, L, H, d) > budget + 1e-12:
                    continue
                c = sum(results[ch[li]].cost[(li, 0, w, alloc[(li, 0, w)])]
                        for li in range(L) for w in "kv")
                best = c if best is None else min(best, c)
        assert best is not None
        assert a.estimate == pytest.approx(best, rel=1e-12, abs=1e-15), budget
        # the reported bytes are the format's bytes
        assert a.total_bytes * 8 / (1024 * L * H * 2 * d) == pytest.approx(got_bits, abs=1e-12)


def test_windows_chosen_where_they_pay_and_budget_used():
    """A window that helps only some layers is given to those layers; the budget is met, and
    not wasted by more than one bit step of one head."""
    L, H, d = 6, 3, 64
    r0 = _fake_result(L, H, 0, seed=3)
    r16 = _fake_result(L, H, 16, seed=3)
    for (li, h, w, b), c in r0.cost.items():  # layers 0-2: the window removes 95% of the loss
        r16.cost[(li, h, w, b)] = c * (0.05 if li < 3 else 0.99)
    for budget in (2.6, 3.2, 4.0):
        a = allocate_per_layer([r0, r16], L, H, d, budget)
        wins = [[0, 16][i] for i in a.choice]
        assert wins[:3] == [16, 16, 16] and wins[3:] == [0, 0, 0], (budget, wins)
        bpe = _model_bits(a.choice, a.bits, [r0, r16], L, H, d)
        assert budget - 6.0 / (L * H * 2) <= bpe <= budget + 1e-12
    with pytest.raises(CalibrationError, match="below the smallest format"):
        allocate_per_layer([r0, r16], L, H, d, 2.15)  # the smallest (w0, 1 sink) is 2.172


def test_layer_bytes_is_the_format_accounting():
    lf = LayerFormat(64, (3, 8, 2), (2, 4, 2), sink_tokens=2, recent_tokens=16)
    n = layer_bytes(64, (3, 8, 2), (2, 4, 2), 2, 16)
    assert n == pytest.approx(lf.bytes_per_token(1024, tables=True) * 1024)
    # codes + one-byte scales per token, fp16 sinks and ring per sequence, tables once (with the
    # two one-byte scale exponents per head)
    codes = (3 + 8 + 2 + 2 + 4 + 2) * 64 // 8 + 6 * 1
    assert n == 1024 * codes + 3 * (2 + 16) * 2 * 64 * 2 + 3 * (8 * 64 + 4 + 2)


@pytest.fixture(scope="module")
def calibrated():
    torch.manual_seed(0)
    model = tiny_llama(layers=3)
    res0 = run_calibration(model, _ids(2, 96, seed=7), sinks=1, recent=0, queries=48)
    return model, [res0, with_window(res0, 4), with_window(res0, 16)]


@pytest.mark.parametrize("budget", [2.45, 2.8, 3.2, 4.0])
def test_per_layer_table_meets_budget_and_beats_every_fixed_window(calibrated, budget):
    model, results = calibrated
    ident = model_identity(model, "tiny")
    t = build_table_per_layer_window(results, ident, budget, calibration_info={"x": 1})
    assert t.bits_per_element() <= budget + 1e-12
    est = t.calibration["estimated_delta_nll"]
    for r in results:  # every fixed-window table is one of the per-layer choices
        try:
            fixed = build_table(r, ident, budget, sinks=1, calibration_info={})
        except CalibrationError:
            continue
        assert est <= fixed.calibration["estimated_delta_nll"] + 1e-6
    ws = t.calibration["recent_tokens"]
    assert ws == [lf.recent_tokens for lf in t.format.layers]
    # each layer's clip factors come from the estimate of its own window
    for li, lf in enumerate(t.format.layers):
        r = next(x for x in results if x.recent == lf.recent_tokens)
        assert list(t.tables[li].k_clip) == [r.clip[(li, h, "k", b)]
                                             for h, b in enumerate(lf.k_bits)]


def _with_windows(t, windows, sinks):
    layers = [LayerFormat(lf.head_dim, lf.k_bits, lf.v_bits, sink_tokens=s, recent_tokens=w)
              for lf, w, s in zip(t.format.layers, windows, sinks)]
    return ScaleTable(t.identity, ModelFormat(tuple(layers)), t.tables, {"test": True})


def _prefill_and_chunks(model, table, ids, chunks):
    from turboquant_trt.cache import TurboQuantCache

    with torch.no_grad():
        full = model(ids, cache=TurboQuantCache(table), use_cache=True).logits
        cache = TurboQuantCache(table)
        steps = [model(ids[:, :chunks[0][0]], cache=cache, use_cache=True).logits]
        for a, b in chunks:
            steps.append(model(ids[:, a:b], cache=cache, use_cache=True).logits)
    return full, torch.cat(steps, 1)


def test_mixed_windows_round_trip_and_cache(tmp_path, calibrated):
    """A table whose layers keep different windows and sinks: saved and loaded unchanged, each
    cache layer keeps its own ring (stored bytes = the format's bytes), prefill equals chunked
    decoding, and a one-shot prefill with a window-less layer equals plain attention there."""
    from turboquant_trt.cache import TurboQuantCache, use_turboquant_attention

    model, _ = calibrated
    base = random_table(model, sinks=1)
    t = _with_windows(base, (2, 5, 3), (1, 0, 3))
    t.save(str(tmp_path / "mixed"))
    man = json.load(open(tmp_path / "mixed.json"))
    assert man["recent_tokens"] == 5
    assert man["bits_per_element"] == pytest.approx(t.bits_per_element(), abs=1e-6)
    back = ScaleTable.load(str(tmp_path / "mixed"), t.identity)
    assert [lf.recent_tokens for lf in back.format.layers] == [2, 5, 3]
    assert [lf.sink_tokens for lf in back.format.layers] == [1, 0, 3]
    ids = _ids(2, 30)
    use_turboquant_attention(model)
    try:
        with torch.no_grad():
            cache = TurboQuantCache(back)
            model(ids, cache=cache, use_cache=True)
        assert [layer.recent for layer in cache.layers] == [2, 5, 3]
        T, H, d = 30, back.identity.num_kv_heads, back.identity.head_dim
        for layer, lf in zip(cache.layers, back.format.layers):
            codes = 2 * T * sum(lf.head_bytes(h) for h in range(H))  # batch of 2
            ring = 2 * H * (lf.sink_tokens + lf.recent_tokens) * 2 * d * 2
            assert layer.stored_bytes() == codes + ring
        full, steps = _prefill_and_chunks(model, back, ids, ((7, 8), (8, 19), (19, 30)))
        torch.testing.assert_close(steps, full, rtol=1e-4, atol=1e-4)
        # the windows are really read: without them the logits differ
        none = _prefill_and_chunks(model, _with_windows(base, (0, 0, 0), (1, 0, 3)), ids,
                                   ((7, 30),))[0]
        assert (none - full).abs().max() > 1e-3
        # one-shot prefill (what `turboquant eval` runs): window-less layers under the window
        # attention read plain causal attention, and a window in one layer changes the result
        zero = _with_windows(base, (0, 0, 0), (1, 0, 3))
        with torch.no_grad():
            a = model(ids, cache=TurboQuantCache(zero), use_cache=True).logits
            got = model(ids, cache=TurboQuantCache(_with_windows(base, (0, 5, 0), (1, 0, 3))),
                        use_cache=True).logits
    finally:
        model.set_attn_implementation("sdpa")
    with torch.no_grad():
        b = model(ids, cache=TurboQuantCache(zero), use_cache=True).logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert (got - b).abs().max() > 1e-3


def test_window_less_layer_in_chunked_prefill_with_window_attention(calibrated):
    from turboquant_trt.cache import use_turboquant_attention

    model, _ = calibrated
    t = _with_windows(random_table(model, sinks=1), (0, 5, 2), (1, 1, 1))
    use_turboquant_attention(model)
    try:
        full, steps = _prefill_and_chunks(model, t, _ids(2, 30), ((7, 19), (19, 30)))
    finally:
        model.set_attn_implementation("sdpa")
    torch.testing.assert_close(steps, full, rtol=1e-3, atol=1e-3)


def test_cli_per_layer_windows_then_eval(tmp_path):
    from click.testing import CliRunner

    from test_cache import save_tiny_model_dir
    from turboquant_trt.cli import cli

    model = save_tiny_model_dir(str(tmp_path / "model"))
    text = tmp_path / "text.txt"
    text.write_bytes(("The quick brown fox jumps over the lazy dog; pack my box with five "
                      "dozen liquor jugs.\r\n" * 10).encode())

    def run(args):
        r = CliRunner().invoke(cli, args, catch_exceptions=False)
        return r.exit_code, r.output

    code, out = run(["calibrate", "--model", model, "--data", str(text), "--windows", "2",
                     "--ctx", "64", "--bits", "3.2,2.27", "--recent", "0,4,8",
                     "--window-choice", "both", "--queries", "32", "--out", str(tmp_path / "t")])
    assert code == 0, out
    for w in (0, 4, 8):
        assert os.path.exists(tmp_path / f"t-w{w}-b3.20.json")
    assert not os.path.exists(tmp_path / "t-w8-b2.27.json")  # below that window's minimum (2.30)
    for b in ("3.20", "2.27"):
        man = json.load(open(tmp_path / f"t-wlayer-b{b}.json"))
        ws = [lf["recent_tokens"] for lf in man["format"]["layers"]]
        assert man["calibration"]["recent_tokens"] == ws and set(ws) <= {0, 4, 8}
        assert man["bits_per_element"] <= float(b) + 1e-9
        assert "per layer" in man["calibration"]["window_choice"]
    fixed = [json.load(open(tmp_path / f"t-w{w}-b3.20.json"))["calibration"]
             ["estimated_delta_nll"] for w in (0, 4, 8)]
    joint = json.load(open(tmp_path / "t-wlayer-b3.20.json"))["calibration"]["estimated_delta_nll"]
    assert joint <= min(fixed) + 1e-6
    # per-layer only: NAME for one budget
    code, out = run(["calibrate", "--model", model, "--data", str(text), "--windows", "1",
                     "--ctx", "64", "--bits", "3.0", "--recent", "0,4",
                     "--window-choice", "per-layer", "--queries", "16",
                     "--out", str(tmp_path / "one")])
    assert code == 0, out
    assert os.path.exists(tmp_path / "one.json") and os.path.exists(tmp_path / "one.safetensors")
    code, out = run(["eval", "--model", model, "--data", str(text), "--tokens", "128", "--ctx",
                     "64", "--table", str(tmp_path / "t-wlayer-b3.20"), "--baselines", "none",
                     "--json", str(tmp_path / "r.json"), "--plot", str(tmp_path / "r.png")])
    assert code == 0, out
    rows = {r["method"]: r for r in json.load(open(tmp_path / "r.json"))["results"]}
    row = rows["t-wlayer-b3.20"]
    man = json.load(open(tmp_path / "t-wlayer-b3.20.json"))
    assert row["bits_per_element"] == pytest.approx(man["bits_per_element"], abs=1e-4)
    ws = [lf["recent_tokens"] for lf in man["format"]["layers"]]
    if len(set(ws)) > 1:
        assert "recent windows per layer" in row["description"]
    assert np.isfinite(row["ppl"])


def test_cli_default_window_is_16_where_the_budget_fits(tmp_path):
    """--recent auto (the default): 16 tokens, 8 or none when the budget cannot hold them."""
    from click.testing import CliRunner

    from test_cache import save_tiny_model_dir
    from turboquant_trt.cli import cli

    model = save_tiny_model_dir(str(tmp_path / "model"))
    text = tmp_path / "text.txt"
    text.write_bytes(("Sphinx of black quartz, judge my vow.\n" * 12).encode())
    r = CliRunner().invoke(cli, ["calibrate", "--model", model, "--data", str(text), "--windows",
                                 "1", "--ctx", "64", "--bits", "3.2,2.35,2.25", "--queries", "16",
                                 "--out", str(tmp_path / "a")], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    # smallest formats with one sink: 2.42 bits with 16 tokens, 2.30 with 8, 2.17 without
    for b, w in (("3.20", 16), ("2.35", 8), ("2.25", 0)):
        man = json.load(open(tmp_path / f"a-b{b}.json"))
        assert [lf["recent_tokens"] for lf in man["format"]["layers"]] == [w, w], b
        assert man["bits_per_element"] <= float(b) + 1e-9
