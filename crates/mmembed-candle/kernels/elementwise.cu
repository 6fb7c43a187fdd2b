// Elementwise kernels of the CUDA graph (`Kernels::Cuda`, src/elementwise.rs):
// `silu`, which with 1.702 folded into the weights around it is QuickGELU,
// over the MLP's widest activations (4x the model width).
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

}  // namespace

#define SILU_KERNEL(T, NAME) \
    extern "C" __global__ void silu_##NAME(const T* x, T* y, int64_t n) { silu_all<T>(x, y, n); }

SILU_KERNEL(float, f32)
SILU_KERNEL(__half, f16)
SILU_KERNEL(__nv_bfloat16, bf16)
