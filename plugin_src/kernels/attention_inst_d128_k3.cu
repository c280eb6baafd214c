// Instantiations of the attention kernel for head_dim 128, 3-bit keys, every value bit width.
#include "attention_kernel.cuh"

namespace turboquant
{
namespace detail
{
TQ_INSTANTIATE_ATTENTION(128, 3)
} // namespace detail
} // namespace turboquant
