// Elementwise kernels of the CUDA graph (`Kernels::Cuda`, src/elementwise.rs):
// `silu`, which with 1.702 folded into the weights around it is QuickGELU,
// over the MLP's widest activations (4x the model width), the pixels'
// unfolding into rows of patches for the patch embedding's GEMM, and the
// text tower's first rows, token embedding plus position, in one pass.
//
// Why our own: candle's bf16 `silu` reads 16 bytes a thread but launches a
// thread per value, so seven threads in eight only check a bound and leave
// (a 256 x 50 x 3072 activation: 38,400 blocks of 1,024 threads for 4.9 M
// busy ones), and its f16 one reads a value a thread; on the first H200 run
// it moved about 1.6 TB/s of the chip's 4.8. Here a thread takes 16 bytes
// and the grid is as large as the work: the same arithmetic, `x / (1 +
// exp(-x))` in f32, rounded once.

#include <stdint.h>

#include "convert.cuh"

namespace {

using mmembed::load;
using mmembed::store;

__device__ __forceinline__ float silu(float x) { return x / (1.f + expf(-x)); }

// y = silu(x) over `n` values. The first `n / V` groups of V values (16
// bytes) go by vector loads and stores, the rest one by one; both
// pointers are 16-byte aligned (src/elementwise.rs checks).
template <typename T>
__device__ void silu_all(const T* __restrict__ x, T* __restrict__ y, int64_t n) {
    constexpr int V = 16 / sizeof(T);
    const int64_t groups = n / V;
    const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
    const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    for (int64_t i = first; i < groups; i += stride) {
        uint4 u = reinterpret_cast<const uint4*>(x)[i];
        T* v = reinterpret_cast<T*>(&u);
#pragma unroll
        for (int k = 0; k < V; ++k) v[k] = store<T>(silu(load(v[k])));
        reinterpret_cast<uint4*>(y)[i] = u;
    }
    for (int64_t i = groups * V + first; i < n; i += stride) y[i] = store<T>(silu(load(x[i])));
}

// Pixels `x [images, c, h, w]` to rows of patches `y [images · gh · gw, c ·
// p · p]` (gh = h / p, gw = w / p; a row's values in (channel, row, column)
// order, as the patch weight's): a permute, since patches do not overlap.
// candle does it as a strided copy that divides a 64-bit index by each of
// six dimensions per value. Here a thread moves 16 bytes (V values of one
// patch row, contiguous in both layouts: p and w are multiples of V and
// both pointers 16-byte aligned, which src/elementwise.rs checks).
template <typename T>
__device__ void unfold_all(const T* __restrict__ x, T* __restrict__ y, int64_t groups, int c,
                           int h, int w, int p) {
    constexpr int V = 16 / sizeof(T);
    const int gh = h / p, gw = w / p, per_row = p / V;
    const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
    for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < groups;
         g += stride) {
        // g = ((((image · gh + gy) · gw + gx) · c + ch) · p + py) · per_row + px.
        int64_t rest = g;
        const int px = static_cast<int>(rest % per_row);
        rest /= per_row;
        const int py = static_cast<int>(rest % p);
        rest /= p;
        const int ch = static_cast<int>(rest % c);
        rest /= c;
        const int gx = static_cast<int>(rest % gw);
        rest /= gw;
        const int gy = static_cast<int>(rest % gh);
        const int64_t image = rest / gh;
        const int64_t from =
            ((image * c + ch) * h + static_cast<int64_t>(gy) * p + py) * w + gx * p + px * V;
        reinterpret_cast<uint4*>(y)[g] = *reinterpret_cast<const uint4*>(x + from);
    }
}

// The text tower's input rows: y[r] = table[ids[r]] + pos[r % t], `rows`
// rows of `d` values (d a multiple of V; all pointers 16-byte aligned), in
// f32 and rounded once. candle does it as a gather and a broadcast add,
// two passes, the second its strided kernel. An id past the table (which
// the tokenizer never gives) reads nothing: its row is the position alone.
template <typename T>
__device__ void token_rows_all(const uint32_t* __restrict__ ids, const T* __restrict__ table,
                               const T* __restrict__ pos, T* __restrict__ y, int64_t rows, int t,
                               int d, int64_t vocab) {
    constexpr int V = 16 / sizeof(T);
    const int per_row = d / V;
    const int64_t groups = rows * per_row;
    const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
    for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < groups;
         g += stride) {
        const int64_t r = g / per_row;
        const int k = static_cast<int>(g % per_row) * V;
        const uint32_t id = ids[r];
        uint4 a = make_uint4(0, 0, 0, 0);
        if (id < vocab) a = *reinterpret_cast<const uint4*>(table + static_cast<int64_t>(id) * d + k);
        const uint4 b = *reinterpret_cast<const uint4*>(pos + (r % t) * d + k);
        uint4 out;
        const T* av = reinterpret_cast<const T*>(&a);
        const T* bv = reinterpret_cast<const T*>(&b);
        T* ov = reinterpret_cast<T*>(&out);
#pragma unroll
        for (int i = 0; i < V; ++i) ov[i] = store<T>(load(av[i]) + load(bv[i]));
        reinterpret_cast<uint4*>(y)[g] = out;
    }
}

}  // namespace

#define TOKEN_ROWS_KERNEL(T, NAME)                                                           \
    extern "C" __global__ void token_rows_##NAME(const uint32_t* ids, const T* table,       \
                                                 const T* pos, T* y, int64_t rows, int t,    \
                                                 int d, int64_t vocab) {                     \
        token_rows_all<T>(ids, table, pos, y, rows, t, d, vocab);                            \
    }

TOKEN_ROWS_KERNEL(float, f32)
TOKEN_ROWS_KERNEL(__half, f16)
TOKEN_ROWS_KERNEL(__nv_bfloat16, bf16)

#define UNFOLD_KERNEL(T, NAME)                                                                   \
    extern "C" __global__ void unfold_##NAME(const T* x, T* y, int64_t groups, int c, int h,   \
                                             int w, int p) {                                   \
        unfold_all<T>(x, y, groups, c, h, w, p);                                               \
    }

UNFOLD_KERNEL(float, f32)
UNFOLD_KERNEL(__half, f16)
UNFOLD_KERNEL(__nv_bfloat16, bf16)

#define SILU_KERNEL(T, NAME) \
    extern "C" __global__ void silu_##NAME(const T* x, T* y, int64_t n) { silu_all<T>(x, y, n); }

SILU_KERNEL(float, f32)
SILU_KERNEL(__half, f16)
SILU_KERNEL(__nv_bfloat16, bf16)
