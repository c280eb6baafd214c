// Small device helpers shared by the TurboQuant kernels (internal header).
#pragma once

#include "turboquant/format.h"
#include "turboquant/kernels.h"
#include "turboquant/scale8.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace turboquant
{
namespace detail
{

constexpr float kLog2e = 1.4426950408889634f;

// Workspace arrays start at multiples of 256 bytes.
inline size_t alignWs(size_t n)
{
    return (n + 255) / 256 * 256;
}

// Whether the write path may load 4 channels (d = 128) or 2 (d = 64) of a new row and its tables at
// once: every pointer 8-byte aligned (or null), the token strides multiples of 4 elements.
inline bool writeLoadsVectorizable(void const* k, void const* v, int64_t kStride, int64_t vStride, LayerTablesView const& t)
{
    auto aligned8 = [](void const* q) { return q == nullptr || (reinterpret_cast<uintptr_t>(q) & 7u) == 0; };
    return aligned8(k) && aligned8(v) && kStride % 4 == 0 && vStride % 4 == 0 && aligned8(t.k_mean) && aligned8(t.k_smooth)
        && aligned8(t.v_mean) && aligned8(t.v_smooth) && aligned8(t.signs);
}

// The write of an attention call's new tokens (decode's fallback, context's write_kv): the fields
// DecodeAttentionParams and ContextAttentionParams share; the caller sets cu_q_lens, max_q_len and
// exact_out.
template <class P>
inline QuantizeKvParams newTokensWrite(P const& p)
{
    QuantizeKvParams w{};
    w.layer = p.layer;
    w.kv = p.kv;
    w.tables = p.tables;
    w.k = p.k;
    w.v = p.v;
    w.k_token_stride = p.k_token_stride;
    w.v_token_stride = p.v_token_stride;
    w.seq_lens = p.seq_lens;
    w.batch = p.batch;
    w.act = p.act;
    return w;
}

// Split-K partial results and what the reduce kernels need to finish a query row:
// ws_ml[(row * Hq + hq) * splits + s] = (max in log2 units, sum), ws_o[same][d] unnormalized.
struct ReduceArgs
{
    float const* ws_o;
    float const* ws_ml;
    void* out;
    int64_t out_stride;
    uint16_t const* v_mean;
    uint16_t const* v_smooth;
    uint16_t const* signs;
    int32_t const* cu_q; // null: every row exists
    int32_t batch;
    int32_t num_q_heads;
    int32_t group;
    int32_t num_splits;
    float rsqrt_d;
    int32_t bf16;
};

// Rows of sequence b's new tokens: [begin, begin + len) of cu_q, or row b alone when cu_q is null.
__device__ __forceinline__ void seqRows(int32_t const* cu_q, int b, int& begin, int& len)
{
    if (cu_q != nullptr)
    {
        begin = cu_q[b];
        len = cu_q[b + 1] - begin;
    }
    else
    {
        begin = b;
        len = 1;
    }
}

__device__ __forceinline__ float loadAct(void const* base, int64_t idx, bool bf16)
{
    if (bf16)
    {
        return __bfloat162float(static_cast<__nv_bfloat16 const*>(base)[idx]);
    }
    return __half2float(static_cast<__half const*>(base)[idx]);
}

__device__ __forceinline__ void storeAct(void* base, int64_t idx, float x, bool bf16)
{
    if (bf16)
    {
        static_cast<__nv_bfloat16*>(base)[idx] = __float2bfloat16_rn(x);
    }
    else
    {
        static_cast<__half*>(base)[idx] = __float2half_rn(x);
    }
}

__device__ __forceinline__ float h2f(uint16_t bits)
{
    return __half2float(__ushort_as_half(bits));
}

// fp16 table value, or `dflt` when the table is absent.
__device__ __forceinline__ float tableOr(uint16_t const* t, int64_t idx, float dflt)
{
    return t != nullptr ? h2f(t[idx]) : dflt;
}

__device__ __forceinline__ uint32_t prmt(uint32_t a, uint32_t b, uint32_t sel)
{
    uint32_t r;
    asm("prmt.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(sel));
    return r;
}

__device__ __forceinline__ uint32_t packHalf2(float lo, float hi)
{
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
}

// D = A(16x16, row) * B(16x8, col) + D, fp16 inputs, fp32 accumulators.
__device__ __forceinline__ void mma16816(float (&d)[4], uint32_t const (&a)[4], uint32_t b0, uint32_t b1)
{
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// 2^x on the MUFU with results below 2^-126 flushed to zero (exp2f adds a denormal-range rescale
// around the same instruction: five more instructions per call, measured in the tile loop's SASS)
__device__ __forceinline__ float exp2Ftz(float x)
{
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// Fast Walsh-Hadamard transform of a D-vector held by one warp, PER = D/32 consecutive values per
// lane (lane holds x[PER*lane .. PER*lane + PER-1]), in the order of docs/format.md §2: stages
// len = 1, 2, ..., D/2; the lower index gets a + b, the upper a - b. Unnormalized.
template <int PER>
__device__ __forceinline__ void warpWht(float (&x)[PER], int lane)
{
#pragma unroll
    for (int len = 1; len < PER; len <<= 1)
    {
#pragma unroll
        for (int e = 0; e < PER; ++e)
        {
            if ((e & len) == 0)
            {
                float const u = x[e];
                float const v = x[e + len];
                x[e] = u + v;
                x[e + len] = u - v;
            }
        }
    }
#pragma unroll
    for (int lm = 1; lm < 32; lm <<= 1)
    {
        bool const upper = (lane & lm) != 0;
#pragma unroll
        for (int e = 0; e < PER; ++e)
        {
            float const o = __shfl_xor_sync(0xffffffffu, x[e], lm);
            x[e] = upper ? o - x[e] : x[e] + o;
        }
    }
}

// The end of an attention output row, held by one warp (lane: channels PER*lane .. PER*lane + PER-1):
// the value tables of the row's KV head (load; they come from no kernel before this one, so a
// reduce reads them before waiting), then R^-1 (shuffle butterflies), sv and mu_v on the normalized
// output, and the store (store). Args: any launch's arguments with v_smooth, v_mean, signs, out,
// out_stride, rsqrt_d and bf16 (the decode reduce's, the context kernel's).
template <int D>
struct RowOut
{
    static constexpr int PER = D / 32;
    float sv[PER], mu[PER], sg[PER];

    template <class Args>
    __device__ __forceinline__ void load(Args const& a, int head, int lane)
    {
#pragma unroll
        for (int e = 0; e < PER; ++e)
        {
            int const ch = PER * lane + e;
            int64_t const hv = static_cast<int64_t>(head) * D + ch;
            sv[e] = tableOr(a.v_smooth, hv, 1.F);
            mu[e] = tableOr(a.v_mean, hv, 0.F);
            sg[e] = h2f(a.signs[ch]);
        }
    }

    template <class Args>
    __device__ __forceinline__ void store(Args const& a, float (&x)[PER], int64_t row, int64_t hq, int lane) const
    {
        warpWht<PER>(x, lane);
#pragma unroll
        for (int e = 0; e < PER; ++e)
        {
            int const ch = PER * lane + e;
            storeAct(a.out, row * a.out_stride + hq * D + ch, sv[e] * (x[e] * a.rsqrt_d * sg[e]) + mu[e], a.bf16 != 0);
        }
    }
};

// Asks for the 128-byte line at p to be brought into L1 (no register, no wait).
__device__ __forceinline__ void prefetchL1(void const* p)
{
    asm volatile("prefetch.global.L1 [%0];" ::"l"(p));
}

#ifndef TQ_PDL
#define TQ_PDL 1 // programmatic dependent launches between the kernels of a step (sm_90+)
#endif

// Programmatic dependent launch (PDL; sm_90+ code only, the host enables it only for such code).
// launchDependents: the next kernel on the stream, when launched as a programmatic dependent, may be
// scheduled once every CTA of this grid has executed it (or exited). gridDependencyWait: returns
// once the kernel before this one on the stream is complete and its memory visible; a kernel
// launched as a programmatic dependent reads nothing that kernel may write before it. Both are
// no-ops without such a launch.
__device__ __forceinline__ void launchDependents()
{
#if TQ_PDL && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;");
#endif
}

__device__ __forceinline__ void gridDependencyWait()
{
#if TQ_PDL && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// Named barrier `id` (1..15; 0 is __syncthreads') of `threads` threads, a multiple of 32: arrive
// without waiting, or arrive and wait. The memory accesses a thread made before it arrives are
// performed, for every thread that waits at the barrier, when that wait completes.
__device__ __forceinline__ void namedBarrierArrive(int id, int threads)
{
    asm volatile("bar.arrive %0, %1;" ::"r"(id), "r"(threads) : "memory");
}

__device__ __forceinline__ void namedBarrierSync(int id, int threads)
{
    asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(threads) : "memory");
}

// 16 bytes global -> shared, asynchronously; smem is an address in the shared window
__device__ __forceinline__ void cpAsync16s(uint32_t smem, void const* gmem)
{
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem), "l"(gmem));
}

__device__ __forceinline__ void cpAsync16(void* smem, void const* gmem)
{
    cpAsync16s(static_cast<uint32_t>(__cvta_generic_to_shared(smem)), gmem);
}

__device__ __forceinline__ void cpAsyncCommit()
{
    asm volatile("cp.async.commit_group;\n" ::);
}

template <int N>
__device__ __forceinline__ void cpAsyncWait()
{
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Sum of v[0..n) in numpy's pairwise order for n <= 128 (8 running partial sums, then a fixed
// tree), so that fp32 sums match numpy.sum(..., dtype=float32) bit for bit. Larger n is split in
// halves (multiples of 8) as numpy does.
__device__ __forceinline__ float numpySum128(float const* v, int n)
{
    if (n < 8)
    {
        float r = 0.F; // numpy: res = 0.; res += a[i]
        for (int i = 0; i < n; ++i)
        {
            r = __fadd_rn(r, v[i]);
        }
        return r;
    }
    float r[8];
#pragma unroll
    for (int j = 0; j < 8; ++j)
    {
        r[j] = v[j];
    }
    int i = 8;
    for (; i < n - (n % 8); i += 8)
    {
#pragma unroll
        for (int j = 0; j < 8; ++j)
        {
            r[j] = __fadd_rn(r[j], v[i + j]);
        }
    }
    float res = __fadd_rn(__fadd_rn(__fadd_rn(r[0], r[1]), __fadd_rn(r[2], r[3])),
        __fadd_rn(__fadd_rn(r[4], r[5]), __fadd_rn(r[6], r[7])));
    for (; i < n; ++i)
    {
        res = __fadd_rn(res, v[i]);
    }
    return res;
}

__device__ __forceinline__ float numpySum(float const* v, int n)
{
    if (n <= 128)
    {
        return numpySum128(v, n);
    }
    int n2 = n / 2; // n <= 256: each half is at most 128
    n2 -= n2 % 8;
    return __fadd_rn(numpySum128(v, n2), numpySum128(v + n2, n - n2));
}

} // namespace detail
} // namespace turboquant
