// C++ bodies of the PTX wrappers of csrc/common/ptx.cuh, for the CPU SIMT emulator.
//
// Written from the PTX ISA document (never from our kernels), so that the emulator judges our fragment
// code independently:
//   mma.m16n8k16 (.f32.bf16/.f16): "Matrix Fragments for mma.m16n8k16 with floating point type"
//     (section 9.7.14.5.8 in recent editions), groupID = lane >> 2, threadID_in_group = lane % 4;
//   ldmatrix: "Warp-level matrix load instruction: ldmatrix";
//   cp.async: "Data Movement and Conversion Instructions: cp.async" (src-size zero-fill, commit/wait groups).
#pragma once

#include <cstdint>
#include <cstring>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "emu/runtime.h"

namespace xverse::ptx {
namespace fragments {

// ---- the PTX ISA's fragment layout for mma.m16n8k16 (16-bit A/B, f32 C/D) -----------------------------
// A is 16x16 (row-major, M x K): lane holds a0..a7 in 4 b32 registers, two 16-bit elements each, the
// element with the lower index in the lower half.
//   a_i: row = groupID          for a0, a1, a4, a5;  groupID + 8 for a2, a3, a6, a7
//        col = threadID_in_group * 2 + (i & 1)       for a0..a3;   + 8 for a4..a7
// B is 16x8 (K x N): b0..b3 in 2 registers.
//   b_i: row (k) = threadID_in_group * 2 + (i & 1)   for b0, b1;   + 8 for b2, b3
//        col (n) = groupID
// C / D are 16x8 f32: c0..c3.
//   c_i: row = groupID for c0, c1; groupID + 8 for c2, c3;  col = threadID_in_group * 2 + (i & 1)
struct Position {
  int row, col;
};
inline Position a_position(int lane, int i) {
  const int group = lane >> 2, tig = lane % 4;
  return {group + ((i & 2) ? 8 : 0), tig * 2 + (i & 1) + (i >= 4 ? 8 : 0)};
}
inline Position b_position(int lane, int i) {
  const int group = lane >> 2, tig = lane % 4;
  return {tig * 2 + (i & 1) + (i >= 2 ? 8 : 0), group};
}
inline Position c_position(int lane, int i) {
  const int group = lane >> 2, tig = lane % 4;
  return {group + (i >= 2 ? 8 : 0), tig * 2 + (i & 1)};
}

// 16-bit element `i` of a register file (element 2j in the low half of register j).
inline uint16_t half_of(const uint32_t* regs, int i) { return static_cast<uint16_t>(regs[i / 2] >> (16 * (i & 1))); }

inline float to_float_bf16(uint16_t bits) { return __uint_as_float(static_cast<unsigned>(bits) << 16); }
inline float to_float_f16(uint16_t bits) { return __half2float(__ushort_as_half(bits)); }

struct MmaDeposit {  // what each lane brings to the warp
  uint32_t a[4];
  uint32_t b[2];
};

// D = A * B + C for the whole warp; each lane returns its own d0..d3.
template <float (*kToFloat)(uint16_t)>
void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4], const char* what,
                  const emu::Site& site) {
  MmaDeposit mine;
  std::memcpy(mine.a, a, sizeof(mine.a));
  std::memcpy(mine.b, b, sizeof(mine.b));
  const unsigned char* slots = emu::warp_exchange(0xffffffffu, &mine, sizeof(mine), what, site);
  float A[16][16], B[16][8];
  for (int lane = 0; lane < 32; ++lane) {
    MmaDeposit dep;
    std::memcpy(&dep, slots + lane * emu::kExchangeBytes, sizeof(dep));
    for (int i = 0; i < 8; ++i) {
      const Position p = a_position(lane, i);
      A[p.row][p.col] = kToFloat(half_of(dep.a, i));
    }
    for (int i = 0; i < 4; ++i) {
      const Position p = b_position(lane, i);
      B[p.row][p.col] = kToFloat(half_of(dep.b, i));
    }
  }
  const int me = emu::lane_id();
  for (int i = 0; i < 4; ++i) {
    const Position p = c_position(me, i);
    double sum = 0.0;  // products of 16-bit floats are exact; accumulate wide, round once
    for (int k = 0; k < 16; ++k) sum += static_cast<double>(A[p.row][k]) * B[k][p.col];
    d[i] = static_cast<float>(sum + static_cast<double>(c[i]));
  }
}

// ldmatrix .m8n8 .b16 with `num` matrices: lanes 8m..8m+7 give the addresses of rows 0..7 of matrix m.
// Lane l receives, for matrix m, the 32-bit word (l % 4) of row (l / 4); with .trans, the elements
// [2 (l % 4)][l / 4] and [2 (l % 4) + 1][l / 4] (the fragment of the transposed matrix).
inline void ldmatrix(uint32_t* r, int num, bool trans, const void* row_address, const emu::Site& site) {
  const char* what = trans ? "ldmatrix.trans" : "ldmatrix";
  const unsigned char* slots = emu::warp_exchange(0xffffffffu, &row_address, sizeof(row_address), what, site);
  const int lane = emu::lane_id();
  auto row_of = [&](int m, int row) {
    const void* p;
    std::memcpy(&p, slots + (8 * m + row) * emu::kExchangeBytes, sizeof(p));
    if (!emu::in_shared_memory(p, 16)) emu::fail(what, site, "a row address is not inside shared memory");
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) emu::fail(what, site, "row addresses must be 16-byte aligned");
    return static_cast<const uint16_t*>(p);
  };
  for (int m = 0; m < num; ++m) {
    if (!trans) {
      std::memcpy(&r[m], row_of(m, lane / 4) + 2 * (lane % 4), 4);
    } else {
      const uint16_t lo = row_of(m, 2 * (lane % 4))[lane / 4];
      const uint16_t hi = row_of(m, 2 * (lane % 4) + 1)[lane / 4];
      r[m] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
    }
  }
}

}  // namespace fragments

// ---- the wrappers (same signatures as the GPU versions in csrc/common/ptx.cuh) --------------------------
inline void cp_async_16(void* smem_dst, const void* gmem_src, int src_bytes,
                        const emu::Site& site = emu::Site::current()) {
  emu::async_copy(smem_dst, gmem_src, src_bytes, 16, site);
}
inline void cp_async_commit() { emu::async_commit(); }
template <int N>
inline void cp_async_wait() {
  static_assert(N >= 0, "wait_group N >= 0");
  emu::async_wait(N);
}
inline void cp_async_wait_all() {  // = commit_group; wait_group 0
  emu::async_commit();
  emu::async_wait(0);
}

inline void mma_m16n8k16_bf16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4],
                              const emu::Site& site = emu::Site::current()) {
  fragments::mma_m16n8k16<fragments::to_float_bf16>(d, a, b, c, "mma.sync.m16n8k16.bf16", site);
}
inline void mma_m16n8k16_f16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4],
                             const emu::Site& site = emu::Site::current()) {
  fragments::mma_m16n8k16<fragments::to_float_f16>(d, a, b, c, "mma.sync.m16n8k16.f16", site);
}

inline void ldmatrix_x4(uint32_t (&r)[4], const void* smem_row, const emu::Site& site = emu::Site::current()) {
  fragments::ldmatrix(r, 4, false, smem_row, site);
}
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem_row, const emu::Site& site = emu::Site::current()) {
  fragments::ldmatrix(r, 4, true, smem_row, site);
}
inline void ldmatrix_x2(uint32_t (&r)[2], const void* smem_row, const emu::Site& site = emu::Site::current()) {
  fragments::ldmatrix(r, 2, false, smem_row, site);
}
inline void ldmatrix_x2_trans(uint32_t (&r)[2], const void* smem_row, const emu::Site& site = emu::Site::current()) {
  fragments::ldmatrix(r, 2, true, smem_row, site);
}

}  // namespace xverse::ptx
