// Torch-facing side of the fused prefix-attention kernels: argument checks, layout fixes, workspaces, the params
// structs, the launch on the current stream. Registered as torch.ops.fastpeft_cuda.prefix_{forward,backward};
// fastpeft/ops/_prefix_cuda.py composes them with PyTorch's main attention.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "bindings/torch_utils.h"
#include "prefix/prefix_params.h"

namespace fastpeft {
namespace {

constexpr const char* kFwdOp = "fastpeft_cuda::prefix_forward";
constexpr const char* kBwdOp = "fastpeft_cuda::prefix_backward";

bool aligned(const at::Tensor& t, int64_t bytes) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % bytes == 0; }

// A [.., D] tensor whose last dim is contiguous, whose other strides are multiples of 8 elements and whose data is
// 16-byte aligned (what the kernels' 16-byte loads need); copied to fresh (aligned, contiguous) memory when it is
// not. (A contiguous view at an odd storage offset is not aligned: contiguous() would return it unchanged.)
at::Tensor vector_loadable(const at::Tensor& t) {
  bool ok = t.stride(-1) == 1 && aligned(t, 16);
  for (int64_t i = 0; i + 1 < t.dim(); ++i) ok = ok && (t.stride(i) % 8 == 0 || t.size(i) == 1);
  return ok ? t : t.clone(at::MemoryFormat::Contiguous);
}

// out_main / dq_main: read two adjacent elements at a time (4 bytes): last dim contiguous, even strides, 4-byte
// aligned; copied to fresh memory otherwise.
at::Tensor pair_loadable(const at::Tensor& t) {
  bool ok = t.stride(-1) == 1 && aligned(t, 4);
  for (int64_t i = 0; i + 1 < t.dim(); ++i) ok = ok && (t.stride(i) % 2 == 0 || t.size(i) == 1);
  return ok ? t : t.clone(at::MemoryFormat::Contiguous);
}

// prefix_k / prefix_v: the kernels index them as contiguous [Hkv, L, D] with 16-byte loads.
at::Tensor contiguous_aligned(const at::Tensor& t) {
  return t.is_contiguous() && aligned(t, 16) ? t : t.clone(at::MemoryFormat::Contiguous);
}

DType half_dtype(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16, op, ": '", name,
              "' must be float16 or bfloat16 (float32 runs the prefix part with cuBLAS), got ", t.scalar_type());
  return dtype_of(t, op, name);
}

// Checks shared by both ops; returns (B, Hq, T, D, Hkv, L).
std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t> check_common(const char* op, const at::Tensor& q,
                                                                              const at::Tensor& prefix_k,
                                                                              const at::Tensor& prefix_v) {
  TORCH_CHECK(q.is_cuda(), op, ": 'q' must be a CUDA tensor, got ", q.device());
  TORCH_CHECK(q.dim() == 4, op, ": 'q' must be 4-D [B, Hq, T, D], got ", q.sizes());
  TORCH_CHECK(prefix_k.dim() == 3, op, ": 'prefix_k' must be 3-D [Hkv, L, D], got ", prefix_k.sizes());
  TORCH_CHECK(prefix_v.sizes() == prefix_k.sizes(), op, ": 'prefix_v' must have the shape of 'prefix_k' ",
              prefix_k.sizes(), ", got ", prefix_v.sizes());
  using Named = std::pair<const char*, const at::Tensor&>;
  for (const auto& [name, t] : {Named{"prefix_k", prefix_k}, Named{"prefix_v", prefix_v}}) {
    TORCH_CHECK(t.scalar_type() == q.scalar_type() && t.device() == q.device(), op, ": '", name,
                "' must match 'q' (", q.scalar_type(), " on ", q.device(), "), got ", t.scalar_type(), " on ",
                t.device());
  }
  const int64_t batch = q.size(0), heads_q = q.size(1), steps = q.size(2), head_dim = q.size(3);
  const int64_t heads_kv = prefix_k.size(0), prefix_len = prefix_k.size(1);
  TORCH_CHECK(prefix_k.size(2) == head_dim, op, ": 'prefix_k' must be [Hkv, L, D=", head_dim, "], got ",
              prefix_k.sizes());
  TORCH_CHECK(heads_kv >= 1 && heads_q % heads_kv == 0, op, ": the query heads of 'q' (", heads_q,
              ") must be a multiple of the key/value heads of 'prefix_k' (", heads_kv, ")");
  TORCH_CHECK(prefix_len >= 1, op, ": 'prefix_k' must have L >= 1 prefix keys, got ", prefix_k.sizes());
  TORCH_CHECK(head_dim >= 32 && head_dim <= 256 && head_dim % 8 == 0, op,
              ": head dim must be 32..256 and a multiple of 8, got ", head_dim);
  TORCH_CHECK(batch * heads_q * steps < (int64_t(1) << 31) && heads_kv * prefix_len * head_dim < (int64_t(1) << 31),
              op, ": too many rows for 32-bit row indices");
  return {batch, heads_q, steps, head_dim, heads_kv, prefix_len};
}

int sm_count(const at::Tensor& t) {
  return at::cuda::getDeviceProperties(t.device().index())->multiProcessorCount;
}

std::tuple<at::Tensor, at::Tensor> prefix_forward(const at::Tensor& q_in, const at::Tensor& prefix_k,
                                                  const at::Tensor& prefix_v,
                                                  const std::optional<at::Tensor>& out_main_in,
                                                  const std::optional<at::Tensor>& lse_main_in, double scale) {
  const auto [batch, heads_q, steps, head_dim, heads_kv, prefix_len] = check_common(kFwdOp, q_in, prefix_k, prefix_v);
  const DType dtype = half_dtype(q_in, kFwdOp, "q");
  TORCH_CHECK(out_main_in.has_value() == lse_main_in.has_value(), kFwdOp,
              ": 'out_main' and 'lse_main' are given together (or both None when there are no main keys)");
  c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = vector_loadable(q_in);
  const at::Tensor pk = contiguous_aligned(prefix_k), pv = contiguous_aligned(prefix_v);
  at::Tensor out_main, lse_main;
  if (out_main_in.has_value()) {
    TORCH_CHECK(out_main_in->sizes() == q.sizes() && out_main_in->scalar_type() == q.scalar_type() &&
                    out_main_in->device() == q.device(),
                kFwdOp, ": 'out_main' must be ", q.sizes(), " ", q.scalar_type(), " on ", q.device(), ", got ",
                out_main_in->sizes(), " ", out_main_in->scalar_type(), " on ", out_main_in->device());
    TORCH_CHECK(lse_main_in->sizes() == q.sizes().slice(0, 3) && lse_main_in->scalar_type() == at::kFloat &&
                    lse_main_in->device() == q.device(),
                kFwdOp, ": 'lse_main' must be float32 ", q.sizes().slice(0, 3), " on ", q.device(), ", got ",
                lse_main_in->sizes(), " ", lse_main_in->scalar_type());
    out_main = pair_loadable(*out_main_in);
    lse_main = *lse_main_in;  // any strides (e.g. a slice of the efficient kernel's padded LSE)
  }
  at::Tensor out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor lse = at::empty(q.sizes().slice(0, 3), q.options().dtype(at::kFloat));

  PrefixFwdParams p;
  p.dtype = dtype;
  p.batch = batch, p.heads_q = heads_q, p.heads_kv = heads_kv, p.steps = steps;
  p.head_dim = head_dim, p.prefix_len = prefix_len;
  p.scale = static_cast<float>(scale);
  p.q = q.data_ptr(), p.q_stride_b = q.stride(0), p.q_stride_h = q.stride(1), p.q_stride_t = q.stride(2);
  p.prefix_k = pk.data_ptr(), p.prefix_v = pv.data_ptr();
  if (out_main.defined()) {
    p.out_main = out_main.data_ptr();
    p.om_stride_b = out_main.stride(0), p.om_stride_h = out_main.stride(1), p.om_stride_t = out_main.stride(2);
    p.lse_main = lse_main.data_ptr<float>();
    p.lm_stride_b = lse_main.stride(0), p.lm_stride_h = lse_main.stride(1), p.lm_stride_t = lse_main.stride(2);
  }
  p.out = out.data_ptr(), p.lse = lse.data_ptr<float>();
  p.row_blocks = prefix_row_blocks(batch, heads_q, heads_kv, steps, sm_count(q));
  check_cuda_launch(launch_prefix_forward(p, at::cuda::getCurrentCUDAStream()), kFwdOp);
  return {out, lse};
}

// (dq, dprefix_k, dprefix_v): dq = dq_main (None: zero) + the prefix part, contiguous, empty unless need_dq;
// dprefix_k, dprefix_v [Hkv, L, D] summed over the batch, empty unless need_dprefix.
std::tuple<at::Tensor, at::Tensor, at::Tensor> prefix_backward(const at::Tensor& dout_in, const at::Tensor& q_in,
                                                               const at::Tensor& prefix_k, const at::Tensor& prefix_v,
                                                               const at::Tensor& out_in, const at::Tensor& lse_in,
                                                               const std::optional<at::Tensor>& dq_main_in,
                                                               double scale, bool need_dq, bool need_dprefix) {
  const auto [batch, heads_q, steps, head_dim, heads_kv, prefix_len] = check_common(kBwdOp, q_in, prefix_k, prefix_v);
  const DType dtype = half_dtype(q_in, kBwdOp, "q");
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"dout", dout_in}, {"out", out_in}}) {
    TORCH_CHECK(t.sizes() == q_in.sizes() && t.scalar_type() == q_in.scalar_type() && t.device() == q_in.device(),
                kBwdOp, ": '", name, "' must be ", q_in.sizes(), " ", q_in.scalar_type(), " on ", q_in.device(),
                ", got ", t.sizes(), " ", t.scalar_type(), " on ", t.device());
  }
  TORCH_CHECK(lse_in.sizes() == q_in.sizes().slice(0, 3) && lse_in.scalar_type() == at::kFloat &&
                  lse_in.device() == q_in.device(),
              kBwdOp, ": 'lse' must be float32 ", q_in.sizes().slice(0, 3), ", got ", lse_in.sizes(), " ",
              lse_in.scalar_type());
  if (dq_main_in.has_value()) {
    TORCH_CHECK(dq_main_in->sizes() == q_in.sizes() && dq_main_in->scalar_type() == q_in.scalar_type() &&
                    dq_main_in->device() == q_in.device(),
                kBwdOp, ": 'dq_main' must be ", q_in.sizes(), " ", q_in.scalar_type(), ", got ", dq_main_in->sizes(),
                " ", dq_main_in->scalar_type());
  }
  c10::cuda::CUDAGuard guard(q_in.device());
  const auto options = q_in.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor dq = need_dq ? at::empty(q_in.sizes(), options) : at::empty({0}, options);
  at::Tensor dprefix_k = need_dprefix ? at::zeros(prefix_k.sizes(), options) : at::empty({0}, options);
  at::Tensor dprefix_v = need_dprefix ? at::zeros(prefix_v.sizes(), options) : at::empty({0}, options);
  if (!need_dq && !need_dprefix) return {dq, dprefix_k, dprefix_v};
  if (batch * heads_q * steps == 0) return {dq, dprefix_k, dprefix_v};  // dq is empty too; dprefix stays zero

  const at::Tensor q = vector_loadable(q_in), dout = vector_loadable(dout_in);
  const at::Tensor out = out_in.contiguous(), lse = lse_in.contiguous();
  const at::Tensor pk = contiguous_aligned(prefix_k), pv = contiguous_aligned(prefix_v);
  at::Tensor dq_main;
  if (need_dq && dq_main_in.has_value()) dq_main = pair_loadable(*dq_main_in);
  const int bucket = prefix_head_dim_bucket(static_cast<int>(head_dim));
  const int chunks = prefix_bwd_chunks(static_cast<int>(prefix_len), static_cast<int>(head_dim));
  int row_blocks = prefix_row_blocks(batch, heads_q, heads_kv, steps, sm_count(q));
  if (need_dprefix) {
    // Fewer row blocks when their float32 partial sums of dprefix_k, dprefix_v would pass kPartialBudget (long
    // prefixes): less parallelism, bounded memory. Still a function of shapes and GPU only (deterministic).
    constexpr int64_t kPartialBudget = int64_t(256) << 20;
    const int64_t per_block = 2 * heads_kv * int64_t(chunks) * prefix_bwd_chunk(bucket) * bucket * 4;
    row_blocks = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(row_blocks, kPartialBudget / per_block)));
  }

  PrefixBwdParams p;
  p.dtype = dtype;
  p.batch = batch, p.heads_q = heads_q, p.heads_kv = heads_kv, p.steps = steps;
  p.head_dim = head_dim, p.prefix_len = prefix_len;
  p.scale = static_cast<float>(scale);
  p.dout = dout.data_ptr(), p.do_stride_b = dout.stride(0), p.do_stride_h = dout.stride(1);
  p.do_stride_t = dout.stride(2);
  p.q = q.data_ptr(), p.q_stride_b = q.stride(0), p.q_stride_h = q.stride(1), p.q_stride_t = q.stride(2);
  p.prefix_k = pk.data_ptr(), p.prefix_v = pv.data_ptr();
  p.out = out.data_ptr(), p.lse = lse.data_ptr<float>();
  at::Tensor delta, dpk_partial, dpv_partial;
  if (need_dq) {
    p.dq = dq.data_ptr();
    if (dq_main.defined()) {
      p.dq_main = dq_main.data_ptr();
      p.dqm_stride_b = dq_main.stride(0), p.dqm_stride_h = dq_main.stride(1), p.dqm_stride_t = dq_main.stride(2);
    }
  }
  if (need_dq && need_dprefix && chunks > 1) {
    // D per row, written by the dq kernel and read by the dP kernel (prefix_bwd_kernel.cuh).
    delta = at::empty(q.sizes().slice(0, 3), q.options().dtype(at::kFloat));
    p.delta = delta.data_ptr<float>();
  }
  if (need_dprefix) {
    // Every element of a block's slice is written by the block (padding keys as zeros), so no zero-fill.
    const std::vector<int64_t> partial_shape{row_blocks, heads_kv, int64_t(chunks) * prefix_bwd_chunk(bucket), bucket};
    dpk_partial = at::empty(partial_shape, q.options().dtype(at::kFloat));
    dpv_partial = at::empty(partial_shape, q.options().dtype(at::kFloat));
    p.dpk_partial = dpk_partial.data_ptr<float>(), p.dpv_partial = dpv_partial.data_ptr<float>();
    p.dprefix_k = dprefix_k.data_ptr(), p.dprefix_v = dprefix_v.data_ptr();
  }
  p.row_blocks = row_blocks;
  check_cuda_launch(launch_prefix_backward(p, at::cuda::getCurrentCUDAStream()), kBwdOp);
  return {dq, dprefix_k, dprefix_v};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastpeft_cuda, m) {
  m.def(
      "prefix_forward(Tensor q, Tensor prefix_k, Tensor prefix_v, Tensor? out_main, Tensor? lse_main, float scale) "
      "-> (Tensor, Tensor)");
  m.def(
      "prefix_backward(Tensor dout, Tensor q, Tensor prefix_k, Tensor prefix_v, Tensor out, Tensor lse, "
      "Tensor? dq_main, float scale, bool need_dq, bool need_dprefix) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastpeft_cuda, CUDA, m) {
  m.impl("prefix_forward", &prefix_forward);
  m.impl("prefix_backward", &prefix_backward);
}

}  // namespace fastpeft
