// Emulated build only: the CUDA launchers' "is this a CUDA tensor" checks accept the CPU tensors the
// emulator runs on. Included by the shim headers below after ATen, so torch's own declarations are untouched.
#pragma once

#include <ATen/ATen.h>

#ifndef XVERSE_EMULATE
#error "csrc/emu/shim is for the emulated build only"
#endif
#define is_cuda() is_cpu()
