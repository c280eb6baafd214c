// The one-byte log scale of turbo vectors (docs/format.md §3.1): encode and decode, bit-exact
// with turboquant_trt/reference.py (scale8_encode, scale8_decode). Header-only, host and device.
// The tables are passed in: kScale8Frac / kScale8Mid on the host, their constant-memory copies
// kDevScale8Frac / kDevScale8Mid (or a shared-memory copy) on the device.
#pragma once

#include "turboquant/codebooks.h"
#include "turboquant/format.h"

#include <cmath>
#include <cstdint>
#include <cstring>

namespace turboquant
{

// 2^p for -126 <= p <= 127 (exact).
TQ_HOST_DEVICE inline float tqPow2(int32_t p)
{
    uint32_t const bits = static_cast<uint32_t>(127 + p) << 23;
#if defined(__CUDA_ARCH__)
    return __uint_as_float(bits);
#else
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
#endif
}

// enc(s, E): 0 for s <= 0 or NaN, 255 for +inf, else 1 + clamp(16 (e - E) + #{i : m >= M[i]}, 0, 254)
// with s = m 2^e, 1 <= m < 2 (frexp is exact, subnormals included). count(m) gives #{i : m >= M[i]}.
template <class CountMid>
TQ_HOST_DEVICE inline uint8_t tqScale8EncodeWith(float s, int32_t exp, CountMid count)
{
    if (!(s > 0.F))
    {
        return 0;
    }
    if (s > 3.402823466e38F)
    {
        return 255; // +inf
    }
    int e = 0;
    float const m = 2.F * frexpf(s, &e); // s = (m / 2) 2^e with 0.5 <= m / 2 < 1
    int const q = 16 * (e - 1 - exp) + count(m);
    return static_cast<uint8_t>(1 + (q < 0 ? 0 : q > 254 ? 254 : q));
}

// enc(s, E) against a table M (kScale8Mid on the host, its constant-memory copy on the device).
TQ_HOST_DEVICE inline uint8_t tqScale8Encode(float s, int32_t exp, float const* mid)
{
    return tqScale8EncodeWith(s, exp, [mid](float m) {
        int c = 0;
#pragma unroll
        for (int i = 0; i < 16; ++i)
        {
            c += m >= mid[i] ? 1 : 0;
        }
        return c;
    });
}

// #{i >= I : m >= kScale8Mid[i]} with the thresholds as compile-time constants.
template <int I>
struct tqScale8MidAt
{
    static constexpr float value = kScale8Mid[I];
};

template <int I = 0>
TQ_HOST_DEVICE inline int tqScale8MidCount(float m)
{
    if constexpr (I == 16)
    {
        return 0;
    }
    else
    {
        return (m >= tqScale8MidAt<I>::value ? 1 : 0) + tqScale8MidCount<I + 1>(m);
    }
}

// enc(s, E) with kScale8Mid's thresholds as immediate operands: on the device a constant-memory
// table is read through the constant cache, cold at a short kernel's start, and its miss would be
// one more round trip at the end of the write's dependent chain.
TQ_HOST_DEVICE inline uint8_t tqScale8EncodeFixed(float s, int32_t exp)
{
    return tqScale8EncodeWith(s, exp, [](float m) { return tqScale8MidCount<0>(m); });
}

// dec(k, E) = F[(k - 1) % 16] 2^(E + (k - 1) / 16), dec(0, E) = 0 (exact: -64 <= E <= 48).
TQ_HOST_DEVICE inline float tqScale8Decode(uint32_t k, int32_t exp, float const* frac)
{
    uint32_t const j = k - 1U;
    return k == 0U ? 0.F : frac[j & 15U] * tqPow2(exp + static_cast<int32_t>(j >> 4));
}

} // namespace turboquant
