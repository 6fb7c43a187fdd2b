// What the kernels share: values loaded as f32 from each storage type,
// and f32 results stored in it rounded once, to nearest even (as candle's
// casts and the `half` crate on the host round).

#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace mmembed {

__device__ __forceinline__ float load(float x) { return x; }
__device__ __forceinline__ float load(__half x) { return __half2float(x); }
__device__ __forceinline__ float load(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T store(float x);
template <> __device__ __forceinline__ float store<float>(float x) { return x; }
template <> __device__ __forceinline__ __half store<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 store<__nv_bfloat16>(float x) {
    return __float2bfloat16_rn(x);
}

}  // namespace mmembed
