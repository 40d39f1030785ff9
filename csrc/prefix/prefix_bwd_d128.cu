// Instantiates the prefix backward kernels (dP, dq, reduce) for head-dim bucket 128 (bf16 and fp16). One bucket
// per file, so the build compiles them in parallel.
#include "prefix/prefix_bwd_kernel.cuh"

namespace fastpeft {

template cudaError_t run_prefix_backward<__nv_bfloat16, 128>(const PrefixBwdParams&, cudaStream_t);
template cudaError_t run_prefix_backward<__half, 128>(const PrefixBwdParams&, cudaStream_t);

}  // namespace fastpeft
