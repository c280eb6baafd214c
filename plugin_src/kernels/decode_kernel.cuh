// Decode attention over the version-2 tiled pool on int8 tensor cores (internal header).
// decode.cu holds the host side and the design notes; decode_inst_*.cu instantiate the template.
#pragma once

#include "common.cuh"
#include "quantize_row.cuh"
#include "turboquant/codebooks.h"
#include "turboquant/kernel_support.h"
#include "turboquant/kernels.h"

#include <cstdint>

namespace turboquant
{
namespace detail
{

constexpr int kDecTile = 32;                 // tokens per warp step (one pool tile)
constexpr int kDecMaxSplits = 256;
constexpr int kDecHeadsPerCta = 8;           // query heads of one CTA (two n-tiles of 4)
// W, warps per CTA (one split each; the CTA shares the query prologue and merges its splits), and
// the resident warps per SM that the registers (and the pipeline's shared memory) are budgeted for
// and the split plan counts on, by kernel (measured on the H200, benchmarks/NOTES.md):
//   - four-head d=128 kernels (kDecWide): 128 registers, 16 warps per SM (2-13 % faster than 12),
//     in one CTA of 16 when that plans into one full wave and its shared memory fits the device
//     (B=8: 9 % faster than CTAs of 4: a quarter of the query prologues and partials), else in
//     CTAs of 4 (B=32, whose CTAs of 16 would need two waves; 8-bit formats, whose 16 pipelines do
//     not fit in 227 KB; devices with less shared memory per block);
//   - eight-head kernels: they spill at 128 registers (GQA-8 12 % slower), 12 warps in CTAs of 4;
//   - d=64 (SmolLM2's shape): 12 warps in CTAs of 4 (3 % faster than 16: longer splits).
template <int D, int NT>
constexpr bool kDecWide = D == 128 && NT == 1;
constexpr int kDecWideWarps = 16;
template <int D, int NT>
constexpr int kDecWarpsPerSm = kDecWide<D, NT> ? 16 : 12;
template <int D, int NT, int W>
constexpr int kDecMinCtas = kDecWarpsPerSm<D, NT> / W;
constexpr int kDecWarpsMin = 4; // the fewest warps per CTA of any kernel
constexpr int kDecSmemPerSm = 228 * 1024;    // shared memory of an sm_90 / sm_100 multiprocessor
constexpr int kDecSmemPerCtaReserved = 1024; // taken by the system from each resident CTA
#ifndef TQ_DEC_MAX_STAGES
#define TQ_DEC_MAX_STAGES 4
#endif
constexpr int kDecMaxStages = TQ_DEC_MAX_STAGES;
constexpr int kQMax = 16383;                 // |q| is a 14-bit integer: hi = q >> 7 (s8), lo = q & 127
constexpr float kPMax = 65535.F;             // p' is a 16-bit unsigned integer: hi, lo = its two bytes (u8)
constexpr float kMaxSlack = 3.F;             // the running maximum moves only when a score exceeds it
                                             // by 3 (log2 units), so p <= 8
constexpr int kMaxSplitKeys = 32768;         // int32 accumulators of O cannot overflow within a split
constexpr float kPBoundShrink = 64.F;   // a head's tile this far below its p * v_scale bound re-bounds
constexpr float kPBoundHeadroom = 1.25F; // a new bound is the tile's largest p * v_scale times this

// The fused write of DecodeAttentionParams::k, v (src[0] null: none): the new token of each
// sequence, at position seq_lens[b] - 1, written by the CTA whose splits hold that position.
struct DecWriteArgs
{
    void const* src[2];         // k, v: row b = sequence b's new token, [H][d] act
    int64_t stride[2];          // elements between sequences of k, v
    uint16_t const* mean[2];    // k_mean, v_mean [H][d] or null
    uint16_t const* smooth[2];  // k_smooth, v_smooth [H][d] or null
    uint16_t const* clip[2];    // k_clip, v_clip [H] or null
    float sqrt_d;
    int32_t vec;                // 8-byte (d = 128) / 4-byte (d = 64) row and table loads
    int32_t lag;                // tiles fewer for each writing warp (decodeSplitKernel)
};

struct DecodeArgs
{
    KvLayerDesc layer;
    PagedKvPool kv;
    uint16_t const* k_smooth; // [H][d] fp16 or null
    uint16_t const* signs;    // [d] fp16
    void const* q;            // [batch][Hq][d]
    int64_t q_stride;
    int32_t const* seq_lens;  // [batch]
    float* ws_o;              // [batch][Hq][splits][d]
    float* ws_ml;             // [batch][Hq][splits][2]  (max in log2 units, sum)
    uint32_t* counters;       // [batch][H][hsub] finish counters (0 on entry and exit), or null: reduce kernel
    // the finish's (RowOut's) fields, read only when counters is set
    void* out;
    int64_t out_stride;
    uint16_t const* v_mean;
    uint16_t const* v_smooth;
    int32_t batch;
    int32_t num_q_heads;
    int32_t group;            // g = Hq / H
    int32_t hsub;             // CTAs per (sequence, KV head) along the query heads: ceil(g / 8)
    int32_t num_splits;
    int32_t split_len;        // keys per split, a multiple of kDecTile
    float q_scale;            // softmax_scale * log2(e)
    float rsqrt_d;
    int32_t bf16;
    int32_t num_launch_heads;
    uint8_t heads[kMaxKvHeads];
    DecWriteArgs wr;
};

// The n CTA partials of one (sequence, query head) row, combined by one warp (lane: channels
// PER*lane .. PER*lane + PER-1): x = sum_k 2^(m_k - M) o_k / sum_k 2^(m_k - M) l_k, M the largest
// m_k. Lane j holds (m, l) of partials j and j + 32; the outputs are loaded CH partials at a time and
// summed in partial order. Loads go to L2 (ld.global.cg): in the split kernel's finish the partials
// were written by other CTAs.
template <int D, int CH>
__device__ __forceinline__ void combinePartials(
    float const* ws_ml, float const* ws_o, int64_t base, int n, int lane, float (&x)[D / 32])
{
    constexpr int PER = D / 32;
    static_assert(kDecMaxSplits / kDecWarpsMin <= 64, "two (max, sum) pairs per lane");
    float2 const* ml = reinterpret_cast<float2 const*>(ws_ml) + base;
    float2 const m0 = lane < n ? __ldcg(ml + lane) : make_float2(-INFINITY, 0.F);
    float2 const m1 = lane + 32 < n ? __ldcg(ml + lane + 32) : make_float2(-INFINITY, 0.F);
    float mx = fmaxf(m0.x, m1.x);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
    {
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    }
    float const w0 = m0.x == -INFINITY ? 0.F : exp2f(m0.x - mx);
    float const w1 = m1.x == -INFINITY ? 0.F : exp2f(m1.x - mx);
    float den = w0 * m0.y;
    if (n > 32)
    {
        den += w1 * m1.y;
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
    {
        den += __shfl_xor_sync(0xffffffffu, den, o);
    }
#pragma unroll
    for (int e = 0; e < PER; ++e)
    {
        x[e] = 0.F;
    }
    float const* wo = ws_o + base * D + PER * lane;
    for (int k0 = 0; k0 < n; k0 += CH)
    {
        float ov[CH][PER];
#pragma unroll
        for (int k = 0; k < CH; ++k)
        {
#pragma unroll
            for (int e = 0; e < PER; ++e)
            {
                ov[k][e] = 0.F;
            }
            if (k0 + k < n) // every partial is written (zeros where a CTA had no keys)
            {
                float const* src = wo + static_cast<int64_t>(k0 + k) * D;
                if constexpr (PER == 4)
                {
                    float4 const v = __ldcg(reinterpret_cast<float4 const*>(src));
                    ov[k][0] = v.x;
                    ov[k][1] = v.y;
                    ov[k][2] = v.z;
                    ov[k][3] = v.w;
                }
                else
                {
                    float2 const v = __ldcg(reinterpret_cast<float2 const*>(src));
                    ov[k][0] = v.x;
                    ov[k][1] = v.y;
                }
            }
        }
#pragma unroll
        for (int k = 0; k < CH; ++k)
        {
            int const j = k0 + k;
            float const w = __shfl_sync(0xffffffffu, j < 32 ? w0 : w1, j & 31); // 0 from n on
#pragma unroll
            for (int e = 0; e < PER; ++e)
            {
                x[e] += w * ov[k][e];
            }
        }
    }
    float const inv = den > 0.F ? 1.F / den : 0.F;
#pragma unroll
    for (int e = 0; e < PER; ++e)
    {
        x[e] *= inv;
    }
}

// lambda_b of the int8-grid codebook c_b = e_b / lambda_b (docs/format.md §3.1)
template <int B>
constexpr float kCodebookLambda = B == 2 ? kCodebookLambda2 : B == 3 ? kCodebookLambda3 : B == 4 ? kCodebookLambda4 : kCodebookLambda8;

// int8 codebook bytes as PRMT tables: t[0] = e[0..3], t[1] = e[4..7], t[2] = e[8..11], t[3] = e[12..15].
template <int B>
__host__ __device__ constexpr uint32_t lutWord(int w)
{
    signed char const* e = B == 2 ? kCodebookInt82 : B == 3 ? kCodebookInt83 : kCodebookInt84;
    int const n = 1 << B;
    uint32_t r = 0;
    for (int i = 0; i < 4; ++i)
    {
        int const idx = (4 * w + i) % n; // 2-bit: the 4 entries repeat, so selector bit 2 is ignored
        r |= static_cast<uint32_t>(static_cast<uint8_t>(e[idx])) << (8 * i);
    }
    return r;
}

// One unit (32 codes, 4*B bytes as B little-endian words) -> 8 registers of 4 int8 codebook values:
// register k = 2j + hh holds positions (j, n = 4hh .. 4hh+3) (docs/format.md, tile layout).
// lut = {lutWord<B>(0), lutWord<B>(2)} held in registers by the caller (read once from shared
// memory): PRMT takes one table word as an immediate and the other from a register, and a constant
// in that register would be re-materialized by the compiler before every PRMT (one extra
// instruction per four codes).
template <int B>
__device__ __forceinline__ void expandUnit(uint32_t const* w, uint32_t (&r)[8], uint32_t const (&lut)[2])
{
    if constexpr (B == 8)
    {
#pragma unroll
        for (int k = 0; k < 8; ++k)
        {
            r[k] = w[k] ^ 0x80808080u; // e = code - 128
        }
    }
    else
    {
        uint32_t sel[4];
        if constexpr (B == 2)
        {
            sel[0] = w[0] & 0x33333333u;
            sel[1] = (w[0] >> 2) & 0x33333333u;
            sel[2] = w[1] & 0x33333333u;
            sel[3] = (w[1] >> 2) & 0x33333333u;
        }
        else if constexpr (B == 3)
        {
            sel[0] = w[0] & 0x77777777u;
            sel[1] = w[1] & 0x77777777u;
            sel[2] = w[2] & 0x77777777u;
            sel[3] = ((w[0] >> 3) & 0x11111111u) | ((w[1] >> 2) & 0x22222222u) | ((w[2] >> 1) & 0x44444444u);
        }
        else
        {
#pragma unroll
            for (int j = 0; j < 4; ++j)
            {
                sel[j] = w[j];
            }
        }
        uint32_t const t0 = lut[0];
        constexpr uint32_t t1 = lutWord<B>(1);
#pragma unroll
        for (int j = 0; j < 4; ++j)
        {
            if constexpr (B == 4)
            {
                uint32_t const t2 = lut[1];
                constexpr uint32_t t3 = lutWord<B>(3);
                uint32_t const s7 = sel[j] & 0x77777777u;
                // byte mask 0xFF where the code's bit 3 is set: PRMT sign-replicates byte 4 (0x80)
                // for selector nibble 0xC and copies byte 0 (0x00) for nibble 0x0
                uint32_t const s8 = sel[j] & 0x88888888u;
                uint32_t const ms = s8 | (s8 >> 1);
#pragma unroll
                for (int hh = 0; hh < 2; ++hh)
                {
                    uint32_t const lo = prmt(t0, t1, s7 >> (16 * hh));
                    uint32_t const hi = prmt(t2, t3, s7 >> (16 * hh));
                    uint32_t const m = prmt(0u, 0x80u, ms >> (16 * hh));
                    r[2 * j + hh] = (hi & m) | (lo & ~m);
                }
            }
            else
            {
                r[2 * j] = prmt(t0, t1, sel[j]);
                r[2 * j + 1] = prmt(t0, t1, sel[j] >> 16);
            }
        }
    }
}

// x0, x1 as fp16 pairs hi + lo: hi = fp16(x), lo = fp16(x - hi) (about 22 bits of x together)
__device__ __forceinline__ void splitHalf2(float x0, float x1, uint32_t& hi, uint32_t& lo)
{
    hi = packHalf2(x0, x1);
    lo = packHalf2(x0 - h2f(static_cast<uint16_t>(hi)), x1 - h2f(static_cast<uint16_t>(hi >> 16)));
}

__device__ __forceinline__ void mmaS8U8(int (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0, uint32_t b1)
{
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.s32.s8.u8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void mmaS8(int (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0, uint32_t b1)
{
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Compute capability major of the current device (programmatic dependent launch needs 9.0+).
inline int computeMajor()
{
    int dev = 0;
    int major = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess)
    {
        return 0;
    }
    return major;
}

// Whether `kern` may be a programmatic dependent launch on the current device: the device is sm_90+
// and the code it runs was compiled for sm_90+, so it contains the griddepcontrol.wait (a library
// built only for sm_80/sm_89 runs on a Hopper GPU through PTX compiled for sm_80, without it).
// Checked once per kernel and device.
template <auto Kern>
inline bool pdlCapable()
{
    constexpr int kDevices = 64;
    static signed char known[kDevices] = {}; // 0 unknown, 1 yes, -1 no
    int dev = 0;
    if (!TQ_PDL || cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= kDevices)
    {
        return false;
    }
    if (known[dev] == 0)
    {
        cudaFuncAttributes fa{};
        cudaError_t const e = computeMajor() >= 9 ? cudaFuncGetAttributes(&fa, Kern) : cudaErrorNotSupported;
        if (e != cudaSuccess && e != cudaErrorNotSupported)
        {
            (void) cudaGetLastError(); // our failed query is not the caller's error
        }
        bool const ok = e == cudaSuccess && fa.ptxVersion >= 90;
        known[dev] = ok ? 1 : -1;
    }
    return known[dev] == 1;
}

// One pipeline stage of a warp: the K tile, the V tile, then 32 K scales and 32 V scales (scale8 bytes).
// PRO: the CTA's shared memory before the stages (decodePrologueBytes); CTAS: resident CTAs per SM;
// W: warps per CTA.
template <int D, int KB, int VB, int PRO, int CTAS, int W>
struct DecStage
{
    static constexpr int kTile = 32 * D * KB / 8;
    static constexpr int vTile = 32 * D * VB / 8;
    static constexpr int bytes = kTile + vTile + 64;
    // a warp's share of what CTAS CTAs may use of an sm_90 multiprocessor
    static constexpr int budget = (kDecSmemPerSm / CTAS - kDecSmemPerCtaReserved - PRO) / W;
    // as many stages (2..kDecMaxStages) as fit in that budget (at least 2: then fewer CTAs are resident)
    static constexpr int stages = bytes * kDecMaxStages <= budget ? kDecMaxStages : bytes * 2 > budget ? 2 : budget / bytes;
};

// Four 32-bit words of shared memory at a 16-byte aligned address, loaded where the call stands
// (volatile: not hoisted out of a loop into registers)
__device__ __forceinline__ void ldsV4(uint32_t addr, uint32_t& x, uint32_t& y, uint32_t& z, uint32_t& w)
{
    asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(x), "=r"(y), "=r"(z), "=r"(w) : "r"(addr));
}

// Loads N 32-bit words of shared memory from a 16-byte (N % 4 == 0) or 8-byte aligned address.
template <int N>
__device__ __forceinline__ void loadWordsShared(uint32_t (&w)[N], uint8_t const* p)
{
    if constexpr (N % 4 == 0)
    {
#pragma unroll
        for (int i = 0; i < N / 4; ++i)
        {
            uint4 const v = reinterpret_cast<uint4 const*>(p)[i];
            w[4 * i] = v.x;
            w[4 * i + 1] = v.y;
            w[4 * i + 2] = v.z;
            w[4 * i + 3] = v.w;
        }
    }
    else
    {
#pragma unroll
        for (int i = 0; i < N / 2; ++i)
        {
            uint2 const v = reinterpret_cast<uint2 const*>(p)[i];
            w[2 * i] = v.x;
            w[2 * i + 1] = v.y;
        }
    }
}

template <int D, int W>
__host__ __device__ constexpr int decodeQueryBytes()
{
    // q (fp32) [8][D], q hi/lo bytes [2][8][D], per-head multipliers, per-warp P buffers [2][8][32] u16
    return kDecHeadsPerCta * D * 4 + 2 * kDecHeadsPerCta * D + 2 * kDecHeadsPerCta * 4 + W * 2 * 8 * 32 * 2;
}

// the query part, then each warp's fp32 O^T (D/16 m-tiles x NT n-tiles x 2 registers x 32 lanes)
template <int D, int NT, int W>
__host__ __device__ constexpr int decodePrologueBytes()
{
    return decodeQueryBytes<D, W>() + W * (D / 16) * NT * 2 * 32 * 4;
}

template <int D, int KB, int VB, int NT, int W>
using DecStageOf = DecStage<D, KB, VB, decodePrologueBytes<D, NT, W>(), kDecMinCtas<D, NT, W>, W>;

template <int D, int KB, int VB, int NT, int W>
__host__ __device__ constexpr int decodeSmemBytes()
{
    using S = DecStageOf<D, KB, VB, NT, W>;
    return decodePrologueBytes<D, NT, W>() + W * S::stages * S::bytes;
}

// One warp per (sequence, KV head, split); a CTA holds W consecutive splits of one (sequence,
// KV head, query-head subset) and shares the query prologue. NT n-tiles of 4 query heads.
template <int D, int KB, int VB, int NT, int W, bool WR>
__global__ void __launch_bounds__(32 * W, kDecMinCtas<D, NT, W>) decodeSplitKernel(__grid_constant__ DecodeArgs const a)
{
    constexpr int KCB = D * KB / 8; // bytes of one lane chunk (= one token row) of the K tile
    constexpr int VCB = D * VB / 8;
    constexpr int KW = KCB / 4;
    constexpr int VW = VCB / 4;
    constexpr int UNITS = D / 32;   // units per lane chunk
    constexpr int KS = D / 32;      // k-steps of S^T = K Q^T
    constexpr int MT = D / 16;      // m-tiles of O^T = V^T P^T
    constexpr float kNegInf = -INFINITY;
    constexpr float kInvLambdaK = 1.F / kCodebookLambda<KB>;
    constexpr float kInvLambdaV = 1.F / kCodebookLambda<VB>;

    extern __shared__ __align__(16) uint8_t smem[];
    float* qf = reinterpret_cast<float*>(smem);                                   // [8][D]
    // the B fragments of Q^T (below) in the order the lanes read them: [nt][lane][KS][2] words
    uint8_t* qBs = reinterpret_cast<uint8_t*>(qf + kDecHeadsPerCta * D);
    float* qmulS = reinterpret_cast<float*>(qBs + 2 * kDecHeadsPerCta * D);       // [8]
    // [8] words after qmulS: [0..3] the PRMT table words of K and V (expandUnit), [4] the finish's
    // last-CTA flag, then unused
    uint32_t* lutS = reinterpret_cast<uint32_t*>(qmulS + kDecHeadsPerCta);
    uint16_t* pbufAll = reinterpret_cast<uint16_t*>(qmulS + 2 * kDecHeadsPerCta);  // [warps][2][8][32]
    // this warp's O^T in fp32, [m][nt][r][lane]: channel 16m + 8r + g of head 4nt + t (lane = 4g + t).
    // Kept in shared memory, not registers: the tile loop only folds its int32 accumulators into it
    // (when a head's maximum or bound moves, and at the end), and its 16 * NT registers are part of
    // what keeps the four-head loop within 128 registers, so 16 warps are resident per SM.
    float* const oS = reinterpret_cast<float*>(smem + decodeQueryBytes<D, W>()) + (threadIdx.x >> 5) * MT * NT * 2 * 32 + (threadIdx.x & 31);
    auto oAt = [&](int m, int nt, int r) -> float& { return oS[((m * NT + nt) * 2 + r) * 32]; };

    KvLayerDesc const& L = a.layer;
    int const head = a.heads[blockIdx.y];
    int const b = blockIdx.z / a.hsub;
    int const hs = blockIdx.z % a.hsub;
    int const hq0 = head * a.group + hs * kDecHeadsPerCta;
    int const nh = min(kDecHeadsPerCta, a.group - hs * kDecHeadsPerCta); // query heads of this CTA
    // a programmatic dependent launch (sm_90+): this CTA may run while the kernel before it on the
    // stream finishes (in the plugin, the write kernel that stores the new tokens), so it reads
    // nothing before that kernel is complete; the reduce kernel, if one follows, may be scheduled
    // from here on (with the finish counters nothing follows that waits for this grid: no trigger, so
    // that a kernel launched after this one, even a programmatic dependent, starts when it is done)
    if (a.counters == nullptr)
    {
        launchDependents();
    }
    gridDependencyWait();
    int const seqLen = a.seq_lens[b];
    // the sequence's slot of its sink and window rows, read beside seq_lens: read after it, as the
    // rows' prefetch below needs it, it would be one more dependent load before the exact path
    int const seqSlot = L.sink_tokens > 0 || L.recent_tokens > 0 ? a.kv.seq_slot[b] : 0;
    int const T = L.tokens_per_block;
    int const tShift = __ffs(T) - 1; // T is a power of two
    int const ns = L.sink_tokens;
    bool const bf16 = a.bf16 != 0;

    int const lane = threadIdx.x & 31;
    int const warp = threadIdx.x >> 5;
    // ---- the fused write (WR: DecodeArgs::wr is set; the launcher fuses only when hsub == 1, so that
    // one CTA makes every read of the new position): the CTA whose splits hold position seqLen - 1
    // writes it, warp W - 2 the new K row and warp W - 1 the new V row (quantize_row.cuh, the write
    // kernel's code), after the CTA barrier that ends the query prologue, so that the other warps do
    // not wait for it. That CTA shares its keys out by tiles, not by splits: warp W - 1 takes the
    // last tiles, so it holds the new position, and reads it after its own write and after a named
    // barrier with warp W - 2; the two writers take wr.lag tiles fewer than an even share each (the
    // time of the write), the other warps the rest. Any partition is correct here: the CTA merges its
    // warps' partials before it stores one.
    int const newest = seqLen - 1;
    bool const writesHere = WR && newest >= 0 && static_cast<int>(blockIdx.x) == newest / a.split_len / W;
    int kb;
    int ke;
    if (writesHere)
    {
        int const cb = blockIdx.x * W * a.split_len;
        int const n = (seqLen - cb + kDecTile - 1) / kDecTile; // tiles of the CTA, >= 1
        kb = cb + kDecTile * tqDecodeWriterFirstTile(warp, n, W, a.wr.lag);
        ke = min(cb + kDecTile * tqDecodeWriterFirstTile(warp + 1, n, W, a.wr.lag), seqLen);
    }
    else
    {
        kb = (blockIdx.x * W + warp) * a.split_len;
        ke = min(kb + a.split_len, seqLen);
    }
    // the recent-token window [wb, seqLen) is read from the fp16 ring, not from the tiles
    int const wb = max(ns, seqLen - L.recent_tokens);
    int const keQ = max(kb, min(ke, wb)); // quantized keys of this split: [max(kb, ns), keQ)

    // The new row's loads and its block's id go out with the query's, ahead of the tile copies.
    int const wrWhich = warp - (W - 2); // 0: K, 1: V
    bool const writer = writesHere && wrWhich >= 0;
    NewRow<D> wrIn;
    int wrBlk = 0;
    if (writer)
    {
        loadNewRow<D>(wrIn, static_cast<uint16_t const*>(a.wr.src[wrWhich]) + static_cast<int64_t>(b) * a.wr.stride[wrWhich],
            a.wr.mean[wrWhich], a.wr.smooth[wrWhich], a.wr.clip[wrWhich], a.signs, head, a.wr.vec != 0, lane);
        wrBlk = __ldg(a.kv.block_table + static_cast<int64_t>(b) * a.kv.max_blocks_per_seq + (newest >> tShift));
    }

    // ---- the query's loads go first (behind the tile copies they would wait as long as the copies);
    // lane: channels PER*lane .. PER*lane + PER-1 of query heads warp + W j (< 4 NT), raw 16-bit values
    constexpr int PER = D / 32;
    constexpr int QR = (4 * NT + W - 1) / W; // query heads of each warp: warp + W j
    uint16_t qRaw[QR][PER];
    uint16_t smRaw[PER];
    uint16_t sgRaw[PER];
    {
        uint16_t const* qp = static_cast<uint16_t const*>(a.q) + static_cast<int64_t>(b) * a.q_stride
            + static_cast<int64_t>(hq0 + warp) * D + PER * lane;
        uint16_t const* smp = a.k_smooth != nullptr ? a.k_smooth + static_cast<int64_t>(head) * D + PER * lane : nullptr;
#pragma unroll
        for (int e = 0; e < PER; ++e)
        {
#pragma unroll
            for (int j = 0; j < QR; ++j)
            {
                qRaw[j][e] = warp + W * j < nh ? __ldg(qp + W * j * D + e) : 0;
            }
            smRaw[e] = smp != nullptr ? __ldg(smp + e) : 0x3C00; // fp16 1.0 without smoothing
            sgRaw[e] = __ldg(a.signs + PER * lane + e);
        }
    }

    // ---- the first tiles' copies start before the query prologue, which hides behind them ---------
    uint8_t const* layerBase = a.kv.pool + a.kv.layer_offset;
    int32_t const* btab = a.kv.block_table + static_cast<int64_t>(b) * a.kv.max_blocks_per_seq;
    int const kOff = L.k_codes_off[head];
    int const vOff = L.v_codes_off[head];
    int const kmOff = L.k_meta_off[head];
    int const vmOff = L.v_meta_off[head];
    int const kExp = L.k_scale_exp[head];
    int const vExp = L.v_scale_exp[head];
    float const kExpF = static_cast<float>(kExp) - 0.0625F; // 2^(E + (k - 1) / 16) = exp2(k / 16 + E - 1/16)
    float const vExpF = static_cast<float>(vExp) - 0.0625F;
    // Per-warp pipeline: STAGES shared-memory stages filled by cp.async (the warp copies each tile
    // as one contiguous image, then every lane reads its own chunk); tile i + STAGES - 1 is issued
    // while tile i is computed. Block ids come from a 32-entry window of the block table, one
    // entry per lane.
    using Stage = DecStageOf<D, KB, VB, NT, W>;
    constexpr int STAGES = Stage::stages;
    uint8_t* stageBase = smem + decodePrologueBytes<D, NT, W>() + warp * STAGES * Stage::bytes;
    int const blk0 = kb >> tShift;
    // The copy state of the next tile to issue: its block is entry wIdx of a 32-entry window of the
    // block table (one entry per lane), it is tile tIn of that block (T / 32 tiles per block), and
    // blk is that block's address plus this lane's 16-byte piece. Everything per tile is then 32-bit
    // offsets from blk; a block's address is formed once per block (measured: the per-tile window
    // shuffle and 64-bit address arithmetic were a fifth of the tile loop's instructions).
    int const tilesPerBlock = T >> 5;
    int tIn = (kb & (T - 1)) >> 5;
    int wIdx = 0;
    int winVal = lane < a.kv.max_blocks_per_seq - blk0 ? __ldg(btab + blk0 + lane) : 0;
    int winEnd = blk0 + 32; // block index just past the window
    auto blockAddr = [&](int id) { return layerBase + static_cast<int64_t>(id) * a.kv.block_stride + 16 * lane; };
    uint8_t const* blk = blockAddr(__shfl_sync(0xffffffffu, winVal, 0));
    // this lane's piece of the metadata (lanes 0, 1: K scales; 2, 3: V scales), relative to blk
    int const metaOff = (lane < 2 ? kmOff : vmOff) + 16 * (lane & 1) - 16 * lane;
    uint32_t const stLane = static_cast<uint32_t>(__cvta_generic_to_shared(stageBase)) + 16 * lane;
    // rem: quantized keys of the split from the tile's first slot on (none left: no copy); stOff:
    // the byte offset of its stage
    // copies tile `tile` of the block at blkLane (its address plus this lane's 16-byte piece) into the
    // stage at stOff: the tile is a contiguous image, consecutive lanes copy consecutive pieces
    auto copyTile = [&](uint8_t const* blkLane, int tile, uint32_t stOff) {
        uint32_t const st = stLane + stOff;
        uint8_t const* ksrc = blkLane + (kOff + tile * Stage::kTile);
        uint8_t const* vsrc = blkLane + (vOff + tile * Stage::vTile);
#pragma unroll
        for (int p = 0; p < Stage::kTile / 16; p += 32)
        {
            if (Stage::kTile % 512 == 0 || p + lane < Stage::kTile / 16)
            {
                cpAsync16s(st + 16 * p, ksrc + 16 * p);
            }
        }
#pragma unroll
        for (int p = 0; p < Stage::vTile / 16; p += 32)
        {
            if (Stage::vTile % 512 == 0 || p + lane < Stage::vTile / 16)
            {
                cpAsync16s(st + Stage::kTile + 16 * p, vsrc + 16 * p);
            }
        }
        if (lane < 4)
        {
            cpAsync16s(st + Stage::kTile + Stage::vTile, blkLane + (metaOff + tile * 32 * kTurboMetaBytes));
        }
    };
    auto issue = [&](int rem, uint32_t stOff) {
        if (rem > 0)
        {
            copyTile(blk, tIn, stOff);
            if (++tIn == tilesPerBlock)
            {
                tIn = 0;
                if (++wIdx == 32)
                {
                    wIdx = 0;
                    winVal = lane < a.kv.max_blocks_per_seq - winEnd ? __ldg(btab + winEnd + lane) : 0;
                    winEnd += 32;
                }
                blk = blockAddr(__shfl_sync(0xffffffffu, winVal, wIdx));
            }
        }
        cpAsyncCommit();
    };
#pragma unroll
    for (int i = 0; i < STAGES - 1; ++i)
    {
        issue(keQ - kb - kDecTile * i, i * Stage::bytes);
    }

    // ---- sink and recent-window rows of this split (fp16, read by the exact path below) ------------
    // Their lines are asked into L1 now, so the exact path's dependent steps find them there.
    int const sinkEnd = min(ns, ke);      // sinks [kb, sinkEnd) fall in this split
    int const winBeg = max(kb, wb);       // window positions [winBeg, ke) fall in this split
    int const w = L.recent_tokens;
    int64_t const sinkRow = static_cast<int64_t>(ns) * D;
    int64_t const ringRow = static_cast<int64_t>(w) * D;
    uint16_t const* sinkBase = nullptr;
    uint16_t const* ring = nullptr;
    if (sinkEnd > kb || ke > winBeg)
    {
        int64_t const sh = static_cast<int64_t>(seqSlot) * L.num_kv_heads + head;
        sinkBase = sinkEnd > kb ? a.kv.sink_pool + sh * 2 * sinkRow : nullptr;
        ring = ke > winBeg ? a.kv.recent_pool + sh * 2 * ringRow : nullptr;
    }
    auto sinkRowOf = [&](int p) { return sinkBase + static_cast<int64_t>(p) * D; };
    auto ringRowOf = [&](int p) { return ring + static_cast<int64_t>(p % w) * D; };
    auto prefetchRows = [&](int p0, int p1, auto rowOf, int64_t vStride) {
        constexpr int kLines = D * 2 / 128; // 128-byte lines of one row
        for (int p = p0 + lane; p < p1; p += 32)
        {
            uint16_t const* k = rowOf(p);
#pragma unroll
            for (int l = 0; l < kLines; ++l)
            {
                prefetchL1(k + 64 * l);
                prefetchL1(k + vStride + 64 * l);
            }
        }
    };
    if (sinkEnd > kb)
    {
        prefetchRows(kb, sinkEnd, sinkRowOf, sinkRow);
    }
    if (ke > winBeg)
    {
        prefetchRows(winBeg, ke, ringRowOf, ringRow);
    }

    // ---- prologue: q -> smoothing, rotation, 14-bit integers (hi, lo bytes); warp w: heads w + W j -
    // (the four-head kernel has no heads 4..7; heads from nh on are zeros)
    {
#pragma unroll
        for (int j = 0; j < QR; ++j)
        {
            int const r = warp + W * j;
            if (r >= 4 * NT)
            {
                break; // the four-head kernel has no heads 4..7
            }
            float x[PER];
#pragma unroll
            for (int e = 0; e < PER; ++e)
            {
                float const qv = bf16 ? __uint_as_float(static_cast<uint32_t>(qRaw[j][e]) << 16) : h2f(qRaw[j][e]);
                x[e] = qv * h2f(smRaw[e]) * h2f(sgRaw[e]);
            }
            warpWht<PER>(x, lane);
            float mx = 0.F;
#pragma unroll
            for (int e = 0; e < PER; ++e)
            {
                x[e] *= a.rsqrt_d;
                mx = fmaxf(mx, fabsf(x[e]));
            }
#pragma unroll
            for (int o = 16; o > 0; o >>= 1)
            {
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
            }
            float const fq = mx > 0.F ? static_cast<float>(kQMax) / mx : 1.F;
#pragma unroll
            for (int e = 0; e < PER; ++e)
            {
                int const c = PER * lane + e;
                int const v = __float2int_rn(x[e] * fq);
                qf[r * D + c] = x[e];
                // column g = 2 (r % 4) + part of n-tile r / 4; channel c is byte c % 4 of word
                // (c % 32) / 16 of k-step c / 32 of lane 4g + (c % 16) / 4
                int const at = (((r >> 2) * 32 + 8 * (r & 3) + ((c & 15) >> 2)) * KS + (c >> 5)) * 8 + ((c >> 4) & 1) * 4 + (c & 3);
                qBs[at] = static_cast<uint8_t>(v >> 7);        // hi: part 0
                qBs[at + 4 * 4 * KS * 2] = static_cast<uint8_t>(v & 127); // lo: part 1, lane + 4
            }
            if (lane == 0)
            {
                qmulS[r] = a.q_scale * kInvLambdaK / fq;
            }
        }
    }
    if (threadIdx.x == 0)
    {
        lutS[0] = KB == 8 ? 0u : lutWord<KB == 8 ? 2 : KB>(0); // 8-bit codes need no table
        lutS[1] = KB == 8 ? 0u : lutWord<KB == 8 ? 2 : KB>(2);
        lutS[2] = VB == 8 ? 0u : lutWord<VB == 8 ? 2 : VB>(0);
        lutS[3] = VB == 8 ? 0u : lutWord<VB == 8 ? 2 : VB>(2);
    }
    __syncthreads();
    // ---- the fused write: transform, the sink and ring copies, codes and scale, as the write kernel
    if (writer)
    {
        float x[PER];
        transformNewRow<D>(wrIn, a.wr.mean[wrWhich] != nullptr, a.wr.smooth[wrWhich] != nullptr, bf16, a.rsqrt_d, x, lane);
        int64_t const row = (static_cast<int64_t>(seqSlot) * L.num_kv_heads + head) * 2 + wrWhich;
        if (newest < ns)
        {
            storeFp16(a.kv.sink_pool + (row * ns + newest) * D + PER * lane, x);
        }
        if (w > 0)
        {
            storeFp16(a.kv.recent_pool + (row * w + newest % w) * D + PER * lane, x);
        }
        uint8_t* const block = a.kv.pool + a.kv.layer_offset + static_cast<int64_t>(wrBlk) * a.kv.block_stride;
        SlotDest dst;
        dst.codesOff = wrWhich == 0 ? kOff : vOff;
        dst.metaOff = wrWhich == 0 ? kmOff : vmOff;
        dst.r = newest & (T - 1);
        dst.scaleExp = wrWhich == 0 ? kExp : vExp;
        // scratch: this warp's O^T, first written after the write
        static_assert(2 * D + D / 4 <= MT * NT * 2 * 32, "the write's scratch must fit in a warp's O^T");
        float* const wb = reinterpret_cast<float*>(smem + decodeQueryBytes<D, W>()) + warp * MT * NT * 2 * 32;
        uint32_t* const wcw = reinterpret_cast<uint32_t*>(wb + 2 * D);
        bool const nc = L.norm_correction != 0;
        if constexpr (KB == VB)
        {
            quantizeStore<D, KB>(block, a.wr.sqrt_d, nc, x, wrWhich != 0, wrIn.gamma, wb, wb + D, wcw, dst, lane);
        }
        else if (wrWhich == 0)
        {
            quantizeStore<D, KB>(block, a.wr.sqrt_d, nc, x, false, wrIn.gamma, wb, wb + D, wcw, dst, lane);
        }
        else
        {
            quantizeStore<D, VB>(block, a.wr.sqrt_d, nc, x, true, wrIn.gamma, wb, wb + D, wcw, dst, lane);
        }
        // warp W - 1 reads the new position (its last key) from here on: after its own V row and,
        // through named barrier 1, after warp W - 2's K row
        if (wrWhich == 0)
        {
            namedBarrierArrive(1, 64);
        }
        else
        {
            namedBarrierSync(1, 64);
        }
        __syncwarp(); // the scratch is this warp's O^T from here on
    }

    if (writer && newest >= kb && newest < keQ && ((newest - kb) >> 5) < STAGES - 1)
    {
        // no window (w = 0), so the new position is read from its tile, and that tile's copy was one
        // of this warp's first, issued before the write: wait for every copy, copy it again
        cpAsyncWait<0>();
        copyTile(blockAddr(__ldg(btab + (newest >> tShift))), (newest & (T - 1)) >> 5, ((newest - kb) >> 5) * Stage::bytes);
        cpAsyncCommit();
        cpAsyncWait<0>();
        __syncwarp();
    }
    uint32_t const lutK[2] = {lutS[0], lutS[1]};
    uint32_t const lutV[2] = {lutS[KB == VB ? 0 : 2], lutS[KB == VB ? 1 : 3]}; // the same registers when KB == VB

    int const g = lane >> 2;
    int const t = lane & 3;

    // A warp without keys (split beyond num_splits, or beyond this sequence's length) runs no tile
    // (keQ <= kb) and contributes (max -inf, sum 0, O 0) to the CTA's combine below.

    float qmul[NT];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
    {
        qmul[nt] = qmulS[4 * nt + t];
    }
    // this lane's B fragments of Q^T (column g = head 4nt + g/2, part g%2: 0 = hi, 1 = lo; rows =
    // channels), read again for every tile (8 * NT registers fewer across the loop)
    uint32_t const qBLane = static_cast<uint32_t>(__cvta_generic_to_shared(qBs)) + lane * KS * 8;

    float mRun[NT];
    float lRun[NT];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
    {
        mRun[nt] = kNegInf;
        lRun[nt] = 0.F;
    }

    // ---- sink tokens and the recent-token window (fp16, transformed domain): exact path ------------
    // Keys [p0, p1) go in chunks of 16 on fp16 tensor cores (m16n8k16, fp32 accumulation). K and V
    // are fp16 already; the fp32 operands Q and P are split into fp16 hi + lo parts (about 22
    // significant bits together), so these rows keep their fp16 values, not their codes:
    //   S = K Q^T: rows = the chunk's keys, columns = the CTA's query heads (n = 8: heads 0..7,
    //     zero for heads the CTA lacks). Q is scaled per head by fq (the prologue's 14-bit scale, so
    //     that it fits fp16) and split into hi and lo (two products, accumulated in two independent
    //     chains and added at the end). Within k-step s, lane t's
    //     k-indices 2t, 2t+1, 2t+8, 2t+9 stand for channels 16s + 4t .. 16s + 4t + 3 (a permutation of
    //     the channels, the same for K and Q), so each A fragment row is one 8-byte load.
    //   O^T += V^T P^T: rows = channels (16 per m-tile), columns = (head 4nt + j/2, part j%2) as in the
    //     tile loop, part 0 the fp16 value of p and part 1 its remainder; the lane's accumulator is
    //     then channel 16m + g (+ 8) of head 4nt + t, exactly oAt(m, nt, r).
    // The running maximum and sum of this pass are kept per lane for heads 2t and 2t + 1 (the S
    // layout); P, the rescale factors and at the end the maximum and sum go to the loop's layout
    // (head 4nt + t) through this warp's pbuf (idle before the tiles). rowOf(p) is key p's K row; its
    // V row is vStride halves further.
    if (sinkEnd > kb || ke > winBeg)
    {
        constexpr int KS16 = D / 16;   // k-steps of S = K Q^T
        float* const pw = reinterpret_cast<float*>(pbufAll + warp * 2 * 8 * 32); // [8 heads][16 keys], then [8] x 3
        float* const pAlpha = pw + 128;
        float* const pMax = pw + 136;
        float* const pSum = pw + 144;
        static_assert((128 + 24) * 4 <= 2 * 8 * 32 * 2, "exact-path buffers must fit in pbuf");
        float oF[MT][NT][2];
#pragma unroll
        for (int m = 0; m < MT; ++m)
        {
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
            {
                oF[m][nt][0] = 0.F;
                oF[m][nt][1] = 0.F;
            }
        }
        // per head: fq (q * fq fits fp16) and the score factor q_scale / fq; this lane's B column is
        // head g, its S columns heads 2t and 2t + 1
        float const qsc = a.q_scale * kInvLambdaK;
        bool const qOk = g < 4 * NT;
        float const fqB = qOk ? qsc / qmulS[g] : 0.F;
        float sMul[2];
        bool hOk[2];
        float mE[2];
        float lE[2];
#pragma unroll
        for (int e = 0; e < 2; ++e)
        {
            int const h = 2 * t + e;
            hOk[e] = h < 4 * NT && h < nh;
            sMul[e] = hOk[e] ? a.q_scale / (qsc / qmulS[h]) : 0.F;
            mE[e] = kNegInf;
            lE[e] = 0.F;
        }
        auto exactRows = [&](int p0, int p1, auto rowOf, int64_t vStride) {
#pragma unroll 1
            for (int c0 = p0; c0 < p1; c0 += 16)
            {
                // S = K Q^T for keys c0 + g and c0 + g + 8 (zero rows beyond p1)
                bool const in0 = c0 + g < p1;
                bool const in1 = c0 + g + 8 < p1;
                uint16_t const* k0 = rowOf(in0 ? c0 + g : p0) + 4 * t;
                uint16_t const* k1 = rowOf(in1 ? c0 + g + 8 : p0) + 4 * t;
                float sc[4] = {0.F, 0.F, 0.F, 0.F}; // the hi and lo products in two independent chains
                float sl[4] = {0.F, 0.F, 0.F, 0.F};
#pragma unroll
                for (int s = 0; s < KS16; ++s)
                {
                    uint2 const w0 = in0 ? *reinterpret_cast<uint2 const*>(k0 + 16 * s) : make_uint2(0U, 0U);
                    uint2 const w1 = in1 ? *reinterpret_cast<uint2 const*>(k1 + 16 * s) : make_uint2(0U, 0U);
                    uint32_t bh[2] = {0U, 0U};
                    uint32_t bl[2] = {0U, 0U};
                    if (qOk)
                    {
                        float4 const qv = *reinterpret_cast<float4 const*>(qf + g * D + 16 * s + 4 * t);
                        splitHalf2(qv.x * fqB, qv.y * fqB, bh[0], bl[0]);
                        splitHalf2(qv.z * fqB, qv.w * fqB, bh[1], bl[1]);
                    }
                    uint32_t const ka[4] = {w0.x, w1.x, w0.y, w1.y};
                    mma16816(sc, ka, bh[0], bh[1]);
                    mma16816(sl, ka, bl[0], bl[1]);
                }
#pragma unroll
                for (int i = 0; i < 4; ++i)
                {
                    sc[i] += sl[i];
                }
                // softmax over the chunk, per head (the 8 lanes of one t hold its 16 keys)
                float pv[2][2]; // [head e][key g, g + 8]
#pragma unroll
                for (int e = 0; e < 2; ++e)
                {
                    float const s0 = hOk[e] && in0 ? sc[e] * sMul[e] : kNegInf;
                    float const s1 = hOk[e] && in1 ? sc[2 + e] * sMul[e] : kNegInf;
                    float cm = fmaxf(s0, s1);
                    cm = fmaxf(cm, __shfl_xor_sync(0xffffffffu, cm, 4));
                    cm = fmaxf(cm, __shfl_xor_sync(0xffffffffu, cm, 8));
                    cm = fmaxf(cm, __shfl_xor_sync(0xffffffffu, cm, 16));
                    float const mN = fmaxf(mE[e], cm);
                    float const alpha = mN == kNegInf ? 1.F : exp2f(mE[e] - mN);
                    pv[e][0] = s0 == kNegInf ? 0.F : exp2f(s0 - mN);
                    pv[e][1] = s1 == kNegInf ? 0.F : exp2f(s1 - mN);
                    float cs = pv[e][0] + pv[e][1];
                    cs += __shfl_xor_sync(0xffffffffu, cs, 4);
                    cs += __shfl_xor_sync(0xffffffffu, cs, 8);
                    cs += __shfl_xor_sync(0xffffffffu, cs, 16);
                    lE[e] = lE[e] * alpha + cs;
                    mE[e] = mN;
                    int const h = 2 * t + e;
                    pw[h * 16 + g] = pv[e][0];
                    pw[h * 16 + g + 8] = pv[e][1];
                    if (g == 0)
                    {
                        pAlpha[h] = alpha;
                    }
                }
                __syncwarp();
                // O^T = O^T * alpha + V^T P^T; B column g of n-tile nt: head 4nt + g/2, part g % 2
                uint32_t pB[NT][2];
#pragma unroll
                for (int nt = 0; nt < NT; ++nt)
                {
                    float const* row = pw + (4 * nt + (g >> 1)) * 16;
                    float2 const pa = *reinterpret_cast<float2 const*>(row + 2 * t);
                    float2 const pb = *reinterpret_cast<float2 const*>(row + 2 * t + 8);
                    uint32_t hi, lo;
                    splitHalf2(pa.x, pa.y, hi, lo);
                    pB[nt][0] = (g & 1) ? lo : hi;
                    splitHalf2(pb.x, pb.y, hi, lo);
                    pB[nt][1] = (g & 1) ? lo : hi;
                    float const al = pAlpha[4 * nt + t];
#pragma unroll
                    for (int m = 0; m < MT; ++m)
                    {
                        oF[m][nt][0] *= al;
                        oF[m][nt][1] *= al;
                    }
                }
                // V^T fragments: channel 16m + g (+ 8) of keys c0 + 2t, 2t + 1, 2t + 8, 2t + 9 (zero beyond p1)
                uint16_t const* vr[4];
                bool vin[4];
#pragma unroll
                for (int j = 0; j < 4; ++j)
                {
                    int const key = c0 + 2 * t + (j & 1) + 8 * (j >> 1);
                    vin[j] = key < p1;
                    vr[j] = rowOf(vin[j] ? key : p0) + vStride + g;
                }
#pragma unroll
                for (int m = 0; m < MT; ++m)
                {
                    uint32_t v16[4][2]; // [key j][row g, g + 8]
#pragma unroll
                    for (int j = 0; j < 4; ++j)
                    {
                        v16[j][0] = vin[j] ? vr[j][16 * m] : 0U;
                        v16[j][1] = vin[j] ? vr[j][16 * m + 8] : 0U;
                    }
                    uint32_t const va[4] = {v16[0][0] | (v16[1][0] << 16), v16[0][1] | (v16[1][1] << 16),
                        v16[2][0] | (v16[3][0] << 16), v16[2][1] | (v16[3][1] << 16)};
#pragma unroll
                    for (int nt = 0; nt < NT; ++nt)
                    {
                        float acc[4] = {0.F, 0.F, 0.F, 0.F};
                        mma16816(acc, va, pB[nt][0], pB[nt][1]);
                        oF[m][nt][0] += acc[0] + acc[1];
                        oF[m][nt][1] += acc[2] + acc[3];
                    }
                }
                __syncwarp(); // pw is written again by the next chunk
            }
        };
        if (sinkEnd > kb)
        {
            exactRows(kb, sinkEnd, sinkRowOf, sinkRow);
        }
        if (ke > winBeg)
        {
            exactRows(winBeg, ke, ringRowOf, ringRow);
        }
        // the pass's maximum and sum to the loop's layout: head 4nt + t, the sum counted once (g = 0)
        if (g == 0)
        {
            pMax[2 * t] = mE[0];
            pMax[2 * t + 1] = mE[1];
            pSum[2 * t] = lE[0];
            pSum[2 * t + 1] = lE[1];
        }
        __syncwarp();
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
        {
            mRun[nt] = pMax[4 * nt + t];
            lRun[nt] = g == 0 ? pSum[4 * nt + t] : 0.F;
#pragma unroll
            for (int m = 0; m < MT; ++m)
            {
                oAt(m, nt, 0) = oF[m][nt][0];
                oAt(m, nt, 1) = oF[m][nt][1];
            }
        }
        __syncwarp(); // pbuf is the tiles' P buffer from here on
    }
    else
    {
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
        {
#pragma unroll
            for (int m = 0; m < MT; ++m)
            {
                oAt(m, nt, 0) = 0.F;
                oAt(m, nt, 1) = 0.F;
            }
        }
    }

    // ---- the quantized tiles ---------------------------------------------------------------------
    int accO[MT][NT][4];
#pragma unroll
    for (int m = 0; m < MT; ++m)
    {
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
        {
#pragma unroll
            for (int k = 0; k < 4; ++k)
            {
                accO[m][nt][k] = 0;
            }
        }
    }
    uint16_t* pbuf = pbufAll + warp * 2 * 8 * 32;

    // per head (this lane's head of each n-tile): p' = p * vs * pfH <= 65535 against a bound pvB on
    // p * vs that follows the tiles and also shrinks (benchmarks/sim_pquant.py)
    float pvB[NT];
    float pfH[NT];
    float oScaleH[NT]; // 1 / (pfH * lambda_v)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
    {
        pvB[nt] = 0.F;
        pfH[nt] = 0.F;
        oScaleH[nt] = 0.F;
    }

    auto flush = [&](int nt) {
        float const os = oScaleH[nt];
#pragma unroll
        for (int m = 0; m < MT; ++m)
        {
            oAt(m, nt, 0) += (static_cast<float>(accO[m][nt][0]) * 256.F + static_cast<float>(accO[m][nt][1])) * os;
            oAt(m, nt, 1) += (static_cast<float>(accO[m][nt][2]) * 256.F + static_cast<float>(accO[m][nt][3])) * os;
#pragma unroll
            for (int k = 0; k < 4; ++k)
            {
                accO[m][nt][k] = 0;
            }
        }
    };

    // per tile: rem = keQ - (its first slot), nsRel = ns - (its first slot), rdOff = its stage's offset
    int nsRel = ns - kb;
    uint32_t rdOff = 0;
#pragma unroll 1
    for (int rem = keQ - kb; rem > 0; rem -= kDecTile, nsRel -= kDecTile)
    {
        cpAsyncWait<STAGES - 2>();
        __syncwarp();
        uint8_t const* st = stageBase + rdOff;
        uint32_t kwc[KW], vwc[VW];
        loadWordsShared<KW>(kwc, st + lane * KCB);
        // the V words are read after the softmax (below): not live across the K product and the
        // softmax (without that the loop does not fit in 128 registers)
        uint32_t const ksc = st[Stage::kTile + Stage::vTile + lane];
        uint32_t const vsc = st[Stage::kTile + Stage::vTile + 32 + lane];
        __syncwarp();
        // tile it + STAGES - 1 into the stage that tile it - 1 used
        issue(rem - kDecTile * (STAGES - 1), rdOff == 0 ? (STAGES - 1) * Stage::bytes : rdOff - Stage::bytes);
        rdOff = rdOff == (STAGES - 1) * Stage::bytes ? 0 : rdOff + Stage::bytes;

        // slots of this tile that count: [max(pos0, ns), keQ) - pos0
        int const lo = max(nsRel, 0);
        int const hi = rem;

        // S^T = K Q^T: m-tile mt holds slots 16mt + g (rows) and 16mt + 8 + g
        uint32_t qB[KS][NT][2];
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
        {
#pragma unroll
            for (int s = 0; s < KS; s += 2)
            {
                ldsV4(qBLane + nt * 32 * KS * 8 + s * 8, qB[s][nt][0], qB[s][nt][1], qB[s + 1][nt][0], qB[s + 1][nt][1]);
            }
        }
        int accS[2][NT][4];
#pragma unroll
        for (int mt = 0; mt < 2; ++mt)
        {
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
            {
#pragma unroll
                for (int k = 0; k < 4; ++k)
                {
                    accS[mt][nt][k] = 0;
                }
            }
            // registers rho = (i*KS + s)*2 + h for i = 2mt, 2mt+1: KS/2 units starting at unit mt*KS/2
            uint32_t ra[4 * KS];
#pragma unroll
            for (int u = 0; u < KS / 2; ++u)
            {
                uint32_t r8[8];
                expandUnit<KB>(kwc + (mt * KS / 2 + u) * KB, r8, lutK);
#pragma unroll
                for (int k = 0; k < 8; ++k)
                {
                    ra[8 * u + k] = r8[k];
                }
            }
#pragma unroll
            for (int s = 0; s < KS; ++s)
            {
                // row g: i = 2mt -> local rho (0*KS + s)*2 + h; row g+8: i = 2mt+1 -> (KS + s)*2 + h
#pragma unroll
                for (int nt = 0; nt < NT; ++nt)
                {
                    mmaS8(accS[mt][nt], ra[2 * s], ra[2 * (KS + s)], ra[2 * s + 1], ra[2 * (KS + s) + 1], qB[s][nt][0], qB[s][nt][1]);
                }
            }
        }

        // one buffer serves every tile: the __syncwarp at the top of the next iteration orders this
        // tile's reads of it before the next tile's writes
        uint16_t* const pb = pbuf;
        // softmax on the 4 slots g + 8i of head 4nt + t held by this thread
        // the one-byte scales dec(k, E) = 2^(E + (k - 1) / 16) (docs/format.md §3.1) through exp2Ftz
        // (the MUFU, within 2 ulp of the exact grid value; measured 1-3 % faster than the exact
        // grid value by shuffle, benchmarks/NOTES.md)
        float const ksL = ksc == 0U ? 0.F : exp2Ftz(fmaf(static_cast<float>(ksc), 0.0625F, kExpF));
        float const vsL = lane >= lo && lane < hi && vsc != 0U ? exp2Ftz(fmaf(static_cast<float>(vsc), 0.0625F, vExpF)) : 0.F;
        float ksI[4];
        float vsI[4];
        bool okI[4];
#pragma unroll
        for (int i = 0; i < 4; ++i)
        {
            int const slot = g + 8 * i;
            ksI[i] = __shfl_sync(0xffffffffu, ksL, slot);
            vsI[i] = __shfl_sync(0xffffffffu, vsL, slot);
            okI[i] = slot >= lo && slot < hi;
        }
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
        {
            float sc[4];
#pragma unroll
            for (int i = 0; i < 4; ++i)
            {
                int const* c = accS[i >> 1][nt];
                int const sInt = (i & 1) ? c[2] * 128 + c[3] : c[0] * 128 + c[1];
                sc[i] = okI[i] ? static_cast<float>(sInt) * ksI[i] * qmul[nt] : kNegInf;
            }
            float gm = fmaxf(fmaxf(sc[0], sc[1]), fmaxf(sc[2], sc[3]));
            // rare: some score exceeds the running maximum by more than the slack; then the lanes of
            // each head agree on the new maximum (lanes of one head share t, differ in g)
            bool const grow = __any_sync(0xffffffffu, gm > mRun[nt] + kMaxSlack);
            if (grow)
            {
                gm = fmaxf(gm, __shfl_xor_sync(0xffffffffu, gm, 4));
                gm = fmaxf(gm, __shfl_xor_sync(0xffffffffu, gm, 8));
                gm = fmaxf(gm, __shfl_xor_sync(0xffffffffu, gm, 16));
            }
            if (grow && gm > mRun[nt] + kMaxSlack)
            {
                flush(nt);
                float const alpha = exp2f(mRun[nt] - gm);
#pragma unroll
                for (int m = 0; m < MT; ++m)
                {
                    oAt(m, nt, 0) *= alpha;
                    oAt(m, nt, 1) *= alpha;
                }
                lRun[nt] *= alpha;
                mRun[nt] = gm;
            }
            bool const headOk = 4 * nt + t < nh;
            float pv[4];
            float pm = 0.F;
#pragma unroll
            for (int i = 0; i < 4; ++i)
            {
                float const p = okI[i] ? exp2Ftz(sc[i] - mRun[nt]) : 0.F;
                lRun[nt] += p;
                pv[i] = p * vsI[i];
                pm = fmaxf(pm, pv[i]);
            }
            // the head's largest p * vs in this tile (its 8 lanes differ in g)
            pm = fmaxf(pm, __shfl_xor_sync(0xffffffffu, pm, 4));
            pm = fmaxf(pm, __shfl_xor_sync(0xffffffffu, pm, 8));
            pm = fmaxf(pm, __shfl_xor_sync(0xffffffffu, pm, 16));
            // a new bound when this tile would overflow it, or would use less than 1/kPBoundShrink
            // of its range (every lane of a head decides alike)
            bool const rebound = headOk && pm > 1e-30F && (pm > pvB[nt] || pm * kPBoundShrink < pvB[nt]);
            if (__any_sync(0xffffffffu, rebound))
            {
                if (rebound)
                {
                    flush(nt);
                    pvB[nt] = pm * kPBoundHeadroom;
                    pfH[nt] = __fdividef(kPMax, pvB[nt]);
                    oScaleH[nt] = __fdividef(kInvLambdaV, pfH[nt]);
                }
            }
#pragma unroll
            for (int i = 0; i < 4; ++i)
            {
                // p * vs <= pvB: p' <= 65535 (heads beyond nh never re-bound: pfH = 0, p' = 0);
                // bytes (lo, hi) are the two u8 columns
                uint32_t const pi = __float2uint_rn(pv[i] * pfH[nt]);
                pb[(4 * nt + t) * 32 + g + 8 * i] = static_cast<uint16_t>(pi);
            }
        }
        __syncwarp();
        uint32_t pB[NT][2];
        uint32_t const psel = (g & 1) ? 0x6420u : 0x7531u; // lo bytes or hi bytes of 4 u16
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
        {
            uint16_t const* row = pb + (4 * nt + (g >> 1)) * 32;
            uint2 const w0 = *reinterpret_cast<uint2 const*>(row + 4 * t);
            uint2 const w1 = *reinterpret_cast<uint2 const*>(row + 16 + 4 * t);
            pB[nt][0] = prmt(w0.x, w0.y, psel);
            pB[nt][1] = prmt(w1.x, w1.y, psel);
        }
        loadWordsShared<VW>(vwc, st + Stage::kTile + lane * VCB);

        // O^T += V^T P^T: register rho = 4m + 2kh + rh of the V chunk; unit m/2
#pragma unroll
        for (int u = 0; u < UNITS; ++u)
        {
            uint32_t r8[8];
            expandUnit<VB>(vwc + u * VB, r8, lutV);
#pragma unroll
            for (int half = 0; half < 2; ++half)
            {
                int const m = 2 * u + half;
#pragma unroll
                for (int nt = 0; nt < NT; ++nt)
                {
                    mmaS8U8(accO[m][nt], r8[4 * half], r8[4 * half + 1], r8[4 * half + 2], r8[4 * half + 3], pB[nt][0], pB[nt][1]);
                }
            }
        }
    }

    // ---- the CTA combines its W splits; one partial per (sequence, query head, CTA) -----------------
    // Each warp puts (max, sum, O) of its heads into its own (now idle) pipeline stages, then the
    // CTA's threads merge the W warps: the reduce kernel reads 1/W of the partials.
    cpAsyncWait<0>();
    constexpr int kRow = D + 4; // floats per head row: lanes (g, t) of one store hit distinct banks
    static_assert((4 * NT * kRow + 8 * NT) * 4 <= STAGES * Stage::bytes, "combine buffer must fit in a warp's stages");
    float* cw = reinterpret_cast<float*>(stageBase);
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
    {
        flush(nt);
        float l = lRun[nt];
        l += __shfl_xor_sync(0xffffffffu, l, 4);
        l += __shfl_xor_sync(0xffffffffu, l, 8);
        l += __shfl_xor_sync(0xffffffffu, l, 16);
        int const hh = 4 * nt + t;
        float* o = cw + hh * kRow;
#pragma unroll
        for (int m = 0; m < MT; ++m)
        {
            o[16 * m + g] = oAt(m, nt, 0);
            o[16 * m + 8 + g] = oAt(m, nt, 1);
        }
        if (g == 0)
        {
            cw[4 * NT * kRow + 2 * hh] = mRun[nt];
            cw[4 * NT * kRow + 2 * hh + 1] = l;
        }
    }
    __syncthreads();
    int64_t const parts = gridDim.x;
    for (int idx = threadIdx.x; idx < nh * D; idx += 32 * W)
    {
        int const hh = idx / D;
        int const c = idx - hh * D;
        float mw[W];
        float mx = kNegInf;
#pragma unroll
        for (int w = 0; w < W; ++w)
        {
            float const* cwW = reinterpret_cast<float const*>(smem + decodePrologueBytes<D, NT, W>() + w * STAGES * Stage::bytes);
            mw[w] = cwW[4 * NT * kRow + 2 * hh];
            mx = fmaxf(mx, mw[w]);
        }
        float o = 0.F;
        float l = 0.F;
#pragma unroll
        for (int w = 0; w < W; ++w)
        {
            float const* cwW = reinterpret_cast<float const*>(smem + decodePrologueBytes<D, NT, W>() + w * STAGES * Stage::bytes);
            float const sc = mw[w] == kNegInf ? 0.F : exp2f(mw[w] - mx);
            o += sc * cwW[hh * kRow + c];
            l += sc * cwW[4 * NT * kRow + 2 * hh + 1];
        }
        int64_t const wi = (static_cast<int64_t>(b) * a.num_q_heads + hq0 + hh) * parts + blockIdx.x;
        a.ws_o[wi * D + c] = o;
        if (c == 0)
        {
            a.ws_ml[2 * wi] = mx;
            a.ws_ml[2 * wi + 1] = l;
        }
    }
    if (a.counters == nullptr)
    {
        return; // the reduce kernel combines the partials
    }

    // ---- the finish: the last CTA of this (sequence, KV head, head subset) to get here combines the
    // partials of all of them (the reduce kernel's work, without its launch and its wait for this grid).
    // Each CTA's partials are stored before the barrier, thread 0's fence and its ticket; the CTA whose
    // ticket completes the count fences again, so every other CTA's partials precede its reads.
    // The value tables of the KV head are loaded first (the reduce kernel too reads them before its
    // wait), so that they are not one more round trip after the ticket.
    RowOut<D> fin;
    if (warp < nh)
    {
        fin.load(a, head, lane);
    }
    __syncthreads();
    uint32_t volatile* const lastFlag = lutS + 4;
    if (threadIdx.x == 0)
    {
        __threadfence();
        uint32_t const ci = (static_cast<uint32_t>(b) * L.num_kv_heads + head) * a.hsub + hs;
        // wraps to 0 on the last ticket, so the counters are ready for the next launch
        uint32_t const ticket = atomicInc(a.counters + ci, static_cast<uint32_t>(parts - 1));
        if (ticket == parts - 1)
        {
            __threadfence();
        }
        *lastFlag = ticket == parts - 1 ? 1u : 0u;
    }
    __syncthreads();
    if (*lastFlag == 0u)
    {
        return;
    }
    for (int hh = warp; hh < nh; hh += W) // one warp per query head of the CTA
    {
        int const hq = hq0 + hh;
        float x[PER];
        combinePartials<D, 8>(a.ws_ml, a.ws_o, (static_cast<int64_t>(b) * a.num_q_heads + hq) * parts, static_cast<int>(parts), lane, x);
        fin.store(a, x, b, hq, lane);
    }
}

template <int D, int KB, int VB, int NT, int W, bool WR>
cudaError_t launchDecodeSplitWR(DecodeArgs const& a, cudaStream_t stream)
{
    auto kern = decodeSplitKernel<D, KB, VB, NT, W, WR>;
    constexpr int smemBytes = decodeSmemBytes<D, KB, VB, NT, W>();
    if (smemBytes > 48 * 1024)
    {
        cudaError_t const e = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, smemBytes);
        if (e != cudaSuccess)
        {
            return e;
        }
    }
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3((a.num_splits + W - 1) / W, a.num_launch_heads, a.batch * a.hsub);
    cfg.blockDim = dim3(32 * W);
    cfg.dynamicSmemBytes = smemBytes;
    cfg.stream = stream;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = attr;
    cfg.numAttrs = pdlCapable<decodeSplitKernel<D, KB, VB, NT, W, WR>>() ? 1 : 0;
    return cudaLaunchKernelEx(&cfg, kern, a);
}

// The kernel with the fused write when DecodeArgs::wr is set, else the one without its code.
template <int D, int KB, int VB, int NT, int W>
cudaError_t launchDecodeSplitW(DecodeArgs const& a, cudaStream_t stream)
{
    return a.wr.src[0] != nullptr ? launchDecodeSplitWR<D, KB, VB, NT, W, true>(a, stream)
                                  : launchDecodeSplitWR<D, KB, VB, NT, W, false>(a, stream);
}

// The CTA widths a kernel comes in (decode.cu plans with them): kDecWideWarps or 4 warps for the
// four-head d=128 kernels, 4 for the others.
template <int D, int KB, int VB, int NT>
cudaError_t launchDecodeSplit(DecodeArgs const& a, int warps, cudaStream_t stream)
{
    if constexpr (kDecWide<D, NT>)
    {
        if (warps == kDecWideWarps)
        {
            return launchDecodeSplitW<D, KB, VB, NT, kDecWideWarps>(a, stream);
        }
    }
    return launchDecodeSplitW<D, KB, VB, NT, 4>(a, stream);
}

#define TQ_INSTANTIATE_DECODE(D, KB)                                                                           \
    template cudaError_t launchDecodeSplit<D, KB, 2, 1>(DecodeArgs const&, int, cudaStream_t);                 \
    template cudaError_t launchDecodeSplit<D, KB, 3, 1>(DecodeArgs const&, int, cudaStream_t);                 \
    template cudaError_t launchDecodeSplit<D, KB, 4, 1>(DecodeArgs const&, int, cudaStream_t);                 \
    template cudaError_t launchDecodeSplit<D, KB, 8, 1>(DecodeArgs const&, int, cudaStream_t);                 \
    template cudaError_t launchDecodeSplit<D, KB, 2, 2>(DecodeArgs const&, int, cudaStream_t);                 \
    template cudaError_t launchDecodeSplit<D, KB, 3, 2>(DecodeArgs const&, int, cudaStream_t);                 \
    template cudaError_t launchDecodeSplit<D, KB, 4, 2>(DecodeArgs const&, int, cudaStream_t);                 \
    template cudaError_t launchDecodeSplit<D, KB, 8, 2>(DecodeArgs const&, int, cudaStream_t);

#define TQ_EXTERN_DECODE(D, KB)                                                                                \
    extern template cudaError_t launchDecodeSplit<D, KB, 2, 1>(DecodeArgs const&, int, cudaStream_t);          \
    extern template cudaError_t launchDecodeSplit<D, KB, 3, 1>(DecodeArgs const&, int, cudaStream_t);          \
    extern template cudaError_t launchDecodeSplit<D, KB, 4, 1>(DecodeArgs const&, int, cudaStream_t);          \
    extern template cudaError_t launchDecodeSplit<D, KB, 8, 1>(DecodeArgs const&, int, cudaStream_t);          \
    extern template cudaError_t launchDecodeSplit<D, KB, 2, 2>(DecodeArgs const&, int, cudaStream_t);          \
    extern template cudaError_t launchDecodeSplit<D, KB, 3, 2>(DecodeArgs const&, int, cudaStream_t);          \
    extern template cudaError_t launchDecodeSplit<D, KB, 4, 2>(DecodeArgs const&, int, cudaStream_t);          \
    extern template cudaError_t launchDecodeSplit<D, KB, 8, 2>(DecodeArgs const&, int, cudaStream_t);

} // namespace detail
} // namespace turboquant
