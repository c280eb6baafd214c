"""Llama, Qwen2, Mistral and Gemma: capture, calibration and the packed cache on tiny random models."""

from __future__ import annotations

import json
import os

import pytest
import torch

from turboquant_trt.cache import TurboQuantCache
from turboquant_trt.calibrate import build_table, run_calibration
from turboquant_trt.model_loading import ModelError, load_model, model_identity

from test_cache import sharpen


def _tiny(family: str):
    import transformers as tf

    common = dict(vocab_size=64, hidden_size=256, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                  max_position_embeddings=256)
    cls = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
           "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
           "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
           "gemma": (tf.GemmaConfig, tf.GemmaForCausalLM)}[family]
    torch.manual_seed(0)
    return sharpen(cls[1](cls[0](**common)))


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gemma"])
def test_family_calibrates_and_runs_packed(family):
    m = _tiny(family)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (1, 48), generator=g)
    res = run_calibration(m, ids, sinks=1, recent=0, queries=16)
    assert len(res.samples) == 2 and res.samples[0].k.shape == (1, 2, 48, 64)
    ident = model_identity(m, family)
    assert ident.model_type == family and ident.num_kv_heads == 2
    table = build_table(res, ident, 3.5, sinks=1, recent=0, calibration_info={})
    with torch.no_grad():
        exact = m(ids, use_cache=False).logits
        full = m(ids, cache=TurboQuantCache(table), use_cache=True).logits
        cache = TurboQuantCache(table)
        inc = torch.cat([m(ids[:, :20], cache=cache, use_cache=True).logits]
                        + [m(ids[:, t:t + 1], cache=cache, use_cache=True).logits
                           for t in range(20, 48)], dim=1)
    torch.testing.assert_close(inc, full, rtol=1e-4, atol=1e-4)
    assert 0 < (full - exact).abs().max() < exact.abs().max()


def test_unsupported_architecture_is_refused(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_head=2, n_embd=64).save_pretrained(tmp_path)
    with pytest.raises(ModelError, match="unsupported architecture 'gpt2'"):
        load_model(str(tmp_path))
    os.remove(tmp_path / "config.json")
    with pytest.raises(ModelError, match="not a Hugging Face model directory"):
        load_model(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"})[:-3])
    with pytest.raises(ModelError, match="cannot read the model config"):
        load_model(str(tmp_path))
