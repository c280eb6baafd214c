"""Per-layer calibration statistics and the transform tables derived from them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..reference import LayerTables, rotation_signs


@dataclass
class LayerSample:
    """Captured tensors of one layer over the calibration windows (float32, CPU)."""

    q: torch.Tensor   # [N, Hq, T, d] post-RoPE queries
    k: torch.Tensor   # [N, H, T, d] post-RoPE keys
    v: torch.Tensor   # [N, H, T, d]
    g: torch.Tensor | None  # [N, Hq, T, d] d(loss)/d(attention output), or None
    scaling: float

    @property
    def kv_heads(self) -> int:
        return self.k.shape[1]

    @property
    def group(self) -> int:
        return self.q.shape[1] // self.k.shape[1]


def _geo_normalize(s: torch.Tensor) -> torch.Tensor:
    return s / torch.exp(torch.log(s).mean(-1, keepdim=True))


def derive_tables(s: LayerSample, layer: int, *, skip_first: int = 4, smooth_k: bool = True,
                  smooth_v: str = "grad", mean_k: bool = True, mean_v: bool = True,
                  smooth_floor: float = 1e-3) -> LayerTables:
    """Means over positions >= skip_first (the sink-like first tokens are excluded), key
    smoothing s = sqrt(rms(k - mean) / rms(q)) per channel, value smoothing by the gradient
    magnitude at the attention output (`grad`), or none. Smoothing is normalized to geometric
    mean 1 and kept inside fp16 range."""
    k = s.k[:, :, skip_first:]
    v = s.v[:, :, skip_first:]
    H, d = s.kv_heads, s.k.shape[-1]
    g = s.group
    k_mean = k.mean(dim=(0, 2)) if mean_k else torch.zeros(H, d)
    v_mean = v.mean(dim=(0, 2)) if mean_v else torch.zeros(H, d)
    if smooth_k:
        rk = ((k - k_mean[None, :, None]) ** 2).mean(dim=(0, 2)).sqrt()
        q = s.q[:, :, skip_first:]
        rq = (q ** 2).mean(dim=(0, 2)).sqrt().reshape(H, g, d)
        rq = (rq ** 2).mean(1).sqrt()
        ks = torch.sqrt(rk.clamp_min(1e-6) / rq.clamp_min(1e-6))
        ks = _geo_normalize(ks).clamp(smooth_floor, 1 / smooth_floor)
    else:
        ks = torch.ones(H, d)
    if smooth_v == "grad" and s.g is not None:
        rv = ((v - v_mean[None, :, None]) ** 2).mean(dim=(0, 2)).sqrt()
        gg = s.g[:, :, skip_first:]
        rg = (gg ** 2).mean(dim=(0, 2)).reshape(H, g, d).mean(1).sqrt()
        vs = torch.sqrt(rv.clamp_min(1e-6) / rg.clamp_min(rg.mean() * 1e-3))
        vs = _geo_normalize(vs).clamp(smooth_floor, 1 / smooth_floor)
    elif smooth_v == "rms":
        rv = ((v - v_mean[None, :, None]) ** 2).mean(dim=(0, 2)).sqrt()
        vs = _geo_normalize(torch.sqrt(rv.clamp_min(1e-6))).clamp(smooth_floor, 1 / smooth_floor)
    else:
        vs = torch.ones(H, d)
    return LayerTables(k_mean.numpy(), ks.numpy(), v_mean.numpy(), vs.numpy(),
                       np.ones(H, np.float32), np.ones(H, np.float32), rotation_signs(d, layer))
