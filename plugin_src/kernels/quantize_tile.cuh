// Closed-form placement of one slot's codes in a 32-slot tile (docs/format.md §5.1), for the write
// kernel (internal header; plain C++ apart from PRMT, so a host program can check it against
// tqTilePos / tqUnitBit).
//
// The writer of slot tau first puts its d codes (one byte each) into a small array in one of two
// orders, then every lane builds whole 32-bit words of the tile from a few 32-bit reads of it:
//
//   K: natural order, byte c = code of channel c. Slot tau owns, in the lane chunks L = 4(tau%8) + t'
//      (t' = 0..3), one unit: d = 128: U = tau/8, every selector j; d = 64: U = tau/16, the
//      selectors j with j/2 == (tau/8)%2. Position (j, n) of that unit is channel
//      32s + 16(n/4) + 4t' + n%4 with s = j (d = 128) or j%2 (d = 64), so the nibbles n = 0..3 and
//      4..7 of selector j are two aligned 32-bit reads. Each word k of the unit is one item.
//   V: "by channel mod 8" order, byte (c%8)·(d/8) + c/8 = code of channel c. Slot tau owns, in
//      every lane chunk L = 4g + (tau%16)/4 and unit U, the positions j in {kh, kh+2} (kh = tau/16)
//      and n in {y, y+4} (y = tau%4): channels 32U + 16(j/2) + 8(n/4) + g, the four bytes of one
//      aligned 32-bit read. Each (g, U) pair gives 2 to 4 items (words shared with other slots).
//
// An item is (byte offset in the tile, mask of the slot's bits, value); a full mask means no other
// slot has bits in that word.
#pragma once

#include "turboquant/format.h"

#include <cstdint>

namespace turboquant
{
namespace detail
{

TQ_HOST_DEVICE inline uint32_t tqPrmt(uint32_t a, uint32_t b, uint32_t sel)
{
#if defined(__CUDA_ARCH__)
    uint32_t r;
    asm("prmt.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(sel));
    return r;
#else
    uint64_t const x = (static_cast<uint64_t>(b) << 32) | a;
    uint32_t r = 0;
    for (int q = 0; q < 4; ++q)
    {
        uint32_t const s = (sel >> (4 * q)) & 7u; // no sign-replication selectors are used
        r |= static_cast<uint32_t>((x >> (8 * s)) & 0xFFu) << (8 * q);
    }
    return r;
#endif
}

// Two words of four byte-sized values < 16 -> one word whose nibble n is byte n of x0 (n < 4) or
// byte n - 4 of x1.
TQ_HOST_DEVICE inline uint32_t tqNibbles(uint32_t x0, uint32_t x1)
{
    return tqPrmt(x0 | (x0 >> 4), x1 | (x1 >> 4), 0x6420u);
}

// Byte index of channel c in the V writer's code array.
template <int D>
TQ_HOST_DEVICE constexpr int tqVCodeIndex(int c)
{
    return (c % 8) * (D / 8) + c / 8;
}

template <int B>
TQ_HOST_DEVICE constexpr int tqKItems()
{
    return 4 * B; // 4 lane chunks x B words of the unit
}

template <int B>
TQ_HOST_DEVICE constexpr int tqVItemsPerPair()
{
    return B == 8 ? 4 : (B == 3 ? 3 : 2);
}

// K item `item` (0 .. 4B-1) of slot tau. codes: the d codes in natural order as d/4 words.
template <int D, int B>
TQ_HOST_DEVICE inline void tqKTileWord(int tau, int item, uint32_t const* codes, int32_t& off, uint32_t& mask, uint32_t& val)
{
    static_assert(D == 64 || D == 128, "tile writer: head_dim 64 or 128");
    int const tp = item / B; // t'
    int const k = item % B;  // word of the unit
    int const i = tau / 8;
    int const unit = D == 128 ? i : i / 2;
    // s of selector j: the 32-channel group; h: nibbles 0..3 or 4..7
    auto C = [&](int j, int h) { return codes[8 * (D == 128 ? j : j % 2) + 4 * h + tp]; };
    auto owned = [&](int j) { return D == 128 || (j / 2) == (i % 2); };
    off = (4 * (tau % 8) + tp) * (D * B / 8) + unit * 4 * B + 4 * k;
    if (B == 2)
    {
        // nibble n = code(2k, n) | code(2k+1, n) << 2
        val = tqNibbles(C(2 * k, 0) | (C(2 * k + 1, 0) << 2), C(2 * k, 1) | (C(2 * k + 1, 1) << 2));
        mask = owned(2 * k) ? 0xFFFFFFFFu : 0u;
    }
    else if (B == 3)
    {
        // nibble n = code(k, n) | (bit k of code(3, n)) << 3
        val = tqNibbles(C(k, 0) | (((C(3, 0) >> k) & 0x01010101u) << 3), C(k, 1) | (((C(3, 1) >> k) & 0x01010101u) << 3));
        mask = (owned(k) ? 0x77777777u : 0u) | (owned(3) ? 0x88888888u : 0u);
    }
    else if (B == 4)
    {
        val = tqNibbles(C(k, 0), C(k, 1));
        mask = owned(k) ? 0xFFFFFFFFu : 0u;
    }
    else
    {
        // word w = 2j + n/4, byte n%4
        val = C(k / 2, k % 2);
        mask = owned(k / 2) ? 0xFFFFFFFFu : 0u;
    }
    val &= mask;
}

// V item q (0 .. tqVItemsPerPair<B>()-1) of pair `pair` (g = pair % 8, U = pair / 8, 0 .. d/4-1)
// of slot tau. codes: the d codes in tqVCodeIndex order as d/4 words. mask 0: nothing to write.
template <int D, int B>
TQ_HOST_DEVICE inline void tqVTileWord(int tau, int pair, int q, uint32_t const* codes, int32_t& off, uint32_t& mask, uint32_t& val)
{
    static_assert(D == 64 || D == 128, "tile writer: head_dim 64 or 128");
    int const g = pair % 8;
    int const unit = pair / 8;
    int const kh = tau / 16;
    int const y = tau % 4;
    // byte r' = 2(j/2) + n/4 of v4 is the code of channel 32U + 8r' + g
    uint32_t const v4 = codes[g * (D / 32) + unit];
    int const base = (4 * g + (tau % 16) / 4) * (D * B / 8) + unit * 4 * B;
    // t(k2): code of r' = 2k2 at bits 0.., of r' = 2k2+1 at bits 16..
    uint32_t const t0 = tqPrmt(v4, 0u, 0x4140u);
    uint32_t const t1 = tqPrmt(v4, 0u, 0x4342u);
    int w = 0;
    if (B == 2)
    {
        // W[k2] bits 4n + 2kh.. : j = 2k2 + kh
        w = q;
        int const sh = 4 * y + 2 * kh;
        val = (q == 0 ? t0 : t1) << sh;
        mask = 0x00030003u << sh;
    }
    else if (B == 4)
    {
        // W[j], j = kh + 2k2
        w = kh + 2 * q;
        val = (q == 0 ? t0 : t1) << (4 * y);
        mask = 0x000F000Fu << (4 * y);
    }
    else if (B == 3)
    {
        w = kh == 0 ? 2 * q : q;
        if (kh == 0)
        {
            // j = 0 -> W0, j = 2 -> W2, low three bits of the nibbles
            val = (q == 0 ? t0 : t1) << (4 * y);
            mask = q < 2 ? 0x00070007u << (4 * y) : 0u;
        }
        else
        {
            // j = 1 -> W1 low bits; j = 3 -> bit k of the code at bit 3 of W[k]'s nibbles
            uint32_t const hi = ((t1 >> q) & 0x00010001u) << 3;
            val = (q == 1 ? (t0 | hi) : hi) << (4 * y);
            mask = (q == 1 ? 0x000F000Fu : 0x00080008u) << (4 * y);
        }
    }
    else
    {
        // W[2j + r] byte y, j = kh + 2k2, r' = 2k2 + r
        int const k2 = q / 2;
        int const r = q % 2;
        w = 2 * (kh + 2 * k2) + r;
        val = ((v4 >> (8 * (2 * k2 + r))) & 0xFFu) << (8 * y);
        mask = 0xFFu << (8 * y);
    }
    val &= mask;
    off = base + 4 * w;
}

} // namespace detail
} // namespace turboquant
