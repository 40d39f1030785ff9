// Warp-level tensor-core products for the prefix kernels: mma.sync m16n8k16 (bf16 / fp16 inputs, fp32 accumulators),
// operands read from shared memory with explicit index math (no ldmatrix, no swizzles: every address is written out
// below so that it can be checked by reading).
//
// Fragment layouts of mma.sync.aligned.m16n8k16.row.col (PTX ISA, "Matrix Fragments for mma.m16n8k16"). In a warp,
// lane = threadIdx.x % 32, g = lane / 4 (0..7), c = lane % 4 (0..3). Each 32-bit register holds two 16-bit elements,
// the one with the smaller k (or column) index in the low half.
//
//   A (16 x 16, m x k):  a[0] = A[g    ][2c, 2c+1]   a[1] = A[g + 8][2c, 2c+1]
//                        a[2] = A[g    ][2c+8, 2c+9] a[3] = A[g + 8][2c+8, 2c+9]
//   B (16 x 8, k x n):   b[0] = B[2c, 2c+1][g]       b[1] = B[2c+8, 2c+9][g]
//   C (16 x 8, fp32):    c[0], c[1] = C[g][2c, 2c+1] c[2], c[3] = C[g + 8][2c, 2c+1]
//
// So the accumulator of two adjacent n-tiles (columns 16kk .. 16kk+15) holds exactly the A fragment of k-step kk of
// a following product (FlashAttention-2's trick): a[0] = (C0[0], C0[1]), a[1] = (C0[2], C0[3]),
// a[2] = (C1[0], C1[1]), a[3] = (C1[2], C1[3]). `accumulator_to_a` does that conversion.
//
// Shared-memory layouts: every tile is row-major with a row stride ("ld", in elements) of (columns + 8). The 8
// padding elements (16 bytes) shift consecutive rows by 4 banks, so the 8 rows x 4 column pairs a warp reads at once
// fall in 32 different banks (columns are multiples of 64 for the head-dim tiles, ld/2 = 4 mod 32 words).
//
// FASTPEFT_HOST_EMULATION: the CPU tests compile these kernels as host code (tests/emulation/), with a software
// mma that reads the fragments of the 32 lanes by the layout above; nothing else changes.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace fastpeft {
namespace prefix {

constexpr int kWarpSize = 32;

__device__ __forceinline__ int lane_g() { return (threadIdx.x % kWarpSize) / 4; }
__device__ __forceinline__ int lane_c() { return threadIdx.x % 4; }

// d += a * b for one m16n8k16 tile.
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                          const __nv_bfloat16*) {
#if defined(FASTPEFT_HOST_EMULATION)
  emulation::mma_16816(d, a, b, /*bf16=*/true);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                          const __half*) {
#if defined(FASTPEFT_HOST_EMULATION)
  emulation::mma_16816(d, a, b, /*bf16=*/false);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

// The kernel's dynamic shared memory (16-byte aligned).
__device__ __forceinline__ unsigned char* dynamic_smem() {
#if defined(FASTPEFT_HOST_EMULATION)
  return emulation::block_shared_memory();
#else
  extern __shared__ __align__(16) unsigned char smem[];
  return smem;
#endif
}

// Two floats rounded to T and packed (lo in the low 16 bits).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

// Two consecutive elements of global memory as floats; p must be 4-byte aligned (an even element offset).
template <typename T>
__device__ __forceinline__ float2 load2_float(const T* p);
template <>
__device__ __forceinline__ float2 load2_float<__nv_bfloat16>(const __nv_bfloat16* p) {
  return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(p));
}
template <>
__device__ __forceinline__ float2 load2_float<__half>(const __half* p) {
  return __half22float2(*reinterpret_cast<const __half2*>(p));
}

// Two consecutive elements (p[0] low, p[1] high); p must be 4-byte aligned (an even element offset).
template <typename T>
__device__ __forceinline__ uint32_t load_pair(const T* p) {
  return *reinterpret_cast<const uint32_t*>(p);
}
// Two elements `stride` apart (p[0] low, p[stride] high): operands whose k index is not the contiguous one.
template <typename T>
__device__ __forceinline__ uint32_t load_pair_strided(const T* p, int stride) {
  const uint32_t lo = *reinterpret_cast<const uint16_t*>(p);
  const uint32_t hi = *reinterpret_cast<const uint16_t*>(p + stride);
  return lo | (hi << 16);
}

// B fragment of k-step kk, n-tile nt. B_K_CONTIGUOUS: B(k, n) = b[n * ld + k] (the transposed operand is stored
// row-major, e.g. P_k for q P_k^T); otherwise B(k, n) = b[k * ld + n] (e.g. P_v for P . P_v).
template <typename T, bool B_K_CONTIGUOUS>
__device__ __forceinline__ void load_b(uint32_t (&b)[2], const T* base, int ld, int kk, int nt) {
  const int g = lane_g(), c = lane_c();
  const int n = nt * 8 + g;
  const int k = kk * 16 + 2 * c;
  if constexpr (B_K_CONTIGUOUS) {
    b[0] = load_pair(base + n * ld + k);
    b[1] = load_pair(base + n * ld + k + 8);
  } else {
    b[0] = load_pair_strided(base + k * ld + n, ld);
    b[1] = load_pair_strided(base + (k + 8) * ld + n, ld);
  }
}

// A fragment of k-step kk from a row-major tile (16 rows starting at `a`, row stride ld, k contiguous).
template <typename T>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const T* base, int ld, int kk) {
  const int g = lane_g(), c = lane_c();
  const int k = kk * 16 + 2 * c;
  a[0] = load_pair(base + g * ld + k);
  a[1] = load_pair(base + (g + 8) * ld + k);
  a[2] = load_pair(base + g * ld + k + 8);
  a[3] = load_pair(base + (g + 8) * ld + k + 8);
}

// acc[16 x 8*NT] += A[16 x K] B[K x 8*NT], A from shared memory (row-major, k contiguous).
template <typename T, int K, int NT, bool B_K_CONTIGUOUS>
__device__ __forceinline__ void warp_mma_ss(float (&acc)[NT][4], const T* a, int lda, const T* b, int ldb) {
  static_assert(K % 16 == 0, "K must be a multiple of the mma's k (16)");
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk) {
    uint32_t af[4];
    load_a(af, a, lda, kk);
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      uint32_t bf[2];
      load_b<T, B_K_CONTIGUOUS>(bf, b, ldb, kk, nt);
      mma_16816(acc[nt], af, bf, static_cast<const T*>(nullptr));
    }
  }
}

// acc[16 x 8*NT] += A[16 x 16*KT] B[16*KT x 8*NT], A already in registers (fragments per k-step).
template <typename T, int KT, int NT, bool B_K_CONTIGUOUS>
__device__ __forceinline__ void warp_mma_rs(float (&acc)[NT][4], const uint32_t (&a)[KT][4], const T* b, int ldb) {
#pragma unroll
  for (int kk = 0; kk < KT; ++kk) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      uint32_t bf[2];
      load_b<T, B_K_CONTIGUOUS>(bf, b, ldb, kk, nt);
      mma_16816(acc[nt], a[kk], bf, static_cast<const T*>(nullptr));
    }
  }
}

// The accumulator of a 16 x (16*KT) product as the A fragments of a following product (see the header comment).
template <typename T, int KT>
__device__ __forceinline__ void accumulator_to_a(uint32_t (&a)[KT][4], const float (&acc)[2 * KT][4]) {
#pragma unroll
  for (int kk = 0; kk < KT; ++kk) {
    a[kk][0] = pack2<T>(acc[2 * kk][0], acc[2 * kk][1]);
    a[kk][1] = pack2<T>(acc[2 * kk][2], acc[2 * kk][3]);
    a[kk][2] = pack2<T>(acc[2 * kk + 1][0], acc[2 * kk + 1][1]);
    a[kk][3] = pack2<T>(acc[2 * kk + 1][2], acc[2 * kk + 1][3]);
  }
}

// Max / sum over the 4 lanes of a quad (the 4 lanes that share the rows g and g + 8 of a fragment).
__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// Copy `rows` rows of `bucket` elements into a shared-memory tile (row stride ld) with 16-byte accesses, all threads
// of the block cooperating. row_ptr(r) is the global address of row r, or nullptr for a row past the end; columns
// >= head_dim and missing rows are zero-filled (zeros add nothing to the products).
template <typename T, int kBucket, typename RowPtr>
__device__ __forceinline__ void load_tile(T* smem, int ld, int rows, int head_dim, RowPtr row_ptr) {
  constexpr int kVec = 16 / sizeof(T);  // elements per 16-byte access
  static_assert(kBucket % kVec == 0, "head-dim bucket must be a multiple of the vector width");
  constexpr int kVecsPerRow = kBucket / kVec;
  for (int i = threadIdx.x; i < rows * kVecsPerRow; i += blockDim.x) {
    const int r = i / kVecsPerRow;
    const int d = (i % kVecsPerRow) * kVec;
    const T* src = row_ptr(r);
    uint4 v = make_uint4(0u, 0u, 0u, 0u);
    if (src != nullptr && d < head_dim) v = *reinterpret_cast<const uint4*>(src + d);  // head_dim % kVec == 0
    *reinterpret_cast<uint4*>(smem + r * ld + d) = v;
  }
}

}  // namespace prefix
}  // namespace fastpeft
