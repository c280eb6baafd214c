"""Python binding of the CUDA kernels (libturboquant.so, plugin_src/capi) for torch tensors.

The one place that loads the shared library. Search order: $TURBOQUANT_LIB, turboquant_trt/lib/,
build/cmake/ in the source tree. Every call is asynchronous on torch's current stream; nothing
here synchronizes.

    from turboquant_trt.kernels import KernelLayer, quantize_kv, decode_attention
    layer = KernelLayer.allocate(fmt, num_blocks=..., tokens_per_block=64, num_slots=B, device="cuda")
    quantize_kv(layer, k, v, block_table, seq_lens)            # one new token per sequence
    out = decode_attention(layer, q, block_table, seq_lens, max_seq_len)
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional

from .format import FORMAT_VERSION, LayerFormat

MAX_KV_HEADS = 128
_CAPI_VERSION = 4  # TQ_CAPI_VERSION of plugin_src/include/turboquant/capi.h
_ROOT = Path(__file__).resolve().parent
_BUILD_HINT = ("build it with build_scripts/build_cuda.sh (needs nvcc and cmake), or reinstall with "
               "nvcc on PATH (pip install -e .), or point TURBOQUANT_LIB at libturboquant.so")


class KernelError(RuntimeError):
    """A kernel launch failed or the library is missing; the message says what to do."""


def _candidates() -> list[Path]:
    c = []
    env = os.environ.get("TURBOQUANT_LIB")
    if env:
        c.append(Path(env))
    c.append(_ROOT / "lib" / "libturboquant.so")
    c.append(_ROOT.parent / "build" / "cmake" / "libturboquant.so")
    return c


class _LayerC(ctypes.Structure):
    _fields_ = [
        ("head_dim", ctypes.c_int32), ("num_kv_heads", ctypes.c_int32),
        ("tokens_per_block", ctypes.c_int32), ("sink_tokens", ctypes.c_int32),
        ("norm_correction", ctypes.c_int32), ("recent_tokens", ctypes.c_int32),
        ("k_bits", ctypes.c_int32 * MAX_KV_HEADS), ("v_bits", ctypes.c_int32 * MAX_KV_HEADS),
        ("k_scale_exp", ctypes.c_int32 * MAX_KV_HEADS), ("v_scale_exp", ctypes.c_int32 * MAX_KV_HEADS),
        ("pool", ctypes.c_void_p), ("block_stride", ctypes.c_int64), ("layer_offset", ctypes.c_int64),
        ("block_table", ctypes.c_void_p), ("max_blocks_per_seq", ctypes.c_int32),
        ("sink_pool", ctypes.c_void_p), ("seq_slot", ctypes.c_void_p), ("recent_pool", ctypes.c_void_p),
        ("k_mean", ctypes.c_void_p), ("k_smooth", ctypes.c_void_p), ("v_mean", ctypes.c_void_p),
        ("v_smooth", ctypes.c_void_p), ("k_clip", ctypes.c_void_p), ("v_clip", ctypes.c_void_p),
        ("signs", ctypes.c_void_p),
    ]


@lru_cache(maxsize=1)
def library() -> ctypes.CDLL:
    """The loaded libturboquant.so (cached). Raises KernelError with build instructions if absent."""
    tried = []
    for path in _candidates():
        tried.append(str(path))
        if path.is_file():
            try:
                lib = ctypes.CDLL(str(path))
            except OSError as e:
                raise KernelError(f"{path} could not be loaded ({e}); {_BUILD_HINT}") from None
            _declare(lib)
            if lib.tq_capi_version() != _CAPI_VERSION or lib.tq_layer_struct_size() != ctypes.sizeof(_LayerC):
                raise KernelError(f"{path} does not match this Python package (C API version or "
                                  f"struct size differ); rebuild it: {_BUILD_HINT}")
            version = _format_version(lib)
            if version != FORMAT_VERSION:
                got = f"KV format version {version}" if version else "an older KV format (it does not say which)"
                raise KernelError(f"{path} reads and writes {got}, this package format version "
                                  f"{FORMAT_VERSION}; rebuild it: {_BUILD_HINT}")
            return lib
    raise KernelError(f"libturboquant.so not built (looked in {', '.join(tried)}); {_BUILD_HINT}")


def _format_version(lib: ctypes.CDLL) -> int:
    """The library's format version (0 for libraries from before tq_format_version existed)."""
    try:
        fn = lib.tq_format_version
    except AttributeError:
        return 0
    fn.restype = ctypes.c_int32
    fn.argtypes = []
    return int(fn())


def available() -> bool:
    try:
        library()
        return True
    except KernelError:
        return False


def _declare(lib: ctypes.CDLL) -> None:
    i32, i64, vp, f32, sz = ctypes.c_int32, ctypes.c_int64, ctypes.c_void_p, ctypes.c_float, ctypes.c_size_t
    lp = ctypes.POINTER(_LayerC)
    sig = {
        "tq_capi_version": (i32, []),
        "tq_layer_struct_size": (sz, []),
        "tq_last_error": (ctypes.c_char_p, []),
        "tq_error_string": (ctypes.c_char_p, [i32]),
        "tq_is_supported": (i32, [i32, i32, i32, i32, i32]),
        "tq_block_layout": (i32, [lp, vp, vp]),
        "tq_quantize_kv": (i32, [lp, vp, vp, i64, i64, vp, vp, i32, i32, i32, vp, i32, vp]),
        "tq_dequantize_kv": (i32, [lp, vp, i32, i32, vp, vp, vp]),
        "tq_decode_num_splits": (i32, [i32, i32, i32, i32, i32, i32]),
        "tq_decode_workspace_bytes": (sz, [i32, i32, i32, i32, i32, i32]),
        "tq_decode_finish_counters": (i32, [i32, i32, i32]),
        "tq_decode_attention": (i32, [lp, vp, i64, vp, i64, vp, i32, i32, i32, f32, i32, i32, vp, sz, vp,
                                      vp, i64, vp, i64, vp]),
        "tq_context_workspace_bytes": (sz, [i32, i32, i32, i32, i32, i32, i32]),
        "tq_context_attention": (i32, [lp, vp, i64, vp, i64, vp, i64, vp, i64, vp, vp, i32, i32, i32,
                                       i32, i32, f32, i32, i32, vp, sz, vp]),
    }
    for name, (res, args) in sig.items():
        fn = getattr(lib, name)
        fn.restype = res
        fn.argtypes = args


def _check(rc: int, what: str) -> None:
    if rc != 0:
        lib = library()
        msg = lib.tq_last_error().decode() or lib.tq_error_string(rc).decode()
        raise KernelError(f"{what} failed: {msg}")


def is_supported(kind: str, rotation: bool, head_dim: int, k_bits: int, v_bits: int) -> bool:
    """The kernels' single supported list (plugin_src/include/turboquant/kernel_support.h)."""
    return bool(library().tq_is_supported(0 if kind == "turbo" else 1, int(rotation), head_dim,
                                          k_bits, v_bits))


def _ptr(t) -> int:
    return 0 if t is None else int(t.data_ptr())


def _stream() -> int:
    import torch
    return int(torch.cuda.current_stream().cuda_stream)


def _act(dtype) -> int:
    import torch
    if dtype == torch.float16:
        return 0
    if dtype == torch.bfloat16:
        return 1
    raise KernelError(f"activations must be float16 or bfloat16, got {dtype}")


@dataclass
class KernelLayer:
    """One layer's paged pool on the GPU plus its tables (all torch tensors)."""

    fmt: LayerFormat
    tokens_per_block: int
    pool: "object"                 # uint8 [num_blocks, block_stride]
    sink_pool: "object"            # fp16 [num_slots, H, 2, max(n_s,1), d]
    signs: "object"                # fp16 [d]
    recent_pool: Optional[object] = None  # fp16 [num_slots, H, 2, max(w,1), d] (docs/format.md §5.2)
    k_mean: Optional[object] = None     # fp16 [H, d]
    k_smooth: Optional[object] = None
    v_mean: Optional[object] = None
    v_smooth: Optional[object] = None
    k_clip: Optional[object] = None     # fp16 [H]
    v_clip: Optional[object] = None
    layer_offset: int = 0

    @classmethod
    def allocate(cls, fmt: LayerFormat, num_blocks: int, tokens_per_block: int, num_slots: int,
                 tables=None, device="cuda", fill: int = 0xA5) -> "KernelLayer":
        """A pool of ``num_blocks`` blocks filled with ``fill``, an fp16 sink pool and an fp16
        recent-token ring (both NaN)."""
        import torch
        lay = fmt.block_layout(tokens_per_block)
        pool = torch.full((num_blocks, lay.block_bytes), fill, dtype=torch.uint8, device=device)
        ns = max(fmt.sink_tokens, 1)
        sink = torch.full((num_slots, fmt.kv_heads, 2, ns, fmt.head_dim), float("nan"),
                          dtype=torch.float16, device=device)
        if tables is None:
            from .reference import LayerTables
            tables = LayerTables.identity(fmt.kv_heads, fmt.head_dim)

        def h(x):
            return torch.as_tensor(x).to(device=device, dtype=torch.float16).contiguous()

        ring = torch.full((num_slots, fmt.kv_heads, 2, max(fmt.recent_tokens, 1), fmt.head_dim),
                          float("nan"), dtype=torch.float16, device=device)
        return cls(fmt, tokens_per_block, pool, sink, h(tables.signs), ring, h(tables.k_mean),
                   h(tables.k_smooth), h(tables.v_mean), h(tables.v_smooth), h(tables.k_clip),
                   h(tables.v_clip))

    def c_struct(self, block_table, seq_slot) -> _LayerC:
        fmt = self.fmt
        if fmt.kind != "turbo" or not fmt.rotation:
            raise KernelError("the kernels implement kind 'turbo' with rotation only")
        s = _LayerC()
        s.head_dim = fmt.head_dim
        s.num_kv_heads = fmt.kv_heads
        s.tokens_per_block = self.tokens_per_block
        s.sink_tokens = fmt.sink_tokens
        s.norm_correction = int(fmt.norm_correction)
        s.recent_tokens = fmt.recent_tokens
        for h in range(fmt.kv_heads):
            s.k_bits[h] = fmt.k_bits[h]
            s.v_bits[h] = fmt.v_bits[h]
            s.k_scale_exp[h] = fmt.k_scale_exp[h]
            s.v_scale_exp[h] = fmt.v_scale_exp[h]
        s.pool = _ptr(self.pool)
        s.block_stride = int(self.pool.stride(0))
        s.layer_offset = int(self.layer_offset)
        s.block_table = _ptr(block_table)
        s.max_blocks_per_seq = int(block_table.shape[1])
        s.sink_pool = _ptr(self.sink_pool)
        s.seq_slot = _ptr(seq_slot)
        s.recent_pool = _ptr(self.recent_pool)
        for name in ("k_mean", "k_smooth", "v_mean", "v_smooth", "k_clip", "v_clip", "signs"):
            setattr(s, name, _ptr(getattr(self, name)))
        return s


def block_layout(fmt: LayerFormat, tokens_per_block: int) -> tuple[list[list[int]], int]:
    """The C++ block layout: ([k_codes, v_codes, k_meta, v_meta] offsets per head, block_bytes)."""
    s = _LayerC()
    s.head_dim, s.num_kv_heads, s.tokens_per_block = fmt.head_dim, fmt.kv_heads, tokens_per_block
    for h in range(fmt.kv_heads):
        s.k_bits[h], s.v_bits[h] = fmt.k_bits[h], fmt.v_bits[h]
    offs = (ctypes.c_int32 * (4 * fmt.kv_heads))()
    bb = ctypes.c_int32()
    _check(library().tq_block_layout(ctypes.byref(s), ctypes.addressof(offs), ctypes.addressof(bb)),
           "tq_block_layout")
    h = fmt.kv_heads
    return [list(offs[i * h:(i + 1) * h]) for i in range(4)], bb.value


def _i32(t, device):
    import torch
    return torch.as_tensor(t, dtype=torch.int32, device=device).contiguous()


def quantize_kv(layer: KernelLayer, k, v, block_table, seq_lens, seq_slot=None, cu_q_lens=None,
                max_q_len: int = 1, zero_words=None) -> None:
    """Write new tokens: k, v [tokens, H, d] fp16/bf16 (rows packed per sequence by cu_q_lens;
    without it, one token per sequence). seq_lens: lengths after the write. zero_words (decode
    writes only): an int32 tensor of batch * n words that the kernel sets to 0, such as the finish
    counters of a decode that follows, when they live in memory that other work reuses."""
    dev = k.device
    bt, sl = _i32(block_table, dev), _i32(seq_lens, dev)
    slot = _i32(seq_slot if seq_slot is not None else range(sl.shape[0]), dev)
    cu = _i32(cu_q_lens, dev) if cu_q_lens is not None else None
    per_seq = 0
    if zero_words is not None:
        import torch
        if zero_words.dtype != torch.int32 or zero_words.device != dev or not zero_words.is_contiguous():
            raise KernelError(f"zero_words: a contiguous int32 tensor on {dev} expected")
        if zero_words.numel() % max(sl.shape[0], 1):
            raise KernelError(f"zero_words: {zero_words.numel()} words are not a multiple of the batch "
                              f"({sl.shape[0]})")
        per_seq = zero_words.numel() // max(sl.shape[0], 1)
    s = layer.c_struct(bt, slot)
    _check(library().tq_quantize_kv(ctypes.byref(s), _ptr(k), _ptr(v), k.stride(0), v.stride(0),
                                    _ptr(cu), _ptr(sl), sl.shape[0], max_q_len, _act(k.dtype),
                                    _ptr(zero_words), per_seq, _stream()), "quantize_kv")


def dequantize_kv(layer: KernelLayer, block_table, seq_lens, max_seq_len: int, seq_slot=None):
    """The cache as fp16 in the transformed domain: (k, v) [batch, H, max_seq_len, d]."""
    import torch
    dev = layer.pool.device
    bt, sl = _i32(block_table, dev), _i32(seq_lens, dev)
    slot = _i32(seq_slot if seq_slot is not None else range(sl.shape[0]), dev)
    fmt = layer.fmt
    shape = (sl.shape[0], fmt.kv_heads, max_seq_len, fmt.head_dim)
    ko = torch.full(shape, float("nan"), dtype=torch.float16, device=dev)
    vo = torch.full(shape, float("nan"), dtype=torch.float16, device=dev)
    s = layer.c_struct(bt, slot)
    _check(library().tq_dequantize_kv(ctypes.byref(s), _ptr(sl), sl.shape[0], max_seq_len,
                                      _ptr(ko), _ptr(vo), _stream()), "dequantize_kv")
    return ko, vo


_BUFFERS: dict = {}  # name -> the module's one device buffer of that name (grown, never shrunk)


def _module_buffer(name: str, n: int, dtype, device, minimum: int):
    """At least n elements of the module's buffer `name` on `device`, zero-filled when (re)allocated.
    One per process: calls on two streams at once must not share them."""
    import torch
    b = _BUFFERS.get(name)
    if b is None or b.numel() < n or b.device != device:
        _BUFFERS[name] = b = torch.zeros(max(n, minimum), dtype=dtype, device=device)
    return b


def _workspace(nbytes: int, device):
    import torch
    return None if nbytes == 0 else _module_buffer("workspace", nbytes, torch.uint8, device, 1 << 20)


def _finish_counters(n: int, device):
    """The decode finish counters, n int32 words, zero between calls (every call leaves them so)."""
    import torch
    return _module_buffer("finish_counters", n, torch.int32, device, 4096)


def decode_attention(layer: KernelLayer, q, block_table, seq_lens, max_seq_len: int, seq_slot=None,
                     softmax_scale: float = 0.0, out=None, num_sms: int = 0, finish: str = "counters",
                     finish_counters=None, k=None, v=None):
    """One query per sequence: q [batch, Hq, d] -> out [batch, Hq, d] (same dtype).

    finish: "counters" (the last CTA of each row combines the partials; finish_counters, an int32
    tensor of tq_decode_finish_counters() zeros, or a buffer kept by this module) or "kernel" (a
    reduce kernel after the split kernel).
    k, v [batch, H, d] (both or neither): each sequence's new token, written into the pool at
    position seq_lens[b] - 1 before the attention reads it, with the bytes quantize_kv writes (with
    up to 8 query heads per KV head the decode kernel writes it itself, else a write kernel runs
    first)."""
    import torch
    if finish not in ("counters", "kernel"):
        raise KernelError(f"finish={finish!r}: expected 'counters' or 'kernel'")
    if (k is None) != (v is None):
        raise KernelError("k and v go together: pass both (the decode writes the new tokens) or neither")
    dev = q.device
    bt, sl = _i32(block_table, dev), _i32(seq_lens, dev)
    slot = _i32(seq_slot if seq_slot is not None else range(sl.shape[0]), dev)
    b, hq, d = q.shape
    if out is None:
        out = torch.empty_like(q)
    lib = library()
    fmt = layer.fmt
    nbytes = lib.tq_decode_workspace_bytes(b, hq, fmt.kv_heads, d, max_seq_len, num_sms)
    ws = _workspace(nbytes, dev)
    counters = None
    if finish == "counters":
        n = lib.tq_decode_finish_counters(b, hq, fmt.kv_heads)
        counters = finish_counters if finish_counters is not None else _finish_counters(n, dev)
        if (counters.numel() < n or counters.dtype != torch.int32 or counters.device != dev
                or not counters.is_contiguous()):
            raise KernelError(f"finish_counters: {n} contiguous int32 words on {dev} needed")
    if k is not None:
        for name, x in (("k", k), ("v", v)):
            if (tuple(x.shape) != (b, fmt.kv_heads, d) or x.dtype != q.dtype or x.device != dev
                    or x.stride(2) != 1 or x.stride(1) != d):
                raise KernelError(f"{name}: a [{b}, {fmt.kv_heads}, {d}] {q.dtype} tensor on {dev} with dense "
                                  f"rows expected (got {list(x.shape)} {x.dtype} on {x.device})")
    s = layer.c_struct(bt, slot)
    _check(lib.tq_decode_attention(ctypes.byref(s), _ptr(q), q.stride(0), _ptr(out), out.stride(0),
                                   _ptr(sl), b, hq, max_seq_len, softmax_scale, _act(q.dtype), num_sms,
                                   _ptr(ws), 0 if ws is None else ws.numel(), _ptr(counters), _ptr(k), 0 if k is None else k.stride(0), _ptr(v),
                                   0 if v is None else v.stride(0), _stream()),
           "decode_attention")
    return out


def context_attention(layer: KernelLayer, q, k, v, block_table, q_lens, seq_lens, max_q_len: int,
                      max_seq_len: int, seq_slot=None, write_kv: bool = True,
                      softmax_scale: float = 0.0, out=None):
    """Causal attention of new tokens q [total, Hq, d] (rows packed per sequence) over the cache
    [0, position]; writes k, v [total, H, d] into the pool first when write_kv. With a recent-token
    window (fmt.recent_tokens > 0) write_kv must be True: each query reads its last w positions in
    fp16, and the ring is updated after the attention."""
    import torch
    if layer.fmt.recent_tokens and not write_kv:
        raise KernelError(f"recent_tokens={layer.fmt.recent_tokens}: with a recent-token window "
                          "context attention must write the new tokens itself (write_kv=True): it "
                          "reads their fp16 copies before they enter the ring")
    dev = q.device
    bt, ql, sl = _i32(block_table, dev), _i32(q_lens, dev), _i32(seq_lens, dev)
    slot = _i32(seq_slot if seq_slot is not None else range(sl.shape[0]), dev)
    total, hq, d = q.shape
    if out is None:
        out = torch.empty_like(q)
    lib = library()
    fmt = layer.fmt
    nbytes = lib.tq_context_workspace_bytes(sl.shape[0], hq, fmt.kv_heads, d, total, max_seq_len,
                                            fmt.recent_tokens)
    ws = _workspace(nbytes, dev)
    s = layer.c_struct(bt, slot)
    _check(lib.tq_context_attention(ctypes.byref(s), _ptr(q), q.stride(0), _ptr(k),
                                    k.stride(0) if k is not None else 0, _ptr(v),
                                    v.stride(0) if v is not None else 0, _ptr(out), out.stride(0),
                                    _ptr(ql), _ptr(sl), sl.shape[0], hq, total, max_q_len,
                                    max_seq_len, softmax_scale, _act(q.dtype), int(write_kv),
                                    _ptr(ws), ws.numel(), _stream()), "context_attention")
    return out


__all__ = ["KernelError", "KernelLayer", "available", "block_layout", "context_attention",
           "decode_attention", "dequantize_kv", "is_supported", "library", "quantize_kv"]
