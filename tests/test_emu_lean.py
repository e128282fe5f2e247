"""The lean decode path's CUDA kernels on the CPU SIMT emulator (torch.ops.xverse_emu.*) against their twins:
add_rmsnorm, rope_cache, gating with the shared experts appended, align's token mask, the weight-streaming
decode GEMM (block_m 8: gate_up and down, with K and N tails, experts with more than 8 rows, padding slots),
and the grouped GEMM's contract fixes (zero rows for pairs missing from the layout, shared_out in fp32)."""
import pytest
import torch

import test_fused_ops as fused_cases
from xverse_engine.ops import fused, moe

pytestmark = pytest.mark.emu

TOL = {torch.float32: (1e-5, 1e-6), torch.bfloat16: (1.6e-2, 2e-2), torch.float16: (2e-3, 2e-3)}


def randn(*shape, dtype=torch.float32, seed=0, scale=0.1):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * scale).to(dtype)


def assert_close(actual, expected, dtype, what):
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


# ---- add_rmsnorm ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("num_tokens,hidden,dtype", [(3, 64, torch.bfloat16), (2, 67, torch.float32),
                                                     (1, 2560, torch.bfloat16), (2, 24, torch.float16)])
def test_add_rmsnorm(emu, num_tokens, hidden, dtype):
    """16-byte packs (H % 8 == 0 for 16-bit types), the scalar path (odd H), the real hidden size."""
    x = randn(num_tokens, hidden, dtype=dtype, seed=1, scale=1.0)
    residual = randn(num_tokens, hidden, dtype=dtype, seed=2, scale=3.0)
    weight = randn(hidden, dtype=dtype, seed=3, scale=1.0) + 1
    x_ref, residual_ref = x.clone(), residual.clone()
    fused.add_rmsnorm_torch(x_ref, residual_ref, weight, 1e-6)
    emu.add_rmsnorm(x, residual, weight, 1e-6)
    assert torch.equal(residual, residual_ref), "residual += x must be bit-exact"
    assert_close(x, x_ref, dtype, f"emulated add_rmsnorm T={num_tokens} H={hidden} {dtype}")


# ---- rope_cache ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("num_tokens,num_heads,num_kv,head_dim,dtype", [
    (3, 4, 2, 80, torch.bfloat16), (4, 2, 2, 6, torch.float32), (2, 3, 1, 128, torch.float16)])
def test_rope_cache(emu, num_tokens, num_heads, num_kv, head_dim, dtype):
    """head_dim 80 (half = 40 < 64 threads), 128 (half = 64), a tiny 6; GQA; strided q/k/v; padding slots."""
    q, k, v, key_cache, value_cache, slots, positions, cos_sin = fused_cases.rope_inputs(
        num_tokens, num_heads, num_kv, head_dim, dtype, "cpu")
    ref = [t.clone() for t in (q, key_cache, value_cache)]
    fused.rope_cache_torch(ref[0], k, v, ref[1], ref[2], slots, positions, cos_sin)
    emu.rope_cache(q, k, v, key_cache, value_cache, slots, positions, cos_sin)
    what = f"emulated rope_cache T={num_tokens} Hq={num_heads} Hkv={num_kv} D={head_dim} {dtype}"
    assert_close(q, ref[0], dtype, what + " query")
    assert_close(key_cache, ref[1], dtype, what + " key_cache")
    assert torch.equal(value_cache, ref[2]), what + ": value rows are copied exactly"


# ---- gating with shared experts, align with a token mask ------------------------------------------------------

def test_gating_appends_shared_experts(emu):
    x = randn(5, 64, dtype=torch.bfloat16, seed=4)
    router = randn(8, 64, seed=5)
    weights, ids = emu.gating_topk(x, router, 2, 2)
    ref_weights, ref_ids = moe.gating_topk_torch(x, router, 2, 2)
    assert ids.shape == (5, 4)
    assert torch.equal(ids[:, 2:], ref_ids[:, 2:]) and (weights[:, 2:] == 1.0).all()
    assert torch.equal(ids[:, :2].sort(1).values, ref_ids[:, :2].sort(1).values)
    torch.testing.assert_close(weights.sort(1).values, ref_weights.sort(1).values, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("block_m", [8, 16])
def test_align_token_mask(emu, block_m):
    ids = torch.rand(6, 10, generator=torch.Generator().manual_seed(6)).topk(4, dim=1).indices.int()
    ids[2, 1] = -1  # another rank's expert: skipped as well
    mask = torch.tensor([True, True, True, False, True, False])
    sorted_ids, block_ids, num_padded = emu.moe_align(ids, 10, block_m, mask)
    ref = moe.moe_align_torch(ids, 10, block_m, mask)
    assert torch.equal(num_padded, ref[2]) and torch.equal(block_ids, ref[1])
    real = sorted_ids[sorted_ids < ids.numel()]
    assert sorted(real.tolist()) == sorted(ref[0][ref[0] < ids.numel()].tolist())
    assert not set((real // 4).tolist()) & {3, 5}, "masked tokens are not routed"


# ---- the decode GEMM (block_m 8) -----------------------------------------------------------------------------

# (T, E routed, k, S shared, H, I, dtype): K tails (H = 40: one 32-chunk + 8; I = 24), N tails (I = 24 over 16-wide
# gate_up CTAs; H = 40 over 32-wide down CTAs), 9 tokens: the shared experts get 9 rows = 2 blocks of 8.
DECODE = [(3, 8, 2, 2, 40, 24, torch.bfloat16), (9, 8, 2, 2, 64, 48, torch.bfloat16),
          (2, 8, 6, 2, 72, 40, torch.float16), (1, 8, 6, 2, 136, 72, torch.bfloat16)]


def decode_case(num_tokens, num_experts, top_k, num_shared, hidden, inter, dtype, mask=None):
    router = randn(num_experts, hidden, seed=hidden)
    w13 = randn(num_experts + num_shared, 2 * inter, hidden, dtype=dtype, seed=hidden + 1)
    w2 = randn(num_experts + num_shared, hidden, inter, dtype=dtype, seed=hidden + 2)
    x = randn(num_tokens, hidden, dtype=dtype, seed=num_tokens) + 0.05
    weights, ids = moe.gating_topk_torch(x, router, top_k, num_shared)
    layout = moe.moe_align_torch(ids, num_experts + num_shared, moe.DECODE_BLOCK_M, mask)
    return x, w13, w2, weights, layout


@pytest.mark.parametrize("num_tokens,num_experts,top_k,num_shared,hidden,inter,dtype", DECODE)
def test_decode_gate_up(emu, num_tokens, num_experts, top_k, num_shared, hidden, inter, dtype):
    x, w13, _, _, layout = decode_case(num_tokens, num_experts, top_k, num_shared, hidden, inter, dtype)
    pairs = top_k + num_shared
    act = emu.moe_gate_up(x, w13, *layout, pairs, moe.DECODE_BLOCK_M)
    ref = moe.moe_gate_up_torch(x, w13, *layout, pairs, moe.DECODE_BLOCK_M)
    assert_close(act, ref, dtype, f"emulated decode gate_up T={num_tokens} H={hidden} I={inter} {dtype}")


@pytest.mark.parametrize("num_tokens,num_experts,top_k,num_shared,hidden,inter,dtype", DECODE)
def test_decode_down_combine(emu, num_tokens, num_experts, top_k, num_shared, hidden, inter, dtype):
    x, _, w2, weights, layout = decode_case(num_tokens, num_experts, top_k, num_shared, hidden, inter, dtype)
    act = randn(num_tokens * (top_k + num_shared), inter, dtype=dtype, seed=7)
    out = emu.moe_down_combine(act, w2, *layout, weights, None, moe.DECODE_BLOCK_M)
    ref = moe.moe_down_combine_torch(act, w2, *layout, weights, None, moe.DECODE_BLOCK_M)
    assert_close(out, ref, dtype, f"emulated decode down T={num_tokens} H={hidden} I={inter} {dtype}")


@pytest.mark.parametrize("block_m", [8, 16])
def test_pairs_missing_from_the_layout_give_zero_rows(emu, block_m):
    """Masked tokens' pairs are not in the layout: their act rows and their output rows are exactly 0 (the
    buffers start zeroed on CUDA too), and the other rows match the twin."""
    mask = torch.tensor([True, False, True, False])
    x, w13, w2, weights, layout = decode_case(4, 8, 2, 2, 40, 24, torch.bfloat16, mask)
    layout = moe.moe_align_torch(moe.gating_topk_torch(x, randn(8, 40, seed=40), 2, 2)[1], 10, block_m, mask)
    act = emu.moe_gate_up(x, w13, *layout, 4, block_m)
    out = emu.moe_down_combine(act, w2, *layout, weights, None, block_m)
    assert (act.view(4, 4, -1)[~mask] == 0).all() and (out[~mask] == 0).all()
    ref = moe.moe_down_combine_torch(moe.moe_gate_up_torch(x, w13, *layout, 4, block_m), w2, *layout, weights,
                                     None, block_m)
    assert_close(out, ref, torch.bfloat16, f"emulated masked block block_m={block_m}")


def test_shared_out_is_added_in_fp32(emu):
    """Small integers for act and w2 and weights of 1/2, 1/4: the routed sum is exact in any order, so the
    output equals the twin's bit for bit exactly when shared_out is added in fp32 (values bf16 cannot hold)."""
    x, w13, w2, _, _ = decode_case(3, 8, 2, 0, 40, 24, torch.bfloat16)
    ids = moe.gating_topk_torch(x, randn(8, 40, seed=40), 2)[1]
    layout = moe.moe_align_torch(ids, 8, 16)
    gen = torch.Generator().manual_seed(11)
    act = torch.randint(-2, 3, (6, 24), generator=gen).to(torch.bfloat16)
    w2 = torch.randint(-2, 3, (8, 40, 24), generator=gen).to(torch.bfloat16)
    weights = torch.tensor([[0.5, 0.25]] * 3)
    shared = randn(3, 40, seed=9) + 1.0 + 1e-3
    out = emu.moe_down_combine(act, w2, *layout, weights, shared, 16)
    ref = moe.moe_down_combine_torch(act, w2, *layout, weights, shared, 16)
    torch.testing.assert_close(out.float(), ref.float(), rtol=0, atol=0)
    rounded_first = moe.moe_down_combine_torch(act, w2, *layout, weights, shared.bfloat16(), 16)
    assert not torch.equal(rounded_first, ref), "the case must tell fp32 from bf16 addition apart"
