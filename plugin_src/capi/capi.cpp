// extern "C" wrappers of the launchers (plugin_src/include/turboquant/capi.h).
#include "turboquant/capi.h"
#include "turboquant/kernels.h"

#include <cuda_runtime_api.h>

#include <cstring>
#include <string>

namespace
{

thread_local std::string gLastError;

int32_t fail(char const* why)
{
    gLastError = why;
    return static_cast<int32_t>(cudaErrorInvalidValue);
}

// Builds the kernels' views from the C struct; returns a reason on error.
char const* toViews(TqLayerC const* c, turboquant::KvLayerDesc& d, turboquant::PagedKvPool& kv,
    turboquant::LayerTablesView& t, int32_t num_q_heads)
{
    using namespace turboquant;
    if (c == nullptr)
    {
        return "layer is NULL";
    }
    if (c->num_kv_heads < 1 || c->num_kv_heads > kMaxKvHeads)
    {
        return "num_kv_heads must be between 1 and 128";
    }
    std::memset(&d, 0, sizeof(d));
    d.head_dim = c->head_dim;
    d.num_kv_heads = c->num_kv_heads;
    d.tokens_per_block = c->tokens_per_block;
    d.sink_tokens = c->sink_tokens;
    d.recent_tokens = c->recent_tokens;
    d.kind = QuantKind::kTurbo;
    d.rotation = 1;
    d.norm_correction = c->norm_correction ? 1 : 0;
    for (int h = 0; h < c->num_kv_heads; ++h)
    {
        if (c->k_bits[h] < 0 || c->k_bits[h] > 8 || c->v_bits[h] < 0 || c->v_bits[h] > 8)
        {
            return "k_bits and v_bits must be 2, 3, 4 or 8 for every KV head";
        }
        d.k_bits[h] = static_cast<uint8_t>(c->k_bits[h]);
        d.v_bits[h] = static_cast<uint8_t>(c->v_bits[h]);
        if (c->k_scale_exp[h] < kScaleExpMin || c->k_scale_exp[h] > kScaleExpMax || c->v_scale_exp[h] < kScaleExpMin
            || c->v_scale_exp[h] > kScaleExpMax)
        {
            return "k_scale_exp and v_scale_exp must be between -64 and 48 for every KV head";
        }
        d.k_scale_exp[h] = static_cast<int8_t>(c->k_scale_exp[h]);
        d.v_scale_exp[h] = static_cast<int8_t>(c->v_scale_exp[h]);
    }
    if (char const* why = tqCheckLayer(d, num_q_heads > 0 ? num_q_heads : d.num_kv_heads))
    {
        return why;
    }
    if (!tqTokensPerBlockValid(d.tokens_per_block))
    {
        return "tokens_per_block must be 32, 64 or 128 (the format stores codes in tiles of 32 slots)";
    }
    if (!tqComputeBlockLayout(d))
    {
        return "invalid block layout";
    }
    kv.pool = static_cast<uint8_t*>(c->pool);
    kv.block_stride = c->block_stride;
    kv.layer_offset = c->layer_offset;
    kv.block_table = c->block_table;
    kv.max_blocks_per_seq = c->max_blocks_per_seq;
    kv.sink_pool = static_cast<uint16_t*>(c->sink_pool);
    kv.seq_slot = c->seq_slot;
    kv.recent_pool = static_cast<uint16_t*>(c->recent_pool);
    t.k_mean = static_cast<uint16_t const*>(c->k_mean);
    t.k_smooth = static_cast<uint16_t const*>(c->k_smooth);
    t.v_mean = static_cast<uint16_t const*>(c->v_mean);
    t.v_smooth = static_cast<uint16_t const*>(c->v_smooth);
    t.k_clip = static_cast<uint16_t const*>(c->k_clip);
    t.v_clip = static_cast<uint16_t const*>(c->v_clip);
    t.signs = static_cast<uint16_t const*>(c->signs);
    if (t.signs == nullptr)
    {
        return "signs is required";
    }
    if (kv.pool == nullptr || kv.block_table == nullptr)
    {
        return "pool and block_table are required";
    }
    if (reinterpret_cast<uintptr_t>(kv.pool) % 16 != 0 || kv.block_stride % 16 != 0 || kv.layer_offset % 16 != 0
        || kv.layer_offset + d.block_bytes > kv.block_stride)
    {
        return "pool must be 16-byte aligned, block_stride and layer_offset multiples of 16, the layer inside a block";
    }
    if (d.sink_tokens > 0 && (kv.sink_pool == nullptr || kv.seq_slot == nullptr))
    {
        return "sink_tokens > 0 needs sink_pool and seq_slot";
    }
    if (d.recent_tokens > 0 && (kv.recent_pool == nullptr || kv.seq_slot == nullptr))
    {
        return "recent_tokens > 0 needs recent_pool and seq_slot";
    }
    return nullptr;
}

int32_t done(cudaError_t err)
{
    if (err != cudaSuccess)
    {
        gLastError = cudaGetErrorString(err);
    }
    return static_cast<int32_t>(err);
}

// The attention kernels read sink and ring rows as 16-byte vectors (checkCommon refuses otherwise
// with cudaErrorInvalidValue; this says why in words).
char const* fp16PoolsAligned(turboquant::PagedKvPool const& kv)
{
    if ((reinterpret_cast<uintptr_t>(kv.sink_pool) | reinterpret_cast<uintptr_t>(kv.recent_pool)) % 16 != 0)
    {
        return "sink_pool and recent_pool must be 16-byte aligned (attention reads their rows as 16-byte vectors)";
    }
    return nullptr;
}

} // namespace

extern "C" {

int32_t tq_capi_version(void)
{
    return TQ_CAPI_VERSION;
}

int32_t tq_format_version(void)
{
    return turboquant::kFormatVersion;
}

size_t tq_layer_struct_size(void)
{
    return sizeof(TqLayerC);
}

char const* tq_last_error(void)
{
    return gLastError.c_str();
}

char const* tq_error_string(int32_t err)
{
    return cudaGetErrorString(static_cast<cudaError_t>(err));
}

int32_t tq_is_supported(int32_t kind, int32_t rotation, int32_t head_dim, int32_t k_bits, int32_t v_bits)
{
    return turboquant::isSupported(static_cast<turboquant::QuantKind>(kind), rotation != 0, head_dim, k_bits, v_bits) ? 1 : 0;
}

int32_t tq_block_layout(TqLayerC const* layer, int32_t* offsets, int32_t* block_bytes)
{
    if (layer == nullptr || offsets == nullptr || block_bytes == nullptr || layer->num_kv_heads < 1
        || layer->num_kv_heads > turboquant::kMaxKvHeads)
    {
        return fail("layer, offsets and block_bytes are required; 1 to 128 KV heads");
    }
    turboquant::KvLayerDesc d;
    std::memset(&d, 0, sizeof(d));
    d.head_dim = layer->head_dim;
    d.num_kv_heads = layer->num_kv_heads;
    d.tokens_per_block = layer->tokens_per_block;
    d.kind = turboquant::QuantKind::kTurbo;
    for (int h = 0; h < d.num_kv_heads; ++h)
    {
        d.k_bits[h] = static_cast<uint8_t>(layer->k_bits[h]);
        d.v_bits[h] = static_cast<uint8_t>(layer->v_bits[h]);
    }
    if (!turboquant::tqComputeBlockLayout(d))
    {
        return fail("tokens_per_block must be 32, 64 or 128 (the format stores codes in tiles of 32 slots)");
    }
    int const H = d.num_kv_heads;
    for (int h = 0; h < H; ++h)
    {
        offsets[h] = d.k_codes_off[h];
        offsets[H + h] = d.v_codes_off[h];
        offsets[2 * H + h] = d.k_meta_off[h];
        offsets[3 * H + h] = d.v_meta_off[h];
    }
    *block_bytes = d.block_bytes;
    return 0;
}

int32_t tq_quantize_kv(TqLayerC const* layer, void const* k, void const* v, int64_t k_token_stride,
    int64_t v_token_stride, int32_t const* cu_q_lens, int32_t const* seq_lens, int32_t batch, int32_t max_q_len,
    int32_t act, uint32_t* zero_words, int32_t zero_words_per_seq, void* stream)
{
    turboquant::QuantizeKvParams p;
    std::memset(&p, 0, sizeof(p));
    if (char const* why = toViews(layer, p.layer, p.kv, p.tables, 0))
    {
        return fail(why);
    }
    p.k = k;
    p.v = v;
    p.k_token_stride = k_token_stride;
    p.v_token_stride = v_token_stride;
    p.cu_q_lens = cu_q_lens;
    p.seq_lens = seq_lens;
    p.batch = batch;
    p.max_q_len = max_q_len;
    p.act = act == 1 ? turboquant::ActType::kBf16 : turboquant::ActType::kFp16;
    if (zero_words_per_seq < 0 || (zero_words_per_seq > 0 && (zero_words == nullptr || cu_q_lens != nullptr)))
    {
        return fail("zero_words: a pointer and zero_words_per_seq >= 0, for decode writes only (cu_q_lens NULL)");
    }
    p.zero_words = zero_words;
    p.zero_words_per_seq = zero_words_per_seq;
    return done(turboquant::launchQuantizeKv(p, static_cast<cudaStream_t>(stream)));
}

int32_t tq_dequantize_kv(TqLayerC const* layer, int32_t const* seq_lens, int32_t batch, int32_t max_seq_len,
    void* k_out, void* v_out, void* stream)
{
    turboquant::DequantizeKvParams p;
    std::memset(&p, 0, sizeof(p));
    turboquant::LayerTablesView t;
    if (char const* why = toViews(layer, p.layer, p.kv, t, 0))
    {
        return fail(why);
    }
    p.seq_lens = seq_lens;
    p.batch = batch;
    p.max_seq_len = max_seq_len;
    p.k_out = static_cast<uint16_t*>(k_out);
    p.v_out = static_cast<uint16_t*>(v_out);
    return done(turboquant::launchDequantizeKv(p, static_cast<cudaStream_t>(stream)));
}

int32_t tq_decode_num_splits(
    int32_t batch, int32_t num_q_heads, int32_t num_kv_heads, int32_t head_dim, int32_t max_seq_len, int32_t num_sms)
{
    return turboquant::decodeNumSplits(batch, num_q_heads, num_kv_heads, head_dim, max_seq_len, num_sms);
}

size_t tq_decode_workspace_bytes(int32_t batch, int32_t num_q_heads, int32_t num_kv_heads, int32_t head_dim,
    int32_t max_seq_len, int32_t num_sms)
{
    return turboquant::decodeWorkspaceBytes(batch, num_q_heads, num_kv_heads, head_dim, max_seq_len, num_sms);
}

int32_t tq_decode_finish_counters(int32_t batch, int32_t num_q_heads, int32_t num_kv_heads)
{
    return turboquant::decodeFinishCounters(batch, num_q_heads, num_kv_heads);
}

int32_t tq_decode_attention(TqLayerC const* layer, void const* q, int64_t q_token_stride, void* out,
    int64_t out_token_stride, int32_t const* seq_lens, int32_t batch, int32_t num_q_heads, int32_t max_seq_len,
    float softmax_scale, int32_t act, int32_t num_sms, void* workspace, size_t workspace_bytes,
    uint32_t* finish_counters, void const* k, int64_t k_token_stride, void const* v, int64_t v_token_stride,
    void* stream)
{
    turboquant::DecodeAttentionParams p;
    std::memset(&p, 0, sizeof(p));
    if (char const* why = toViews(layer, p.layer, p.kv, p.tables, num_q_heads))
    {
        return fail(why);
    }
    if (char const* why = fp16PoolsAligned(p.kv))
    {
        return fail(why);
    }
    p.q = q;
    p.q_token_stride = q_token_stride;
    p.out = out;
    p.out_token_stride = out_token_stride;
    p.seq_lens = seq_lens;
    p.batch = batch;
    p.num_q_heads = num_q_heads;
    p.max_seq_len = max_seq_len;
    p.softmax_scale = softmax_scale;
    p.act = act == 1 ? turboquant::ActType::kBf16 : turboquant::ActType::kFp16;
    p.num_sms = num_sms;
    p.workspace = workspace;
    p.workspace_bytes = workspace_bytes;
    p.finish_counters = finish_counters;
    p.k = k;
    p.v = v;
    p.k_token_stride = k_token_stride;
    p.v_token_stride = v_token_stride;
    if (p.q == nullptr || p.out == nullptr || p.seq_lens == nullptr || p.max_seq_len < 1)
    {
        return fail("q, out and seq_lens are required and max_seq_len >= 1");
    }
    if ((k == nullptr) != (v == nullptr))
    {
        return fail("k and v go together: both (the decode writes the new tokens) or neither");
    }
    size_t const need = turboquant::decodeWorkspaceBytes(
        batch, num_q_heads, p.layer.num_kv_heads, p.layer.head_dim, max_seq_len, num_sms);
    if (need > workspace_bytes || (need > 0 && workspace == nullptr))
    {
        return fail("workspace smaller than tq_decode_workspace_bytes()");
    }
    return done(turboquant::launchDecodeAttention(p, static_cast<cudaStream_t>(stream)));
}

size_t tq_context_workspace_bytes(int32_t batch, int32_t num_q_heads, int32_t num_kv_heads, int32_t head_dim,
    int32_t total_q_tokens, int32_t max_seq_len, int32_t recent_tokens)
{
    return turboquant::contextWorkspaceBytes(
        batch, num_q_heads, num_kv_heads, head_dim, total_q_tokens, max_seq_len, recent_tokens);
}

int32_t tq_context_attention(TqLayerC const* layer, void const* q, int64_t q_token_stride, void const* k,
    int64_t k_token_stride, void const* v, int64_t v_token_stride, void* out, int64_t out_token_stride,
    int32_t const* q_lens, int32_t const* seq_lens, int32_t batch, int32_t num_q_heads, int32_t total_q_tokens,
    int32_t max_q_len, int32_t max_seq_len, float softmax_scale, int32_t act, int32_t write_kv, void* workspace,
    size_t workspace_bytes, void* stream)
{
    turboquant::ContextAttentionParams p;
    std::memset(&p, 0, sizeof(p));
    if (char const* why = toViews(layer, p.layer, p.kv, p.tables, num_q_heads))
    {
        return fail(why);
    }
    if (char const* why = fp16PoolsAligned(p.kv))
    {
        return fail(why);
    }
    if (p.layer.recent_tokens > 0 && !write_kv)
    {
        return fail("with a recent-token window (recent_tokens > 0) context attention must write the new "
                    "tokens itself (write_kv = 1): it reads their fp16 copies before they enter the ring");
    }
    p.q = q;
    p.q_token_stride = q_token_stride;
    p.k = k;
    p.k_token_stride = k_token_stride;
    p.v = v;
    p.v_token_stride = v_token_stride;
    p.out = out;
    p.out_token_stride = out_token_stride;
    p.q_lens = q_lens;
    p.seq_lens = seq_lens;
    p.batch = batch;
    p.num_q_heads = num_q_heads;
    p.total_q_tokens = total_q_tokens;
    p.max_q_len = max_q_len;
    p.max_seq_len = max_seq_len;
    p.softmax_scale = softmax_scale;
    p.act = act == 1 ? turboquant::ActType::kBf16 : turboquant::ActType::kFp16;
    p.write_kv = write_kv;
    p.workspace = workspace;
    p.workspace_bytes = workspace_bytes;
    size_t const need = turboquant::contextWorkspaceBytes(
        batch, num_q_heads, p.layer.num_kv_heads, p.layer.head_dim, total_q_tokens, max_seq_len, p.layer.recent_tokens);
    if (need > workspace_bytes || workspace == nullptr)
    {
        return fail("workspace smaller than tq_context_workspace_bytes()");
    }
    return done(turboquant::launchContextAttention(p, static_cast<cudaStream_t>(stream)));
}

} // extern "C"
