// Emulated build: stands in for <ATen/cuda/CUDAContext.h>. The emulator has one implicit stream.
#pragma once

#include <driver_types.h>

#include <ATen/ATen.h>

namespace at::cuda {
struct EmulatedStream {
  cudaStream_t stream() const { return nullptr; }
  operator cudaStream_t() const { return nullptr; }
};
inline EmulatedStream getCurrentCUDAStream(c10::DeviceIndex = -1) { return {}; }
}  // namespace at::cuda

#include "emu_tensor_device.h"
