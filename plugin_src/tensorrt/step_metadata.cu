#include "step_metadata.h"

namespace turboquant
{
namespace trt
{
namespace
{

__global__ void resolveQLensKernel(
    int32_t const* __restrict__ request_types, int32_t const* __restrict__ ctx_lens, int32_t batch, int32_t* q_lens)
{
    int32_t const b = static_cast<int32_t>(blockIdx.x * blockDim.x + threadIdx.x);
    if (b < batch)
    {
        q_lens[b] = request_types[b] == 1 ? 1 : ctx_lens[b];
    }
}

} // namespace

cudaError_t launchResolveQLens(
    int32_t const* request_types, int32_t const* ctx_lens, int32_t batch, int32_t* q_lens, cudaStream_t stream)
{
    if (batch < 1 || !request_types || !ctx_lens || !q_lens)
    {
        return cudaErrorInvalidValue;
    }
    constexpr int32_t kThreads = 256;
    resolveQLensKernel<<<(batch + kThreads - 1) / kThreads, kThreads, 0, stream>>>(request_types, ctx_lens, batch, q_lens);
    return cudaGetLastError();
}

} // namespace trt
} // namespace turboquant
