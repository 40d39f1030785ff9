// The probe behind fastpeft._C.kernel_image(device): compiled with the same -gencode flags as every kernel, so the
// driver has an image for this empty kernel exactly when it has one for all of them.
#include <cuda_runtime.h>

#include "bindings/image_probe.h"

namespace fastpeft {
namespace {

__global__ void image_probe_kernel() {}

}  // namespace

ImageProbe probe_kernel_image(int device) {
  ImageProbe probe{};
  int previous = -1;
  cudaError_t error = cudaGetDevice(&previous);
  if (error == cudaSuccess) error = cudaSetDevice(device);
  cudaFuncAttributes attributes{};
  if (error == cudaSuccess) error = cudaFuncGetAttributes(&attributes, image_probe_kernel);
  if (previous >= 0 && previous != device) cudaSetDevice(previous);
  cudaGetLastError();  // leave no error behind for the next CUDA call (these errors are not sticky)
  probe.error = static_cast<int>(error);
  probe.error_name = cudaGetErrorName(error);
  probe.error_string = cudaGetErrorString(error);
  if (error == cudaSuccess) {
    probe.binary_version = attributes.binaryVersion;
    probe.ptx_version = attributes.ptxVersion;
  }
  return probe;
}

}  // namespace fastpeft
