// Just enough of CUDA to run fastpeft's prefix kernels, unchanged, as host code on the CPU (tests without a GPU).
//
// A block runs as blockDim.x std::threads; __syncthreads is a barrier of the block, __syncwarp and the warp
// collectives (__shfl_xor_sync, mma.sync) are barriers of the 32 threads of a warp that exchange values through
// per-warp slots. mma.sync m16n8k16 is computed from the 32 lanes' fragments by the PTX fragment layout (the inverse
// of the index math the kernels use to build them), in double precision. Blocks of a grid (x, y, z) run one after
// another.
// Dynamic shared memory is poisoned with 0xFF bytes (NaN for bf16, fp16 and float) so that a read of a value the
// kernel never wrote shows up as NaN, and a canary after its end catches writes past it.
#pragma once

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>  // before the threadIdx / blockDim macros below (it names parameters so)
#include <vector_types.h>

#define FASTPEFT_HOST_EMULATION 1
#define __launch_bounds__(...)

using std::isfinite;
inline float __expf(float x) { return std::exp(x); }

namespace fastpeft {
namespace emulation {

constexpr int kWarp = 32;

struct Block {
  std::unique_ptr<std::barrier<>> block_barrier;
  std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
  std::vector<unsigned char> smem;  // bytes + canary
  size_t smem_bytes = 0;
  std::vector<float> shfl;          // [warps][32]
  std::vector<uint32_t> frag_a;     // [warps][32][4]
  std::vector<uint32_t> frag_b;     // [warps][32][2]
};

inline thread_local Block* tl_block = nullptr;
inline thread_local dim3 tl_thread_idx, tl_block_idx;
inline dim3 tl_block_dim, tl_grid_dim;

inline int warp_id() { return static_cast<int>(tl_thread_idx.x) / kWarp; }
inline int lane_id() { return static_cast<int>(tl_thread_idx.x) % kWarp; }
inline void warp_barrier() { tl_block->warp_barriers[warp_id()]->arrive_and_wait(); }
inline unsigned char* block_shared_memory() { return tl_block->smem.data(); }

inline float half_bits_to_float(uint16_t bits, bool bf16) {
  if (bf16) {
    __nv_bfloat16_raw raw;
    raw.x = bits;
    return __bfloat162float(__nv_bfloat16(raw));
  }
  __half_raw raw;
  raw.x = bits;
  return __half2float(__half(raw));
}

// d += A B for the warp; A (16 x 16) and B (16 x 8) are gathered from the lanes' fragments:
//   A(r, k) is in lane (r % 8) * 4 + (k % 8) / 2, register (r >= 8) + 2 (k >= 8), half k % 2;
//   B(k, n) is in lane n * 4 + (k % 8) / 2, register (k >= 8), half k % 2;
//   lane l holds D(l / 4 + 8 (i / 2), 2 (l % 4) + i % 2) in d[i].
inline void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], bool bf16) {
  const int w = warp_id(), lane = lane_id();
  uint32_t* fa = tl_block->frag_a.data() + size_t(w) * kWarp * 4;
  uint32_t* fb = tl_block->frag_b.data() + size_t(w) * kWarp * 2;
  std::memcpy(fa + lane * 4, a, sizeof(a));
  std::memcpy(fb + lane * 2, b, sizeof(b));
  warp_barrier();
  auto element = [&](uint32_t reg, int half) { return half_bits_to_float(half ? reg >> 16 : reg & 0xffffu, bf16); };
  auto A = [&](int r, int k) { return element(fa[((r % 8) * 4 + (k % 8) / 2) * 4 + (r >= 8) + 2 * (k >= 8)], k % 2); };
  auto B = [&](int k, int n) { return element(fb[(n * 4 + (k % 8) / 2) * 2 + (k >= 8)], k % 2); };
  for (int i = 0; i < 4; ++i) {
    const int r = lane / 4 + 8 * (i / 2), n = 2 * (lane % 4) + i % 2;
    double acc = d[i];
    for (int k = 0; k < 16; ++k) acc += double(A(r, k)) * double(B(k, n));
    d[i] = static_cast<float>(acc);
  }
  warp_barrier();  // nobody overwrites the slots before every lane has read them
}

// Runs kernel(params) on grid x block threads with `smem_bytes` of dynamic shared memory; returns false when a write
// went past the end of the shared memory.
template <typename Kernel, typename Params>
bool launch(Kernel kernel, const Params& params, dim3 grid, int threads, size_t smem_bytes) {
  constexpr size_t kCanary = 256;
  tl_grid_dim = grid;
  tl_block_dim = dim3(threads);
  bool ok = true;
  for (unsigned bz = 0; bz < grid.z; ++bz) {
  for (unsigned by = 0; by < grid.y; ++by) {
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      Block block;
      const int warps = (threads + kWarp - 1) / kWarp;
      block.block_barrier = std::make_unique<std::barrier<>>(threads);
      for (int w = 0; w < warps; ++w) block.warp_barriers.push_back(std::make_unique<std::barrier<>>(kWarp));
      block.smem.assign(smem_bytes + kCanary, 0xFF);
      block.smem_bytes = smem_bytes;
      block.shfl.assign(size_t(warps) * kWarp, 0.f);
      block.frag_a.assign(size_t(warps) * kWarp * 4, 0u);
      block.frag_b.assign(size_t(warps) * kWarp * 2, 0u);
      std::vector<std::thread> pool;
      for (int t = 0; t < threads; ++t) {
        pool.emplace_back([&, t] {
          tl_block = &block;
          tl_thread_idx = dim3(t);
          tl_block_idx = dim3(bx, by, bz);
          kernel(params);
        });
      }
      for (auto& th : pool) th.join();
      for (size_t i = smem_bytes; i < smem_bytes + kCanary; ++i) ok = ok && block.smem[i] == 0xFF;
    }
  }
  }
  return ok;
}

}  // namespace emulation
}  // namespace fastpeft

#define threadIdx (::fastpeft::emulation::tl_thread_idx)
#define blockIdx (::fastpeft::emulation::tl_block_idx)
#define blockDim (::fastpeft::emulation::tl_block_dim)
#define gridDim (::fastpeft::emulation::tl_grid_dim)

inline void __syncthreads() { ::fastpeft::emulation::tl_block->block_barrier->arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { ::fastpeft::emulation::warp_barrier(); }
inline float __shfl_xor_sync(unsigned, float value, int lane_mask) {
  using namespace ::fastpeft::emulation;
  float* slots = tl_block->shfl.data() + size_t(warp_id()) * kWarp;
  slots[lane_id()] = value;
  warp_barrier();
  const float other = slots[lane_id() ^ lane_mask];
  warp_barrier();
  return other;
}
