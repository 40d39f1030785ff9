// Dispatch of the fused prefix kernels on dtype and head-dim bucket (the kernels themselves: prefix_*_kernel.cuh,
// instantiated in prefix_{fwd,bwd}_d{64,128,256}.cu).
#include <algorithm>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "prefix/prefix_params.h"

namespace fastpeft {

int prefix_row_blocks(int batch, int heads_q, int heads_kv, int steps, int sms) {
  const int64_t rows = int64_t(batch) * (heads_q / heads_kv) * steps;
  const int64_t tiles = (rows + kPrefixRowsPerTile - 1) / kPrefixRowsPerTile;
  const int64_t wanted = (2 * int64_t(sms) + heads_kv - 1) / heads_kv;  // about two blocks per SM in all
  return static_cast<int>(std::max<int64_t>(1, std::min(tiles, wanted)));
}

namespace {

template <typename Params, typename Run>
cudaError_t dispatch(const Params& p, Run run) {
  const int bucket = prefix_head_dim_bucket(p.head_dim);
  if (p.dtype == DType::kBFloat16) {
    if (bucket == 64) return run(__nv_bfloat16{}, std::integral_constant<int, 64>{});
    if (bucket == 128) return run(__nv_bfloat16{}, std::integral_constant<int, 128>{});
    return run(__nv_bfloat16{}, std::integral_constant<int, 256>{});
  }
  if (p.dtype == DType::kFloat16) {
    if (bucket == 64) return run(__half{}, std::integral_constant<int, 64>{});
    if (bucket == 128) return run(__half{}, std::integral_constant<int, 128>{});
    return run(__half{}, std::integral_constant<int, 256>{});
  }
  return cudaErrorInvalidValue;  // the binding admits only bf16 / fp16
}

}  // namespace

cudaError_t launch_prefix_forward(const PrefixFwdParams& p, cudaStream_t stream) {
  if (p.batch == 0 || p.steps == 0 || p.heads_q == 0) return cudaSuccess;  // an empty grid is not a valid launch
  return dispatch(p, [&](auto t, auto d) {
    return run_prefix_forward<decltype(t), decltype(d)::value>(p, stream);
  });
}

cudaError_t launch_prefix_backward(const PrefixBwdParams& p, cudaStream_t stream) {
  if (p.batch == 0 || p.steps == 0 || p.heads_q == 0) return cudaSuccess;
  return dispatch(p, [&](auto t, auto d) {
    return run_prefix_backward<decltype(t), decltype(d)::value>(p, stream);
  });
}

}  // namespace fastpeft
