// Codes -> fp16 codebook values in registers (internal header).
//
// For 2, 3 and 4 bits the codebook's fp16 values sit in four registers (low bytes and high bytes of
// up to 8 entries) and a byte permute (PRMT) looks four codes up at once; codes are first spread
// into 4-bit selector nibbles with a few shifts and masks. 8-bit codes look up a 256-entry fp16
// table in shared memory. A group of N codes (N = 8 or 16, consecutive channels of one vector)
// becomes N/2 half2 registers; Dequant<B, N>::perm(j) says which channel of the group lands in
// half j/2 (low half for even j). Query and output fragments use the same permutation, so the
// order never has to be undone.
#pragma once

#include "common.cuh"
#include "turboquant/codebooks.h"

namespace turboquant
{
namespace detail
{

template <int B>
struct CodebookOf;
template <>
struct CodebookOf<2>
{
    static __device__ __forceinline__ float at(int i) { return kDevCodebook2[i]; }
};
template <>
struct CodebookOf<3>
{
    static __device__ __forceinline__ float at(int i) { return kDevCodebook3[i]; }
};
template <>
struct CodebookOf<4>
{
    static __device__ __forceinline__ float at(int i) { return kDevCodebook4[i]; }
};
template <>
struct CodebookOf<8>
{
    static __device__ __forceinline__ float at(int i) { return kDevCodebook8[i]; }
};

// Low and high bytes of up to 8 fp16 codebook entries, for PRMT lookups.
struct ByteTable
{
    uint32_t lo0, lo1, hi0, hi1;
};

// What a dequantizer needs: the byte table (2-4 bits) or the shared-memory fp16 table (8 bits).
struct DeqCtx
{
    ByteTable t;
    uint16_t const* table8; // [256] fp16 bits in shared memory (8-bit codes only)
};

// B = 2, 3: entries c[0..2^B); B = 4: the positive half c[8..16) (the sign comes from bit 3).
template <int B>
__device__ __forceinline__ ByteTable makeByteTable()
{
    ByteTable t{0, 0, 0, 0};
    constexpr int n = B == 4 ? 8 : (1 << B);
    constexpr int first = B == 4 ? 8 : 0;
#pragma unroll
    for (int e = 0; e < n; ++e)
    {
        uint32_t h = __half_as_ushort(__float2half_rn(CodebookOf<B>::at(first + e)));
        uint32_t lo = h & 0xFFu;
        uint32_t hi = h >> 8;
        if (e < 4)
        {
            t.lo0 |= lo << (8 * e);
            t.hi0 |= hi << (8 * e);
        }
        else
        {
            t.lo1 |= lo << (8 * (e - 4));
            t.hi1 |= hi << (8 * (e - 4));
        }
    }
    return t;
}

// Four selector nibbles (low 16 bits of sel) -> two half2: (nib0, nib1), (nib2, nib3).
__device__ __forceinline__ void lookup4(ByteTable const& t, uint32_t sel, uint32_t& h01, uint32_t& h23)
{
    uint32_t l = prmt(t.lo0, t.lo1, sel);
    uint32_t h = prmt(t.hi0, t.hi1, sel);
    h01 = prmt(l, h, 0x5140);
    h23 = prmt(l, h, 0x7362);
}

__device__ __forceinline__ void lookup4Signed(
    ByteTable const& t, uint32_t sel, uint32_t signBytes, uint32_t& h01, uint32_t& h23)
{
    uint32_t l = prmt(t.lo0, t.lo1, sel);
    uint32_t h = prmt(t.hi0, t.hi1, sel) | signBytes;
    h01 = prmt(l, h, 0x5140);
    h23 = prmt(l, h, 0x7362);
}

// Spread bit i of the low 16 bits to bit 2i.
__device__ __forceinline__ uint32_t morton16(uint32_t m)
{
    m &= 0xFFFFu;
    m = (m | (m << 8)) & 0x00FF00FFu;
    m = (m | (m << 4)) & 0x0F0F0F0Fu;
    m = (m | (m << 2)) & 0x33333333u;
    m = (m | (m << 1)) & 0x55555555u;
    return m;
}

// Selector words (8 nibbles each) of 16 two-bit codes, plus optional third bits: even codes in
// `se`, odd codes in `so`, nibble k = code 2k (resp. 2k + 1).
__device__ __forceinline__ void selectors16(uint32_t low, uint32_t high, bool three, uint32_t& se, uint32_t& so)
{
    se = low & 0x33333333u;
    so = (low >> 2) & 0x33333333u;
    if (three)
    {
        uint32_t m = morton16(high);
        se |= (m << 2) & 0x44444444u;
        so |= m & 0x44444444u;
    }
}

template <int B, int N>
struct Dequant;

// ---- 2 and 3 bits: perm = even codes first, then odd codes, in pairs ------------------------
template <int B, int N>
struct DequantLow
{
    static_assert(N == 8 || N == 16, "groups of 8 or 16 codes");
    // channel of the group in half j/2 (low half for even j)
    static __host__ __device__ constexpr int perm(int j)
    {
        return (j / 2) < N / 4 ? 4 * (j / 2) + 2 * (j % 2) : 4 * (j / 2 - N / 4) + 2 * (j % 2) + 1;
    }
    // row: the vector's packed codes; c0: first code of the group (multiple of N); d: head_dim.
    static __device__ __forceinline__ void run(
        DeqCtx const& ctx, uint8_t const* row, int c0, int d, uint32_t (&out)[N / 2])
    {
        ByteTable const& t = ctx.t;
        constexpr bool three = B == 3;
        if constexpr (N == 16)
        {
            uint32_t low = *reinterpret_cast<uint32_t const*>(row + c0 / 4);
            uint32_t high = three ? *reinterpret_cast<uint16_t const*>(row + d / 4 + c0 / 8) : 0u;
            uint32_t se, so;
            selectors16(low, high, three, se, so);
            lookup4(t, se, out[0], out[1]);
            lookup4(t, se >> 16, out[2], out[3]);
            lookup4(t, so, out[4], out[5]);
            lookup4(t, so >> 16, out[6], out[7]);
        }
        else
        {
            uint32_t low = *reinterpret_cast<uint16_t const*>(row + c0 / 4);
            uint32_t high = three ? row[d / 4 + c0 / 8] : 0u;
            // even codes -> nibbles 0..3, odd codes -> nibbles 4..7
            uint32_t sel = (low & 0x3333u) | ((low << 14) & 0x33330000u);
            if (three)
            {
                uint32_t m = morton16(high); // bit i -> 2i: h_{2k} at 4k, h_{2k+1} at 4k + 2
                sel |= ((m << 2) & 0x4444u) | ((m << 16) & 0x44440000u);
            }
            lookup4(t, sel, out[0], out[1]);
            lookup4(t, sel >> 16, out[2], out[3]);
        }
    }
};

template <int N>
struct Dequant<2, N> : DequantLow<2, N>
{
};
template <int N>
struct Dequant<3, N> : DequantLow<3, N>
{
};

// ---- 4 bits: natural order; magnitude from the positive half, sign from bit 3 ---------------
template <int N>
struct Dequant<4, N>
{
    static __host__ __device__ constexpr int perm(int j) { return j; }
    static __device__ __forceinline__ void word8(ByteTable const& t, uint32_t x, uint32_t* out)
    {
        uint32_t nx = ~x & 0x88888888u;                  // bit 3 of each nibble: 1 = negative level
        uint32_t sel = (x ^ ((nx >> 3) * 7u)) & 0x77777777u; // index into c[8..16)
        uint32_t ya = prmt(nx, 0u, 0x1100);
        uint32_t yb = prmt(nx, 0u, 0x3322);
        uint32_t sa = ((ya << 4) & 0x00800080u) | (ya & 0x80008000u);
        uint32_t sb = ((yb << 4) & 0x00800080u) | (yb & 0x80008000u);
        lookup4Signed(t, sel, sa, out[0], out[1]);
        lookup4Signed(t, sel >> 16, sb, out[2], out[3]);
    }
    static __device__ __forceinline__ void run(
        DeqCtx const& ctx, uint8_t const* row, int c0, int /*d*/, uint32_t (&out)[N / 2])
    {
        ByteTable const& t = ctx.t;
        if constexpr (N == 16)
        {
            uint2 w = *reinterpret_cast<uint2 const*>(row + c0 / 2);
            word8(t, w.x, &out[0]);
            word8(t, w.y, &out[4]);
        }
        else
        {
            word8(t, *reinterpret_cast<uint32_t const*>(row + c0 / 2), &out[0]);
        }
    }
};

// ---- 8 bits: shared-memory table, natural order -------------------------------------------
template <int N>
struct Dequant<8, N>
{
    static __host__ __device__ constexpr int perm(int j) { return j; }
    static __device__ __forceinline__ void run(
        DeqCtx const& ctx, uint8_t const* row, int c0, int /*d*/, uint32_t (&out)[N / 2])
    {
        uint16_t const* table = ctx.table8;
#pragma unroll
        for (int w = 0; w < N / 8; ++w)
        {
            uint2 x = *reinterpret_cast<uint2 const*>(row + c0 + 8 * w);
#pragma unroll
            for (int k = 0; k < 4; ++k)
            {
                uint32_t word = k < 2 ? x.x : x.y;
                int sh = (k % 2) * 16;
                uint32_t a = table[(word >> sh) & 0xFFu];
                uint32_t b = table[(word >> (sh + 8)) & 0xFFu];
                out[4 * w + k] = a | (b << 16);
            }
        }
    }
};

} // namespace detail
} // namespace turboquant
