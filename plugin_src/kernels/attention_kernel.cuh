// The split-K attention kernel template (internal). Instantiated for every (D, KB, VB) in
// attention_inst_*.cu so that the combinations compile in parallel; attention.cu holds the host
// side. See attention.cu for the design.
#pragma once

#include "common.cuh"
#include "dequant.cuh"
#include "dispatch.cuh"
#include "turboquant/kernels.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>

namespace turboquant
{
namespace detail
{

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kChunk = 64;   // split boundaries are multiples of this
constexpr int kTile = 16;    // tokens per warp step (two steps per staged pool tile)
constexpr int kStageTokens = kTileTokens; // tokens per pipeline stage: one 32-slot pool tile
constexpr int kCtxStages = 3;              // the CTA's pipeline depth (pool tiles in flight)
constexpr int kRowsPerWarp = 8;            // query rows of one warp (the n = 8 of its MMAs)
constexpr int kCtxRows = kWarps * kRowsPerWarp; // query rows per CTA
constexpr int kMaxSplits = 128;
// CTAs per SM the kernel's registers are budgeted for (65536 / (128 * this) per thread). At d=128 its
// shared memory allows at most 3 on any supported GPU (about 61 KB per CTA with codes of <= 4 bits),
// so a 4th CTA's registers would go unused and 170 per thread leave the loop without spills.
__host__ __device__ constexpr int residentCtasPerSm(int d)
{
    return d == 128 ? 3 : 4;
}

// Stages are filled by bulk copies on an mbarrier on sm_90+ (TQ_CTX_BULK), by 16-byte cp.async
// before. (An XOR-swizzled stage filled by cp.async, which reduces the 2- to 8-way bank conflicts
// of the lanes' chunk reads, measured no faster on the H100.)
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define TQ_CTX_BULK 1
#else
#define TQ_CTX_BULK 0
#endif
constexpr int kMinKeysPerSplit = 256;
constexpr int kCtxSplitRowBudget = 2048; // context: splits * query tokens at most this

struct AttnArgs
{
    KvLayerDesc layer;
    PagedKvPool kv;
    uint16_t const* k_smooth; // [H][d] fp16 or null
    uint16_t const* v_mean;   // [H][d] fp16 or null
    uint16_t const* v_smooth; // [H][d] fp16 or null
    uint16_t const* signs;    // [d] fp16
    void const* q;            // [rows][Hq][d]
    int64_t q_stride;
    void* out;                // [rows][Hq][d]
    int64_t out_stride;
    int32_t const* cu_q;      // [batch+1] or null (decode: row b = sequence b, one query)
    int32_t const* seq_lens;  // [batch]
    uint16_t const* win_new;  // [rows][H][2][d] fp16: this call's tokens, transformed (recent_tokens > 0)
    float* ws_o;              // [rows][Hq][splits][d]
    float* ws_ml;             // [rows][Hq][splits][2]
    int32_t batch;
    int32_t num_q_heads;
    int32_t group;            // g = Hq / H
    int32_t tq;               // query tokens per row tile
    int32_t tiles_per_seq;
    int32_t num_splits;
    int32_t split_len;        // keys per split (multiple of kChunk)
    float q_scale;            // softmax_scale * log2(e)
    float rsqrt_d;
    int32_t bf16;
    int32_t num_launch_heads;
    uint8_t heads[kMaxKvHeads]; // KV heads of this launch (all share k_bits/v_bits)
};

// One warp's stage: the four arrays of one 32-slot pool tile of a head, as in the pool: K codes
// (32 * KCB bytes, tile layout), V codes (32 * VCB), K scales (32 bytes), V scales (32 bytes).
struct StageLayout
{
    int offV, offKM, offVM, bytes;
};

__host__ __device__ constexpr StageLayout stageLayout(int kcb, int vcb)
{
    return StageLayout{kStageTokens * kcb, kStageTokens * (kcb + vcb),
        kStageTokens * (kcb + vcb) + kTurboMetaBytes * kStageTokens,
        kStageTokens * (kcb + vcb) + 2 * kTurboMetaBytes * kStageTokens};
}

template <int D>
__host__ __device__ constexpr int prologueBytes()
{
    return kCtxRows * D * 4 + (kCtxStages * 8 + 15) / 16 * 16; // query rows, mbarriers (16-byte multiple:
                                                                // the stages after them take bulk copies)
}

// The expanded tile in the lanes' fragment layout, two of them (tile parity): [2][4 items][D/16
// groups][32 lanes][4 words] (item 2kh: K of step kh, 2kh + 1: V of step kh; a lane's registers in
// groups of four, one 16-byte access each), then the scales [2][2 steps][4: K of tokens g, g + 8,
// V of tokens g, g + 8][32 lanes].
template <int D>
__host__ __device__ constexpr int fragBytes()
{
    return 2 * 4 * (D / 4) * 32 * 4 + 2 * 2 * 4 * 32 * 4;
}

__device__ __forceinline__ uint32_t smemAddr(void const* p)
{
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void mbarInit(uint64_t* bar)
{
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;\n" ::"r"(smemAddr(bar)) : "memory");
}

__device__ __forceinline__ void mbarWait(uint64_t* bar, uint32_t phase)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    uint32_t done = 0;
    while (!done)
    {
        asm volatile(
            "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}\n"
            : "=r"(done)
            : "r"(smemAddr(bar)), "r"(phase)
            : "memory");
    }
#else
    (void) bar;
    (void) phase;
#endif
}

// Starts the copy of the 32-slot pool tile at positions pos0..pos0+31 (pos0 a multiple of 32 below
// the sequence length, so its block exists) of one head's four arrays into a warp's stage. sm_90+:
// four bulk copies completing on the stage's mbarrier; older GPUs: 16-byte cp.async by every
// lane, one commit group per tile.
__device__ __forceinline__ void issueTile(AttnArgs const& a, StageLayout const& sl, uint8_t* stage, uint64_t* bar,
    int b, int head, int pos0, int kcb, int vcb, int lane)
{
    KvLayerDesc const& L = a.layer;
    int const T = L.tokens_per_block;
    int const tShift = 31 - __clz(T);
    int const q = (pos0 & (T - 1)) >> 5; // tile of the block
    int64_t const blk = a.kv.block_table[static_cast<int64_t>(b) * a.kv.max_blocks_per_seq + (pos0 >> tShift)];
    uint8_t const* base = a.kv.pool + a.kv.layer_offset + blk * a.kv.block_stride;
    __syncwarp(); // every lane is done reading this stage
#if TQ_CTX_BULK
    if (lane == 0)
    {
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
        asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smemAddr(bar)),
                     "r"(static_cast<uint32_t>(sl.bytes))
                     : "memory");
    }
    __syncwarp();
    if (lane < 4)
    {
        int const src = lane == 0 ? L.k_codes_off[head] + q * kStageTokens * kcb
            : lane == 1           ? L.v_codes_off[head] + q * kStageTokens * vcb
            : lane == 2           ? L.k_meta_off[head] + q * kStageTokens * kTurboMetaBytes
                                  : L.v_meta_off[head] + q * kStageTokens * kTurboMetaBytes;
        int const dst = lane == 0 ? 0 : lane == 1 ? sl.offV : lane == 2 ? sl.offKM : sl.offVM;
        int const bytes = lane == 0 ? kStageTokens * kcb
            : lane == 1             ? kStageTokens * vcb
                                    : kStageTokens * kTurboMetaBytes;
        asm volatile(
            "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(
                smemAddr(stage + dst)),
            "l"(base + src), "r"(bytes), "r"(smemAddr(bar))
            : "memory");
    }
#else
    (void) bar;
    int const srcs[4] = {L.k_codes_off[head] + q * kStageTokens * kcb, L.v_codes_off[head] + q * kStageTokens * vcb,
        L.k_meta_off[head] + q * kStageTokens * kTurboMetaBytes, L.v_meta_off[head] + q * kStageTokens * kTurboMetaBytes};
    int const dsts[4] = {0, sl.offV, sl.offKM, sl.offVM};
    int const lens[4] = {kStageTokens * kcb, kStageTokens * vcb, kStageTokens * kTurboMetaBytes, kStageTokens * kTurboMetaBytes};
#pragma unroll
    for (int arr = 0; arr < 4; ++arr)
    {
        for (int u = lane; u < lens[arr] / 16; u += 32)
        {
            cpAsync16(stage + dsts[arr] + u * 16, base + srcs[arr] + u * 16);
        }
    }
    cpAsyncCommit();
#endif
}

__device__ __forceinline__ uint32_t transpose8x8(uint32_t x)
{
    uint32_t r;
    asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(r) : "r"(x));
    return r;
}

// The unit of B words at stage byte `off` (a lane chunk's unit): W[w] = little-endian word w.
template <int B>
__device__ __forceinline__ void loadUnit(uint8_t const* st, int off, uint32_t (&W)[B])
{
    if constexpr (B == 2)
    {
        uint2 const v = *reinterpret_cast<uint2 const*>(st + off);
        W[0] = v.x;
        W[1] = v.y;
    }
    else if constexpr (B == 4)
    {
        uint4 const v = *reinterpret_cast<uint4 const*>(st + off);
        W[0] = v.x;
        W[1] = v.y;
        W[2] = v.z;
        W[3] = v.w;
    }
    else if constexpr (B == 8)
    {
        uint4 const v = *reinterpret_cast<uint4 const*>(st + off);
        uint4 const u = *reinterpret_cast<uint4 const*>(st + off + 16);
        W[0] = v.x;
        W[1] = v.y;
        W[2] = v.z;
        W[3] = v.w;
        W[4] = u.x;
        W[5] = u.y;
        W[6] = u.z;
        W[7] = u.w;
    }
    else
    {
#pragma unroll
        for (int w = 0; w < B; ++w)
        {
            W[w] = *reinterpret_cast<uint32_t const*>(st + off + 4 * w);
        }
    }
}

// V unit words a step needs (kh: the step's half of the tile): j = kh and j = 2 + kh.
template <int B>
__device__ __forceinline__ void loadUnitV(uint8_t const* st, int off, int kh, uint32_t (&W)[B])
{
    if constexpr (B == 8)
    {
        uint2 const a = *reinterpret_cast<uint2 const*>(st + off + 8 * kh);
        uint2 const b = *reinterpret_cast<uint2 const*>(st + off + 16 + 8 * kh);
        W[2 * kh] = a.x;
        W[2 * kh + 1] = a.y;
        W[4 + 2 * kh] = b.x;
        W[5 + 2 * kh] = b.y;
    }
    else
    {
        loadUnit<B>(st, off, W);
    }
}

// Two consecutive units at stage byte `off` (8-byte aligned): 3-bit units (12 bytes) as three
// 8-byte loads instead of six 4-byte ones; other widths unit by unit (V: only the words of step kh).
template <int B, bool V>
__device__ __forceinline__ void loadUnitPair(uint8_t const* st, int off, int kh, uint32_t (&W)[2][B])
{
    if constexpr (B == 3)
    {
        uint2 const a = *reinterpret_cast<uint2 const*>(st + off);
        uint2 const b = *reinterpret_cast<uint2 const*>(st + off + 8);
        uint2 const c = *reinterpret_cast<uint2 const*>(st + off + 16);
        W[0][0] = a.x;
        W[0][1] = a.y;
        W[0][2] = b.x;
        W[1][0] = b.y;
        W[1][1] = c.x;
        W[1][2] = c.y;
    }
    else if constexpr (V)
    {
        loadUnitV<B>(st, off, kh, W[0]);
        loadUnitV<B>(st, off + 4 * B, kh, W[1]);
    }
    else
    {
        loadUnit<B>(st, off, W[0]);
        loadUnit<B>(st, off + 4 * B, W[1]);
    }
}

// Layout of one 16-token step in a warp (lane = 4 * g + t), tokens 16 * kh + r of a 32-slot tile:
//   S^T = K Q^T (m16n8k16): A = K rows (tokens g, g + 8 of the step = slots g + 8 * i, i = 2kh,
//        2kh + 1, which lane g's own tile chunk holds), k-slots 2t, 2t+1 | 2t+8, 2t+9 of k-step kk
//        = channels 16kk + 4t + 0, 1 | 2, 3; B = Q^T (same channels, the warp's query row g);
//        C = (tokens g, g+8; the warp's query rows 2t, 2t+1)
//   O^T += V^T P^T: A = V^T (rows: channels 16mt + g, 16mt + 8 + g; k-slots 2t, 2t+1 | 2t+8, 2t+9
//        = tokens 4t, 4t+1 | 4t+2, 4t+3, which lane (g, t)'s tile chunk holds),
//        B = P^T: C transposed by 8x8 movmatrix, then tokens 4t..4t+3 fetched from the quad by four
//        shuffles; C = O^T (channels 16mt + g, 16mt + 8 + g; query rows 2t, 2t+1)
template <int D, int KB, int VB>
__global__ void __launch_bounds__(kThreads, residentCtasPerSm(D)) attentionSplitKernel(__grid_constant__ AttnArgs const a)
{
    constexpr int KCB = D * KB / 8;
    constexpr int VCB = D * VB / 8;
    constexpr int KPAIRS = D / 8; // half2 of one K row per thread (D/4 codes)
    constexpr int MT = D / 16;    // m-tiles of O^T
    constexpr int KU = D / 64;    // K units of a lane chunk per step
    constexpr int kRows = kCtxRows; // query rows per CTA, kRowsPerWarp of them per warp
    constexpr int kStages = kCtxStages;
    constexpr float kNegInf = -INFINITY;
    constexpr float kSlack = 3.F; // P * v_scale must stay finite in fp16: P <= 8
    constexpr int kNoLow = 1 << 30; // scoreStep's cutLo when keys have no lower bound per row
    using CK = CtxCodes<KB>;
    using CV = CtxCodes<VB>;

    extern __shared__ __align__(16) uint8_t smem[];
    float* qs = reinterpret_cast<float*>(smem);                     // [kRows][D]
    uint64_t* bars = reinterpret_cast<uint64_t*>(qs + kRows * D);   // [kStages]
    uint8_t* stages = smem + prologueBytes<D>();                    // [kStages] pool tiles, then fragBytes

    KvLayerDesc const& L = a.layer;
    int const split = blockIdx.x;
    int const head = a.heads[blockIdx.y];
    int const hsub = a.group > kRows ? 2 : 1;
    int const zz = blockIdx.z / hsub;
    int const hs = blockIdx.z % hsub;
    // longest first: CTAs start in blockIdx order, and a causal row tile's keys grow with its index,
    // so the last tiles of every sequence go out first and the short ones fill the tail (measured:
    // benchmarks/NOTES.md, "context (prefill) attention, instructions first")
    int const b = zz % a.batch;
    int const tile = a.tiles_per_seq - 1 - zz / a.batch;
    int const seqLen = a.seq_lens[b];
    int qBegin, qLen;
    seqRows(a.cu_q, b, qBegin, qLen);
    int const tok0 = tile * a.tq;
    if (tok0 >= qLen)
    {
        return;
    }
    // query heads per token in this CTA (groups of more than kRows heads would take two CTAs)
    int const rh = a.group > kRows ? (hs == 0 ? kRows : a.group - kRows) : a.group;
    int const ntok = min(a.tq, qLen - tok0);
    int const nrows = ntok * rh;
    int const posBase = seqLen - qLen;
    int const keyLimit = posBase + tok0 + ntok; // keys [0, keyLimit) are visible to some row
    int const kb = split * a.split_len;
    int const ke = min(kb + a.split_len, keyLimit);
    int64_t const hq0 = static_cast<int64_t>(head) * a.group + hs * kRows;

    auto wsIndex = [&](int r) -> int64_t {
        return ((static_cast<int64_t>(qBegin + tok0 + r / rh) * a.num_q_heads + hq0 + r % rh) * a.num_splits) + split;
    };

    if (kb >= ke)
    {
        for (int r = threadIdx.x; r < nrows; r += kThreads)
        {
            a.ws_ml[2 * wsIndex(r)] = kNegInf;
            a.ws_ml[2 * wsIndex(r) + 1] = 0.F;
        }
        return;
    }

    int const lane = threadIdx.x & 31;
    int const warp = threadIdx.x >> 5;
    int const gq = lane >> 2;
    int const t4 = lane & 3;
    bool const bf16 = a.bf16 != 0;

    // ---- prologue: each warp's own q rows -> smoothing, rotation (fp32), into qs ----------------
    // lane holds channels PER * lane .. PER * lane + PER - 1 of a row; the rotation is warpWht
    constexpr int PER = D / 32;
    int const row0 = warp * kRowsPerWarp; // this warp's rows: row0 .. row0 + 7
    {
        float f[PER]; // smoothing * signs (the signs are +-1: the product is exact)
#pragma unroll
        for (int e = 0; e < PER; ++e)
        {
            int const c = PER * lane + e;
            f[e] = tableOr(a.k_smooth, static_cast<int64_t>(head) * D + c, 1.F) * h2f(a.signs[c]);
        }
#pragma unroll 1
        for (int rr = 0; rr < kRowsPerWarp; ++rr)
        {
            int const r = row0 + rr;
            float x[PER];
            if (r < nrows) // warp-uniform
            {
                int64_t const base = (qBegin + tok0 + r / rh) * a.q_stride + (hq0 + r % rh) * D + PER * lane;
#pragma unroll
                for (int e = 0; e < PER; ++e)
                {
                    x[e] = loadAct(a.q, base + e, bf16) * f[e];
                }
                warpWht<PER>(x, lane);
            }
            else
            {
#pragma unroll
                for (int e = 0; e < PER; ++e)
                {
                    x[e] = 0.F;
                }
            }
#pragma unroll
            for (int e = 0; e < PER; ++e)
            {
                qs[r * D + PER * lane + e] = x[e];
            }
        }
    }
    // every q row stored before the barriers are initialized (without it compute-sanitizer's racecheck
    // reports the q stores against the init at the first barrier's address; benchmarks/NOTES.md)
    __syncthreads();
    if (threadIdx.x < kStages)
    {
        mbarInit(&bars[threadIdx.x]);
    }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#endif
    __syncthreads();
    uint32_t qb[D / 16][2]; // B = Q^T: query row row0 + gq, channels 16kk + 4t4 + {0,1} and {2,3}
    {
        float const qmul = a.rsqrt_d * a.q_scale;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk)
        {
#pragma unroll
            for (int half = 0; half < 2; ++half)
            {
                int const c0 = 16 * kk + 4 * t4 + 2 * half;
                qb[kk][half] = packHalf2(qs[(row0 + gq) * D + c0] * qmul, qs[(row0 + gq) * D + c0 + 1] * qmul);
            }
        }
    }
    int const qposFirst = posBase + tok0 + row0 / rh; // this warp's first row (the others come later)
    // last visible position of this thread's two query rows (row0 + 2t4, row0 + 2t4 + 1); -1: padding row
    int qpos[2];
#pragma unroll
    for (int c = 0; c < 2; ++c)
    {
        int const r = row0 + 2 * t4 + c;
        qpos[c] = r < nrows ? posBase + tok0 + r / rh : -1;
    }

    ByteTable const ktab = ctxByteTable<(KB == 8 ? 2 : KB)>();
    ByteTable const vtab = ctxByteTable<(VB == 8 ? 2 : VB)>();

    float o[MT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
    {
        o[mt][0] = o[mt][1] = o[mt][2] = o[mt][3] = 0.F;
    }
    float m[2] = {kNegInf, kNegInf};
    float l[2] = {0.F, 0.F};

    // Lanes of the quad that hold P^T for this thread's V tokens 4t4, 4t4+1 and 4t4+2, 4t4+3.
    int const pSrc0 = (lane & ~3) | (2 * (t4 & 1));
    int const pSrc1 = pSrc0 + 1;

    // tmax: this thread's maxima of the new scores of its two rows (log2 units).
    auto raiseMax = [&](float (&tmax)[2]) {
        // The reference maximum m only moves when a score exceeds it by more than kSlack (log2
        // units): probabilities then stay below 2^kSlack, and the exact max reduction (shuffles)
        // and the rescale of O run only on those rare steps.
        if (__any_sync(0xffffffffu, tmax[0] > m[0] + kSlack || tmax[1] > m[1] + kSlack))
        {
#pragma unroll
            for (int c = 0; c < 2; ++c)
            {
                tmax[c] = fmaxf(tmax[c], __shfl_xor_sync(0xffffffffu, tmax[c], 4));
                tmax[c] = fmaxf(tmax[c], __shfl_xor_sync(0xffffffffu, tmax[c], 8));
                tmax[c] = fmaxf(tmax[c], __shfl_xor_sync(0xffffffffu, tmax[c], 16));
            }
            float alpha[2];
#pragma unroll
            for (int c = 0; c < 2; ++c)
            {
                float const mn = fmaxf(m[c], tmax[c]);
                alpha[c] = (mn == kNegInf) ? 1.F : exp2Ftz(m[c] - mn);
                m[c] = mn;
                l[c] *= alpha[c];
            }
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
            {
                o[mt][0] *= alpha[0];
                o[mt][1] *= alpha[1];
                o[mt][2] *= alpha[0];
                o[mt][3] *= alpha[1];
            }
        }
    };
    // P^T B fragment from P * v_scale of (tokens g, g + 8) x (rows 2t4, 2t4 + 1): transpose the
    // (tokens x rows) 8x8 blocks, then gather tokens 4t4..4t4+3
    auto toPT = [&](float const (&pv)[4], uint32_t& b0, uint32_t& b1) {
        uint32_t const pb0 = transpose8x8(packHalf2(pv[0], pv[1])); // tokens 2t4, 2t4+1
        uint32_t const pb1 = transpose8x8(packHalf2(pv[2], pv[3])); // tokens 8+2t4, 8+2t4+1
        uint32_t const x0 = __shfl_sync(0xffffffffu, pb0, pSrc0);
        uint32_t const y0 = __shfl_sync(0xffffffffu, pb1, pSrc0);
        uint32_t const x1 = __shfl_sync(0xffffffffu, pb0, pSrc1);
        uint32_t const y1 = __shfl_sync(0xffffffffu, pb1, pSrc1);
        b0 = t4 < 2 ? x0 : y0;
        b1 = t4 < 2 ? x1 : y1;
    };

    // One 16-token step: scoreStep, then valueStep. ka[kk]: the A fragment of k-step kk; b0, b1:
    // the P^T B fragment for valueStep; va[mt][4]: V^T A fragments;
    // ks/vs: scales of tokens g, g+8; keys at pos0 + token in [lo, hi) are valid, and for a query
    // row at position qp those with qp - cutLo < pos <= qp - cut (the recent-token window: the
    // quantized keys stop at qp - w, the window's fp16 keys start after it).
    auto scoreStep = [&](auto full, uint32_t const (&ka)[D / 16][4], float const (&ks)[2], float const (&vs)[2], int pos0, int lo,
                         int hi, int cut, int cutLo, uint32_t& b0, uint32_t& b1) {
        // four independent accumulator chains, summed at the end
        float sacc[4][4];
#pragma unroll
        for (int i = 0; i < 4; ++i)
        {
            sacc[i][0] = sacc[i][1] = sacc[i][2] = sacc[i][3] = 0.F;
        }
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk)
        {
            mma16816(sacc[kk % 4], ka[kk], qb[kk][0], qb[kk][1]);
        }
        float s[4];
        float tmax[2] = {kNegInf, kNegInf};
#pragma unroll
        for (int e = 0; e < 4; ++e)
        {
            int const tk = (e >> 1) * 8 + gq; // token of this element
            int const c = e & 1;              // query row 2t4 + c
            int const pos = pos0 + tk;
            float const dot = (sacc[0][e] + sacc[1][e]) + (sacc[2][e] + sacc[3][e]);
            if constexpr (decltype(full)::value)
            {
                s[e] = dot * ks[e >> 1];
            }
            else
            {
                bool const ok = pos >= lo && pos < hi && pos + cut <= qpos[c] && pos + cutLo > qpos[c];
                s[e] = ok ? dot * ks[e >> 1] : kNegInf;
            }
            tmax[c] = fmaxf(tmax[c], s[e]);
        }
        raiseMax(tmax);
        float pv[4];
#pragma unroll
        for (int e = 0; e < 4; ++e)
        {
            int const c = e & 1;
            if constexpr (decltype(full)::value)
            {
                // no score is masked, so m is finite after the update above
                float const p = exp2Ftz(s[e] - m[c]);
                l[c] += p;
                pv[e] = p * vs[e >> 1];
            }
            else
            {
                float const p = s[e] == kNegInf ? 0.F : exp2Ftz(s[e] - m[c]);
                l[c] += p;
                pv[e] = p != 0.F ? p * vs[e >> 1] : 0.F;
            }
        }
        toPT(pv, b0, b1);
    };
    auto valueStep = [&](uint32_t (&va)[MT][4], uint32_t b0, uint32_t b1) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
        {
            mma16816(o[mt], va[mt], b0, b1);
        }
    };

    // Both 16-token steps of an expanded tile whose keys every row of the warp sees: the scores of
    // the 32 keys first (four independent MMA chains), one maximum update, then P and both PV steps.
    auto fullTile = [&](uint32_t const* fb, float const* fs) {
        float sacc[2][2][4]; // [step][chain]
#pragma unroll
        for (int kh = 0; kh < 2; ++kh)
        {
#pragma unroll
            for (int ch = 0; ch < 2; ++ch)
            {
                sacc[kh][ch][0] = sacc[kh][ch][1] = sacc[kh][ch][2] = sacc[kh][ch][3] = 0.F;
            }
        }
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk)
        {
#pragma unroll
            for (int kh = 0; kh < 2; ++kh)
            {
                uint4 const u = reinterpret_cast<uint4 const*>(fb + (2 * kh) * (D / 4) * 32)[kk * 32 + lane];
                uint32_t const af[4] = {u.x, u.y, u.z, u.w};
                mma16816(sacc[kh][kk % 2], af, qb[kk][0], qb[kk][1]);
            }
        }
        float sc[2][4];
        float tmax[2] = {kNegInf, kNegInf};
#pragma unroll
        for (int kh = 0; kh < 2; ++kh)
        {
#pragma unroll
            for (int e = 0; e < 4; ++e)
            {
                sc[kh][e] = (sacc[kh][0][e] + sacc[kh][1][e]) * fs[(kh * 4 + (e >> 1)) * 32 + lane];
                tmax[e & 1] = fmaxf(tmax[e & 1], sc[kh][e]);
            }
        }
        raiseMax(tmax); // no score is masked: m is finite after it
        uint32_t pb[2][2];
#pragma unroll
        for (int kh = 0; kh < 2; ++kh)
        {
            float pv[4];
#pragma unroll
            for (int e = 0; e < 4; ++e)
            {
                float const p = exp2Ftz(sc[kh][e] - m[e & 1]);
                l[e & 1] += p;
                pv[e] = p * fs[(kh * 4 + 2 + (e >> 1)) * 32 + lane];
            }
            toPT(pv, pb[kh][0], pb[kh][1]);
        }
#pragma unroll
        for (int kh = 0; kh < 2; ++kh)
        {
            uint4 const* const srcV = reinterpret_cast<uint4 const*>(fb + (2 * kh + 1) * (D / 4) * 32) + lane;
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
            {
                uint4 const u = srcV[mt * 32];
                uint32_t const va[4] = {u.x, u.y, u.z, u.w};
                mma16816(o[mt], va, pb[kh][0], pb[kh][1]);
            }
        }
    };

    int const ns = L.sink_tokens;
    // One 16-token step over fp16 keys and values (transformed domain): positions pos0 .. pos0+15,
    // those in [lo, hi) valid, row lower bound cutLo (scoreStep); rowOf(pos, which) is the K (0) or
    // V (1) row of a position.
    auto exactStep = [&](auto const& rowOf, int pos0, int lo, int hi, int cutLo) {
        auto pair = [&](int which, int t0, int c0, int dt, int dc) -> uint32_t {
            uint32_t const x0 = pos0 + t0 < hi ? rowOf(pos0 + t0, which)[c0] : 0u;
            uint32_t const x1 = pos0 + t0 + dt < hi ? rowOf(pos0 + t0 + dt, which)[c0 + dc] : 0u;
            return x0 | (x1 << 16);
        };
        uint32_t ka[D / 16][4]; // A fragments: K rows g, g + 8; channels 16kk + 4t4 + {0, 1} | {2, 3}
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk)
        {
#pragma unroll
            for (int h2 = 0; h2 < 2; ++h2)
            {
                ka[kk][2 * h2] = pair(0, gq, 16 * kk + 4 * t4 + 2 * h2, 0, 1);
                ka[kk][2 * h2 + 1] = pair(0, gq + 8, 16 * kk + 4 * t4 + 2 * h2, 0, 1);
            }
        }
        float const one[2] = {1.F, 1.F};
        uint32_t b0, b1;
        scoreStep(std::false_type{}, ka, one, one, pos0, lo, hi, 0, cutLo, b0, b1);
        uint32_t va[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
        {
            va[mt][0] = pair(1, 4 * t4, 16 * mt + gq, 1, 0);
            va[mt][1] = pair(1, 4 * t4, 16 * mt + 8 + gq, 1, 0);
            va[mt][2] = pair(1, 4 * t4 + 2, 16 * mt + gq, 1, 0);
            va[mt][3] = pair(1, 4 * t4 + 2, 16 * mt + 8 + gq, 1, 0);
        }
        valueStep(va, b0, b1);
    };

    // ---- sink tokens in the split that starts at position 0 (at most 16: one step), every warp for
    // its own rows -----------------------------------------------------------------------------------
    if (kb == 0 && ns > 0)
    {
        int64_t const slot = a.kv.seq_slot[b];
        uint16_t const* sinks = a.kv.sink_pool + (slot * L.num_kv_heads + head) * 2 * ns * D;
        exactStep([&](int pos, int which) { return sinks + (static_cast<int64_t>(which) * ns + pos) * D; }, 0, 0,
            min(ns, ke), kNoLow);
    }

    // ---- the recent-token window in 16-token steps, every warp for its own rows --------------------
    // Row position qp reads keys qp - w < pos <= qp (pos >= ns) in fp16: this call's own tokens from
    // win_new, earlier ones from the ring, which the launcher updates only after this kernel.
    int const w = L.recent_tokens;
    if (w > 0)
    {
        int const p0 = posBase + tok0; // the first row's position: its window starts earliest
        int const wlo = max(max(kb, ns), p0 - w + 1);
        int const whi = ke;            // ke <= keyLimit = p0 + ntok
        int64_t const slot = a.kv.seq_slot[b];
        uint16_t const* ring = a.kv.recent_pool + (slot * L.num_kv_heads + head) * 2 * w * D;
        auto rowOf = [&](int pos, int which) -> uint16_t const* {
            if (pos >= posBase)
            {
                return a.win_new + ((static_cast<int64_t>(qBegin + pos - posBase) * L.num_kv_heads + head) * 2 + which) * D;
            }
            return ring + (static_cast<int64_t>(which) * w + pos % w) * D;
        };
        for (int s0 = wlo; s0 < whi; s0 += kTile)
        {
            exactStep(rowOf, s0, wlo, whi, w);
        }
    }

    // ---- quantized keys: the CTA's 32-slot pool tiles in order. Each tile is expanded once, by all
    // four warps (warp 2kh + v: the K (v = 0) or V (v = 1) fragments of 16-token step kh), into
    // shared memory in the lanes' register layout (lane L of every warp needs the same fragments),
    // then every warp runs both steps for its own rows. One barrier per tile; the expanded tiles
    // alternate between two buffers, the pool tiles go through kStages stages that warp 0 fills. ----
    constexpr StageLayout sl = stageLayout(KCB, VCB);
    constexpr int kItemWords = D / 4; // 2 * KPAIRS (K) = 4 * MT (V) registers per lane
    static_assert(kItemWords == 2 * KPAIRS && kItemWords == 4 * MT && KPAIRS % 4 == 0, "fragment groups of four");
    int const kExp = a.layer.k_scale_exp[head];
    int const vExp = a.layer.v_scale_exp[head];
    float const fracL = kDevScale8Frac[lane & 15]; // the scale grid F (docs/format.md §3.1)
    int const lo = max(kb, ns);
    int const ntiles = (ke - kb + kStageTokens - 1) / kStageTokens;
    auto tilePos = [&](int i) { return kb + kStageTokens * i; };
    uint32_t* const frag = reinterpret_cast<uint32_t*>(stages + kStages * sl.bytes);
    float* const fscale = reinterpret_cast<float*>(frag + 2 * 4 * kItemWords * 32);
    int const myKh = warp >> 1;       // the step this warp expands
    bool const myV = (warp & 1) != 0; // ... its V (else its K)
    if (warp == 0)
    {
#pragma unroll
        for (int i = 0; i < kStages - 1; ++i)
        {
            if (i < ntiles)
            {
                issueTile(a, sl, stages + i * sl.bytes, &bars[i], b, head, tilePos(i), KCB, VCB, lane);
            }
#if !TQ_CTX_BULK
            else
            {
                cpAsyncCommit();
            }
#endif
        }
    }
#pragma unroll 1
    for (int i = 0; i < ntiles; ++i)
    {
        uint8_t const* st = stages + (i % kStages) * sl.bytes;
#if TQ_CTX_BULK
        mbarWait(&bars[i % kStages], static_cast<uint32_t>((i / kStages) & 1));
#else
        if (warp == 0)
        {
            cpAsyncWait<kStages - 2>(); // tile i (warp 0 committed kStages - 1 + i groups)
        }
        __syncthreads();
#endif
        uint32_t* const fb = frag + (i & 1) * 4 * kItemWords * 32;
        float* const fs = fscale + (i & 1) * 2 * 4 * 32;
        // ---- expand: this warp's item of tile i ----
        {
            int const kh = myKh;
            int const pos0 = tilePos(i) + kTile * kh;
            if (!(pos0 + kTile <= lo || pos0 >= ke))
            {
                uint4* const dst = reinterpret_cast<uint4*>(fb + warp * kItemWords * 32) + lane;
                int const slotBase = kTile * kh + gq;
                if (!myV)
                {
                    uint32_t kr[kItemWords]; // token g + 8j, channel pair q (of 4t4 + {0, 1} | {2, 3}) at j * KPAIRS + q
                    // K: rows i = 2kh + j, registers rho = i * D/16 + kk -> units kh*KU .. kh*KU + KU - 1
                    int const kChunk = lane * KCB;
                    uint32_t W[2][KB]; // KU (1 or 2) units
                    if constexpr (KU == 2)
                    {
                        loadUnitPair<KB, false>(st, kChunk + kh * 8 * KB, kh, W);
                    }
                    else
                    {
                        loadUnit<KB>(st, kChunk + kh * 4 * KB, W[0]);
                    }
#pragma unroll
                    for (int j = 0; j < 2; ++j)
                    {
#pragma unroll
                        for (int kk = 0; kk < D / 16; ++kk)
                        {
                            int const lr = j * (D / 16) + kk; // register within the step's units
                            CK::reg(ktab, W[lr / 8], lr % 8, kr[j * KPAIRS + 2 * kk], kr[j * KPAIRS + 2 * kk + 1]);
                        }
                    }
#pragma unroll
                    for (int kk = 0; kk < D / 16; ++kk) // group kk: the A fragment of k-step kk
                    {
                        dst[kk * 32] = make_uint4(kr[2 * kk], kr[KPAIRS + 2 * kk], kr[2 * kk + 1], kr[KPAIRS + 2 * kk + 1]);
                    }
#pragma unroll
                    for (int j = 0; j < 2; ++j)
                    {
                        uint32_t const kc = st[sl.offKM + slotBase + 8 * j];
                        float const kf = __shfl_sync(0xffffffffu, fracL, (kc - 1U) & 15U);
                        fs[(kh * 4 + j) * 32 + lane]
                            = kc == 0U ? 0.F : kf * tqPow2(kExp + static_cast<int>((kc - 1U) >> 4)) * CK::kScale;
                    }
                }
                else
                {
                    // V: registers rho = 4m + 2kh + rh, unit m / 2
                    // (kh as a constant: a register index that depends on it would put W in local memory)
                    int const vChunk = sl.offV + lane * VCB;
                    auto expandV = [&](auto khc) {
                        constexpr int KH = decltype(khc)::value;
#pragma unroll
                        for (int pu = 0; pu < D / 64; ++pu)
                        {
                            uint32_t W[2][VB];
                            loadUnitPair<VB, true>(st, vChunk + pu * 8 * VB, KH, W);
#pragma unroll
                            for (int uu = 0; uu < 2; ++uu)
                            {
#pragma unroll
                                for (int mm = 0; mm < 2; ++mm)
                                {
                                    int const mt = 4 * pu + 2 * uu + mm; // unit 2pu + uu holds m-tiles 2u, 2u + 1
                                    int const r8 = 4 * mm + 2 * KH;
                                    uint32_t v0, v1, v2, v3;
                                    CV::reg(vtab, W[uu], r8, v0, v2);     // channel 16mt + g
                                    CV::reg(vtab, W[uu], r8 + 1, v1, v3); // channel 16mt + 8 + g
                                    dst[mt * 32] = make_uint4(v0, v1, v2, v3); // va[mt][0..3]
                                }
                            }
                        }
                    };
                    if (kh == 0)
                    {
                        expandV(std::integral_constant<int, 0>{});
                    }
                    else
                    {
                        expandV(std::integral_constant<int, 1>{});
                    }
#pragma unroll
                    for (int j = 0; j < 2; ++j)
                    {
                        uint32_t const vc = st[sl.offVM + slotBase + 8 * j];
                        float const vf = __shfl_sync(0xffffffffu, fracL, (vc - 1U) & 15U);
                        fs[(kh * 4 + 2 + j) * 32 + lane]
                            = vc == 0U ? 0.F : vf * tqPow2(vExp + static_cast<int>((vc - 1U) >> 4)) * CV::kScale;
                    }
                }
            }
        }
        __syncthreads(); // tile i expanded; its stage and the buffer of tile i - 1 are free
        if (warp == 0)
        {
            int const ni = i + kStages - 1; // into the stage of tile i - 1
            if (ni < ntiles)
            {
                issueTile(a, sl, stages + (ni % kStages) * sl.bytes, &bars[ni % kStages], b, head, tilePos(ni), KCB,
                    VCB, lane);
            }
#if !TQ_CTX_BULK
            else
            {
                cpAsyncCommit();
            }
#endif
        }
        // ---- both steps for this warp's rows: a tile whose 32 keys every row of the warp sees (its first
        // row is the earliest) as one step of 32 keys, no masks; else step by step ----
        if (tilePos(i) >= lo && tilePos(i) + kStageTokens <= ke && tilePos(i) + kStageTokens - 1 + w <= qposFirst)
        {
            fullTile(fb, fs);
            continue;
        }
#pragma unroll
        for (int kh = 0; kh < 2; ++kh)
        {
            int const pos0 = tilePos(i) + kTile * kh;
            if (pos0 + kTile <= lo || pos0 >= ke)
            {
                continue;
            }
            uint4 const* const srcK = reinterpret_cast<uint4 const*>(fb + (2 * kh) * kItemWords * 32) + lane;
            uint32_t ka[D / 16][4];
#pragma unroll
            for (int kk = 0; kk < D / 16; ++kk)
            {
                uint4 const u = srcK[kk * 32];
                ka[kk][0] = u.x;
                ka[kk][1] = u.y;
                ka[kk][2] = u.z;
                ka[kk][3] = u.w;
            }
            float ks[2], vs[2];
#pragma unroll
            for (int j = 0; j < 2; ++j)
            {
                ks[j] = fs[(kh * 4 + j) * 32 + lane];
                vs[j] = fs[(kh * 4 + 2 + j) * 32 + lane];
            }
            uint32_t b0, b1;
            // every key of the step visible to every row of this warp (its first row is the earliest)
            if (pos0 >= lo && pos0 + kTile <= ke && pos0 + kTile - 1 + w <= qposFirst)
            {
                scoreStep(std::true_type{}, ka, ks, vs, pos0, lo, ke, w, kNoLow, b0, b1);
            }
            else
            {
                scoreStep(std::false_type{}, ka, ks, vs, pos0, lo, ke, w, kNoLow, b0, b1);
            }
            uint4 const* const srcV = reinterpret_cast<uint4 const*>(fb + (2 * kh + 1) * kItemWords * 32) + lane;
            uint32_t va[MT][4]; // read after the scores: fewer live registers
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
            {
                uint4 const u = srcV[mt * 32];
                va[mt][0] = u.x;
                va[mt][1] = u.y;
                va[mt][2] = u.z;
                va[mt][3] = u.w;
            }
            valueStep(va, b0, b1);
        }
    }
#if !TQ_CTX_BULK
    if (warp == 0)
    {
        cpAsyncWait<0>();
    }
#endif

    // ---- this warp's rows: no combine across warps (each warp has its own rows) -----------------
#pragma unroll
    for (int c = 0; c < 2; ++c)
    {
        l[c] += __shfl_xor_sync(0xffffffffu, l[c], 4);
        l[c] += __shfl_xor_sync(0xffffffffu, l[c], 8);
        l[c] += __shfl_xor_sync(0xffffffffu, l[c], 16);
    }
    bool const single = a.num_splits == 1;
#pragma unroll
    for (int c = 0; c < 2; ++c)
    {
        int const r = row0 + 2 * t4 + c;
        if (r >= nrows)
        {
            continue;
        }
        float const inv = l[c] > 0.F ? 1.F / l[c] : 0.F;
        int64_t const wi = single ? 0 : wsIndex(r);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
        {
            int const chA = 16 * mt + gq;
            int const chB = 16 * mt + 8 + gq;
            if (single)
            {
                qs[r * D + chA] = o[mt][c] * inv; // normalized, transformed domain
                qs[r * D + chB] = o[mt][2 + c] * inv;
            }
            else
            {
                a.ws_o[wi * D + chA] = o[mt][c];
                a.ws_o[wi * D + chB] = o[mt][2 + c];
            }
        }
        if (!single && gq == 0)
        {
            a.ws_ml[2 * wi] = m[c];
            a.ws_ml[2 * wi + 1] = l[c];
        }
    }
    if (!single)
    {
        return;
    }
    // ---- single split: o = sv * R^-1(o_t) + mu_v, written directly, each warp its own rows ---------
    __syncwarp();
    RowOut<D> fin;
    fin.load(a, head, lane);
#pragma unroll 1
    for (int rr = 0; rr < kRowsPerWarp && row0 + rr < nrows; ++rr)
    {
        int const r = row0 + rr;
        float x[PER];
#pragma unroll
        for (int e = 0; e < PER; ++e)
        {
            x[e] = qs[r * D + PER * lane + e];
        }
        fin.store(a, x, qBegin + tok0 + r / rh, hq0 + r % rh, lane);
    }
}

template <int D, int KB, int VB>
cudaError_t launchSplit(AttnArgs const& args, int gridZ, cudaStream_t stream)
{
    constexpr StageLayout sl = stageLayout(D * KB / 8, D * VB / 8);
    int const smem = prologueBytes<D>() + kCtxStages * sl.bytes + fragBytes<D>();
    auto kernel = attentionSplitKernel<D, KB, VB>;
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (err != cudaSuccess)
    {
        return err;
    }
    dim3 grid(args.num_splits, args.num_launch_heads, gridZ);
    kernel<<<grid, kThreads, smem, stream>>>(args);
    return cudaGetLastError();
}


#define TQ_INSTANTIATE_ATTENTION(D, KB)                                                              \
    template cudaError_t launchSplit<D, KB, 2>(AttnArgs const&, int, cudaStream_t);                  \
    template cudaError_t launchSplit<D, KB, 3>(AttnArgs const&, int, cudaStream_t);                  \
    template cudaError_t launchSplit<D, KB, 4>(AttnArgs const&, int, cudaStream_t);                  \
    template cudaError_t launchSplit<D, KB, 8>(AttnArgs const&, int, cudaStream_t);

#define TQ_EXTERN_ATTENTION(D, KB)                                                                  \
    extern template cudaError_t launchSplit<D, KB, 2>(AttnArgs const&, int, cudaStream_t);           \
    extern template cudaError_t launchSplit<D, KB, 3>(AttnArgs const&, int, cudaStream_t);           \
    extern template cudaError_t launchSplit<D, KB, 4>(AttnArgs const&, int, cudaStream_t);           \
    extern template cudaError_t launchSplit<D, KB, 8>(AttnArgs const&, int, cudaStream_t);

} // namespace detail
} // namespace turboquant
