"""The TurboQuant KV format: per-layer configuration, byte layout and accounting.

This module is the single Python definition of docs/format.md. It holds no arrays: the reference
quantizer that produces the bytes lives in :mod:`turboquant_trt.reference`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

FORMAT_VERSION = 4
# Versions whose formats and scale tables this build reads: version 4 changed only how 8-bit codes
# are written (docs/format.md), so a version 3 table holds the same fields.
READABLE_FORMAT_VERSIONS = (3, 4)
SUPPORTED_BITS = (2, 3, 4, 8)
SUPPORTED_HEAD_DIMS = (64, 128, 256)
SUPPORTED_KINDS = ("turbo", "uniform")
MAX_SINK_TOKENS = 16
MAX_RECENT_TOKENS = 64  # recent-token window w: each sequence's last w tokens kept in fp16 (§5.2)
MAX_TOKENS_PER_BLOCK = 128
TILE_TOKENS = 32  # the pool stores codes in tiles of 32 consecutive token slots (docs/format.md §5)
SUPPORTED_TOKENS_PER_BLOCK = (32, 64, 128)
ALIGN = 16  # every array in a block starts at a multiple of 16 bytes (one 16-byte vector load)
DEFAULT_REF_TOKENS = 1024  # tokens of one sequence that sink copies and tables are spread over
# The one-byte scale of kind 'turbo' (docs/format.md §3.1): a log grid of SCALE8_STEPS steps per
# octave starting at 2^E, with one integer exponent E per layer, KV head and K/V.
SCALE8_STEPS = 16
SCALE_EXP_MIN, SCALE_EXP_MAX = -64, 48
DEFAULT_SCALE_EXP = -10    # E of formats without calibration data: scales 2^-10 .. 2^5.9


class FormatError(ValueError):
    """An invalid format configuration; the message says what is allowed."""


def _align(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


def _check_bits(bits: int, what: str) -> None:
    if bits not in SUPPORTED_BITS:
        raise FormatError(f"{what}={bits} is not supported; allowed bit widths: {SUPPORTED_BITS}")


def code_bytes(head_dim: int, bits: int) -> int:
    """Bytes of packed codes for one vector of ``head_dim`` codes (docs/format.md §4)."""
    return head_dim * bits // 8


def _validate_common(kind: str, head_dim: int, group_size: int, rotation: bool,
                     sink_tokens: int, recent_tokens: int = 0) -> None:
    if kind not in SUPPORTED_KINDS:
        raise FormatError(f"kind={kind!r} is not supported; allowed kinds: {SUPPORTED_KINDS}")
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise FormatError(f"head_dim={head_dim} is not supported; allowed: {SUPPORTED_HEAD_DIMS}")
    if kind == "turbo":
        if group_size not in (0, head_dim):
            raise FormatError(
                f"group_size={group_size} with kind 'turbo': turbo keeps one scale per vector; "
                f"use group_size=0 (or {head_dim}), or kind 'uniform' for groups")
        if not rotation:
            raise FormatError("kind 'turbo' needs rotation=True (its codebook assumes rotated, "
                              "Gaussian-like coordinates); use kind 'uniform' without rotation")
    else:
        g = group_size or head_dim
        if g % 8 or head_dim % g:
            raise FormatError(
                f"group_size={group_size} must be a multiple of 8 that divides head_dim={head_dim} "
                f"(for example {', '.join(str(x) for x in (32, 64, head_dim) if head_dim % x == 0)})")
    if not 0 <= sink_tokens <= MAX_SINK_TOKENS:
        raise FormatError(f"sink_tokens={sink_tokens} must be between 0 and {MAX_SINK_TOKENS}")
    if not 0 <= recent_tokens <= MAX_RECENT_TOKENS:
        raise FormatError(f"recent_tokens={recent_tokens} must be between 0 and {MAX_RECENT_TOKENS}")


def _check_scale_exp(exp, what: str) -> int:
    try:
        ok = not isinstance(exp, (bool, str)) and int(exp) == exp
    except (TypeError, ValueError, OverflowError):
        ok = False
    if not ok:
        raise FormatError(f"{what}={exp!r} must be an integer between {SCALE_EXP_MIN} and "
                          f"{SCALE_EXP_MAX}")
    e = int(exp)
    if not SCALE_EXP_MIN <= e <= SCALE_EXP_MAX:
        raise FormatError(f"{what}={e} is out of range; the scale exponent E must be between "
                          f"{SCALE_EXP_MIN} and {SCALE_EXP_MAX} (default {DEFAULT_SCALE_EXP})")
    return e


def _meta_bytes(kind: str, head_dim: int, group_size: int) -> int:
    if kind == "turbo":
        return 1  # scale8 (docs/format.md §3.1)
    return 4 * (head_dim // (group_size or head_dim))


def _table_bytes(head_dim: int) -> int:
    # k_mean, k_smooth, v_mean, v_smooth: fp16 [d] each; k_clip, v_clip: fp16 scalars;
    # E_k, E_v: one byte each (docs/format.md §6)
    return 4 * 2 * head_dim + 2 * 2 + 2


@dataclass(frozen=True)
class KVFormat:
    """One layer's KV format with the same bit widths for every KV head."""

    k_bits: int = 3
    v_bits: int = 3
    kind: str = "turbo"
    head_dim: int = 128
    group_size: int = 0
    rotation: bool = True
    norm_correction: bool = True
    sink_tokens: int = 0
    recent_tokens: int = 0
    scale_exp: int = DEFAULT_SCALE_EXP  # E of every head's K and V scales (docs/format.md §3.1)

    def __post_init__(self) -> None:
        _check_bits(self.k_bits, "k_bits")
        _check_bits(self.v_bits, "v_bits")
        _validate_common(self.kind, self.head_dim, self.group_size, self.rotation,
                         self.sink_tokens, self.recent_tokens)
        object.__setattr__(self, "scale_exp", _check_scale_exp(self.scale_exp, "scale_exp"))

    def layer(self, kv_heads: int) -> "LayerFormat":
        return LayerFormat(head_dim=self.head_dim, k_bits=(self.k_bits,) * kv_heads,
                           v_bits=(self.v_bits,) * kv_heads, kind=self.kind,
                           group_size=self.group_size, rotation=self.rotation,
                           norm_correction=self.norm_correction, sink_tokens=self.sink_tokens,
                           recent_tokens=self.recent_tokens,
                           k_scale_exp=(self.scale_exp,) * kv_heads,
                           v_scale_exp=(self.scale_exp,) * kv_heads)

    def bytes_per_token_head(self) -> int:
        """Codes and metadata of K and V for one token of one KV head (no amortized parts)."""
        return self.layer(1).bytes_per_token(0)

    def bits_per_element(self, ref_tokens: int = DEFAULT_REF_TOKENS, tables: bool = True) -> float:
        return self.layer(1).bits_per_element(ref_tokens, tables)

    def compression(self, ref_tokens: int = DEFAULT_REF_TOKENS, tables: bool = True) -> float:
        return 16.0 / self.bits_per_element(ref_tokens, tables)


@dataclass(frozen=True)
class BlockLayout:
    """Byte offsets of one layer's block (page) for a given tokens-per-block (docs/format.md §5)."""

    tokens_per_block: int
    k_codes: tuple[int, ...]
    v_codes: tuple[int, ...]
    k_meta: tuple[int, ...]
    v_meta: tuple[int, ...]
    block_bytes: int


@dataclass(frozen=True)
class LayerFormat:
    """One layer's format: bit widths per KV head for K and for V, and the exponents E of the
    one-byte turbo scales per KV head (docs/format.md §3.1; empty: DEFAULT_SCALE_EXP)."""

    head_dim: int
    k_bits: tuple[int, ...]
    v_bits: tuple[int, ...]
    kind: str = "turbo"
    group_size: int = 0
    rotation: bool = True
    norm_correction: bool = True
    sink_tokens: int = 0
    recent_tokens: int = 0
    k_scale_exp: tuple[int, ...] = ()
    v_scale_exp: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "k_bits", tuple(int(b) for b in self.k_bits))
        object.__setattr__(self, "v_bits", tuple(int(b) for b in self.v_bits))
        if not self.k_bits or len(self.k_bits) != len(self.v_bits):
            raise FormatError(f"k_bits ({len(self.k_bits)} heads) and v_bits "
                              f"({len(self.v_bits)} heads) must list the same, non-zero, "
                              "number of KV heads")
        for h, (kb, vb) in enumerate(zip(self.k_bits, self.v_bits)):
            _check_bits(kb, f"k_bits[{h}]")
            _check_bits(vb, f"v_bits[{h}]")
        n = len(self.k_bits)
        for name in ("k_scale_exp", "v_scale_exp"):
            exps = tuple(getattr(self, name))
            if not exps:
                exps = (DEFAULT_SCALE_EXP,) * n
            if len(exps) != n:
                raise FormatError(f"{name} lists {len(exps)} exponents for {n} KV heads; give "
                                  f"one per KV head (or none for the default "
                                  f"{DEFAULT_SCALE_EXP})")
            object.__setattr__(self, name, tuple(_check_scale_exp(e, f"{name}[{h}]")
                                                 for h, e in enumerate(exps)))
        _validate_common(self.kind, self.head_dim, self.group_size, self.rotation,
                         self.sink_tokens, self.recent_tokens)

    @property
    def kv_heads(self) -> int:
        return len(self.k_bits)

    @property
    def meta_bytes(self) -> int:
        """Metadata bytes per vector (K or V, one token, one head)."""
        return _meta_bytes(self.kind, self.head_dim, self.group_size)

    def head_bytes(self, h: int) -> int:
        """Codes + metadata of K and V for one token of KV head ``h``."""
        d = self.head_dim
        return code_bytes(d, self.k_bits[h]) + code_bytes(d, self.v_bits[h]) + 2 * self.meta_bytes

    def bytes_per_token(self, ref_tokens: int = DEFAULT_REF_TOKENS, tables: bool = False) -> float:
        """Average stored bytes per token for all heads; amortized parts when ref_tokens > 0."""
        total = float(sum(self.head_bytes(h) for h in range(self.kv_heads)))
        if ref_tokens:
            # fp16 sink copies and the fp16 recent-token ring, per sequence (K and V)
            extra = (self.sink_tokens + self.recent_tokens) * 2 * self.head_dim * 2
            if tables:
                extra += _table_bytes(self.head_dim)
            total += self.kv_heads * extra / ref_tokens
        return total

    def bits_per_element(self, ref_tokens: int = DEFAULT_REF_TOKENS, tables: bool = True) -> float:
        """Effective bits per K/V element, every stored byte counted (docs/format.md §6)."""
        per_head = self.bytes_per_token(ref_tokens, tables) / self.kv_heads
        return 8.0 * per_head / (2 * self.head_dim)

    def compression(self, ref_tokens: int = DEFAULT_REF_TOKENS, tables: bool = True) -> float:
        return 16.0 / self.bits_per_element(ref_tokens, tables)

    def block_layout(self, tokens_per_block: int) -> BlockLayout:
        t = tokens_per_block
        if t not in SUPPORTED_TOKENS_PER_BLOCK:
            raise FormatError(f"tokens_per_block={t} is not supported; allowed: "
                              f"{', '.join(map(str, SUPPORTED_TOKENS_PER_BLOCK))} (codes are stored "
                              f"in tiles of {TILE_TOKENS} tokens)")
        d, mb = self.head_dim, self.meta_bytes
        off = 0
        kc, vc, km, vm = [], [], [], []
        for h in range(self.kv_heads):
            kc.append(off)
            off += _align(t * code_bytes(d, self.k_bits[h]))
            vc.append(off)
            off += _align(t * code_bytes(d, self.v_bits[h]))
            km.append(off)
            off += _align(t * mb)
            vm.append(off)
            off += _align(t * mb)
        return BlockLayout(t, tuple(kc), tuple(vc), tuple(km), tuple(vm), off)

    def to_dict(self) -> dict:
        d = asdict(self)
        for name in ("k_bits", "v_bits", "k_scale_exp", "v_scale_exp"):
            d[name] = list(getattr(self, name))
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "LayerFormat":
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise FormatError(f"unknown layer-format keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)


@dataclass(frozen=True)
class ModelFormat:
    """Formats of every layer of a model."""

    layers: tuple[LayerFormat, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))
        if not self.layers:
            raise FormatError("a model format needs at least one layer")

    @classmethod
    def uniform(cls, fmt: KVFormat, num_layers: int, kv_heads: int) -> "ModelFormat":
        return cls(tuple(fmt.layer(kv_heads) for _ in range(num_layers)))

    def bits_per_element(self, ref_tokens: int = DEFAULT_REF_TOKENS, tables: bool = True) -> float:
        """Average over every layer and head, weighted by elements."""
        bits = sum(lf.bits_per_element(ref_tokens, tables) * lf.kv_heads * lf.head_dim
                   for lf in self.layers)
        elems = sum(lf.kv_heads * lf.head_dim for lf in self.layers)
        return bits / elems

    def compression(self, ref_tokens: int = DEFAULT_REF_TOKENS, tables: bool = True) -> float:
        return 16.0 / self.bits_per_element(ref_tokens, tables)

    @property
    def recent_tokens(self) -> int:
        """The largest recent-token window of any layer (0: no layer keeps one)."""
        return max(lf.recent_tokens for lf in self.layers)

    def to_dict(self) -> dict:
        return {"format_version": FORMAT_VERSION, "layers": [lf.to_dict() for lf in self.layers]}

    @classmethod
    def from_dict(cls, d: dict) -> "ModelFormat":
        v = d.get("format_version")
        if v not in READABLE_FORMAT_VERSIONS:
            raise FormatError(f"format_version {v!r} is not supported; this build reads "
                              f"versions {READABLE_FORMAT_VERSIONS[0]} to {FORMAT_VERSION}")
        return cls(tuple(LayerFormat.from_dict(x) for x in d["layers"]))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)


PRESETS: dict[str, KVFormat] = {
    "k8v8": KVFormat(8, 8),
    "k4v4": KVFormat(4, 4),
    "k4v3": KVFormat(4, 3),
    "k3v3": KVFormat(3, 3),
    "k3v2": KVFormat(3, 2),
    "k2v2": KVFormat(2, 2),
}


def preset(name: str, head_dim: int = 128, sink_tokens: int | None = None,
           recent_tokens: int | None = None) -> KVFormat:
    """A named preset at the given head_dim."""
    if name not in PRESETS:
        raise FormatError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    p = PRESETS[name]
    kw = {"head_dim": head_dim}
    if sink_tokens is not None:
        kw["sink_tokens"] = sink_tokens
    if recent_tokens is not None:
        kw["recent_tokens"] = recent_tokens
    return KVFormat(**{**asdict(p), **kw})

