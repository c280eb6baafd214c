// Instantiations of the decode kernel for head_dim 64, 8-bit keys, every value bit width.
#include "decode_kernel.cuh"

namespace turboquant
{
namespace detail
{
TQ_INSTANTIATE_DECODE(64, 8)
} // namespace detail
} // namespace turboquant
