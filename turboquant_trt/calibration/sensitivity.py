"""Measured sensitivity: the loss change that quantizing one KV head's K or V would cause.

For a layer and KV head, the attention output of its query heads is recomputed on calibration
windows with that head's keys (or values) quantized as the format would store them, everything
else exact. The change `δ` of the attention output is weighted by the gradient `g` of the
next-token loss with respect to that output (captured in the calibration pass); the estimated
loss increase is the Fisher quadratic form `½ Σ_t (g_t · δ_t)²` summed over query tokens,
reported per predicted token (nats). Errors of different heads are treated as independent, so
the model's estimated loss change is the sum over heads: this is what the bit allocation
minimizes under the bit budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..format import DEFAULT_SCALE_EXP
from ..reference import rotation_signs, scale_exp_for_max
from .stats import LayerSample
from .torch_quant import fp16_round, hadamard_matrix, turbo_fake_quant, turbo_scale_torch


def choose_scale_exp(y: torch.Tensor, bits: int, clip: float, sinks: int = 0,
                     norm_correction: bool = True) -> int:
    """The exponent E of one KV head's K or V from its transformed vectors y [N, T, d] quantized
    at `bits` and `clip`: :func:`scale_exp_for_max` of the largest scale of the positions that
    are read from codes (the first `sinks` positions are read in fp16)."""
    _, scale = turbo_scale_torch(y[:, sinks:], bits, clip, norm_correction)
    finite = scale[torch.isfinite(scale)]
    return scale_exp_for_max(float(finite.max()) if finite.numel() else 0.0)


@dataclass
class HeadTensors:
    q: torch.Tensor      # [N, g, P, d] sampled queries of the group (post-RoPE, original domain)
    qpos: torch.Tensor   # [P] positions of the sampled queries
    k: torch.Tensor      # [N, T, d]
    v: torch.Tensor      # [N, T, d]
    g: torch.Tensor      # [N, g, P, d] loss gradient at the attention output of sampled queries
    a: torch.Tensor      # [N, g, P, T] exact attention weights
    o: torch.Tensor      # [N, g, P, d] exact attention output
    mask: torch.Tensor   # [P, T] bool, True where key is visible
    recent: torch.Tensor  # [P, T] bool, True where the key is in the query's exact recent window
    logits: torch.Tensor  # [N, g, P, T] exact logits (masked)
    scaling: float
    tokens: int          # predicted tokens the sample stands for (N * (T - 1))
    sample_frac: float   # P / T


def head_tensors(s: LayerSample, h: int, queries: int = 256, seed: int = 0,
                 recent: int = 0) -> HeadTensors:
    """Sampled queries of KV head `h`; `recent` keys before each query (itself included) are
    read exact, as with a recent-token window."""
    N, Hq, T, d = s.q.shape
    g = s.group
    gen = torch.Generator().manual_seed(seed)
    P = min(queries, T)
    pos = torch.sort(torch.randperm(T, generator=gen)[:P]).values
    q = s.q[:, h * g:(h + 1) * g][:, :, pos]
    gr = s.g[:, h * g:(h + 1) * g][:, :, pos]
    k, v = s.k[:, h], s.v[:, h]
    mask = torch.arange(T)[None, :] <= pos[:, None]
    logits = torch.einsum("ngpd,ntd->ngpt", q, k) * s.scaling
    logits = logits.masked_fill(~mask, float("-inf"))
    a = torch.softmax(logits, dim=-1)
    o = torch.einsum("ngpt,ntd->ngpd", a, v)
    dist = pos[:, None] - torch.arange(T)[None, :]
    rec = (dist >= 0) & (dist < recent)
    return HeadTensors(q, pos, k, v, gr, a, o, mask, rec, logits, s.scaling, N * (T - 1), P / T)


def fisher_cost(ht: HeadTensors, delta: torch.Tensor) -> float:
    """½ Σ (g·δ)² over sampled queries, scaled to all queries, per predicted token (nats)."""
    dots = (ht.g * delta).sum(dim=(1, 3))  # [N, P]: one query token, all heads of the group
    return float(0.5 * (dots ** 2).sum() / ht.sample_frac / ht.tokens)


class HeadQuantizer:
    """Transform + turbo quantization of one KV head's K or V (torch, [N, T, d])."""

    def __init__(self, mean: torch.Tensor, smooth: torch.Tensor, layer: int, d: int):
        self.mean, self.smooth = mean.float(), smooth.float()
        signs = torch.from_numpy(rotation_signs(d, layer))
        self.rot = signs[:, None] * hadamard_matrix(d)

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        return ((x - self.mean) / self.smooth) @ self.rot

    def untransform(self, y: torch.Tensor) -> torch.Tensor:
        return (y @ self.rot.T) * self.smooth + self.mean

    def fake_quant(self, x: torch.Tensor, bits: int, clip: float, sinks: int,
                   norm_correction: bool = True, y: torch.Tensor | None = None,
                   scale_exp: int = DEFAULT_SCALE_EXP) -> torch.Tensor:
        y = self.transform(x) if y is None else y
        yq = turbo_fake_quant(y, bits, clip, norm_correction, scale_exp)
        if sinks:
            yq[:, :sinks] = fp16_round(y[:, :sinks])
        return self.untransform(yq)


def k_delta(ht: HeadTensors, k_hat: torch.Tensor) -> torch.Tensor:
    logits = torch.einsum("ngpd,ntd->ngpt", ht.q, k_hat) * ht.scaling
    logits = torch.where(ht.recent, ht.logits, logits).masked_fill(~ht.mask, float("-inf"))
    o2 = torch.einsum("ngpt,ntd->ngpd", torch.softmax(logits, dim=-1), ht.v)
    return o2 - ht.o


def v_delta(ht: HeadTensors, v_hat: torch.Tensor) -> torch.Tensor:
    a = ht.a.masked_fill(ht.recent, 0.0) if bool(ht.recent.any()) else ht.a
    return torch.einsum("ngpt,ntd->ngpd", a, v_hat - ht.v)


def cost_k(ht: HeadTensors, hq: HeadQuantizer, bits: int, clip: float, sinks: int,
           norm_correction: bool = True, y: torch.Tensor | None = None,
           scale_exp: int = DEFAULT_SCALE_EXP) -> float:
    return fisher_cost(ht, k_delta(ht, hq.fake_quant(ht.k, bits, clip, sinks, norm_correction, y,
                                                     scale_exp)))


def cost_v(ht: HeadTensors, hq: HeadQuantizer, bits: int, clip: float, sinks: int,
           norm_correction: bool = True, y: torch.Tensor | None = None,
           scale_exp: int = DEFAULT_SCALE_EXP) -> float:
    return fisher_cost(ht, v_delta(ht, hq.fake_quant(ht.v, bits, clip, sinks, norm_correction, y,
                                                     scale_exp)))


def pct_from_nats(nats: float) -> float:
    return (math.exp(nats) - 1) * 100
