// Torch-facing side of the adapter kernels: argument checks, filling the params structs, launching on the current
// stream. Registered as torch.ops.fastpeft_cuda.*; fastpeft/ops/adapter.py decides when to call them.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "adapter/epilogue.h"
#include "bindings/torch_utils.h"

namespace fastpeft {
namespace {

constexpr const char* kEpilogueOp = "fastpeft_cuda::adapter_epilogue";

// out = residual + s * (up + bias); residual and up [N, d_out], bias [d_out] or None, s a tensor or a float.
at::Tensor adapter_epilogue(const at::Tensor& residual, const at::Tensor& up, const std::optional<at::Tensor>& bias,
                            const std::optional<at::Tensor>& scale_tensor, double scale) {
  TORCH_CHECK(residual.is_cuda(), kEpilogueOp, ": 'residual' must be a CUDA tensor, got ", residual.device());
  TORCH_CHECK(residual.dim() == 2, kEpilogueOp, ": 'residual' must be 2-D [N, d_out], got ", residual.sizes());
  TORCH_CHECK(up.sizes() == residual.sizes(), kEpilogueOp, ": 'up' must have the shape of 'residual' ",
              residual.sizes(), ", got ", up.sizes());
  TORCH_CHECK(up.scalar_type() == residual.scalar_type() && up.device() == residual.device(), kEpilogueOp,
              ": 'up' must match 'residual' (", residual.scalar_type(), " on ", residual.device(), "), got ",
              up.scalar_type(), " on ", up.device());
  const DType dtype = dtype_of(residual, kEpilogueOp, "residual");
  const int64_t cols = residual.size(1);
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == cols, kEpilogueOp, ": 'bias' must be [", cols, "], got ",
                bias->sizes());
    TORCH_CHECK(bias->scalar_type() == residual.scalar_type() && bias->device() == residual.device(), kEpilogueOp,
                ": 'bias' must match 'residual' (", residual.scalar_type(), " on ", residual.device(), ")");
  }
  if (scale_tensor.has_value()) {
    TORCH_CHECK(scale_tensor->numel() == 1 && scale_tensor->device() == residual.device(), kEpilogueOp,
                ": 'scale_tensor' must hold one value on ", residual.device(), ", got shape ", scale_tensor->sizes(),
                " on ", scale_tensor->device());
  }

  c10::cuda::CUDAGuard guard(residual.device());
  // The kernel needs unit column stride; any row stride is fine.
  const at::Tensor res = residual.stride(1) == 1 ? residual : residual.contiguous();
  const at::Tensor upc = up.stride(1) == 1 ? up : up.contiguous();
  const at::Tensor biasc = bias.has_value() ? bias->contiguous() : at::Tensor();
  const at::Tensor scalec =
      scale_tensor.has_value() ? scale_tensor->to(compute_dtype_of(residual)).contiguous() : at::Tensor();
  at::Tensor out = at::empty({residual.size(0), cols}, residual.options());

  EpilogueParams p;
  p.dtype = dtype;
  p.rows = residual.size(0);
  p.cols = cols;
  p.residual = res.data_ptr();
  p.residual_row_stride = res.stride(0);
  p.up = upc.data_ptr();
  p.up_row_stride = upc.stride(0);
  p.bias = biasc.defined() ? biasc.data_ptr() : nullptr;
  p.out = out.data_ptr();
  p.scale_ptr = scalec.defined() ? scalec.data_ptr() : nullptr;
  p.scale = scale;
  check_cuda_launch(launch_adapter_epilogue(p, at::cuda::getCurrentCUDAStream()), kEpilogueOp);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastpeft_cuda, m) {
  m.def("adapter_epilogue(Tensor residual, Tensor up, Tensor? bias, Tensor? scale_tensor, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastpeft_cuda, CUDA, m) { m.impl("adapter_epilogue", &adapter_epilogue); }

}  // namespace fastpeft
