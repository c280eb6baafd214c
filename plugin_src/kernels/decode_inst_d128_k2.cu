// Instantiations of the decode kernel for head_dim 128, 2-bit keys, every value bit width.
#include "decode_kernel.cuh"

namespace turboquant
{
namespace detail
{
TQ_INSTANTIATE_DECODE(128, 2)
} // namespace detail
} // namespace turboquant
