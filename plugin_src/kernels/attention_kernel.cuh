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
constexpr int kChunk = 64;   // tokens per pipeline stage (16 per warp)
constexpr int kStages = 4;
constexpr int kMaxSplits = 128;
constexpr int kResidentCtasPerSm = 2;
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

struct StageLayout
{
    int tp;       // tokens per piece: min(T, kChunk)
    int pbK, pbV, pbM; // padded bytes of one piece of each array
    int offV, offKM, offVM, bytes;
};

__host__ __device__ inline StageLayout stageLayout(int T, int kcb, int vcb)
{
    StageLayout s;
    s.tp = T < kChunk ? T : kChunk;
    int pieces = kChunk / s.tp;
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
    return 16 * D * 4 + 256 * 2; // rotated query rows + 8-bit table
}

template <int D>
__host__ __device__ constexpr int combineBytes()
{
    return kWarps * 16 * (D + 2) * 4;
}

// Copies one chunk (64 positions from `pos`) of one head's four arrays into a stage.
__device__ __forceinline__ void loadChunk(AttnArgs const& a, StageLayout const& sl, uint8_t* stage, int b,
    int head, int pos, int keyEnd, int kcb, int vcb)
{
    KvLayerDesc const& L = a.layer;
    int const T = L.tokens_per_block;
    int const pieces = kChunk / sl.tp;
    int const offs[4] = {L.k_codes_off[head], L.v_codes_off[head], L.k_meta_off[head], L.v_meta_off[head]};
    int const rowb[4] = {kcb, vcb, kTurboMetaBytes, kTurboMetaBytes};
    int const pb[4] = {sl.pbK, sl.pbV, sl.pbM, sl.pbM};
    int const soff[4] = {0, sl.offV, sl.offKM, sl.offVM};
    int32_t const* bt = a.kv.block_table + static_cast<int64_t>(b) * a.kv.max_blocks_per_seq;
    int const tShift = 31 - __clz(T);
    if (pieces == 1)
    {
        // T >= 64: the chunk is one contiguous run of rows in one block
        int64_t const blk = bt[pos >> tShift];
        uint8_t const* base = a.kv.pool + a.kv.layer_offset + blk * a.kv.block_stride;
        int const row0 = pos & (T - 1);
#pragma unroll
        for (int arr = 0; arr < 4; ++arr)
        {
            int const units = pb[arr] / 16;
            uint8_t const* src = base + offs[arr] + row0 * rowb[arr];
            for (int u = threadIdx.x; u < units; u += kThreads)
            {
                cpAsync16(stage + soff[arr] + u * 16, src + u * 16);
            }
        }
        return;
    }
#pragma unroll
    for (int arr = 0; arr < 4; ++arr)
    {
        int const units = pb[arr] / 16;
        int const total = pieces * units;
        for (int u = threadIdx.x; u < total; u += kThreads)
        {
            int const piece = u / units;
            int const within = u - piece * units;
            int const p0 = pos + (piece << tShift);
            if (p0 >= keyEnd)
            {
                continue;
            }
            int64_t const blk = bt[p0 >> tShift];
            uint8_t const* src = a.kv.pool + a.kv.layer_offset + blk * a.kv.block_stride + offs[arr] + within * 16;
            cpAsync16(stage + soff[arr] + piece * pb[arr] + within * 16, src);
        }
    }
}

template <int D, int KB, int VB>
__global__ void __launch_bounds__(kThreads, kResidentCtasPerSm) attentionSplitKernel(__grid_constant__ AttnArgs const a)
{
    constexpr int KCB = D * KB / 8;
    constexpr int VCB = D * VB / 8;
    constexpr int KPAIRS = D / 8; // half2 of one K row per thread (D/4 codes)
    constexpr int NV = D / 8;     // V codes of one row per thread = PV n-tiles
    constexpr int KGROUPS = D / 64;
    using DK = Dequant<KB, 16>;
    using DV = Dequant<VB, NV>;
    constexpr float kNegInf = -INFINITY;

    extern __shared__ __align__(16) uint8_t smem[];
    float* qs = reinterpret_cast<float*>(smem);                  // [16][D]
    uint16_t* tab8 = reinterpret_cast<uint16_t*>(qs + 16 * D);   // [256]
    uint8_t* stages = smem + prologueBytes<D>();

    KvLayerDesc const& L = a.layer;
    int const split = blockIdx.x;
    int const head = a.heads[blockIdx.y];
    int const b = blockIdx.z / a.tiles_per_seq;
    int const tile = blockIdx.z % a.tiles_per_seq;
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
    int const g = a.group;
    int const ntok = min(a.tq, qLen - tok0);
    int const nrows = ntok * g;
    int const posBase = seqLen - qLen;
    int const keyLimit = posBase + tok0 + ntok; // keys [0, keyLimit) are visible to some row
    int const kb = split * a.split_len;
    int const ke = min(kb + a.split_len, keyLimit);
    int64_t const hq0 = static_cast<int64_t>(head) * g;

    auto wsIndex = [&](int r) -> int64_t {
        return ((static_cast<int64_t>(qBegin + tok0 + r / g) * a.num_q_heads + hq0 + r % g) * a.num_splits) + split;
    };

    if (kb >= ke)
    {
        // nothing visible in this split (only reachable with several splits)
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
    for (int i = threadIdx.x; i < 16 * D; i += kThreads)
    {
        int const r = i / D;
        int const c = i % D;
        float x = 0.F;
        if (r < nrows)
        {
            int64_t const row = qBegin + tok0 + r / g;
            x = loadAct(a.q, row * a.q_stride + (hq0 + r % g) * D + c, bf16)
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
    __syncthreads();
#pragma unroll 1
    for (int len = 1; len < D; len <<= 1)
    {
        for (int i = threadIdx.x; i < 16 * D / 2; i += kThreads)
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
    uint32_t qa[D / 16][4];
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
                qa[kk][2 * half] = packHalf2(qs[gq * D + c0] * qmul, qs[gq * D + c1] * qmul);
                qa[kk][2 * half + 1] = packHalf2(qs[(gq + 8) * D + c0] * qmul, qs[(gq + 8) * D + c1] * qmul);
            }
        }
    }
    // last visible position of this thread's two rows (-1: padding row)
    int qpos[2];
    qpos[0] = gq < nrows ? posBase + tok0 + gq / g : -1;
    qpos[1] = gq + 8 < nrows ? posBase + tok0 + (gq + 8) / g : -1;

    DeqCtx kctx, vctx;
    kctx.t = makeByteTable<(KB == 8 ? 2 : KB)>();
    kctx.table8 = tab8;
    vctx.t = makeByteTable<(VB == 8 ? 2 : VB)>();
    vctx.table8 = tab8;

    float o[NV][4];
#pragma unroll
    for (int nt = 0; nt < NV; ++nt)
    {
        o[nt][0] = o[nt][1] = o[nt][2] = o[nt][3] = 0.F;
    }
    float m[2] = {kNegInf, kNegInf};
    float l[2] = {0.F, 0.F};

    // One 16-token tile: kf = K fragments (tokens 8j + gq), vb = V fragments, ks/vs = scales of
    // tokens {2t4, 2t4+1, 8+2t4, 9+2t4}; keys at positions pos0 + token in [lo, hi) are valid.
    auto tileStep = [&](uint32_t (&kf)[2][KPAIRS], uint32_t (&vb)[NV][2], float const (&ks)[4], float const (&vs)[4],
                        int pos0, int lo, int hi) {
        float s[2][4];
#pragma unroll
        for (int j = 0; j < 2; ++j)
        {
            s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.F;
        }
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk)
        {
#pragma unroll
            for (int j = 0; j < 2; ++j)
            {
                mma16816(s[j], qa[kk], kf[j][2 * kk], kf[j][2 * kk + 1]);
            }
        }
        float tmax[2] = {kNegInf, kNegInf};
#pragma unroll
        for (int j = 0; j < 2; ++j)
        {
#pragma unroll
            for (int e = 0; e < 4; ++e)
            {
                int const pos = pos0 + 8 * j + 2 * t4 + (e & 1);
                int const row = e >> 1;
                bool const ok = pos >= lo && pos < hi && pos <= qpos[row];
                s[j][e] = ok ? s[j][e] * ks[2 * j + (e & 1)] : kNegInf;
                tmax[row] = fmaxf(tmax[row], s[j][e]);
            }
        }
#pragma unroll
        for (int row = 0; row < 2; ++row)
        {
            tmax[row] = fmaxf(tmax[row], __shfl_xor_sync(0xffffffffu, tmax[row], 1));
            tmax[row] = fmaxf(tmax[row], __shfl_xor_sync(0xffffffffu, tmax[row], 2));
        }
        float alpha[2];
#pragma unroll
        for (int row = 0; row < 2; ++row)
        {
            float const mn = fmaxf(m[row], tmax[row]);
            alpha[row] = (mn == kNegInf) ? 1.F : exp2f(m[row] - mn);
            m[row] = mn;
            l[row] *= alpha[row];
        }
        if (__any_sync(0xffffffffu, alpha[0] != 1.F || alpha[1] != 1.F))
        {
#pragma unroll
            for (int nt = 0; nt < NV; ++nt)
            {
                o[nt][0] *= alpha[0];
                o[nt][1] *= alpha[0];
                o[nt][2] *= alpha[1];
                o[nt][3] *= alpha[1];
            }
        }
        float pv[2][4];
#pragma unroll
        for (int j = 0; j < 2; ++j)
        {
#pragma unroll
            for (int e = 0; e < 4; ++e)
            {
                int const row = e >> 1;
                float const p = s[j][e] == kNegInf ? 0.F : exp2f(s[j][e] - m[row]);
                l[row] += p;
                pv[j][e] = p != 0.F ? p * vs[2 * j + (e & 1)] : 0.F;
            }
        }
        uint32_t pa[4];
        pa[0] = packHalf2(pv[0][0], pv[0][1]);
        pa[1] = packHalf2(pv[0][2], pv[0][3]);
        pa[2] = packHalf2(pv[1][0], pv[1][1]);
        pa[3] = packHalf2(pv[1][2], pv[1][3]);
#pragma unroll
        for (int nt = 0; nt < NV; ++nt)
        {
            mma16816(o[nt], pa, vb[nt][0], vb[nt][1]);
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
        uint32_t vb[NV][2];
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
        for (int nt = 0; nt < NV; ++nt)
        {
            int const c = gq * NV + DV::perm(nt);
#pragma unroll
            for (int hh = 0; hh < 2; ++hh)
            {
                int const t0 = 2 * t4 + 8 * hh;
                uint32_t const x0 = t0 < hi ? vS[t0 * D + c] : 0u;
                uint32_t const x1 = t0 + 1 < hi ? vS[(t0 + 1) * D + c] : 0u;
                vb[nt][hh] = x0 | (x1 << 16);
            }
        }
        float const one[4] = {1.F, 1.F, 1.F, 1.F};
        tileStep(kf, vb, one, one, 0, 0, hi);
    }

    // ---- quantized keys: pipelined 64-token chunks ---------------------------------------------
    StageLayout const sl = stageLayout(L.tokens_per_block, KCB, VCB);
    // byte offsets within a stage of this thread's rows (the same for every chunk)
    auto stageOff = [&](int off, int pb, int rowBytes, int tok) {
        return off + (tok / sl.tp) * pb + (tok % sl.tp) * rowBytes;
    };
    int kRowOff[2], vRowOff[4], kMetaOff[4];
    {
        int const tb = 16 * warp;
        kRowOff[0] = stageOff(0, sl.pbK, KCB, tb + gq);
        kRowOff[1] = stageOff(0, sl.pbK, KCB, tb + 8 + gq);
        int const vt[4] = {tb + 2 * t4, tb + 2 * t4 + 1, tb + 2 * t4 + 8, tb + 2 * t4 + 9};
#pragma unroll
        for (int i = 0; i < 4; ++i)
        {
            vRowOff[i] = stageOff(sl.offV, sl.pbV, VCB, vt[i]);
            kMetaOff[i] = stageOff(sl.offKM, sl.pbM, kTurboMetaBytes, vt[i]);
        }
    }
    int const lo = max(kb, ns);
    int const c0 = kb / kChunk;
    int const cEnd = (ke + kChunk - 1) / kChunk;
#pragma unroll
    for (int i = 0; i < kStages - 1; ++i)
    {
        if (c0 + i < cEnd)
        {
            loadChunk(a, sl, stages + i * sl.bytes, b, head, (c0 + i) * kChunk, ke, KCB, VCB);
        }
        cpAsyncCommit();
    }
#pragma unroll 1
    for (int c = c0; c < cEnd; ++c)
    {
        cpAsyncWait<kStages - 2>();
        __syncthreads();
        {
            int const nc = c + kStages - 1;
            if (nc < cEnd)
            {
                loadChunk(a, sl, stages + ((nc - c0) % kStages) * sl.bytes, b, head, nc * kChunk, ke, KCB, VCB);
            }
            cpAsyncCommit();
        }
        uint8_t const* st = stages + ((c - c0) % kStages) * sl.bytes;
        int const pos0 = c * kChunk + 16 * warp;
        if (pos0 + 16 <= lo || pos0 >= ke)
        {
            continue;
        }
        uint32_t kf[2][KPAIRS];
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
                for (int i = 0; i < 8; ++i)
                {
                    kf[j][8 * G + i] = tmp[i];
                }
            }
        }
        uint32_t vf[4][NV / 2];
        float ks[4], vs[4];
#pragma unroll
        for (int i = 0; i < 4; ++i)
        {
            DV::run(vctx, st + vRowOff[i], gq * NV, D, vf[i]);
            ks[i] = h2f(*reinterpret_cast<uint16_t const*>(st + kMetaOff[i]));
            vs[i] = h2f(*reinterpret_cast<uint16_t const*>(st + kMetaOff[i] + (sl.offVM - sl.offKM)));
        }
        uint32_t vb[NV][2];
#pragma unroll
        for (int p = 0; p < NV / 2; ++p)
        {
            vb[2 * p][0] = prmt(vf[0][p], vf[1][p], 0x5410);
            vb[2 * p + 1][0] = prmt(vf[0][p], vf[1][p], 0x7632);
            vb[2 * p][1] = prmt(vf[2][p], vf[3][p], 0x5410);
            vb[2 * p + 1][1] = prmt(vf[2][p], vf[3][p], 0x7632);
        }
        tileStep(kf, vb, ks, vs, pos0, lo, ke);
    }
    cpAsyncWait<0>();
    __syncthreads();

    // ---- combine the four warps -----------------------------------------------------------------
#pragma unroll
    for (int row = 0; row < 2; ++row)
    {
        l[row] += __shfl_xor_sync(0xffffffffu, l[row], 1);
        l[row] += __shfl_xor_sync(0xffffffffu, l[row], 2);
    }
    float* comb = reinterpret_cast<float*>(stages);       // [kWarps][16][D]
    float* combML = comb + kWarps * 16 * D;               // [kWarps][16][2]
#pragma unroll
    for (int nt = 0; nt < NV; ++nt)
    {
        int const perm = DV::perm(nt);
        int const ch0 = (2 * t4) * NV + perm;
        int const ch1 = (2 * t4 + 1) * NV + perm;
        comb[(warp * 16 + gq) * D + ch0] = o[nt][0];
        comb[(warp * 16 + gq) * D + ch1] = o[nt][1];
        comb[(warp * 16 + gq + 8) * D + ch0] = o[nt][2];
        comb[(warp * 16 + gq + 8) * D + ch1] = o[nt][3];
    }
    if (t4 == 0)
    {
        combML[(warp * 16 + gq) * 2] = m[0];
        combML[(warp * 16 + gq) * 2 + 1] = l[0];
        combML[(warp * 16 + gq + 8) * 2] = m[1];
        combML[(warp * 16 + gq + 8) * 2 + 1] = l[1];
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
            mx = fmaxf(mx, combML[(w * 16 + r) * 2]);
        }
        float acc = 0.F, sum = 0.F;
        if (mx != kNegInf)
        {
#pragma unroll
            for (int w = 0; w < kWarps; ++w)
            {
                float const mw = combML[(w * 16 + r) * 2];
                if (mw != kNegInf)
                {
                    float const f = exp2f(mw - mx);
                    acc += f * comb[(w * 16 + r) * D + c];
                    sum += f * combML[(w * 16 + r) * 2 + 1];
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
        int64_t const row = qBegin + tok0 + r / g;
        storeAct(a.out, row * a.out_stride + (hq0 + r % g) * D + c, outv, bf16);
    }
}

template <int D, int KB, int VB>
cudaError_t launchSplit(AttnArgs const& args, int gridZ, cudaStream_t stream)
{
    StageLayout const sl = stageLayout(args.layer.tokens_per_block, D * KB / 8, D * VB / 8);
    int const smem = prologueBytes<D>() + std::max(kStages * sl.bytes, combineBytes<D>());
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
