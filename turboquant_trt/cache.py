"""Hugging Face `Cache` implementations that store K/V quantized.

`TurboQuantCache` keeps every layer's keys and values as the packed bytes of docs/format.md,
written by the reference quantizer (:mod:`turboquant_trt.reference`), plus the fp16 sink copies
in the transformed domain. On every update the new tokens are transformed, quantized and packed,
and attention gets the whole layer decoded from those bytes (mapped back to the original
domain: mean and smoothing restored, rotation undone). Attention over the decoded keys equals the
kernel's attention in the transformed domain up to a per-query constant on the logits, which
softmax ignores (docs/format.md §2). A batched prefill and token-by-token decoding store the same
bytes, because the quantizer works on each token vector alone and sinks are chosen by position.

`FakeQuantCache` is the same container around any per-layer quantize-dequantize function; the
baselines (:mod:`turboquant_trt.baselines`) and the fast torch path of the format
(:class:`turboquant_trt.calibration.torch_quant.TorchTurbo`) use it.

The GPU kernels will plug in behind the same interface (a layer that writes the paged pool).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .reference import EncodedKV, LayerQuantizer


# Exact recent-token window (experimental, not part of format v1): each layer's update leaves the
# exact copies of the keys/values a query may read unquantized here, keyed by layer index, and
# the `turboquant` attention function consumes them right after, in the same layer.
_PENDING: dict[int, tuple] = {}
ATTENTION_NAME = "turboquant"


class _QuantLayerBase(CacheLayerMixin):
    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, layer_idx: int = 0, recent: int = 0) -> None:
        super().__init__()
        self.length = 0
        self.layer_idx = layer_idx
        self.recent = int(recent)
        self.tail_k = self.tail_v = None  # exact (fp16) copies of the last `recent` tokens

    def _publish_recent(self, exact_k: torch.Tensor, exact_v: torch.Tensor, new: int) -> None:
        """Record exact copies of the new tokens; leave the window for the attention function."""
        if self.recent <= 0:
            return
        if self.tail_k is not None:
            exact_k = torch.cat([self.tail_k, exact_k], dim=-2)
            exact_v = torch.cat([self.tail_v, exact_v], dim=-2)
        e0 = self.length - exact_k.shape[-2]
        _PENDING[self.layer_idx] = (exact_k, exact_v, e0, self.length, new, self.recent)
        keep = min(self.recent, exact_k.shape[-2])
        self.tail_k, self.tail_v = exact_k[..., -keep:, :], exact_v[..., -keep:, :]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.dtype = key_states.dtype
        self.is_initialized = True

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("quantized caches do not support beam search reordering")

    def offload(self):  # nothing on an accelerator to move
        pass

    def prefetch(self):
        pass


class PackedTurboLayer(_QuantLayerBase):
    """One layer stored as packed codes + fp16 scales (+ fp16 sinks), per batch row and KV head."""

    def __init__(self, quantizer: LayerQuantizer, layer_idx: int = 0, recent: int = 0) -> None:
        super().__init__(layer_idx, recent)
        self.q = quantizer
        self.reset_storage()

    def reset_storage(self) -> None:
        fmt = self.q.fmt
        self.k_codes: list[np.ndarray] | None = None  # per head: uint8 [B, L, code_bytes]
        self.v_codes: list[np.ndarray] | None = None
        self.k_meta: list[np.ndarray] | None = None   # per head: uint8 [B, L, meta_bytes]
        self.v_meta: list[np.ndarray] | None = None
        self.sinks: np.ndarray | None = None          # fp16 [B, H, 2, n_s, d] transformed domain
        self.length = 0
        self.tail_k = self.tail_v = None
        self._fmt = fmt

    def reset(self) -> None:
        self.reset_storage()
        self.is_initialized = False

    def stored_bytes(self) -> int:
        """Bytes held: packed codes and scales of every stored token plus the fp16 sink copies."""
        if self.k_codes is None:
            return 0
        n = sum(a.nbytes for arrs in (self.k_codes, self.v_codes, self.k_meta, self.v_meta)
                for a in arrs)
        return n + (self.sinks.nbytes if self.sinks is not None else 0)

    def _append(self, enc: EncodedKV, which: str, batch: int, tokens: int) -> None:
        codes = [c.reshape(batch, tokens, -1) for c in enc.codes]
        meta = [m.reshape(batch, tokens, -1) for m in enc.meta]
        cname, mname = f"{which}_codes", f"{which}_meta"
        old_c, old_m = getattr(self, cname), getattr(self, mname)
        if old_c is None:
            setattr(self, cname, codes)
            setattr(self, mname, meta)
        else:
            setattr(self, cname, [np.concatenate([a, b], axis=1) for a, b in zip(old_c, codes)])
            setattr(self, mname, [np.concatenate([a, b], axis=1) for a, b in zip(old_m, meta)])

    def _decode(self, which: str) -> np.ndarray:
        """All stored tokens, dequantized, transformed domain: [B, L, H, d] fp32."""
        codes, meta = getattr(self, f"{which}_codes"), getattr(self, f"{which}_meta")
        b, L = codes[0].shape[:2]
        enc = EncodedKV([c.reshape(b * L, -1) for c in codes], [m.reshape(b * L, -1) for m in meta])
        y = self.q.decode_transformed(enc, which).reshape(b, L, self.q.fmt.kv_heads, -1)
        ns = min(self.q.fmt.sink_tokens, L)
        if ns:
            idx = 0 if which == "k" else 1
            y[:, :ns] = self.sinks[:, :, idx, :ns].transpose(0, 2, 1, 3).astype(np.float32)
        return y

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        fmt = self.q.fmt
        b, h, t, d = key_states.shape
        if h != fmt.kv_heads or d != fmt.head_dim:
            raise ValueError(f"layer format is for {fmt.kv_heads} KV heads x {fmt.head_dim}, got "
                             f"{h} x {d}")
        if self.k_codes is not None and self.k_codes[0].shape[0] != b:
            raise ValueError(f"batch size changed from {self.k_codes[0].shape[0]} to {b}")
        k = key_states.detach().float().permute(0, 2, 1, 3).reshape(b * t, h, d).cpu().numpy()
        v = value_states.detach().float().permute(0, 2, 1, 3).reshape(b * t, h, d).cpu().numpy()
        yk = self.q.transform(k, "k")
        yv = self.q.transform(v, "v")
        self._append(self.q.encode_transformed(yk, "k"), "k", b, t)
        self._append(self.q.encode_transformed(yv, "v"), "v", b, t)
        ns = fmt.sink_tokens
        if ns:
            if self.sinks is None:
                self.sinks = np.zeros((b, h, 2, ns, d), np.float16)
            lo, hi = self.length, min(self.length + t, ns)
            if hi > lo:
                yk4 = yk.reshape(b, t, h, d)[:, : hi - lo]
                yv4 = yv.reshape(b, t, h, d)[:, : hi - lo]
                self.sinks[:, :, 0, lo:hi] = yk4.transpose(0, 2, 1, 3).astype(np.float16)
                self.sinks[:, :, 1, lo:hi] = yv4.transpose(0, 2, 1, 3).astype(np.float16)
        self.length += t
        keys = self.q.untransform(self._decode("k"), "k")      # [B, L, H, d]
        values = self.q.untransform(self._decode("v"), "v")
        to = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 2, 1, 3))).to(  # noqa: E731
            device=self.device, dtype=self.dtype)
        if self.recent:
            # exact copies: fp16 in the transformed domain, like sink tokens
            ek = self.q.untransform(yk.astype(np.float16).astype(np.float32), "k").reshape(b, t, h, d)
            ev = self.q.untransform(yv.astype(np.float16).astype(np.float32), "v").reshape(b, t, h, d)
            self._publish_recent(to(ek), to(ev), t)
        return to(keys), to(values)


QuantizeFn = Callable[[torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]


class FakeQuantLayer(_QuantLayerBase):
    """A layer that stores the dequantized result of `fn(k, v, start_position)`.

    `fn` sees the new tokens only ([B, H, T, d]) and their first position, so it must be causal
    per token to give the same result in prefill and decoding (per-window baselines such as a
    per-tensor scale over the window are not: they are for batched perplexity only).
    """

    def __init__(self, fn: QuantizeFn, layer_idx: int = 0, recent: int = 0) -> None:
        super().__init__(layer_idx, recent)
        self.fn = fn
        self.keys = self.values = None

    def reset(self) -> None:
        self.keys = self.values = None
        self.tail_k = self.tail_v = None
        self.length = 0
        self.is_initialized = False

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        kq, vq = self.fn(key_states, value_states, self.length)
        kq, vq = kq.to(key_states.dtype), vq.to(value_states.dtype)
        if self.keys is None:
            self.keys, self.values = kq, vq
        else:
            self.keys = torch.cat([self.keys, kq], dim=-2)
            self.values = torch.cat([self.values, vq], dim=-2)
        self.length += key_states.shape[-2]
        if self.recent:
            self._publish_recent(key_states.half().to(key_states.dtype),
                                 value_states.half().to(value_states.dtype), key_states.shape[-2])
        return self.keys, self.values


class TurboQuantCache(Cache):
    """Packed TurboQuant storage for every layer of a model, from a scale table."""

    def __init__(self, table, *, backend: str = "packed"):
        from .calibration.torch_quant import TorchTurbo

        layers: list[CacheLayerMixin] = []
        w = table.recent_tokens
        for li, (lf, lt) in enumerate(zip(table.format.layers, table.tables)):
            if backend == "packed":
                layers.append(PackedTurboLayer(LayerQuantizer(lf, lt, li), li, w))
            elif backend == "torch":
                tq = TorchTurbo(lf, lt)
                layers.append(FakeQuantLayer(
                    lambda k, v, s, tq=tq: (tq.fake_quant(k, "k", s), tq.fake_quant(v, "v", s)),
                    li, w))
            else:
                raise ValueError(f"unknown cache backend {backend!r}; use 'packed' or 'torch'")
        self.table = table
        self.recent_tokens = w
        super().__init__(layers=layers)

    def stored_bytes(self) -> int:
        return sum(getattr(l, "stored_bytes", lambda: 0)() for l in self.layers)


class FakeQuantCache(Cache):
    """A cache whose layer `i` stores `fns[i](k, v, start)` (dequantized)."""

    def __init__(self, fns: list[QuantizeFn]):
        super().__init__(layers=[FakeQuantLayer(f) for f in fns])


def turboquant_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                         **kwargs):
    """Attention that reads a layer's recent-token window exact (see `_PENDING`).

    Query at position p attends to the stored (quantized) keys/values at positions <= p - w and
    to exact copies of positions p-w+1..p. Layers without a pending window fall back to SDPA.
    Sequences in a batch must be unpadded and of equal length.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    pend = _PENDING.pop(getattr(module, "layer_idx", -1), None)
    if pend is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)
    ek, ev, e0, length, new, w = pend
    g = query.shape[1] // key.shape[1]
    kk = torch.cat([key, ek.to(key.dtype)], dim=2).repeat_interleave(g, dim=1)
    vv = torch.cat([value, ev.to(value.dtype)], dim=2).repeat_interleave(g, dim=1)
    dev = query.device
    qpos = torch.arange(length - new, length, device=dev)[:, None]
    jq = torch.arange(length, device=dev)[None, :]
    je = torch.arange(e0, length, device=dev)[None, :]
    mask = torch.cat([jq <= qpos - w, (je <= qpos) & (je > qpos - w)], dim=1)
    out = torch.nn.functional.scaled_dot_product_attention(query, kk, vv, attn_mask=mask,
                                                           scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def use_turboquant_attention(model) -> str:
    """Register the recent-window attention and switch `model` to it; returns the old name."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, turboquant_attention)
    old = model.config._attn_implementation
    if old != ATTENTION_NAME:
        model.set_attn_implementation(ATTENTION_NAME)
    return old
