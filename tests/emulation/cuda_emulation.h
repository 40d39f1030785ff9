// A CPU stand-in for the CUDA execution model, enough to run fastpeft's adapter GEMM kernels (csrc/adapter/*.cuh)
// unchanged, compiled by g++: every CTA runs as kThreads std::threads, one CTA after another; __shared__ variables
// become function statics (one CTA at a time uses them); __syncthreads() is a std::barrier. The wmma and cp.async
// pipeline primitives are replaced by mma.h and cuda_pipeline.h next to this file, which check the documented
// preconditions (alignment, ldm) and model cp.async as a copy that lands no earlier than the wait that covers it.
//
// It checks index arithmetic, bounds, layouts, split-K and the epilogues, and (with -fsanitize=thread) shared-memory
// synchronisation. It does not check timing, warp-level behaviour beyond what the mocks model, or numerics of the
// real tensor cores. Include it before any kernel header.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <barrier>
#include <cstdio>
#include <cstdlib>
#include <thread>
#include <vector>

namespace emu {

inline thread_local uint3 thread_idx{0, 0, 0};
inline uint3 block_idx{0, 0, 0};
inline dim3 grid_dim{1, 1, 1};
inline std::barrier<>* cta_barrier = nullptr;

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "emulation: precondition violated: %s\n", what);
  std::abort();
}

inline void syncthreads() { cta_barrier->arrive_and_wait(); }

// Runs kernel(args...) over `grid` with `threads` threads per CTA, CTAs in order (x fastest, then y).
template <typename Kernel, typename... Args>
void launch(Kernel kernel, dim3 grid, unsigned threads, const Args&... args) {
  grid_dim = grid;
  for (unsigned y = 0; y < grid.y; ++y) {
    for (unsigned x = 0; x < grid.x; ++x) {
      block_idx = uint3{x, y, 0};
      std::barrier<> barrier(threads);
      cta_barrier = &barrier;
      std::vector<std::thread> pool;
      pool.reserve(threads);
      for (unsigned t = 0; t < threads; ++t) {
        pool.emplace_back([&, t] {
          thread_idx = uint3{t, 0, 0};
          kernel(args...);
        });
      }
      for (auto& thread : pool) thread.join();
      cta_barrier = nullptr;
    }
  }
}

}  // namespace emu

#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __launch_bounds__
#undef __shared__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define threadIdx emu::thread_idx
#define blockIdx emu::block_idx
#define gridDim emu::grid_dim
#define __syncthreads() emu::syncthreads()
