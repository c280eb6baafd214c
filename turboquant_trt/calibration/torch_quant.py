"""The format's transform and `turbo` quantizer in torch (fast fake quantization).

Same arithmetic as :mod:`turboquant_trt.reference` (docs/format.md §2, §3.1) on torch tensors of
shape [batch, heads, tokens, head_dim], without packing bytes. The rotation is a matrix product
instead of the butterfly, so results can differ from the reference in the last fp32 bit (and then
rarely in a code at a decision boundary, or in a one-byte scale at a step boundary); tests bound
the difference. The one-byte scale (docs/format.md §3.1) is encoded and decoded exactly as the
reference does. Calibration searches and
quick experiments use it; the packed cache (:mod:`turboquant_trt.cache`) uses the reference.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch

from ..format import DEFAULT_SCALE_EXP, SCALE8_STEPS, LayerFormat
from ..reference import (
    TURBO8_TOP,
    LayerTables,
    codebook,
    codebook_boundaries,
    scale8_decode,
    scale8_tables,
)

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
        exps = self.fmt.k_scale_exp if which == "k" else self.fmt.v_scale_exp
        out = torch.empty_like(y)
        for h, b in enumerate(bits):
            out[:, h] = turbo_fake_quant(y[:, h], b, float(clip[h]), self.fmt.norm_correction,
                                         exps[h])
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


@lru_cache(maxsize=None)
def _scale8_mid() -> torch.Tensor:
    return torch.from_numpy(scale8_tables()[1])


@lru_cache(maxsize=None)
def _scale8_values(exp: int) -> torch.Tensor:
    """dec(k, E) for k = 0..255 (fp32 [256], exactly the reference's values)."""
    return torch.from_numpy(scale8_decode(np.arange(256), exp))


def scale8_encode_torch(scale: torch.Tensor, exp: int) -> torch.Tensor:
    """enc(s, E) of docs/format.md §3.1 on fp32 scales (int64 codes 0..255, same shape)."""
    s = scale.float()
    m, e = torch.frexp(s)                  # s = m * 2^e, 0.5 <= m < 1 (exact, subnormals too)
    m = m * 2.0
    e = e.long() - 1                       # now 1 <= m < 2
    c = (m[..., None] >= _scale8_mid().to(s.device)).sum(-1)
    k = 1 + torch.clamp(SCALE8_STEPS * (e - int(exp)) + c, 0, 254)
    k = torch.where(s > 0, k, torch.zeros_like(k))
    return torch.where(torch.isposinf(s), torch.full_like(k, 255), k)


def scale8_round(scale: torch.Tensor, exp: int) -> torch.Tensor:
    """dec(enc(s, E), E): the scale as the one-byte format stores it (fp32)."""
    return _scale8_values(int(exp)).to(scale.device)[scale8_encode_torch(scale, exp)]


def turbo_scale_torch(y: torch.Tensor, bits: int, clip: float | torch.Tensor = 1.0,
                      norm_correction: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """docs/format.md §3.1 up to the fp32 scale: y [..., d] -> (codebook values [..., d],
    scale [...] before its one-byte rounding). At 8 bits the scale is max |y_i| / c[255] and the
    codes are taken against it."""
    cb, beta = _codebook(bits)
    cb, beta = cb.to(y.device), beta.to(y.device)
    d = y.shape[-1]
    if bits == 8:
        scale = _turbo8_scale(y)
        return _codes_against(y, scale, cb, beta), scale
    n = torch.sqrt((y * y).sum(-1))
    f = torch.where(n > 0, math.sqrt(d) / (clip * n), torch.zeros_like(n))
    u = y * f[..., None]
    codes = torch.bucketize(u, beta, right=False)
    c = cb[codes]
    if norm_correction:
        scale = n / torch.sqrt((c * c).sum(-1))
    else:
        scale = clip * n / math.sqrt(d)
    return c, torch.nan_to_num(scale, nan=0.0)


def turbo_fake_quant(y: torch.Tensor, bits: int, clip: float | torch.Tensor = 1.0,
                     norm_correction: bool = True,
                     scale_exp: int = DEFAULT_SCALE_EXP) -> torch.Tensor:
    """docs/format.md §3.1 on vectors y [..., d] (fp32): quantize (codes and the one-byte scale
    with exponent ``scale_exp``; at 8 bits the absmax scale rounded up and the codes against it)
    and dequantize."""
    if bits != 8:
        c, scale = turbo_scale_torch(y, bits, clip, norm_correction)
        return scale8_round(scale, scale_exp)[..., None] * c
    # 8 bits: the absmax scale rounded up on the grid, the codes only against it (§3.1)
    scale = _turbo8_scale(y)
    vals = _scale8_values(int(scale_exp)).to(y.device)
    k = scale8_encode_torch(scale, scale_exp)
    k = torch.where((vals[k] < scale) & (k > 0) & (k < 255), k + 1, k)
    s = vals[k]
    cb, beta = _codebook(8)
    return s[..., None] * _codes_against(y, s, cb.to(y.device), beta.to(y.device))


def _turbo8_scale(y: torch.Tensor) -> torch.Tensor:
    """max |y_i| / c[255], the 8-bit scale before its one-byte rounding (docs/format.md §3.1)."""
    return y.abs().amax(-1) / float(TURBO8_TOP)


def _codes_against(y: torch.Tensor, s: torch.Tensor, cb: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """8-bit codebook values of y against the scale s: s > 0 ? c[#{j : y_i / s > beta_j}] : 0."""
    pos = (s > 0)[..., None]
    u = y / torch.where(pos, s[..., None], torch.ones_like(s[..., None]))
    return torch.where(pos, cb[torch.bucketize(u, beta, right=False)], torch.zeros_like(y))
