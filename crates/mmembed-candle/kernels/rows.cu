// Row-wise kernels of the CUDA graph (`Kernels::Cuda`, src/rows.rs): the
// attention softmax with the additive mask folded in, and layer norm.
//
// Why our own: candle's kernels for these run one row per 32-thread block
// (so at most half of an SM's threads are resident on Hopper, 32 blocks of
// 32), and its bf16/f16 softmax takes the exponentials in the storage
// type, stores them, and reads them back to scale: five passes over the
// scores where two do. Here one warp holds a row in registers (`N` values
// per lane, rows of up to 32·N), eight rows per block: read once, reduce
// with shuffles, write once, everything in f32 and rounded once.
//
// Layout: `rows` contiguous rows of `cols` values. The mask, when there is
// one, is `mask_rows` rows that repeat down `x` (row `r` takes mask row
// `r % mask_rows`): the scores `[heads, b, t, t]` take one `[b, t, t]` mask
// under every head without copying it.

#include <stdint.h>

#include "convert.cuh"

namespace {

using mmembed::load;
using mmembed::store;

constexpr int kWarp = 32;

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = kWarp / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// The row this warp owns, or -1 past the end (the whole warp leaves
// together, so the shuffles below always see all 32 lanes).
__device__ __forceinline__ int64_t warp_row(int64_t rows) {
    const int64_t row =
        static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarp) + threadIdx.x / kWarp;
    return row < rows ? row : -1;
}

// y = softmax(x + mask) over each row. A row whose every value is -inf
// gives NaN, as the unfused ops do.
template <typename T, int N, bool MASKED>
__device__ void softmax_rows(const T* __restrict__ x, const T* __restrict__ mask,
                             T* __restrict__ y, int64_t rows, int cols, int64_t mask_rows) {
    const int64_t row = warp_row(rows);
    if (row < 0) return;
    const int lane = threadIdx.x % kWarp;
    const T* xr = x + row * cols;
    const T* mr = MASKED ? mask + (row % mask_rows) * cols : nullptr;
    float v[N];
    float m = -INFINITY;
#pragma unroll
    for (int i = 0; i < N; ++i) {
        const int c = lane + i * kWarp;
        float e = -INFINITY;
        if (c < cols) {
            e = load(xr[c]);
            if (MASKED) e += load(mr[c]);
        }
        v[i] = e;
        m = fmaxf(m, e);
    }
    m = warp_max(m);
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < N; ++i) {
        const int c = lane + i * kWarp;
        // Columns past the row are -inf: exp gives 0, but skip them anyway.
        v[i] = c < cols ? expf(v[i] - m) : 0.f;
        s += v[i];
    }
    const float inv = 1.f / warp_sum(s);
    T* yr = y + row * cols;
#pragma unroll
    for (int i = 0; i < N; ++i) {
        const int c = lane + i * kWarp;
        if (c < cols) yr[c] = store<T>(v[i] * inv);
    }
}

// y = (x - mean) / sqrt(var + eps) * w + b over each row, the variance
// from the centred values (two passes over registers, not E[x²] - mean²).
template <typename T, int N>
__device__ void layer_norm_rows(const T* __restrict__ x, const T* __restrict__ w,
                                const T* __restrict__ b, T* __restrict__ y, int64_t rows,
                                int cols, float eps) {
    const int64_t row = warp_row(rows);
    if (row < 0) return;
    const int lane = threadIdx.x % kWarp;
    const T* xr = x + row * cols;
    float v[N];
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < N; ++i) {
        const int c = lane + i * kWarp;
        v[i] = c < cols ? load(xr[c]) : 0.f;
        s += v[i];
    }
    const float mean = warp_sum(s) / cols;
    float q = 0.f;
#pragma unroll
    for (int i = 0; i < N; ++i) {
        const int c = lane + i * kWarp;
        const float d = c < cols ? v[i] - mean : 0.f;
        q += d * d;
    }
    const float inv = rsqrtf(warp_sum(q) / cols + eps);
    T* yr = y + row * cols;
#pragma unroll
    for (int i = 0; i < N; ++i) {
        const int c = lane + i * kWarp;
        if (c < cols) yr[c] = store<T>((v[i] - mean) * inv * load(w[c]) + load(b[c]));
    }
}

}  // namespace

// Entry points `softmax_<dtype>_<N>`, `softmax_masked_<dtype>_<N>` and
// `layer_norm_<dtype>_<N>`, for rows of up to 32·N values; src/rows.rs
// picks the smallest N that holds a row (ROW_WIDTHS there lists them).
#define ROWS_KERNELS(T, NAME, N)                                                          \
    extern "C" __global__ void softmax_##NAME##_##N(const T* x, T* y, int64_t rows,       \
                                                     int cols) {                          \
        softmax_rows<T, N, false>(x, nullptr, y, rows, cols, 1);                          \
    }                                                                                     \
    extern "C" __global__ void softmax_masked_##NAME##_##N(                               \
        const T* x, const T* mask, T* y, int64_t rows, int cols, int64_t mask_rows) {     \
        softmax_rows<T, N, true>(x, mask, y, rows, cols, mask_rows);                      \
    }                                                                                     \
    extern "C" __global__ void layer_norm_##NAME##_##N(const T* x, const T* w, const T* b, \
                                                        T* y, int64_t rows, int cols,     \
                                                        float eps) {                      \
        layer_norm_rows<T, N>(x, w, b, y, rows, cols, eps);                               \
    }

#define ROWS_WIDTHS(T, NAME)  \
    ROWS_KERNELS(T, NAME, 1)  \
    ROWS_KERNELS(T, NAME, 2)  \
    ROWS_KERNELS(T, NAME, 4)  \
    ROWS_KERNELS(T, NAME, 8)  \
    ROWS_KERNELS(T, NAME, 16) \
    ROWS_KERNELS(T, NAME, 24) \
    ROWS_KERNELS(T, NAME, 32)

ROWS_WIDTHS(float, f32)
ROWS_WIDTHS(__half, f16)
ROWS_WIDTHS(__nv_bfloat16, bf16)
