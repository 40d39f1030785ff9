// CPU stand-in for CUDA's pipeline primitives (cuda_pipeline_primitives.h), for cuda_emulation.h.
//
// A copy is recorded in the calling thread's open batch; __pipeline_commit closes the batch; __pipeline_wait_prior(n)
// performs the copies of every batch but the n most recent, oldest first. So a copy lands in shared memory exactly
// when the wait that guarantees it returns, never earlier: a kernel that reads a slot before that wait reads stale
// data, and the tests see it. Build with -DEMU_EAGER_COPIES to land copies at once instead (with -fsanitize=thread
// this exposes writes into a slot other threads may still be reading).
#pragma once

#include <cstdint>
#include <cstring>
#include <deque>
#include <vector>

#include "cuda_emulation.h"

namespace emu {

struct PendingCopy {
  void* dst;
  const void* src;
  size_t size;
};

inline thread_local std::vector<PendingCopy> open_batch;
inline thread_local std::deque<std::vector<PendingCopy>> committed_batches;

}  // namespace emu

inline void __pipeline_memcpy_async(void* dst, const void* src, size_t size_and_align, size_t zfill = 0) {
  if (size_and_align != 4 && size_and_align != 8 && size_and_align != 16) emu::fail("cp.async size must be 4, 8 or 16");
  if (zfill != 0) emu::fail("zfill is not used by the kernels");
  if (reinterpret_cast<uintptr_t>(dst) % size_and_align != 0) emu::fail("cp.async shared destination misaligned");
  if (reinterpret_cast<uintptr_t>(src) % size_and_align != 0) emu::fail("cp.async global source misaligned");
#ifdef EMU_EAGER_COPIES
  std::memcpy(dst, src, size_and_align);
#else
  emu::open_batch.push_back({dst, src, size_and_align});
#endif
}

inline void __pipeline_commit() {
  emu::committed_batches.push_back(std::move(emu::open_batch));
  emu::open_batch.clear();
}

inline void __pipeline_wait_prior(size_t prior) {
  while (emu::committed_batches.size() > prior) {
    for (const auto& copy : emu::committed_batches.front()) std::memcpy(copy.dst, copy.src, copy.size);
    emu::committed_batches.pop_front();
  }
}
