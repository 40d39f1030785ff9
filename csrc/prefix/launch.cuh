// One kernel launch of the prefix kernels (CUDA builds only; the CPU emulation tests launch through their shim).
#pragma once

#include <cuda_runtime.h>

namespace fastpeft {
namespace prefix {

// kernel<<<grid, threads, smem, stream>>>(params), raising the kernel's dynamic shared-memory limit first when it
// needs more than the default 48 KB. Returns the launch status.
template <typename Kernel, typename Params>
cudaError_t launch_kernel(Kernel kernel, const Params& params, dim3 grid, int threads, int smem, cudaStream_t stream) {
  if (smem > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (err != cudaSuccess) return err;
  }
  kernel<<<grid, threads, smem, stream>>>(params);
  return cudaGetLastError();
}

}  // namespace prefix
}  // namespace fastpeft
