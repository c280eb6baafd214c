// Write path: transform, quantize and pack new K/V into the paged pool (docs/format.md §2-§5),
// and the inverse (pool -> fp16, transformed domain) for tests and debugging.
//
// One warp per (new token, KV head, K or V); each lane holds D/32 consecutive channels. Codes go
// into the block's 32-slot tiles (docs/format.md §5.1) as whole 32-bit words built in closed form
// (quantize_tile.cuh): words the slot owns alone are stored, shared words get per-word atomics, so
// the tokens of one tile can be written by concurrent warps; sink positions go to sink_pool and to
// the block, and a sequence's last w positions (recent_tokens = w) also to its fp16 ring in
// recent_pool. All arithmetic is fp32 in the order docs/format.md fixes (IEEE add/mul/div/sqrt, no
// fused multiply-add, the Hadamard butterflies in the reference order, sums in numpy's pairwise
// order), so the bytes equal turboquant_trt.reference's bytes.
//
// The kernel is one short dependent chain per warp (a decode step launches ~100 warps), so it is
// written for latency: every load that does not need the token's position is issued first, the
// parameters every warp reads first sit together (the constant cache is cold at the start), the
// codebook and its boundaries are immediate operands (a select tree on the boundary comparisons,
// a closed form for 8 bits), and a decode step has its own instantiation without cu_q.
#include "common.cuh"
#include "dispatch.cuh"
#include "quantize_tile.cuh"
#include "turboquant/codebooks.h"
#include "turboquant/kernels.h"

#include <cmath>
#include <cstring>

namespace turboquant
{
namespace detail
{

// Warps of one CTA. The warps of a CTA share the multiprocessor's instruction and constant caches,
// which a short kernel finds cold, and compete for its schedulers. Measured on the H100 (one decode
// step, B=8, 8 KV heads, d=128, same run): 4 warps per CTA 3.08 us, 8 warps 3.40 us, 16 warps
// 4.09 us; one warp per CTA was slower than 4 as well (benchmarks/NOTES.md).
constexpr int kQuantWarps = 4;

// Where one (KV head, K or V) goes in a block.
struct QuantHead
{
    int32_t codes_off;
    int32_t meta_off;
};

// The write kernel's parameters. A launch's parameters are read through each multiprocessor's
// constant cache, cold at the kernel's start, so the fields every warp reads first are packed at
// the start and per-head fields are compact.
struct QuantArgs
{
    void const* src[2]; // k, v
    int64_t stride[2];
    int32_t const* seq_lens;
    int32_t const* cu_q;
    uint32_t* zero_words;      // decode: words [b * zero_per_seq, (b + 1) * zero_per_seq) set to 0, or null
    uint16_t const* mean[2];   // null: absent
    uint16_t const* smooth[2]; // null: absent
    uint16_t const* clip[2];   // null: absent
    uint16_t const* signs;
    int32_t const* block_table;
    uint8_t* pool;
    int64_t block_stride;
    int64_t layer_offset;
    int32_t max_blocks_per_seq;
    int32_t num_kv_heads;
    int32_t zero_per_seq;
    int32_t tpb_shift; // log2(tokens_per_block)
    int32_t sink_tokens;
    int32_t recent_tokens; // w: positions >= seq_len - w also go to recent_pool[slot][h][0|1][p % w]
    int32_t norm_correction;
    int32_t bf16;
    int32_t vec; // k, v, their token strides and the tables allow 8-byte loads of 4 channels
    int32_t max_q_len;
    float sqrt_d;
    float rsqrt_d;
    uint16_t* sink_pool;
    int32_t const* seq_slot;
    uint16_t* recent_pool;
    uint16_t* exact_out; // [rows][H][2][d] or null (then the ring is written)
    uint8_t bits[kMaxKvHeads][2];
    int8_t scale_exp[kMaxKvHeads][2]; // E of the one-byte scales (docs/format.md §3.1)
    QuantHead head[kMaxKvHeads][2];
};

// Stand-ins for absent tables (mean 0, smoothing 1), so that every load is issued unconditionally;
// the arithmetic skips them (x - 0 and x / 1 are exact no-ops anyway).
__device__ uint16_t const kZeroTable[kMaxHeadDim] = {};
__device__ uint16_t const kOneTable[kMaxHeadDim] = {
#define TQ_ONE8 0x3C00, 0x3C00, 0x3C00, 0x3C00, 0x3C00, 0x3C00, 0x3C00, 0x3C00
#define TQ_ONE64 TQ_ONE8, TQ_ONE8, TQ_ONE8, TQ_ONE8, TQ_ONE8, TQ_ONE8, TQ_ONE8, TQ_ONE8
    TQ_ONE64, TQ_ONE64, TQ_ONE64, TQ_ONE64,
#undef TQ_ONE64
#undef TQ_ONE8
};

__device__ __forceinline__ float codebookAt(int bits, int i)
{
    switch (bits)
    {
    case 2: return kDevCodebook2[i];
    case 3: return kDevCodebook3[i];
    case 4: return kDevCodebook4[i];
    default: return kDevCodebook8[i];
    }
}

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
    int64_t blk;      // physical block
    int32_t codesOff; // the head's K or V codes array in the block
    int32_t metaOff;  // the head's K or V scales
    int32_t r;        // slot in the block
    int32_t scaleExp; // E of the head's K or V scales
};

// Quantizes the transformed vector x (lane holds channels lane*E .. +E-1) with B-bit codes and
// writes codes and the one-byte scale (docs/format.md §3.1, §5). 2-4 bits: norm-based scale, codes
// written before the scale's second sum; 8 bits: the absmax scale rounded up, codes against it.
template <int D, int B>
__device__ __forceinline__ void quantizeStore(QuantArgs const& a, float const (&x)[D / 32], bool isV, float gamma,
    float* sq, float* cq, uint32_t* codeWords, SlotDest const& dst, int lane)
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
        uint32_t k = tqScale8Encode(scale, dst.scaleExp, kDevScale8Mid);
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
        float const f = n > 0.F ? __fdiv_rn(a.sqrt_d, __fmul_rn(gamma, n)) : 0.F;
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
    uint8_t* const block = a.pool + a.layer_offset + dst.blk * a.block_stride;
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
        if (a.norm_correction)
        {
            float const cn = __fsqrt_rn(orderedSum<D>(cq, lane));
            scale = cn > 0.F ? __fdiv_rn(n, cn) : 0.F;
        }
        else
        {
            scale = __fdiv_rn(__fmul_rn(gamma, n), a.sqrt_d);
        }
        scale8 = tqScale8Encode(scale, dst.scaleExp, kDevScale8Mid);
    }
    if (lane == 0)
    {
        block[dst.metaOff + dst.r * kTurboMetaBytes] = scale8;
    }
}

// Decode: one new token per sequence (row b of k and v), no cu_q.
template <int D, bool Decode>
__global__ void __launch_bounds__(32 * kQuantWarps) quantizeKvKernel(__grid_constant__ QuantArgs const a)
{
    constexpr int E = D / 32;
    __shared__ __align__(16) float sq[kQuantWarps][D];
    __shared__ __align__(16) float cq[kQuantWarps][D];
    __shared__ __align__(16) uint32_t codeWords[kQuantWarps][D / 4];

    // the decode kernel launched next on the stream (a programmatic dependent launch on sm_90+) may be
    // scheduled now; it waits for this grid to complete before it reads the cache
    launchDependents();
    int const H = a.num_kv_heads;
    int const warp = threadIdx.x >> 5;
    int const lane = threadIdx.x & 31;
    int const b = blockIdx.y;
    int const wid = blockIdx.x * (blockDim.x >> 5) + warp;
    int const which = wid & 1; // 0: K, 1: V (separate warps, in parallel)
    int i = 0;
    int h = wid >> 1;
    int rowBegin = b;
    int qLen = 1;
    if constexpr (!Decode)
    {
        i = h / H;
        h -= i * H;
        seqRows(a.cu_q, b, rowBegin, qLen);
        if (i >= qLen)
        {
            return;
        }
    }
    // a decode grid may round up past the last head: such a warp loads head H-1's row, stores nothing
    bool const live = h < H;
    int const hl = live ? h : H - 1;
    // every load that does not need the position first, so that their latencies overlap
    int const seqLen = a.seq_lens[b];
    int const c0 = lane * E;
    int64_t const hc = static_cast<int64_t>(hl) * D + c0;
    uint16_t const* const meanT = a.mean[which];
    uint16_t const* const smoothT = a.smooth[which];
    uint16_t const* const clipT = a.clip[which];
    uint16_t const* const xp = static_cast<uint16_t const*>(a.src[which]) + (rowBegin + i) * a.stride[which] + hc;
    uint16_t const* const mp = meanT != nullptr ? meanT + hc : kZeroTable + c0;
    uint16_t const* const sp = smoothT != nullptr ? smoothT + hc : kOneTable + c0;
    uint16_t xs[E], mu[E], sm[E], sg[E];
    if (a.vec != 0)
    {
        loadU16<E, true>(xp, xs);
        loadU16<E, true>(mp, mu);
        loadU16<E, true>(sp, sm);
        loadU16<E, true>(a.signs + c0, sg);
    }
    else
    {
        loadU16<E, false>(xp, xs);
        loadU16<E, false>(mp, mu);
        loadU16<E, false>(sp, sm);
        loadU16<E, false>(a.signs + c0, sg);
    }
    float const gamma = clipT != nullptr ? h2f(__ldg(clipT + hl)) : 1.F;
    if constexpr (Decode)
    {
        // the next decode's finish counters (QuantizeKvParams::zero_words), stored once this warp's
        // loads are out; the decode reads them only after this grid is complete
        if (a.zero_words != nullptr && blockIdx.x == 0)
        {
            for (int z = threadIdx.x; z < a.zero_per_seq; z += blockDim.x)
            {
                a.zero_words[static_cast<int64_t>(b) * a.zero_per_seq + z] = 0u;
            }
        }
    }
    int const ns = a.sink_tokens;
    int const w = a.recent_tokens;
    int64_t const seqSlot = ns > 0 || w > 0 ? a.seq_slot[b] : 0;
    int const bits = a.bits[hl][which];
    SlotDest dst;
    dst.codesOff = a.head[hl][which].codes_off;
    dst.metaOff = a.head[hl][which].meta_off;
    dst.scaleExp = a.scale_exp[hl][which];
    int const pos = seqLen - qLen + i;
    if (pos < 0 || !live)
    {
        return;
    }
    dst.blk = a.block_table[static_cast<int64_t>(b) * a.max_blocks_per_seq + (pos >> a.tpb_shift)];
    dst.r = pos & ((1 << a.tpb_shift) - 1);

    // (x - mean) / smooth * signs, in fp32 (an absent table is mean 0 / smooth 1: exact no-ops)
    bool const bf16 = a.bf16 != 0;
    float x[E];
#pragma unroll
    for (int e = 0; e < E; ++e)
    {
        float v = bf16 ? __bfloat162float(__ushort_as_bfloat16(xs[e])) : h2f(xs[e]);
        if (meanT != nullptr)
        {
            v = __fsub_rn(v, h2f(mu[e]));
        }
        if (smoothT != nullptr)
        {
            v = __fdiv_rn(v, h2f(sm[e]));
        }
        x[e] = __fmul_rn(v, h2f(sg[e]));
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
        x[e] = __fmul_rn(x[e], a.rsqrt_d);
    }

    if (pos < ns)
    {
        // the fp16 copy; the token is also quantized into the block like every other one
        storeFp16(a.sink_pool + (((seqSlot * H + h) * 2 + which) * ns + pos) * D + c0, x);
    }
    if (a.exact_out != nullptr) // the context path: its attention reads these, then they go to the ring
    {
        storeFp16(a.exact_out + ((static_cast<int64_t>(rowBegin + i) * H + h) * 2 + which) * D + c0, x);
    }
    else if (pos >= seqLen - w) // w > 0: the recent-token ring (only the last w positions, so that
    {                           // the tokens of one call never race for a ring entry)
        storeFp16(a.recent_pool + (((seqSlot * H + h) * 2 + which) * w + pos % w) * D + c0, x);
    }

    bool const isV = which != 0;
    switch (bits)
    {
    case 2: quantizeStore<D, 2>(a, x, isV, gamma, sq[warp], cq[warp], codeWords[warp], dst, lane); break;
    case 3: quantizeStore<D, 3>(a, x, isV, gamma, sq[warp], cq[warp], codeWords[warp], dst, lane); break;
    case 4: quantizeStore<D, 4>(a, x, isV, gamma, sq[warp], cq[warp], codeWords[warp], dst, lane); break;
    default: quantizeStore<D, 8>(a, x, isV, gamma, sq[warp], cq[warp], codeWords[warp], dst, lane); break;
    }
}

struct DequantArgs
{
    KvLayerDesc layer;
    PagedKvPool kv;
    int32_t const* seq_lens;
    int32_t max_seq_len;
    uint16_t* out[2];
};

// One warp per (sequence, position, KV head).
template <int D>
__global__ void __launch_bounds__(128) dequantizeKvKernel(__grid_constant__ DequantArgs const a)
{
    KvLayerDesc const& L = a.layer;
    int const H = L.num_kv_heads;
    int const warp = threadIdx.x >> 5;
    int const lane = threadIdx.x & 31;
    int64_t const wid = static_cast<int64_t>(blockIdx.x) * 4 + warp;
    int const b = blockIdx.y;
    int const pos = static_cast<int>(wid / H);
    int const h = static_cast<int>(wid % H);
    if (pos >= a.seq_lens[b] || pos >= a.max_seq_len)
    {
        return;
    }
    int64_t const outBase = ((static_cast<int64_t>(b) * H + h) * a.max_seq_len + pos) * D;
    for (int which = 0; which < 2; ++which)
    {
        uint16_t* o = a.out[which] + outBase;
        if (pos < L.sink_tokens)
        {
            int64_t const slot = a.kv.seq_slot[b];
            uint16_t const* src = a.kv.sink_pool + (((slot * H + h) * 2 + which) * L.sink_tokens + pos) * D;
            for (int c = lane; c < D; c += 32)
            {
                o[c] = src[c];
            }
            continue;
        }
        int const w = L.recent_tokens;
        if (pos >= a.seq_lens[b] - w) // w > 0: the last w positions come from the ring
        {
            int64_t const slot = a.kv.seq_slot[b];
            uint16_t const* src = a.kv.recent_pool + (((slot * H + h) * 2 + which) * w + pos % w) * D;
            for (int c = lane; c < D; c += 32)
            {
                o[c] = src[c];
            }
            continue;
        }
        int const bits = which == 0 ? L.k_bits[h] : L.v_bits[h];
        int const T = L.tokens_per_block;
        int64_t const blk = a.kv.block_table[static_cast<int64_t>(b) * a.kv.max_blocks_per_seq + pos / T];
        int const r = pos % T;
        uint8_t const* block = a.kv.pool + a.kv.layer_offset + blk * a.kv.block_stride;
        uint8_t const* tile = block + (which == 0 ? L.k_codes_off[h] : L.v_codes_off[h])
            + (r / kTileTokens) * kTileTokens * (D * bits / 8);
        int const tau = r % kTileTokens;
        uint8_t const* meta = block + (which == 0 ? L.k_meta_off[h] : L.v_meta_off[h]) + r * kTurboMetaBytes;
        float const scale = tqScale8Decode(meta[0], which == 0 ? L.k_scale_exp[h] : L.v_scale_exp[h], kDevScale8Frac);
        for (int c = lane; c < D; c += 32)
        {
            TqTilePos const tp = tqTilePos(which != 0, tau, c, D);
            uint32_t const* unit = reinterpret_cast<uint32_t const*>(tile + tqTileUnitOffset(D, bits, tp.lane, tp.unit));
            int code = 0;
            for (int k = 0; k < bits; ++k)
            {
                int w = 0, bit = 0;
                tqUnitBit(bits, tp.sel, tp.nib, k, w, bit);
                code |= static_cast<int>((unit[w] >> bit) & 1u) << k;
            }
            o[c] = __half_as_ushort(__float2half_rn(__fmul_rn(scale, codebookAt(bits, code))));
        }
    }
}

} // namespace detail

using namespace detail;

cudaError_t launchQuantizeKv(QuantizeKvParams const& p, cudaStream_t stream)
{
    if (tqCheckLayer(p.layer, p.layer.num_kv_heads) != nullptr || !tqTokensPerBlockValid(p.layer.tokens_per_block)
        || p.kv.pool == nullptr || p.kv.block_table == nullptr || p.k == nullptr || p.v == nullptr || p.seq_lens == nullptr || p.tables.signs == nullptr || p.batch < 0
        || (p.layer.sink_tokens > 0 && (p.kv.sink_pool == nullptr || p.kv.seq_slot == nullptr))
        || (p.layer.recent_tokens > 0 && (p.kv.recent_pool == nullptr || p.kv.seq_slot == nullptr))
        || (p.cu_q_lens != nullptr && p.max_q_len < 0)
        || p.zero_words_per_seq < 0 || (p.zero_words_per_seq > 0 && (p.zero_words == nullptr || p.cu_q_lens != nullptr)))
    {
        return cudaErrorInvalidValue;
    }
    int const maxQ = p.cu_q_lens != nullptr ? p.max_q_len : 1;
    if (p.batch == 0 || maxQ == 0)
    {
        return cudaSuccess;
    }
    QuantArgs a;
    std::memset(&a, 0, sizeof(a));
    KvLayerDesc const& L = p.layer;
    a.src[0] = p.k;
    a.src[1] = p.v;
    a.stride[0] = p.k_token_stride;
    a.stride[1] = p.v_token_stride;
    a.seq_lens = p.seq_lens;
    a.cu_q = p.cu_q_lens;
    a.mean[0] = p.tables.k_mean;
    a.mean[1] = p.tables.v_mean;
    a.smooth[0] = p.tables.k_smooth;
    a.smooth[1] = p.tables.v_smooth;
    a.clip[0] = p.tables.k_clip;
    a.clip[1] = p.tables.v_clip;
    a.signs = p.tables.signs;
    a.block_table = p.kv.block_table;
    a.pool = p.kv.pool;
    a.block_stride = p.kv.block_stride;
    a.layer_offset = p.kv.layer_offset;
    a.max_blocks_per_seq = p.kv.max_blocks_per_seq;
    a.num_kv_heads = L.num_kv_heads;
    a.tpb_shift = L.tokens_per_block == 32 ? 5 : (L.tokens_per_block == 64 ? 6 : 7);
    a.sink_tokens = L.sink_tokens;
    a.recent_tokens = L.recent_tokens;
    a.norm_correction = L.norm_correction;
    a.bf16 = p.act == ActType::kBf16 ? 1 : 0;
    // 8-byte loads of 4 channels at d = 128 (4-byte loads of 2 channels at d = 64)
    auto aligned8 = [](void const* q) { return q == nullptr || (reinterpret_cast<uintptr_t>(q) & 7u) == 0; };
    a.vec = aligned8(p.k) && aligned8(p.v) && p.k_token_stride % 4 == 0 && p.v_token_stride % 4 == 0
            && aligned8(p.tables.k_mean) && aligned8(p.tables.k_smooth) && aligned8(p.tables.v_mean)
            && aligned8(p.tables.v_smooth) && aligned8(p.tables.signs)
        ? 1
        : 0;
    a.max_q_len = maxQ;
    a.sqrt_d = static_cast<float>(std::sqrt(static_cast<double>(L.head_dim)));
    a.rsqrt_d = static_cast<float>(1.0 / std::sqrt(static_cast<double>(L.head_dim)));
    a.sink_pool = p.kv.sink_pool;
    a.seq_slot = p.kv.seq_slot;
    a.recent_pool = p.kv.recent_pool;
    a.exact_out = p.exact_out;
    a.zero_words = p.zero_words_per_seq > 0 ? p.zero_words : nullptr; // per_seq 0: nothing to zero
    a.zero_per_seq = p.zero_words_per_seq;
    for (int h = 0; h < L.num_kv_heads; ++h)
    {
        a.bits[h][0] = L.k_bits[h];
        a.bits[h][1] = L.v_bits[h];
        a.scale_exp[h][0] = L.k_scale_exp[h];
        a.scale_exp[h][1] = L.v_scale_exp[h];
        a.head[h][0] = QuantHead{L.k_codes_off[h], L.k_meta_off[h]};
        a.head[h][1] = QuantHead{L.v_codes_off[h], L.v_meta_off[h]};
    }
    bool const decode = p.cu_q_lens == nullptr;
    int64_t const warps = static_cast<int64_t>(maxQ) * L.num_kv_heads * 2;
    int const perCta = static_cast<int>(warps < kQuantWarps ? warps : kQuantWarps);
    dim3 grid(static_cast<unsigned>((warps + perCta - 1) / perCta), static_cast<unsigned>(p.batch));
    return dispatchHeadDim(L.head_dim, [&](auto d) {
        if (decode)
        {
            quantizeKvKernel<decltype(d)::value, true><<<grid, 32 * perCta, 0, stream>>>(a);
        }
        else
        {
            quantizeKvKernel<decltype(d)::value, false><<<grid, 32 * perCta, 0, stream>>>(a);
        }
        return cudaGetLastError();
    });
}

cudaError_t launchDequantizeKv(DequantizeKvParams const& p, cudaStream_t stream)
{
    if (tqCheckLayer(p.layer, p.layer.num_kv_heads) != nullptr || !tqTokensPerBlockValid(p.layer.tokens_per_block)
        || p.kv.pool == nullptr || p.kv.block_table == nullptr || p.seq_lens == nullptr || p.k_out == nullptr || p.v_out == nullptr || p.batch < 0 || p.max_seq_len < 0
        || (p.layer.sink_tokens > 0 && (p.kv.sink_pool == nullptr || p.kv.seq_slot == nullptr))
        || (p.layer.recent_tokens > 0 && (p.kv.recent_pool == nullptr || p.kv.seq_slot == nullptr)))
    {
        return cudaErrorInvalidValue;
    }
    if (p.batch == 0 || p.max_seq_len == 0)
    {
        return cudaSuccess;
    }
    DequantArgs a;
    std::memset(&a, 0, sizeof(a));
    a.layer = p.layer;
    a.kv = p.kv;
    a.seq_lens = p.seq_lens;
    a.max_seq_len = p.max_seq_len;
    a.out[0] = p.k_out;
    a.out[1] = p.v_out;
    int64_t const warps = static_cast<int64_t>(p.max_seq_len) * p.layer.num_kv_heads;
    dim3 grid(static_cast<unsigned>((warps + 3) / 4), static_cast<unsigned>(p.batch));
    return dispatchHeadDim(p.layer.head_dim, [&](auto d) {
        dequantizeKvKernel<decltype(d)::value><<<grid, 128, 0, stream>>>(a);
        return cudaGetLastError();
    });
}

} // namespace turboquant
