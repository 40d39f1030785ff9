// Whether this binary holds code that can run on a given GPU (a cubin for its architecture, or PTX the driver can
// compile for it). Plain C++: module.cpp includes it without CUDA headers.
#pragma once

namespace fastpeft {

struct ImageProbe {
  int error;           // cudaError_t: 0 (cudaSuccess) when the GPU can run this binary's kernels
  const char* error_name;    // like "cudaErrorNoKernelImageForDevice"; "cudaSuccess" when error is 0
  const char* error_string;  // CUDA's description of the error
  int binary_version;  // architecture of the code the driver chose, like 90 for sm_90 (0 on error)
  int ptx_version;     // PTX version it was compiled from (0 on error)
};

// Asks the CUDA runtime (cudaFuncGetAttributes on a kernel compiled with the same flags as every other kernel)
// for `device`. Restores the current device and clears the error it may leave. Never throws.
ImageProbe probe_kernel_image(int device);

}  // namespace fastpeft
