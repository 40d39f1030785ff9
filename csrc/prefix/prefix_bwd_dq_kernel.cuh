// The dq part of the prefix backward for prefixes longer than one chunk of the dP kernel (prefix_bwd_kernel.cuh says
// when it runs). Conventions and formulas: prefix_params.h.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/numeric.cuh"
#include "prefix/mma.cuh"
#include "prefix/prefix_bwd_rows.cuh"
#include "prefix/prefix_params.h"

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
  const int groups = p.heads_q / p.heads_kv;
  const int rows_total = p.batch * groups * p.steps;
  const int num_tiles = (rows_total + kRows - 1) / kRows;
  const int num_chunks = (p.prefix_len + kChunk - 1) / kChunk;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int g = lane_g(), c = lane_c();
  const T* q = static_cast<const T*>(p.q);
  const T* dout = static_cast<const T*>(p.dout);
  const T* prefix_k = static_cast<const T*>(p.prefix_k) + int64_t(h) * p.prefix_len * p.head_dim;
  const T* prefix_v = static_cast<const T*>(p.prefix_v) + int64_t(h) * p.prefix_len * p.head_dim;
  auto decode = [&](int row, int& b, int& hq, int& t) {
    t = row % p.steps;
    const int bg = row / p.steps;
    hq = h * groups + bg % groups;
    b = bg / groups;
  };

  for (int tile = blockIdx.x; tile < num_tiles; tile += gridDim.x) {
    const int row0 = tile * kRows;
    __syncthreads();  // the previous tile is done with every shared buffer
    auto row_of = [&](const T* base, int64_t sb, int64_t sh, int64_t st) {
      return [=, &decode](int r) -> const T* {
        if (row0 + r >= rows_total) return nullptr;
        int b, hq, t;
        decode(row0 + r, b, hq, t);
        return base + b * sb + hq * sh + t * st;
      };
    };
    load_tile<T, kD>(q_s, kLd, kRows, p.head_dim, row_of(q, p.q_stride_b, p.q_stride_h, p.q_stride_t));
    load_tile<T, kD>(do_s, kLd, kRows, p.head_dim, row_of(dout, p.do_stride_b, p.do_stride_h, p.do_stride_t));
    for (int r = threadIdx.x; r < kRows; r += blockDim.x) {
      float lse_row = INFINITY;  // rows past the end: probabilities 0
      if (row0 + r < rows_total) {
        int b, hq, t;
        decode(row0 + r, b, hq, t);
        lse_row = p.lse[(int64_t(b) * p.heads_q + hq) * p.steps + t];
      }
      lse_s[r] = lse_row;
    }
    __syncthreads();
    row_deltas<T, kLd>(p, do_s, delta_s, row0, rows_total, warp, lane, decode);

    float acc[kDT][4];  // this warp's 16 rows of dq's prefix part, unscaled
#pragma unroll
    for (int i = 0; i < kDT; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
    for (int chunk = 0; chunk < num_chunks; ++chunk) {
      const int j0 = chunk * kChunk;
      __syncthreads();  // every warp is done with the previous chunk
      load_tile<T, kD>(pk_s, kLd, kChunk, p.head_dim, [&](int r) -> const T* {
        return j0 + r < p.prefix_len ? prefix_k + int64_t(j0 + r) * p.head_dim : nullptr;
      });
      load_tile<T, kD>(pv_s, kLd, kChunk, p.head_dim, [&](int r) -> const T* {
        return j0 + r < p.prefix_len ? prefix_v + int64_t(j0 + r) * p.head_dim : nullptr;
      });
      __syncthreads();

      float s[kNT][4], dp[kNT][4];
#pragma unroll
      for (int i = 0; i < kNT; ++i) {
#pragma unroll
        for (int e = 0; e < 4; ++e) s[i][e] = dp[i][e] = 0.f;
      }
      warp_mma_ss<T, kD, kNT, /*B_K_CONTIGUOUS=*/true>(s, q_s + warp * 16 * kLd, kLd, pk_s, kLd);
      warp_mma_ss<T, kD, kNT, /*B_K_CONTIGUOUS=*/true>(dp, do_s + warp * 16 * kLd, kLd, pv_s, kLd);
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = warp * 16 + g + 8 * (e >> 1);
          const bool real = j0 + nt * 8 + 2 * c + (e & 1) < p.prefix_len;  // padding keys: P = 0
          const float prob = real ? __expf(s[nt][e] * p.scale - lse_s[r]) : 0.f;
          s[nt][e] = prob * (dp[nt][e] - delta_s[r]);  // dS
        }
      }
      uint32_t ds_frag[kNT / 2][4];
      accumulator_to_a<T, kNT / 2>(ds_frag, s);
      warp_mma_rs<T, kNT / 2, kDT, /*B_K_CONTIGUOUS=*/false>(acc, ds_frag, pk_s, kLd);
    }

    const T* dq_main = static_cast<const T*>(p.dq_main);
    T* dq = static_cast<T*>(p.dq);
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int row = row0 + warp * 16 + g + 8 * i;
      if (row >= rows_total) continue;
      int b, hq, t;
      decode(row, b, hq, t);
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
