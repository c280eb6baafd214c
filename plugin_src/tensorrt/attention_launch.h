// The one place where the plugin meets the kernels: fills the kernels' params structs from the
// plugin's config, the step's shapes and TensorRT's buffers, and calls the launchers.
#pragma once

#include "turboquant/kernels.h"
#include "turboquant_core/attention_core.h"

#include <cuda_runtime_api.h>

#include <cstdint>

namespace turboquant
{
namespace trt
{

// Device pointers of one enqueue, by input slot (see core::InputSlot for shapes and types).
struct StepBuffers
{
    void const* qkv;              // [N, (Hq + 2H) * d] fp16|bf16
    int32_t const* seq_lens;      // [B]
    int32_t const* ctx_lens;      // [B]
    int32_t const* request_types; // [B]
    int32_t const* block_table;   // [B, max_blocks_per_seq]
    uint8_t* kv_pool;             // [num_blocks, block_stride] bytes, written in place
    void* sink_pool;              // [num_slots, H, 2, n_s, d] fp16, written in place
    int32_t const* seq_slots;     // [B]
    void const* k_mean;           // [H, d] fp16
    void const* k_smooth;         // [H, d] fp16
    void const* v_mean;           // [H, d] fp16
    void const* v_smooth;         // [H, d] fp16
    void const* k_clip;           // [H] fp16
    void const* v_clip;           // [H] fp16
    void const* signs;            // [d] fp16
    void* recent_pool;            // [num_slots, H, 2, w, d] fp16, written in place
    void* out;                    // [N, Hq * d] type of qkv
    void* workspace;              // core::workspaceSize() bytes
    uint32_t* finish_counters;    // decode steps: decodeFinishCounters(B, Hq, H) words, 0 between steps
                                  //   (DecodeCounters)
};

// The decode's finish counters of one plugin instance (one per layer and execution context), kept
// across enqueues: every decode leaves them 0, so a step clears nothing. Device memory, zeroed when
// allocated; grown outside enqueue (onShapeChange), so never inside a CUDA graph capture that
// follows TensorRT's rule of one enqueue after a shape change before capturing.
class DecodeCounters
{
public:
    DecodeCounters() = default;
    DecodeCounters(DecodeCounters const&) = delete;
    DecodeCounters& operator=(DecodeCounters const&) = delete;
    ~DecodeCounters();
    // At least `words` zeroed words (throws on a CUDA error); the pointer stays valid until a
    // larger request or destruction.
    uint32_t* ensure(size_t words);
    uint32_t* get() const { return mPtr; }

private:
    uint32_t* mPtr{nullptr};
    size_t mWords{0};
};

// Finish counters a decode step of `batch` requests needs.
size_t decodeStepCounters(core::AttentionConfig const& cfg, int64_t batch);

// Multiprocessors of the current device (cudaDevAttrMultiProcessorCount); throws on a CUDA error.
int32_t currentDeviceSms();

// Workspace bytes for steps of at most maxTokens tokens and maxBatch requests: the larger of the
// decode and context kernels' scratch, behind the plugin's per-request metadata.
size_t stepWorkspaceBytes(core::AttentionConfig const& cfg, int64_t maxTokens, int64_t maxBatch, int32_t numSms);

// N == B (one new token per request): split-K decode attention that writes the new tokens itself.
// N > B: context attention (writes the new K/V first; causal over the quantized prefix).
cudaError_t launchAttentionStep(core::AttentionConfig const& cfg, KvLayerDesc const& layer,
    core::StepShape const& step, core::DataType act, int32_t numSms, StepBuffers const& buf, cudaStream_t stream);

} // namespace trt
} // namespace turboquant
