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
#include "quantize_row.cuh"
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
    uint16_t const* const meanT = a.mean[which];
    uint16_t const* const smoothT = a.smooth[which];
    NewRow<D> in;
    loadNewRow<D>(in, static_cast<uint16_t const*>(a.src[which]) + (rowBegin + i) * a.stride[which], meanT, smoothT,
        a.clip[which], a.signs, hl, a.vec != 0, lane);
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
    int64_t const blk = a.block_table[static_cast<int64_t>(b) * a.max_blocks_per_seq + (pos >> a.tpb_shift)];
    dst.r = pos & ((1 << a.tpb_shift) - 1);

    float x[E];
    transformNewRow<D>(in, meanT != nullptr, smoothT != nullptr, a.bf16 != 0, a.rsqrt_d, x, lane);

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
    uint8_t* const block = a.pool + a.layer_offset + blk * a.block_stride;
    bool const nc = a.norm_correction != 0;
    float const gamma = in.gamma;
    switch (bits)
    {
    case 2: quantizeStore<D, 2>(block, a.sqrt_d, nc, x, isV, gamma, sq[warp], cq[warp], codeWords[warp], dst, lane); break;
    case 3: quantizeStore<D, 3>(block, a.sqrt_d, nc, x, isV, gamma, sq[warp], cq[warp], codeWords[warp], dst, lane); break;
    case 4: quantizeStore<D, 4>(block, a.sqrt_d, nc, x, isV, gamma, sq[warp], cq[warp], codeWords[warp], dst, lane); break;
    default: quantizeStore<D, 8>(block, a.sqrt_d, nc, x, isV, gamma, sq[warp], cq[warp], codeWords[warp], dst, lane); break;
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
    a.vec = writeLoadsVectorizable(p.k, p.v, p.k_token_stride, p.v_token_stride, p.tables) ? 1 : 0;
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
