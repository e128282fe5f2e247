"""The CPU SIMT emulator tests itself: its PTX (mma.sync, ldmatrix, cp.async) against the PTX ISA's tables and a
plain matmul, and that it catches the bugs it exists to catch: a wrong fragment loader, a missing
__syncthreads, a barrier in a divergent branch, a cp.async read without its wait, a warp collective whose
lanes never arrive. The kernels are in csrc/emu/selftest_kernels.cpp."""
import pytest
import torch

from xverse_engine.ops import emulated

pytestmark = pytest.mark.emu


@pytest.fixture(scope="module")
def kernels():
    try:
        module = emulated.selftests()
    except emulated.EmulatorUnavailable as error:
        if emulated.emulated_build.cuda_include_dir() is None:
            pytest.skip(str(error))
        pytest.fail(str(error), pytrace=False)
    yield module
    module.set_schedule("alternate")


# ---- mma.sync.m16n8k16 ------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mma_with_the_isa_fragment_layout_is_a_matmul(kernels, dtype):
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(16, 16, generator=gen).to(dtype)
    b = torch.randn(16, 8, generator=gen).to(dtype)
    d = kernels.mma_m16n8k16(a, b, False)
    expected = a.double() @ b.double()  # 16-bit products are exact; fp32 accumulation
    torch.testing.assert_close(d.double(), expected, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mma_with_a_wrong_fragment_loader_is_wrong(kernels, dtype):
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(16, 16, generator=gen).to(dtype)
    b = torch.randn(16, 8, generator=gen).to(dtype)
    d = kernels.mma_m16n8k16(a, b, True)
    err = (d.double() - a.double() @ b.double()).abs()
    assert err.max() > 0.1, "a loader with a1 / a2 swapped must give a wrong product"


def test_mma_identity_places_every_element(kernels):
    """A = identity: D = B exactly, so every B element lands where the ISA table says (and A's diagonal too)."""
    a = torch.eye(16, dtype=torch.bfloat16)
    b = torch.arange(128, dtype=torch.float32).reshape(16, 8).to(torch.bfloat16)
    d = kernels.mma_m16n8k16(a, b, False)
    assert torch.equal(d, b.float())


# ---- ldmatrix -----------------------------------------------------------------------------------------------

def words(lo, hi):
    return (lo.to(torch.int64) & 0xFFFF) | ((hi.to(torch.int64) & 0xFFFF) << 16)


@pytest.mark.parametrize("trans", [False, True])
def test_ldmatrix_x4_matches_the_isa(kernels, trans):
    """Lane l names row l % 16, column block l / 16 of a 16x16 tile: matrices 0..3 are the quadrants
    (top-left, bottom-left, top-right, bottom-right). Lane l receives word l % 4 of row l / 4 of each
    (with .trans: elements [2 (l % 4)][l / 4] and [2 (l % 4) + 1][l / 4])."""
    tile = torch.arange(256, dtype=torch.int16).reshape(16, 16)
    regs = kernels.ldmatrix_x4(tile, trans).to(torch.int64) & 0xFFFFFFFF  # [32 lanes, 4 matrices]
    quadrants = [tile[:8, :8], tile[8:, :8], tile[:8, 8:], tile[8:, 8:]]
    for lane in range(32):
        for m, q in enumerate(quadrants):
            if trans:
                expected = words(q[2 * (lane % 4), lane // 4], q[2 * (lane % 4) + 1, lane // 4])
            else:
                expected = words(q[lane // 4, 2 * (lane % 4)], q[lane // 4, 2 * (lane % 4) + 1])
            assert regs[lane, m].item() == expected.item(), f"lane {lane} matrix {m} trans={trans}"


# ---- bugs the emulator catches -------------------------------------------------------------------------------

@pytest.mark.parametrize("schedule", ["alternate", "forward", "reverse"])
def test_missing_syncthreads_reads_poison(kernels, schedule):
    kernels.set_schedule(schedule)
    x = torch.arange(2 * 64, dtype=torch.float32)
    right = kernels.neighbour_exchange(x, 64, True)
    assert torch.equal(right, torch.roll(x.reshape(2, 64), -1, dims=1).reshape(-1))
    wrong = kernels.neighbour_exchange(x, 64, False)
    assert torch.isnan(wrong).any(), "a read of another thread's shared write without a barrier must see poison"


def test_divergent_barrier_fails_with_the_block(kernels):
    with pytest.raises(RuntimeError, match=r"divergent __syncthreads in block \(0,0,0\).*selftest_kernels.cpp"):
        kernels.divergent_barrier(64)


@pytest.mark.parametrize("schedule", ["alternate", "concurrent"])
def test_shuffle_naming_exited_lanes_fails(kernels, schedule):
    kernels.set_schedule(schedule)
    with pytest.raises(RuntimeError, match=r"(?=.*exited)(?=.*__shfl_xor_sync)"):
        kernels.shuffle_after_exit()


@pytest.mark.parametrize("schedule", ["alternate", "concurrent"])
def test_deadlock_is_reported_not_hung(kernels, schedule):
    kernels.set_schedule(schedule)
    with pytest.raises(RuntimeError, match="deadlock.*__syncthreads.*__shfl_xor_sync|deadlock.*__shfl_xor_sync.*__syncthreads"):
        kernels.deadlock()


def test_cp_async_lands_only_at_the_wait(kernels):
    x = torch.arange(4 * 8, dtype=torch.float32) + 1
    assert torch.equal(kernels.cp_async_copy(x, 16, 1), x)  # wait_group 0
    assert torch.equal(kernels.cp_async_copy(x, 16, 2), x)  # wait_all
    assert torch.isnan(kernels.cp_async_copy(x, 16, 0)).all(), "no wait: the copy never landed (poison)"
    assert torch.isnan(kernels.cp_async_copy(x, 16, 3)).all(), "wait_group 1 leaves the newest group pending"


def test_cp_async_zero_fills_past_src_size(kernels):
    x = torch.arange(4 * 8, dtype=torch.float32) + 1
    got = kernels.cp_async_copy(x, 8, 1).reshape(8, 4)  # 8 of 16 bytes: two floats copied, two zeroed
    assert torch.equal(got[:, :2], x.reshape(8, 4)[:, :2]) and (got[:, 2:] == 0).all()
    assert (kernels.cp_async_copy(x, 0, 1) == 0).all()  # src-size 0 reads nothing


def test_shared_memory_is_poisoned_at_block_start(kernels):
    assert (kernels.read_uninitialised_shared() == -1).all()


def test_out_of_bounds_read_is_caught_under_asan():
    """Under scripts/emu_sanitize.sh address every kernel runs with AddressSanitizer: a read one element past a
    tensor's storage must kill the process with a report (checked in a child process)."""
    if emulated.requested_sanitizer() != "address":
        pytest.skip("runs in the AddressSanitizer pass: scripts/emu_sanitize.sh address")
    import os
    import subprocess
    import sys
    code = ("import torch; from xverse_engine.ops import emulated; "
            "emulated.selftests().read_past_end(torch.ones(1000))")
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ))
    assert child.returncode != 0 and "AddressSanitizer" in child.stderr and "heap-buffer-overflow" in child.stderr, (
        child.stderr[-2000:])
