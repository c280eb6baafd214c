// Instantiations of the attention kernel for head_dim 64, 8-bit keys, every value bit width.
#include "attention_kernel.cuh"

namespace turboquant
{
namespace detail
{
TQ_INSTANTIATE_ATTENTION(64, 8)
} // namespace detail
} // namespace turboquant
