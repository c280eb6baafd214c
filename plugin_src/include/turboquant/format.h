// Constants and the block layout of the TurboQuant KV format (docs/format.md), header-only.
//
// Plain C++ (no CUDA header needed): the plugin core, the kernels and the C API all use it.
// The Python twin is turboquant_trt/format.py; tests/test_kernels_gpu.py checks that
// tqComputeBlockLayout() gives the same offsets as LayerFormat.block_layout().
#pragma once

#include <cstddef>
#include <cstdint>

#if defined(__CUDACC__)
#define TQ_HOST_DEVICE __host__ __device__
#else
#define TQ_HOST_DEVICE
#endif

namespace turboquant
{

constexpr int32_t kFormatVersion = 4;
constexpr int32_t kMaxKvHeads = 128;        // KV heads of one layer the params structs can describe
constexpr int32_t kMaxSinkTokens = 16;      // n_s
constexpr int32_t kMaxRecentTokens = 64;    // w (§5.2)
constexpr int32_t kMaxTokensPerBlock = 128; // T
constexpr int32_t kTileTokens = 32;         // codes are stored in tiles of 32 token slots (docs/format.md §5)
constexpr int32_t kMaxHeadDim = 256;        // largest head_dim of the format (kernels: see isSupported)
constexpr int32_t kArrayAlign = 16;         // every array of a block starts at a multiple of 16 bytes
constexpr int32_t kTurboMetaBytes = 1;      // one one-byte log scale per vector (scale8, §3.1)
constexpr int32_t kScaleExpMin = -64;       // the scale exponent E of §3.1
constexpr int32_t kScaleExpMax = 48;
constexpr int32_t kDefaultScaleExp = -10;

enum class QuantKind : int32_t
{
    kTurbo = 0,   // int8-grid codebook on the rotated vector, one-byte log scale (docs/format.md §3.1)
    kUniform = 1, // asymmetric per group (docs/format.md §3.2): reference only, no kernel
};

// Element type of activations (q, k, v inputs and the attention output).
enum class ActType : int32_t
{
    kFp16 = 0,
    kBf16 = 1,
};

TQ_HOST_DEVICE constexpr int32_t tqAlignUp(int32_t n, int32_t a = kArrayAlign)
{
    return (n + a - 1) / a * a;
}

// Bytes of packed codes for one vector of head_dim codes (docs/format.md §4).
TQ_HOST_DEVICE constexpr int32_t tqCodeBytes(int32_t head_dim, int32_t bits)
{
    return head_dim * bits / 8;
}

// One layer's format and the byte layout of its block (page). Fill the first part, then call
// tqComputeBlockLayout() to fill the offsets. POD: kernels take it by value.
struct KvLayerDesc
{
    // --- the format (docs/format.md §1-§3) ---
    int32_t head_dim;          // d: 64, 128 or 256
    int32_t num_kv_heads;      // H, at most kMaxKvHeads
    int32_t tokens_per_block;  // T: 32, 64 or 128 (whole tiles of kTileTokens slots)
    int32_t sink_tokens;       // n_s: 0..16 first positions kept in fp16 in sink_pool
    int32_t recent_tokens;     // w: 0..64 last positions of each sequence also kept in fp16 in
                               //   recent_pool (§5.2; write, dequantize and decode read it)
    QuantKind kind;            // kernels: kTurbo only
    int32_t rotation;          // 1: randomized Hadamard rotation (kernels: required)
    int32_t norm_correction;   // 1: scale keeps the norm of the dequantized vector (§3.1)
    uint8_t k_bits[kMaxKvHeads]; // [num_kv_heads] bits of K codes per KV head: 2, 3, 4 or 8
    uint8_t v_bits[kMaxKvHeads]; // [num_kv_heads] bits of V codes per KV head
    int8_t k_scale_exp[kMaxKvHeads]; // [num_kv_heads] E of the K scales (§3.1): kScaleExpMin..kScaleExpMax
    int8_t v_scale_exp[kMaxKvHeads]; // [num_kv_heads] E of the V scales
    // --- derived by tqComputeBlockLayout(): byte offsets from the start of the layer's block ---
    int32_t k_codes_off[kMaxKvHeads]; // K codes  [T/32] tiles of 32*d*kb/8 bytes (tile layout, see below)
    int32_t v_codes_off[kMaxKvHeads]; // V codes  [T/32] tiles of 32*d*vb/8 bytes
    int32_t k_meta_off[kMaxKvHeads];  // K scales [T] scale8 bytes
    int32_t v_meta_off[kMaxKvHeads];  // V scales [T] scale8 bytes
    int32_t block_bytes;              // bytes of the layer's block (multiple of 16)
};

TQ_HOST_DEVICE constexpr bool tqTokensPerBlockValid(int32_t t)
{
    return t == 32 || t == 64 || t == 128;
}

// Fills the offsets and block_bytes of `desc` (turbo: 1 metadata byte per vector). Returns
// false when a field is out of range (T must be 32, 64 or 128, every scale exponent within
// kScaleExpMin..kScaleExpMax; then nothing is guaranteed about the offsets).
inline bool tqComputeBlockLayout(KvLayerDesc& desc)
{
    int32_t const t = desc.tokens_per_block;
    if (desc.num_kv_heads < 1 || desc.num_kv_heads > kMaxKvHeads || !tqTokensPerBlockValid(t)
        || desc.kind != QuantKind::kTurbo)
    {
        return false;
    }
    int32_t off = 0;
    for (int32_t h = 0; h < desc.num_kv_heads; ++h)
    {
        if (desc.k_scale_exp[h] < kScaleExpMin || desc.k_scale_exp[h] > kScaleExpMax
            || desc.v_scale_exp[h] < kScaleExpMin || desc.v_scale_exp[h] > kScaleExpMax)
        {
            return false;
        }
        desc.k_codes_off[h] = off;
        off += tqAlignUp(t * tqCodeBytes(desc.head_dim, desc.k_bits[h]));
        desc.v_codes_off[h] = off;
        off += tqAlignUp(t * tqCodeBytes(desc.head_dim, desc.v_bits[h]));
        desc.k_meta_off[h] = off;
        off += tqAlignUp(t * kTurboMetaBytes);
        desc.v_meta_off[h] = off;
        off += tqAlignUp(t * kTurboMetaBytes);
    }
    desc.block_bytes = off;
    return true;
}

// ---- the tile layout of the code arrays (docs/format.md §5) ------------------------------------
// A code array of a head holds T/32 tiles; tile q holds slots 32q..32q+31 and is 32 lane chunks
// of d*b/8 bytes; a lane chunk is d/32 units of 4*b bytes; a unit holds 32 codes at positions
// (selector j = 0..3, nibble n = 0..7).
struct TqTilePos
{
    int32_t lane; // L: lane chunk 0..31
    int32_t unit; // U: unit of the lane chunk, 0..d/32-1
    int32_t sel;  // j: 0..3
    int32_t nib;  // n: 0..7
};

// Position of the code of (slot tau of the tile, channel c) of a K (is_v false) or V code array.
TQ_HOST_DEVICE constexpr TqTilePos tqTilePos(bool is_v, int32_t tau, int32_t c, int32_t d)
{
    int32_t g = 0, t = 0, y = 0, rho = 0;
    if (!is_v)
    {
        g = tau % 8;
        t = (c % 16) / 4;
        y = c % 4;
        rho = ((tau / 8) * (d / 32) + c / 32) * 2 + (c % 32) / 16;
    }
    else
    {
        g = c % 8;
        t = (tau % 16) / 4;
        y = tau % 4;
        rho = 4 * (c / 16) + 2 * (tau / 16) + (c % 16) / 8;
    }
    return TqTilePos{4 * g + t, rho / 8, (rho % 8) / 2, 4 * (rho % 2) + y};
}

// Word (little-endian uint32 of the unit) and bit of code bit k (0..bits-1) at position (j, n).
TQ_HOST_DEVICE constexpr void tqUnitBit(int32_t bits, int32_t j, int32_t n, int32_t k, int32_t& word, int32_t& bit)
{
    if (bits == 2)
    {
        word = j / 2;
        bit = 4 * n + 2 * (j % 2) + k;
    }
    else if (bits == 3)
    {
        word = j < 3 ? j : k;
        bit = j < 3 ? 4 * n + k : 4 * n + 3;
    }
    else if (bits == 4)
    {
        word = j;
        bit = 4 * n + k;
    }
    else
    {
        word = 2 * j + n / 4;
        bit = 8 * (n % 4) + k;
    }
}

// Byte offset of unit `unit` of lane chunk `lane` from the start of its tile.
TQ_HOST_DEVICE constexpr int32_t tqTileUnitOffset(int32_t d, int32_t bits, int32_t lane, int32_t unit)
{
    return lane * tqCodeBytes(d, bits) + unit * 4 * bits;
}

// The paged quantized KV pool of one layer, as the kernels see it (docs/format.md §5).
//
//   block n of the layer starts at  pool + layer_offset + n * block_stride
//   token at position p of sequence b lives in block block_table[b * max_blocks_per_seq + p / T],
//   slot r = p % T: codes in tile r / 32 (slot r % 32, see tqTilePos), scales in row r of the
//   meta arrays. Positions p < sink_tokens are also kept (transformed, unquantized) in
//   sink_pool[seq_slot[b]][h][0 = K, 1 = V][p][:], which is what the readers use for them.
//   With recent_tokens = w > 0, position p is also kept in recent_pool[seq_slot[b]][h][0|1][p % w][:]
//   while p >= L - w (L: the sequence's length), which is what the readers use for those positions.
//
// Invariants (checked by the launchers): pool, block_stride and layer_offset are multiples of 16;
// layer_offset + block_bytes <= block_stride; sink_pool and seq_slot are non-null when
// sink_tokens > 0; recent_pool and seq_slot are non-null when recent_tokens > 0; the attention
// launchers also need sink_pool and recent_pool 16-byte aligned (they read rows as 16-byte vectors).
struct PagedKvPool
{
    uint8_t* pool;                // [num_blocks][block_stride] uint8, read and written in place
    int64_t block_stride;         // bytes between consecutive physical blocks
    int64_t layer_offset;         // bytes from a block's start to this layer's block
    int32_t const* block_table;   // [batch][max_blocks_per_seq] int32 physical block ids
    int32_t max_blocks_per_seq;   // row length of block_table
    uint16_t* sink_pool;          // [num_slots][H][2][max(n_s,1)][d] fp16 bits (may be null if n_s == 0)
    int32_t const* seq_slot;      // [batch] int32 sink_pool / recent_pool row of each sequence (may be null if n_s == w == 0)
    uint16_t* recent_pool;        // [num_slots][H][2][max(w,1)][d] fp16 bits (may be null if w == 0)
};

// The layer's calibrated tables (docs/format.md §2), fp16 device pointers. A null pointer means
// the table is absent: mean 0, smoothing 1, clip 1. signs is required.
struct LayerTablesView
{
    uint16_t const* k_mean;   // [H][d] fp16 μk
    uint16_t const* k_smooth; // [H][d] fp16 sk > 0
    uint16_t const* v_mean;   // [H][d] fp16 μv
    uint16_t const* v_smooth; // [H][d] fp16 sv > 0
    uint16_t const* k_clip;   // [H] fp16 γk > 0
    uint16_t const* v_clip;   // [H] fp16 γv > 0
    uint16_t const* signs;    // [d] fp16 ±1, the rotation's sign vector
};

} // namespace turboquant
