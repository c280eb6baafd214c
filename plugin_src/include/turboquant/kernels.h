// Launchers of the TurboQuant CUDA kernels: a params struct per kernel and
//   cudaError_t launchX(XParams const&, cudaStream_t)
// No TensorRT, no torch, no host synchronization inside (every launcher can be captured in a CUDA
// graph). Workspace sizes are host functions of build-time upper bounds.
//
// Pointers are device pointers unless said otherwise; every one has its shape and type beside it.
// Token strides are in elements between consecutive tokens (rows) of a [tokens][heads][d] tensor,
// so q, k and v can point into a fused QKV buffer.
#pragma once

#include "turboquant/format.h"
#include "turboquant/kernel_support.h"

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace turboquant
{

// ---------------------------------------------------------------------------------------------
// Write: transform, quantize and store new K/V into the paged pool (sinks: fp16 into sink_pool).
// ---------------------------------------------------------------------------------------------
struct QuantizeKvParams
{
    KvLayerDesc layer;          // format + layout (tqComputeBlockLayout() called)
    PagedKvPool kv;             // written in place
    LayerTablesView tables;
    void const* k;              // [num_tokens][H][d] fp16|bf16, post-RoPE
    void const* v;              // [num_tokens][H][d] fp16|bf16
    int64_t k_token_stride;     // elements between tokens of k (H*d when dense)
    int64_t v_token_stride;     // elements between tokens of v
    int32_t const* cu_q_lens;   // [batch+1] int32 first row of each sequence's new tokens;
                                //   null: one new token per sequence (row b = sequence b)
    int32_t const* seq_lens;    // [batch] int32 length of each sequence after this write (>= its new tokens)
    int32_t batch;
    int32_t max_q_len;          // host upper bound on new tokens of one sequence (1 when cu_q_lens is null)
    ActType act;                // type of k and v
    uint16_t* exact_out;        // optional [num_tokens][H][2][d] fp16 bits: every new row's transformed K (0)
                                //   and V (1) as the recent-token ring stores them; when set, the ring
                                //   itself is not written (the context path writes it after its attention)
    uint32_t* zero_words;       // optional, decode writes only (cu_q_lens null): words
                                //   [b * zero_words_per_seq, (b + 1) * zero_words_per_seq) are set to 0 for
                                //   every sequence b: the finish counters of a decode launched next on the
                                //   stream (DecodeAttentionParams::finish_counters) when they live in memory
                                //   that others reuse (the plugin keeps its own, DecodeCounters, instead).
    int32_t zero_words_per_seq;
};
// New token i of sequence b (row cu_q_lens[b] + i) is stored at position
// seq_lens[b] - q_len_b + i. Rows are independent: the kernel reads only its own row.
cudaError_t launchQuantizeKv(QuantizeKvParams const& p, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// Dequantize: the cache of each sequence back to fp16 in the transformed domain (tests and the
// context path). Sink positions come from sink_pool.
// ---------------------------------------------------------------------------------------------
struct DequantizeKvParams
{
    KvLayerDesc layer;
    PagedKvPool kv;             // read only
    int32_t const* seq_lens;    // [batch] int32 positions [0, seq_lens[b]) are converted
    int32_t batch;
    int32_t max_seq_len;        // host upper bound on seq_lens; rows beyond a sequence's length are not written
    uint16_t* k_out;            // [batch][H][max_seq_len][d] fp16 bits: x̂ = dec(scale8) * c[code]
    uint16_t* v_out;            // [batch][H][max_seq_len][d] fp16 bits
};
cudaError_t launchDequantizeKv(DequantizeKvParams const& p, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// Decode attention: one query token per sequence against its whole cache (split-K + reduce).
// ---------------------------------------------------------------------------------------------
struct DecodeAttentionParams
{
    KvLayerDesc layer;
    PagedKvPool kv;             // read only, unless k and v are set; the current token must already be
                                //   written, or be given in k and v
    LayerTablesView tables;     // k_smooth (query side), v_mean, v_smooth, signs are read (every table
                                //   when k and v are set)
    void const* q;              // [batch][Hq][d] fp16|bf16 post-RoPE, row stride q_token_stride
    int64_t q_token_stride;     // elements between sequences of q (Hq*d when dense)
    void* out;                  // [batch][Hq][d] fp16|bf16 (act), row stride out_token_stride
    int64_t out_token_stride;
    int32_t const* seq_lens;    // [batch] int32 keys of each sequence (>= 1), the current one included
    int32_t batch;
    int32_t num_q_heads;        // Hq = g * H
    int32_t max_seq_len;        // host upper bound on seq_lens: sets the split count
    float softmax_scale;        // 0: 1/sqrt(d)
    ActType act;
    int32_t num_sms;            // multiprocessors of the device (0: read from the current device)
    void* workspace;            // decodeWorkspaceBytes(...) bytes, 16-byte aligned
    size_t workspace_bytes;
    uint32_t* finish_counters;  // optional: decodeFinishCounters(...) words, all 0 when the split kernel
                                //   reads them (after its wait for the kernel before it on the stream);
                                //   every launch leaves them 0 again. With them the last CTA of each
                                //   (sequence, KV head, query-head subset) combines the partials and
                                //   writes the output, and no reduce kernel is launched. Null: a reduce
                                //   kernel follows the split kernel. Two launches in flight at once must
                                //   not share counters (nor a workspace).
    void const* k;              // optional, with v: each sequence's new token [batch][H][d] fp16|bf16 (act),
    void const* v;              //   row stride k_token_stride / v_token_stride, written into the pool at
    int64_t k_token_stride;     //   position seq_lens[b] - 1 before it is read, exactly as launchQuantizeKv
    int64_t v_token_stride;     //   writes it (same bytes). With up to 8 query heads per KV head the split
                                //   kernel writes it itself (no write kernel); with more, a write kernel
                                //   runs first. kv.pool, sink_pool and recent_pool are then written.
};
// Words of DecodeAttentionParams::finish_counters for a shape: batch * H * ceil(g / 8).
int32_t decodeFinishCounters(int32_t batch, int32_t num_q_heads, int32_t num_kv_heads);
// Splits of the key range per (sequence, KV head, query-head subset of up to 8) for a shape, with
// formats of up to 4 bits (8-bit codes may plan CTAs of 4 warps instead of 16, with other splits;
// decodeWorkspaceBytes covers both).
int32_t decodeNumSplits(
    int32_t batch, int32_t num_q_heads, int32_t num_kv_heads, int32_t head_dim, int32_t max_seq_len, int32_t num_sms);
size_t decodeWorkspaceBytes(
    int32_t batch, int32_t num_q_heads, int32_t num_kv_heads, int32_t head_dim, int32_t max_seq_len, int32_t num_sms);
cudaError_t launchDecodeAttention(DecodeAttentionParams const& p, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// Context (prefill) attention, causal, for q_len >= 1 new tokens per sequence on top of an
// already quantized prefix (chunked prefill). Optionally writes the new K/V first; then every
// query attends to keys [0, its position] read back from the quantized pool (and sink_pool). With
// a recent-token window (recent_tokens = w > 0; write_kv must be 1) a query at position p reads
// keys p - w < j <= p in fp16: this call's tokens from their transformed copies, earlier ones from
// the ring, which is updated after the attention.
// ---------------------------------------------------------------------------------------------
struct ContextAttentionParams
{
    KvLayerDesc layer;
    PagedKvPool kv;
    LayerTablesView tables;
    void const* q;              // [total_q_tokens][Hq][d] fp16|bf16 post-RoPE
    int64_t q_token_stride;
    void const* k;              // [total_q_tokens][H][d] new keys (read when write_kv)
    int64_t k_token_stride;
    void const* v;              // [total_q_tokens][H][d] new values (read when write_kv)
    int64_t v_token_stride;
    void* out;                  // [total_q_tokens][Hq][d] fp16|bf16
    int64_t out_token_stride;
    int32_t const* q_lens;      // [batch] int32 new tokens of each sequence (>= 0); rows are packed in order
    int32_t const* seq_lens;    // [batch] int32 length after this step; new tokens are the last q_lens[b]
    int32_t batch;
    int32_t num_q_heads;
    int32_t total_q_tokens;     // sum of q_lens (host value, an upper bound is fine)
    int32_t max_q_len;          // host upper bound on q_lens
    int32_t max_seq_len;        // host upper bound on seq_lens
    float softmax_scale;        // 0: 1/sqrt(d)
    ActType act;
    int32_t write_kv;           // 1: quantize k/v into the pool first
    void* workspace;            // contextWorkspaceBytes(...) bytes
    size_t workspace_bytes;
};
// recent_tokens > 0 (a window, docs/format.md §5.2) adds the call's tokens in fp16
size_t contextWorkspaceBytes(int32_t batch, int32_t num_q_heads, int32_t num_kv_heads, int32_t head_dim,
    int32_t total_q_tokens, int32_t max_seq_len, int32_t recent_tokens = 0);
cudaError_t launchContextAttention(ContextAttentionParams const& p, cudaStream_t stream);

} // namespace turboquant
