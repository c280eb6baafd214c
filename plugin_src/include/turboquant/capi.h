/* C entry points of libturboquant.so for Python (ctypes) and other non-C++ callers.
 * Every function returns a cudaError_t value (0 = success); tq_last_error() says why a call
 * returned cudaErrorInvalidValue. Pointers are device pointers unless said otherwise; `stream` is
 * a cudaStream_t. Nothing here synchronizes. */
#pragma once

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define TQ_CAPI_VERSION 4
#define TQ_MAX_KV_HEADS 128

/* One layer: its format and where its pool, sinks, recent-token ring and tables live (host struct). */
typedef struct TqLayerC
{
    int32_t head_dim;
    int32_t num_kv_heads;
    int32_t tokens_per_block;
    int32_t sink_tokens;
    int32_t norm_correction;
    int32_t recent_tokens;      /* w: 0..64 (docs/format.md §5.2); context attention then needs write_kv = 1 */
    int32_t k_bits[TQ_MAX_KV_HEADS];
    int32_t v_bits[TQ_MAX_KV_HEADS];
    int32_t k_scale_exp[TQ_MAX_KV_HEADS]; /* E of the one-byte K scales per KV head, -64..48 (docs/format.md §3.1) */
    int32_t v_scale_exp[TQ_MAX_KV_HEADS]; /* E of the one-byte V scales */
    void* pool;                 /* [num_blocks][block_stride] uint8 */
    int64_t block_stride;
    int64_t layer_offset;
    int32_t const* block_table; /* [batch][max_blocks_per_seq] int32 */
    int32_t max_blocks_per_seq;
    void* sink_pool;            /* [num_slots][H][2][max(n_s,1)][d] fp16, 16-byte aligned */
    int32_t const* seq_slot;    /* [batch] int32 row of sink_pool and recent_pool */
    void* recent_pool;          /* [num_slots][H][2][max(w,1)][d] fp16, 16-byte aligned */
    void const* k_mean;         /* [H][d] fp16 or NULL */
    void const* k_smooth;
    void const* v_mean;
    void const* v_smooth;
    void const* k_clip;         /* [H] fp16 or NULL */
    void const* v_clip;
    void const* signs;          /* [d] fp16, required */
} TqLayerC;

int32_t tq_capi_version(void);
int32_t tq_format_version(void);   /* docs/format.md version the kernels read and write (kFormatVersion) */
size_t tq_layer_struct_size(void);
char const* tq_last_error(void);
char const* tq_error_string(int32_t err);
int32_t tq_is_supported(int32_t kind, int32_t rotation, int32_t head_dim, int32_t k_bits, int32_t v_bits);

/* offsets: [4][num_kv_heads] (K codes, V codes, K meta, V meta) on the host; block_bytes: host. */
int32_t tq_block_layout(TqLayerC const* layer, int32_t* offsets, int32_t* block_bytes);

/* act: 0 = fp16, 1 = bf16 */
/* zero_words (optional, decode writes only: cu_q_lens NULL): words [b * zero_words_per_seq, (b + 1) *
 * zero_words_per_seq) are set to 0 for every sequence b (the finish counters of the decode that follows) */
int32_t tq_quantize_kv(TqLayerC const* layer, void const* k, void const* v, int64_t k_token_stride,
    int64_t v_token_stride, int32_t const* cu_q_lens, int32_t const* seq_lens, int32_t batch, int32_t max_q_len,
    int32_t act, uint32_t* zero_words, int32_t zero_words_per_seq, void* stream);

int32_t tq_dequantize_kv(TqLayerC const* layer, int32_t const* seq_lens, int32_t batch, int32_t max_seq_len,
    void* k_out, void* v_out, void* stream);

int32_t tq_decode_num_splits(
    int32_t batch, int32_t num_q_heads, int32_t num_kv_heads, int32_t head_dim, int32_t max_seq_len, int32_t num_sms);
size_t tq_decode_workspace_bytes(int32_t batch, int32_t num_q_heads, int32_t num_kv_heads, int32_t head_dim,
    int32_t max_seq_len, int32_t num_sms);
/* finish_counters: NULL (a reduce kernel follows the split kernel) or tq_decode_finish_counters() words,
 * all 0 when the call starts; the call leaves them 0 (kernels.h, DecodeAttentionParams) */
int32_t tq_decode_finish_counters(int32_t batch, int32_t num_q_heads, int32_t num_kv_heads);
/* k, v (optional, both or neither): each sequence's new token [batch][H][d] act, written into the pool at
 * position seq_lens[b] - 1 before it is read, with the bytes tq_quantize_kv writes (kernels.h) */
int32_t tq_decode_attention(TqLayerC const* layer, void const* q, int64_t q_token_stride, void* out,
    int64_t out_token_stride, int32_t const* seq_lens, int32_t batch, int32_t num_q_heads, int32_t max_seq_len,
    float softmax_scale, int32_t act, int32_t num_sms, void* workspace, size_t workspace_bytes,
    uint32_t* finish_counters, void const* k, int64_t k_token_stride, void const* v, int64_t v_token_stride,
    void* stream);

size_t tq_context_workspace_bytes(int32_t batch, int32_t num_q_heads, int32_t num_kv_heads, int32_t head_dim,
    int32_t total_q_tokens, int32_t max_seq_len, int32_t recent_tokens);
int32_t tq_context_attention(TqLayerC const* layer, void const* q, int64_t q_token_stride, void const* k,
    int64_t k_token_stride, void const* v, int64_t v_token_stride, void* out, int64_t out_token_stride,
    int32_t const* q_lens, int32_t const* seq_lens, int32_t batch, int32_t num_q_heads, int32_t total_q_tokens,
    int32_t max_q_len, int32_t max_seq_len, float softmax_scale, int32_t act, int32_t write_kv, void* workspace,
    size_t workspace_bytes, void* stream);

#ifdef __cplusplus
}
#endif
