// The wide GEMM: out [N, D] = residual + s * (A [N, r] . B + bias), K = r small and D = d large (gemm_params.h):
//   expand:  y  = h + s * (act(z) W_up^T + b_up)   (B = W_up, n-major)
//   grad_x:  dx = dz W_down (+ dy when x is h)     (B = W_down, k-major; s = 1, no bias)
// The [N, D] product exists only as float32 accumulators in registers and shared memory: the epilogue reads the
// residual once and writes the result once, in 16-byte chunks where the layout allows.
//
// Grid: x = row block * column blocks + column block: the CTAs of one row block run together, so A (r wide) and B
// (all of it, d x r) are read from L2 after the first CTA.
// Included by wide_<dtype>.cu only: one element type per translation unit, so the build parallelises.
#pragma once

#include <algorithm>

#include "adapter/gemm_tile.cuh"

namespace fastpeft {
namespace adapter {

template <typename T, bool kBNMajor>
using WideLayout = SmemLayout<T, kWideBlockM, kWideBlockN, kBNMajor>;

// Loads up to kSize elements of one row starting at `src` as float32 (one 16-byte access when `vec` and the whole
// chunk is valid; element by element otherwise). Elements at or past `valid` are left untouched.
template <typename T>
__device__ __forceinline__ void load_chunk(const T* src, bool vec, int valid, float* dst) {
  constexpr int kVec = Chunk<T>::kSize;
  if (vec && valid == kVec) {
    const Chunk<T> chunk = *reinterpret_cast<const Chunk<T>*>(src);
#pragma unroll
    for (int e = 0; e < kVec; ++e) dst[e] = to_compute(chunk.v[e]);
  } else {
#pragma unroll
    for (int e = 0; e < kVec; ++e)
      if (e < valid) dst[e] = to_compute(src[e]);
  }
}

template <typename T>
__device__ __forceinline__ void store_chunk(T* dst, bool vec, int valid, const float* src) {
  constexpr int kVec = Chunk<T>::kSize;
  if (vec && valid == kVec) {
    Chunk<T> chunk;
#pragma unroll
    for (int e = 0; e < kVec; ++e) chunk.v[e] = from_compute<T>(src[e]);
    *reinterpret_cast<Chunk<T>*>(dst) = chunk;
  } else {
#pragma unroll
    for (int e = 0; e < kVec; ++e)
      if (e < valid) dst[e] = from_compute<T>(src[e]);
  }
}

template <typename T, bool kBNMajor>
__global__ void __launch_bounds__(kThreads) wide_gemm_kernel(const WideParams p) {
  using L = WideLayout<T, kBNMajor>;
  alignas(128) __shared__ unsigned char smem[L::kBytes];

  const int64_t col_blocks = ceil_div(p.cols, L::kBN);
  const int64_t m0 = (blockIdx.x / col_blocks) * L::kBM;
  const int64_t n0 = (blockIdx.x % col_blocks) * L::kBN;

  const Operand<T> a{static_cast<const T*>(p.a), p.a_ld, p.rows, p.depth, p.a_vec_ok};
  const Operand<T> b = kBNMajor ? Operand<T>{static_cast<const T*>(p.b), p.b_ld, p.cols, p.depth, p.b_vec_ok}
                                : Operand<T>{static_cast<const T*>(p.b), p.b_ld, p.depth, p.cols, p.b_vec_ok};
  EngineFor<T, L> engine;
  run_mainloop<L>(engine, smem, a, b, m0, n0, int64_t(0), ceil_div(p.depth, L::kBK), [](const T*, int64_t) {});

  float* stage = L::out_stage(smem);
  engine.store(stage);
  __syncthreads();

  // Epilogue in 16-byte chunks: the kChunksPerRow neighbouring threads of a row read and write one contiguous
  // segment. The residual is the epilogue's one operand from DRAM: all of this thread's residual chunks are loaded
  // first, so that their latencies overlap (a load after each store would wait for it: the pointers may alias).
  constexpr int kVec = Chunk<T>::kSize;
  constexpr int kChunksPerRow = L::kBN / kVec;
  constexpr int kChunksPerThread = L::kBM * kChunksPerRow / kThreads;
  static_assert(L::kBN % kVec == 0 && (L::kBM * kChunksPerRow) % kThreads == 0, "tile rows are whole chunks");
  const T* residual = static_cast<const T*>(p.residual);
  const T* bias = static_cast<const T*>(p.bias);
  T* out = static_cast<T*>(p.out);
  auto tile_row = [](int i) { return (int(threadIdx.x) + i * kThreads) / kChunksPerRow; };
  auto tile_col = [](int i) { return (int(threadIdx.x) + i * kThreads) % kChunksPerRow * kVec; };

  float res[kChunksPerThread][kVec];
#pragma unroll
  for (int i = 0; i < kChunksPerThread; ++i) {
    const int64_t row = m0 + tile_row(i);
    const int64_t col = n0 + tile_col(i);
#pragma unroll
    for (int e = 0; e < kVec; ++e) res[i][e] = 0.f;
    if (residual != nullptr && row < p.rows && col < p.cols) {
      const int valid = int(std::min<int64_t>(kVec, p.cols - col));
      load_chunk(residual + row * p.residual_ld + col, p.residual_vec_ok, valid, res[i]);
    }
  }

  const float s = p.scale_ptr != nullptr ? *p.scale_ptr : static_cast<float>(p.scale);
#pragma unroll
  for (int i = 0; i < kChunksPerThread; ++i) {
    const int r = tile_row(i);
    const int c = tile_col(i);
    const int64_t row = m0 + r;
    const int64_t col = n0 + c;
    if (row >= p.rows || col >= p.cols) continue;
    const int valid = int(std::min<int64_t>(kVec, p.cols - col));
    float add[kVec];
#pragma unroll
    for (int e = 0; e < kVec; ++e) add[e] = 0.f;
    if (bias != nullptr) load_chunk(bias + col, p.bias_vec_ok, valid, add);
    float value[kVec];
#pragma unroll
    for (int e = 0; e < kVec; ++e) value[e] = res[i][e] + s * (stage[r * L::kOutLd + c + e] + add[e]);
    store_chunk(out + row * p.cols + col, p.out_vec_ok, valid, value);
  }
}

// Launchers: nvcc only (tests/emulation compiles the kernels above with g++ to run them on the CPU).
#if defined(__CUDACC__)

template <typename T>
cudaError_t launch_wide_gemm_typed(const WideParams& p, cudaStream_t stream) {
  if (p.rows == 0 || p.cols == 0) return cudaSuccess;  // empty output; an empty grid is not a valid launch
  const int64_t ctas = ceil_div(p.rows, kWideBlockM) * ceil_div(p.cols, kWideBlockN);
  if (p.b_n_major) {
    wide_gemm_kernel<T, true><<<unsigned(ctas), kThreads, 0, stream>>>(p);
  } else {
    wide_gemm_kernel<T, false><<<unsigned(ctas), kThreads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

#endif  // defined(__CUDACC__)

}  // namespace adapter
}  // namespace fastpeft
