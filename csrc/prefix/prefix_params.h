// Parameters of the fused prefix-attention kernels (forward and backward). Plain structs, no torch types:
// csrc/bindings/prefix_binding.cpp checks the tensors and fills them.
//
// Shapes: q [B, Hq, T, D]; prefix_k, prefix_v [Hkv, L, D] (shared by the batch); G = Hq / Hkv query heads per key/value
// head (query head hq reads key/value head hq / G).
//
// Batch folding: for key/value head h, the rows (b, g, t) of q, b < B, g < G, t < T, all attend to the same L prefix
// keys. The kernels treat them as one matrix of R = B * G * T rows ("folded rows"), row r = (b * G + g) * T + t,
// query head hq = h * G + g. Grid: (row_blocks, Hkv); block x of head h handles row tiles x, x + row_blocks, ...
//
// Conventions:
// - Log-sum-exps (LSE) are natural-log, float32: L = log sum_j exp(s_j), s_j = scale * q . k_j.
// - lse_main of a row that sees no main key is not finite: flash attention writes +inf (non-split FA2), the
//   memory-efficient kernel -inf. The forward kernel reads every non-finite lse_main as "no main key": the row takes
//   the prefix alone (O = O_pre, L = L_pre) and its out_main is not read (it may be NaN). out_main == nullptr means
//   there are no main keys at all (S == 0).
// - The merge: O = O_main + sigmoid(L_pre - L_main) (O_pre - O_main), L = logaddexp(L_main, L_pre) (PAPER.md 3).
// - Backward (the ring-attention recipe): the prefix probabilities are recomputed against the *merged* LSE,
//   P = exp(scale * q . p_k - L), and D = rowsum(dO * O) uses the *merged* output, so that the prefix part of every
//   gradient is exact: dS = P * (dO . p_v - D), dq = dq_main + scale * dS P_k, dP_k = scale * dS^T q,
//   dP_v = P^T dO.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "common/dtype.h"

namespace fastpeft {

// Head dims the kernels are compiled for: D is padded (with zeros, in shared memory) to the next of 64, 128, 256.
// Real D: 32..256, a multiple of 8 (16-byte vector loads).
constexpr int prefix_head_dim_bucket(int head_dim) { return head_dim <= 64 ? 64 : head_dim <= 128 ? 128 : 256; }

struct PrefixFwdParams {
  DType dtype;  // kFloat16 or kBFloat16 (all tensors but the LSEs)
  int batch = 0, heads_q = 0, heads_kv = 0, steps = 0;  // B, Hq, Hkv, T
  int head_dim = 0, prefix_len = 0;                      // D, L
  float scale = 1.f;                                     // score scale (natural-log domain)

  // q [B, Hq, T, D]: last dim contiguous; strides in elements, multiples of 8; base 16-byte aligned.
  const void* q = nullptr;
  int64_t q_stride_b = 0, q_stride_h = 0, q_stride_t = 0;
  // prefix_k, prefix_v [Hkv, L, D], contiguous, 16-byte aligned.
  const void* prefix_k = nullptr;
  const void* prefix_v = nullptr;
  // The main attention's state: out_main [B, Hq, T, D] (last dim contiguous, even strides, 4-byte aligned) and
  // lse_main [B, Hq, T] float32 (any strides). Both nullptr when there are no main keys.
  const void* out_main = nullptr;
  int64_t om_stride_b = 0, om_stride_h = 0, om_stride_t = 0;
  const float* lse_main = nullptr;
  int64_t lm_stride_b = 0, lm_stride_h = 0, lm_stride_t = 0;
  // Results: out [B, Hq, T, D] contiguous (q's dtype), lse [B, Hq, T] contiguous float32 (merged).
  void* out = nullptr;
  float* lse = nullptr;

  int row_blocks = 1;  // gridDim.x
};

struct PrefixBwdParams {
  DType dtype;
  int batch = 0, heads_q = 0, heads_kv = 0, steps = 0;
  int head_dim = 0, prefix_len = 0;
  float scale = 1.f;

  // dout, q: [B, Hq, T, D], last dim contiguous, strides multiples of 8, 16-byte aligned.
  const void* dout = nullptr;
  int64_t do_stride_b = 0, do_stride_h = 0, do_stride_t = 0;
  const void* q = nullptr;
  int64_t q_stride_b = 0, q_stride_h = 0, q_stride_t = 0;
  const void* prefix_k = nullptr;  // [Hkv, L, D] contiguous
  const void* prefix_v = nullptr;
  const void* out = nullptr;  // merged output [B, Hq, T, D] contiguous
  const float* lse = nullptr; // merged LSE [B, Hq, T] contiguous float32

  // dq_main [B, Hq, T, D] (last dim contiguous, even strides, 4-byte aligned): the main part's dq, read once;
  // nullptr when there is none (no main keys: zero). dq [B, Hq, T, D] contiguous: written with dq_main + the prefix
  // part (one rounding); nullptr when dq is not needed.
  const void* dq_main = nullptr;
  int64_t dqm_stride_b = 0, dqm_stride_h = 0, dqm_stride_t = 0;
  void* dq = nullptr;
  // D = rowsum(dO * O) per row ([B, Hq, T] contiguous float32). With several prefix chunks and both dq and the prefix
  // gradients wanted, the dq kernel stores it here and the dP kernel reads it back (`delta_ready`) instead of reading
  // O again. nullptr otherwise (the kernels compute D from O themselves).
  float* delta = nullptr;
  bool delta_ready = false;

  // Per-block partial sums of dprefix_k and dprefix_v, float32 [row_blocks, Hkv, chunks * chunk, bucket(D)]; the
  // reduction kernel sums them over row blocks in a fixed order (deterministic) into dprefix_k / dprefix_v
  // ([Hkv, L, D] contiguous, the prefix's dtype). All nullptr when the prefix gradients are not needed.
  float* dpk_partial = nullptr;
  float* dpv_partial = nullptr;
  void* dprefix_k = nullptr;
  void* dprefix_v = nullptr;

  int row_blocks = 1;  // gridDim.x
};

// Prefix keys per chunk of the backward's dP kernel for head-dim bucket `bucket` (see prefix_bwd_kernel.cuh). With one
// chunk (L <= 64, 32, 16 for D <= 64, 128, 256) one fused kernel gives dq and dP_k, dP_v; with more, a dq kernel and
// a chunk-parallel dP kernel share the work.
constexpr int prefix_bwd_chunk(int bucket) { return 4096 / bucket; }
constexpr int prefix_bwd_chunks(int prefix_len, int head_dim) {
  const int chunk = prefix_bwd_chunk(prefix_head_dim_bucket(head_dim));
  return (prefix_len + chunk - 1) / chunk;
}
// Rows per tile (both kernels): 4 warps x 16 rows.
constexpr int kPrefixRowsPerTile = 64;

// Row blocks for a launch: enough blocks to fill the GPU about twice (sms = multiprocessor count), never more than
// there are row tiles. Depends only on the shapes and the GPU, so results are reproducible on a given GPU.
int prefix_row_blocks(int batch, int heads_q, int heads_kv, int steps, int sms);

// Launch on `stream`; return the launch status. D bucket and dtype are dispatched inside.
cudaError_t launch_prefix_forward(const PrefixFwdParams& params, cudaStream_t stream);
cudaError_t launch_prefix_backward(const PrefixBwdParams& params, cudaStream_t stream);

// Per-(dtype, bucket) entry points, instantiated one file each (prefix_{fwd,bwd}_d{64,128,256}.cu).
template <typename T, int kD>
cudaError_t run_prefix_forward(const PrefixFwdParams& params, cudaStream_t stream);
template <typename T, int kD>
cudaError_t run_prefix_backward(const PrefixBwdParams& params, cudaStream_t stream);

}  // namespace fastpeft
