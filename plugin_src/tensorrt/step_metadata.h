// Per-request metadata the context kernel needs, derived on the device from the plugin's inputs
// (the plugin has no host copy of lengths, and enqueue may be captured in a CUDA graph).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace turboquant
{
namespace trt
{

// q_lens[b] = request_types[b] == 1 (generation) ? 1 : ctx_lens[b]   for b < batch.
cudaError_t launchResolveQLens(int32_t const* request_types, // [batch] int32
    int32_t const* ctx_lens,                                  // [batch] int32
    int32_t batch,
    int32_t* q_lens,                                          // [batch] int32, written
    cudaStream_t stream);

} // namespace trt
} // namespace turboquant
