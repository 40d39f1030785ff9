// CPU stand-in for nvcuda::wmma (mma.h), m16n16k16 only, for cuda_emulation.h.
//
// Semantics from the CUDA programming guide: load_matrix_sync reads a 16 x 16 tile at `ptr` with leading dimension
// `ldm` (row_major: element (i, j) at ptr[i * ldm + j]; col_major: at ptr[i + j * ldm]); mma_sync computes
// d = a . b + c; store_matrix_sync writes the accumulator tile. The preconditions are checked: `ptr` 256-bit (32-byte)
// aligned, `ldm` a multiple of 8 elements for 16-bit types and of 4 for float. Lane 0 of each warp does the
// arithmetic and the stores for the whole warp (the results are the warp's; the other lanes only check arguments).
#pragma once

#include <cstdint>
#include <type_traits>

#include "cuda_emulation.h"

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "the emulation has m16n16k16 only");
  float v[16][16];
};

inline bool emu_lane0() { return emu::thread_idx.x % 32 == 0; }

template <typename T>
void emu_check(const void* ptr, unsigned ldm) {
  if (reinterpret_cast<uintptr_t>(ptr) % 32 != 0) emu::fail("wmma pointer not 256-bit aligned");
  if (ldm % (16 / sizeof(T)) != 0) emu::fail("wmma ldm not a multiple of 16 bytes");
}

inline float emu_to_float(float v) { return v; }
inline float emu_to_float(__half v) { return __half2float(v); }
inline float emu_to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename Use, typename T, typename Layout>
void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* ptr, unsigned ldm) {
  emu_check<T>(ptr, ldm);
  constexpr bool kRowMajor = std::is_same_v<Layout, row_major>;
  static_assert(kRowMajor || std::is_same_v<Layout, col_major>, "operand fragments need a layout");
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) f.v[i][j] = emu_to_float(kRowMajor ? ptr[i * ldm + j] : ptr[i + j * ldm]);
}

template <typename T>
void fill_fragment(fragment<accumulator, 16, 16, 16, T>& f, T value) {
  for (auto& row : f.v)
    for (auto& x : row) x = value;
}

template <typename TA, typename LA, typename TB, typename LB>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, TA, LA>& a,
              const fragment<matrix_b, 16, 16, 16, TB, LB>& b, const fragment<accumulator, 16, 16, 16, float>& c) {
  if (!emu_lane0()) return;
  float out[16][16];
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) {
      float sum = c.v[i][j];
      for (int k = 0; k < 16; ++k) sum += a.v[i][k] * b.v[k][j];
      out[i][j] = sum;
    }
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) d.v[i][j] = out[i][j];
}

inline void store_matrix_sync(float* ptr, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm,
                              layout_t layout) {
  emu_check<float>(ptr, ldm);
  if (layout != mem_row_major) emu::fail("the kernels store row-major");
  if (!emu_lane0()) return;
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) ptr[i * ldm + j] = f.v[i][j];
}

}  // namespace wmma
}  // namespace nvcuda
