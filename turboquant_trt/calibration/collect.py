"""Statistics collection: post-RoPE queries, keys, values and attention-output gradients.

A capturing attention function is registered with transformers' `AttentionInterface`; it runs
the model's normal attention and records, per layer, the query, key and value tensors exactly as
attention consumes them (keys after RoPE, before any cache), and the attention output (before
the output projection) with its gradient. The gradient of the next-token loss with respect to the
attention output is what turns a K/V error into an estimated loss change (Fisher weighting).
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

CAPTURE_NAME = "turboquant_capture"
_ACTIVE: "Recorder | None" = None
_ORIG_IMPL: dict[int, str] = {}


@dataclass
class Recorder:
    keep_grads: bool = True
    q: dict = field(default_factory=dict)    # layer -> [B, Hq, T, d]
    k: dict = field(default_factory=dict)    # layer -> [B, H, T, d]
    v: dict = field(default_factory=dict)
    out: dict = field(default_factory=dict)  # layer -> [B, T, Hq, d] (graph tensor, grad retained)

    def clear(self) -> None:
        self.q.clear(), self.k.clear(), self.v.clear(), self.out.clear()


def _capture_attention(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    impl = _ORIG_IMPL.get(id(module.config), "sdpa")
    if impl == "eager" or kwargs.get("softcap") is not None:
        fn = sys.modules[type(module).__module__].eager_attention_forward
    else:
        fn = sdpa_attention_forward
    out, w = fn(module, query, key, value, attention_mask, **kwargs)
    rec = _ACTIVE
    if rec is not None:
        li = module.layer_idx
        rec.q[li] = query.detach()
        rec.k[li] = key.detach()
        rec.v[li] = value.detach()
        if rec.keep_grads and out.requires_grad:
            out.retain_grad()
            rec.out[li] = out
    return out, w


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(CAPTURE_NAME, _capture_attention)


@contextmanager
def capturing(model, recorder: Recorder):
    """Run `model` with the capturing attention; restores the original implementation after."""
    global _ACTIVE
    _register()
    cfg = model.config
    orig = cfg._attn_implementation
    _ORIG_IMPL[id(cfg)] = orig
    model.set_attn_implementation(CAPTURE_NAME)
    _ACTIVE = recorder
    try:
        yield recorder
    finally:
        _ACTIVE = None
        model.set_attn_implementation(orig)


def forward_backward(model, ids: torch.Tensor, recorder: Recorder) -> float:
    """One window [B, T]: forward with capture, sum next-token NLL, backward. Returns mean NLL.

    Parameters do not need gradients: the embedding output is made to require grad so that the
    graph reaches every attention output.
    """
    recorder.clear()
    emb = model.get_input_embeddings()

    def _req(_m, _inp, out):
        return out.requires_grad_(True)

    h = emb.register_forward_hook(_req) if recorder.keep_grads else None
    try:
        with capturing(model, recorder), torch.set_grad_enabled(recorder.keep_grads):
            logits = model(ids, use_cache=False).logits
            lp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            nll = -lp.gather(-1, ids[:, 1:, None]).squeeze(-1)
            loss = nll.sum()
            if recorder.keep_grads:
                loss.backward()
    finally:
        if h is not None:
            h.remove()
    return float(nll.detach().mean())
