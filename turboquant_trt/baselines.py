"""KV-cache quantizers users would otherwise pick, for comparison in `turboquant eval`.

Each baseline is a quantize-dequantize function on post-RoPE K and V [B, H, T, d], applied
through :class:`turboquant_trt.cache.FakeQuantCache`, with its effective bits per element
counting every metadata byte. They follow the definitions used for the project's anchor
measurements (shared anchors, accuracy_smollm2.md):

- `fp8`: TensorRT-LLM FP8 KV, e4m3 with one scale per layer for K and one for V,
  scale = amax / 448 over the window (an oracle per-window scale; TensorRT-LLM calibrates it
  offline). 8 bits.
- `int8`: TensorRT-LLM INT8 KV, symmetric per tensor, scale = amax / 127 per window. 8 bits.
- `int4`: LMDeploy-style int4, asymmetric per token and head (min/max over head_dim), fp16 scale
  and zero. 4 + 32/d bits.
- `kivi2` / `kivi4`: KIVI-style, keys per channel in groups of 32 tokens, values per token in
  groups of 32 channels, asymmetric, fp16 scale and zero, no full-precision residual (key groups
  use the statistics of later tokens of their group, which real KIVI would hold in its residual).
  b + 1 bits.

The per-window scales and KIVI's token groups need the whole window at once: these baselines are
for batched perplexity, not token-by-token generation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

FP16_MAX = 65504.0


def _fp16(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(-FP16_MAX, FP16_MAX).half().float()


def fp8_per_tensor(x: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    amax = xf.abs().amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12)
    scale = amax / 448.0
    return ((xf / scale).to(torch.float8_e4m3fn).float() * scale).to(x.dtype)


def int8_per_tensor(x: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    amax = xf.abs().amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12)
    scale = amax / 127.0
    return (torch.clamp(torch.round(xf / scale), -127, 127) * scale).to(x.dtype)


def asym_groups(x: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Asymmetric min/max quantization with fp16 scale and zero over `dim` (already grouped)."""
    xf = x.float()
    mn = xf.amin(dim=dim, keepdim=True)
    mx = xf.amax(dim=dim, keepdim=True)
    scale = _fp16((mx - mn) / (2 ** bits - 1))
    zero = _fp16(mn)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round((xf - zero) / safe), 0, 2 ** bits - 1)
    q = torch.where(scale > 0, q, torch.zeros_like(q))
    return (zero + scale * q).to(x.dtype)


def int4_per_token_head(x: torch.Tensor) -> torch.Tensor:
    return asym_groups(x, 4, dim=-1)


def kivi_keys(x: torch.Tensor, bits: int, group: int = 32) -> torch.Tensor:
    """Per channel over groups of `group` consecutive tokens (last group may be shorter)."""
    B, H, T, d = x.shape
    out = torch.empty_like(x)
    for s in range(0, T, group):
        out[:, :, s:s + group] = asym_groups(x[:, :, s:s + group], bits, dim=2)
    return out


def kivi_values(x: torch.Tensor, bits: int, group: int = 32) -> torch.Tensor:
    B, H, T, d = x.shape
    g = group if d % group == 0 else d
    xg = x.reshape(B, H, T, d // g, g)
    return asym_groups(xg, bits, dim=-1).reshape(B, H, T, d)


@dataclass(frozen=True)
class Baseline:
    name: str
    description: str
    bits: Callable[[int], float]   # head_dim -> bits/element incl. metadata
    fn: Callable[[torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]


BASELINES: dict[str, Baseline] = {
    "fp16": Baseline("fp16", "fp16 KV storage (K, V cast to fp16)", lambda d: 16.0,
                     lambda k, v, s: (k.half().to(k.dtype), v.half().to(v.dtype))),
    "fp8": Baseline("fp8", "TRT-LLM FP8 KV (e4m3, per-tensor scale per window)", lambda d: 8.0,
                    lambda k, v, s: (fp8_per_tensor(k), fp8_per_tensor(v))),
    "int8": Baseline("int8", "TRT-LLM INT8 KV (symmetric, per-tensor scale per window)",
                     lambda d: 8.0, lambda k, v, s: (int8_per_tensor(k), int8_per_tensor(v))),
    "int4": Baseline("int4", "LMDeploy-style int4 (asymmetric per token-head, fp16 scale+zero)",
                     lambda d: 4.0 + 32.0 / d,
                     lambda k, v, s: (int4_per_token_head(k), int4_per_token_head(v))),
    "kivi4": Baseline("kivi4", "KIVI-style 4-bit (K per-channel/32 tokens, V per-token/32 ch)",
                      lambda d: 5.0, lambda k, v, s: (kivi_keys(k, 4), kivi_values(v, 4))),
    "kivi2": Baseline("kivi2", "KIVI-style 2-bit (K per-channel/32 tokens, V per-token/32 ch)",
                      lambda d: 3.0, lambda k, v, s: (kivi_keys(k, 2), kivi_values(v, 2))),
}
DEFAULT_BASELINES = ("fp8", "int8", "int4", "kivi2")
