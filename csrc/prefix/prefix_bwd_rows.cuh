// Shared by the prefix backward kernels (prefix_bwd_kernel.cuh, prefix_bwd_dq_kernel.cuh).
#pragma once

#include <cstdint>

#include "common/numeric.cuh"
#include "prefix/mma.cuh"
#include "prefix/prefix_params.h"

namespace fastpeft {
namespace prefix {

// D = rowsum(dO * O) of the warp's 16 rows of the tile into delta_s (dO from shared memory, the merged O from global
// memory), or read back from p.delta when an earlier kernel stored it (p.delta_ready); stored to p.delta when there
// is one and it is not ready yet. Rows past the end get 0.
template <typename T, int kLd, typename Decode>
__device__ __forceinline__ void row_deltas(const PrefixBwdParams& p, const T* do_s, float* delta_s, int row0,
                                           int rows_total, int warp, int lane, Decode decode) {
  const T* out = static_cast<const T*>(p.out);
  for (int i = 0; i < 16; ++i) {
    const int r = warp * 16 + i;
    const bool valid = row0 + r < rows_total;
    int b = 0, hq = 0, t = 0;
    if (valid) decode(row0 + r, b, hq, t);
    const int64_t row = (int64_t(b) * p.heads_q + hq) * p.steps + t;  // contiguous [B, Hq, T] index
    float sum = 0.f;
    if (p.delta_ready) {
      sum = valid ? p.delta[row] : 0.f;  // the same value for every lane
    } else {
      if (valid) {
        const T* o_row = out + row * p.head_dim;
        for (int d = lane; d < p.head_dim; d += kWarpSize) sum += to_compute(do_s[r * kLd + d]) * to_compute(o_row[d]);
      }
#pragma unroll
      for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
      if (lane == 0 && valid && p.delta != nullptr) p.delta[row] = sum;
    }
    if (lane == 0) delta_s[r] = sum;
  }
  __syncwarp();
}

}  // namespace prefix
}  // namespace fastpeft
