// The adapter's fused matrix-product kernels: what they compute, their parameters, their tile sizes.
//
// The adapter y = h + s * (act(x W_down^T + b_down) W_up^T + b_up) and its backward are four matrix products.
// Two kernel families compute them, each with its own epilogue fused in:
//
//   "skinny" GEMM: out [N, r] = A [N, K] . B with K = d (large) and r small. The loop over K reads the [N, d]
//     operand exactly once when r fits one column tile. Splits K across CTAs when N alone gives too few CTAs.
//       shrink (forward):  A = x,  B = W_down^T  ->  z = acc + b_down, and act(z)
//       grad_z (backward): A = dy, B = W_up      ->  dz = s * acc * act'(z), optionally act(z), and per-row-block
//                                                    column sums of dy (for db_up and the learned scale's gradient)
//   "wide" GEMM: out [N, D] = residual + s * (A [N, r] . B + bias) with K = r small and D = d large: the [N, D]
//     product never goes to memory; the epilogue reads the residual and writes the result once.
//       expand (forward):  A = act(z), B = W_up^T, residual = h (or x), bias = b_up      ->  y
//       grad_x (backward): A = dz,     B = W_down, residual = dy when x is h, s = 1     ->  dx
//
// The two weight gradients (dW_up = s dy^T act(z), dW_down = dz^T x) reduce over N: cuBLAS does those.
//
// Plain structs without torch types: csrc/bindings/adapter_binding.cpp checks the tensors and fills them.
// Matrices are row-major with a row stride ("ld", in elements) and unit column stride. A matrix's `vec_ok` says
// that its base address is 16-byte aligned and its row stride a multiple of 16 bytes, so 16-byte chunks of a row
// can be moved as one access; without it every element is moved on its own (correct, slower).
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "common/dtype.h"

namespace fastpeft {
namespace adapter {

// Order and names match fastpeft.reference.ACTIVATIONS; the binding maps the name.
enum class Activation : int { kIdentity = 0, kRelu, kGelu, kGeluTanh, kSilu, kTanh };

__host__ __device__ constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ------------------------------------------------------------------------------------------------ tile sizes
// One source of truth for the host (the binding's split arithmetic, fastpeft/ops/_adapter_cuda.py's plan, checked
// against these by a test) and the kernels.

constexpr int kThreads = 256;  // 8 warps per CTA in both GEMM kernels
constexpr int kStages = 3;     // depth of the cp.async pipeline over K

constexpr int kSkinnyBlockM = 128;  // rows of N per CTA
constexpr int kSkinnyBlockN = 64;   // columns of r per CTA
constexpr int kWideBlockM = 64;     // rows of N per CTA
constexpr int kWideBlockN = 128;    // columns of d per CTA

// K per pipeline stage: 32 for the 16-bit types (two m16n16k16 tensor-core steps), 16 for float32 (its elements are
// twice as wide; this keeps three stages within the 48 KB of static shared memory).
constexpr int kBlockK16Bit = 32;
constexpr int kBlockKFloat = 16;
constexpr int block_k(DType dtype) { return dtype == DType::kFloat32 ? kBlockKFloat : kBlockK16Bit; }

// The split of K the skinny kernel runs when `requested` splits are asked for: every split does `steps_per_split`
// steps of block_k(dtype) and none is empty (fastpeft/ops/_adapter_cuda.py's `normalised_splits` mirrors this).
struct SplitK {
  int64_t splits;
  int64_t steps_per_split;
};
constexpr SplitK split_k(int64_t depth, DType dtype, int64_t requested) {
  const int64_t steps = ceil_div(depth, block_k(dtype));
  if (steps <= 1 || requested <= 1) return {1, steps};
  const int64_t per_split = ceil_div(steps, requested < steps ? requested : steps);
  return {ceil_div(steps, per_split), per_split};
}

// ------------------------------------------------------------------------------------------------ parameters

enum class SkinnyMode : int { kShrink = 0, kGradZ = 1 };

struct SkinnyParams {
  DType dtype;                  // of every matrix below (fp16, bf16 or fp32); partials and sums are float32
  SkinnyMode mode = SkinnyMode::kShrink;
  Activation activation = Activation::kIdentity;
  int64_t rows = 0;             // N
  int64_t cols = 0;             // r
  int64_t depth = 0;            // K: d_in (shrink) or d_out (grad_z)

  const void* a = nullptr;      // [rows, depth]: x (shrink) or dy (grad_z)
  int64_t a_ld = 0;
  bool a_vec_ok = false;
  // B as stored: shrink: W_down [cols, depth] ("n-major", nn.Linear layout); grad_z: W_up [depth, cols] ("k-major").
  const void* b = nullptr;
  int64_t b_ld = 0;
  bool b_vec_ok = false;

  const void* bias = nullptr;   // shrink: b_down [cols], or nullptr
  const void* z = nullptr;      // grad_z: the saved pre-activation [rows, cols]
  int64_t z_ld = 0;
  // grad_z: the scale s, from a device pointer to one float32 when it is a (learned) tensor, else `scale`.
  const float* scale_ptr = nullptr;
  double scale = 1.0;

  // Outputs, contiguous [rows, cols]. shrink: out0 = z, out1 = act(z). grad_z: out0 = dz, out1 = act(z) or nullptr.
  void* out0 = nullptr;
  void* out1 = nullptr;
  // grad_z only, or nullptr: a_colsum[m][k] = sum of A[row][k] over the rows of row block m (kSkinnyBlockM rows),
  // [ceil(rows / kSkinnyBlockM), depth] float32. Summing it over m (fixed order) gives colsum(dy) deterministically.
  float* a_colsum = nullptr;

  // Split of K across gridDim.y: split s covers K steps [s * steps_per_split, (s + 1) * steps_per_split) of
  // block_k(dtype) each. With splits > 1 each split writes its float32 sums to partials [splits, rows, cols] and a
  // second kernel adds them in split order and applies the epilogue (deterministic, no atomics).
  int splits = 1;
  int64_t steps_per_split = 0;
  float* partials = nullptr;
};

struct WideParams {
  DType dtype;                  // of every matrix below (fp16, bf16 or fp32)
  int64_t rows = 0;             // N
  int64_t cols = 0;             // D: d_out (expand) or d_in (grad_x)
  int64_t depth = 0;            // r

  const void* a = nullptr;      // [rows, depth]: act(z) (expand) or dz (grad_x)
  int64_t a_ld = 0;
  bool a_vec_ok = false;
  // B as stored: expand: W_up [cols, depth] (b_n_major, nn.Linear layout); grad_x: W_down [depth, cols].
  bool b_n_major = true;
  const void* b = nullptr;
  int64_t b_ld = 0;
  bool b_vec_ok = false;

  const void* residual = nullptr;  // [rows, cols] or nullptr: h or x (expand), dy when x is h (grad_x)
  int64_t residual_ld = 0;
  bool residual_vec_ok = false;
  const void* bias = nullptr;      // [cols] or nullptr (b_up)
  bool bias_vec_ok = false;
  const float* scale_ptr = nullptr;  // s as in SkinnyParams (grad_x: nullptr and 1)
  double scale = 1.0;

  void* out = nullptr;             // [rows, cols], contiguous
  bool out_vec_ok = false;
};

// Launch on `stream`; return cudaSuccess or the launch error. Nothing is launched for an empty output.
cudaError_t launch_skinny_gemm(const SkinnyParams& params, cudaStream_t stream);
cudaError_t launch_wide_gemm(const WideParams& params, cudaStream_t stream);

// The per-dtype launchers behind them, one translation unit per element type (skinny_*.cu, wide_*.cu).
template <typename T>
cudaError_t launch_skinny_gemm_typed(const SkinnyParams& params, cudaStream_t stream);
template <typename T>
cudaError_t launch_wide_gemm_typed(const WideParams& params, cudaStream_t stream);

}  // namespace adapter
}  // namespace fastpeft
