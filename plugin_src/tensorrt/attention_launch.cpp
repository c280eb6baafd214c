#include "attention_launch.h"

#include "step_metadata.h"

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace turboquant
{
namespace trt
{

int32_t currentDeviceSms()
{
    int device = 0;
    int sms = 0;
    cudaError_t err = cudaGetDevice(&device);
    if (err == cudaSuccess)
    {
        err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
    }
    if (err != cudaSuccess || sms <= 0)
    {
        throw std::runtime_error(std::string("cannot read the device's multiprocessor count: ") + cudaGetErrorString(err));
    }
    return sms;
}

DecodeCounters::~DecodeCounters()
{
    if (mPtr != nullptr)
    {
        (void) cudaFree(mPtr); // at process exit the runtime may be gone already: nothing to report
    }
}

uint32_t* DecodeCounters::ensure(size_t words)
{
    if (words <= mWords && mPtr != nullptr)
    {
        return mPtr;
    }
    words = std::max<size_t>(words, 1);
    void* p = nullptr;
    cudaError_t err = cudaMalloc(&p, words * sizeof(uint32_t));
    if (err == cudaSuccess)
    {
        // zero before any stream may use it: a memset on the legacy stream, named explicitly (a library
        // built for per-thread default streams would otherwise put it elsewhere), waited for here
        err = cudaMemsetAsync(p, 0, words * sizeof(uint32_t), cudaStreamLegacy);
        if (err == cudaSuccess)
        {
            err = cudaStreamSynchronize(cudaStreamLegacy);
        }
        if (err != cudaSuccess)
        {
            (void) cudaFree(p);
        }
    }
    if (err != cudaSuccess)
    {
        throw std::runtime_error(std::string("cannot allocate the decode's finish counters: ") + cudaGetErrorString(err));
    }
    if (mPtr != nullptr)
    {
        (void) cudaFree(mPtr); // waits for the device, so no kernel in flight still uses them
    }
    mPtr = static_cast<uint32_t*>(p);
    mWords = words;
    return mPtr;
}

size_t decodeStepCounters(core::AttentionConfig const& cfg, int64_t batch)
{
    return static_cast<size_t>(
        decodeFinishCounters(static_cast<int32_t>(std::min<int64_t>(batch, INT32_MAX)), cfg.num_q_heads, cfg.num_kv_heads));
}

size_t stepWorkspaceBytes(core::AttentionConfig const& cfg, int64_t maxTokens, int64_t maxBatch, int32_t numSms)
{
    if (maxTokens < 1 || maxBatch < 1 || maxTokens > INT32_MAX || maxBatch > INT32_MAX)
    {
        throw core::ConfigError("profile maxima out of range: qkv rows " + std::to_string(maxTokens) + ", batch "
            + std::to_string(maxBatch));
    }
    // The kernels' split counts fall as the batch or token count grows (fewer splits fill the
    // GPU), so their scratch is not monotonic in the shape: take the maximum over every shape the
    // profile allows. Decode steps have N == B <= maxBatch; context steps any N <= maxTokens.
    size_t scratch = 0;
    int64_t const decodeMax = std::min(maxBatch, maxTokens);
    for (int64_t b = 1; b <= decodeMax; ++b)
    {
        scratch = std::max(scratch,
            decodeWorkspaceBytes(static_cast<int32_t>(b), cfg.num_q_heads, cfg.num_kv_heads, cfg.head_dim, cfg.max_seq_len, numSms));
    }
    for (int64_t n = 2; n <= maxTokens; ++n)
    {
        scratch = std::max(scratch,
            contextWorkspaceBytes(static_cast<int32_t>(std::min(maxBatch, n - 1)), cfg.num_q_heads, cfg.num_kv_heads,
                cfg.head_dim, static_cast<int32_t>(n), cfg.max_seq_len, cfg.recent_tokens));
    }
    return core::workspaceLayout(maxBatch, scratch).total_bytes;
}

cudaError_t launchAttentionStep(core::AttentionConfig const& cfg, KvLayerDesc const& layer,
    core::StepShape const& step, core::DataType act, int32_t numSms, StepBuffers const& buf, cudaStream_t stream)
{
    int32_t const batch = static_cast<int32_t>(step.batch);
    int32_t const tokens = static_cast<int32_t>(step.num_tokens);
    ActType const actType = act == core::DataType::kBF16 ? ActType::kBf16 : ActType::kFp16;

    PagedKvPool kv{};
    kv.pool = buf.kv_pool;
    kv.block_stride = step.block_stride;
    kv.layer_offset = cfg.layer_offset;
    kv.block_table = buf.block_table;
    kv.max_blocks_per_seq = static_cast<int32_t>(step.max_blocks_per_seq);
    kv.sink_pool = cfg.sink_tokens > 0 ? static_cast<uint16_t*>(buf.sink_pool) : nullptr;
    kv.seq_slot = cfg.sink_tokens > 0 || cfg.recent_tokens > 0 ? buf.seq_slots : nullptr;
    kv.recent_pool = cfg.recent_tokens > 0 ? static_cast<uint16_t*>(buf.recent_pool) : nullptr;

    LayerTablesView tables{};
    tables.k_mean = static_cast<uint16_t const*>(buf.k_mean);
    tables.k_smooth = static_cast<uint16_t const*>(buf.k_smooth);
    tables.v_mean = static_cast<uint16_t const*>(buf.v_mean);
    tables.v_smooth = static_cast<uint16_t const*>(buf.v_smooth);
    tables.k_clip = static_cast<uint16_t const*>(buf.k_clip);
    tables.v_clip = static_cast<uint16_t const*>(buf.v_clip);
    tables.signs = static_cast<uint16_t const*>(buf.signs);

    // qkv rows: [q heads | k heads | v heads], 2-byte elements.
    int64_t const rowStride = core::qkvInnerDim(cfg);
    auto const* qkv = static_cast<uint16_t const*>(buf.qkv);
    void const* q = qkv;
    void const* k = qkv + static_cast<int64_t>(cfg.num_q_heads) * cfg.head_dim;
    void const* v = qkv + static_cast<int64_t>(cfg.num_q_heads + cfg.num_kv_heads) * cfg.head_dim;
    int64_t const outStride = core::outputInnerDim(cfg);

    // Exactly the scratch of the path taken; getWorkspaceSize reserved the maximum over the profile.
    size_t const scratchBytes = step.decode_only
        ? decodeWorkspaceBytes(batch, cfg.num_q_heads, cfg.num_kv_heads, cfg.head_dim, cfg.max_seq_len, numSms)
        : contextWorkspaceBytes(
            batch, cfg.num_q_heads, cfg.num_kv_heads, cfg.head_dim, tokens, cfg.max_seq_len, cfg.recent_tokens);
    core::WorkspaceLayout const ws = core::workspaceLayout(batch, scratchBytes);
    auto* wsBase = static_cast<uint8_t*>(buf.workspace);
    void* scratch = ws.scratch_bytes ? wsBase + ws.scratch_offset : nullptr;

    if (step.decode_only)
    {
        // The decode writes the new tokens itself (DecodeAttentionParams::k, v: the split kernel's CTA
        // that holds each sequence's new position, or a write kernel first when a KV head has more
        // than 8 query heads); its finish counters are the plugin's own (DecodeCounters), 0 between
        // steps, so nothing runs before it in the step.
        if (buf.finish_counters == nullptr)
        {
            return cudaErrorInvalidValue;
        }
        DecodeAttentionParams d{};
        d.layer = layer;
        d.kv = kv;
        d.tables = tables;
        d.q = q;
        d.q_token_stride = rowStride;
        d.out = buf.out;
        d.out_token_stride = outStride;
        d.seq_lens = buf.seq_lens;
        d.batch = batch;
        d.num_q_heads = cfg.num_q_heads;
        d.max_seq_len = cfg.max_seq_len;
        d.softmax_scale = cfg.softmax_scale;
        d.act = actType;
        d.num_sms = numSms;
        d.workspace = scratch;
        d.workspace_bytes = ws.scratch_bytes;
        d.finish_counters = buf.finish_counters;
        d.k = k;
        d.v = v;
        d.k_token_stride = rowStride;
        d.v_token_stride = rowStride;
        return launchDecodeAttention(d, stream);
    }

    auto* qLens = reinterpret_cast<int32_t*>(wsBase + ws.q_lens_offset);
    cudaError_t err = launchResolveQLens(buf.request_types, buf.ctx_lens, batch, qLens, stream);
    if (err != cudaSuccess)
    {
        return err;
    }
    ContextAttentionParams c{};
    c.layer = layer;
    c.kv = kv;
    c.tables = tables;
    c.q = q;
    c.q_token_stride = rowStride;
    c.k = k;
    c.k_token_stride = rowStride;
    c.v = v;
    c.v_token_stride = rowStride;
    c.out = buf.out;
    c.out_token_stride = outStride;
    c.q_lens = qLens;
    c.seq_lens = buf.seq_lens;
    c.batch = batch;
    c.num_q_heads = cfg.num_q_heads;
    c.total_q_tokens = tokens;
    c.max_q_len = tokens - batch + 1; // every other request adds at least one token
    c.max_seq_len = cfg.max_seq_len;
    c.softmax_scale = cfg.softmax_scale;
    c.act = actType;
    c.write_kv = 1;
    c.workspace = scratch;
    c.workspace_bytes = ws.scratch_bytes;
    return launchContextAttention(c, stream);
}

} // namespace trt
} // namespace turboquant
