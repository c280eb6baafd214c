// Decode attention over the quantized paged KV pool (docs/format.md, version 4; the read side is that of version 3): host side.
//
// decodeSplitKernel<D, KB, VB, NT, W, WR> (decode_kernel.cuh): one warp per (sequence, KV head, split
// of the key range), W = 4 or 16 splits per CTA sharing the query prologue (planDecodeShape).
// Both products run on int8 tensor cores (mma.sync m16n8k32 s8.s8.s32) so that a code becomes its
// codebook value with one PRMT per four codes and nothing else:
//   - the query is smoothed, rotated and turned into 14-bit integers q = 128*hi + lo per head
//     (hi in [-128, 127], lo in [0, 127]); hi and lo are two columns of the B operand, so one MMA
//     gives both partial dot products of 4 query heads;
//   - S^T = K Q^T with 16 pool slots as M and 32 channels as K; K codes come straight from the
//     pool tile (each lane loads its own contiguous chunk) through expandUnit();
//   - the per-vector K scale, 1/lambda and the softmax scale multiply the integer score once per
//     (slot, head); the online softmax keeps a running maximum per head that moves only when a
//     score exceeds it by more than 3 (log2 units), so p <= 8 (a warp vote detects the rare growth);
//   - p' = p * v_scale is quantized to a 16-bit unsigned integer against a bound per head that
//     follows the tiles: 1.25x the head's largest p * v_scale of the tile that set it, set again
//     when a tile exceeds it or falls 64x below it (so long splits with diffuse attention keep their
//     resolution); its two bytes are the u8 hi/lo columns of P^T (through a small per-warp shared
//     buffer), and O^T += V^T P^T accumulates in int32 (s8 x u8 MMA); the int32 accumulator is
//     folded into fp32 whenever the running maximum or the bound moves, and at the end of the split
//     (a warp holds at most 32K keys, so it cannot overflow); the fp32 O^T sits in shared memory, so
//     the four-head d=128 kernel runs in 128 registers with 16 warps per SM;
//   - each warp streams its tiles through 2-4 shared-memory stages filled by cp.async (consecutive
//     lanes copy consecutive 16-byte pieces of the contiguous tile); the first copies are issued
//     before the query prologue.
// Sink positions (fp16 in sink_pool) and the recent-token window (the last w positions, fp16 in
// recent_pool; the int8 tiles stop before it) go through an exact fp32 path in the split that holds
// them, from rows prefetched into L1 when the split starts: with up to 4 query heads per CTA up to
// 32 keys at a time (one key per lane for the scores, one maximum update per chunk, then P * V key by
// key); with 5-8 (NT = 2) one key at a time, which keeps the tile loop's registers.
// At the end the warps of a CTA merge their splits in shared memory, so the workspace holds one
// partial per (sequence, query head, CTA). With finish counters (DecodeAttentionParams) the last CTA
// of each (sequence, KV head, head subset) to finish combines them (one warp per query head) and
// applies R^-1, the value smoothing and mean. Without them decodeReduceKernel does, a programmatic
// dependent launch of the split kernel on sm_90+ (its CTAs are scheduled while the last split CTAs
// finish and wait for them; one warp per (sequence, query head) for up to 16 partials, else one CTA).
#include "decode_kernel.cuh"
#include "dispatch.cuh"
#include "turboquant/kernels.h"

#include <algorithm>
#include <cmath>
#include <cstring>

namespace turboquant
{
namespace detail
{

TQ_EXTERN_DECODE(64, 2)
TQ_EXTERN_DECODE(64, 3)
TQ_EXTERN_DECODE(64, 4)
TQ_EXTERN_DECODE(64, 8)
TQ_EXTERN_DECODE(128, 2)
TQ_EXTERN_DECODE(128, 3)
TQ_EXTERN_DECODE(128, 4)
TQ_EXTERN_DECODE(128, 8)

int resolveSms(int32_t num_sms); // attention.cu: SMs of the current device when num_sms <= 0
// attention.cu: the layer, pool, sink/recent pools and tables shared by decode and context
char const* checkCommon(KvLayerDesc const& layer, PagedKvPool const& kv, LayerTablesView const& tables, int32_t num_q_heads);

namespace
{

constexpr int kDecMinKeysPerSplit = 128;

constexpr int kReduceWarps = 8; // (sequence, query head) rows per reduce CTA, one warp each
constexpr int kReduceBatch = 16; // at most this many partials per row go to the warp reduce

// Up to kReduceBatch partials: one warp per (sequence, query head), no shared memory and no
// barrier (combinePartials, decode_kernel.cuh, with every partial loaded at once).
template <int D>
__global__ void __launch_bounds__(32 * kReduceWarps) decodeReduceKernel(ReduceArgs const a)
{
    constexpr int PER = D / 32;
    int const lane = threadIdx.x & 31;
    int const row = blockIdx.x * kReduceWarps + (threadIdx.x >> 5);
    if (row >= a.batch * a.num_q_heads)
    {
        return;
    }
    int const b = row / a.num_q_heads;
    int const hq = row - b * a.num_q_heads;
    RowOut<D> fin;
    fin.load(a, hq / a.group, lane);
    gridDependencyWait(); // the split kernel is complete and its partials visible
    float x[PER];
    // a.num_splits <= kReduceBatch (the host chooses this kernel so)
    combinePartials<D, kReduceBatch>(a.ws_ml, a.ws_o, static_cast<int64_t>(row) * a.num_splits, a.num_splits, lane, x);
    fin.store(a, x, b, hq, lane);
}

constexpr int kReduceParts = 4; // thread groups of D threads, each summing every 4th CTA partial

// More than kReduceBatch partials (long sequences at small batch): one CTA of 4*D threads per
// (sequence, query head) combines the CTA partials, then R^-1, sv, mu_v (RowOut).
// After the wait for the split kernel every thread issues all of its
// loads at once: (max, sum) of partial `tid`, and max and output channel c of partials pi, pi+4, ...
// (group `pi` of D threads). The maximum is a block reduction (one barrier); the weighted sums and
// the denominator share the second barrier; warp 0 applies the inverse rotation with shuffles.
template <int D>
__global__ void __launch_bounds__(D * kReduceParts) decodeReduceBlockKernel(ReduceArgs const a)
{
    constexpr int kThreads = D * kReduceParts;
    constexpr int kWarpsR = kThreads / 32;
    constexpr int kMaxParts = kDecMaxSplits / kDecWarpsMin;
    constexpr int kPer = kMaxParts / kReduceParts; // partials per thread
    constexpr int PER = D / 32;
    static_assert(kMaxParts <= kThreads, "one thread per partial for the (max, sum) pass");
    __shared__ float part[kReduceParts][D];
    __shared__ float red[2][kWarpsR];
    int const b = blockIdx.x;
    int const hq = blockIdx.y;
    int const tid = threadIdx.x;
    int const lane = tid & 31;
    int const wid = tid >> 5;
    int const c = tid % D;
    int const pi = tid / D;
    int const n = a.num_splits;
    RowOut<D> fin;
    if (wid == 0)
    {
        fin.load(a, hq / a.group, lane);
    }
    gridDependencyWait(); // the split kernel is complete and its partials visible
    int64_t const base = (static_cast<int64_t>(b) * a.num_q_heads + hq) * n;
    float2 const v = tid < n ? reinterpret_cast<float2 const*>(a.ws_ml)[base + tid] : make_float2(-INFINITY, 0.F);
    float mk[kPer];
    float ok[kPer];
#pragma unroll
    for (int k = 0; k < kPer; ++k)
    {
        int const s = pi + kReduceParts * k;
        bool const in = s < n;
        mk[k] = in ? a.ws_ml[2 * (base + s)] : -INFINITY;
        ok[k] = in ? a.ws_o[(base + s) * D + c] : 0.F; // every partial is written (zeros without keys)
    }
    float mx = v.x;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
    {
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    }
    if (lane == 0)
    {
        red[0][wid] = mx;
    }
    __syncthreads();
    mx = red[0][0];
#pragma unroll
    for (int k = 1; k < kWarpsR; ++k)
    {
        mx = fmaxf(mx, red[0][k]);
    }
    float num = 0.F;
#pragma unroll
    for (int k = 0; k < kPer; ++k)
    {
        num += (mk[k] == -INFINITY ? 0.F : exp2f(mk[k] - mx)) * ok[k];
    }
    float d = v.x == -INFINITY ? 0.F : exp2f(v.x - mx) * v.y;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
    {
        d += __shfl_xor_sync(0xffffffffu, d, o);
    }
    if (lane == 0)
    {
        red[1][wid] = d;
    }
    part[pi][c] = num;
    __syncthreads();
    if (wid != 0)
    {
        return;
    }
    float den = 0.F;
#pragma unroll
    for (int k = 0; k < kWarpsR; ++k)
    {
        den += red[1][k];
    }
    float const inv = den > 0.F ? 1.F / den : 0.F;
    float x[PER];
#pragma unroll
    for (int e = 0; e < PER; ++e)
    {
        int const ch = PER * lane + e;
        float acc = 0.F;
#pragma unroll
        for (int k = 0; k < kReduceParts; ++k)
        {
            acc += part[k][ch];
        }
        x[e] = acc * inv;
    }
    fin.store(a, x, b, hq, lane);
}

int hsubOf(int32_t num_q_heads, int32_t num_kv_heads)
{
    int const group = std::max(1, num_q_heads / std::max(num_kv_heads, 1));
    return (group + kDecHeadsPerCta - 1) / kDecHeadsPerCta;
}

// n-tiles of 4 query heads per CTA: the split kernel instance a GQA ratio launches
int ntOf(int32_t num_q_heads, int32_t num_kv_heads)
{
    return num_q_heads / std::max(num_kv_heads, 1) > 4 ? 2 : 1;
}

// Whether a shape launches the four-head d=128 kernel, the one that comes in two CTA widths
// (kDecWide in decode_kernel.cuh)
bool wideKernel(int headDim, int nt)
{
    static_assert(kDecWide<128, 1> && !kDecWide<128, 2> && !kDecWide<64, 1> && !kDecWide<64, 2>, "the wide kernel");
    return headDim == 128 && nt == 1;
}

// A split kernel's CTA shape: warps per CTA and the resident CTAs per SM the plan counts on (its
// __launch_bounds__)
struct DecKernelShape
{
    int warps;
    int ctasPerSm;
};

// Splits per (sequence, KV head, head subset): multiples of the W warps of a CTA; the fewest
// waves of resident CTA slots that are >= 90% full, then as many CTAs as those waves hold; each
// split at least kDecMinKeysPerSplit keys. Returns whether the plan is one wave at least 90 % full.
bool planDecode(int64_t pairs, int32_t maxKeys, int32_t sms, DecKernelShape ks, int32_t& splits, int32_t& splitLen)
{
    int64_t const slots = static_cast<int64_t>(sms) * ks.ctasPerSm;
    int32_t const W = ks.warps;
    int32_t const keys = std::max<int32_t>(1, maxKeys);
    int32_t const maxUseful
        = std::max<int32_t>(1, std::min<int32_t>(kDecMaxSplits / W, (keys + W * kDecMinKeysPerSplit - 1) / (W * kDecMinKeysPerSplit)));
    // at least enough splits that none exceeds kMaxSplitKeys; then the fewest CTAs per pair whose
    // waves are >= 90% full (one full wave beats two: fewer splits to combine, no tail)
    int32_t const minC = (keys + W * kMaxSplitKeys - 1) / (W * kMaxSplitKeys);
    int32_t best = minC;
    double bestEff = -1.0;
    for (int32_t c = minC; c <= std::max(minC, maxUseful); ++c) // c CTAs (W c splits) per pair
    {
        int64_t const ctas = pairs * c;
        int64_t const waves = (ctas + slots - 1) / slots;
        double const eff = static_cast<double>(ctas) / static_cast<double>(waves * slots);
        if (eff >= 0.9)
        {
            best = c;
            break;
        }
        if (eff > bestEff + 1e-9)
        {
            bestEff = eff;
            best = c;
        }
    }
    // then as many CTAs per pair as the same number of waves holds (B=1, L=128K: 49 instead of 45 of
    // 396 slots per wave, 3.45x -> 3.53-3.59x): idle slots would stay idle through the whole kernel
    int64_t const waves = (pairs * best + slots - 1) / slots;
    best = static_cast<int32_t>(std::max<int64_t>(best, std::min<int64_t>(std::max(minC, maxUseful), waves * slots / pairs)));
    int32_t const want = best * W;
    splitLen = ((keys + want - 1) / want + kDecTile - 1) / kDecTile * kDecTile;
    splits = (keys + splitLen - 1) / splitLen;
    int64_t const ctas = pairs * ((splits + W - 1) / W);
    return ctas <= slots && static_cast<double>(ctas) >= 0.9 * static_cast<double>(slots);
}

// The plan of a shape (pairs = sequences x KV heads x query-head subsets): the four-head d=128
// kernels run in CTAs of 16 warps when `wideOk` (their shared memory fits the device) and that
// plan fills one wave (B=8, L=32K: 9 % faster than CTAs of 4), else in CTAs of 4 (B=32, L=8K:
// CTAs of 16 would need two waves). The other kernels: CTAs of 4.
DecKernelShape planDecodeShape(
    int64_t pairs, int32_t maxKeys, int32_t sms, int headDim, int nt, bool wideOk, int32_t& splits, int32_t& splitLen)
{
    if (wideKernel(headDim, nt))
    {
        DecKernelShape const wide{kDecWideWarps, kDecMinCtas<128, 1, kDecWideWarps>};
        if (wideOk && planDecode(pairs, maxKeys, sms, wide, splits, splitLen))
        {
            return wide;
        }
        DecKernelShape const narrow{4, kDecMinCtas<128, 1, 4>};
        planDecode(pairs, maxKeys, sms, narrow, splits, splitLen);
        return narrow;
    }
    static_assert(kDecMinCtas<64, 1, 4> == kDecMinCtas<128, 2, 4> && kDecMinCtas<64, 2, 4> == kDecMinCtas<128, 2, 4>, "one narrow shape");
    DecKernelShape const narrow{4, kDecMinCtas<128, 2, 4>};
    planDecode(pairs, maxKeys, sms, narrow, splits, splitLen);
    return narrow;
}

// Shared memory one CTA may opt in to on the current device (227 KB on sm_90 and sm_100, 163 KB on
// sm_80, 99 KB on sm_86 and sm_89); 0 when it cannot be read.
int smemOptinOfDevice()
{
    constexpr int kDevices = 64;
    static int known[kDevices] = {}; // 0 unknown
    int dev = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= kDevices)
    {
        (void) cudaGetLastError();
        return 0;
    }
    if (known[dev] == 0)
    {
        int v = 0;
        if (cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess || v <= 0)
        {
            (void) cudaGetLastError();
            return 0;
        }
        known[dev] = v;
    }
    return known[dev];
}

// Whether the 16-warp CTA of the four-head d=128 kernel fits the device's shared memory for every
// (k_bits, v_bits) of the layer (with 8-bit codes it does not: 16 warps x 2 stages of 8 KB)
bool wideFits(KvLayerDesc const& layer)
{
    int const optin = smemOptinOfDevice();
    for (int h = 0; h < layer.num_kv_heads; ++h)
    {
        int bytes = 0;
        (void) dispatchAttention(128, layer.k_bits[h], layer.v_bits[h], [&](auto, auto kb, auto vb) {
            bytes = decodeSmemBytes<128, decltype(kb)::value, decltype(vb)::value, 1, kDecWideWarps>();
            return cudaSuccess;
        });
        if (bytes <= 0 || bytes > optin)
        {
            return false;
        }
    }
    return true;
}

char const* checkDecode(DecodeAttentionParams const& p)
{
    if (char const* why = checkCommon(p.layer, p.kv, p.tables, p.num_q_heads))
    {
        return why;
    }
    if (p.q == nullptr || p.out == nullptr || p.seq_lens == nullptr || p.batch < 0 || p.max_seq_len < 1)
    {
        return "missing pointer";
    }
    if ((p.k == nullptr) != (p.v == nullptr))
    {
        return "k and v go together";
    }
    return nullptr;
}

} // namespace
} // namespace detail

using namespace detail;

int32_t decodeNumSplits(
    int32_t batch, int32_t num_q_heads, int32_t num_kv_heads, int32_t head_dim, int32_t max_seq_len, int32_t num_sms)
{
    int32_t splits = 1, len = 0;
    int64_t const pairs = static_cast<int64_t>(std::max(batch, 1)) * std::max(num_kv_heads, 1) * hsubOf(num_q_heads, num_kv_heads);
    planDecodeShape(pairs, max_seq_len, resolveSms(num_sms), head_dim, ntOf(num_q_heads, num_kv_heads), true, splits, len);
    return splits;
}

int32_t decodeFinishCounters(int32_t batch, int32_t num_q_heads, int32_t num_kv_heads)
{
    return std::max(batch, 0) * std::max(num_kv_heads, 1) * hsubOf(num_q_heads, num_kv_heads);
}

size_t decodeWorkspaceBytes(
    int32_t batch, int32_t num_q_heads, int32_t num_kv_heads, int32_t head_dim, int32_t max_seq_len, int32_t num_sms)
{
    // one partial per (sequence, query head, CTA of W splits), for whichever CTA width the launch
    // takes (it depends on the layer's formats and the device's shared memory)
    int64_t const pairs = static_cast<int64_t>(std::max(batch, 1)) * std::max(num_kv_heads, 1) * hsubOf(num_q_heads, num_kv_heads);
    size_t rows = 0;
    for (bool const wideOk : {true, false})
    {
        int32_t splits = 1, len = 0;
        int32_t const W
            = planDecodeShape(pairs, max_seq_len, resolveSms(num_sms), head_dim, ntOf(num_q_heads, num_kv_heads), wideOk, splits, len).warps;
        rows = std::max(rows, static_cast<size_t>(std::max(batch, 1)) * num_q_heads * ((splits + W - 1) / W));
    }
    return alignWs(rows * 2 * sizeof(float)) + alignWs(rows * head_dim * sizeof(float));
}

cudaError_t launchDecodeAttention(DecodeAttentionParams const& p, cudaStream_t stream)
{
    if (checkDecode(p) != nullptr)
    {
        return cudaErrorInvalidValue;
    }
    if (p.batch == 0)
    {
        return cudaSuccess;
    }
    static_assert(sizeof(DecodeArgs) <= 4096, "kernel parameters must fit in 4 KB");
    DecodeArgs a;
    std::memset(&a, 0, sizeof(a));
    a.layer = p.layer;
    a.kv = p.kv;
    a.k_smooth = p.tables.k_smooth;
    a.signs = p.tables.signs;
    a.q = p.q;
    a.q_stride = p.q_token_stride;
    a.seq_lens = p.seq_lens;
    a.batch = p.batch;
    a.num_q_heads = p.num_q_heads;
    a.group = p.num_q_heads / p.layer.num_kv_heads;
    a.hsub = hsubOf(p.num_q_heads, p.layer.num_kv_heads);
    float const sm = p.softmax_scale > 0.F ? p.softmax_scale : static_cast<float>(1.0 / std::sqrt(static_cast<double>(p.layer.head_dim)));
    a.q_scale = sm * kLog2e;
    a.rsqrt_d = static_cast<float>(1.0 / std::sqrt(static_cast<double>(p.layer.head_dim)));
    a.bf16 = p.act == ActType::kBf16 ? 1 : 0;
    int32_t const sms = resolveSms(p.num_sms);
    int const nt = ntOf(p.num_q_heads, p.layer.num_kv_heads);
    DecKernelShape const ks
        = planDecodeShape(static_cast<int64_t>(p.batch) * p.layer.num_kv_heads * a.hsub, p.max_seq_len, sms, p.layer.head_dim, nt,
            wideKernel(p.layer.head_dim, nt) && wideFits(p.layer), a.num_splits, a.split_len);
    if (a.num_splits > kDecMaxSplits || a.split_len > kMaxSplitKeys)
    {
        return cudaErrorInvalidValue; // beyond 256 splits of 32K keys (8M tokens)
    }
    size_t const need = decodeWorkspaceBytes(p.batch, p.num_q_heads, p.layer.num_kv_heads, p.layer.head_dim, p.max_seq_len, sms);
    if (p.workspace == nullptr || p.workspace_bytes < need || (reinterpret_cast<uintptr_t>(p.workspace) % 16) != 0
        || (reinterpret_cast<uintptr_t>(p.finish_counters) % alignof(uint32_t)) != 0)
    {
        return cudaErrorInvalidValue;
    }
    int32_t const parts = (a.num_splits + ks.warps - 1) / ks.warps; // CTAs per (sequence, KV head, head subset)
    size_t const rows = static_cast<size_t>(p.batch) * p.num_q_heads * parts;
    a.ws_ml = static_cast<float*>(p.workspace);
    a.ws_o = reinterpret_cast<float*>(static_cast<uint8_t*>(p.workspace) + alignWs(rows * 2 * sizeof(float)));
    // the new tokens: written by the split kernel when one CTA makes every read of a new position (one
    // query-head subset per KV head), else by the write kernel first
    if (p.k != nullptr)
    {
        if (a.hsub == 1)
        {
            a.wr.src[0] = p.k;
            a.wr.src[1] = p.v;
            a.wr.stride[0] = p.k_token_stride;
            a.wr.stride[1] = p.v_token_stride;
            a.wr.mean[0] = p.tables.k_mean;
            a.wr.mean[1] = p.tables.v_mean;
            a.wr.smooth[0] = p.tables.k_smooth;
            a.wr.smooth[1] = p.tables.v_smooth;
            a.wr.clip[0] = p.tables.k_clip;
            a.wr.clip[1] = p.tables.v_clip;
            a.wr.sqrt_d = static_cast<float>(std::sqrt(static_cast<double>(p.layer.head_dim)));
            a.wr.vec = writeLoadsVectorizable(p.k, p.v, p.k_token_stride, p.v_token_stride, p.tables) ? 1 : 0;
            // the writers' lag in tiles (measured on the H200, benchmarks/NOTES.md): the other warps of
            // the writing CTA take up to ceil(2 lag / (W - 2)) tiles more each (one, with these lags)
            // than split_len (tqDecodeWriterFirstTile)
            a.wr.lag = ks.warps == kDecWideWarps ? 2 : 1;
            if (a.split_len + kDecTile * ((2 * a.wr.lag + ks.warps - 3) / (ks.warps - 2)) > kMaxSplitKeys)
            {
                a.wr.lag = 0;
            }
        }
        else
        {
            QuantizeKvParams w = newTokensWrite(p); // one new token per sequence: no cu_q_lens
            w.max_q_len = 1;
            cudaError_t const err = launchQuantizeKv(w, stream);
            if (err != cudaSuccess)
            {
                return err;
            }
        }
    }
    // with finish counters the split kernel's last CTA per row combines the partials (no reduce kernel)
    a.counters = p.finish_counters;
    a.out = p.out;
    a.out_stride = p.out_token_stride;
    a.v_mean = p.tables.v_mean;
    a.v_smooth = p.tables.v_smooth;

    // one launch per (k_bits, v_bits) group of KV heads
    bool done[kMaxKvHeads] = {};
    for (int h0 = 0; h0 < p.layer.num_kv_heads; ++h0)
    {
        if (done[h0])
        {
            continue;
        }
        a.num_launch_heads = 0;
        for (int h = h0; h < p.layer.num_kv_heads; ++h)
        {
            if (!done[h] && p.layer.k_bits[h] == p.layer.k_bits[h0] && p.layer.v_bits[h] == p.layer.v_bits[h0])
            {
                a.heads[a.num_launch_heads++] = static_cast<uint8_t>(h);
                done[h] = true;
            }
        }
        cudaError_t const err = dispatchAttention(p.layer.head_dim, p.layer.k_bits[h0], p.layer.v_bits[h0], [&](auto d, auto kb, auto vb) {
            constexpr int D = decltype(d)::value;
            constexpr int KB = decltype(kb)::value;
            constexpr int VB = decltype(vb)::value;
            return nt == 2 ? launchDecodeSplit<D, KB, VB, 2>(a, ks.warps, stream) : launchDecodeSplit<D, KB, VB, 1>(a, ks.warps, stream);
        });
        if (err != cudaSuccess)
        {
            return err;
        }
    }
    if (p.finish_counters != nullptr)
    {
        return cudaSuccess;
    }
    ReduceArgs r;
    r.cu_q = nullptr; // decode: row b is sequence b
    r.batch = p.batch;
    r.ws_o = a.ws_o;
    r.ws_ml = a.ws_ml;
    r.out = p.out;
    r.out_stride = p.out_token_stride;
    r.v_mean = p.tables.v_mean;
    r.v_smooth = p.tables.v_smooth;
    r.signs = p.tables.signs;
    r.num_q_heads = p.num_q_heads;
    r.group = a.group;
    r.num_splits = parts;
    r.rsqrt_d = a.rsqrt_d;
    r.bf16 = a.bf16;
    // one warp per (sequence, query head) when one round of loads covers every partial (measured
    // faster from 3 to 8 partials); otherwise a CTA per row spreads the partials over 4*D threads
    bool const warpRows = parts <= kReduceBatch;
    cudaLaunchConfig_t cfg = {};
    cfg.stream = stream;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = attr;
    return dispatchHeadDim(p.layer.head_dim, [&](auto d) {
        constexpr int D = decltype(d)::value;
        if (warpRows)
        {
            cfg.gridDim = dim3((p.batch * p.num_q_heads + kReduceWarps - 1) / kReduceWarps);
            cfg.blockDim = dim3(32 * kReduceWarps);
            cfg.numAttrs = pdlCapable<decodeReduceKernel<D>>() ? 1 : 0;
            return cudaLaunchKernelEx(&cfg, decodeReduceKernel<D>, r);
        }
        cfg.gridDim = dim3(p.batch, p.num_q_heads);
        cfg.blockDim = dim3(D * kReduceParts);
        cfg.numAttrs = pdlCapable<decodeReduceBlockKernel<D>>() ? 1 : 0;
        return cudaLaunchKernelEx(&cfg, decodeReduceBlockKernel<D>, r);
    });
}

} // namespace turboquant
