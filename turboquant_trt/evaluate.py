"""Perplexity with quantized KV caches over non-overlapping windows.

Each window is a fresh sequence (position 0 = its first token). The window is run in one batched
forward through a cache that quantizes on write, so every query attends to the stored (quantized)
keys and values of itself and all earlier tokens, as in token-by-token decoding. The loss of
window tokens 1..ctx-1 is averaged over all windows; deltas are reported against the unmodified
model (fp32 compute, KV not modified) with a paired standard error over windows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

CacheFactory = Callable[[], object]


@dataclass
class PplResult:
    nll_per_window: list[float]   # mean NLL of each window
    tokens_per_window: int

    @property
    def nll(self) -> float:
        return sum(self.nll_per_window) / len(self.nll_per_window)

    @property
    def ppl(self) -> float:
        return math.exp(self.nll)

    def delta_pct(self, ref: "PplResult") -> tuple[float, float]:
        """(delta %, paired standard error %) of this perplexity vs `ref` over the same windows."""
        d = [a - b for a, b in zip(self.nll_per_window, ref.nll_per_window)]
        n = len(d)
        mean = sum(d) / n
        var = sum((x - mean) ** 2 for x in d) / max(n - 1, 1)
        se = math.sqrt(var / n)
        pct = (math.exp(self.nll - ref.nll) - 1) * 100
        return pct, se * 100 * math.exp(self.nll - ref.nll)


@torch.no_grad()
def window_nll(model, ids: torch.Tensor, cache_factory: CacheFactory | None,
               batch_size: int = 4, progress=None) -> PplResult:
    """Mean next-token NLL of each window of `ids` [n, ctx] through a fresh cache per batch."""
    out: list[float] = []
    dev = next(model.parameters()).device
    for i in range(0, ids.shape[0], batch_size):
        x = ids[i:i + batch_size].to(dev)
        if cache_factory is None:
            logits = model(x, use_cache=False).logits
        else:
            logits = model(x, cache=cache_factory(), use_cache=True).logits
        lp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        nll = -lp.gather(-1, x[:, 1:, None]).squeeze(-1)
        out.extend(nll.mean(dim=1).tolist())
        if progress is not None:
            progress(x.shape[0])
    return PplResult(out, ids.shape[1] - 1)


@dataclass
class EvalEntry:
    """One row of an evaluation: how to build its cache and what it costs."""

    label: str
    kind: str                 # "reference", "baseline", "table", "preset"
    bits: float
    cache_factory: CacheFactory | None
    recent_tokens: int = 0
    description: str = ""


def run_entries(model, ids: torch.Tensor, entries: list[EvalEntry], *, batch_size: int = 4,
                progress_factory=None) -> list[dict]:
    """Evaluate every entry on the same windows; the first must be the reference (no cache)."""
    from .cache import use_turboquant_attention

    rows = []
    ref = None
    orig_attn = model.config._attn_implementation
    for e in entries:
        bar = progress_factory(ids.shape[0], e.label) if progress_factory else None
        try:
            if e.recent_tokens:
                use_turboquant_attention(model)
            else:
                model.set_attn_implementation(orig_attn) if model.config._attn_implementation != orig_attn else None
            r = window_nll(model, ids, e.cache_factory, batch_size,
                           progress=(bar.update if bar is not None else None))
        finally:
            if bar is not None:
                bar.close()
            if model.config._attn_implementation != orig_attn:
                model.set_attn_implementation(orig_attn)
        if ref is None:
            ref = r
        pct, se = r.delta_pct(ref)
        rows.append({
            "method": e.label, "kind": e.kind, "bits_per_element": round(e.bits, 4),
            "compression": round(16.0 / e.bits, 3), "ppl": round(r.ppl, 4),
            "delta_pct": round(pct, 3), "delta_se_pct": round(se, 3),
            "recent_tokens": e.recent_tokens, "description": e.description,
            "nll_per_window": [round(x, 6) for x in r.nll_per_window],
        })
    return rows
