// The CPU SIMT emulator's runtime: runs one kernel launch with CUDA's execution semantics.
//
// One OS thread per CUDA thread of a block; blocks run one after another (so static __shared__ arrays can
// be plain statics). Barriers, warp collectives and the checks only an emulator can make live here:
//   - every thread of a block must pass the same sequence of __syncthreads (a divergent barrier fails
//     with the block's index and the barrier's file:line);
//   - shared memory (static and dynamic) is filled with 0xFF (NaN) at every block start;
//   - a warp collective whose member mask names a lane that exited, or that never arrives (every thread
//     of the block blocked), fails with the sites instead of hanging;
//   - cp.async copies are queued per thread and performed only at wait_group / wait_all.
// Errors surface as std::runtime_error from launch(); the kernel's threads are unwound first.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <source_location>
#include <string>

#include <vector_types.h>

namespace xverse::emu {

using Site = std::source_location;

// Runs body() once per CUDA thread of every block of the grid. Throws std::runtime_error on a kernel bug
// the emulator detects, or on an invalid launch configuration. One launch at a time (a process-wide lock):
// static shared memory is one copy.
void launch(dim3 grid, dim3 block, size_t dynamic_smem_bytes, const std::function<void()>& body);

// How the threads of a block interleave (runtime.cpp explains each): "alternate" (the default, or
// XVERSE_EMU_SCHEDULE), "forward", "reverse", "concurrent". Returns false for an unknown name.
bool set_schedule(const std::string& name);
std::string schedule();

// ---- used by the device API (cuda_emu.h, ptx_emu.h) ----------------------------------------------------
void block_barrier(const Site& site);                   // __syncthreads
void warp_barrier(unsigned mask, const Site& site);     // __syncwarp(mask)
// Warp collective: deposits `bytes` (<= kExchangeBytes) from `in` into this lane's slot, waits for every lane
// of `mask`, and returns the slots of all 32 lanes ([32][kExchangeBytes]); valid until this lane's next
// collective. `what` names the collective in error messages.
constexpr size_t kExchangeBytes = 64;
const unsigned char* warp_exchange(unsigned mask, const void* in, size_t bytes, const char* what, const Site& site);
// Reports a kernel bug: fails the launch with `message` (and the site), unwinding this thread.
[[noreturn]] void fail(const char* what, const Site& site, const char* message);

// Registers a static __shared__ variable (once, at its first execution) and fills it with 0xFF; from then
// on it is poisoned at every block start. Returns true (it initialises a static flag).
bool register_shared(void* ptr, size_t bytes);

int lane_id();               // threadIdx linearised % 32
bool in_shared_memory(const void* ptr, size_t bytes);  // [ptr, ptr + bytes) inside this launch's shared memory
void* dynamic_shared_memory();                          // the per-launch extern __shared__ buffer

// cp.async bookkeeping of the calling thread (performed in FIFO order of commit groups).
void async_copy(void* dst, const void* src, int src_bytes, int total_bytes, const Site& site);
void async_commit();
void async_wait(int pending_groups_allowed);  // performs every committed group except the newest N
// Source bytes (src_bytes) of every cp.async performed since the process started: what a kernel reads
// through cp.async, for tests that count a kernel's global traffic.
uint64_t async_copy_source_bytes();

}  // namespace xverse::emu

// CUDA's built-in index variables, per OS thread.
extern thread_local uint3 threadIdx;
extern thread_local uint3 blockIdx;
extern thread_local dim3 blockDim;
extern thread_local dim3 gridDim;
constexpr int warpSize = 32;
