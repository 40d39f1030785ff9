// The wide adapter GEMM (expand, grad_x) for __half: one element type per file, so ninja compiles them in parallel.
#include "adapter/wide_gemm.cuh"

namespace fastpeft {
namespace adapter {
template cudaError_t launch_wide_gemm_typed<__half>(const WideParams&, cudaStream_t);
}  // namespace adapter
}  // namespace fastpeft
