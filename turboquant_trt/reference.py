"""Reference quantizer (numpy): the exact bytes of docs/format.md, and their dequantization.

Everything here is fp32 arithmetic in the order docs/format.md fixes, so that the CUDA write
kernel can reproduce the bytes. Nothing here is fast; it is the definition the kernels are
tested against and the storage behind :mod:`turboquant_trt.cache`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from .format import (
    DEFAULT_SCALE_EXP,
    SCALE8_STEPS,
    SCALE_EXP_MAX,
    SCALE_EXP_MIN,
    SUPPORTED_BITS,
    TILE_TOKENS,
    FormatError,
    LayerFormat,
    code_bytes,
)
from .format import _check_scale_exp as _check_exp

ROTATION_SEED = 0x7142
_TAIL = 40.0  # stands for infinity in the Gaussian integrals (phi and Q vanish there)
FP16_MAX = 65504.0


# ---------------------------------------------------------------------------------------------
# Codebooks
# ---------------------------------------------------------------------------------------------

def _phi(x: np.ndarray) -> np.ndarray:
    return np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)


_erfc = np.frompyfunc(math.erfc, 1, 1)


def _upper_tail(x: np.ndarray) -> np.ndarray:
    """Q(x) = P(X > x) for X ~ N(0, 1), accurate in the upper tail."""
    return np.asarray(_erfc(x / math.sqrt(2.0)), dtype=np.float64) * 0.5


@lru_cache(maxsize=None)
def _lloyd_max_f64(bits: int) -> tuple[float, ...]:
    if bits not in (1, 2, 3, 4, 8):
        raise FormatError(f"no codebook for {bits} bits; allowed: 2, 3, 4, 8")
    m = 1 << (bits - 1)  # positive levels; the codebook is symmetric
    # start from the midpoints of equal-probability cells of the positive half
    probs = (np.arange(m) + 0.5) / m * 0.5
    c = np.array([_inv_upper_tail(0.5 - p) for p in probs])
    for _ in range(20000):
        t = np.concatenate([[0.0], 0.5 * (c[:-1] + c[1:]), [_TAIL]])
        new = (_phi(t[:-1]) - _phi(t[1:])) / (_upper_tail(t[:-1]) - _upper_tail(t[1:]))
        done = np.max(np.abs(new - c)) < 1e-13
        c = new
        if done:
            break
    return tuple(np.concatenate([-c[::-1], c]).tolist())


def _inv_upper_tail(q: float) -> float:
    """x with Q(x) = q, by bisection (used only to seed the iteration)."""
    lo, hi = -10.0, 10.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if 0.5 * math.erfc(mid / math.sqrt(2.0)) > q:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def lloyd_max_codebook(bits: int) -> np.ndarray:
    """Lloyd-Max levels LM_b of N(0, 1) with 2**bits entries, ascending, as fp32.

    Version 2 of the format quantizes with :func:`codebook` (LM_b rounded to an int8 grid); LM_b
    stays for documentation and :func:`gaussian_mse`.
    """
    return np.asarray(_lloyd_max_f64(bits), dtype=np.float32)


@lru_cache(maxsize=None)
def _codebook_int8(bits: int) -> tuple[tuple[int, ...], float]:
    if bits not in SUPPORTED_BITS:
        raise FormatError(f"no codebook for {bits} bits; allowed: {SUPPORTED_BITS}")
    if bits == 8:
        return tuple(range(-128, 128)), 32.0
    lm = np.asarray(_lloyd_max_f64(bits), dtype=np.float64)
    lam = 127.0 / lm[-1]                     # float64
    e = np.round(lm * lam)                   # numpy rounds half to even
    return tuple(int(x) for x in e), float(np.float32(lam))


def codebook_int8(bits: int) -> tuple[np.ndarray, np.float32]:
    """(e_b as int8 [2**bits], lambda_b as fp32) of docs/format.md §3.1: c_b = e_b / lambda_b."""
    e, lam = _codebook_int8(bits)
    return np.array(e, dtype=np.int8), np.float32(lam)


def codebook(bits: int) -> np.ndarray:
    """The codebook c_b[m] = fp32(e_b[m]) / fp32(lambda_b) (fp32 division), ascending, fp32."""
    e, lam = codebook_int8(bits)
    return e.astype(np.float32) / lam


def codebook_boundaries(bits: int) -> np.ndarray:
    """Decision boundaries between consecutive levels of :func:`codebook`, fp32 midpoints."""
    c = codebook(bits)
    return ((c[:-1] + c[1:]) * np.float32(0.5)).astype(np.float32)


def _gaussian_distortion(levels) -> float:
    """E[(X - q(X))^2] for X ~ N(0, 1), q = nearest of the ascending levels (midpoint boundaries)."""
    c = np.asarray(levels, dtype=np.float64)
    a = np.concatenate([[-_TAIL], 0.5 * (c[:-1] + c[1:])])
    b = np.concatenate([0.5 * (c[:-1] + c[1:]), [_TAIL]])
    mass = _upper_tail(a) - _upper_tail(b)
    # E[(X - c)^2 ; a < X < b] = (1 + c^2) P - 2c (phi(a) - phi(b)) + a phi(a) - b phi(b)
    return float(np.sum((1 + c * c) * mass - 2 * c * (_phi(a) - _phi(b))
                        + a * _phi(a) - b * _phi(b)))


def gaussian_mse(bits: int) -> float:
    """Expected squared error per coordinate of LM_b on N(0, 1) (the Lloyd-Max distortion)."""
    return _gaussian_distortion(_lloyd_max_f64(bits))


def codebook_mse(bits: int) -> float:
    """Expected squared error per coordinate of the format's codebook c_b on N(0, 1)."""
    return _gaussian_distortion(codebook(bits))


# ---------------------------------------------------------------------------------------------
# Rotation
# ---------------------------------------------------------------------------------------------

def rotation_signs(head_dim: int, layer: int) -> np.ndarray:
    """The ±1 sign vector of a layer's randomized Hadamard transform (docs/format.md §2)."""
    rng = np.random.default_rng(ROTATION_SEED + int(layer))
    return (rng.integers(0, 2, size=head_dim) * 2 - 1).astype(np.float32)


def rsqrt_d(head_dim: int) -> np.float32:
    return np.float32(1.0 / math.sqrt(head_dim))


def hadamard(x: np.ndarray) -> np.ndarray:
    """Normalized fast Walsh-Hadamard transform over the last axis, fp32, fixed butterfly order."""
    x = np.asarray(x, dtype=np.float32)
    d = x.shape[-1]
    if d & (d - 1):
        raise FormatError(f"Hadamard size {d} is not a power of two")
    lead = x.shape[:-1]
    y = x.reshape(-1, d).copy()
    n = y.shape[0]
    length = 1
    while length < d:
        v = y.reshape(n, d // (2 * length), 2, length)
        a = v[:, :, 0, :].copy()
        b = v[:, :, 1, :]
        v[:, :, 0, :] = a + b
        v[:, :, 1, :] = a - b
        length *= 2
    y *= rsqrt_d(d)
    return y.reshape(*lead, d)


def rotate(x: np.ndarray, signs: np.ndarray) -> np.ndarray:
    """R(x) = WHT(signs ⊙ x) / sqrt(d)."""
    return hadamard(np.asarray(x, np.float32) * signs)


def unrotate(y: np.ndarray, signs: np.ndarray) -> np.ndarray:
    """R⁻¹(y) = signs ⊙ WHT(y) / sqrt(d)."""
    return hadamard(y) * signs


# ---------------------------------------------------------------------------------------------
# Packing (docs/format.md §4)
# ---------------------------------------------------------------------------------------------

def _pack_low(codes: np.ndarray, bits: int) -> np.ndarray:
    per = 8 // bits
    c = codes.reshape(*codes.shape[:-1], -1, per).astype(np.uint16)
    out = np.zeros(c.shape[:-1], dtype=np.uint16)
    for j in range(per):
        out |= c[..., j] << (bits * j)
    return out.astype(np.uint8)


def _unpack_low(packed: np.ndarray, bits: int) -> np.ndarray:
    per = 8 // bits
    mask = (1 << bits) - 1
    parts = [(packed >> (bits * j)) & mask for j in range(per)]
    return np.stack(parts, axis=-1).reshape(*packed.shape[:-1], -1).astype(np.uint8)


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack codes [..., d] (uint8, < 2**bits) into [..., d*bits/8] bytes."""
    codes = np.asarray(codes, dtype=np.uint8)
    if codes.size and int(codes.max()) >> bits:
        raise FormatError(f"a code does not fit in {bits} bits")
    if bits == 8:
        return codes.copy()
    if bits in (2, 4):
        return _pack_low(codes, bits)
    if bits == 3:
        return np.concatenate([_pack_low(codes & 3, 2), _pack_low(codes >> 2, 1)], axis=-1)
    raise FormatError(f"cannot pack {bits}-bit codes; allowed: 2, 3, 4, 8")


def unpack_codes(packed: np.ndarray, bits: int, head_dim: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`: [..., d*bits/8] bytes -> [..., d] codes."""
    packed = np.asarray(packed, dtype=np.uint8)
    if packed.shape[-1] != code_bytes(head_dim, bits):
        raise FormatError(f"{packed.shape[-1]} bytes do not hold {head_dim} {bits}-bit codes")
    if bits == 8:
        return packed.copy()
    if bits in (2, 4):
        return _unpack_low(packed, bits)
    low = _unpack_low(packed[..., : head_dim // 4], 2)
    high = _unpack_low(packed[..., head_dim // 4:], 1)
    return (low | (high << 2)).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# The pool's tile layout (docs/format.md §5.1): 32 token slots of codes in MMA fragment order
# ---------------------------------------------------------------------------------------------

def _check_which(which: str) -> None:
    if which not in ("k", "v"):
        raise FormatError(f"which={which!r} must be 'k' or 'v'")


def tile_position(which: str, slot, channel, head_dim: int):
    """Where code (slot tau of a tile, channel c) lives: (lane L, unit U, selector j, nibble n).

    Works on Python ints and on numpy integer arrays (broadcast). docs/format.md §5.1.
    """
    _check_which(which)
    d = head_dim
    tau, c = slot, channel
    if which == "k":
        g, i = tau % 8, tau // 8
        s, h, t, y = c // 32, (c % 32) // 16, (c % 16) // 4, c % 4
        rho = (i * (d // 32) + s) * 2 + h
    else:
        m, rh, g = c // 16, (c % 16) // 8, c % 8
        kh, t, y = tau // 16, (tau % 16) // 4, tau % 4
        rho = 4 * m + 2 * kh + rh
    return 4 * g + t, rho // 8, (rho % 8) // 2, 4 * (rho % 2) + y


def _unit_bit(bits: int, j, n, k):
    """(word w, bit kb of the word) of code bit k at position (j, n) of a unit (broadcasts)."""
    if bits == 2:
        return j // 2, 4 * n + 2 * (j % 2) + k
    if bits == 3:
        hi = j == 3
        return np.where(hi, k, j), np.where(hi, 4 * n + 3, 4 * n + k)
    if bits == 4:
        return j, 4 * n + k
    if bits == 8:
        return 2 * j + n // 4, 8 * (n % 4) + k
    raise FormatError(f"no tile layout for {bits}-bit codes; allowed: {SUPPORTED_BITS}")


def tile_bytes(head_dim: int, bits: int) -> int:
    """Bytes of one tile: TILE_TOKENS slots of ``head_dim`` ``bits``-bit codes."""
    return TILE_TOKENS * code_bytes(head_dim, bits)


@lru_cache(maxsize=None)
def _tile_bitmap(which: str, head_dim: int, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """byte index and bit index (in that byte) of every code bit: two int arrays [32, d, bits]."""
    _check_which(which)
    if head_dim % 32 or head_dim < 32:
        raise FormatError(f"head_dim={head_dim} must be a multiple of 32 for the tile layout")
    tau = np.arange(TILE_TOKENS)[:, None, None]
    c = np.arange(head_dim)[None, :, None]
    k = np.arange(bits)[None, None, :]
    lane, unit, j, n = tile_position(which, tau, c, head_dim)
    w, kb = _unit_bit(bits, j, n, k)
    byte = lane * code_bytes(head_dim, bits) + unit * 4 * bits + 4 * w + kb // 8
    byte, bit = np.broadcast_arrays(byte, kb % 8)
    byte, bit = byte.astype(np.int64), bit.astype(np.uint8)
    byte.setflags(write=False)
    bit.setflags(write=False)
    return byte, bit


def _tile_head_dim(tile: np.ndarray, bits: int, head_dim: int | None) -> int:
    d = tile.shape[-1] * 8 // (TILE_TOKENS * bits)
    if head_dim is not None and d != head_dim or tile.shape[-1] != tile_bytes(d, bits):
        raise FormatError(f"{tile.shape[-1]} bytes are not one tile of {TILE_TOKENS} x "
                          f"{head_dim if head_dim is not None else 'd'} {bits}-bit codes")
    return d


def pack_tile(codes: np.ndarray, bits: int, which: str) -> np.ndarray:
    """Codes [32, d] (slot, channel) -> one tile, uint8 [32*d*bits/8] (docs/format.md §5.1)."""
    codes = np.asarray(codes, dtype=np.uint8)
    if codes.ndim != 2 or codes.shape[0] != TILE_TOKENS:
        raise FormatError(f"a tile holds codes [{TILE_TOKENS}, d], not {list(codes.shape)}")
    if codes.size and int(codes.max()) >> bits:
        raise FormatError(f"a code does not fit in {bits} bits")
    d = codes.shape[1]
    byte, bit = _tile_bitmap(which, d, bits)
    vals = ((codes[:, :, None] >> np.arange(bits, dtype=np.uint8)) & 1) << bit
    out = np.zeros(tile_bytes(d, bits), np.uint8)
    np.bitwise_or.at(out, byte.ravel(), vals.ravel())
    return out


def unpack_tile(tile: np.ndarray, bits: int, which: str, head_dim: int | None = None) -> np.ndarray:
    """Inverse of :func:`pack_tile`: one tile -> codes [32, d]."""
    tile = np.asarray(tile, dtype=np.uint8)
    d = _tile_head_dim(tile, bits, head_dim)
    byte, bit = _tile_bitmap(which, d, bits)
    b = (tile[byte] >> bit) & 1  # [32, d, bits]
    return np.sum(b.astype(np.uint16) << np.arange(bits, dtype=np.uint16), axis=-1).astype(np.uint8)


def write_tile_slot(tile: np.ndarray, slot: int, codes: np.ndarray, bits: int, which: str) -> None:
    """Write one slot's codes [d] into a tile in place; every other slot's bits stay as they are
    (the CUDA writer's atomicAnd(~mask) then atomicOr(bits) per 32-bit word)."""
    codes = np.asarray(codes, dtype=np.uint8)
    d = _tile_head_dim(tile, bits, codes.shape[-1])
    if codes.size and int(codes.max()) >> bits:
        raise FormatError(f"a code does not fit in {bits} bits")
    byte, bit = _tile_bitmap(which, d, bits)
    byte, bit = byte[slot].ravel(), bit[slot].ravel()
    vals = ((codes[:, None] >> np.arange(bits, dtype=np.uint8)) & 1).ravel() << bit
    mask = np.zeros(tile.shape[-1], np.uint8)
    np.bitwise_or.at(mask, byte, np.uint8(1) << bit)
    put = np.zeros(tile.shape[-1], np.uint8)
    np.bitwise_or.at(put, byte, vals)
    tile &= ~mask
    tile |= put


def read_tile_slot(tile: np.ndarray, slot: int, bits: int, which: str,
                   head_dim: int | None = None) -> np.ndarray:
    """One slot's codes [d] from a tile."""
    tile = np.asarray(tile, dtype=np.uint8)
    d = _tile_head_dim(tile, bits, head_dim)
    byte, bit = _tile_bitmap(which, d, bits)
    b = (tile[byte[slot]] >> bit[slot]) & 1  # [d, bits]
    return np.sum(b.astype(np.uint16) << np.arange(bits, dtype=np.uint16), axis=-1).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Quantizers (docs/format.md §3)
# ---------------------------------------------------------------------------------------------

def _to_fp16_bytes(x: np.ndarray) -> np.ndarray:
    return np.minimum(np.asarray(x, np.float32), np.float32(FP16_MAX)).astype(np.float16)


def ordered_sum(x: np.ndarray) -> np.ndarray:
    """fp32 sum over the last axis (a multiple of 8, at most 256) in the order docs/format.md §3.1
    fixes: per 128-element chunk, 8 running sums r[j] = x[j] + x[j+8] + ... (left to right), then
    ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7)); chunk sums added left to right."""
    x = np.asarray(x, dtype=np.float32)
    d = x.shape[-1]
    if d % 8 or d > 256:
        raise FormatError(f"ordered_sum needs a length that is a multiple of 8 up to 256, not {d}")
    chunk = min(d, 128)
    total = None
    for h in range(d // chunk):
        c = x[..., h * chunk:(h + 1) * chunk].reshape(*x.shape[:-1], chunk // 8, 8)
        r = c[..., 0, :].copy()
        for i in range(1, chunk // 8):
            r = r + c[..., i, :]
        s = ((r[..., 0] + r[..., 1]) + (r[..., 2] + r[..., 3])) + \
            ((r[..., 4] + r[..., 5]) + (r[..., 6] + r[..., 7]))
        total = s if total is None else total + s
    return total


@lru_cache(maxsize=None)
def _scale8_tables() -> tuple[np.ndarray, np.ndarray]:
    i = np.arange(SCALE8_STEPS, dtype=np.float64)
    frac = np.exp2(i / SCALE8_STEPS).astype(np.float32)
    mid = np.exp2((2 * i + 1) / (2 * SCALE8_STEPS)).astype(np.float32)
    return frac, mid


def scale8_tables() -> tuple[np.ndarray, np.ndarray]:
    """(F, M): the grid F[i] = fp32(2^(i/16)) and midpoints M[i] = fp32(2^((2i+1)/32)), i = 0..15."""
    f, m = _scale8_tables()
    return f.copy(), m.copy()


def _check_scale_exp(exp: int) -> int:
    return _check_exp(exp, "scale exponent E")


def scale8_encode(scale: np.ndarray, exp: int) -> np.ndarray:
    """fp32 scales -> one-byte codes enc(s, E) of docs/format.md §3.1 (uint8, same shape)."""
    e0 = _check_scale_exp(exp)
    s = np.asarray(scale, dtype=np.float32)
    _, mid = _scale8_tables()
    m, e = np.frexp(s)                       # s = m * 2^e, 0.5 <= m < 1 (exact, subnormals too)
    m = (m * np.float32(2)).astype(np.float32)
    e = e.astype(np.int64) - 1               # now 1 <= m < 2
    c = (m[..., None] >= mid).sum(axis=-1)
    q = SCALE8_STEPS * (e - e0) + c
    k = 1 + np.clip(q, 0, 254)
    with np.errstate(invalid="ignore"):
        k = np.where(s > 0, k, 0)
        k = np.where(np.isposinf(s), 255, k)
    return k.astype(np.uint8)


def scale8_decode(code: np.ndarray, exp: int) -> np.ndarray:
    """One-byte codes -> fp32 scales dec(k, E) of docs/format.md §3.1 (0 -> 0)."""
    e0 = _check_scale_exp(exp)
    k = np.asarray(code).astype(np.int64)
    frac, _ = _scale8_tables()
    j = np.maximum(k - 1, 0)
    v = np.ldexp(frac[j % SCALE8_STEPS], e0 + j // SCALE8_STEPS).astype(np.float32)
    return np.where(k > 0, v, np.float32(0)).astype(np.float32)


TURBO8_TOP = np.float32(3.96875)  # c[255], the largest level of the 8-bit codebook


def turbo_scale(x: np.ndarray, bits: int, norm_correction: bool = True,
                clip: float | np.ndarray = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Codes and the fp32 scale before its one-byte rounding (docs/format.md §3.1):
    x [..., d] -> (codes uint8 [..., d], scale fp32 [...]). At 8 bits the scale is
    max |x_i| / c[255] (clip and norm correction do not apply) and the codes are taken against it;
    quantize_turbo rounds it up on the one-byte grid and takes its codes against that instead."""
    x = np.asarray(x, dtype=np.float32)
    if bits == 8:
        scale = turbo8_scale(x)
        return recode_8(x, scale), scale
    d = x.shape[-1]
    beta = codebook_boundaries(bits)
    cb = codebook(bits)
    n = np.sqrt(ordered_sum(x * x), dtype=np.float32)
    gamma = np.asarray(clip, dtype=np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        f = np.where(n > 0, np.float32(math.sqrt(d)) / (gamma * n), np.float32(0)).astype(np.float32)
    u = x * f[..., None]
    codes = np.searchsorted(beta, u, side="left").astype(np.uint8)
    if norm_correction:
        c = cb[codes]
        cn = np.sqrt(ordered_sum(c * c), dtype=np.float32)
        # only the 8-bit codebook has a zero level: every code at it (a zero vector) gives scale 0
        with np.errstate(divide="ignore", invalid="ignore"):
            scale = np.where(cn > 0, n / np.where(cn > 0, cn, np.float32(1)), np.float32(0))
        scale = scale.astype(np.float32)
    else:
        scale = (gamma * n / np.float32(math.sqrt(d))).astype(np.float32)
    return codes, np.asarray(scale, np.float32)


SCALE_EXP_HEADROOM = 11  # calibration's E = floor(log2 max scale) - 11 (docs/format.md §3.1)


def scale_exp_for_max(max_scale: float) -> int:
    """The exponent E calibration chooses for a largest scale: floor(log2 max_scale) - 11, so
    that it sits 11-12 octaves above 2^E, 14.7-29.3x below the top of the 16-octave grid;
    clamped to SCALE_EXP_MIN..SCALE_EXP_MAX; DEFAULT_SCALE_EXP when max_scale is not positive
    and finite. Exact (frexp), so deterministic."""
    m = float(max_scale)
    if not (m > 0 and math.isfinite(m)):
        return DEFAULT_SCALE_EXP
    e = math.frexp(m)[1] - 1  # m = f * 2^(e+1), 0.5 <= f < 1: floor(log2 m) = e
    return int(min(max(e - SCALE_EXP_HEADROOM, SCALE_EXP_MIN), SCALE_EXP_MAX))


def turbo8_scale(x: np.ndarray) -> np.ndarray:
    """The 8-bit scale before its one-byte rounding: max |x_i| / c[255] (docs/format.md §3.1)."""
    return np.asarray(np.abs(np.asarray(x, np.float32)).max(axis=-1) / TURBO8_TOP, np.float32)


def recode_8(x: np.ndarray, s: np.ndarray) -> np.ndarray:
    """8-bit codes against the scale s (docs/format.md §3.1): s > 0 ? #{ j : x_i / s > beta[j] }
    (fp32 IEEE division) : 128 (the zero level)."""
    x = np.asarray(x, dtype=np.float32)
    s = np.asarray(s, dtype=np.float32)
    pos = s > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        u = (x / np.where(pos, s, np.float32(1))[..., None]).astype(np.float32)
    codes = np.searchsorted(codebook_boundaries(8), u, side="left").astype(np.uint8)
    return np.where(pos[..., None], codes, np.uint8(128)).astype(np.uint8)


def scale8_encode_up(scale: np.ndarray, exp: int) -> np.ndarray:
    """enc(scale, E), one step up where dec of it is below scale (and below the top code 255):
    the smallest grid value >= scale inside the grid (docs/format.md §3.1, 8-bit codes)."""
    scale = np.asarray(scale, dtype=np.float32)
    k = scale8_encode(scale, exp)
    up = (scale8_decode(k, exp) < scale) & (k > 0) & (k < 255)
    return np.where(up, k + 1, k).astype(np.uint8)


def quantize_turbo(x: np.ndarray, bits: int, norm_correction: bool = True,
                   clip: float | np.ndarray = 1.0,
                   scale_exp: int = DEFAULT_SCALE_EXP) -> tuple[np.ndarray, np.ndarray]:
    """Quantize transformed vectors x [..., d] -> (codes uint8 [..., d], scale8 uint8 [...]):
    the one-byte scale enc(scale, E) with E = ``scale_exp``; at 8 bits the scale max|x_i| / c[255]
    rounded up on the grid and the codes taken against it (docs/format.md §3.1)."""
    _check_scale_exp(scale_exp)
    if bits == 8:
        # codes only against the stored scale (turbo_scale's would be taken against the unrounded one)
        scale8 = scale8_encode_up(turbo8_scale(x), scale_exp)
        return recode_8(x, scale8_decode(scale8, scale_exp)), scale8
    codes, scale = turbo_scale(x, bits, norm_correction, clip)
    return codes, scale8_encode(scale, scale_exp)


def dequantize_turbo(codes: np.ndarray, scale8: np.ndarray, bits: int,
                     scale_exp: int = DEFAULT_SCALE_EXP) -> np.ndarray:
    """x̂_i = dec(scale8, E) · c[code_i] (fp32 product): codes [..., d], scale8 uint8 [...]."""
    scale8 = np.asarray(scale8)
    if not np.issubdtype(scale8.dtype, np.integer) or (
            scale8.size and (int(scale8.min()) < 0 or int(scale8.max()) > 255)):
        raise FormatError(f"turbo scales are one-byte codes (integers 0..255, uint8), not "
                          f"{scale8.dtype} values; encode fp32 scales with scale8_encode")
    cb = codebook(bits)
    return scale8_decode(scale8, scale_exp)[..., None] * cb[codes]


def quantize_uniform(x: np.ndarray, bits: int, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Asymmetric per-group: x [..., d] -> (codes uint8 [..., d], meta fp16 [..., d/G, 2])."""
    x = np.asarray(x, dtype=np.float32)
    d = x.shape[-1]
    g = group_size or d
    xg = x.reshape(*x.shape[:-1], d // g, g)
    mn = xg.min(axis=-1)
    mx = xg.max(axis=-1)
    levels = np.float32((1 << bits) - 1)
    scale16 = _to_fp16_bytes((mx - mn) / levels)
    zero16 = np.asarray(mn, np.float32).astype(np.float16)
    s = scale16.astype(np.float32)[..., None]
    z = zero16.astype(np.float32)[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(s > 0, np.rint((xg - z) / np.where(s > 0, s, 1)), 0)
    codes = np.clip(q, 0, levels).astype(np.uint8).reshape(x.shape)
    return codes, np.stack([scale16, zero16], axis=-1)


def dequantize_uniform(codes: np.ndarray, meta: np.ndarray, group_size: int) -> np.ndarray:
    d = codes.shape[-1]
    g = group_size or d
    cg = codes.reshape(*codes.shape[:-1], d // g, g).astype(np.float32)
    s = meta[..., 0].astype(np.float32)[..., None]
    z = meta[..., 1].astype(np.float32)[..., None]
    return (z + s * cg).reshape(codes.shape)


# ---------------------------------------------------------------------------------------------
# One layer: transform, encode to bytes, decode
# ---------------------------------------------------------------------------------------------

@dataclass
class LayerTables:
    """Calibrated per-layer tensors of docs/format.md §2 (fp32 copies of the fp16 scale table)."""

    k_mean: np.ndarray    # [H, d]
    k_smooth: np.ndarray  # [H, d] > 0
    v_mean: np.ndarray    # [H, d]
    v_smooth: np.ndarray  # [H, d] > 0
    k_clip: np.ndarray    # [H] > 0
    v_clip: np.ndarray    # [H] > 0
    signs: np.ndarray     # [d] ±1

    def __post_init__(self) -> None:
        # The scale table stores fp16: use exactly the values the kernels will see.
        for name in ("k_mean", "k_smooth", "v_mean", "v_smooth", "k_clip", "v_clip"):
            setattr(self, name, np.asarray(getattr(self, name), np.float16).astype(np.float32))
        self.signs = np.asarray(self.signs, np.float32)
        h, d = self.k_mean.shape
        for name, shape in (("k_smooth", (h, d)), ("v_mean", (h, d)), ("v_smooth", (h, d)),
                            ("k_clip", (h,)), ("v_clip", (h,)), ("signs", (d,))):
            if getattr(self, name).shape != shape:
                raise FormatError(f"table {name} has shape {getattr(self, name).shape}, "
                                  f"expected {shape}")
        for name in ("k_smooth", "v_smooth", "k_clip", "v_clip"):
            if not np.all(getattr(self, name) > 0):
                raise FormatError(f"table {name} must be positive (fp16 values > 0)")
        if not np.all(np.abs(self.signs) == 1):
            raise FormatError("table signs must hold only +1 and -1")

    @property
    def kv_heads(self) -> int:
        return self.k_mean.shape[0]

    @property
    def head_dim(self) -> int:
        return self.k_mean.shape[1]

    @classmethod
    def identity(cls, kv_heads: int, head_dim: int, layer: int = 0) -> "LayerTables":
        z = np.zeros((kv_heads, head_dim), np.float32)
        o = np.ones((kv_heads, head_dim), np.float32)
        return cls(z, o, z.copy(), o.copy(), np.ones(kv_heads, np.float32),
                   np.ones(kv_heads, np.float32), rotation_signs(head_dim, layer))


@dataclass
class EncodedKV:
    """Packed K or V of some tokens of one layer, per KV head."""

    codes: list[np.ndarray]  # per head: uint8 [tokens, code_bytes(d, bits_h)]
    meta: list[np.ndarray]   # per head: uint8 [tokens, meta_bytes] (turbo: scale8 [tokens, 1])


class LayerQuantizer:
    """Transform, quantize and pack one layer's K/V exactly as docs/format.md specifies."""

    def __init__(self, fmt: LayerFormat, tables: LayerTables | None = None, layer: int = 0):
        self.fmt = fmt
        self.tables = tables or LayerTables.identity(fmt.kv_heads, fmt.head_dim, layer)
        if (self.tables.kv_heads, self.tables.head_dim) != (fmt.kv_heads, fmt.head_dim):
            raise FormatError(
                f"tables are for {self.tables.kv_heads} KV heads x head_dim {self.tables.head_dim}, "
                f"the format for {fmt.kv_heads} x {fmt.head_dim}")

    # -- transform (§2) --------------------------------------------------------------------
    def _rot(self, x: np.ndarray) -> np.ndarray:
        if self.fmt.rotation:
            return rotate(x, self.tables.signs)
        return np.asarray(x, np.float32)

    def _unrot(self, y: np.ndarray) -> np.ndarray:
        if self.fmt.rotation:
            return unrotate(y, self.tables.signs)
        return np.asarray(y, np.float32)

    def transform(self, x: np.ndarray, which: str) -> np.ndarray:
        """Original-domain K or V [tokens, H, d] -> transformed domain (fp32)."""
        t = self.tables
        mean, smooth = (t.k_mean, t.k_smooth) if which == "k" else (t.v_mean, t.v_smooth)
        x = np.asarray(x, np.float32)
        return self._rot((x - mean) / smooth)

    def untransform(self, y: np.ndarray, which: str) -> np.ndarray:
        """Transformed-domain [tokens, H, d] -> original domain (mean and smoothing restored)."""
        t = self.tables
        mean, smooth = (t.k_mean, t.k_smooth) if which == "k" else (t.v_mean, t.v_smooth)
        return smooth * self._unrot(y) + mean

    def transform_q(self, q: np.ndarray) -> np.ndarray:
        """Queries [tokens, Hq, d] -> q_t = R(q ⊙ sk) of each query head's KV head."""
        q = np.asarray(q, np.float32)
        hq = q.shape[-2]
        g = hq // self.fmt.kv_heads
        sk = np.repeat(self.tables.k_smooth, g, axis=0)
        return self._rot(q * sk)

    # -- quantization (§3, §4) ---------------------------------------------------------------
    def _bits(self, which: str) -> tuple[int, ...]:
        return self.fmt.k_bits if which == "k" else self.fmt.v_bits

    def _exps(self, which: str) -> tuple[int, ...]:
        return self.fmt.k_scale_exp if which == "k" else self.fmt.v_scale_exp

    def encode_transformed(self, y: np.ndarray, which: str) -> EncodedKV:
        """Quantize and pack transformed vectors y [tokens, H, d]."""
        fmt = self.fmt
        clip = self.tables.k_clip if which == "k" else self.tables.v_clip
        codes_out, meta_out = [], []
        exps = self._exps(which)
        for h, bits in enumerate(self._bits(which)):
            yh = y[:, h, :]
            if fmt.kind == "turbo":
                codes, scale8 = quantize_turbo(yh, bits, fmt.norm_correction, clip[h], exps[h])
                meta = scale8.reshape(-1, 1)
            else:
                codes, m = quantize_uniform(yh, bits, fmt.group_size)
                meta = np.ascontiguousarray(m).reshape(m.shape[0], -1).view(np.uint8)
            codes_out.append(pack_codes(codes, bits))
            meta_out.append(np.ascontiguousarray(meta).reshape(yh.shape[0], fmt.meta_bytes))
        return EncodedKV(codes_out, meta_out)

    def decode_transformed(self, enc: EncodedKV, which: str) -> np.ndarray:
        """Packed bytes -> dequantized transformed-domain vectors [tokens, H, d] (fp32)."""
        fmt, d = self.fmt, self.fmt.head_dim
        out = []
        exps = self._exps(which)
        for h, bits in enumerate(self._bits(which)):
            codes = unpack_codes(enc.codes[h], bits, d)
            if fmt.kind == "turbo":
                scale8 = np.asarray(enc.meta[h], np.uint8)[:, 0]
                out.append(dequantize_turbo(codes, scale8, bits, exps[h]))
            else:
                m = np.ascontiguousarray(enc.meta[h]).view(np.float16).reshape(len(codes), -1, 2)
                out.append(dequantize_uniform(codes, m, fmt.group_size))
        return np.stack(out, axis=1)

    def encode(self, x: np.ndarray, which: str) -> EncodedKV:
        return self.encode_transformed(self.transform(x, which), which)

    def fake_quant(self, x: np.ndarray, which: str, positions: np.ndarray | None = None,
                   length: int | None = None) -> np.ndarray:
        """Original-domain x [tokens, H, d] -> what attention sees after storage, original domain.

        Tokens whose position is below ``sink_tokens`` keep their fp16-rounded transformed value,
        and so do, with ``length`` (the sequence length L a query reads at), positions
        ``>= L - recent_tokens`` (the recent-token window, docs/format.md §5.2).
        """
        y = self.transform(x, which)
        yq = self.decode_transformed(self.encode_transformed(y, which), which)
        if positions is not None:
            pos = np.asarray(positions)
            exact = pos < self.fmt.sink_tokens
            if length is not None and self.fmt.recent_tokens:
                exact |= pos >= length - self.fmt.recent_tokens
            if exact.any():
                yq[exact] = y[exact].astype(np.float16).astype(np.float32)
        return self.untransform(yq, which)


# ---------------------------------------------------------------------------------------------
# The paged pool (§5): exact bytes for kernel tests
# ---------------------------------------------------------------------------------------------

class PagedPool:
    """A host copy of one layer's paged pool, sink pool and recent-token ring, written by the
    reference.

    Code arrays are in the tile layout of docs/format.md §5.1; metadata rows are plain rows.
    Writing a token changes only that token's bits, so a reused block's other slots keep whatever
    they held (as with the CUDA writer). With ``recent_tokens = w > 0`` every written token is
    also stored in fp16 (transformed domain) at ring index ``p % w`` of ``recent``
    (``[num_slots][H][2][w][d]``, docs/format.md §5.2); ``read`` takes positions ``>= L - w``
    from there.
    """

    def __init__(self, quantizer: LayerQuantizer, num_blocks: int, tokens_per_block: int,
                 num_slots: int, block_stride: int | None = None, layer_offset: int = 0,
                 fill: int = 0xA5):
        fmt = quantizer.fmt
        self.q = quantizer
        self.layout = fmt.block_layout(tokens_per_block)
        self.block_stride = block_stride or self.layout.block_bytes
        if self.block_stride % 16 or layer_offset % 16:
            raise FormatError("block_stride and layer_offset must be multiples of 16")
        if layer_offset + self.layout.block_bytes > self.block_stride:
            raise FormatError("the layer's block does not fit in block_stride at layer_offset")
        self.layer_offset = layer_offset
        self.pool = np.full((num_blocks, self.block_stride), fill, dtype=np.uint8)
        ns = max(fmt.sink_tokens, 1)
        self.sinks = np.full((num_slots, fmt.kv_heads, 2, ns, fmt.head_dim), np.nan, np.float16)
        w = max(fmt.recent_tokens, 1)
        self.recent = np.full((num_slots, fmt.kv_heads, 2, w, fmt.head_dim), np.nan, np.float16)
        # which position each ring entry holds (-1: none): bookkeeping for checks, not format bytes
        self.recent_positions = np.full((num_slots, w), -1, np.int64)

    def _array(self, block: int, offset: int, row_bytes: int) -> np.ndarray:
        t = self.layout.tokens_per_block
        start = self.layer_offset + offset
        return self.pool[block, start: start + t * row_bytes].reshape(t, row_bytes)

    def _bits(self, which: str, head: int) -> int:
        fmt = self.q.fmt
        return fmt.k_bits[head] if which == "k" else fmt.v_bits[head]

    def tile(self, block: int, which: str, head: int, tile_index: int) -> np.ndarray:
        """A writable view of one code tile (slots 32q..32q+31 of the block) of a head."""
        fmt, lay = self.q.fmt, self.layout
        _check_which(which)
        tb = tile_bytes(fmt.head_dim, self._bits(which, head))
        start = self.layer_offset + (lay.k_codes if which == "k" else lay.v_codes)[head] + tile_index * tb
        return self.pool[block, start: start + tb]

    def token_codes(self, block: int, row: int, which: str, head: int) -> np.ndarray:
        """The codes [d] stored for block row ``row`` (token slot) of a head."""
        return read_tile_slot(self.tile(block, which, head, row // TILE_TOKENS), row % TILE_TOKENS,
                              self._bits(which, head), which, self.q.fmt.head_dim)

    def block_codes(self, block: int, which: str, head: int) -> np.ndarray:
        """Codes [T, d] of every slot of a block of a head (unwritten slots: whatever bits are there)."""
        t = self.layout.tokens_per_block
        bits = self._bits(which, head)
        return np.concatenate([unpack_tile(self.tile(block, which, head, q), bits, which,
                                           self.q.fmt.head_dim) for q in range(t // TILE_TOKENS)])

    def write(self, k: np.ndarray, v: np.ndarray, positions: np.ndarray, block_table: np.ndarray,
              seq_index: np.ndarray, seq_slot: np.ndarray) -> None:
        """Write tokens: k, v [tokens, H, d] original domain; position and sequence of each token.

        Sink positions go to the sink pool (fp16, transformed) and, like every token, to the block.
        With a recent-token window every token also goes to ring index ``p % w`` of its slot;
        tokens are written in the order given, so a later position overwrites an earlier one.
        """
        fmt, lay = self.q.fmt, self.layout
        d, t = fmt.head_dim, lay.tokens_per_block
        yk = self.q.transform(k, "k")
        yv = self.q.transform(v, "v")
        ek = self.q.encode_transformed(yk, "k")
        ev = self.q.encode_transformed(yv, "v")
        w = fmt.recent_tokens
        for i, (p, s) in enumerate(zip(np.asarray(positions), np.asarray(seq_index))):
            if p < fmt.sink_tokens:
                slot = seq_slot[s]
                self.sinks[slot, :, 0, p] = yk[i].astype(np.float16)
                self.sinks[slot, :, 1, p] = yv[i].astype(np.float16)
            if w:
                slot = seq_slot[s]
                self.recent[slot, :, 0, p % w] = yk[i].astype(np.float16)
                self.recent[slot, :, 1, p % w] = yv[i].astype(np.float16)
                self.recent_positions[slot, p % w] = p
            blk = block_table[s, p // t]
            r = p % t
            for h in range(fmt.kv_heads):
                for which, enc in (("k", ek), ("v", ev)):
                    bits = self._bits(which, h)
                    write_tile_slot(self.tile(blk, which, h, r // TILE_TOKENS), r % TILE_TOKENS,
                                    unpack_codes(enc.codes[h][i], bits, d), bits, which)
                self._array(blk, lay.k_meta[h], fmt.meta_bytes)[r] = ek.meta[h][i]
                self._array(blk, lay.v_meta[h], fmt.meta_bytes)[r] = ev.meta[h][i]

    def read(self, block_table_row: np.ndarray, length: int, slot: int) -> tuple[np.ndarray, np.ndarray]:
        """Transformed-domain K and V [length, H, d] of one sequence as a query at position
        ``length - 1`` reads them: dequantized codes, fp16 sinks for positions ``< n_s`` and
        fp16 ring entries for positions ``>= length - w``. The ring must hold exactly those
        positions (the sequence's last ``w`` written tokens), otherwise FormatError."""
        fmt, lay = self.q.fmt, self.layout
        t = lay.tokens_per_block
        kc = [[] for _ in range(fmt.kv_heads)]
        vc, km, vm = ([[] for _ in range(fmt.kv_heads)] for _ in range(3))
        for p in range(length):
            blk, r = block_table_row[p // t], p % t
            for h in range(fmt.kv_heads):
                kc[h].append(pack_codes(self.token_codes(blk, r, "k", h), fmt.k_bits[h]))
                vc[h].append(pack_codes(self.token_codes(blk, r, "v", h), fmt.v_bits[h]))
                km[h].append(self._array(blk, lay.k_meta[h], fmt.meta_bytes)[r])
                vm[h].append(self._array(blk, lay.v_meta[h], fmt.meta_bytes)[r])
        ks = self.q.decode_transformed(EncodedKV([np.array(a) for a in kc], [np.array(a) for a in km]), "k")
        vs = self.q.decode_transformed(EncodedKV([np.array(a) for a in vc], [np.array(a) for a in vm]), "v")
        ns = min(fmt.sink_tokens, length)
        if ns:
            ks[:ns] = self.sinks[slot, :, 0, :ns].transpose(1, 0, 2).astype(np.float32)
            vs[:ns] = self.sinks[slot, :, 1, :ns].transpose(1, 0, 2).astype(np.float32)
        w = fmt.recent_tokens
        for p in range(max(0, length - w), length) if w else ():
            held = int(self.recent_positions[slot, p % w])
            if held != p:
                raise FormatError(f"the recent ring of slot {slot} holds position {held} at index "
                                  f"{p % w}, not {p}: read a sequence at the length it was "
                                  "written to")
            ks[p] = self.recent[slot, :, 0, p % w].astype(np.float32)
            vs[p] = self.recent[slot, :, 1, p % w].astype(np.float32)
        return ks, vs


def reference_attention(quantizer: LayerQuantizer, q: np.ndarray, k_t: np.ndarray,
                        v_t: np.ndarray, q_positions: np.ndarray | None = None,
                        scale: float | None = None, k_exact: np.ndarray | None = None,
                        v_exact: np.ndarray | None = None) -> np.ndarray:
    """float64 attention over a dequantized transformed-domain cache, output in the original domain.

    q [n, Hq, d] original domain (post-RoPE); k_t, v_t [L, H, d] transformed domain.
    Query i attends to keys 0..q_positions[i] (causal); default: every query sees all L keys.
    With a recent-token window (``recent_tokens = w > 0``), ``q_positions`` and the fp16
    transformed values ``k_exact``, ``v_exact`` [L, H, d], query i at position p reads keys and
    values ``p - w < j <= p`` from the exact arrays and the others from k_t, v_t
    (docs/format.md §5.2). Returns [n, Hq, d] float64: the function the attention kernels compute.
    """
    fmt = quantizer.fmt
    n, hq, d = q.shape
    g = hq // fmt.kv_heads
    qt = quantizer.transform_q(q).astype(np.float64)
    kt = np.repeat(np.asarray(k_t, np.float64), g, axis=1)  # [L, Hq, d]
    vt = np.repeat(np.asarray(v_t, np.float64), g, axis=1)
    sm = (1.0 / math.sqrt(d)) if scale is None else scale
    logits = np.einsum("nhd,lhd->hnl", qt, kt) * sm
    win = None
    if fmt.recent_tokens and k_exact is not None:
        if q_positions is None or v_exact is None:
            raise FormatError("a recent-token window needs q_positions, k_exact and v_exact")
        dist = np.asarray(q_positions)[:, None] - np.arange(kt.shape[0])[None, :]
        win = (dist >= 0) & (dist < fmt.recent_tokens)  # [n, L]
        ke = np.repeat(np.asarray(k_exact, np.float64), g, axis=1)
        logits = np.where(win[None], np.einsum("nhd,lhd->hnl", qt, ke) * sm, logits)
    if q_positions is not None:
        mask = np.arange(kt.shape[0])[None, :] > np.asarray(q_positions)[:, None]
        logits = np.where(mask[None], -np.inf, logits)
    logits -= logits.max(axis=-1, keepdims=True)
    w = np.exp(logits)
    w /= w.sum(axis=-1, keepdims=True)
    if win is None:
        ot = np.einsum("hnl,lhd->nhd", w, vt)
    else:
        ve = np.repeat(np.asarray(v_exact, np.float64), g, axis=1)
        ot = (np.einsum("hnl,lhd->nhd", np.where(win[None], 0.0, w), vt)
              + np.einsum("hnl,lhd->nhd", np.where(win[None], w, 0.0), ve))
    t = quantizer.tables
    sv = np.repeat(t.v_smooth, g, axis=0).astype(np.float64)
    mv = np.repeat(t.v_mean, g, axis=0).astype(np.float64)
    if fmt.rotation:
        signs = t.signs.astype(np.float64)
        h = _hadamard_matrix(d)
        ot = (ot @ h.T) / math.sqrt(d) * signs
    return sv * ot + mv


@lru_cache(maxsize=None)
def _hadamard_matrix(d: int) -> np.ndarray:
    i = np.arange(d)
    bits = np.bitwise_and(i[:, None], i[None, :])
    pop = np.vectorize(lambda x: bin(int(x)).count("1"))(bits)
    return np.where(pop % 2 == 0, 1.0, -1.0)


__all__ = [
    "EncodedKV", "LayerQuantizer", "LayerTables", "PagedPool",
    "codebook", "codebook_boundaries", "codebook_int8", "dequantize_turbo", "dequantize_uniform",
    "codebook_mse", "gaussian_mse", "hadamard", "lloyd_max_codebook", "ordered_sum", "pack_codes", "pack_tile",
    "quantize_turbo", "quantize_uniform", "read_tile_slot", "recode_8", "scale8_encode_up", "turbo8_scale", "TURBO8_TOP", "scale8_decode", "scale8_encode",
    "scale8_tables", "scale_exp_for_max", "turbo_scale", "DEFAULT_SCALE_EXP", "SCALE8_STEPS", "SCALE_EXP_MAX",
    "SCALE_EXP_MIN", "reference_attention", "rotate",
    "rotation_signs", "rsqrt_d", "tile_bytes", "tile_position", "unpack_codes", "unpack_tile",
    "unrotate", "write_tile_slot",
]
