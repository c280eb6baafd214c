// Decode and context attention over the quantized paged KV pool (docs/format.md).
//
// attentionSplitKernel<D, KB, VB>: one CTA per (row tile, KV head, split of the key range). A row
// tile is up to 16 (query token, query head) rows of one KV head's GQA group: decode has one
// query token per sequence, so the tile holds the g query heads and every K/V byte is read once
// per step. Four warps share a pipeline of 64-token chunks (cp.async, 16-byte copies, four stages);
// each warp dequantizes 16 tokens in registers (dequant.cuh) and runs both products on tensor
// cores (mma m16n8k16, fp16 inputs, fp32 accumulation): S = Q_t K^T with the rows of Q as the
// 16-row A operand, then O += P V with P reused from S's accumulators. The query is smoothed,
// rotated and scaled in the kernel's prologue. Partial (max, sum, O) per split go to the
// workspace and attentionReduceKernel<D> combines them and applies R^-1, smoothing and mean; with
// a single split the kernel does that itself.
//
// Channel order: thread t of a quad holds channels [t*D/4, (t+1)*D/4) of a K row, in the order
// the dequantizer produces (Dequant<KB,16>::perm); the query fragment uses the same order. For V
// the n index of the PV product (thread group gq) maps to channels gq*D/8 + Dequant<VB,D/8>::perm.
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
#pragma unroll
    for (int arr = 0; arr < 4; ++arr)
    {
        int const units = pb[arr] / 16;
        int const total = pieces * units;
        for (int u = threadIdx.x; u < total; u += kThreads)
        {
            int const piece = u / units;
            int const within = u - piece * units;
            int const p0 = pos + piece * sl.tp;
            if (p0 >= keyEnd)
            {
                continue;
            }
            int64_t const blk = bt[p0 / T];
            uint8_t const* src = a.kv.pool + a.kv.layer_offset + blk * a.kv.block_stride + offs[arr]
                + static_cast<int64_t>(p0 % T) * rowb[arr] + within * 16;
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
        int const tb = 16 * warp; // first token of this warp's tile within the chunk
        auto rowAt = [&](int off, int pb, int rowBytes, int tok) -> uint8_t const* {
            return st + off + (tok / sl.tp) * pb + (tok % sl.tp) * rowBytes;
        };
        uint32_t kf[2][KPAIRS];
#pragma unroll
        for (int j = 0; j < 2; ++j)
        {
            uint8_t const* row = rowAt(0, sl.pbK, KCB, tb + 8 * j + gq);
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
        int const vt[4] = {tb + 2 * t4, tb + 2 * t4 + 1, tb + 2 * t4 + 8, tb + 2 * t4 + 9};
        uint32_t vf[4][NV / 2];
        float ks[4], vs[4];
#pragma unroll
        for (int i = 0; i < 4; ++i)
        {
            DV::run(vctx, rowAt(sl.offV, sl.pbV, VCB, vt[i]), gq * NV, D, vf[i]);
            ks[i] = h2f(*reinterpret_cast<uint16_t const*>(rowAt(sl.offKM, sl.pbM, kTurboMetaBytes, vt[i])));
            vs[i] = h2f(*reinterpret_cast<uint16_t const*>(rowAt(sl.offVM, sl.pbM, kTurboMetaBytes, vt[i])));
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

struct ReduceArgs
{
    float const* ws_o;
    float const* ws_ml;
    void* out;
    int64_t out_stride;
    uint16_t const* v_mean;
    uint16_t const* v_smooth;
    uint16_t const* signs;
    int32_t const* cu_q; // null: every row exists
    int32_t batch;
    int32_t num_q_heads;
    int32_t group;
    int32_t num_splits;
    float rsqrt_d;
    int32_t bf16;
};

// One CTA of D threads per (query row, query head): combines the splits, then R^-1, sv, mu_v.
template <int D>
__global__ void __launch_bounds__(D) attentionReduceKernel(ReduceArgs const a)
{
    __shared__ float y[D];
    __shared__ float wts[kMaxSplits];
    __shared__ float total;
    int const row = blockIdx.x;
    int const hq = blockIdx.y;
    if (a.cu_q != nullptr && row >= a.cu_q[a.batch])
    {
        return;
    }
    int const c = threadIdx.x;
    int64_t const base = (static_cast<int64_t>(row) * a.num_q_heads + hq) * a.num_splits;
    if (c == 0)
    {
        float mx = -INFINITY;
        for (int s = 0; s < a.num_splits; ++s)
        {
            mx = fmaxf(mx, a.ws_ml[2 * (base + s)]);
        }
        float sum = 0.F;
        for (int s = 0; s < a.num_splits; ++s)
        {
            float const ms = a.ws_ml[2 * (base + s)];
            float const w = (ms == -INFINITY) ? 0.F : exp2f(ms - mx);
            wts[s] = w;
            sum += w * a.ws_ml[2 * (base + s) + 1];
        }
        total = sum;
    }
    __syncthreads();
    float acc = 0.F;
    for (int s = 0; s < a.num_splits; ++s)
    {
        if (wts[s] != 0.F)
        {
            acc += wts[s] * a.ws_o[(base + s) * D + c];
        }
    }
    y[c] = total > 0.F ? acc / total : 0.F;
    __syncthreads();
#pragma unroll
    for (int len = 1; len < D; len <<= 1)
    {
        float x = 0.F;
        if ((c & len) == 0)
        {
            x = y[c] + y[c + len];
        }
        else
        {
            x = y[c - len] - y[c];
        }
        __syncthreads();
        y[c] = x;
        __syncthreads();
    }
    int const head = hq / a.group;
    int64_t const hv = static_cast<int64_t>(head) * D + c;
    float const outv = tableOr(a.v_smooth, hv, 1.F) * (y[c] * a.rsqrt_d * h2f(a.signs[c])) + tableOr(a.v_mean, hv, 0.F);
    storeAct(a.out, static_cast<int64_t>(row) * a.out_stride + static_cast<int64_t>(hq) * D + c, outv, a.bf16 != 0);
}

__global__ void prefixSumKernel(int32_t const* q_lens, int32_t* cu, int32_t batch)
{
    // one thread: batch is small (requests of one step)
    if (threadIdx.x == 0 && blockIdx.x == 0)
    {
        int32_t acc = 0;
        cu[0] = 0;
        for (int32_t b = 0; b < batch; ++b)
        {
            acc += q_lens[b];
            cu[b + 1] = acc;
        }
    }
}

// ---- host side ------------------------------------------------------------------------------------

int resolveSms(int32_t num_sms)
{
    if (num_sms > 0)
    {
        return num_sms;
    }
    int dev = 0;
    int sms = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess
        || sms <= 0)
    {
        (void) cudaGetLastError();
        return 132;
    }
    return sms;
}

// Split count for `baseCtas` CTAs over at most maxKeys keys: the fewest splits that fill the
// resident CTA slots to >= 90% (whole waves), with at least kMinKeysPerSplit keys per split.
void planSplits(int64_t baseCtas, int32_t maxKeys, int32_t sms, int32_t& splits, int32_t& splitLen)
{
    int64_t const slots = static_cast<int64_t>(sms) * kResidentCtasPerSm;
    int32_t const maxUseful = std::max<int32_t>(1, std::min<int32_t>(kMaxSplits, (maxKeys + kMinKeysPerSplit - 1) / kMinKeysPerSplit));
    int32_t best = 1;
    double bestEff = -1.0;
    for (int32_t s = 1; s <= maxUseful; ++s)
    {
        int64_t const ctas = baseCtas * s;
        int64_t const waves = (ctas + slots - 1) / slots;
        double const eff = static_cast<double>(ctas) / static_cast<double>(waves * slots);
        if (ctas >= slots && eff >= 0.9)
        {
            best = s;
            break;
        }
        if (eff > bestEff + 1e-9)
        {
            bestEff = eff;
            best = s;
        }
    }
    int32_t const keys = std::max<int32_t>(1, maxKeys);
    splitLen = ((keys + best - 1) / best + kChunk - 1) / kChunk * kChunk;
    splits = (keys + splitLen - 1) / splitLen;
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

char const* checkCommon(KvLayerDesc const& layer, PagedKvPool const& kv, LayerTablesView const& tables, int32_t num_q_heads)
{
    if (char const* why = tqCheckLayer(layer, num_q_heads))
    {
        return why;
    }
    KvLayerDesc copy = layer;
    if (!tqComputeBlockLayout(copy) || std::memcmp(copy.k_codes_off, layer.k_codes_off, sizeof(copy.k_codes_off)) != 0
        || copy.block_bytes != layer.block_bytes)
    {
        return "layer offsets are stale: call tqComputeBlockLayout() after setting the format";
    }
    if (kv.pool == nullptr || kv.block_table == nullptr || (reinterpret_cast<uintptr_t>(kv.pool) % 16) != 0
        || kv.block_stride % 16 != 0 || kv.layer_offset % 16 != 0 || kv.layer_offset + layer.block_bytes > kv.block_stride)
    {
        return "pool must be 16-byte aligned with block_stride and layer_offset multiples of 16 and the layer inside a block";
    }
    if (layer.sink_tokens > 0 && (kv.sink_pool == nullptr || kv.seq_slot == nullptr))
    {
        return "sink_tokens > 0 needs sink_pool and seq_slot";
    }
    if (tables.signs == nullptr)
    {
        return "tables.signs (the rotation's sign vector) is required";
    }
    return nullptr;
}

struct HeadGroups
{
    int count{0};
    int kb[kMaxKvHeads];
    int vb[kMaxKvHeads];
    int n[kMaxKvHeads];
    uint8_t heads[kMaxKvHeads][kMaxKvHeads];
};

void groupHeads(KvLayerDesc const& layer, HeadGroups& hg)
{
    hg.count = 0;
    for (int h = 0; h < layer.num_kv_heads; ++h)
    {
        int i = 0;
        for (; i < hg.count; ++i)
        {
            if (hg.kb[i] == layer.k_bits[h] && hg.vb[i] == layer.v_bits[h])
            {
                break;
            }
        }
        if (i == hg.count)
        {
            hg.kb[i] = layer.k_bits[h];
            hg.vb[i] = layer.v_bits[h];
            hg.n[i] = 0;
            ++hg.count;
        }
        hg.heads[i][hg.n[i]++] = static_cast<uint8_t>(h);
    }
}

// Runs the split kernel for every (k_bits, v_bits) group of heads, then the reduce if needed.
cudaError_t runAttention(AttnArgs& args, int gridZ, int32_t rows, cudaStream_t stream)
{
    HeadGroups local;
    groupHeads(args.layer, local);
    for (int i = 0; i < local.count; ++i)
    {
        args.num_launch_heads = local.n[i];
        std::memcpy(args.heads, local.heads[i], sizeof(args.heads));
        cudaError_t err = dispatchAttention(args.layer.head_dim, local.kb[i], local.vb[i],
            [&](auto d, auto kb, auto vb) { return launchSplit<decltype(d)::value, decltype(kb)::value, decltype(vb)::value>(args, gridZ, stream); });
        if (err != cudaSuccess)
        {
            return err;
        }
    }
    if (args.num_splits == 1)
    {
        return cudaSuccess;
    }
    ReduceArgs r;
    r.ws_o = args.ws_o;
    r.ws_ml = args.ws_ml;
    r.out = args.out;
    r.out_stride = args.out_stride;
    r.v_mean = args.v_mean;
    r.v_smooth = args.v_smooth;
    r.signs = args.signs;
    r.cu_q = args.cu_q;
    r.batch = args.batch;
    r.num_q_heads = args.num_q_heads;
    r.group = args.group;
    r.num_splits = args.num_splits;
    r.rsqrt_d = args.rsqrt_d;
    r.bf16 = args.bf16;
    dim3 grid(rows, args.num_q_heads);
    return dispatchHeadDim(args.layer.head_dim, [&](auto d) {
        constexpr int D = decltype(d)::value;
        attentionReduceKernel<D><<<grid, D, 0, stream>>>(r);
        return cudaGetLastError();
    });
}

void fillCommonArgs(AttnArgs& args, KvLayerDesc const& layer, PagedKvPool const& kv, LayerTablesView const& t,
    int32_t num_q_heads, float softmax_scale, ActType act)
{
    args.layer = layer;
    args.kv = kv;
    args.k_smooth = t.k_smooth;
    args.v_mean = t.v_mean;
    args.v_smooth = t.v_smooth;
    args.signs = t.signs;
    args.num_q_heads = num_q_heads;
    args.group = num_q_heads / layer.num_kv_heads;
    float const sm = softmax_scale > 0.F ? softmax_scale : static_cast<float>(1.0 / std::sqrt(static_cast<double>(layer.head_dim)));
    args.q_scale = sm * kLog2e;
    args.rsqrt_d = static_cast<float>(1.0 / std::sqrt(static_cast<double>(layer.head_dim)));
    args.bf16 = act == ActType::kBf16 ? 1 : 0;
}

size_t alignWs(size_t n)
{
    return (n + 255) / 256 * 256;
}

} // namespace detail

using namespace detail;

int32_t decodeNumSplits(int32_t batch, int32_t num_kv_heads, int32_t max_seq_len, int32_t num_sms)
{
    int32_t splits = 1, len = 0;
    planSplits(static_cast<int64_t>(std::max(batch, 1)) * std::max(num_kv_heads, 1), max_seq_len, resolveSms(num_sms), splits, len);
    return splits;
}

size_t decodeWorkspaceBytes(
    int32_t batch, int32_t num_q_heads, int32_t num_kv_heads, int32_t head_dim, int32_t max_seq_len, int32_t num_sms)
{
    int32_t const s = decodeNumSplits(batch, num_kv_heads, max_seq_len, num_sms);
    if (s == 1)
    {
        return 0;
    }
    size_t const rows = static_cast<size_t>(batch) * num_q_heads * s;
    return alignWs(rows * 2 * sizeof(float)) + alignWs(rows * head_dim * sizeof(float));
}

cudaError_t launchDecodeAttention(DecodeAttentionParams const& p, cudaStream_t stream)
{
    if (checkCommon(p.layer, p.kv, p.tables, p.num_q_heads) != nullptr || p.q == nullptr || p.out == nullptr
        || p.seq_lens == nullptr || p.batch < 0 || p.max_seq_len < 1)
    {
        return cudaErrorInvalidValue;
    }
    if (p.batch == 0)
    {
        return cudaSuccess;
    }
    static_assert(sizeof(AttnArgs) <= 4096, "kernel parameters must fit in 4 KB");
    AttnArgs args;
    std::memset(&args, 0, sizeof(args));
    fillCommonArgs(args, p.layer, p.kv, p.tables, p.num_q_heads, p.softmax_scale, p.act);
    args.q = p.q;
    args.q_stride = p.q_token_stride;
    args.out = p.out;
    args.out_stride = p.out_token_stride;
    args.cu_q = nullptr;
    args.seq_lens = p.seq_lens;
    args.batch = p.batch;
    args.tq = 1;
    args.tiles_per_seq = 1;
    int32_t const sms = resolveSms(p.num_sms);
    planSplits(static_cast<int64_t>(p.batch) * p.layer.num_kv_heads, p.max_seq_len, sms, args.num_splits, args.split_len);
    if (args.num_splits > 1)
    {
        size_t const need = decodeWorkspaceBytes(p.batch, p.num_q_heads, p.layer.num_kv_heads, p.layer.head_dim, p.max_seq_len, sms);
        if (p.workspace == nullptr || p.workspace_bytes < need)
        {
            return cudaErrorInvalidValue;
        }
        size_t const rows = static_cast<size_t>(p.batch) * p.num_q_heads * args.num_splits;
        args.ws_ml = static_cast<float*>(p.workspace);
        args.ws_o = reinterpret_cast<float*>(static_cast<uint8_t*>(p.workspace) + alignWs(rows * 2 * sizeof(float)));
    }
    return runAttention(args, p.batch, p.batch, stream);
}

namespace
{
int32_t contextSplitsUpper(int32_t total_q_tokens)
{
    if (total_q_tokens <= 0 || total_q_tokens > kCtxSplitRowBudget / 2)
    {
        return 1;
    }
    return std::min<int32_t>(kMaxSplits, kCtxSplitRowBudget / total_q_tokens);
}
} // namespace

size_t contextWorkspaceBytes(int32_t batch, int32_t num_q_heads, int32_t /*num_kv_heads*/, int32_t head_dim,
    int32_t total_q_tokens, int32_t /*max_seq_len*/)
{
    size_t bytes = alignWs(static_cast<size_t>(batch + 1) * sizeof(int32_t));
    int32_t const s = contextSplitsUpper(total_q_tokens);
    if (s > 1)
    {
        size_t const rows = static_cast<size_t>(total_q_tokens) * num_q_heads * s;
        bytes += alignWs(rows * 2 * sizeof(float)) + alignWs(rows * head_dim * sizeof(float));
    }
    return bytes;
}

cudaError_t launchContextAttention(ContextAttentionParams const& p, cudaStream_t stream)
{
    if (checkCommon(p.layer, p.kv, p.tables, p.num_q_heads) != nullptr || p.q == nullptr || p.out == nullptr
        || p.q_lens == nullptr || p.seq_lens == nullptr || p.batch < 0 || p.max_seq_len < 1 || p.max_q_len < 0
        || p.total_q_tokens < 0 || (p.write_kv && (p.k == nullptr || p.v == nullptr)))
    {
        return cudaErrorInvalidValue;
    }
    if (p.batch == 0 || p.total_q_tokens == 0 || p.max_q_len == 0)
    {
        return cudaSuccess;
    }
    size_t const need = contextWorkspaceBytes(
        p.batch, p.num_q_heads, p.layer.num_kv_heads, p.layer.head_dim, p.total_q_tokens, p.max_seq_len);
    if (p.workspace == nullptr || p.workspace_bytes < need)
    {
        return cudaErrorInvalidValue;
    }
    auto* cu = static_cast<int32_t*>(p.workspace);
    prefixSumKernel<<<1, 32, 0, stream>>>(p.q_lens, cu, p.batch);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess)
    {
        return err;
    }
    if (p.write_kv)
    {
        QuantizeKvParams w;
        std::memset(&w, 0, sizeof(w));
        w.layer = p.layer;
        w.kv = p.kv;
        w.tables = p.tables;
        w.k = p.k;
        w.v = p.v;
        w.k_token_stride = p.k_token_stride;
        w.v_token_stride = p.v_token_stride;
        w.cu_q_lens = cu;
        w.seq_lens = p.seq_lens;
        w.batch = p.batch;
        w.max_q_len = p.max_q_len;
        w.act = p.act;
        err = launchQuantizeKv(w, stream);
        if (err != cudaSuccess)
        {
            return err;
        }
    }
    AttnArgs args;
    std::memset(&args, 0, sizeof(args));
    fillCommonArgs(args, p.layer, p.kv, p.tables, p.num_q_heads, p.softmax_scale, p.act);
    args.q = p.q;
    args.q_stride = p.q_token_stride;
    args.out = p.out;
    args.out_stride = p.out_token_stride;
    args.cu_q = cu;
    args.seq_lens = p.seq_lens;
    args.batch = p.batch;
    args.tq = std::max(1, 16 / args.group);
    args.tiles_per_seq = (p.max_q_len + args.tq - 1) / args.tq;
    int32_t const sms = resolveSms(0);
    planSplits(static_cast<int64_t>(p.batch) * args.tiles_per_seq * p.layer.num_kv_heads, p.max_seq_len, sms,
        args.num_splits, args.split_len);
    int32_t const upper = contextSplitsUpper(p.total_q_tokens);
    if (args.num_splits > upper)
    {
        int32_t const keys = std::max(1, p.max_seq_len);
        args.split_len = ((keys + upper - 1) / upper + kChunk - 1) / kChunk * kChunk;
        args.num_splits = (keys + args.split_len - 1) / args.split_len;
    }
    if (args.num_splits > 1)
    {
        size_t const rows = static_cast<size_t>(p.total_q_tokens) * p.num_q_heads * contextSplitsUpper(p.total_q_tokens);
        uint8_t* base = static_cast<uint8_t*>(p.workspace) + alignWs(static_cast<size_t>(p.batch + 1) * sizeof(int32_t));
        args.ws_ml = reinterpret_cast<float*>(base);
        args.ws_o = reinterpret_cast<float*>(base + alignWs(rows * 2 * sizeof(float)));
    }
    return runAttention(args, p.batch * args.tiles_per_seq, p.total_q_tokens, stream);
}

} // namespace turboquant
