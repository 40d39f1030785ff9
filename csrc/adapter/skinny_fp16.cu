// The skinny adapter GEMM (shrink, grad_z) for __half: one element type per file, so ninja compiles them in parallel.
#include "adapter/skinny_gemm.cuh"

namespace fastpeft {
namespace adapter {
template cudaError_t launch_skinny_gemm_typed<__half>(const SkinnyParams&, cudaStream_t);
}  // namespace adapter
}  // namespace fastpeft
