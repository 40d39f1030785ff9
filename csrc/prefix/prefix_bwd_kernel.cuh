// Prefix-attention backward: the prefix part of dq (added to the main part's dq) and dP_k, dP_v summed over the
// batch and the query heads of each group, deterministically. Conventions and formulas: prefix_params.h.
// Included only by prefix_bwd_d*.cu (one head-dim bucket each) and by the CPU emulation tests.
//
// prefix_backward_kernel (FlashAttention-2's dK/dV loop, with a prefix chunk as the key block):
// - Grid (row_blocks, Hkv, chunk_blocks). Block (x, h, z) handles the chunks z, z + chunk_blocks, ... of kChunk
//   prefix keys (outer loop) and, for each, its row tiles x, x + row_blocks, ... (inner loop), accumulating the
//   chunk's dP_k, dP_v over its rows in registers; at the end of a chunk it writes them to its own slice of the
//   float32 partial buffers. `prefix_reduce_kernel` then sums the slices over the row blocks in a fixed order
//   (deterministic, no atomics).
// - Per row tile (64 rows; warp w computes rows 16w .. 16w+15): S = Q P_k^T and dP = dO P_v^T (mma), P = exp(S - L)
//   with the merged L, dS = P (dP - D) with D = rowsum(dO * O) of the merged O. P^T and dS^T go to shared memory;
//   then every warp accumulates its (16 keys x 64 dims) block of dP_v += P^T dO and dP_k += dS^T Q (mma).
// - With one chunk (L <= kChunk: the usual prefix sizes) the same pass gives dq: each warp computes its rows'
//   dS P_k (mma), adds the main part's dq and writes dq, one rounding; an element of dq belongs to one thread of one
//   block, so no atomics. That is the fused backward: one pass over q, dO, O, dq_main, dq.
//
// prefix_backward_dq_kernel (FlashAttention-2's dQ loop), for several chunks: block = row tiles, loop over all the
// chunks with dq accumulated in registers (float32), one write of dq. Then prefix_backward_kernel runs with one chunk
// per block (grid z = chunks) for dP_k, dP_v only, reading the D the dq kernel stored. Memory traffic: 5 + 2 x chunks
// passes over [B, Hq, T, D] (instead of 5 x chunks for a chunk loop that carries dq along).
#pragma once

#include <cmath>

#include "common/numeric.cuh"
#include "prefix/mma.cuh"
#if !defined(FASTPEFT_HOST_EMULATION)
#include "prefix/launch.cuh"
#endif
#include "prefix/prefix_bwd_dq_kernel.cuh"
#include "prefix/prefix_bwd_rows.cuh"
#include "prefix/prefix_params.h"
#include "prefix/prefix_rows.cuh"

namespace fastpeft {
namespace prefix {

template <int kD>
struct BwdTraits {
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * kWarpSize;
  static constexpr int kRows = kPrefixRowsPerTile;
  // The chunk's dP_k and dP_v ([kChunk x kD] each) are split into 16 x 64 warp blocks, one per warp: 2 x 32 float
  // accumulators per thread whatever the bucket. So kChunk * kD = 4 warps * 16 * 64.
  static constexpr int kChunk = 4096 / kD;
  static constexpr int kKeyBlocks = kChunk / 16;           // warp blocks along the keys
  static constexpr int kDimBlocks = kWarps / kKeyBlocks;   // warp blocks along the head dim
  static constexpr int kDimsPerWarp = kD / kDimBlocks;     // = 64
  static constexpr int kLd = kD + 8;                       // Q, dO, P_k, P_v tiles
  static constexpr int kLdT = kRows + 8;                   // P^T, dS^T tiles ([kChunk][kRows])
  static_assert(kRows == kWarps * 16, "each warp owns 16 rows of the tile");
  static_assert(kKeyBlocks * kDimBlocks == kWarps && kDimsPerWarp == 64, "one 16 x 64 block of dP per warp");
  static_assert(kChunk == prefix_bwd_chunk(kD), "host and device agree on the chunk");
  template <typename T>
  static constexpr int smem_bytes() {
    return (2 * kRows + 2 * kChunk) * kLd * static_cast<int>(sizeof(T)) +
           2 * kChunk * kLdT * static_cast<int>(sizeof(T)) + 2 * kRows * static_cast<int>(sizeof(float));
  }
};

template <typename T, int kD>
__global__ void __launch_bounds__(BwdTraits<kD>::kThreads) prefix_backward_kernel(const PrefixBwdParams p) {
  using Tr = BwdTraits<kD>;
  constexpr int kRows = Tr::kRows, kChunk = Tr::kChunk, kLd = Tr::kLd, kLdT = Tr::kLdT;
  constexpr int kNT = kChunk / 8;  // n-tiles of S and dP (keys)

  unsigned char* smem_raw = dynamic_smem();
  T* q_s = reinterpret_cast<T*>(smem_raw);  // [kRows][kLd]
  T* do_s = q_s + kRows * kLd;              // [kRows][kLd]
  T* pk_s = do_s + kRows * kLd;             // [kChunk][kLd]
  T* pv_s = pk_s + kChunk * kLd;            // [kChunk][kLd]
  T* pt_s = pv_s + kChunk * kLd;            // [kChunk][kLdT]  P^T (key, row)
  T* dst_s = pt_s + kChunk * kLdT;          // [kChunk][kLdT]  dS^T (key, row)
  float* lse_s = reinterpret_cast<float*>(dst_s + kChunk * kLdT);  // [kRows]
  float* delta_s = lse_s + kRows;                                  // [kRows]

  const int h = blockIdx.y;
  const FoldedRows fr(p, h);
  const int num_tiles = (fr.total + kRows - 1) / kRows;
  const int num_chunks = (p.prefix_len + kChunk - 1) / kChunk;
  const int padded_len = num_chunks * kChunk;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int g = lane_g(), c = lane_c();
  const bool need_dq = p.dq != nullptr;  // only with one chunk (the launch schedule below)
  const bool need_dprefix = p.dpk_partial != nullptr;
  // This warp's block of the chunk's dP_k / dP_v: keys key_block*16 .., dims dim_block*64 ..
  const int key_block = warp % Tr::kKeyBlocks, dim_block = warp / Tr::kKeyBlocks;

  for (int chunk = blockIdx.z; chunk < num_chunks; chunk += gridDim.z) {
    const int j0 = chunk * kChunk;
    __syncthreads();  // every warp is done with the previous chunk's tiles
    load_prefix_chunk<T, kD>(p, h, j0, kChunk, pk_s, pv_s, kLd);

    float acc_dpk[8][4], acc_dpv[8][4];  // 16 keys x 64 dims each
#pragma unroll
    for (int i = 0; i < 8; ++i) {
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_dpk[i][e] = acc_dpv[i][e] = 0.f;
    }

    for (int tile = blockIdx.x; tile < num_tiles; tile += gridDim.x) {
      const int row0 = tile * kRows;
      __syncthreads();  // the previous tile is done with q_s, do_s, pt_s, dst_s (and the chunk load is complete)
      load_row_tile<T, kD>(p, fr, row0, kRows, q_s, do_s, lse_s, kLd);
      row_deltas<T, kLd>(p, fr, do_s, delta_s, row0, warp, lane);

      float prob[kNT][4], ds[kNT][4];
      probabilities_and_ds<T, kD, kNT, kLd>(p, q_s, do_s, pk_s, pv_s, lse_s, delta_s, warp, j0, prob, ds);
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int key = nt * 8 + 2 * c + (e & 1);   // within the chunk
          const int r = warp * 16 + g + 8 * (e >> 1);  // within the tile
          pt_s[key * kLdT + r] = from_compute<T>(prob[nt][e]);
          dst_s[key * kLdT + r] = from_compute<T>(ds[nt][e]);
        }
      }

      if (need_dq) {
        uint32_t ds_frag[kNT / 2][4];
        accumulator_to_a<T, kNT / 2>(ds_frag, ds);
        // dq rows of this thread: g and g + 8 of the warp's 16.
        int64_t main_off[2], row_off[2];
        bool valid[2];
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          const int row = row0 + warp * 16 + g + 8 * i;
          valid[i] = row < fr.total;
          int b = 0, hq = 0, t = 0;
          if (valid[i]) fr.decode(row, b, hq, t);
          main_off[i] = b * p.dqm_stride_b + hq * p.dqm_stride_h + t * p.dqm_stride_t;
          row_off[i] = ((int64_t(b) * p.heads_q + hq) * p.steps + t) * p.head_dim;  // dq is contiguous
        }
        const T* dq_main = static_cast<const T*>(p.dq_main);
        T* dq = static_cast<T*>(p.dq);
        for (int d0 = 0; d0 < kD; d0 += 64) {  // 64 dims at a time: 32 accumulators
          float acc[8][4];
#pragma unroll
          for (int i = 0; i < 8; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
          warp_mma_rs<T, kNT / 2, 8, /*B_K_CONTIGUOUS=*/false>(acc, ds_frag, pk_s + d0, kLd);
#pragma unroll
          for (int dt = 0; dt < 8; ++dt) {
            const int d = d0 + dt * 8 + 2 * c;
            if (d >= p.head_dim) continue;
#pragma unroll
            for (int i = 0; i < 2; ++i) {
              if (!valid[i]) continue;
              float2 sum = make_float2(acc[dt][2 * i] * p.scale, acc[dt][2 * i + 1] * p.scale);
              if (dq_main != nullptr) {
                const float2 main = load2_float(dq_main + main_off[i] + d);  // even strides (binding)
                sum.x += main.x;
                sum.y += main.y;
              }
              *reinterpret_cast<uint32_t*>(dq + row_off[i] + d) = pack2<T>(sum.x, sum.y);  // the one rounding
            }
          }
        }
      }
      __syncthreads();  // P^T and dS^T of all warps are in shared memory

      if (need_dprefix) {
        // dP_v[keys, dims] += P^T[keys, rows] dO[rows, dims]; dP_k += dS^T Q (scaled when written).
        const T* pt = pt_s + key_block * 16 * kLdT;
        const T* dst = dst_s + key_block * 16 * kLdT;
        warp_mma_ss<T, kRows, 8, /*B_K_CONTIGUOUS=*/false>(acc_dpv, pt, kLdT, do_s + dim_block * 64, kLd);
        warp_mma_ss<T, kRows, 8, /*B_K_CONTIGUOUS=*/false>(acc_dpk, dst, kLdT, q_s + dim_block * 64, kLd);
      }
    }

    if (need_dprefix) {
      // This block's partial sums for the chunk: slice [blockIdx.x][h] of [row_blocks][Hkv][padded_len][kD].
      const int64_t slice = (int64_t(blockIdx.x) * p.heads_kv + h) * padded_len * kD;
#pragma unroll
      for (int dt = 0; dt < 8; ++dt) {
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          const int key = j0 + key_block * 16 + g + 8 * i;
          const int d = dim_block * 64 + dt * 8 + 2 * c;
          const int64_t at = slice + int64_t(key) * kD + d;
          *reinterpret_cast<float2*>(p.dpk_partial + at) =
              make_float2(acc_dpk[dt][2 * i] * p.scale, acc_dpk[dt][2 * i + 1] * p.scale);
          *reinterpret_cast<float2*>(p.dpv_partial + at) = make_float2(acc_dpv[dt][2 * i], acc_dpv[dt][2 * i + 1]);
        }
      }
    }
  }
}

// dprefix[h, j, d] = sum over row blocks x = 0, 1, ... of partial[x, h, j, d], in that order (deterministic).
template <typename T, int kD>
__global__ void prefix_reduce_kernel(const PrefixBwdParams p) {
  const int num_chunks = (p.prefix_len + BwdTraits<kD>::kChunk - 1) / BwdTraits<kD>::kChunk;
  const int padded_len = num_chunks * BwdTraits<kD>::kChunk;
  const int64_t total = int64_t(p.heads_kv) * p.prefix_len * p.head_dim;
  const int64_t slice = int64_t(p.heads_kv) * padded_len * kD;  // one row block's partials
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int d = i % p.head_dim;
    const int j = (i / p.head_dim) % p.prefix_len;
    const int h = i / (int64_t(p.head_dim) * p.prefix_len);
    const int64_t at = (int64_t(h) * padded_len + j) * kD + d;
    float sk = 0.f, sv = 0.f;
    for (int x = 0; x < p.row_blocks; ++x) {
      sk += p.dpk_partial[x * slice + at];
      sv += p.dpv_partial[x * slice + at];
    }
    static_cast<T*>(p.dprefix_k)[i] = from_compute<T>(sk);
    static_cast<T*>(p.dprefix_v)[i] = from_compute<T>(sv);
  }
}

// Which kernels run, on which grids, with which params. `launch(kernel, params, grid, threads, smem_bytes)` runs one
// kernel and returns false when that failed (the CUDA launcher below; the CPU emulation tests pass their own).
template <typename T, int kD, typename Launch>
bool schedule_prefix_backward(const PrefixBwdParams& p, Launch launch) {
  using Tr = BwdTraits<kD>;
  const int chunks = (p.prefix_len + Tr::kChunk - 1) / Tr::kChunk;
  if (chunks == 1) {  // the fused pass: dq and dP_k, dP_v together
    if (!launch(prefix_backward_kernel<T, kD>, p, dim3(p.row_blocks, p.heads_kv, 1), Tr::kThreads,
                Tr::template smem_bytes<T>())) {
      return false;
    }
  } else {
    if (p.dq != nullptr &&
        !launch(prefix_backward_dq_kernel<T, kD>, p, dim3(p.row_blocks, p.heads_kv), DqTraits<kD>::kThreads,
                DqTraits<kD>::template smem_bytes<T>())) {
      return false;
    }
    if (p.dpk_partial != nullptr) {
      PrefixBwdParams dp = p;
      dp.dq = nullptr;
      dp.delta_ready = p.dq != nullptr && p.delta != nullptr;  // stored by the dq kernel
      if (!launch(prefix_backward_kernel<T, kD>, dp, dim3(p.row_blocks, p.heads_kv, chunks), Tr::kThreads,
                  Tr::template smem_bytes<T>())) {
        return false;
      }
    }
  }
  if (p.dpk_partial == nullptr) return true;
  const int64_t total = int64_t(p.heads_kv) * p.prefix_len * p.head_dim;
  return launch(prefix_reduce_kernel<T, kD>, p, dim3(static_cast<unsigned>((total + 255) / 256)), 256, 0);
}

#if !defined(FASTPEFT_HOST_EMULATION)
template <typename T, int kD>
cudaError_t run_prefix_backward_impl(const PrefixBwdParams& p, cudaStream_t stream) {
  cudaError_t err = cudaSuccess;
  auto launch = [&](auto kernel, const PrefixBwdParams& params, dim3 grid, int threads, int smem) {
    err = launch_kernel(kernel, params, grid, threads, smem, stream);
    return err == cudaSuccess;
  };
  schedule_prefix_backward<T, kD>(p, launch);
  return err;
}

#endif  // !FASTPEFT_HOST_EMULATION

}  // namespace prefix

#if !defined(FASTPEFT_HOST_EMULATION)
// The entry point declared in prefix_params.h, explicitly instantiated in prefix_bwd_d*.cu.
template <typename T, int kD>
cudaError_t run_prefix_backward(const PrefixBwdParams& p, cudaStream_t stream) {
  return prefix::run_prefix_backward_impl<T, kD>(p, stream);
}
#endif

}  // namespace fastpeft
