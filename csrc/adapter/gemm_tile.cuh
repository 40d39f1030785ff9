// Building blocks shared by the skinny and wide adapter GEMM kernels (gemm_params.h says what those compute):
//
//   Operand      a row-major matrix in global memory, with its bounds
//   load_tile    global -> shared copy of one tile: 16-byte cp.async chunks (CUDA's documented pipeline
//                primitives) where a chunk is in bounds and aligned, element by element with zero fill elsewhere
//   SmemLayout   the shared-memory layout of the K pipeline and of the float32 accumulator stage aliasing it
//   WmmaEngine   fp16 / bf16 tile product on tensor cores (nvcuda::wmma m16n16k16, float32 accumulation)
//   FmaEngine    float32 tile product with FFMA (true float32, never TF32)
//   run_mainloop the K loop: a kStages-deep cp.async pipeline feeding an engine
//
// Every CTA computes one BM x BN tile of out = A . B, with A [rows, depth] row-major and B given either
// "n-major" (stored [n][k], the nn.Linear layout of a weight used as B^T) or "k-major" (stored [k][n]).
// After the K loop the engine writes its float32 accumulators to shared memory (the "stage", [BM][BN + 4]) so that
// the epilogues are plain code over (row, column) indices, independent of fragment layouts.
#pragma once

#include <cstdint>
#include <type_traits>

#include <cuda_pipeline.h>
#include <cuda_runtime.h>
#include <mma.h>

#include "adapter/gemm_params.h"
#include "common/numeric.cuh"

namespace fastpeft {
namespace adapter {

// 16 bytes of consecutive elements of one row: one global or shared memory access.
template <typename T>
struct alignas(16) Chunk {
  static constexpr int kSize = 16 / sizeof(T);
  T v[kSize];
};

template <typename T>
struct BlockK {
  static constexpr int value = kBlockK16Bit;
};
template <>
struct BlockK<float> {
  static constexpr int value = kBlockKFloat;
};

// A row-major matrix in global memory: element (i, j) at ptr[i * ld + j], valid for i < rows and j < cols.
template <typename T>
struct Operand {
  const T* ptr;
  int64_t ld;
  int64_t rows;
  int64_t cols;
  bool vec_ok;  // ptr 16-byte aligned and ld a multiple of Chunk<T>::kSize
};

// Copies rows [row0, row0 + ROWS) x cols [col0, col0 + COLS) of `g` into smem (row stride SLD elements); elements
// outside the matrix become zero, so partial tiles need no special case in the products. col0 must be a multiple
// of the chunk size (tile offsets always are). In-bounds aligned chunks go through cp.async and are complete after
// the caller's __pipeline_wait_prior; the others are plain shared stores. Both are visible to the whole CTA after
// the caller's next __syncthreads().
template <typename T, int ROWS, int COLS, int SLD>
__device__ __forceinline__ void load_tile(T* smem, const Operand<T>& g, int64_t row0, int64_t col0) {
  constexpr int kVec = Chunk<T>::kSize;
  constexpr int kChunksPerRow = COLS / kVec;
  constexpr int kChunks = ROWS * kChunksPerRow;
  static_assert(COLS % kVec == 0, "tile rows must be whole 16-byte chunks");
  static_assert((SLD * sizeof(T)) % 16 == 0, "shared tile rows must stay 16-byte aligned");
  static_assert(kChunks % kThreads == 0, "every thread copies the same number of chunks");
  const T zero = from_compute<T>(0.f);
#pragma unroll
  for (int i = 0; i < kChunks / kThreads; ++i) {
    const int chunk = threadIdx.x + i * kThreads;
    const int r = chunk / kChunksPerRow;
    const int c = (chunk % kChunksPerRow) * kVec;
    const int64_t row = row0 + r;
    const int64_t col = col0 + c;
    T* dst = smem + r * SLD + c;
    if (g.vec_ok && row < g.rows && col + kVec <= g.cols) {
      __pipeline_memcpy_async(dst, g.ptr + row * g.ld + col, 16);
    } else {
      // The cold path (partial or unaligned chunks): one element at a time, kept compact.
      const int64_t valid = row < g.rows ? g.cols - col : 0;
      const T* src = g.ptr + row * g.ld + col;
#pragma unroll 1
      for (int e = 0; e < kVec; ++e) dst[e] = e < valid ? src[e] : zero;
    }
  }
}

// Shared memory of one CTA: kStages x (A tile [BM][BK + pad], B tile), then reused for the float32 stage.
// The pad (one 16-byte chunk per row) makes every row stride an odd multiple of 16 bytes, so the 8 rows that a
// tensor-core fragment load reads 16 bytes of at once fall in 8 distinct groups of 4 banks; rows stay 16-byte
// aligned for cp.async.
template <typename T, int BM, int BN, bool BNMajor>
struct SmemLayout {
  static constexpr int kBM = BM;
  static constexpr int kBN = BN;
  static constexpr bool kBNMajor = BNMajor;
  static constexpr int kBK = BlockK<T>::value;
  static constexpr int kPad = Chunk<T>::kSize;
  static constexpr int kALd = kBK + kPad;                    // A tile: [BM][kALd]
  static constexpr int kBRows = BNMajor ? BN : kBK;          // B tile: [BN][kBK + pad] or [BK][BN + pad]
  static constexpr int kBLd = (BNMajor ? kBK : BN) + kPad;
  static constexpr int kAElems = BM * kALd;
  static constexpr int kBElems = kBRows * kBLd;
  static constexpr int kStageElems = kAElems + kBElems;
  static constexpr int kPipelineBytes = kStages * kStageElems * int(sizeof(T));
  static constexpr int kOutLd = BN + 4;                      // float32 accumulator stage: [BM][kOutLd]
  static constexpr int kOutBytes = BM * kOutLd * int(sizeof(float));
  static constexpr int kBytes = kPipelineBytes > kOutBytes ? kPipelineBytes : kOutBytes;

  // wmma::load_matrix_sync / store_matrix_sync need 32-byte aligned pointers and ldm a multiple of 16 bytes;
  // fragment tiles start at multiples of 16 rows and 16 columns, so these make every such pointer aligned.
  static_assert((kAElems * sizeof(T)) % 32 == 0 && (kBElems * sizeof(T)) % 32 == 0, "stage offsets 32-byte aligned");
  static_assert((kALd * sizeof(T)) % 16 == 0 && (kBLd * sizeof(T)) % 16 == 0, "ldm must be a multiple of 16 bytes");
  static_assert((kALd * sizeof(T) / 16) % 2 == 1 && (kBLd * sizeof(T) / 16) % 2 == 1, "odd 16-byte row strides");
  static_assert((kOutLd * sizeof(float)) % 16 == 0, "stage ldm must be a multiple of 16 bytes");
  static_assert(BM % 32 == 0 && BN % 32 == 0 && kBK % 16 == 0, "tiles are whole 32x32 warp tiles, K whole k16 steps");
  static_assert(kBytes + 1024 <= 48 * 1024, "static shared memory (plus the 1 KB column-sum scratch) over 48 KB");

  __device__ static T* a_tile(unsigned char* smem, int slot) {
    return reinterpret_cast<T*>(smem) + slot * kStageElems;
  }
  __device__ static T* b_tile(unsigned char* smem, int slot) {
    return reinterpret_cast<T*>(smem) + slot * kStageElems + kAElems;
  }
  __device__ static float* out_stage(unsigned char* smem) { return reinterpret_cast<float*>(smem); }
};

// Tensor-core engine (fp16, bf16): 8 warps in a (BM / 32) x (BN / 32) grid, each warp owns a 32 x 32 block of
// the CTA tile as 2 x 2 wmma 16 x 16 float32 accumulator fragments.
template <typename T, class L>
struct WmmaEngine {
  static constexpr bool kBNMajor = L::kBNMajor;
  static constexpr int kWarpsN = L::kBN / 32;
  static_assert((L::kBM / 32) * kWarpsN * 32 == kThreads, "one 32x32 warp tile per warp");
  // B fragment (k, n) element: n-major tiles hold it at [n * ld + k] (wmma col_major), k-major at [k * ld + n].
  using BLayout = std::conditional_t<kBNMajor, nvcuda::wmma::col_major, nvcuda::wmma::row_major>;

  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> acc[2][2];
  int row0;  // first tile row of this warp's block
  int col0;  // first tile column of this warp's block

  __device__ WmmaEngine() {
    const int warp = threadIdx.x / 32;
    row0 = (warp / kWarpsN) * 32;
    col0 = (warp % kWarpsN) * 32;
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) nvcuda::wmma::fill_fragment(acc[i][j], 0.f);
  }

  // acc += A tile [BM][BK] . B tile.
  __device__ void multiply(const T* a, const T* b) {
    using namespace nvcuda;
#pragma unroll
    for (int k = 0; k < L::kBK; k += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, BLayout> fb[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(fa[i], a + (row0 + 16 * i) * L::kALd + k, L::kALd);
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int n = col0 + 16 * j;
        const T* src = kBNMajor ? b + n * L::kBLd + k : b + k * L::kBLd + n;
        wmma::load_matrix_sync(fb[j], src, L::kBLd);
      }
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
  }

  // stage[r][c] = accumulator of tile element (r, c).
  __device__ void store(float* stage) const {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        float* dst = stage + (row0 + 16 * i) * L::kOutLd + col0 + 16 * j;
        nvcuda::wmma::store_matrix_sync(dst, acc[i][j], L::kOutLd, nvcuda::wmma::mem_row_major);
      }
  }
};

// FFMA engine (float32): threads in a 16 x 16 grid; thread (ty, tx) owns tile rows ty + 16 i and columns
// tx + 16 j, so a warp's 16 neighbouring tx read neighbouring B columns and two A rows (broadcasts).
// Products and sums are plain float32 fmaf, in K order: accurate to float32, no TF32.
template <class L>
struct FmaEngine {
  static constexpr bool kBNMajor = L::kBNMajor;
  static constexpr int kRows = L::kBM / 16;
  static constexpr int kCols = L::kBN / 16;
  static_assert(kThreads == 256, "a 16 x 16 thread grid");

  float acc[kRows][kCols];
  int ty;
  int tx;

  __device__ FmaEngine() : ty(threadIdx.x / 16), tx(threadIdx.x % 16) {
#pragma unroll
    for (int i = 0; i < kRows; ++i)
#pragma unroll
      for (int j = 0; j < kCols; ++j) acc[i][j] = 0.f;
  }

  __device__ void multiply(const float* a, const float* b) {
#pragma unroll
    for (int k = 0; k < L::kBK; ++k) {
      float av[kRows];
      float bv[kCols];
#pragma unroll
      for (int i = 0; i < kRows; ++i) av[i] = a[(ty + 16 * i) * L::kALd + k];
#pragma unroll
      for (int j = 0; j < kCols; ++j) {
        const int n = tx + 16 * j;
        bv[j] = kBNMajor ? b[n * L::kBLd + k] : b[k * L::kBLd + n];
      }
#pragma unroll
      for (int i = 0; i < kRows; ++i)
#pragma unroll
        for (int j = 0; j < kCols; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
    }
  }

  __device__ void store(float* stage) const {
#pragma unroll
    for (int i = 0; i < kRows; ++i)
#pragma unroll
      for (int j = 0; j < kCols; ++j) stage[(ty + 16 * i) * L::kOutLd + tx + 16 * j] = acc[i][j];
  }
};

template <typename T, class L>
using EngineFor = std::conditional_t<std::is_same_v<T, float>, FmaEngine<L>, WmmaEngine<T, L>>;

// The K loop of one CTA: engine.acc += A[m0 : m0 + BM, K steps] . B[K steps, n0 : n0 + BN] over the K steps
// [step_begin, step_end) of L::kBK each, through a kStages-deep cp.async pipeline:
//
//   prologue: issue the copies of the first kStages - 1 steps, one commit group per step
//   step i:   issue the copies of step i + kStages - 1 into the slot step i - 1 used (freed by the barrier that
//             ended step i - 1), commit (an empty group past the end keeps the count uniform), wait until at most
//             kStages - 1 groups are pending (so step i's group is complete), barrier, multiply, then
//             `after_multiply(a_tile, step)`, barrier (every warp is done with slot i % kStages before it is
//             overwritten)
//
// On return every copy has completed and no warp reads the pipeline buffers: the caller may reuse them.
template <class L, class Engine, typename T, typename AfterMultiply>
__device__ __forceinline__ void run_mainloop(Engine& engine, unsigned char* smem, const Operand<T>& a,
                                             const Operand<T>& b, int64_t m0, int64_t n0,
                                             int64_t step_begin, int64_t step_end, AfterMultiply after_multiply) {
  auto issue = [&](int64_t step, int slot) {
    const int64_t k0 = step * L::kBK;
    load_tile<T, L::kBM, L::kBK, L::kALd>(L::a_tile(smem, slot), a, m0, k0);
    if constexpr (L::kBNMajor) {
      load_tile<T, L::kBRows, L::kBK, L::kBLd>(L::b_tile(smem, slot), b, n0, k0);
    } else {
      load_tile<T, L::kBRows, L::kBN, L::kBLd>(L::b_tile(smem, slot), b, k0, n0);
    }
  };
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (step_begin + s < step_end) issue(step_begin + s, s);
    __pipeline_commit();
  }
  for (int64_t step = step_begin; step < step_end; ++step) {
    const int64_t i = step - step_begin;
    const int64_t ahead = step + kStages - 1;
    if (ahead < step_end) issue(ahead, int((i + kStages - 1) % kStages));
    __pipeline_commit();
    __pipeline_wait_prior(kStages - 1);
    __syncthreads();
    const int slot = int(i % kStages);
    engine.multiply(L::a_tile(smem, slot), L::b_tile(smem, slot));
    after_multiply(L::a_tile(smem, slot), step);
    __syncthreads();
  }
  __pipeline_wait_prior(0);  // only empty groups can be pending here; this makes "all copies done" local and obvious
  __syncthreads();
}

}  // namespace adapter
}  // namespace fastpeft
