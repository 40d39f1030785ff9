// Element types the kernels support and their conversion to the type arithmetic is done in.
// Half types compute in float32, float32 in float32, float64 in float64. No torch headers here.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace fastpeft {

template <typename T>
struct ComputeType {
  using type = float;
};
template <>
struct ComputeType<double> {
  using type = double;
};
template <typename T>
using compute_t = typename ComputeType<T>::type;

__device__ __forceinline__ float to_compute(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_compute(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_compute(float v) { return v; }
__device__ __forceinline__ double to_compute(double v) { return v; }

template <typename T>
__device__ __forceinline__ T from_compute(compute_t<T> v);
template <>
__device__ __forceinline__ __half from_compute<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_compute<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ float from_compute<float>(float v) { return v; }
template <>
__device__ __forceinline__ double from_compute<double>(double v) { return v; }

}  // namespace fastpeft
