// Instantiates the fused prefix forward kernel for head-dim bucket 256 (bf16 and fp16). One bucket per file, so the
// build compiles them in parallel.
#include "prefix/prefix_fwd_kernel.cuh"

namespace fastpeft {

template cudaError_t run_prefix_forward<__nv_bfloat16, 256>(const PrefixFwdParams&, cudaStream_t);
template cudaError_t run_prefix_forward<__half, 256>(const PrefixFwdParams&, cudaStream_t);

}  // namespace fastpeft
