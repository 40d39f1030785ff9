// out = residual + s * (up + bias), vectorised to 16-byte accesses when the layout allows.
#include <algorithm>
#include <cstdint>

#include "adapter/epilogue.h"
#include "common/numeric.cuh"

namespace fastpeft {
namespace {

constexpr int kThreads = 256;

// VEC consecutive elements of one row, loaded and stored as one 16-byte access when VEC * sizeof(T) == 16.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Packet {
  T v[VEC];
};

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) adapter_epilogue_kernel(const EpilogueParams p) {
  using C = compute_t<T>;
  const C s = p.scale_ptr != nullptr ? *static_cast<const C*>(p.scale_ptr) : static_cast<C>(p.scale);
  const T* residual = static_cast<const T*>(p.residual);
  const T* up = static_cast<const T*>(p.up);
  const T* bias = static_cast<const T*>(p.bias);
  T* out = static_cast<T*>(p.out);

  const int64_t packets_per_row = p.cols / VEC;
  const int64_t total = p.rows * packets_per_row;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = i / packets_per_row;
    const int64_t col = (i - row * packets_per_row) * VEC;
    const auto r = *reinterpret_cast<const Packet<T, VEC>*>(residual + row * p.residual_row_stride + col);
    const auto u = *reinterpret_cast<const Packet<T, VEC>*>(up + row * p.up_row_stride + col);
    Packet<T, VEC> b;
    if (bias != nullptr) b = *reinterpret_cast<const Packet<T, VEC>*>(bias + col);
    Packet<T, VEC> y;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      C delta = to_compute(u.v[j]);
      if (bias != nullptr) delta += to_compute(b.v[j]);
      y.v[j] = from_compute<T>(to_compute(r.v[j]) + s * delta);
    }
    *reinterpret_cast<Packet<T, VEC>*>(out + row * p.cols + col) = y;
  }
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

template <typename T>
cudaError_t launch_typed(const EpilogueParams& p, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const bool vectorisable = p.cols % kVec == 0 && p.residual_row_stride % kVec == 0 && p.up_row_stride % kVec == 0 &&
                            aligned16(p.residual) && aligned16(p.up) && aligned16(p.out) &&
                            (p.bias == nullptr || aligned16(p.bias));
  const int vec = vectorisable ? kVec : 1;
  const int64_t work = p.rows * (p.cols / vec);

  int device = 0, sms = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  // Enough blocks to fill every SM several times over; the grid-stride loop covers the rest.
  const int64_t max_blocks = int64_t(sms) * 8;
  const int64_t blocks = std::min<int64_t>((work + kThreads - 1) / kThreads, max_blocks);

  if (vectorisable) {
    adapter_epilogue_kernel<T, kVec><<<blocks, kThreads, 0, stream>>>(p);
  } else {
    adapter_epilogue_kernel<T, 1><<<blocks, kThreads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_adapter_epilogue(const EpilogueParams& p, cudaStream_t stream) {
  if (p.rows == 0 || p.cols == 0) return cudaSuccess;  // nothing to do; an empty grid is not a valid launch
  switch (p.dtype) {
    case DType::kFloat16:
      return launch_typed<__half>(p, stream);
    case DType::kBFloat16:
      return launch_typed<__nv_bfloat16>(p, stream);
    case DType::kFloat32:
      return launch_typed<float>(p, stream);
    case DType::kFloat64:
      return launch_typed<double>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace fastpeft
