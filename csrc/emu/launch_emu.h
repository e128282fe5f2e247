// xverse::launch_kernel for the CPU SIMT emulator: runs every thread of every block of the launch on the
// host (see runtime.h), then turns an emulator report into the op's error. The stream is ignored: the
// launch has finished when this returns.
#pragma once

#include <exception>
#include <stdexcept>

#include <c10/util/Exception.h>

#include "emu/runtime.h"

// Dynamic shared memory: the launch's per-block buffer (poisoned at every block start).
#define XVERSE_DYNAMIC_SHARED(T, name) T* name = static_cast<T*>(::xverse::emu::dynamic_shared_memory())

namespace xverse {

template <typename Kernel, typename... Args>
inline void launch_kernel(Kernel kernel, dim3 grid, dim3 block, size_t smem_bytes, cudaStream_t /*stream*/,
                          Args... args) {
  try {
    emu::launch(grid, block, smem_bytes, [&] { kernel(args...); });
  } catch (const std::runtime_error& e) {
    TORCH_CHECK(false, e.what());
  }
}

}  // namespace xverse
