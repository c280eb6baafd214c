// Instantiations of the attention kernel for head_dim 128, 4-bit keys, every value bit width.
#include "attention_kernel.cuh"

namespace turboquant
{
namespace detail
{
TQ_INSTANTIATE_ATTENTION(128, 4)
} // namespace detail
} // namespace turboquant
