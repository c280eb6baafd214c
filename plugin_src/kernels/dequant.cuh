// Tile codes -> fp16 values in registers, for the context attention kernel (internal header).
//
// A lane reads its own lane chunk of a 32-slot tile (docs/format.md §5). Register rho of the chunk
// (unit rho / 8, selector j = (rho % 8) / 2, nibbles 4 * (rho % 2) .. +3) holds 4 codes y = 0..3
// that become two half2: (y0, y1) and (y2, y3). The fp16 values are e_b[code] / 32, exact for
// every int8 e; the factor 32 / lambda_b goes into the token's fp32 scale (CtxCodes<B>::kScale),
// so value * scale is the format's dec(scale8) * c_b[code] up to fp32 rounding.
//   2, 3 bits: selector nibbles index byte tables of the fp16 values with PRMT (4 codes per
//              two PRMTs plus two to interleave);
//   4 bits:    the same on the positive half of the symmetric table, the sign from bit 3;
//   8 bits:    the code byte becomes the mantissa of 1024 + code, one HFMA2 gives (code - 128) / 32.
#pragma once

#include "common.cuh"
#include "turboquant/codebooks.h"

namespace turboquant
{
namespace detail
{

template <int B>
__host__ __device__ constexpr int ctxE(int i)
{
    return B == 2 ? kCodebookInt82[i] : B == 3 ? kCodebookInt83[i] : B == 4 ? kCodebookInt84[i] : kCodebookInt88[i];
}

template <int B>
__host__ __device__ constexpr float ctxLambda()
{
    return B == 2 ? kCodebookLambda2 : B == 3 ? kCodebookLambda3 : B == 4 ? kCodebookLambda4 : kCodebookLambda8;
}

// fp16 bits of e / 32 for an integer |e| <= 128 (exact).
__host__ __device__ constexpr uint32_t halfBitsOf32th(int e)
{
    if (e == 0)
    {
        return 0u;
    }
    uint32_t const sign = e < 0 ? 0x8000u : 0u;
    int const a = e < 0 ? -e : e;
    int p = 0;
    while ((a >> (p + 1)) != 0)
    {
        ++p;
    }
    return sign | (static_cast<uint32_t>(p + 10) << 10) | (static_cast<uint32_t>(a << (10 - p)) & 0x3FFu);
}

// Low and high bytes of up to 8 fp16 table entries, for PRMT lookups.
struct ByteTable
{
    uint32_t lo0, lo1, hi0, hi1;
};

// word w of the byte table: 0 lo0, 1 lo1, 2 hi0, 3 hi1. B = 2, 3: entries e[0..2^B); B = 4: the
// positive half e[8..16) (the table is symmetric: e[15 - m] = -e[m]).
template <int B>
__host__ __device__ constexpr uint32_t ctxTableWord(int w)
{
    int const n = B == 4 ? 8 : (1 << B);
    int const first = B == 4 ? 8 : 0;
    uint32_t r = 0;
    for (int e = 0; e < 4; ++e)
    {
        int const idx = (w & 1) * 4 + e;
        if (idx < n)
        {
            uint32_t const h = halfBitsOf32th(ctxE<B>(first + idx));
            r |= (w < 2 ? (h & 0xFFu) : (h >> 8)) << (8 * e);
        }
    }
    return r;
}

template <int B>
__device__ __forceinline__ ByteTable ctxByteTable()
{
    constexpr uint32_t w0 = ctxTableWord<B>(0);
    constexpr uint32_t w1 = ctxTableWord<B>(1);
    constexpr uint32_t w2 = ctxTableWord<B>(2);
    constexpr uint32_t w3 = ctxTableWord<B>(3);
    return ByteTable{w0, w1, w2, w3};
}

// Four selector nibbles (low 16 bits of sel) -> two half2: (nib0, nib1), (nib2, nib3).
__device__ __forceinline__ void lookup4(ByteTable const& t, uint32_t sel, uint32_t& h01, uint32_t& h23)
{
    uint32_t const l = prmt(t.lo0, t.lo1, sel);
    uint32_t const h = prmt(t.hi0, t.hi1, sel);
    h01 = prmt(l, h, 0x5140);
    h23 = prmt(l, h, 0x7362);
}

// 4-bit codes: nibbles 0..3 of x (low 16 bits) -> two half2 via the positive half and the sign.
__device__ __forceinline__ void lookup4Bit4(ByteTable const& t, uint32_t x, uint32_t& h01, uint32_t& h23)
{
    uint32_t const nx = ~x & 0x8888u;                        // bit 3 of each nibble: 1 = negative level
    uint32_t const sel = (x ^ ((nx >> 3) * 7u)) & 0x7777u;   // index into e[8..16)
    uint32_t const ya = prmt(nx, 0u, 0x1100);
    uint32_t const sa = ((ya << 4) & 0x00800080u) | (ya & 0x80008000u); // sign bits of the 4 halves
    uint32_t const l = prmt(t.lo0, t.lo1, sel);
    uint32_t const h = prmt(t.hi0, t.hi1, sel) | sa;
    h01 = prmt(l, h, 0x5140);
    h23 = prmt(l, h, 0x7362);
}

template <int B>
struct CtxCodes
{
    static constexpr float kScale = 32.F / ctxLambda<B>(); // fp32, applied to the token's scale

    // Register r8 (= rho % 8) of a unit -> (y0, y1), (y2, y3) as half2 of e / 32.
    static __device__ __forceinline__ void reg(ByteTable const& t, uint32_t const (&W)[B], int r8, uint32_t& h01, uint32_t& h23)
    {
        int const j = r8 >> 1;
        int const sh = 16 * (r8 & 1);
        if constexpr (B == 8)
        {
            uint32_t const x = W[r8];
            uint32_t const a = prmt(x, 0x64646464u, 0x4140); // (1024 + code) as fp16, y0 y1
            uint32_t const b = prmt(x, 0x64646464u, 0x4342); // y2 y3
            __half2 const k = __floats2half2_rn(1.F / 32.F, 1.F / 32.F);
            __half2 const o = __floats2half2_rn(-36.F, -36.F);
            __half2 const ra = __hfma2(*reinterpret_cast<__half2 const*>(&a), k, o);
            __half2 const rb = __hfma2(*reinterpret_cast<__half2 const*>(&b), k, o);
            h01 = *reinterpret_cast<uint32_t const*>(&ra);
            h23 = *reinterpret_cast<uint32_t const*>(&rb);
        }
        else
        {
            uint32_t s;
            if constexpr (B == 2)
            {
                s = (W[j >> 1] >> (2 * (j & 1))) & 0x33333333u;
            }
            else if constexpr (B == 3)
            {
                s = j < 3 ? (W[j] & 0x77777777u)
                          : (((W[0] >> 3) & 0x11111111u) | ((W[1] >> 2) & 0x22222222u) | ((W[2] >> 1) & 0x44444444u));
            }
            else
            {
                s = W[j];
            }
            if constexpr (B == 4)
            {
                lookup4Bit4(t, s >> sh, h01, h23);
            }
            else
            {
                lookup4(t, s >> sh, h01, h23);
            }
        }
    }
};

} // namespace detail
} // namespace turboquant
