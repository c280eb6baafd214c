// The one place where runtime head_dim and bit widths become template arguments (internal).
// Every combination listed by kernel_support.h (kKernelHeadDims x kKernelBits x kKernelBits) is
// instantiated here; anything else is cudaErrorInvalidValue.
#pragma once

#include "turboquant/kernel_support.h"

#include <cuda_runtime_api.h>

#include <type_traits>

namespace turboquant
{
namespace detail
{

template <int V>
using IntC = std::integral_constant<int, V>;

template <class F>
cudaError_t dispatchHeadDim(int head_dim, F&& f)
{
    switch (head_dim)
    {
    case 64: return f(IntC<64>{});
    case 128: return f(IntC<128>{});
    default: return cudaErrorInvalidValue;
    }
}

template <class F>
cudaError_t dispatchBits(int bits, F&& f)
{
    switch (bits)
    {
    case 2: return f(IntC<2>{});
    case 3: return f(IntC<3>{});
    case 4: return f(IntC<4>{});
    case 8: return f(IntC<8>{});
    default: return cudaErrorInvalidValue;
    }
}

// f(IntC<D>, IntC<KB>, IntC<VB>)
template <class F>
cudaError_t dispatchAttention(int head_dim, int k_bits, int v_bits, F&& f)
{
    return dispatchHeadDim(head_dim, [&](auto d) {
        return dispatchBits(k_bits, [&](auto kb) {
            return dispatchBits(v_bits, [&](auto vb) { return f(d, kb, vb); });
        });
    });
}

} // namespace detail
} // namespace turboquant
