// The adapter's output epilogue: out = residual + s * (up + bias).
//
// This is the last step of y = h + s * (act(x W_down^T + b_down) W_up^T + b_up) when the up-projection `up` comes
// from a separate matrix product. Plain struct, no torch types: adapter_binding.cpp fills it.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "common/dtype.h"

namespace fastpeft {

struct EpilogueParams {
  DType dtype;                   // element type of residual, up, bias and out
  int64_t rows = 0;              // N (tokens)
  int64_t cols = 0;              // d_out
  const void* residual = nullptr;  // [rows, cols], row stride `residual_row_stride` elements, unit column stride
  int64_t residual_row_stride = 0;
  const void* up = nullptr;      // [rows, cols], row stride `up_row_stride` elements, unit column stride
  int64_t up_row_stride = 0;
  const void* bias = nullptr;    // [cols] or nullptr
  void* out = nullptr;           // [rows, cols], contiguous
  // The scale s: a device pointer to one value of the compute type (float32, or float64 for float64 data) when
  // it is a tensor (a learned scale; read on the device, so no host synchronisation), else `scale`.
  const void* scale_ptr = nullptr;
  double scale = 1.0;
};

// Launches on `stream`; returns the launch status (cudaSuccess or the launch error).
cudaError_t launch_adapter_epilogue(const EpilogueParams& params, cudaStream_t stream);

}  // namespace fastpeft
