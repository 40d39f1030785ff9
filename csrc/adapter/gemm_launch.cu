// Element-type dispatch of the adapter GEMM launchers (the typed launchers live in skinny_*.cu and wide_*.cu).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "adapter/gemm_params.h"

namespace fastpeft {
namespace adapter {

cudaError_t launch_skinny_gemm(const SkinnyParams& p, cudaStream_t stream) {
  switch (p.dtype) {
    case DType::kFloat16:
      return launch_skinny_gemm_typed<__half>(p, stream);
    case DType::kBFloat16:
      return launch_skinny_gemm_typed<__nv_bfloat16>(p, stream);
    case DType::kFloat32:
      return launch_skinny_gemm_typed<float>(p, stream);
    case DType::kFloat64:
      break;  // not a kernel dtype: float64 runs the reference path
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_wide_gemm(const WideParams& p, cudaStream_t stream) {
  switch (p.dtype) {
    case DType::kFloat16:
      return launch_wide_gemm_typed<__half>(p, stream);
    case DType::kBFloat16:
      return launch_wide_gemm_typed<__nv_bfloat16>(p, stream);
    case DType::kFloat32:
      return launch_wide_gemm_typed<float>(p, stream);
    case DType::kFloat64:
      break;  // not a kernel dtype: float64 runs the reference path
  }
  return cudaErrorInvalidValue;
}

}  // namespace adapter
}  // namespace fastpeft
