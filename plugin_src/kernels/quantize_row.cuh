// The write path's per-row device code (internal header): one warp transforms, quantizes and packs
// one new K or V row of one KV head (docs/format.md §2-§5). quantize.cu's write kernel and the decode
// kernel's fused write (decode_kernel.cuh) both run it, so their bytes are the same.
//
// All arithmetic is fp32 in the order docs/format.md fixes (IEEE add/mul/div/sqrt, no fused
// multiply-add, the Hadamard butterflies in the reference order, sums in numpy's pairwise order),
// so the bytes equal turboquant_trt.reference's bytes.
#pragma once

#include "common.cuh"
#include "quantize_tile.cuh"
#include "turboquant/codebooks.h"
#include "turboquant/format.h"
#include "turboquant/scale8.h"

#include <cstdint>

namespace turboquant
{
namespace detail
{

// Stand-ins for absent tables (mean 0, smoothing 1), so that every load is issued unconditionally;
// the arithmetic skips them (x - 0 and x / 1 are exact no-ops anyway).
static __device__ uint16_t const kZeroTable[kMaxHeadDim] = {};
static __device__ uint16_t const kOneTable[kMaxHeadDim] = {
#define TQ_ONE8 0x3C00, 0x3C00, 0x3C00, 0x3C00, 0x3C00, 0x3C00, 0x3C00, 0x3C00
#define TQ_ONE64 TQ_ONE8, TQ_ONE8, TQ_ONE8, TQ_ONE8, TQ_ONE8, TQ_ONE8, TQ_ONE8, TQ_ONE8
    TQ_ONE64, TQ_ONE64, TQ_ONE64, TQ_ONE64,
#undef TQ_ONE64
#undef TQ_ONE8
};

// Codebook value / boundary at an index known at compile time: immediate operands (no constant
// bank, whose cache is cold at the kernel's start).
template <int B, int J>
struct CodebookConst
{
    static constexpr float value = B == 2 ? kCodebook2[J] : (B == 3 ? kCodebook3[J] : kCodebook4[J]);
};

template <int B, int J>
struct BoundaryConst
{
    static constexpr float value = B == 2 ? kBoundaries2[J] : (B == 3 ? kBoundaries3[J] : kBoundaries4[J]);
};

// c[code] from the boundary comparisons p[j] = (u > beta[j]), code in [Lo, Lo + N): a select tree
// on the middle comparison of each range (p is monotone: p[j] implies p[j-1]; a NaN makes all
// false), so c is ready a few selects after the comparisons.
template <int B, int Lo, int N>
__device__ __forceinline__ float codebookTree(bool const* p)
{
    if constexpr (N == 1)
    {
        return CodebookConst<B, Lo>::value;
    }
    else
    {
        float const lo = codebookTree<B, Lo, N / 2>(p);
        float const hi = codebookTree<B, Lo + N / 2, N / 2>(p);
        return p[Lo + N / 2 - 1] ? hi : lo;
    }
}

// Number of true p[Lo .. Lo + N) as a balanced sum.
template <int Lo, int N>
__device__ __forceinline__ int countTrue(bool const* p)
{
    if constexpr (N == 1)
    {
        return p[Lo] ? 1 : 0;
    }
    else
    {
        return countTrue<Lo, N / 2>(p) + countTrue<Lo + N / 2, N - N / 2>(p);
    }
}

// p[j] = u > beta[j] for j in [J, N).
template <int B, int J, int N>
__device__ __forceinline__ void compareBoundaries(float u, bool* p)
{
    if constexpr (J < N)
    {
        p[J] = u > BoundaryConst<B, J>::value;
        compareBoundaries<B, J + 1, N>(u, p);
    }
}

// code = #{ j : u > beta[j] } (docs/format.md §3.1; a NaN gets code 0) and fp32 c[code].
template <int B>
__device__ __forceinline__ int turboCode(float u, float& c)
{
    if constexpr (B == 8)
    {
        // c[m] = (m - 128) / 32 and beta[j] = (2j - 255) / 64 exactly, so with v = 64u (exact):
        // u > beta[j] <=> v > 2j - 255. The candidate ceil((v + 255) / 2) can be one off where
        // v + 255 rounds; one exact comparison on each side fixes it.
        float const v = __fmul_rn(u, 64.F);
        float const cand = ceilf(__fmul_rn(__fadd_rn(v, 255.F), 0.5F));
        int code = static_cast<int>(fminf(fmaxf(cand, 0.F), 255.F));
        if (code > 0 && !(v > static_cast<float>(2 * code - 257)))
        {
            --code;
        }
        else if (code < 255 && v > static_cast<float>(2 * code - 255))
        {
            ++code;
        }
        c = __fmul_rn(static_cast<float>(code - 128), 0.03125F);
        return code;
    }
    else
    {
        constexpr int kLevels = 1 << B;
        bool p[kLevels - 1];
        compareBoundaries<B, 0, kLevels - 1>(u, p);
        c = codebookTree<B, 0, kLevels>(p);
        return countTrue<0, kLevels - 1>(p);
    }
}

// The fp32 sum of v[0..D) in the order of docs/format.md §3.1, in every lane: lane j % 8 runs
// r[j] = v[j] + v[j+8] + ... of each 128-element chunk left to right, then the fixed tree
// ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7)) by xor shuffles (a + b == b + a exactly).
template <int D>
__device__ __forceinline__ float orderedSum(float const* v, int lane)
{
    constexpr int kChunk = D < 128 ? D : 128;
    int const j = lane & 7;
    float total = 0.F;
#pragma unroll
    for (int hc = 0; hc < D / kChunk; ++hc)
    {
        float r = v[hc * kChunk + j];
#pragma unroll
        for (int q = 1; q < kChunk / 8; ++q)
        {
            r = __fadd_rn(r, v[hc * kChunk + 8 * q + j]);
        }
        r = __fadd_rn(r, __shfl_xor_sync(0xffffffffu, r, 1));
        r = __fadd_rn(r, __shfl_xor_sync(0xffffffffu, r, 2));
        r = __fadd_rn(r, __shfl_xor_sync(0xffffffffu, r, 4));
        total = hc == 0 ? r : __fadd_rn(total, r);
    }
    return total;
}

// E consecutive 16-bit values: one vector load (Vec: the address is aligned to 2E bytes) or E loads.
template <int E, bool Vec>
__device__ __forceinline__ void loadU16(uint16_t const* p, uint16_t (&o)[E])
{
    if constexpr (Vec && E == 4)
    {
        uint2 const w = __ldg(reinterpret_cast<uint2 const*>(p));
        o[0] = static_cast<uint16_t>(w.x);
        o[1] = static_cast<uint16_t>(w.x >> 16);
        o[2] = static_cast<uint16_t>(w.y);
        o[3] = static_cast<uint16_t>(w.y >> 16);
    }
    else if constexpr (Vec && E == 2)
    {
        uint32_t const w = __ldg(reinterpret_cast<uint32_t const*>(p));
        o[0] = static_cast<uint16_t>(w);
        o[1] = static_cast<uint16_t>(w >> 16);
    }
    else
    {
#pragma unroll
        for (int e = 0; e < E; ++e)
        {
            o[e] = __ldg(p + e);
        }
    }
}

// Stores E floats at s[0..E) (16-byte aligned for E = 4, 8-byte for E = 2).
template <int E>
__device__ __forceinline__ void storeF32(float* s, float const (&v)[E])
{
    if constexpr (E == 4)
    {
        *reinterpret_cast<float4*>(s) = make_float4(v[0], v[1], v[2], v[3]);
    }
    else if constexpr (E == 2)
    {
        *reinterpret_cast<float2*>(s) = make_float2(v[0], v[1]);
    }
    else
    {
#pragma unroll
        for (int e = 0; e < E; ++e)
        {
            s[e] = v[e];
        }
    }
}

// Stores E floats as fp16 (round to nearest) at d[0..E): the sink, ring and exact copies.
template <int E>
__device__ __forceinline__ void storeFp16(uint16_t* d, float const (&v)[E])
{
#pragma unroll
    for (int e = 0; e < E; ++e)
    {
        d[e] = __half_as_ushort(__float2half_rn(v[e]));
    }
}

// One 32-bit word of a tile: a whole word owned by the slot is stored, a shared one gets
// atomicAnd(~mask) then atomicOr(bits) (docs/format.md §5.1), so that slots of a tile may be
// written concurrently and other slots' bits stay.
__device__ __forceinline__ void putTileWord(uint8_t* tile, int32_t off, uint32_t mask, uint32_t val)
{
    uint32_t* w = reinterpret_cast<uint32_t*>(tile + off);
    if (mask == 0xFFFFFFFFu)
    {
        *w = val;
    }
    else if (mask != 0u)
    {
        atomicAnd(w, ~mask);
        atomicOr(w, val);
    }
}

// max(a, b) that keeps a NaN of either operand (fmaxf drops it)
__device__ __forceinline__ float nanMax(float a, float b)
{
    return (a != a || b != b) ? __int_as_float(0x7fc00000) : fmaxf(a, b);
}

struct SlotDest
{
    int32_t codesOff; // the head's K or V codes array in the block
    int32_t metaOff;  // the head's K or V scales
    int32_t r;        // slot in the block
    int32_t scaleExp; // E of the head's K or V scales
};

// Quantizes the transformed vector x (lane holds channels lane*E .. +E-1) with B-bit codes and
// writes codes and the one-byte scale into the layer's block `block` (docs/format.md §3.1, §5). 2-4 bits: norm-based scale, codes
// written before the scale's second sum; 8 bits: the absmax scale rounded up, codes against it.
template <int D, int B>
__device__ __forceinline__ void quantizeStore(uint8_t* block, float sqrtD, bool normCorrection, float const (&x)[D / 32],
    bool isV, float gamma, float* sq, float* cq, uint32_t* codeWords, SlotDest const& dst, int lane)
{
    constexpr int E = D / 32;
    int const c0 = lane * E;
    int code[E];
    uint8_t scale8 = 0;
    float n = 0.F;
    if constexpr (B == 8)
    {
        // 8 bits: the scale is max|x_i| / c[255] rounded up on the one-byte grid, and the codes are
        // taken against the stored scale s = dec(scale8, E) (docs/format.md §3.1; a NaN anywhere
        // gives scale8 0 and zero codes, as in the reference)
        float m = 0.F;
#pragma unroll
        for (int e = 0; e < E; ++e)
        {
            m = nanMax(m, fabsf(x[e]));
        }
#pragma unroll
        for (int off = 16; off > 0; off >>= 1)
        {
            m = nanMax(m, __shfl_xor_sync(0xffffffffu, m, off));
        }
        float const scale = __fdiv_rn(m, 3.96875F);
        uint32_t k = tqScale8EncodeFixed(scale, dst.scaleExp);
        if (k > 0U && k < 255U && tqScale8Decode(k, dst.scaleExp, kDevScale8Frac) < scale)
        {
            ++k;
        }
        scale8 = static_cast<uint8_t>(k);
        float const sv = tqScale8Decode(k, dst.scaleExp, kDevScale8Frac);
#pragma unroll
        for (int e = 0; e < E; ++e)
        {
            float cv;
            code[e] = sv > 0.F ? turboCode<B>(__fdiv_rn(x[e], sv), cv) : 128;
        }
    }
    else
    {
        float x2[E];
#pragma unroll
        for (int e = 0; e < E; ++e)
        {
            x2[e] = __fmul_rn(x[e], x[e]);
        }
        storeF32<E>(sq + c0, x2);
        __syncwarp();
        n = __fsqrt_rn(orderedSum<D>(sq, lane));
        float const f = n > 0.F ? __fdiv_rn(sqrtD, __fmul_rn(gamma, n)) : 0.F;
        float c2[E];
#pragma unroll
        for (int e = 0; e < E; ++e)
        {
            float cv;
            code[e] = turboCode<B>(__fmul_rn(x[e], f), cv);
            c2[e] = __fmul_rn(cv, cv);
        }
        storeF32<E>(cq + c0, c2);
    }
    uint8_t* cb = reinterpret_cast<uint8_t*>(codeWords);
    if (!isV)
    {
        uint32_t packed = 0;
#pragma unroll
        for (int e = 0; e < E; ++e)
        {
            packed |= static_cast<uint32_t>(code[e]) << (8 * e);
        }
        if constexpr (E == 4)
        {
            codeWords[lane] = packed;
        }
        else
        {
            reinterpret_cast<uint16_t*>(cb)[lane] = static_cast<uint16_t>(packed);
        }
    }
    else
    {
#pragma unroll
        for (int e = 0; e < E; ++e)
        {
            cb[tqVCodeIndex<D>(c0 + e)] = static_cast<uint8_t>(code[e]);
        }
    }
    __syncwarp();

    // codes: whole 32-bit words of the tile (quantize_tile.cuh), before the second sum
    uint8_t* const tile = block + dst.codesOff + (dst.r / kTileTokens) * kTileTokens * (D * B / 8);
    int const tau = dst.r % kTileTokens;
    if (!isV)
    {
        if (lane < tqKItems<B>())
        {
            int32_t off;
            uint32_t mask, val;
            tqKTileWord<D, B>(tau, lane, codeWords, off, mask, val);
            putTileWord(tile, off, mask, val);
        }
    }
    else
    {
        constexpr int kPairs = D / 4; // (g, U) pairs
        constexpr int kLanesPerPair = 32 / kPairs;
        int const pair = lane % kPairs;
#pragma unroll
        for (int q0 = 0; q0 < tqVItemsPerPair<B>(); q0 += kLanesPerPair)
        {
            int const q = q0 + lane / kPairs;
            if (q < tqVItemsPerPair<B>())
            {
                int32_t off;
                uint32_t mask, val;
                tqVTileWord<D, B>(tau, pair, q, codeWords, off, mask, val);
                putTileWord(tile, off, mask, val);
            }
        }
    }

    if constexpr (B != 8)
    {
        float scale;
        if (normCorrection)
        {
            float const cn = __fsqrt_rn(orderedSum<D>(cq, lane));
            scale = cn > 0.F ? __fdiv_rn(n, cn) : 0.F;
        }
        else
        {
            scale = __fdiv_rn(__fmul_rn(gamma, n), sqrtD);
        }
        scale8 = tqScale8EncodeFixed(scale, dst.scaleExp);
    }
    if (lane == 0)
    {
        block[dst.metaOff + dst.r * kTurboMetaBytes] = scale8;
    }
}

// The loads of one new row (K or V of one KV head, lane: channels lane*E .. +E-1) and of its
// tables, issued before anything needs them so that their latencies overlap.
template <int D>
struct NewRow
{
    static constexpr int E = D / 32;
    uint16_t xs[E];
    uint16_t mu[E];
    uint16_t sm[E];
    uint16_t sg[E];
    float gamma;
};

// row: the row's first element (head 0); tables: [H][d] fp16 or null (absent: the stand-ins are
// read, so that every load is issued unconditionally); clipT: [H] or null. vec: the row, its
// tables and signs allow 8-byte (d = 128) or 4-byte (d = 64) loads.
template <int D>
__device__ __forceinline__ void loadNewRow(NewRow<D>& r, uint16_t const* row, uint16_t const* meanT, uint16_t const* smoothT,
    uint16_t const* clipT, uint16_t const* signs, int h, bool vec, int lane)
{
    constexpr int E = D / 32;
    int const c0 = lane * E;
    int64_t const hc = static_cast<int64_t>(h) * D + c0;
    uint16_t const* const xp = row + hc;
    uint16_t const* const mp = meanT != nullptr ? meanT + hc : kZeroTable + c0;
    uint16_t const* const sp = smoothT != nullptr ? smoothT + hc : kOneTable + c0;
    if (vec)
    {
        loadU16<E, true>(xp, r.xs);
        loadU16<E, true>(mp, r.mu);
        loadU16<E, true>(sp, r.sm);
        loadU16<E, true>(signs + c0, r.sg);
    }
    else
    {
        loadU16<E, false>(xp, r.xs);
        loadU16<E, false>(mp, r.mu);
        loadU16<E, false>(sp, r.sm);
        loadU16<E, false>(signs + c0, r.sg);
    }
    r.gamma = clipT != nullptr ? h2f(__ldg(clipT + h)) : 1.F;
}

// x = H((row - mean) / smooth * signs) / sqrt(d) in fp32 (docs/format.md §2; an absent table is
// mean 0 / smooth 1, skipped: exact no-ops anyway)
template <int D>
__device__ __forceinline__ void transformNewRow(
    NewRow<D> const& r, bool hasMean, bool hasSmooth, bool bf16, float rsqrtD, float (&x)[D / 32], int lane)
{
    constexpr int E = D / 32;
#pragma unroll
    for (int e = 0; e < E; ++e)
    {
        float v = bf16 ? __bfloat162float(__ushort_as_bfloat16(r.xs[e])) : h2f(r.xs[e]);
        if (hasMean)
        {
            v = __fsub_rn(v, h2f(r.mu[e]));
        }
        if (hasSmooth)
        {
            v = __fdiv_rn(v, h2f(r.sm[e]));
        }
        x[e] = __fmul_rn(v, h2f(r.sg[e]));
    }
    // Hadamard butterflies, len = 1, 2, ..., D/2
#pragma unroll
    for (int len = 1; len < D; len <<= 1)
    {
        if (len < E)
        {
#pragma unroll
            for (int e = 0; e < E; ++e)
            {
                if ((e & len) == 0)
                {
                    float const p0 = x[e];
                    float const p1 = x[e + len];
                    x[e] = __fadd_rn(p0, p1);
                    x[e + len] = __fsub_rn(p0, p1);
                }
            }
        }
        else
        {
            int const m = len / E;
            bool const upper = (lane & m) != 0;
#pragma unroll
            for (int e = 0; e < E; ++e)
            {
                float const other = __shfl_xor_sync(0xffffffffu, x[e], m);
                x[e] = upper ? __fsub_rn(other, x[e]) : __fadd_rn(x[e], other);
            }
        }
    }
#pragma unroll
    for (int e = 0; e < E; ++e)
    {
        x[e] = __fmul_rn(x[e], rsqrtD);
    }
}

} // namespace detail
} // namespace turboquant
