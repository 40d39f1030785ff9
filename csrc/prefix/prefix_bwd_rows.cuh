// Steps shared by the prefix backward kernels (prefix_bwd_kernel.cuh: dP, prefix_bwd_dq_kernel.cuh: dq).
#pragma once

#include <cmath>
#include <cstdint>

#include "common/numeric.cuh"
#include "prefix/mma.cuh"
#include "prefix/prefix_params.h"
#include "prefix/prefix_rows.cuh"

namespace fastpeft {
namespace prefix {

// The row tile at row0: q and dO rows into q_s / do_s (row stride ld, zero past the end and past D) and the merged
// LSE into lse_s (+inf past the end: those rows' probabilities are exp(-inf) = 0, they add nothing). Ends with a
// barrier: the tile is visible to the whole block.
template <typename T, int kD>
__device__ __forceinline__ void load_row_tile(const PrefixBwdParams& p, const FoldedRows& fr, int row0, int rows,
                                              T* q_s, T* do_s, float* lse_s, int ld) {
  load_rows<T, kD>(q_s, ld, rows, fr, row0, p.head_dim, static_cast<const T*>(p.q), p.q_stride_b, p.q_stride_h,
                   p.q_stride_t);
  load_rows<T, kD>(do_s, ld, rows, fr, row0, p.head_dim, static_cast<const T*>(p.dout), p.do_stride_b,
                   p.do_stride_h, p.do_stride_t);
  for (int r = threadIdx.x; r < rows; r += blockDim.x) {
    lse_s[r] = row0 + r < fr.total ? p.lse[fr.contiguous(row0 + r)] : INFINITY;
  }
  __syncthreads();
}

// D = rowsum(dO * O) of the warp's 16 rows of the tile into delta_s (dO from shared memory, the merged O from global
// memory), or read back from p.delta when an earlier kernel stored it (p.delta_ready); stored to p.delta when there
// is one and it is not ready yet. Rows past the end get 0.
template <typename T, int kLd>
__device__ __forceinline__ void row_deltas(const PrefixBwdParams& p, const FoldedRows& fr, const T* do_s,
                                           float* delta_s, int row0, int warp, int lane) {
  const T* out = static_cast<const T*>(p.out);
  for (int i = 0; i < 16; ++i) {
    const int r = warp * 16 + i;
    const bool valid = row0 + r < fr.total;
    const int64_t row = valid ? fr.contiguous(row0 + r) : 0;  // contiguous [B, Hq, T] index
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

// For the warp's 16 rows and the chunk's keys j0 ..: S = Q P_k^T and dP = dO P_v^T (mma), then the probabilities
// P = exp(scale S - L) against the merged L (0 for padding keys j >= L) into `prob` and dS = P (dP - D) into `ds`.
// Element e of n-tile nt is key nt * 8 + 2c + (e & 1) of the chunk, row g + 8 (e >> 1) of the warp's 16.
template <typename T, int kD, int kNT, int kLd>
__device__ __forceinline__ void probabilities_and_ds(const PrefixBwdParams& p, const T* q_s, const T* do_s,
                                                     const T* pk_s, const T* pv_s, const float* lse_s,
                                                     const float* delta_s, int warp, int j0, float (&prob)[kNT][4],
                                                     float (&ds)[kNT][4]) {
  const int g = lane_g(), c = lane_c();
#pragma unroll
  for (int i = 0; i < kNT; ++i) {
#pragma unroll
    for (int e = 0; e < 4; ++e) prob[i][e] = ds[i][e] = 0.f;
  }
  warp_mma_ss<T, kD, kNT, /*B_K_CONTIGUOUS=*/true>(prob, q_s + warp * 16 * kLd, kLd, pk_s, kLd);  // S
  warp_mma_ss<T, kD, kNT, /*B_K_CONTIGUOUS=*/true>(ds, do_s + warp * 16 * kLd, kLd, pv_s, kLd);    // dP
#pragma unroll
  for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int r = warp * 16 + g + 8 * (e >> 1);
      const bool real = j0 + nt * 8 + 2 * c + (e & 1) < p.prefix_len;
      prob[nt][e] = real ? __expf(prob[nt][e] * p.scale - lse_s[r]) : 0.f;
      ds[nt][e] = prob[nt][e] * (ds[nt][e] - delta_s[r]);
    }
  }
}

}  // namespace prefix
}  // namespace fastpeft
