// Instantiates the fused prefix forward kernel for head-dim bucket 64 (bf16 and fp16). One bucket per file, so the
// build compiles them in parallel.
#include "prefix/prefix_fwd_kernel.cuh"

namespace fastpeft {

template cudaError_t run_prefix_forward<__nv_bfloat16, 64>(const PrefixFwdParams&, cudaStream_t);
template cudaError_t run_prefix_forward<__half, 64>(const PrefixFwdParams&, cudaStream_t);

}  // namespace fastpeft
