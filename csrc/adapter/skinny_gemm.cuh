// The skinny GEMM: out [N, r] = A [N, K] . B with K = d large, and its two epilogues (gemm_params.h):
//   shrink:  z = acc + b_down; act(z)                          (A = x,  B = W_down, n-major)
//   grad_z:  dz = s * acc * act'(z); act(z); column sums of dy (A = dy, B = W_up, k-major)
//
// Grid: x = row block * column blocks + column block (CTAs that share an A row block are launched next to each
// other, so A comes from DRAM once and from L2 for the other column blocks); y = split of K.
// Included by skinny_<dtype>.cu only: one element type per translation unit, so the build parallelises.
#pragma once

#include <algorithm>

#include "adapter/activation.cuh"
#include "adapter/gemm_tile.cuh"

namespace fastpeft {
namespace adapter {

template <SkinnyMode kMode>
using SkinnyLayoutB = std::bool_constant<kMode == SkinnyMode::kShrink>;  // W_down is n-major, W_up k-major

template <typename T, SkinnyMode kMode>
using SkinnyLayout = SmemLayout<T, kSkinnyBlockM, kSkinnyBlockN, SkinnyLayoutB<kMode>::value>;

__device__ __forceinline__ float scale_of(const float* scale_ptr, double scale) {
  return scale_ptr != nullptr ? *scale_ptr : static_cast<float>(scale);
}

// The epilogue of one output element (row, col) from its float32 sum over K. Outputs are [rows, cols] contiguous.
// Rounding follows the reference: z is rounded to T and act is applied to the rounded z, as F.linear then the
// activation would; dz is rounded once (the reference rounds da, then da * act', then * s).
template <typename T, SkinnyMode kMode>
__device__ __forceinline__ void skinny_epilogue(const SkinnyParams& p, float s, int64_t row, int64_t col, float acc) {
  const int64_t o = row * p.cols + col;
  T* out0 = static_cast<T*>(p.out0);
  T* out1 = static_cast<T*>(p.out1);
  if constexpr (kMode == SkinnyMode::kShrink) {
    const float bias = p.bias != nullptr ? to_compute(static_cast<const T*>(p.bias)[col]) : 0.f;
    const T z = from_compute<T>(acc + bias);
    out0[o] = z;
    out1[o] = from_compute<T>(activate(to_compute(z), p.activation));
  } else {
    const float z = to_compute(static_cast<const T*>(p.z)[row * p.z_ld + col]);
    out0[o] = from_compute<T>(s * acc * activation_derivative(z, p.activation));
    if (out1 != nullptr) out1[o] = from_compute<T>(activate(z, p.activation));
  }
}

// Column sums of the A tile just multiplied (grad_z: dy), for this CTA's row block, written to
// a_colsum[row block][k0 + c]. Thread t sums column t % BK over its group of rows (t / BK), the groups are added in
// group order through `scratch`: a fixed order, so the result is deterministic.
template <class L, typename T>
__device__ __forceinline__ void column_sums(const T* a_tile, float* scratch, float* a_colsum, int64_t row_block,
                                            int64_t k0, int64_t depth) {
  constexpr int kGroups = kThreads / L::kBK;
  constexpr int kRowsPerGroup = L::kBM / kGroups;
  static_assert(kThreads % L::kBK == 0 && L::kBM % kGroups == 0, "column-sum work divides evenly");
  const int c = threadIdx.x % L::kBK;
  const int group = threadIdx.x / L::kBK;
  float sum = 0.f;
#pragma unroll
  for (int i = 0; i < kRowsPerGroup; ++i) sum += to_compute(a_tile[(group * kRowsPerGroup + i) * L::kALd + c]);
  scratch[group * L::kBK + c] = sum;
  __syncthreads();
  if (threadIdx.x < L::kBK && k0 + threadIdx.x < depth) {
    float total = 0.f;
#pragma unroll
    for (int g = 0; g < kGroups; ++g) total += scratch[g * L::kBK + threadIdx.x];
    a_colsum[row_block * depth + k0 + threadIdx.x] = total;
  }
  // `scratch` is written again only after the barrier that ends this K step.
}

template <typename T, SkinnyMode kMode>
__global__ void __launch_bounds__(kThreads) skinny_gemm_kernel(const SkinnyParams p) {
  using L = SkinnyLayout<T, kMode>;
  alignas(128) __shared__ unsigned char smem[L::kBytes];
  __shared__ float scratch[kThreads];  // column sums (grad_z)

  const int64_t col_blocks = ceil_div(p.cols, L::kBN);
  const int64_t row_block = blockIdx.x / col_blocks;
  const int64_t m0 = row_block * L::kBM;
  const int64_t n0 = (blockIdx.x % col_blocks) * L::kBN;
  const int64_t steps = ceil_div(p.depth, L::kBK);
  const int64_t step_begin = blockIdx.y * p.steps_per_split;
  const int64_t step_end = std::min(steps, step_begin + p.steps_per_split);

  const Operand<T> a{static_cast<const T*>(p.a), p.a_ld, p.rows, p.depth, p.a_vec_ok};
  const Operand<T> b = L::kBNMajor ? Operand<T>{static_cast<const T*>(p.b), p.b_ld, p.cols, p.depth, p.b_vec_ok}
                                   : Operand<T>{static_cast<const T*>(p.b), p.b_ld, p.depth, p.cols, p.b_vec_ok};
  // Column sums of dy: one CTA per (row block, split), the one of column block 0. Uniform over the CTA.
  const bool sum_columns = kMode == SkinnyMode::kGradZ && p.a_colsum != nullptr && n0 == 0;

  EngineFor<T, L> engine;
  run_mainloop<L>(engine, smem, a, b, m0, n0, step_begin, step_end, [&](const T* a_tile, int64_t step) {
    if (sum_columns) column_sums<L>(a_tile, scratch, p.a_colsum, row_block, step * L::kBK, p.depth);
  });

  float* stage = L::out_stage(smem);
  engine.store(stage);
  __syncthreads();

  const float s = scale_of(p.scale_ptr, p.scale);
  for (int e = threadIdx.x; e < L::kBM * L::kBN; e += kThreads) {
    const int r = e / L::kBN;
    const int c = e % L::kBN;
    const int64_t row = m0 + r;
    const int64_t col = n0 + c;
    if (row >= p.rows || col >= p.cols) continue;
    const float acc = stage[r * L::kOutLd + c];
    if (p.splits > 1) {
      p.partials[(blockIdx.y * p.rows + row) * p.cols + col] = acc;
    } else {
      skinny_epilogue<T, kMode>(p, s, row, col, acc);
    }
  }
}

// Split-K: out element = epilogue(sum over splits, in split order, of the partial sums).
template <typename T, SkinnyMode kMode>
__global__ void __launch_bounds__(kThreads) skinny_reduce_kernel(const SkinnyParams p) {
  const float s = scale_of(p.scale_ptr, p.scale);
  const int64_t total = p.rows * p.cols;
  for (int64_t i = blockIdx.x * int64_t(kThreads) + threadIdx.x; i < total; i += int64_t(gridDim.x) * kThreads) {
    float acc = 0.f;
    for (int split = 0; split < p.splits; ++split) acc += p.partials[split * total + i];
    skinny_epilogue<T, kMode>(p, s, i / p.cols, i % p.cols, acc);
  }
}

// Launchers: nvcc only (tests/emulation compiles the kernels above with g++ to run them on the CPU).
#if defined(__CUDACC__)

template <typename T, SkinnyMode kMode>
cudaError_t launch_skinny_mode(const SkinnyParams& p, cudaStream_t stream) {
  const int64_t ctas = ceil_div(p.rows, kSkinnyBlockM) * ceil_div(p.cols, kSkinnyBlockN);
  skinny_gemm_kernel<T, kMode><<<dim3(unsigned(ctas), unsigned(p.splits)), kThreads, 0, stream>>>(p);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || p.splits == 1) return err;
  // Elementwise over [rows, cols]; a few thousand CTAs at most, the grid-stride loop covers the rest.
  const int64_t reduce_ctas = std::min<int64_t>(ceil_div(p.rows * p.cols, kThreads), 4096);
  skinny_reduce_kernel<T, kMode><<<unsigned(reduce_ctas), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_skinny_gemm_typed(const SkinnyParams& p, cudaStream_t stream) {
  if (p.rows == 0 || p.cols == 0) return cudaSuccess;  // empty output; an empty grid is not a valid launch
  return p.mode == SkinnyMode::kShrink ? launch_skinny_mode<T, SkinnyMode::kShrink>(p, stream)
                                       : launch_skinny_mode<T, SkinnyMode::kGradZ>(p, stream);
}

#endif  // defined(__CUDACC__)

}  // namespace adapter
}  // namespace fastpeft
