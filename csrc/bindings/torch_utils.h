// Helpers shared by the binding files: the only files that include torch headers.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include "common/dtype.h"

namespace fastpeft {

inline DType dtype_of(const at::Tensor& t, const char* op, const char* name) {
  switch (t.scalar_type()) {
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    case at::kFloat:
      return DType::kFloat32;
    case at::kDouble:
      return DType::kFloat64;
    default:
      TORCH_CHECK(false, op, ": '", name, "' must be float16, bfloat16, float32 or float64, got ", t.scalar_type());
  }
}

inline void check_cuda_launch(cudaError_t status, const char* op) {
  TORCH_CHECK(status == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(status));
}

}  // namespace fastpeft
