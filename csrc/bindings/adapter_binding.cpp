// Torch-facing side of the adapter kernels: argument checks, filling the params structs, launching on the current
// stream. Registered as torch.ops.fastpeft_cuda.*; fastpeft/ops/_adapter_cuda.py decides when to call them.
//
//   adapter_shrink(x, w_down, b_down?, activation, splits) -> (z, act(z))            forward, first product
//   adapter_expand(act, w_up, residual?, b_up?, scale_tensor?, scale) -> y           forward, second product
//   adapter_grad_z(dy, w_up, z, scale_tensor?, scale, activation, splits, want_act, want_dy_colsum)
//       -> (dz, act(z) or empty, colsum(dy) in float32 or empty)                     backward, first product
//   adapter_grad_x(dz, w_down, dy?) -> dx                                            backward, second product
//   adapter_gemm_tiles() -> [skinny BM, skinny BN, wide BM, wide BN, BK 16-bit, BK float32]
//
// The GEMM ops take float16, bfloat16 or float32 on a CUDA device; matrices with any row stride (a copy is made only
// when the last dim is not contiguous). Outputs are new contiguous tensors.
#include <climits>

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "adapter/gemm_params.h"
#include "bindings/torch_utils.h"

namespace fastpeft {
namespace {

// ------------------------------------------------------------------------------------------------ GEMM ops

namespace gemm = fastpeft::adapter;

// `t` is a CUDA tensor of `ndim` dims with the dtype and device of `like`, and a kernel dtype.
void check_operand(const char* op, const char* name, const at::Tensor& t, int64_t ndim, const at::Tensor& like) {
  TORCH_CHECK(t.is_cuda(), op, ": '", name, "' must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.dim() == ndim, op, ": '", name, "' must be ", ndim, "-D, got shape ", t.sizes());
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat, op, ": '", name,
              "' must be float16, bfloat16 or float32 (float64 runs the reference path), got ", dtype);
  TORCH_CHECK(dtype == like.scalar_type() && t.device() == like.device(), op, ": '", name, "' must match (",
              like.scalar_type(), " on ", like.device(), "), got ", dtype, " on ", t.device());
}

void check_size(const char* op, const char* name, const at::Tensor& t, int64_t dim, int64_t expected,
                const char* meaning) {
  TORCH_CHECK(t.size(dim) == expected, op, ": '", name, "' must have ", meaning, " = ", expected, " in dim ", dim,
              ", got shape ", t.sizes());
}

// The kernels read rows with any stride but need consecutive elements within a row.
at::Tensor unit_column_stride(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// A 2-D tensor with unit column stride as the kernels see it.
struct MatrixView {
  const void* ptr;
  int64_t ld;
  bool vec_ok;  // rows can be moved in 16-byte chunks
};

MatrixView matrix_view(const at::Tensor& t) {
  const int64_t chunk = 16 / t.element_size();
  const int64_t ld = t.stride(0);
  // With one row the row stride is never used (and may be anything).
  const bool ld_ok = t.size(0) <= 1 || ld % chunk == 0;
  return {t.data_ptr(), ld, aligned16(t.data_ptr()) && ld_ok};
}

gemm::Activation parse_activation(const char* op, c10::string_view name) {
  if (name == "identity") return gemm::Activation::kIdentity;
  if (name == "relu") return gemm::Activation::kRelu;
  if (name == "gelu") return gemm::Activation::kGelu;
  if (name == "gelu_tanh") return gemm::Activation::kGeluTanh;
  if (name == "silu") return gemm::Activation::kSilu;
  if (name == "tanh") return gemm::Activation::kTanh;
  TORCH_CHECK(false, op, ": 'activation' must be one of identity, relu, gelu, gelu_tanh, silu, tanh, got '", name,
              "'");
}

// The scale as a device float32 (a learned scale, read by the kernel: no host synchronisation), or undefined.
at::Tensor scale_on_device(const char* op, const std::optional<at::Tensor>& scale_tensor, const at::Tensor& like) {
  if (!scale_tensor.has_value()) return at::Tensor();
  TORCH_CHECK(scale_tensor->numel() == 1 && scale_tensor->device() == like.device(), op,
              ": 'scale_tensor' must hold one value on ", like.device(), ", got shape ", scale_tensor->sizes(), " on ",
              scale_tensor->device());
  return scale_tensor->to(at::kFloat).contiguous();
}

void check_grid(const char* op, int64_t ctas) {
  TORCH_CHECK(ctas <= INT_MAX, op, ": the problem needs ", ctas, " CTAs, more than a grid holds (", INT_MAX, ")");
}

// Sets the split of K (gemm_params.h's split_k: equal splits, none empty).
void set_split(const char* op, gemm::SkinnyParams& p, int64_t splits) {
  TORCH_CHECK(splits >= 1, op, ": 'splits' must be at least 1, got ", splits);
  const gemm::SplitK split = gemm::split_k(p.depth, p.dtype, splits);
  TORCH_CHECK(split.splits <= 65535, op, ": 'splits' gives ", split.splits, " splits, more than gridDim.y holds (65535)");
  p.splits = static_cast<int>(split.splits);
  p.steps_per_split = split.steps_per_split;
}

void launch_skinny(const char* op, gemm::SkinnyParams& p, const at::TensorOptions& options,
                   at::Tensor& partials_keepalive) {
  check_grid(op, gemm::ceil_div(p.rows, gemm::kSkinnyBlockM) * gemm::ceil_div(p.cols, gemm::kSkinnyBlockN));
  if (p.splits > 1) {
    partials_keepalive = at::empty({p.splits, p.rows, p.cols}, options.dtype(at::kFloat));
    p.partials = partials_keepalive.data_ptr<float>();
  }
  check_cuda_launch(gemm::launch_skinny_gemm(p, at::cuda::getCurrentCUDAStream()), op);
}

constexpr const char* kShrinkOp = "fastpeft_cuda::adapter_shrink";

// z = x w_down^T + b_down and act(z), both [N, r] in x's dtype.
std::tuple<at::Tensor, at::Tensor> adapter_shrink(const at::Tensor& x_in, const at::Tensor& w_down_in,
                                                  const std::optional<at::Tensor>& b_down, c10::string_view activation,
                                                  int64_t splits) {
  const char* op = kShrinkOp;
  check_operand(op, "x", x_in, 2, x_in);
  check_operand(op, "w_down", w_down_in, 2, x_in);
  const int64_t n = x_in.size(0), d_in = x_in.size(1), r = w_down_in.size(0);
  check_size(op, "w_down", w_down_in, 1, d_in, "d_in");
  TORCH_CHECK(r >= 1, op, ": 'w_down' must have at least one row (r), got shape ", w_down_in.sizes());
  if (b_down.has_value()) {
    check_operand(op, "b_down", *b_down, 1, x_in);
    check_size(op, "b_down", *b_down, 0, r, "r");
  }
  c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = unit_column_stride(x_in), w_down = unit_column_stride(w_down_in);
  const at::Tensor bias = b_down.has_value() ? b_down->contiguous() : at::Tensor();
  at::Tensor z = at::empty({n, r}, x.options());
  at::Tensor act = at::empty({n, r}, x.options());

  gemm::SkinnyParams p;
  p.dtype = dtype_of(x, op, "x");
  p.mode = gemm::SkinnyMode::kShrink;
  p.activation = parse_activation(op, activation);
  p.rows = n;
  p.cols = r;
  p.depth = d_in;
  const MatrixView xv = matrix_view(x), wv = matrix_view(w_down);
  p.a = xv.ptr, p.a_ld = xv.ld, p.a_vec_ok = xv.vec_ok;
  p.b = wv.ptr, p.b_ld = wv.ld, p.b_vec_ok = wv.vec_ok;
  p.bias = bias.defined() ? bias.data_ptr() : nullptr;
  p.out0 = z.data_ptr();
  p.out1 = act.data_ptr();
  set_split(op, p, splits);
  at::Tensor partials;
  launch_skinny(op, p, x.options(), partials);
  return {z, act};
}

constexpr const char* kGradZOp = "fastpeft_cuda::adapter_grad_z";

// dz = s * (dy w_up) * act'(z) [N, r]; act(z) [N, r] when want_act; colsum(dy) [d_out] float32 when want_dy_colsum.
std::tuple<at::Tensor, at::Tensor, at::Tensor> adapter_grad_z(
    const at::Tensor& dy_in, const at::Tensor& w_up_in, const at::Tensor& z_in,
    const std::optional<at::Tensor>& scale_tensor, double scale, c10::string_view activation, int64_t splits,
    bool want_act, bool want_dy_colsum) {
  const char* op = kGradZOp;
  check_operand(op, "dy", dy_in, 2, dy_in);
  check_operand(op, "w_up", w_up_in, 2, dy_in);
  check_operand(op, "z", z_in, 2, dy_in);
  const int64_t n = dy_in.size(0), d_out = dy_in.size(1), r = w_up_in.size(1);
  check_size(op, "w_up", w_up_in, 0, d_out, "d_out");
  check_size(op, "z", z_in, 0, n, "N");
  check_size(op, "z", z_in, 1, r, "r");
  c10::cuda::CUDAGuard guard(dy_in.device());
  const at::Tensor dy = unit_column_stride(dy_in), w_up = unit_column_stride(w_up_in), z = unit_column_stride(z_in);
  const at::Tensor s = scale_on_device(op, scale_tensor, dy);
  at::Tensor dz = at::empty({n, r}, dy.options());
  at::Tensor act = at::empty({want_act ? n : 0, want_act ? r : 0}, dy.options());
  const int64_t row_blocks = gemm::ceil_div(n, gemm::kSkinnyBlockM);
  at::Tensor colsum_partials = want_dy_colsum ? at::empty({row_blocks, d_out}, dy.options().dtype(at::kFloat))
                                              : at::Tensor();

  gemm::SkinnyParams p;
  p.dtype = dtype_of(dy, op, "dy");
  p.mode = gemm::SkinnyMode::kGradZ;
  p.activation = parse_activation(op, activation);
  p.rows = n;
  p.cols = r;
  p.depth = d_out;
  const MatrixView dyv = matrix_view(dy), wv = matrix_view(w_up), zv = matrix_view(z);
  p.a = dyv.ptr, p.a_ld = dyv.ld, p.a_vec_ok = dyv.vec_ok;
  p.b = wv.ptr, p.b_ld = wv.ld, p.b_vec_ok = wv.vec_ok;
  p.z = zv.ptr, p.z_ld = zv.ld;
  p.scale_ptr = s.defined() ? s.data_ptr<float>() : nullptr;
  p.scale = scale;
  p.out0 = dz.data_ptr();
  p.out1 = want_act ? act.data_ptr() : nullptr;
  p.a_colsum = want_dy_colsum ? colsum_partials.data_ptr<float>() : nullptr;
  set_split(op, p, splits);
  at::Tensor partials;
  launch_skinny(op, p, dy.options(), partials);
  // Row-block partial sums added in a fixed order by a deterministic reduction.
  at::Tensor dy_colsum = want_dy_colsum ? colsum_partials.sum(0) : at::empty({0}, dy.options().dtype(at::kFloat));
  return {dz, act, dy_colsum};
}

void launch_wide(const char* op, gemm::WideParams& p) {
  check_grid(op, gemm::ceil_div(p.rows, gemm::kWideBlockM) * gemm::ceil_div(p.cols, gemm::kWideBlockN));
  check_cuda_launch(gemm::launch_wide_gemm(p, at::cuda::getCurrentCUDAStream()), op);
}

constexpr const char* kExpandOp = "fastpeft_cuda::adapter_expand";

// y = residual + s * (act w_up^T + b_up), [N, d_out].
at::Tensor adapter_expand(const at::Tensor& act_in, const at::Tensor& w_up_in,
                          const std::optional<at::Tensor>& residual_in, const std::optional<at::Tensor>& b_up,
                          const std::optional<at::Tensor>& scale_tensor, double scale) {
  const char* op = kExpandOp;
  check_operand(op, "act", act_in, 2, act_in);
  check_operand(op, "w_up", w_up_in, 2, act_in);
  const int64_t n = act_in.size(0), r = act_in.size(1), d_out = w_up_in.size(0);
  check_size(op, "w_up", w_up_in, 1, r, "r");
  if (residual_in.has_value()) {
    check_operand(op, "residual", *residual_in, 2, act_in);
    check_size(op, "residual", *residual_in, 0, n, "N");
    check_size(op, "residual", *residual_in, 1, d_out, "d_out");
  }
  if (b_up.has_value()) {
    check_operand(op, "b_up", *b_up, 1, act_in);
    check_size(op, "b_up", *b_up, 0, d_out, "d_out");
  }
  c10::cuda::CUDAGuard guard(act_in.device());
  const at::Tensor act = unit_column_stride(act_in), w_up = unit_column_stride(w_up_in);
  const at::Tensor residual = residual_in.has_value() ? unit_column_stride(*residual_in) : at::Tensor();
  const at::Tensor bias = b_up.has_value() ? b_up->contiguous() : at::Tensor();
  const at::Tensor s = scale_on_device(op, scale_tensor, act);
  at::Tensor y = at::empty({n, d_out}, act.options());

  gemm::WideParams p;
  p.dtype = dtype_of(act, op, "act");
  p.rows = n;
  p.cols = d_out;
  p.depth = r;
  const MatrixView av = matrix_view(act), wv = matrix_view(w_up);
  p.a = av.ptr, p.a_ld = av.ld, p.a_vec_ok = av.vec_ok;
  p.b_n_major = true;
  p.b = wv.ptr, p.b_ld = wv.ld, p.b_vec_ok = wv.vec_ok;
  if (residual.defined()) {
    const MatrixView rv = matrix_view(residual);
    p.residual = rv.ptr, p.residual_ld = rv.ld, p.residual_vec_ok = rv.vec_ok;
  }
  if (bias.defined()) p.bias = bias.data_ptr(), p.bias_vec_ok = aligned16(bias.data_ptr());
  p.scale_ptr = s.defined() ? s.data_ptr<float>() : nullptr;
  p.scale = scale;
  p.out = y.data_ptr();
  p.out_vec_ok = matrix_view(y).vec_ok;
  launch_wide(op, p);
  return y;
}

constexpr const char* kGradXOp = "fastpeft_cuda::adapter_grad_x";

// dx = dz w_down (+ dy), [N, d_in].
at::Tensor adapter_grad_x(const at::Tensor& dz_in, const at::Tensor& w_down_in, const std::optional<at::Tensor>& dy_in) {
  const char* op = kGradXOp;
  check_operand(op, "dz", dz_in, 2, dz_in);
  check_operand(op, "w_down", w_down_in, 2, dz_in);
  const int64_t n = dz_in.size(0), r = dz_in.size(1), d_in = w_down_in.size(1);
  check_size(op, "w_down", w_down_in, 0, r, "r");
  if (dy_in.has_value()) {
    check_operand(op, "dy", *dy_in, 2, dz_in);
    check_size(op, "dy", *dy_in, 0, n, "N");
    check_size(op, "dy", *dy_in, 1, d_in, "d_in (x is h)");
  }
  c10::cuda::CUDAGuard guard(dz_in.device());
  const at::Tensor dz = unit_column_stride(dz_in), w_down = unit_column_stride(w_down_in);
  const at::Tensor dy = dy_in.has_value() ? unit_column_stride(*dy_in) : at::Tensor();
  at::Tensor dx = at::empty({n, d_in}, dz.options());

  gemm::WideParams p;
  p.dtype = dtype_of(dz, op, "dz");
  p.rows = n;
  p.cols = d_in;
  p.depth = r;
  const MatrixView av = matrix_view(dz), wv = matrix_view(w_down);
  p.a = av.ptr, p.a_ld = av.ld, p.a_vec_ok = av.vec_ok;
  p.b_n_major = false;
  p.b = wv.ptr, p.b_ld = wv.ld, p.b_vec_ok = wv.vec_ok;
  if (dy.defined()) {
    const MatrixView rv = matrix_view(dy);
    p.residual = rv.ptr, p.residual_ld = rv.ld, p.residual_vec_ok = rv.vec_ok;
  }
  p.scale = 1.0;
  p.out = dx.data_ptr();
  p.out_vec_ok = matrix_view(dx).vec_ok;
  launch_wide(op, p);
  return dx;
}

std::vector<int64_t> adapter_gemm_tiles() {
  return {gemm::kSkinnyBlockM, gemm::kSkinnyBlockN, gemm::kWideBlockM,
          gemm::kWideBlockN,   gemm::kBlockK16Bit,  gemm::kBlockKFloat};
}
}  // namespace

TORCH_LIBRARY_FRAGMENT(fastpeft_cuda, m) {
  m.def("adapter_shrink(Tensor x, Tensor w_down, Tensor? b_down, str activation, int splits) -> (Tensor, Tensor)");
  m.def(
      "adapter_expand(Tensor act, Tensor w_up, Tensor? residual, Tensor? b_up, Tensor? scale_tensor, float scale) "
      "-> Tensor");
  m.def(
      "adapter_grad_z(Tensor dy, Tensor w_up, Tensor z, Tensor? scale_tensor, float scale, str activation, "
      "int splits, bool want_act, bool want_dy_colsum) -> (Tensor, Tensor, Tensor)");
  m.def("adapter_grad_x(Tensor dz, Tensor w_down, Tensor? dy) -> Tensor");
  // No tensor arguments: a catch-all kernel, callable without a GPU (the CPU tests compare it with the Python plan).
  m.def("adapter_gemm_tiles() -> int[]", &adapter_gemm_tiles);
}

TORCH_LIBRARY_IMPL(fastpeft_cuda, CUDA, m) {
  m.impl("adapter_shrink", &adapter_shrink);
  m.impl("adapter_expand", &adapter_expand);
  m.impl("adapter_grad_z", &adapter_grad_z);
  m.impl("adapter_grad_x", &adapter_grad_x);
}

}  // namespace fastpeft
