// One way to launch a kernel, so the same .cu compiles for the GPU (nvcc) and for the CPU SIMT emulator
// (g++ -DXVERSE_EMULATE, csrc/emu/), where a launch runs every block's threads on OS threads.
// Dynamic shared memory is declared with XVERSE_DYNAMIC_SHARED(T, name) (a T* named `name`), for the same
// reason: the emulator gives each launch its own buffer.
#pragma once

#ifdef XVERSE_EMULATE
#include "emu/launch_emu.h"
#else
#include <c10/cuda/CUDAException.h>

// The launch's dynamic shared memory, 16-byte aligned (one byte array for every kernel, so that kernels of
// different element types can share a translation unit).
#define XVERSE_DYNAMIC_SHARED(T, name)                                  \
  extern __shared__ __align__(16) unsigned char xverse_dynamic_smem[]; \
  T* name = reinterpret_cast<T*>(xverse_dynamic_smem)

namespace xverse {

// kernel<<<grid, block, smem_bytes, stream>>>(args...), then a launch-error check.
template <typename Kernel, typename... Args>
inline void launch_kernel(Kernel kernel, dim3 grid, dim3 block, size_t smem_bytes, cudaStream_t stream,
                          Args... args) {
  kernel<<<grid, block, smem_bytes, stream>>>(args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace xverse
#endif
