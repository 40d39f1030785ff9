// Row and prefix-chunk bookkeeping shared by the prefix kernels (forward, dP, dq): the folded rows of a key/value
// head, and the loads of row tiles and prefix chunks into shared memory. Conventions: prefix_params.h.
#pragma once

#include <cstdint>

#include "prefix/mma.cuh"
#include "prefix/prefix_params.h"

namespace fastpeft {
namespace prefix {

// The folded rows of key/value head h: row r = (b * G + g) * T + t is query head hq = h * G + g, b < B, t < T.
struct FoldedRows {
  int h, groups, steps, heads_q, total;

  template <typename Params>
  __device__ FoldedRows(const Params& p, int head)
      : h(head), groups(p.heads_q / p.heads_kv), steps(p.steps), heads_q(p.heads_q),
        total(p.batch * (p.heads_q / p.heads_kv) * p.steps) {}

  __device__ void decode(int row, int& b, int& hq, int& t) const {
    t = row % steps;
    const int bg = row / steps;
    hq = h * groups + bg % groups;
    b = bg / groups;
  }
  // Index of the row in a contiguous [B, Hq, T] tensor (the LSEs, D, the rows of out and dq).
  __device__ int64_t contiguous(int row) const {
    int b, hq, t;
    decode(row, b, hq, t);
    return (int64_t(b) * heads_q + hq) * steps + t;
  }
  // Address of the row in a [B, Hq, T, D] tensor with strides (sb, sh, st, 1).
  template <typename T>
  __device__ const T* address(const T* base, int row, int64_t sb, int64_t sh, int64_t st) const {
    int b, hq, t;
    decode(row, b, hq, t);
    return base + b * sb + hq * sh + t * st;
  }
};

// Rows row0 .. row0 + kRows - 1 of a [B, Hq, T, D] tensor into a shared tile (row stride ld); rows past the end and
// columns past D are zero.
template <typename T, int kD>
__device__ __forceinline__ void load_rows(T* tile, int ld, int rows, const FoldedRows& fr, int row0, int head_dim,
                                          const T* base, int64_t sb, int64_t sh, int64_t st) {
  load_tile<T, kD>(tile, ld, rows, head_dim, [&](int r) -> const T* {
    return row0 + r < fr.total ? fr.address(base, row0 + r, sb, sh, st) : nullptr;
  });
}

// Prefix keys j0 .. j0 + chunk - 1 of head h (P_k and P_v rows) into shared tiles (row stride ld); keys past L are
// zero.
template <typename T, int kD, typename Params>
__device__ __forceinline__ void load_prefix_chunk(const Params& p, int h, int j0, int chunk, T* pk_s, T* pv_s,
                                                  int ld) {
  const int64_t head = int64_t(h) * p.prefix_len * p.head_dim;
  const T* prefix_k = static_cast<const T*>(p.prefix_k) + head;
  const T* prefix_v = static_cast<const T*>(p.prefix_v) + head;
  load_tile<T, kD>(pk_s, ld, chunk, p.head_dim, [&](int r) -> const T* {
    return j0 + r < p.prefix_len ? prefix_k + int64_t(j0 + r) * p.head_dim : nullptr;
  });
  load_tile<T, kD>(pv_s, ld, chunk, p.head_dim, [&](int r) -> const T* {
    return j0 + r < p.prefix_len ? prefix_v + int64_t(j0 + r) * p.head_dim : nullptr;
  });
}

}  // namespace prefix
}  // namespace fastpeft
