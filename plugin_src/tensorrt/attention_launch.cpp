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

namespace
{
// A decode step's scratch: the decode kernels' workspace, then its finish counters (16-byte aligned),
// which the step clears before the decode reads them
size_t decodeCountersOffset(core::AttentionConfig const& cfg, int32_t batch, int32_t numSms)
{
    size_t const ws = decodeWorkspaceBytes(batch, cfg.num_q_heads, cfg.num_kv_heads, cfg.head_dim, cfg.max_seq_len, numSms);
    return (ws + 15) / 16 * 16;
}

size_t decodeStepScratchBytes(core::AttentionConfig const& cfg, int32_t batch, size_t countersOffset)
{
    return countersOffset + sizeof(uint32_t) * static_cast<size_t>(decodeFinishCounters(batch, cfg.num_q_heads, cfg.num_kv_heads));
}
} // namespace

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
        int32_t const bi = static_cast<int32_t>(b);
        scratch = std::max(scratch, decodeStepScratchBytes(cfg, bi, decodeCountersOffset(cfg, bi, numSms)));
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
    size_t const countersOffset = step.decode_only ? decodeCountersOffset(cfg, batch, numSms) : 0;
    size_t const scratchBytes = step.decode_only
        ? decodeStepScratchBytes(cfg, batch, countersOffset)
        : contextWorkspaceBytes(
            batch, cfg.num_q_heads, cfg.num_kv_heads, cfg.head_dim, tokens, cfg.max_seq_len, cfg.recent_tokens);
    core::WorkspaceLayout const ws = core::workspaceLayout(batch, scratchBytes);
    auto* wsBase = static_cast<uint8_t*>(buf.workspace);
    void* scratch = ws.scratch_bytes ? wsBase + ws.scratch_offset : nullptr;

    if (step.decode_only)
    {
        // The decode writes the new tokens itself (DecodeAttentionParams::k, v: the split kernel's CTA
        // that holds each sequence's new position, or a write kernel first when a KV head has more
        // than 8 query heads). Its finish counters sit in scratch that other layers reuse: the
        // launcher clears them first, on the stream.
        auto* counters = reinterpret_cast<uint32_t*>(static_cast<uint8_t*>(scratch) + countersOffset);
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
        d.finish_counters = counters;
        d.clear_finish_counters = 1;
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
