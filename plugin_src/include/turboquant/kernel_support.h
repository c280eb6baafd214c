// What the CUDA kernels implement: the single list. Header-only, no CUDA header, so the plugin
// core (plugin_src/core) asks the same function the launchers check.
//
// The template axes of the kernels are exactly (head_dim, k_bits, v_bits); dispatch.cuh turns the
// runtime values into template arguments at one place and instantiates every combination below.
#pragma once

#include "turboquant/format.h"

namespace turboquant
{

constexpr int32_t kKernelHeadDims[] = {64, 128};
constexpr int32_t kKernelBits[] = {2, 3, 4, 8};
constexpr int32_t kMaxGroupSize = 16; // query heads per KV head in one attention tile

inline bool tqKernelHeadDimSupported(int32_t d)
{
    for (int32_t x : kKernelHeadDims)
    {
        if (x == d)
        {
            return true;
        }
    }
    return false;
}

inline bool tqKernelBitsSupported(int32_t b)
{
    for (int32_t x : kKernelBits)
    {
        if (x == b)
        {
            return true;
        }
    }
    return false;
}

// Whether the kernels handle this (kind, rotation, head_dim, k_bits, v_bits) combination.
// norm_correction may be on or off; sink tokens 0..16; tokens per block 32, 64 or 128 (format v2 tiles).
inline bool isSupported(QuantKind kind, bool rotation, int32_t head_dim, int32_t k_bits, int32_t v_bits)
{
    return kind == QuantKind::kTurbo && rotation && tqKernelHeadDimSupported(head_dim)
        && tqKernelBitsSupported(k_bits) && tqKernelBitsSupported(v_bits);
}

// Checks a whole layer description (and the GQA ratio) against the list above and the format's
// ranges. Returns nullptr when supported, otherwise a one-line reason.
inline char const* tqCheckLayer(KvLayerDesc const& desc, int32_t num_q_heads)
{
    if (desc.kind != QuantKind::kTurbo)
    {
        return "the kernels implement kind 'turbo' only ('uniform' exists in the Python reference)";
    }
    if (!desc.rotation)
    {
        return "the kernels need rotation on (kind 'turbo' assumes rotated coordinates)";
    }
    if (!tqKernelHeadDimSupported(desc.head_dim))
    {
        return "head_dim must be 64 or 128 for the kernels";
    }
    if (desc.num_kv_heads < 1 || desc.num_kv_heads > kMaxKvHeads)
    {
        return "num_kv_heads must be between 1 and 128";
    }
    int32_t const t = desc.tokens_per_block;
    if (!tqTokensPerBlockValid(t))
    {
        return "tokens_per_block must be 32, 64 or 128 (the format stores codes in 32-token tiles)";
    }
    if (desc.sink_tokens < 0 || desc.sink_tokens > kMaxSinkTokens)
    {
        return "sink_tokens must be between 0 and 16";
    }
    if (desc.recent_tokens < 0 || desc.recent_tokens > kMaxRecentTokens)
    {
        return "recent_tokens must be between 0 and 64";
    }
    for (int32_t h = 0; h < desc.num_kv_heads; ++h)
    {
        if (!tqKernelBitsSupported(desc.k_bits[h]) || !tqKernelBitsSupported(desc.v_bits[h]))
        {
            return "k_bits and v_bits must be 2, 3, 4 or 8 for every KV head";
        }
        if (desc.k_scale_exp[h] < kScaleExpMin || desc.k_scale_exp[h] > kScaleExpMax
            || desc.v_scale_exp[h] < kScaleExpMin || desc.v_scale_exp[h] > kScaleExpMax)
        {
            return "k_scale_exp and v_scale_exp must be between -64 and 48 for every KV head";
        }
    }
    if (num_q_heads < desc.num_kv_heads || num_q_heads % desc.num_kv_heads != 0)
    {
        return "num_q_heads must be a positive multiple of num_kv_heads";
    }
    if (num_q_heads / desc.num_kv_heads > kMaxGroupSize)
    {
        return "at most 16 query heads per KV head";
    }
    return nullptr;
}

// The decode's fused write (decode_kernel.cuh): the CTA that holds a sequence's new position shares
// its n >= 1 tiles among its W warps by tiles. Warp W - 1 holds the last tile (the new position) and
// the two writers, warps W - 2 and W - 1, take `lag` tiles fewer than an even share; the first warps
// take the rest. The lag is clamped to n / W - 1, so that warp W - 1 keeps a tile; with fewer tiles
// than warps there is none, and the last n warps take one tile each. No warp takes more than
// ceil(2 lag / (W - 2)) tiles over ceil(n / W). Returns the first tile of warp i, 0 <= i <= W
// (i = W: n).
TQ_HOST_DEVICE inline int32_t tqDecodeWriterFirstTile(int32_t i, int32_t n, int32_t W, int32_t lagWanted)
{
    bool const few = n < W;
    int32_t const lag = few ? 0 : (lagWanted < n / W - 1 ? lagWanted : n / W - 1);
    int32_t const nv = n + 2 * lag; // the share counts the writers' lag as tiles
    int32_t const q = nv / W;       // > lag unless few
    int32_t const r = nv % W;       // the first r warps take one tile more (few: the last r)
    int32_t const extra = few ? (i > W - r ? i - (W - r) : 0) : (i < r ? i : r);
    return i * q + extra - lag * (i > W - 2 ? i - (W - 2) : 0);
}

} // namespace turboquant
