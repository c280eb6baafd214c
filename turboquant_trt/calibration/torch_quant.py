"""The format's transform and `turbo` quantizer in torch (fast fake quantization).

Same arithmetic as :mod:`turboquant_trt.reference` (docs/format.md §2, §3.1) on torch tensors of
shape [batch, heads, tokens, head_dim], without packing bytes. The rotation is a matrix product
instead of the butterfly, so results can differ from the reference in the last fp32 bit (and then
rarely in a code at a decision boundary); tests bound the difference. Calibration searches and
quick experiments use it; the packed cache (:mod:`turboquant_trt.cache`) uses the reference.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch

from ..format import LayerFormat
from ..reference import LayerTables, codebook, codebook_boundaries

FP16_MAX = 65504.0


@lru_cache(maxsize=None)
def _hadamard_np(d: int) -> np.ndarray:
    h = np.array([[1.0]])
    while h.shape[0] < d:
        h = np.block([[h, h], [h, -h]])
    return (h / math.sqrt(d)).astype(np.float32)


def hadamard_matrix(d: int, device=None) -> torch.Tensor:
    """Normalized Sylvester-Hadamard matrix (symmetric, orthogonal) [d, d] fp32."""
    return torch.from_numpy(_hadamard_np(d)).to(device)


def fp16_round(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(min=-FP16_MAX, max=FP16_MAX).half().float()


class TorchTurbo:
    """One layer's transform + turbo fake quantization, heads in dim 1 of [B, H, T, d]."""

    def __init__(self, fmt: LayerFormat, tables: LayerTables, device=None):
        if fmt.kind != "turbo":
            raise ValueError("TorchTurbo implements kind 'turbo' only")
        self.fmt = fmt
        d = fmt.head_dim
        dev = device
        t = tables
        f = lambda a: torch.as_tensor(np.asarray(a, np.float32), device=dev)  # noqa: E731
        self.k_mean, self.k_smooth = f(t.k_mean)[None, :, None], f(t.k_smooth)[None, :, None]
        self.v_mean, self.v_smooth = f(t.v_mean)[None, :, None], f(t.v_smooth)[None, :, None]
        self.k_clip, self.v_clip = f(t.k_clip), f(t.v_clip)
        self.rot = f(t.signs)[:, None] * hadamard_matrix(d, dev)  # x @ rot = R(x)
        self.d = d

    def transform(self, x: torch.Tensor, which: str) -> torch.Tensor:
        mean, smooth = (self.k_mean, self.k_smooth) if which == "k" else (self.v_mean, self.v_smooth)
        return ((x.float() - mean) / smooth) @ self.rot

    def untransform(self, y: torch.Tensor, which: str) -> torch.Tensor:
        mean, smooth = (self.k_mean, self.k_smooth) if which == "k" else (self.v_mean, self.v_smooth)
        return (y @ self.rot.T) * smooth + mean

    def quantize_transformed(self, y: torch.Tensor, which: str, start: int = 0) -> torch.Tensor:
        """Dequantized transformed-domain y [B, H, T, d]; positions start..start+T-1."""
        bits = self.fmt.k_bits if which == "k" else self.fmt.v_bits
        clip = self.k_clip if which == "k" else self.v_clip
        out = torch.empty_like(y)
        for h, b in enumerate(bits):
            out[:, h] = turbo_fake_quant(y[:, h], b, float(clip[h]), self.fmt.norm_correction)
        ns = self.fmt.sink_tokens - start
        if ns > 0:
            out[:, :, :ns] = fp16_round(y[:, :, :ns])
        return out

    def fake_quant(self, x: torch.Tensor, which: str, start: int = 0) -> torch.Tensor:
        y = self.transform(x, which)
        return self.untransform(self.quantize_transformed(y, which, start), which).to(x.dtype)


@lru_cache(maxsize=None)
def _codebook(bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.from_numpy(codebook(bits)), torch.from_numpy(codebook_boundaries(bits)))


def turbo_fake_quant(y: torch.Tensor, bits: int, clip: float | torch.Tensor = 1.0,
                     norm_correction: bool = True) -> torch.Tensor:
    """docs/format.md §3.1 on vectors y [..., d] (fp32): quantize and dequantize."""
    cb, beta = _codebook(bits)
    cb, beta = cb.to(y.device), beta.to(y.device)
    d = y.shape[-1]
    n = torch.sqrt((y * y).sum(-1))
    f = torch.where(n > 0, math.sqrt(d) / (clip * n), torch.zeros_like(n))
    u = y * f[..., None]
    codes = torch.bucketize(u, beta, right=False)
    c = cb[codes]
    if norm_correction:
        scale = n / torch.sqrt((c * c).sum(-1))
    else:
        scale = clip * n / math.sqrt(d)
    scale = fp16_round(torch.nan_to_num(scale, nan=0.0))
    return scale[..., None] * c
