// The skinny adapter GEMM (shrink, grad_z) for float: one element type per file, so ninja compiles them in parallel.
#include "adapter/skinny_gemm.cuh"

namespace fastpeft {
namespace adapter {
template cudaError_t launch_skinny_gemm_typed<float>(const SkinnyParams&, cudaStream_t);
}  // namespace adapter
}  // namespace fastpeft
