// Context (prefill, chunked prefill) attention over the quantized paged KV pool (docs/format.md):
// host side. Decode has its own kernel (decode.cu).
//
// attentionSplitKernel<D, KB, VB> (attention_kernel.cuh): one CTA of four warps per (row tile, KV
// head, split of the key range). A row tile is up to 32 (query token, query head) rows of one KV
// head's GQA group, 8 per warp. The CTA streams the split's 32-slot pool tiles (docs/format.md
// §5.1) through a shared-memory pipeline of 3 stages (bulk copies on an mbarrier per stage on
// sm_90+, cp.async before). Each tile is expanded once: a lane reads its own lane chunk, which
// holds exactly the codes of its tensor-core fragments, and expands them in registers
// (dequant.cuh); the four warps expand a quarter each (K or V of one 16-token step) and store the
// fragments to shared memory in the lanes' register layout, from where every warp reads them for
// its own 8 rows. So the expansion, the kernel's main cost, is shared by 32 rows instead of 8. Both products run on tensor cores (mma m16n8k16, fp16 inputs, fp32 accumulation)
// with tokens as the M dimension, two 16-token steps per tile: S^T = K Q_t^T, then O^T += V^T P^T,
// P^T coming from S^T's accumulators through an 8x8 register transpose (movmatrix) and four quad
// shuffles. The query is smoothed, rotated and scaled in the prologue. Partial (max, sum, O) per
// split go to the workspace and attentionReduceKernel<D> combines them and applies R^-1,
// smoothing and mean; with a single split the kernel does that itself.
//
// Channel order (the tile layout's): K k-step kk of thread t of a quad covers channels
// 16kk + 4t + 0..3; V m-tile mt covers channels 16mt + g and 16mt + 8 + g for lane group g.
#include "attention_kernel.cuh"
#include "dispatch.cuh"
#include "turboquant/kernels.h"

#include <algorithm>
#include <cmath>
#include <cstring>

namespace turboquant
{
namespace detail
{

// compiled in attention_inst_*.cu
TQ_EXTERN_ATTENTION(64, 2)
TQ_EXTERN_ATTENTION(64, 3)
TQ_EXTERN_ATTENTION(64, 4)
TQ_EXTERN_ATTENTION(64, 8)
TQ_EXTERN_ATTENTION(128, 2)
TQ_EXTERN_ATTENTION(128, 3)
TQ_EXTERN_ATTENTION(128, 4)
TQ_EXTERN_ATTENTION(128, 8)

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

// After the attention of a call with a recent-token window: each sequence's last min(q_len, w) new
// tokens go from the call's fp16 copies (exact, [rows][H][2][d]) to ring index pos % w. One CTA per
// (sequence, KV head).
__global__ void __launch_bounds__(128) ringStoreKernel(
    PagedKvPool const kv, int32_t const* cu, int32_t const* seq_lens, uint16_t const* exact, int H, int w, int d)
{
    int const b = blockIdx.x;
    int const h = blockIdx.y;
    int const rowBegin = cu[b];
    int const qLen = cu[b + 1] - rowBegin;
    int const seqLen = seq_lens[b];
    int const first = max(0, qLen - w);
    int64_t const slot = kv.seq_slot[b];
    int const n = (qLen - first) * 2 * d;
    for (int idx = threadIdx.x; idx < n; idx += blockDim.x)
    {
        int const c = idx % d;
        int const which = (idx / d) & 1;
        int const i = first + idx / (2 * d);
        int const pos = seqLen - qLen + i;
        kv.recent_pool[((slot * H + h) * 2 + which) * w * d + static_cast<int64_t>(pos % w) * d + c]
            = exact[((static_cast<int64_t>(rowBegin + i) * H + h) * 2 + which) * d + c];
    }
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

// Resident CTAs of the context kernel per SM for this layer: its shared memory (the widest of the
// layer's bit widths) against the device's, at most the register budget's residentCtasPerSm(d).
int32_t contextCtasPerSm(KvLayerDesc const& layer)
{
    int dev = 0;
    int perSm = 0;
    if (cudaGetDevice(&dev) != cudaSuccess
        || cudaDeviceGetAttribute(&perSm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev) != cudaSuccess)
    {
        (void) cudaGetLastError(); // our failed query is not the caller's error
        return 2;
    }
    int32_t const d = layer.head_dim;
    int32_t worst = 0;
    for (int32_t h = 0; h < layer.num_kv_heads; ++h)
    {
        int32_t const stage = stageLayout(d * layer.k_bits[h] / 8, d * layer.v_bits[h] / 8).bytes;
        int32_t const bytes = (d == 64 ? prologueBytes<64>() + fragBytes<64>() : prologueBytes<128>() + fragBytes<128>())
            + kCtxStages * stage;
        worst = std::max(worst, bytes);
    }
    int32_t const reserve = 1024; // the runtime's shared memory per CTA
    return std::max<int32_t>(1, std::min<int32_t>(residentCtasPerSm(d), perSm / (worst + reserve)));
}

// Split count for `baseCtas` CTAs over at most maxKeys keys: the fewest splits that fill the
// resident CTA slots (ctasPerSm per SM) to >= 90% (whole waves), with at least kMinKeysPerSplit
// keys per split.
void planSplits(int64_t baseCtas, int32_t maxKeys, int32_t sms, int32_t ctasPerSm, int32_t& splits, int32_t& splitLen)
{
    int64_t const slots = static_cast<int64_t>(sms) * ctasPerSm;
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
    if (layer.recent_tokens > 0 && (kv.recent_pool == nullptr || kv.seq_slot == nullptr))
    {
        return "recent_tokens > 0 needs recent_pool and seq_slot";
    }
    // the attention kernels read sink and window rows as 16-byte vectors
    if ((layer.sink_tokens > 0 && reinterpret_cast<uintptr_t>(kv.sink_pool) % 16 != 0)
        || (layer.recent_tokens > 0 && reinterpret_cast<uintptr_t>(kv.recent_pool) % 16 != 0))
    {
        return "sink_pool and recent_pool must be 16-byte aligned";
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

} // namespace detail

using namespace detail;

// Decode attention (launchDecodeAttention, decodeNumSplits, decodeWorkspaceBytes) lives in decode.cu.

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

// Workspace bytes of the call's fp16 K/V copies for the recent-token window: [tokens][H][2][d].
size_t exactCopyBytes(int32_t total_q_tokens, int32_t num_kv_heads, int32_t head_dim)
{
    return alignWs(static_cast<size_t>(total_q_tokens) * num_kv_heads * 2 * head_dim * sizeof(uint16_t));
}
} // namespace

size_t contextWorkspaceBytes(int32_t batch, int32_t num_q_heads, int32_t num_kv_heads, int32_t head_dim,
    int32_t total_q_tokens, int32_t /*max_seq_len*/, int32_t recent_tokens)
{
    size_t bytes = alignWs(static_cast<size_t>(batch + 1) * sizeof(int32_t));
    if (recent_tokens > 0) // the call's tokens in fp16 (transformed): the window reads them
    {
        bytes += exactCopyBytes(total_q_tokens, num_kv_heads, head_dim);
    }
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
        || p.total_q_tokens < 0 || (p.write_kv && (p.k == nullptr || p.v == nullptr))
        || (p.layer.recent_tokens > 0 && !p.write_kv)) // the window needs this call's tokens
    {
        return cudaErrorInvalidValue;
    }
    if (p.batch == 0 || p.total_q_tokens == 0 || p.max_q_len == 0)
    {
        return cudaSuccess;
    }
    int32_t const w = p.layer.recent_tokens;
    size_t const need = contextWorkspaceBytes(
        p.batch, p.num_q_heads, p.layer.num_kv_heads, p.layer.head_dim, p.total_q_tokens, p.max_seq_len, w);
    if (p.workspace == nullptr || p.workspace_bytes < need)
    {
        return cudaErrorInvalidValue;
    }
    auto* cu = static_cast<int32_t*>(p.workspace);
    uint8_t* wsNext = static_cast<uint8_t*>(p.workspace) + alignWs(static_cast<size_t>(p.batch + 1) * sizeof(int32_t));
    uint16_t* exact = nullptr; // with a window: the call's tokens in fp16, [total_q_tokens][H][2][d]
    if (w > 0)
    {
        exact = reinterpret_cast<uint16_t*>(wsNext);
        wsNext += exactCopyBytes(p.total_q_tokens, p.layer.num_kv_heads, p.layer.head_dim);
    }
    prefixSumKernel<<<1, 32, 0, stream>>>(p.q_lens, cu, p.batch);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess)
    {
        return err;
    }
    if (p.write_kv)
    {
        QuantizeKvParams w = newTokensWrite(p);
        w.cu_q_lens = cu;
        w.max_q_len = p.max_q_len;
        w.exact_out = exact; // with a window the ring is written after the attention (below)
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
    args.win_new = exact;
    args.batch = p.batch;
    args.tq = std::max(1, kCtxRows / args.group); // kCtxRows (token, head) rows per CTA
    args.tiles_per_seq = (p.max_q_len + args.tq - 1) / args.tq;
    int32_t const sms = resolveSms(0);
    planSplits(static_cast<int64_t>(p.batch) * args.tiles_per_seq * p.layer.num_kv_heads * (args.group > kCtxRows ? 2 : 1),
        p.max_seq_len, sms, contextCtasPerSm(p.layer),
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
        uint8_t* base = wsNext;
        args.ws_ml = reinterpret_cast<float*>(base);
        args.ws_o = reinterpret_cast<float*>(base + alignWs(rows * 2 * sizeof(float)));
    }
    err = runAttention(args, p.batch * args.tiles_per_seq * (args.group > kCtxRows ? 2 : 1), p.total_q_tokens, stream);
    if (err != cudaSuccess || w == 0)
    {
        return err;
    }
    ringStoreKernel<<<dim3(p.batch, p.layer.num_kv_heads), 128, 0, stream>>>(
        p.kv, cu, p.seq_lens, exact, p.layer.num_kv_heads, w, p.layer.head_dim);
    return cudaGetLastError();
}

} // namespace turboquant
