"""Hugging Face `Cache` implementations that store K/V quantized.

`TurboQuantCache` keeps every layer's keys and values as the packed bytes of docs/format.md,
written by the reference quantizer (:mod:`turboquant_trt.reference`), plus the fp16 sink copies
and the fp16 recent-token ring in the transformed domain. On every update the new tokens are
transformed, quantized and packed, and attention gets the whole layer as the format reads it
(decoded codes, sinks, and the ring for the last `w` positions), mapped back to the original
domain (mean and smoothing restored, rotation undone). Attention over the decoded keys equals the
kernel's attention in the transformed domain up to a per-query constant on the logits, which
softmax ignores (docs/format.md §2). A batched prefill and token-by-token decoding store the same
bytes, because the quantizer works on each token vector alone and sinks are chosen by position.

Recent-token window (docs/format.md §5.2): a query at position p reads positions p-w+1..p from
fp16 copies. The returned keys already hold the fp16 values for the last `w` positions, which is
exactly right for the last query of an update (all of decoding). When an update adds several
tokens, earlier queries of it need fp16 copies of positions that the returned keys hold
quantized; the layer attaches those copies to the returned key tensor (attribute
`turboquant_window`, a :class:`RecentWindow`) and the `turboquant` attention function
(:func:`use_turboquant_attention`) reads them. The copies travel with the tensor, so nothing is
shared between threads or models.

`FakeQuantCache` is the same container around any per-layer quantize-dequantize function; the
baselines (:mod:`turboquant_trt.baselines`) and the fast torch path of the format
(:class:`turboquant_trt.calibration.torch_quant.TorchTurbo`) use it.

The GPU kernels will plug in behind the same interface (a layer that writes the paged pool).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .reference import EncodedKV, LayerQuantizer

ATTENTION_NAME = "turboquant"
WINDOW_ATTR = "turboquant_window"


@dataclass
class RecentWindow:
    """What the queries of one update need beyond the returned keys/values.

    The update added positions `length - new .. length - 1`. The returned keys/values hold fp16
    copies at positions `>= length - w`; `keys`/`values` [B, H, E, d] are the fp16 copies of
    positions `start .. length - w - 1` (E = max(0, length - w - start)), which some query of the
    update reads exact while the returned tensors hold them quantized.
    """

    keys: torch.Tensor
    values: torch.Tensor
    start: int
    length: int
    new: int
    w: int
    consumed: bool = False


class WindowNotReadError(RuntimeError):
    """A multi-token update's window copies were never read by the attention function."""


class _QuantLayerBase(CacheLayerMixin):
    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, layer_idx: int = 0, recent: int = 0) -> None:
        super().__init__()
        self.length = 0
        self.layer_idx = layer_idx
        self.recent = int(recent)
        self._last_window: RecentWindow | None = None

    def _check_window_read(self) -> None:
        lw = self._last_window
        if lw is not None and not lw.consumed and lw.keys.shape[-2] > 0:
            raise WindowNotReadError(
                f"layer {self.layer_idx}: the recent-token window of the previous multi-token "
                "update was not read; run the model with use_turboquant_attention(model)")

    def _attach(self, keys: torch.Tensor, ek: torch.Tensor, ev: torch.Tensor, start: int,
                new: int) -> torch.Tensor:
        win = RecentWindow(ek, ev, start, self.length, new, self.recent)
        setattr(keys, WINDOW_ATTR, win)
        self._last_window = win
        return keys

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
    """One layer stored as packed codes + one-byte scales, fp16 sinks and the fp16 recent-token
    ring (docs/format.md §5), per batch row and KV head."""

    def __init__(self, quantizer: LayerQuantizer, layer_idx: int = 0) -> None:
        super().__init__(layer_idx, quantizer.fmt.recent_tokens)
        self.q = quantizer
        self.reset_storage()

    def reset_storage(self) -> None:
        self.k_codes: list[np.ndarray] | None = None  # per head: uint8 [B, L, code_bytes]
        self.v_codes: list[np.ndarray] | None = None
        self.k_meta: list[np.ndarray] | None = None   # per head: uint8 [B, L, meta_bytes]
        self.v_meta: list[np.ndarray] | None = None
        self.sinks: np.ndarray | None = None          # fp16 [B, H, 2, n_s, d] transformed domain
        self.ring: np.ndarray | None = None           # fp16 [B, H, 2, w, d]: position p at p % w
        self.length = 0
        self._last_window = None

    def reset(self) -> None:
        self.reset_storage()
        self.is_initialized = False

    def stored_bytes(self) -> int:
        """Bytes held: packed codes and scales of every stored token plus the fp16 sink copies
        and the fp16 recent-token ring."""
        if self.k_codes is None:
            return 0
        n = sum(a.nbytes for arrs in (self.k_codes, self.v_codes, self.k_meta, self.v_meta)
                for a in arrs)
        return n + sum(a.nbytes for a in (self.sinks, self.ring) if a is not None)

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
        """All stored tokens as a query at the last position reads them, transformed domain:
        [B, L, H, d] fp32 (codes dequantized; sinks and the recent ring in fp16)."""
        codes, meta = getattr(self, f"{which}_codes"), getattr(self, f"{which}_meta")
        b, L = codes[0].shape[:2]
        enc = EncodedKV([c.reshape(b * L, -1) for c in codes], [m.reshape(b * L, -1) for m in meta])
        y = self.q.decode_transformed(enc, which).reshape(b, L, self.q.fmt.kv_heads, -1)
        idx = 0 if which == "k" else 1
        ns = min(self.q.fmt.sink_tokens, L)
        if ns:
            y[:, :ns] = self.sinks[:, :, idx, :ns].transpose(0, 2, 1, 3).astype(np.float32)
        w = self.recent
        if w:
            pos = np.arange(max(0, L - w), L)
            y[:, pos] = self.ring[:, :, idx, pos % w].transpose(0, 2, 1, 3).astype(np.float32)
        return y

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._check_window_read()
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
        # fp16 copies in the transformed domain, [B, t, H, 2, d] (K, V)
        y16 = np.stack([yk, yv], axis=2).astype(np.float16).reshape(b, t, h, 2, d)
        l0, ns, w = self.length, fmt.sink_tokens, self.recent
        if ns:
            if self.sinks is None:
                self.sinks = np.zeros((b, h, 2, ns, d), np.float16)
            hi = min(l0 + t, ns)
            if hi > l0:
                self.sinks[:, :, :, l0:hi] = y16[:, : hi - l0].transpose(0, 2, 3, 1, 4)
        self.length = length = l0 + t
        exact = None
        if w:
            if self.ring is None:
                self.ring = np.full((b, h, 2, w, d), np.nan, np.float16)
            # positions some query of this update reads exact but the returned tensors hold
            # quantized: read the old ones from the ring before it is overwritten
            e0, e1 = max(0, l0 - w + 1), max(0, length - w)
            e1 = max(e0, e1)
            old = np.arange(e0, min(e1, l0))
            parts = [self.ring[:, :, :, old % w].transpose(0, 3, 1, 2, 4)] if old.size else []
            if e1 > max(e0, l0):
                parts.append(y16[:, max(e0, l0) - l0: e1 - l0])
            exact = (np.concatenate(parts, axis=1) if parts
                     else np.zeros((b, 0, h, 2, d), np.float16)).astype(np.float32), e0
            pos = np.arange(max(l0, length - w), length)
            self.ring[:, :, :, pos % w] = y16[:, pos - l0].transpose(0, 2, 3, 1, 4)
        keys = self.q.untransform(self._decode("k"), "k")      # [B, L, H, d]
        values = self.q.untransform(self._decode("v"), "v")
        to = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 2, 1, 3))).to(  # noqa: E731
            device=self.device, dtype=self.dtype)
        keys_t = to(keys)
        if exact is not None:
            ex, e0 = exact
            ek = self.q.untransform(ex[:, :, :, 0], "k") if ex.shape[1] else ex[:, :, :, 0]
            ev = self.q.untransform(ex[:, :, :, 1], "v") if ex.shape[1] else ex[:, :, :, 1]
            self._attach(keys_t, to(ek), to(ev), e0, t)
        return keys_t, to(values)


QuantizeFn = Callable[[torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]
ExactFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class FakeQuantLayer(_QuantLayerBase):
    """A layer that stores the dequantized result of `fn(k, v, start_position)`.

    `fn` sees the new tokens only ([B, H, T, d]) and their first position, so it must be causal
    per token to give the same result in prefill and decoding (per-window baselines such as a
    per-tensor scale over the window are not: they are for batched perplexity only).
    With `recent > 0`, `exact_fn(k, v)` gives the values of the recent-token window (for the
    format: fp16 in the transformed domain, mapped back), applied as in :class:`PackedTurboLayer`.
    """

    def __init__(self, fn: QuantizeFn, layer_idx: int = 0, recent: int = 0,
                 exact_fn: ExactFn | None = None) -> None:
        super().__init__(layer_idx, recent)
        if recent and exact_fn is None:
            raise ValueError("a recent-token window needs exact_fn")
        self.fn = fn
        self.exact_fn = exact_fn
        self.keys = self.values = None
        self.tail_k = self.tail_v = None  # exact copies of the last `recent` positions

    def reset(self) -> None:
        self.keys = self.values = None
        self.tail_k = self.tail_v = None
        self._last_window = None
        self.length = 0
        self.is_initialized = False

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._check_window_read()
        kq, vq = self.fn(key_states, value_states, self.length)
        kq, vq = kq.to(key_states.dtype), vq.to(value_states.dtype)
        if self.keys is None:
            self.keys, self.values = kq, vq
        else:
            self.keys = torch.cat([self.keys, kq], dim=-2)
            self.values = torch.cat([self.values, vq], dim=-2)
        l0, t, w = self.length, key_states.shape[-2], self.recent
        self.length = length = l0 + t
        if not w:
            return self.keys, self.values
        xk, xv = self.exact_fn(key_states, value_states)
        xk, xv = xk.to(key_states.dtype), xv.to(value_states.dtype)
        if self.tail_k is not None:  # positions l0 - tail .. length - 1
            xk, xv = torch.cat([self.tail_k, xk], dim=-2), torch.cat([self.tail_v, xv], dim=-2)
        first = length - xk.shape[-2]
        e0, e1 = max(0, l0 - w + 1), max(0, length - w)
        e1 = max(e0, e1)
        ek, ev = xk[..., e0 - first: e1 - first, :], xv[..., e0 - first: e1 - first, :]
        lo = max(0, length - w)
        keys, values = self.keys.clone(), self.values.clone()
        keys[..., lo:, :] = xk[..., lo - first:, :]
        values[..., lo:, :] = xv[..., lo - first:, :]
        self.tail_k, self.tail_v = xk[..., lo - first:, :], xv[..., lo - first:, :]
        return self._attach(keys, ek, ev, e0, t), values


class TurboQuantCache(Cache):
    """Packed TurboQuant storage for every layer of a model, from a scale table.

    A table with a recent-token window needs the `turboquant` attention function for updates of
    several tokens (prefill): call :func:`use_turboquant_attention` on the model first.
    """

    def __init__(self, table, *, backend: str = "packed"):
        from .calibration.torch_quant import TorchTurbo, fp16_round

        layers: list[CacheLayerMixin] = []
        for li, (lf, lt) in enumerate(zip(table.format.layers, table.tables)):
            if backend == "packed":
                layers.append(PackedTurboLayer(LayerQuantizer(lf, lt, li), li))
            elif backend == "torch":
                tq = TorchTurbo(lf, lt)

                def exact(k, v, tq=tq):
                    return (tq.untransform(fp16_round(tq.transform(k, "k")), "k"),
                            tq.untransform(fp16_round(tq.transform(v, "v")), "v"))

                layers.append(FakeQuantLayer(
                    lambda k, v, s, tq=tq: (tq.fake_quant(k, "k", s), tq.fake_quant(v, "v", s)),
                    li, lf.recent_tokens, exact))
            else:
                raise ValueError(f"unknown cache backend {backend!r}; use 'packed' or 'torch'")
        self.table = table
        self.recent_tokens = table.format.recent_tokens
        super().__init__(layers=layers)

    def stored_bytes(self) -> int:
        return sum(getattr(l, "stored_bytes", lambda: 0)() for l in self.layers)


class FakeQuantCache(Cache):
    """A cache whose layer `i` stores `fns[i](k, v, start)` (dequantized)."""

    def __init__(self, fns: list[QuantizeFn]):
        super().__init__(layers=[FakeQuantLayer(f) for f in fns])


def _visible(attention_mask, q: int, cols: slice) -> torch.Tensor | None:
    """The model's own mask (bool [B or 1, 1, Q, KV] or additive float) for some key columns."""
    if attention_mask is None:
        return None
    m = attention_mask[..., -q:, cols]
    if m.dtype == torch.bool:
        return m
    return m > torch.finfo(m.dtype).min / 2


def turboquant_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                         **kwargs):
    """Attention that reads the recent-token window of docs/format.md §5.2 for every query.

    Query at position p attends to the returned (quantized) keys/values at positions <= p - w,
    to fp16 copies of positions p-w+1..p, and to nothing later. Keys without a window attachment
    (layers without a window) go to SDPA.
    The model's mask (padding) is applied on top; positions are those of the cache (sequences
    of a batch share them).
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    win: RecentWindow | None = getattr(key, WINDOW_ATTR, None)
    if win is None:
        q, kl = query.shape[-2], key.shape[-2]
        if attention_mask is None and 1 < q < kl:
            # transformers gives a custom attention function no mask; SDPA's is_causal would be
            # causal from the top-left corner, wrong for new tokens after cached ones
            qpos = torch.arange(kl - q, kl, device=query.device)[:, None]
            attention_mask = (torch.arange(kl, device=query.device)[None, :] <= qpos)[None, None]
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)
    length, new, w, e0 = win.length, win.new, win.w, win.start
    if query.shape[-2] != new or key.shape[-2] != length:
        raise ValueError(f"recent window for {new} new of {length} tokens, attention got "
                         f"{query.shape[-2]} queries over {key.shape[-2]} keys")
    g = query.shape[1] // key.shape[1]
    kk = torch.cat([key, win.keys.to(key.dtype)], dim=2).repeat_interleave(g, dim=1)
    vv = torch.cat([value, win.values.to(value.dtype)], dim=2).repeat_interleave(g, dim=1)
    dev = query.device
    e1 = e0 + win.keys.shape[-2]
    qpos = torch.arange(length - new, length, device=dev)[:, None]
    jq = torch.arange(length, device=dev)[None, :]
    je = torch.arange(e0, e1, device=dev)[None, :]
    read = (jq <= qpos) & ((jq <= qpos - w) | (jq >= length - w))
    mask = torch.cat([read, (je <= qpos) & (je > qpos - w)], dim=1)[None, None]
    vis = _visible(attention_mask, new, slice(0, length))
    if vis is not None:
        mask = mask & torch.cat([vis, vis[..., e0:e1]], dim=-1)
    out = torch.nn.functional.scaled_dot_product_attention(query, kk, vv, attn_mask=mask,
                                                           scale=scaling)
    win.consumed = True
    return out.transpose(1, 2).contiguous(), None


def use_turboquant_attention(model) -> str:
    """Register the recent-window attention and switch `model` to it; returns the old name."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, turboquant_attention)
    old = model.config._attn_implementation
    if old != ATTENTION_NAME:
        model.set_attn_implementation(ATTENTION_NAME)
    return old
