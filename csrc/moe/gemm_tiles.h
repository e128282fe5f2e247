// Tile shapes of the grouped-GEMM tensor-core kernel (grouped_gemm.cu) and their shared-memory budget.
// Plain C++ (no CUDA), so that the budget's static_asserts are also checked by a host compiler in the tests.
#pragma once

#include <cstdint>

namespace xverse {
namespace moe {

// BM rows (= block_m) x BNW weight rows per CTA; K in steps of BK through STAGES shared-memory buffers.
// For gate_up the BNW weight rows are BNW/2 gate rows then the BNW/2 matching up rows.
template <int BM_, int BNW_, int WARPS_M_, int WARPS_N_, int STAGES_>
struct TileConfig {
  static constexpr int BM = BM_;
  static constexpr int BNW = BNW_;
  static constexpr int WARPS_M = WARPS_M_;
  static constexpr int WARPS_N = WARPS_N_;
  static constexpr int STAGES = STAGES_;
  static constexpr int THREADS = 32 * WARPS_M * WARPS_N;
  static constexpr int BK = 32;
  static constexpr int LDS = BK + 8;     // smem row stride in elements: 80 bytes, conflict-free fragment loads
  static constexpr int WTM = BM / WARPS_M;   // warp tile rows
  static constexpr int WTN = BNW / WARPS_N;  // warp tile weight rows
  static constexpr int MF = WTM / 16;        // m16 fragments per warp
  static constexpr int NF = WTN / 8;         // n8 fragments per warp (half gate, half up for gate_up)
  static constexpr int A_STAGE = BM * LDS;
  static constexpr int B_STAGE = BNW * LDS;
  static constexpr int SMEM_BYTES = STAGES * (A_STAGE + B_STAGE) * 2;       // dynamic: the cp.async ring
  static constexpr int STATIC_SMEM_BYTES = 2 * BM * sizeof(int64_t);         // row_src, row_pair
  static_assert(BM % (16 * WARPS_M) == 0, "BM must split into m16 fragments per warp");
  static_assert(BNW % (16 * WARPS_N) == 0, "each warp needs an even number of n8 fragments (gate / up pairs)");
  static_assert(NF % 2 == 0, "gate and up fragments come in pairs");
  static_assert(BK % 16 == 0 && (LDS * 2) % 16 == 0, "k16 steps and 16-byte aligned smem rows");
  static_assert(SMEM_BYTES + STATIC_SMEM_BYTES <= 48 * 1024,
                "static + dynamic shared memory must stay within the 48 KB a launch gets without opting in");
  static_assert(STAGES >= 2, "need a pipeline");
  static_assert(THREADS >= BM, "one thread per tile row reads the row's pair id");
};

using SmallTile = TileConfig<16, 64, 1, 4, 6>;     // block_m 16
using MidTile = TileConfig<32, 128, 1, 4, 3>;      // block_m 32
using PrefillTile = TileConfig<64, 128, 2, 2, 3>;  // block_m 64

}  // namespace moe
}  // namespace xverse
