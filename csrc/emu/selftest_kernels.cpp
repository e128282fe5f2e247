// Kernels that test the emulator itself (tests/test_emu_selftest.py): the PTX fragment emulation against
// a plain matmul, and that the emulator catches the bugs it exists to catch (a wrong fragment loader, a
// missing __syncthreads, a divergent barrier, a cp.async read without its wait). Emulated build only: this
// file is not copied by the build, so its __shared__ arrays register themselves (XVERSE_EMU_REGISTER_SHARED).
#include <torch/extension.h>

#include "common/launch.cuh"
#include "common/ptx.cuh"

namespace xverse::emu_selftest {
namespace {

// ---- mma.sync through fragments loaded from global memory, as the PTX ISA table says ----------------
// a: [16, 16] row-major (M x K), b: [16, 8] (K x N), 16-bit; d: [16, 8] fp32. `wrong`: a loader with a bug
// real kernels make (a1 and a2 swapped: rows +8 taken for columns +8).
template <bool kBf16>
__global__ void mma_kernel(const uint16_t* a, const uint16_t* b, float* d, bool wrong) {
  const int lane = threadIdx.x, group = lane >> 2, tig = lane % 4;
  auto pack = [](uint16_t lo, uint16_t hi) { return static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16); };
  auto a_pair = [&](int row, int col) { return pack(a[row * 16 + col], a[row * 16 + col + 1]); };
  auto b_pair = [&](int k, int n) { return pack(b[k * 8 + n], b[(k + 1) * 8 + n]); };
  uint32_t af[4] = {a_pair(group, tig * 2), a_pair(group + 8, tig * 2), a_pair(group, tig * 2 + 8),
                    a_pair(group + 8, tig * 2 + 8)};
  if (wrong) {
    const uint32_t t = af[1];
    af[1] = af[2];
    af[2] = t;
  }
  const uint32_t bf[2] = {b_pair(tig * 2, group), b_pair(tig * 2 + 8, group)};
  const float c[4] = {0.f, 0.f, 0.f, 0.f};
  float out[4];
  if constexpr (kBf16) ptx::mma_m16n8k16_bf16(out, af, bf, c);
  else ptx::mma_m16n8k16_f16(out, af, bf, c);
  for (int i = 0; i < 4; ++i) d[(group + 8 * (i / 2)) * 8 + tig * 2 + i % 2] = out[i];
}

at::Tensor mma_m16n8k16(const at::Tensor& a, const at::Tensor& b, bool wrong) {
  TORCH_CHECK(a.sizes() == at::IntArrayRef({16, 16}) && b.sizes() == at::IntArrayRef({16, 8}),
              "mma_m16n8k16: a must be [16, 16] and b [16, 8]");
  TORCH_CHECK(a.scalar_type() == b.scalar_type() && (a.scalar_type() == at::kBFloat16 || a.scalar_type() == at::kHalf),
              "mma_m16n8k16: a and b must both be bfloat16 or float16");
  const at::Tensor ac = a.contiguous(), bc = b.contiguous();
  auto d = at::empty({16, 8}, a.options().dtype(at::kFloat));
  auto* ap = static_cast<const uint16_t*>(ac.data_ptr());
  auto* bp = static_cast<const uint16_t*>(bc.data_ptr());
  if (a.scalar_type() == at::kBFloat16) launch_kernel(mma_kernel<true>, 1, 32, 0, nullptr, ap, bp, d.data_ptr<float>(), wrong);
  else launch_kernel(mma_kernel<false>, 1, 32, 0, nullptr, ap, bp, d.data_ptr<float>(), wrong);
  return d;
}

// ---- ldmatrix: m [16, 16] 16-bit in shared memory; lane l names row l % 16, column 8 (l / 16) (the usual
// A-operand addressing). out [32, 4] int32: each lane's registers.
template <bool kTrans>
__global__ void ldmatrix_kernel(const uint16_t* m, int32_t* out) {
  __shared__ __align__(16) uint16_t tile[16][16]; XVERSE_EMU_REGISTER_SHARED(tile);
  const int lane = threadIdx.x;
  for (int i = lane; i < 256; i += 32) tile[i / 16][i % 16] = m[i];
  __syncwarp();
  uint32_t r[4];
  if constexpr (kTrans) ptx::ldmatrix_x4_trans(r, &tile[lane % 16][8 * (lane / 16)]);
  else ptx::ldmatrix_x4(r, &tile[lane % 16][8 * (lane / 16)]);
  for (int i = 0; i < 4; ++i) out[lane * 4 + i] = static_cast<int32_t>(r[i]);
}

at::Tensor ldmatrix_x4(const at::Tensor& m, bool trans) {
  TORCH_CHECK(m.sizes() == at::IntArrayRef({16, 16}) && m.element_size() == 2, "ldmatrix_x4: m must be [16, 16] 16-bit");
  const at::Tensor mc = m.contiguous();
  auto out = at::empty({32, 4}, m.options().dtype(at::kInt));
  auto* p = static_cast<const uint16_t*>(mc.data_ptr());
  if (trans) launch_kernel(ldmatrix_kernel<true>, 1, 32, 0, nullptr, p, out.data_ptr<int32_t>());
  else launch_kernel(ldmatrix_kernel<false>, 1, 32, 0, nullptr, p, out.data_ptr<int32_t>());
  return out;
}

// ---- bugs the emulator must catch ----------------------------------------------------------------------

// Each thread stages x[t] in shared memory and reads its neighbour's value: y[t] = x[(t + 1) % n].
// Without the barrier, a thread may read the neighbour's slot before it is written.
__global__ void neighbour_kernel(const float* x, float* y, bool with_barrier) {
  __shared__ float stage[256]; XVERSE_EMU_REGISTER_SHARED(stage);
  const int t = threadIdx.x, n = blockDim.x;
  stage[t] = x[blockIdx.x * n + t];
  if (with_barrier) __syncthreads();
  y[blockIdx.x * n + t] = stage[(t + 1) % n];
}

at::Tensor neighbour_exchange(const at::Tensor& x, int64_t threads, bool with_barrier) {
  TORCH_CHECK(x.dim() == 1 && x.scalar_type() == at::kFloat && threads >= 1 && threads <= 256 &&
                  x.numel() % threads == 0, "neighbour_exchange: x must be fp32 [blocks * threads], threads <= 256");
  const at::Tensor xc = x.contiguous();
  auto y = at::empty_like(xc);
  launch_kernel(neighbour_kernel, static_cast<unsigned>(x.numel() / threads), static_cast<unsigned>(threads), 0,
                nullptr, xc.data_ptr<float>(), y.data_ptr<float>(), with_barrier);
  return y;
}

// A barrier that only the first half of the block reaches.
__global__ void divergent_barrier_kernel(float* y) {
  __shared__ float value; XVERSE_EMU_REGISTER_SHARED(value);
  if (threadIdx.x < blockDim.x / 2) {
    if (threadIdx.x == 0) value = 1.f;
    __syncthreads();
    y[threadIdx.x] = value;
  } else {
    y[threadIdx.x] = 0.f;
  }
}

void divergent_barrier(int64_t threads) {
  auto y = at::empty({threads}, at::kFloat);
  launch_kernel(divergent_barrier_kernel, 2, static_cast<unsigned>(threads), 0, nullptr, y.data_ptr<float>());
}

// A warp shuffle whose member mask names lanes that returned early.
__global__ void shuffle_after_exit_kernel(float* y) {
  if (threadIdx.x >= 16) return;
  y[threadIdx.x] = __shfl_xor_sync(0xffffffffu, static_cast<float>(threadIdx.x), 1);
}

void shuffle_after_exit() {
  auto y = at::empty({32}, at::kFloat);
  launch_kernel(shuffle_after_exit_kernel, 1, 32, 0, nullptr, y.data_ptr<float>());
}

// Half the warp at __syncthreads, the other half at a shuffle that names them: a deadlock on the GPU.
__global__ void deadlock_kernel(float* y) {
  float v = static_cast<float>(threadIdx.x);
  if (threadIdx.x < 16) v = __shfl_xor_sync(0xffffffffu, v, 16);
  else __syncthreads();
  y[threadIdx.x] = v;
}

void deadlock() {
  auto y = at::empty({32}, at::kFloat);
  launch_kernel(deadlock_kernel, 1, 32, 0, nullptr, y.data_ptr<float>());
}

// Each thread copies 16 bytes (4 floats) of x into shared memory with cp.async, optionally waits for the
// copy, then every thread reads back after a barrier. src_bytes < 16 zero-fills the rest.
__global__ void cp_async_kernel(const float* x, float* y, int src_bytes, int wait_mode) {
  XVERSE_DYNAMIC_SHARED(float, stage);
  const int t = threadIdx.x;
  ptx::cp_async_16(stage + 4 * t, x + 4 * t, src_bytes);
  ptx::cp_async_commit();
  if (wait_mode == 1) ptx::cp_async_wait<0>();
  if (wait_mode == 2) ptx::cp_async_wait_all();
  if (wait_mode == 3) ptx::cp_async_wait<1>();  // allows one pending group: this one (the bug)
  __syncthreads();
  for (int i = 0; i < 4; ++i) y[4 * t + i] = stage[4 * t + i];
}

at::Tensor cp_async_copy(const at::Tensor& x, int64_t src_bytes, int64_t wait_mode) {
  TORCH_CHECK(x.dim() == 1 && x.scalar_type() == at::kFloat && x.numel() % 4 == 0 && x.numel() <= 4 * 256,
              "cp_async_copy: x must be fp32 [4 * threads]");
  const at::Tensor xc = x.contiguous();
  auto y = at::empty_like(xc);
  const unsigned threads = static_cast<unsigned>(x.numel() / 4);
  launch_kernel(cp_async_kernel, 1, threads, threads * 16, nullptr, xc.data_ptr<float>(), y.data_ptr<float>(),
                static_cast<int>(src_bytes), static_cast<int>(wait_mode));
  return y;
}

// Reads static shared memory nobody wrote: the block-start poison.
__global__ void read_uninitialised_kernel(int32_t* y) {
  __shared__ int32_t never_written[32]; XVERSE_EMU_REGISTER_SHARED(never_written);
  y[threadIdx.x] = never_written[threadIdx.x];
}

at::Tensor read_uninitialised_shared() {
  auto y = at::empty({32}, at::kInt);
  launch_kernel(read_uninitialised_kernel, 1, 32, 0, nullptr, y.data_ptr<int32_t>());
  return y;
}

// Reads one element past the end of x (a bounds bug: caught under AddressSanitizer).
__global__ void read_past_end_kernel(const float* x, float* y, int n) { y[threadIdx.x] = x[n - 1 + threadIdx.x]; }

at::Tensor read_past_end(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 1 && x.scalar_type() == at::kFloat && x.is_contiguous(), "read_past_end: x must be fp32 1-D");
  auto y = at::empty({2}, at::kFloat);
  launch_kernel(read_past_end_kernel, 1, 2, 0, nullptr, x.data_ptr<float>(), y.data_ptr<float>(),
                static_cast<int>(x.numel()));
  return y;
}

}  // namespace

void register_selftests(pybind11::module_& m) {
  m.def("set_schedule", [](const std::string& name) {
    TORCH_CHECK(emu::set_schedule(name), "unknown emulator schedule '", name,
                "': use alternate, forward, reverse or concurrent");
  }, "how the threads of a block interleave (csrc/emu/runtime.cpp)");
  m.def("schedule", &emu::schedule);
  m.def("async_copy_source_bytes", &emu::async_copy_source_bytes,
        "source bytes of every cp.async performed since the process started (a kernel's cp.async reads)");
  m.def("mma_m16n8k16", &mma_m16n8k16, "D = A B through mma.sync fragments (wrong=True: a buggy loader)");
  m.def("ldmatrix_x4", &ldmatrix_x4, "every lane's registers after ldmatrix.x4 of a [16, 16] tile");
  m.def("neighbour_exchange", &neighbour_exchange, "y[t] = x[t + 1] through shared memory");
  m.def("divergent_barrier", &divergent_barrier, "a __syncthreads only half the block reaches");
  m.def("shuffle_after_exit", &shuffle_after_exit, "a full-mask shuffle after half the warp returned");
  m.def("deadlock", &deadlock, "half a warp at a shuffle, half at __syncthreads");
  m.def("cp_async_copy", &cp_async_copy, "cp.async x -> shared -> y (wait_mode 0: none, 1: wait<0>, 2: all, 3: wait<1>)");
  m.def("read_uninitialised_shared", &read_uninitialised_shared, "static shared memory never written");
  m.def("read_past_end", &read_past_end, "reads x[n] (out of bounds)");
}

}  // namespace xverse::emu_selftest
