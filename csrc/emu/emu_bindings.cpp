// The emulated ops: torch.ops.xverse_emu.<op> on CPU tensors runs the CUDA launcher of <op> (the same
// checks, grid and shared-memory arithmetic) with every kernel executed by the CPU SIMT emulator.
// The schemas are copied from torch.ops.xverse by xverse_engine/ops/emulated.py before this library loads.
//
// A new CUDA op: add one m.impl line below (its *_cuda launcher, declared in ops.h), then emulated tests
// in tests/test_emu_ops.py against its twin. Nothing else: setup.py compiles every csrc/**/*.cu here.
#include <torch/extension.h>
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY_IMPL(xverse_emu, CPU, m) {
  m.impl("gating_topk", &xverse::gating_topk_cuda);
  m.impl("moe_align", &xverse::moe_align_cuda);
  m.impl("moe_gate_up", &xverse::moe_gate_up_cuda);
  m.impl("moe_down_combine", &xverse::moe_down_combine_cuda);
  m.impl("add_rmsnorm", &xverse::add_rmsnorm_cuda);
  m.impl("rope_cache", &xverse::rope_cache_cuda);
  m.impl("draw_top_k_top_p", &xverse::draw_top_k_top_p_cuda);
  m.impl("reshape_and_cache", &xverse::reshape_and_cache_cuda);
  m.impl("paged_attention_decode", &xverse::paged_attention_decode_cuda);
  m.impl("paged_attention_prefill", &xverse::paged_attention_prefill_cuda);
}

namespace xverse::emu_selftest {
void register_selftests(pybind11::module_& module);  // selftest_kernels.cpp
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "CUDA kernels of xverse_engine run on the CPU by a SIMT emulator (tests only)";
  xverse::emu_selftest::register_selftests(module);
}
