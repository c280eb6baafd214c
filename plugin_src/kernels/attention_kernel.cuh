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

namespace turboquant
{
namespace detail
{

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kChunk = 64;   // split boundaries are multiples of this
constexpr int kTile = 16;    // tokens per warp step and per pipeline stage
constexpr int kWarpStages = 4; // per-warp pipeline depth
constexpr int kMaxSplits = 128;
#ifndef TQ_CTAS_PER_SM
#define TQ_CTAS_PER_SM 4
#endif
constexpr int kResidentCtasPerSm = TQ_CTAS_PER_SM; // register budget: 65536 / (128 * this)
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

// One warp's stage: the four arrays of a 16-token tile, in pieces of min(T, 16) rows (one piece
// per page), each piece padded to 16 bytes as in the pool.
struct StageLayout
{
    int tp;            // tokens per piece: min(T, kTile)
    int pbK, pbV, pbM; // padded bytes of one piece of each array
    int offV, offKM, offVM, bytes;
};

__host__ __device__ inline StageLayout stageLayout(int T, int kcb, int vcb)
{
    StageLayout s;
    s.tp = T < kTile ? T : kTile;
    int const pieces = kTile / s.tp;
    s.pbK = tqAlignUp(s.tp * kcb);
    s.pbV = tqAlignUp(s.tp * vcb);
    s.pbM = tqAlignUp(s.tp * kTurboMetaBytes);
    s.offV = pieces * s.pbK;
    s.offKM = s.offV + pieces * s.pbV;
    s.offVM = s.offKM + pieces * s.pbM;
    s.bytes = s.offVM + pieces * s.pbM;
    return s;
}

template <int D>
__host__ __device__ constexpr int prologueBytes()
{
    return 16 * D * 4 + 256 * 2 + kWarps * kWarpStages * 8; // query rows, 8-bit table, mbarriers
}

template <int D>
__host__ __device__ constexpr int combineBytes()
{
    return kWarps * 8 * (D + 2) * 4;
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

// Starts the copy of one 16-token tile (positions pos0..pos0+15, those below keyEnd) of one head's
// four arrays into a warp's stage. sm_90+: bulk copies (one per array and page) completing on the
// stage's mbarrier; older GPUs: 16-byte cp.async by every lane, one commit group per tile.
__device__ __forceinline__ void issueTile(AttnArgs const& a, StageLayout const& sl, uint8_t* stage, uint64_t* bar,
    int b, int head, int pos0, int keyEnd, int kcb, int vcb, int lane)
{
    KvLayerDesc const& L = a.layer;
    int const T = L.tokens_per_block;
    int const tShift = 31 - __clz(T);
    int const pieces = kTile / sl.tp;
    int const valid = min(pieces, (keyEnd - pos0 + sl.tp - 1) / sl.tp);
    int const offs[4] = {L.k_codes_off[head], L.v_codes_off[head], L.k_meta_off[head], L.v_meta_off[head]};
    int const rowb[4] = {kcb, vcb, kTurboMetaBytes, kTurboMetaBytes};
    int const pb[4] = {sl.pbK, sl.pbV, sl.pbM, sl.pbM};
    int const soff[4] = {0, sl.offV, sl.offKM, sl.offVM};
    int32_t const* bt = a.kv.block_table + static_cast<int64_t>(b) * a.kv.max_blocks_per_seq;
    uint8_t const* pool = a.kv.pool + a.kv.layer_offset;
    __syncwarp(); // every lane is done reading this stage
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if (lane == 0)
    {
        uint32_t const bytes = static_cast<uint32_t>(valid * (sl.pbK + sl.pbV + 2 * sl.pbM));
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
        asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smemAddr(bar)), "r"(bytes)
                     : "memory");
    }
    __syncwarp();
    for (int i = lane; i < 4 * valid; i += 32)
    {
        int const arr = i & 3;
        int const piece = i >> 2;
        // select instead of indexing the small arrays (keeps them in registers)
        int const off = arr == 0 ? offs[0] : arr == 1 ? offs[1] : arr == 2 ? offs[2] : offs[3];
        int const rb = arr == 0 ? rowb[0] : arr == 1 ? rowb[1] : kTurboMetaBytes;
        int const pbA = arr == 0 ? pb[0] : arr == 1 ? pb[1] : pb[2];
        int const so = arr == 0 ? soff[0] : arr == 1 ? soff[1] : arr == 2 ? soff[2] : soff[3];
        int const p0 = pos0 + piece * sl.tp;
        int64_t const blk = bt[p0 >> tShift];
        uint8_t const* src = pool + blk * a.kv.block_stride + off + (p0 & (T - 1)) * rb;
        asm volatile(
            "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(
                smemAddr(stage + so + piece * pbA)),
            "l"(src), "r"(pbA), "r"(smemAddr(bar))
            : "memory");
    }
#else
    (void) bar;
#pragma unroll
    for (int arr = 0; arr < 4; ++arr)
    {
        int const units = pb[arr] / 16;
        for (int u = lane; u < valid * units; u += 32)
        {
            int const piece = u / units;
            int const within = u - piece * units;
            int const p0 = pos0 + piece * sl.tp;
            int64_t const blk = bt[p0 >> tShift];
            uint8_t const* src = pool + blk * a.kv.block_stride + offs[arr] + (p0 & (T - 1)) * rowb[arr] + within * 16;
            cpAsync16(stage + soff[arr] + piece * pb[arr] + within * 16, src);
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

// Layout of one 16-token tile in a warp (lane = 4 * r + t):
//   S^T = K Q^T (m16n8k16): A = K rows (tokens r, r+8; channel pairs of thread t's range),
//        B = Q^T (channel pairs of thread t; query row r), C = (tokens r, r+8; query rows 2t, 2t+1)
//   O^T += V^T P^T: A = V^T (channels of thread group r; tokens 2t, 2t+1, 2t+8, 2t+9),
//        B = P^T from C by an 8x8 transpose (movmatrix), C = O^T (channels; query rows 2t, 2t+1)
template <int D, int KB, int VB>
__global__ void __launch_bounds__(kThreads, kResidentCtasPerSm) attentionSplitKernel(__grid_constant__ AttnArgs const a)
{
    constexpr int KCB = D * KB / 8;
    constexpr int VCB = D * VB / 8;
    constexpr int KPAIRS = D / 8; // half2 of one K row per thread (D/4 codes)
    constexpr int NV = D / 8;     // V channels per thread group
    constexpr int MT = D / 16;    // m-tiles of O^T
    constexpr int KGROUPS = D / 64;
    constexpr int kRows = 8;      // query rows per CTA
    using DK = Dequant<KB, 16>;
    using DV = Dequant<VB, NV>;
    constexpr float kNegInf = -INFINITY;
    constexpr float kSlack = 3.F; // P * v_scale must stay finite in fp16: P <= 8

    extern __shared__ __align__(16) uint8_t smem[];
    float* qs = reinterpret_cast<float*>(smem);                     // [16][D] (8 used)
    uint16_t* tab8 = reinterpret_cast<uint16_t*>(qs + 16 * D);      // [256]
    uint64_t* bars = reinterpret_cast<uint64_t*>(tab8 + 256);       // [kWarps][kWarpStages]
    uint8_t* stages = smem + prologueBytes<D>();

    KvLayerDesc const& L = a.layer;
    int const split = blockIdx.x;
    int const head = a.heads[blockIdx.y];
    int const hsub = a.group > kRows ? 2 : 1;
    int const zz = blockIdx.z / hsub;
    int const hs = blockIdx.z % hsub;
    int const b = zz / a.tiles_per_seq;
    int const tile = zz % a.tiles_per_seq;
    int const seqLen = a.seq_lens[b];
    int qBegin, qLen;
    if (a.cu_q != nullptr)
    {
        qBegin = a.cu_q[b];
        qLen = a.cu_q[b + 1] - qBegin;
    }
    else
    {
        qBegin = b;
        qLen = 1;
    }
    int const tok0 = tile * a.tq;
    if (tok0 >= qLen)
    {
        return;
    }
    // query heads per token in this CTA (groups of more than 8 heads take two CTAs)
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

    // ---- prologue: q rows -> smoothing, rotation (fp32), scale ---------------------------------
    for (int i = threadIdx.x; i < kRows * D; i += kThreads)
    {
        int const r = i / D;
        int const c = i % D;
        float x = 0.F;
        if (r < nrows)
        {
            int64_t const row = qBegin + tok0 + r / rh;
            x = loadAct(a.q, row * a.q_stride + (hq0 + r % rh) * D + c, bf16)
                * tableOr(a.k_smooth, static_cast<int64_t>(head) * D + c, 1.F) * h2f(a.signs[c]);
        }
        qs[i] = x;
    }
    if constexpr (KB == 8 || VB == 8)
    {
        for (int i = threadIdx.x; i < 256; i += kThreads)
        {
            tab8[i] = __half_as_ushort(__float2half_rn(kDevCodebook8[i]));
        }
    }
    if (threadIdx.x < kWarps * kWarpStages)
    {
        mbarInit(&bars[threadIdx.x]);
    }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#endif
    __syncthreads();
#pragma unroll 1
    for (int len = 1; len < D; len <<= 1)
    {
        for (int i = threadIdx.x; i < kRows * D / 2; i += kThreads)
        {
            int const r = i / (D / 2);
            int const p = i % (D / 2);
            int const lo = (p / len) * 2 * len + (p % len);
            float const x0 = qs[r * D + lo];
            float const x1 = qs[r * D + lo + len];
            qs[r * D + lo] = x0 + x1;
            qs[r * D + lo + len] = x0 - x1;
        }
        __syncthreads();
    }
    uint32_t qb[D / 16][2]; // B = Q^T: query row gq, channel pairs 2kk, 2kk+1 of thread t4
    {
        float const qmul = a.rsqrt_d * a.q_scale;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk)
        {
#pragma unroll
            for (int half = 0; half < 2; ++half)
            {
                int const P = 2 * kk + half;
                int const base = t4 * (D / 4) + 16 * (P / 8);
                int const c0 = base + DK::perm(2 * (P % 8));
                int const c1 = base + DK::perm(2 * (P % 8) + 1);
                qb[kk][half] = packHalf2(qs[gq * D + c0] * qmul, qs[gq * D + c1] * qmul);
            }
        }
    }
    // last visible position of this thread's two query rows (2t4, 2t4+1); -1: padding row
    int qpos[2];
#pragma unroll
    for (int c = 0; c < 2; ++c)
    {
        int const r = 2 * t4 + c;
        qpos[c] = r < nrows ? posBase + tok0 + r / rh : -1;
    }

    DeqCtx kctx, vctx;
    kctx.t = makeByteTable<(KB == 8 ? 2 : KB)>();
    kctx.table8 = tab8;
    vctx.t = makeByteTable<(VB == 8 ? 2 : VB)>();
    vctx.table8 = tab8;

    float o[MT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
    {
        o[mt][0] = o[mt][1] = o[mt][2] = o[mt][3] = 0.F;
    }
    float m[2] = {kNegInf, kNegInf};
    float l[2] = {0.F, 0.F};

    // One 16-token tile. kf[j][P]: K pairs of token r + 8j; va[mt][4]: V^T A fragments;
    // ks/vs: scales of tokens r, r+8; keys at pos0 + token in [lo, hi) are valid.
    auto tileStep = [&](uint32_t (&kf)[2][KPAIRS], uint32_t (&va)[MT][4], float const (&ks)[2], float const (&vs)[2],
                        int pos0, int lo, int hi) {
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
            uint32_t const af[4] = {kf[0][2 * kk], kf[1][2 * kk], kf[0][2 * kk + 1], kf[1][2 * kk + 1]};
            mma16816(sacc[kk % 4], af, qb[kk][0], qb[kk][1]);
        }
        float s[4];
        float tmax[2] = {kNegInf, kNegInf};
#pragma unroll
        for (int e = 0; e < 4; ++e)
        {
            int const tk = (e >> 1) * 8 + gq; // token of this element
            int const c = e & 1;              // query row 2t4 + c
            int const pos = pos0 + tk;
            bool const ok = pos >= lo && pos < hi && pos <= qpos[c];
            float const dot = (sacc[0][e] + sacc[1][e]) + (sacc[2][e] + sacc[3][e]);
            s[e] = ok ? dot * ks[e >> 1] : kNegInf;
            tmax[c] = fmaxf(tmax[c], s[e]);
        }
        // The reference maximum m only moves when a score exceeds it by more than kSlack (log2
        // units): probabilities then stay below 2^kSlack, and the exact max reduction (shuffles)
        // and the rescale of O run only on those rare tiles.
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
                alpha[c] = (mn == kNegInf) ? 1.F : exp2f(m[c] - mn);
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
        float pv[4];
#pragma unroll
        for (int e = 0; e < 4; ++e)
        {
            int const c = e & 1;
            float const p = s[e] == kNegInf ? 0.F : exp2f(s[e] - m[c]);
            l[c] += p;
            pv[e] = p != 0.F ? p * vs[e >> 1] : 0.F;
        }
        // P^T as the B operand: transpose (tokens x rows) 8x8 blocks
        uint32_t const pb0 = transpose8x8(packHalf2(pv[0], pv[1]));
        uint32_t const pb1 = transpose8x8(packHalf2(pv[2], pv[3]));
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
        {
            mma16816(o[mt], va[mt], pb0, pb1);
        }
    };

    int const ns = L.sink_tokens;
    // ---- sink tokens (fp16, transformed domain) in the split that starts at position 0 --------
    if (kb == 0 && ns > 0 && warp == 0)
    {
        int const hi = min(ns, ke);
        int64_t const slot = a.kv.seq_slot[b];
        uint16_t const* kS = a.kv.sink_pool + ((slot * L.num_kv_heads + head) * 2 + 0) * ns * D;
        uint16_t const* vS = kS + static_cast<int64_t>(ns) * D;
        uint32_t kf[2][KPAIRS];
        uint32_t va[MT][4];
#pragma unroll
        for (int j = 0; j < 2; ++j)
        {
            int const tk = 8 * j + gq;
#pragma unroll
            for (int P = 0; P < KPAIRS; ++P)
            {
                int const base = t4 * (D / 4) + 16 * (P / 8);
                int const c0 = base + DK::perm(2 * (P % 8));
                int const c1 = base + DK::perm(2 * (P % 8) + 1);
                kf[j][P] = tk < hi ? (static_cast<uint32_t>(kS[tk * D + c0]) | (static_cast<uint32_t>(kS[tk * D + c1]) << 16)) : 0u;
            }
        }
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
        {
#pragma unroll
            for (int e = 0; e < 4; ++e)
            {
                int const c = gq * NV + DV::perm(2 * mt + (e & 1));
                int const t0 = 2 * t4 + 8 * (e >> 1);
                uint32_t const x0 = t0 < hi ? vS[t0 * D + c] : 0u;
                uint32_t const x1 = t0 + 1 < hi ? vS[(t0 + 1) * D + c] : 0u;
                va[mt][e] = x0 | (x1 << 16);
            }
        }
        float const one[2] = {1.F, 1.F};
        tileStep(kf, va, one, one, 0, 0, hi);
    }

    // ---- quantized keys: each warp streams its own 16-token tiles (tiles warp, warp+4, ...) ----
    StageLayout const sl = stageLayout(L.tokens_per_block, KCB, VCB);
    auto stageOff = [&](int off, int pb, int rowBytes, int tok) {
        return off + (tok / sl.tp) * pb + (tok % sl.tp) * rowBytes;
    };
    // byte offsets within a stage of this thread's rows (the same for every tile)
    int kRowOff[2], vRowOff[4], kMetaOff[2];
#pragma unroll
    for (int j = 0; j < 2; ++j)
    {
        kRowOff[j] = stageOff(0, sl.pbK, KCB, 8 * j + gq);
        kMetaOff[j] = stageOff(sl.offKM, sl.pbM, kTurboMetaBytes, 8 * j + gq);
    }
    {
        int const vt[4] = {2 * t4, 2 * t4 + 1, 2 * t4 + 8, 2 * t4 + 9};
#pragma unroll
        for (int i = 0; i < 4; ++i)
        {
            vRowOff[i] = stageOff(sl.offV, sl.pbV, VCB, vt[i]);
        }
    }
    int const vMetaDelta = sl.offVM - sl.offKM;
    int const lo = max(kb, ns);
    int const ntiles = (ke - kb + kTile - 1) / kTile;
    int const nMine = ntiles > warp ? (ntiles - warp + kWarps - 1) / kWarps : 0;
    uint8_t* myStages = stages + warp * kWarpStages * sl.bytes;
    uint64_t* myBars = bars + warp * kWarpStages;
    auto tilePos = [&](int i) { return kb + kTile * (warp + kWarps * i); };
#pragma unroll
    for (int i = 0; i < kWarpStages - 1; ++i)
    {
        if (i < nMine)
        {
            issueTile(a, sl, myStages + i * sl.bytes, &myBars[i], b, head, tilePos(i), ke, KCB, VCB, lane);
        }
#if !(defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900)
        else
        {
            cpAsyncCommit();
        }
#endif
    }
#pragma unroll 1
    for (int i = 0; i < nMine; ++i)
    {
        int const ni = i + kWarpStages - 1;
        if (ni < nMine)
        {
            issueTile(a, sl, myStages + (ni % kWarpStages) * sl.bytes, &myBars[ni % kWarpStages], b, head, tilePos(ni),
                ke, KCB, VCB, lane);
        }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
        mbarWait(&myBars[i % kWarpStages], static_cast<uint32_t>((i / kWarpStages) & 1));
#else
        else
        {
            cpAsyncCommit();
        }
        cpAsyncWait<kWarpStages - 1>();
        __syncwarp();
#endif
        uint8_t const* st = myStages + (i % kWarpStages) * sl.bytes;
        int const pos0 = tilePos(i);
        if (pos0 + kTile <= lo)
        {
            continue;
        }
        uint32_t kf[2][KPAIRS];
        float ks[2], vs[2];
#pragma unroll
        for (int j = 0; j < 2; ++j)
        {
            uint8_t const* row = st + kRowOff[j];
#pragma unroll
            for (int G = 0; G < KGROUPS; ++G)
            {
                uint32_t tmp[8];
                DK::run(kctx, row, t4 * (D / 4) + 16 * G, D, tmp);
#pragma unroll
                for (int q = 0; q < 8; ++q)
                {
                    kf[j][8 * G + q] = tmp[q];
                }
            }
            ks[j] = h2f(*reinterpret_cast<uint16_t const*>(st + kMetaOff[j]));
            vs[j] = h2f(*reinterpret_cast<uint16_t const*>(st + kMetaOff[j] + vMetaDelta));
        }
        uint32_t vf[4][NV / 2];
#pragma unroll
        for (int q = 0; q < 4; ++q)
        {
            DV::run(vctx, st + vRowOff[q], gq * NV, D, vf[q]);
        }
        uint32_t va[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
        {
            va[mt][0] = prmt(vf[0][mt], vf[1][mt], 0x5410);
            va[mt][1] = prmt(vf[0][mt], vf[1][mt], 0x7632);
            va[mt][2] = prmt(vf[2][mt], vf[3][mt], 0x5410);
            va[mt][3] = prmt(vf[2][mt], vf[3][mt], 0x7632);
        }
        tileStep(kf, va, ks, vs, pos0, lo, ke);
    }
#if !(defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900)
    cpAsyncWait<0>();
#endif
    __syncthreads();

    // ---- combine the four warps -----------------------------------------------------------------
#pragma unroll
    for (int c = 0; c < 2; ++c)
    {
        l[c] += __shfl_xor_sync(0xffffffffu, l[c], 4);
        l[c] += __shfl_xor_sync(0xffffffffu, l[c], 8);
        l[c] += __shfl_xor_sync(0xffffffffu, l[c], 16);
    }
    float* comb = reinterpret_cast<float*>(stages);       // [kWarps][8][D]
    float* combML = comb + kWarps * kRows * D;            // [kWarps][8][2]
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
    {
        int const chA = gq * NV + DV::perm(2 * mt);
        int const chB = gq * NV + DV::perm(2 * mt + 1);
        comb[(warp * kRows + 2 * t4) * D + chA] = o[mt][0];
        comb[(warp * kRows + 2 * t4 + 1) * D + chA] = o[mt][1];
        comb[(warp * kRows + 2 * t4) * D + chB] = o[mt][2];
        comb[(warp * kRows + 2 * t4 + 1) * D + chB] = o[mt][3];
    }
    if (gq == 0)
    {
        combML[(warp * kRows + 2 * t4) * 2] = m[0];
        combML[(warp * kRows + 2 * t4) * 2 + 1] = l[0];
        combML[(warp * kRows + 2 * t4 + 1) * 2] = m[1];
        combML[(warp * kRows + 2 * t4 + 1) * 2 + 1] = l[1];
    }
    __syncthreads();
    bool const single = a.num_splits == 1;
    for (int i = threadIdx.x; i < nrows * D; i += kThreads)
    {
        int const r = i / D;
        int const c = i % D;
        float mx = kNegInf;
#pragma unroll
        for (int w = 0; w < kWarps; ++w)
        {
            mx = fmaxf(mx, combML[(w * kRows + r) * 2]);
        }
        float acc = 0.F, sum = 0.F;
        if (mx != kNegInf)
        {
#pragma unroll
            for (int w = 0; w < kWarps; ++w)
            {
                float const mw = combML[(w * kRows + r) * 2];
                if (mw != kNegInf)
                {
                    float const f = exp2f(mw - mx);
                    acc += f * comb[(w * kRows + r) * D + c];
                    sum += f * combML[(w * kRows + r) * 2 + 1];
                }
            }
        }
        if (single)
        {
            qs[r * D + c] = sum > 0.F ? acc / sum : 0.F; // normalized, transformed domain
        }
        else
        {
            int64_t const wi = wsIndex(r);
            a.ws_o[wi * D + c] = acc;
            if (c == 0)
            {
                a.ws_ml[2 * wi] = mx;
                a.ws_ml[2 * wi + 1] = sum;
            }
        }
    }
    if (!single)
    {
        return;
    }
    // ---- single split: o = sv * R^-1(o_t) + mu_v, written directly ------------------------------
    __syncthreads();
#pragma unroll 1
    for (int len = 1; len < D; len <<= 1)
    {
        for (int i = threadIdx.x; i < nrows * D / 2; i += kThreads)
        {
            int const r = i / (D / 2);
            int const p = i % (D / 2);
            int const lo2 = (p / len) * 2 * len + (p % len);
            float const x0 = qs[r * D + lo2];
            float const x1 = qs[r * D + lo2 + len];
            qs[r * D + lo2] = x0 + x1;
            qs[r * D + lo2 + len] = x0 - x1;
        }
        __syncthreads();
    }
    for (int i = threadIdx.x; i < nrows * D; i += kThreads)
    {
        int const r = i / D;
        int const c = i % D;
        float const y = qs[i] * a.rsqrt_d * h2f(a.signs[c]);
        int64_t const hv = static_cast<int64_t>(head) * D + c;
        float const outv = tableOr(a.v_smooth, hv, 1.F) * y + tableOr(a.v_mean, hv, 0.F);
        int64_t const row = qBegin + tok0 + r / rh;
        storeAct(a.out, row * a.out_stride + (hq0 + r % rh) * D + c, outv, bf16);
    }
}

template <int D, int KB, int VB>
cudaError_t launchSplit(AttnArgs const& args, int gridZ, cudaStream_t stream)
{
    StageLayout const sl = stageLayout(args.layer.tokens_per_block, D * KB / 8, D * VB / 8);
    int const smem = prologueBytes<D>() + std::max(kWarps * kWarpStages * sl.bytes, combineBytes<D>());
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
