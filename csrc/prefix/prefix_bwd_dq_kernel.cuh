// The dq part of the prefix backward for prefixes longer than one chunk of the dP kernel (prefix_bwd_kernel.cuh says
// when it runs). Conventions and formulas: prefix_params.h.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/numeric.cuh"
#include "prefix/mma.cuh"
#include "prefix/prefix_bwd_rows.cuh"
#include "prefix/prefix_params.h"
#include "prefix/prefix_rows.cuh"

namespace fastpeft {
namespace prefix {

template <int kD>
struct DqTraits {
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * kWarpSize;
  static constexpr int kRows = kPrefixRowsPerTile;
  static constexpr int kChunk = kD == 256 ? 32 : 64;  // as the forward: dq accumulators take kD / 2 registers
  static constexpr int kLd = kD + 8;
  static_assert(kRows == kWarps * 16, "each warp owns 16 rows of the tile");
  template <typename T>
  static constexpr int smem_bytes() {
    return (2 * kRows + 2 * kChunk) * kLd * static_cast<int>(sizeof(T)) + 2 * kRows * static_cast<int>(sizeof(float));
  }
};

// dq = dq_main + scale dS P_k over all the prefix chunks, for prefixes longer than one chunk of the dP kernel. Grid
// (row_blocks, Hkv); block x of head h handles row tiles x, x + row_blocks, ...; each warp keeps its 16 rows' dq in
// float32 registers across the chunks (streamed through shared memory) and writes it once. Also stores D per row
// in p.delta when there is one (for the dP kernel that runs next).
template <typename T, int kD>
__global__ void __launch_bounds__(DqTraits<kD>::kThreads) prefix_backward_dq_kernel(const PrefixBwdParams p) {
  using Tr = DqTraits<kD>;
  constexpr int kRows = Tr::kRows, kChunk = Tr::kChunk, kLd = Tr::kLd;
  constexpr int kNT = kChunk / 8;  // n-tiles of S and dP (keys)
  constexpr int kDT = kD / 8;      // n-tiles of dq (head dim)

  unsigned char* smem_raw = dynamic_smem();
  T* q_s = reinterpret_cast<T*>(smem_raw);  // [kRows][kLd]
  T* do_s = q_s + kRows * kLd;              // [kRows][kLd]
  T* pk_s = do_s + kRows * kLd;             // [kChunk][kLd]
  T* pv_s = pk_s + kChunk * kLd;            // [kChunk][kLd]
  float* lse_s = reinterpret_cast<float*>(pv_s + kChunk * kLd);  // [kRows]
  float* delta_s = lse_s + kRows;                                 // [kRows]

  const int h = blockIdx.y;
  const FoldedRows fr(p, h);
  const int num_tiles = (fr.total + kRows - 1) / kRows;
  const int num_chunks = (p.prefix_len + kChunk - 1) / kChunk;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int g = lane_g(), c = lane_c();

  for (int tile = blockIdx.x; tile < num_tiles; tile += gridDim.x) {
    const int row0 = tile * kRows;
    __syncthreads();  // the previous tile is done with every shared buffer
    load_row_tile<T, kD>(p, fr, row0, kRows, q_s, do_s, lse_s, kLd);
    row_deltas<T, kLd>(p, fr, do_s, delta_s, row0, warp, lane);

    float acc[kDT][4];  // this warp's 16 rows of dq's prefix part, unscaled
#pragma unroll
    for (int i = 0; i < kDT; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
    for (int chunk = 0; chunk < num_chunks; ++chunk) {
      const int j0 = chunk * kChunk;
      __syncthreads();  // every warp is done with the previous chunk
      load_prefix_chunk<T, kD>(p, h, j0, kChunk, pk_s, pv_s, kLd);
      __syncthreads();
      float prob[kNT][4], ds[kNT][4];
      probabilities_and_ds<T, kD, kNT, kLd>(p, q_s, do_s, pk_s, pv_s, lse_s, delta_s, warp, j0, prob, ds);
      uint32_t ds_frag[kNT / 2][4];
      accumulator_to_a<T, kNT / 2>(ds_frag, ds);
      warp_mma_rs<T, kNT / 2, kDT, /*B_K_CONTIGUOUS=*/false>(acc, ds_frag, pk_s, kLd);
    }

    const T* dq_main = static_cast<const T*>(p.dq_main);
    T* dq = static_cast<T*>(p.dq);
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int row = row0 + warp * 16 + g + 8 * i;
      if (row >= fr.total) continue;
      int b, hq, t;
      fr.decode(row, b, hq, t);
      const int64_t main_off = b * p.dqm_stride_b + hq * p.dqm_stride_h + t * p.dqm_stride_t;
      const int64_t row_off = ((int64_t(b) * p.heads_q + hq) * p.steps + t) * p.head_dim;  // dq is contiguous
#pragma unroll
      for (int dt = 0; dt < kDT; ++dt) {
        const int d = dt * 8 + 2 * c;
        if (d >= p.head_dim) continue;
        float2 sum = make_float2(acc[dt][2 * i] * p.scale, acc[dt][2 * i + 1] * p.scale);
        if (dq_main != nullptr) {
          const float2 main = load2_float(dq_main + main_off + d);  // even strides (binding)
          sum.x += main.x;
          sum.y += main.y;
        }
        *reinterpret_cast<uint32_t*>(dq + row_off + d) = pack2<T>(sum.x, sum.y);  // the one rounding
      }
    }
  }
}

}  // namespace prefix
}  // namespace fastpeft
