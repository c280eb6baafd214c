// Write path: transform, quantize and pack new K/V into the paged pool (docs/format.md §2-§5),
// and the inverse (pool -> fp16, transformed domain) for tests and debugging.
//
// One warp per (new token, KV head, K or V); each lane holds D/32 consecutive channels. Codes go
// into the block's 32-slot tiles (format version 2) with per-word atomics, so the tokens of one
// tile can be written by concurrent warps; sink positions go to sink_pool and to the block. All arithmetic
// is fp32 in the order docs/format.md fixes (IEEE add/mul/div/sqrt, no fused multiply-add, the
// Hadamard butterflies in the reference order, sums in numpy's pairwise order), so the bytes equal
// turboquant_trt.reference's bytes.
#include "common.cuh"
#include "dispatch.cuh"
#include "turboquant/codebooks.h"
#include "turboquant/kernels.h"

#include <cmath>
#include <cstring>

namespace turboquant
{
namespace detail
{

constexpr int kQuantWarps = 4;

struct QuantArgs
{
    KvLayerDesc layer;
    PagedKvPool kv;
    LayerTablesView tables;
    void const* src[2];     // k, v
    int64_t stride[2];
    int32_t const* cu_q;
    int32_t const* seq_lens;
    int32_t batch;
    int32_t max_q_len;
    float sqrt_d;
    float rsqrt_d;
    int32_t bf16;
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

__device__ __forceinline__ float boundaryAt(int bits, int j)
{
    switch (bits)
    {
    case 2: return kDevBoundaries2[j];
    case 3: return kDevBoundaries3[j];
    case 4: return kDevBoundaries4[j];
    default: return kDevBoundaries8[j];
    }
}

// numpy's pairwise fp32 sum of v[0..D) (D = 64, 128 or 256), bit-exact, using 8 lanes of the warp:
// lane j < 8 accumulates v[j], v[j+8], ... of each 128-element half in order, then the fixed tree.
template <int D>
__device__ __forceinline__ float warpNumpySum(float const* v, int lane)
{
    constexpr int kHalf = D <= 128 ? D : 128;
    float total = 0.F;
#pragma unroll
    for (int h = 0; h < D / kHalf; ++h)
    {
        float r = 0.F;
        if (lane < 8)
        {
            r = v[h * kHalf + lane];
#pragma unroll
            for (int i = 8; i < kHalf; i += 8)
            {
                r = __fadd_rn(r, v[h * kHalf + i + lane]);
            }
        }
        // ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
        r = __fadd_rn(r, __shfl_xor_sync(0xffffffffu, r, 1));
        r = __fadd_rn(r, __shfl_xor_sync(0xffffffffu, r, 2));
        r = __fadd_rn(r, __shfl_xor_sync(0xffffffffu, r, 4));
        r = __shfl_sync(0xffffffffu, r, 0);
        total = h == 0 ? r : __fadd_rn(total, r);
    }
    return total;
}

// Writes the codes[D] of slot tau into a tile (docs/format.md §5): lane by lane over the 32-bit
// words the slot can touch (K: the 4 lane chunks of group tau % 8; V: the 8 chunks of t =
// (tau % 16) / 4), each word's mask and bits gathered from the positions it holds. Words owned
// entirely by this slot are stored; shared words get atomicAnd(~mask) then atomicOr(bits), so
// slots of one tile may be written concurrently and stale bits of other slots stay.
template <int D>
__device__ __forceinline__ void writeTileSlot(
    uint8_t* tile, bool isV, int tau, int bits, uint8_t const* codes, int lane)
{
    int const wordsPerChunk = D * bits / 32;
    int const nChunks = isV ? 8 : 4;
    for (int w = lane; w < nChunks * wordsPerChunk; w += 32)
    {
        int const ci = w / wordsPerChunk;
        int const wc = w - ci * wordsPerChunk;
        int const L = isV ? 4 * ci + (tau % 16) / 4 : 4 * (tau % 8) + ci;
        int const g = L / 4;
        int const t = L % 4;
        int const U = wc / bits;
        int const k = wc - U * bits; // word k of unit U
        uint32_t mask = 0;
        uint32_t val = 0;
        // positions (j, n) held by word k, with the code bits (lo.. lo+width-1) stored at `bit`
        auto take = [&](int j, int n, int bit, int lo, int width) {
            int const rho = 8 * U + 2 * j + n / 4;
            int const y = n % 4;
            int slot, c;
            if (isV)
            {
                int const rh = rho % 2;
                int const kh = (rho / 2) % 2;
                int const m = rho / 4;
                c = 16 * m + 8 * rh + g;
                slot = 16 * kh + 4 * t + y;
            }
            else
            {
                int const hh = rho % 2;
                int const rest = rho / 2;
                int const i = rest / (D / 32);
                int const s = rest % (D / 32);
                c = 32 * s + 16 * hh + 4 * t + y;
                slot = g + 8 * i;
            }
            if (slot == tau)
            {
                uint32_t const fm = (1u << width) - 1u;
                mask |= fm << bit;
                val |= ((static_cast<uint32_t>(codes[c]) >> lo) & fm) << bit;
            }
        };
        if (bits == 2)
        {
            for (int jj = 0; jj < 2; ++jj)
            {
                for (int n = 0; n < 8; ++n)
                {
                    take(2 * k + jj, n, 4 * n + 2 * jj, 0, 2);
                }
            }
        }
        else if (bits == 3)
        {
            for (int n = 0; n < 8; ++n)
            {
                take(k, n, 4 * n, 0, 3);   // j = k < 3: the whole code
                take(3, n, 4 * n + 3, k, 1); // j = 3: code bit k
            }
        }
        else if (bits == 4)
        {
            for (int n = 0; n < 8; ++n)
            {
                take(k, n, 4 * n, 0, 4);
            }
        }
        else
        {
            for (int q = 0; q < 4; ++q)
            {
                take(k / 2, 4 * (k % 2) + q, 8 * q, 0, 8);
            }
        }
        if (mask == 0)
        {
            continue;
        }
        uint32_t* word = reinterpret_cast<uint32_t*>(tile + tqTileUnitOffset(D, bits, L, U)) + k;
        if (mask == 0xFFFFFFFFu)
        {
            *word = val; // no other slot has bits here
        }
        else
        {
            atomicAnd(word, ~mask);
            atomicOr(word, val);
        }
    }
}

template <int D>
__global__ void __launch_bounds__(32 * kQuantWarps) quantizeKvKernel(__grid_constant__ QuantArgs const a)
{
    constexpr int E = D / 32;
    __shared__ float sq[kQuantWarps][D];
    __shared__ uint8_t codes[kQuantWarps][D];
    __shared__ float cbK[kQuantWarps][256];
    __shared__ float cbV[kQuantWarps][256];

    KvLayerDesc const& L = a.layer;
    int const H = L.num_kv_heads;
    int const warp = threadIdx.x >> 5;
    int const lane = threadIdx.x & 31;
    int const b = blockIdx.y;
    int const wid = blockIdx.x * kQuantWarps + warp;
    int const which = wid & 1; // 0: K, 1: V (separate warps, in parallel)
    int const i = (wid >> 1) / H;
    int const h = (wid >> 1) % H;
    int rowBegin, qLen;
    seqRows(a.cu_q, b, rowBegin, qLen);
    if (i >= qLen)
    {
        return;
    }
    int64_t const row = rowBegin + i;
    int const pos = a.seq_lens[b] - qLen + i;
    if (pos < 0)
    {
        return;
    }
    bool const bf16 = a.bf16 != 0;
    {
        int const kbits = L.k_bits[h];
        int const vbits = L.v_bits[h];
        for (int j = lane; j < (1 << kbits); j += 32)
        {
            cbK[warp][j] = codebookAt(kbits, j);
        }
        for (int j = lane; j < (1 << vbits); j += 32)
        {
            cbV[warp][j] = codebookAt(vbits, j);
        }
        __syncwarp();
    }

    {
        uint16_t const* mean = which == 0 ? a.tables.k_mean : a.tables.v_mean;
        uint16_t const* smooth = which == 0 ? a.tables.k_smooth : a.tables.v_smooth;
        uint16_t const* clip = which == 0 ? a.tables.k_clip : a.tables.v_clip;
        float x[E];
#pragma unroll
        for (int e = 0; e < E; ++e)
        {
            int const c = lane * E + e;
            float v = loadAct(a.src[which], row * a.stride[which] + static_cast<int64_t>(h) * D + c, bf16);
            int64_t const hc = static_cast<int64_t>(h) * D + c;
            v = __fsub_rn(v, tableOr(mean, hc, 0.F));
            v = __fdiv_rn(v, tableOr(smooth, hc, 1.F));
            x[e] = __fmul_rn(v, h2f(a.tables.signs[c]));
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

        if (pos < L.sink_tokens)
        {
            int64_t const slot = a.kv.seq_slot[b];
            uint16_t* dst = a.kv.sink_pool + (((slot * H + h) * 2 + which) * L.sink_tokens + pos) * D;
#pragma unroll
            for (int e = 0; e < E; ++e)
            {
                dst[lane * E + e] = __half_as_ushort(__float2half_rn(x[e]));
            }
            // and quantized into the block like every other token (readers use the fp16 copy)
        }

        int const bits = which == 0 ? L.k_bits[h] : L.v_bits[h];
        // norm, numpy order
#pragma unroll
        for (int e = 0; e < E; ++e)
        {
            sq[warp][lane * E + e] = __fmul_rn(x[e], x[e]);
        }
        __syncwarp();
        float const n = __fsqrt_rn(warpNumpySum<D>(sq[warp], lane));
        float const gamma = tableOr(clip, h, 1.F);
        float const f = n > 0.F ? __fdiv_rn(a.sqrt_d, __fmul_rn(gamma, n)) : 0.F;
        int const nb = (1 << bits) - 1;
        __syncwarp();
#pragma unroll
        for (int e = 0; e < E; ++e)
        {
            float const u = __fmul_rn(x[e], f);
            int code = 0;
            for (int j = 0; j < nb; ++j)
            {
                code += u > boundaryAt(bits, j) ? 1 : 0;
            }
            codes[warp][lane * E + e] = static_cast<uint8_t>(code);
            float const cv = (which == 0 ? cbK : cbV)[warp][code];
            sq[warp][lane * E + e] = __fmul_rn(cv, cv);
        }
        __syncwarp();
        float const cn = __fsqrt_rn(warpNumpySum<D>(sq[warp], lane));
        // only the 8-bit codebook has a zero level: every code at it (a zero vector) gives scale 0
        float const scale = L.norm_correction ? (cn > 0.F ? __fdiv_rn(n, cn) : 0.F)
                                              : __fdiv_rn(__fmul_rn(gamma, n), a.sqrt_d);
        // block, slot and tile
        int const T = L.tokens_per_block;
        int64_t const blk = a.kv.block_table[static_cast<int64_t>(b) * a.kv.max_blocks_per_seq + pos / T];
        int const r = pos % T;
        uint8_t* block = a.kv.pool + a.kv.layer_offset + blk * a.kv.block_stride;
        __syncwarp();
        writeTileSlot<D>(block + (which == 0 ? L.k_codes_off[h] : L.v_codes_off[h]) + (r / kTileTokens) * kTileTokens * (D * bits / 8),
            which != 0, r % kTileTokens, bits, codes[warp], lane);
        if (lane == 0)
        {
            uint16_t const s16 = __half_as_ushort(__float2half_rn(fminf(scale, 65504.F)));
            uint8_t* meta = block + (which == 0 ? L.k_meta_off[h] : L.v_meta_off[h]) + r * kTurboMetaBytes;
            meta[0] = static_cast<uint8_t>(s16 & 0xFF);
            meta[1] = static_cast<uint8_t>(s16 >> 8);
        }
        __syncwarp();
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
        int const bits = which == 0 ? L.k_bits[h] : L.v_bits[h];
        int const T = L.tokens_per_block;
        int64_t const blk = a.kv.block_table[static_cast<int64_t>(b) * a.kv.max_blocks_per_seq + pos / T];
        int const r = pos % T;
        uint8_t const* block = a.kv.pool + a.kv.layer_offset + blk * a.kv.block_stride;
        uint8_t const* tile = block + (which == 0 ? L.k_codes_off[h] : L.v_codes_off[h])
            + (r / kTileTokens) * kTileTokens * (D * bits / 8);
        int const tau = r % kTileTokens;
        uint8_t const* meta = block + (which == 0 ? L.k_meta_off[h] : L.v_meta_off[h]) + r * kTurboMetaBytes;
        float const scale = h2f(static_cast<uint16_t>(meta[0] | (meta[1] << 8)));
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
        || (p.cu_q_lens != nullptr && p.max_q_len < 0))
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
    a.layer = p.layer;
    a.kv = p.kv;
    a.tables = p.tables;
    a.src[0] = p.k;
    a.src[1] = p.v;
    a.stride[0] = p.k_token_stride;
    a.stride[1] = p.v_token_stride;
    a.cu_q = p.cu_q_lens;
    a.seq_lens = p.seq_lens;
    a.batch = p.batch;
    a.max_q_len = maxQ;
    a.sqrt_d = static_cast<float>(std::sqrt(static_cast<double>(p.layer.head_dim)));
    a.rsqrt_d = static_cast<float>(1.0 / std::sqrt(static_cast<double>(p.layer.head_dim)));
    a.bf16 = p.act == ActType::kBf16 ? 1 : 0;
    int64_t const warps = static_cast<int64_t>(maxQ) * p.layer.num_kv_heads * 2;
    dim3 grid(static_cast<unsigned>((warps + kQuantWarps - 1) / kQuantWarps), static_cast<unsigned>(p.batch));
    return dispatchHeadDim(p.layer.head_dim, [&](auto d) {
        quantizeKvKernel<decltype(d)::value><<<grid, 32 * kQuantWarps, 0, stream>>>(a);
        return cudaGetLastError();
    });
}

cudaError_t launchDequantizeKv(DequantizeKvParams const& p, cudaStream_t stream)
{
    if (tqCheckLayer(p.layer, p.layer.num_kv_heads) != nullptr || !tqTokensPerBlockValid(p.layer.tokens_per_block)
        || p.kv.pool == nullptr || p.kv.block_table == nullptr || p.seq_lens == nullptr || p.k_out == nullptr || p.v_out == nullptr || p.batch < 0 || p.max_seq_len < 0
        || (p.layer.sink_tokens > 0 && (p.kv.sink_pool == nullptr || p.kv.seq_slot == nullptr)))
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
