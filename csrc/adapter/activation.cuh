// The adapter's nonlinearities and their derivatives, in float32, on the device.
//
// These follow fastpeft/reference.py (the specification) and PyTorch's own CUDA kernels: the forward formulas are
// those of torch.relu, F.gelu (erf and tanh forms), F.silu and torch.tanh; the derivatives are those of
// `reference.activation_derivative`. Accurate libm functions (erff, tanhf, expf), never the fast intrinsics.
#pragma once

#include <cuda_runtime.h>

#include "adapter/gemm_params.h"

namespace fastpeft {
namespace adapter {

constexpr float kInvSqrt2 = 0.70710678118654752440f;
constexpr float kInvSqrt2Pi = 0.39894228040143267794f;
constexpr float kSqrt2OverPi = 0.79788456080286535588f;
constexpr float kGeluTanhCubic = 0.044715f;

// act(z). The activation is the same for the whole launch, so the switch never diverges inside a warp.
__device__ __forceinline__ float activate(float z, Activation activation) {
  switch (activation) {
    case Activation::kIdentity:
      return z;
    case Activation::kRelu:
      return z > 0.f ? z : (z != z ? z : 0.f);  // NaN propagates, as in torch.relu
    case Activation::kGelu:
      return 0.5f * z * (1.f + erff(z * kInvSqrt2));
    case Activation::kGeluTanh:
      return 0.5f * z * (1.f + tanhf(kSqrt2OverPi * (z + kGeluTanhCubic * z * z * z)));
    case Activation::kSilu:
      return z / (1.f + expf(-z));
    case Activation::kTanh:
      return tanhf(z);
  }
  return z;
}

// d act(z) / dz.
__device__ __forceinline__ float activation_derivative(float z, Activation activation) {
  switch (activation) {
    case Activation::kIdentity:
      return 1.f;
    case Activation::kRelu:
      return z > 0.f ? 1.f : 0.f;
    case Activation::kGelu: {
      const float cdf = 0.5f * (1.f + erff(z * kInvSqrt2));
      const float pdf = expf(-0.5f * z * z) * kInvSqrt2Pi;
      return cdf + z * pdf;
    }
    case Activation::kGeluTanh: {
      const float t = tanhf(kSqrt2OverPi * (z + kGeluTanhCubic * z * z * z));
      return 0.5f * (1.f + t) +
             0.5f * z * (1.f - t * t) * kSqrt2OverPi * (1.f + 3.f * kGeluTanhCubic * z * z);
    }
    case Activation::kSilu: {
      const float sig = 1.f / (1.f + expf(-z));
      return sig * (1.f + z * (1.f - sig));
    }
    case Activation::kTanh: {
      const float t = tanhf(z);
      return 1.f - t * t;
    }
  }
  return 1.f;
}

}  // namespace adapter
}  // namespace fastpeft
