// Fused prefix-attention forward: for each query row, the attention over the L prefix keys of its key/value head
// (scores q P_k^T * scale, softmax with its log-sum-exp, . P_v) merged with the main attention's (O_main, L_main):
//   O = O_main + sigmoid(L_pre - L_main) (O_pre - O_main),  L = logaddexp(L_main, L_pre).
// Conventions: prefix_params.h. Included only by prefix_fwd_d*.cu (one head-dim bucket each).
//
// Structure (FlashAttention-2 forward, with the prefix as the keys):
// - Block = 4 warps; a tile is 64 folded rows, warp w owns rows 16w .. 16w+15 of the tile (no inter-warp exchange).
// - P_k and P_v live in shared memory in chunks of kChunk keys. With one chunk (L <= kChunk, the usual prefix sizes
//   for D <= 128: L = 10, 30, 64) it is loaded once per block and reused for every row tile the block handles;
//   with more chunks, each row tile streams them (they stay in L2, 2 L D elements per head).
// - Per chunk: S = Q P_k^T (mma), online softmax (running max m and sum l per row, FA2), O_pre += P P_v (mma, P
//   from the S accumulators as A fragments).
// - Epilogue: L_pre = m + log l, O_pre /= l, then the gated merge with O_main / L_main read from global memory, and
//   O, L written (each thread writes the two adjacent columns its accumulator fragment holds).
#pragma once

#include <cmath>

#include "common/numeric.cuh"
#include "prefix/mma.cuh"
#if !defined(FASTPEFT_HOST_EMULATION)
#include "prefix/launch.cuh"
#endif
#include "prefix/prefix_params.h"
#include "prefix/prefix_rows.cuh"

namespace fastpeft {
namespace prefix {

template <int kD>
struct FwdTraits {
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * kWarpSize;
  static constexpr int kRows = kPrefixRowsPerTile;         // rows per tile
  static constexpr int kChunk = kD == 256 ? 32 : 64;       // prefix keys per chunk (S fragment: kChunk / 2 floats)
  static constexpr int kLd = kD + 8;                       // row stride of the Q, P_k, P_v tiles (elements)
  static_assert(kRows == kWarps * 16, "each warp owns 16 rows of the tile");
  static_assert(kD % 64 == 0 && kChunk % 16 == 0, "tiles are whole mma tiles");
  template <typename T>
  static constexpr int smem_bytes() {
    return (kRows + 2 * kChunk) * kLd * static_cast<int>(sizeof(T));
  }
};

template <typename T, int kD>
__global__ void __launch_bounds__(FwdTraits<kD>::kThreads) prefix_forward_kernel(const PrefixFwdParams p) {
  using Tr = FwdTraits<kD>;
  constexpr int kRows = Tr::kRows, kChunk = Tr::kChunk, kLd = Tr::kLd;
  constexpr int kNT = kChunk / 8;  // n-tiles of S (keys)
  constexpr int kDT = kD / 8;      // n-tiles of O (head dim)

  unsigned char* smem_raw = dynamic_smem();
  T* q_s = reinterpret_cast<T*>(smem_raw);  // [kRows][kLd]
  T* pk_s = q_s + kRows * kLd;              // [kChunk][kLd], P_k rows j0 .. j0 + kChunk - 1
  T* pv_s = pk_s + kChunk * kLd;            // [kChunk][kLd]

  const int h = blockIdx.y;  // key/value head
  const FoldedRows fr(p, h);
  const int num_tiles = (fr.total + kRows - 1) / kRows;
  const int num_chunks = (p.prefix_len + kChunk - 1) / kChunk;
  const int warp = threadIdx.x / kWarpSize;
  const int g = lane_g(), c = lane_c();

  // With one chunk, P_k and P_v stay resident for the whole block (made visible by the first tile's barrier).
  if (num_chunks == 1) load_prefix_chunk<T, kD>(p, h, 0, kChunk, pk_s, pv_s, kLd);

  for (int tile = blockIdx.x; tile < num_tiles; tile += gridDim.x) {
    const int row0 = tile * kRows;
    __syncthreads();  // the previous tile is done with q_s (and, with several chunks, with pk_s / pv_s)
    load_rows<T, kD>(q_s, kLd, kRows, fr, row0, p.head_dim, static_cast<const T*>(p.q), p.q_stride_b, p.q_stride_h,
                     p.q_stride_t);
    __syncthreads();

    // Per thread: rows g and g + 8 of the warp's 16 (index 0 / 1 below).
    float m[2] = {-INFINITY, -INFINITY};  // running max of the scaled scores
    float l[2] = {0.f, 0.f};              // running sum of exp(score - m), this thread's columns only
    float acc_o[kDT][4];
#pragma unroll
    for (int i = 0; i < kDT; ++i) acc_o[i][0] = acc_o[i][1] = acc_o[i][2] = acc_o[i][3] = 0.f;

    for (int chunk = 0; chunk < num_chunks; ++chunk) {
      if (num_chunks > 1) {
        __syncthreads();  // every warp is done with the previous chunk
        load_prefix_chunk<T, kD>(p, h, chunk * kChunk, kChunk, pk_s, pv_s, kLd);
        __syncthreads();
      }
      float s[kNT][4];
#pragma unroll
      for (int i = 0; i < kNT; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
      warp_mma_ss<T, kD, kNT, /*B_K_CONTIGUOUS=*/true>(s, q_s + warp * 16 * kLd, kLd, pk_s, kLd);

      // Scale, hide the padding keys (j >= L), new row max. Element e of tile nt: key nt*8 + 2c + (e & 1),
      // row g + 8 * (e >> 1).
      float row_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int j = chunk * kChunk + nt * 8 + 2 * c + (e & 1);
          s[nt][e] = j < p.prefix_len ? s[nt][e] * p.scale : -INFINITY;
          row_max[e >> 1] = fmaxf(row_max[e >> 1], s[nt][e]);
        }
      }
      float corr[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        // Every chunk holds at least one real key (j0 < L), so the new max is finite for finite inputs.
        const float m_new = fmaxf(m[i], quad_max(row_max[i]));
        corr[i] = __expf(m[i] - m_new);  // exp(-inf) = 0 on the first chunk
        m[i] = m_new;
        l[i] *= corr[i];
      }
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          s[nt][e] = __expf(s[nt][e] - m[e >> 1]);  // hidden keys: exp(-inf) = 0
          l[e >> 1] += s[nt][e];
        }
      }
#pragma unroll
      for (int dt = 0; dt < kDT; ++dt) {
        acc_o[dt][0] *= corr[0];
        acc_o[dt][1] *= corr[0];
        acc_o[dt][2] *= corr[1];
        acc_o[dt][3] *= corr[1];
      }
      uint32_t p_frag[kNT / 2][4];
      accumulator_to_a<T, kNT / 2>(p_frag, s);
      warp_mma_rs<T, kNT / 2, kDT, /*B_K_CONTIGUOUS=*/false>(acc_o, p_frag, pv_s, kLd);
    }

    // Epilogue: prefix state, then the gated merge with the main attention's state.
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int row = row0 + warp * 16 + g + 8 * i;
      const float l_row = quad_sum(l[i]);  // all lanes of the quad take part (no early exit before this)
      if (row >= fr.total) continue;
      int b, hq, t;
      fr.decode(row, b, hq, t);
      const float l_pre = m[i] + logf(l_row);
      const float inv_l = 1.f / l_row;

      float l_main = -INFINITY;
      if (p.lse_main != nullptr) l_main = p.lse_main[b * p.lm_stride_b + hq * p.lm_stride_h + t * p.lm_stride_t];
      // Not finite: no visible main key (flash +inf, efficient -inf): the prefix alone, O_main not read.
      const bool has_main = isfinite(l_main);
      float gate = 1.f, l_out = l_pre;
      if (has_main) {
        gate = 1.f / (1.f + __expf(l_main - l_pre));  // sigmoid(L_pre - L_main)
        l_out = fmaxf(l_main, l_pre) + log1pf(__expf(-fabsf(l_main - l_pre)));
      }
      const int64_t out_row = ((int64_t(b) * p.heads_q + hq) * p.steps + t);
      T* out = static_cast<T*>(p.out) + out_row * p.head_dim;
      const T* out_main = has_main ? static_cast<const T*>(p.out_main) + b * p.om_stride_b + hq * p.om_stride_h +
                                         t * p.om_stride_t
                                   : nullptr;
#pragma unroll
      for (int dt = 0; dt < kDT; ++dt) {
        const int d = dt * 8 + 2 * c;
        if (d >= p.head_dim) continue;  // head_dim is even, so d + 1 < head_dim too
        float o0 = acc_o[dt][2 * i] * inv_l, o1 = acc_o[dt][2 * i + 1] * inv_l;
        if (has_main) {
          const float2 main = load2_float(out_main + d);  // even strides, 4-byte aligned (binding)
          o0 = main.x + gate * (o0 - main.x);
          o1 = main.y + gate * (o1 - main.y);
        }
        *reinterpret_cast<uint32_t*>(out + d) = pack2<T>(o0, o1);
      }
      if (c == 0) p.lse[out_row] = l_out;
    }
  }
}

#if !defined(FASTPEFT_HOST_EMULATION)
template <typename T, int kD>
cudaError_t run_prefix_forward_impl(const PrefixFwdParams& p, cudaStream_t stream) {
  using Tr = FwdTraits<kD>;
  return launch_kernel(prefix_forward_kernel<T, kD>, p, dim3(p.row_blocks, p.heads_kv), Tr::kThreads,
                       Tr::template smem_bytes<T>(), stream);
}
#endif  // !FASTPEFT_HOST_EMULATION

}  // namespace prefix

#if !defined(FASTPEFT_HOST_EMULATION)
// The entry point declared in prefix_params.h, explicitly instantiated in prefix_fwd_d*.cu.
template <typename T, int kD>
cudaError_t run_prefix_forward(const PrefixFwdParams& p, cudaStream_t stream) {
  return prefix::run_prefix_forward_impl<T, kD>(p, stream);
}
#endif

}  // namespace fastpeft
