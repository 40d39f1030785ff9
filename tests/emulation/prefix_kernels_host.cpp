// The fused prefix kernels (csrc/prefix/*_kernel.cuh, unchanged) compiled as host code, with C entry points for
// ctypes (tests/test_prefix_kernels_emulated.py). The entry points fill the params structs and the workspaces the
// way csrc/bindings/prefix_binding.cpp does, then run the kernels with the CUDA shim. Returns 0, or 1 when a kernel
// wrote past its shared memory, or 2 for an unsupported dtype.
#include "emulation/cuda_host_shim.h"  // first: defines FASTPEFT_HOST_EMULATION

#include <algorithm>

#include "prefix/prefix_bwd_kernel.cuh"
#include "prefix/prefix_fwd_kernel.cuh"

namespace fastpeft {
namespace {

template <typename Fn>
int dispatch(int dtype, int head_dim, Fn fn) {
  const int bucket = prefix_head_dim_bucket(head_dim);
  auto by_bucket = [&](auto t) {
    using T = decltype(t);
    if (bucket == 64) return fn(T{}, std::integral_constant<int, 64>{});
    if (bucket == 128) return fn(T{}, std::integral_constant<int, 128>{});
    return fn(T{}, std::integral_constant<int, 256>{});
  };
  if (dtype == 0) return by_bucket(__nv_bfloat16{});
  if (dtype == 1) return by_bucket(__half{});
  return 2;
}

}  // namespace
}  // namespace fastpeft

using namespace fastpeft;

extern "C" int emulate_prefix_forward(int dtype, int batch, int heads_q, int heads_kv, int steps, int head_dim,
                                      int prefix_len, float scale, const void* q, int64_t qsb, int64_t qsh,
                                      int64_t qst, const void* prefix_k, const void* prefix_v, const void* out_main,
                                      int64_t osb, int64_t osh, int64_t ost, const float* lse_main, int64_t lsb,
                                      int64_t lsh, int64_t lst, void* out, float* lse, int row_blocks) {
  PrefixFwdParams p;
  p.dtype = dtype == 0 ? DType::kBFloat16 : DType::kFloat16;
  p.batch = batch, p.heads_q = heads_q, p.heads_kv = heads_kv, p.steps = steps;
  p.head_dim = head_dim, p.prefix_len = prefix_len, p.scale = scale;
  p.q = q, p.q_stride_b = qsb, p.q_stride_h = qsh, p.q_stride_t = qst;
  p.prefix_k = prefix_k, p.prefix_v = prefix_v;
  p.out_main = out_main, p.om_stride_b = osb, p.om_stride_h = osh, p.om_stride_t = ost;
  p.lse_main = lse_main, p.lm_stride_b = lsb, p.lm_stride_h = lsh, p.lm_stride_t = lst;
  p.out = out, p.lse = lse, p.row_blocks = row_blocks;
  return dispatch(dtype, head_dim, [&](auto t, auto d) {
    using T = decltype(t);
    constexpr int kD = decltype(d)::value;
    using Tr = prefix::FwdTraits<kD>;
    const bool ok = emulation::launch(prefix::prefix_forward_kernel<T, kD>, p, dim3(row_blocks, heads_kv),
                                      Tr::kThreads, Tr::template smem_bytes<T>());
    return ok ? 0 : 1;
  });
}

extern "C" int emulate_prefix_backward(int dtype, int batch, int heads_q, int heads_kv, int steps, int head_dim,
                                       int prefix_len, float scale, const void* dout, int64_t dsb, int64_t dsh,
                                       int64_t dst, const void* q, int64_t qsb, int64_t qsh, int64_t qst,
                                       const void* prefix_k, const void* prefix_v, const void* out, const float* lse,
                                       const void* dq_main, int64_t msb, int64_t msh, int64_t mst, void* dq,
                                       void* dprefix_k, void* dprefix_v, int row_blocks) {
  PrefixBwdParams p;
  p.dtype = dtype == 0 ? DType::kBFloat16 : DType::kFloat16;
  p.batch = batch, p.heads_q = heads_q, p.heads_kv = heads_kv, p.steps = steps;
  p.head_dim = head_dim, p.prefix_len = prefix_len, p.scale = scale;
  p.dout = dout, p.do_stride_b = dsb, p.do_stride_h = dsh, p.do_stride_t = dst;
  p.q = q, p.q_stride_b = qsb, p.q_stride_h = qsh, p.q_stride_t = qst;
  p.prefix_k = prefix_k, p.prefix_v = prefix_v, p.out = out, p.lse = lse;
  p.dq_main = dq_main, p.dqm_stride_b = msb, p.dqm_stride_h = msh, p.dqm_stride_t = mst;
  p.dq = dq;
  const int bucket = prefix_head_dim_bucket(head_dim);
  const int chunks = prefix_bwd_chunks(prefix_len, head_dim);
  // Workspaces as the binding allocates them; poisoned with NaN, since the kernels must write before they read.
  std::vector<float> delta, dpk_partial, dpv_partial;
  if (dq != nullptr && dprefix_k != nullptr && chunks > 1) {
    delta.assign(size_t(batch) * heads_q * steps, NAN);
    p.delta = delta.data();
  }
  if (dprefix_k != nullptr) {
    const size_t n = size_t(row_blocks) * heads_kv * chunks * prefix_bwd_chunk(bucket) * bucket;
    dpk_partial.assign(n, NAN);
    dpv_partial.assign(n, NAN);
    p.dpk_partial = dpk_partial.data(), p.dpv_partial = dpv_partial.data();
    p.dprefix_k = dprefix_k, p.dprefix_v = dprefix_v;
  }
  p.row_blocks = row_blocks;
  return dispatch(dtype, head_dim, [&](auto t, auto d) {
    using T = decltype(t);
    constexpr int kD = decltype(d)::value;
    // The same schedule as the CUDA launcher (kernels, grids, params), each launch emulated.
    auto launch = [](auto kernel, const PrefixBwdParams& params, dim3 grid, int threads, int smem) {
      return emulation::launch(kernel, params, grid, threads, static_cast<size_t>(smem));
    };
    return prefix::schedule_prefix_backward<T, kD>(p, launch) ? 0 : 1;
  });
}
