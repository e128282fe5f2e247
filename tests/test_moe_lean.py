"""The lean MoE decode path: shared experts folded into the grouped GEMM (gating appends them with weight 1.0),
the graph-safe token mask of align, the decode block height, and the grouped-GEMM contract fixes (pairs
missing from the layout give zeros; shared_out is added in fp32). CPU C++ kernels against the twins, and the
same tests on CUDA (marked gpu)."""
import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICES, require_extension
from xverse_engine.ops import moe

require_extension()


def randn(*shape, dtype=torch.float32, device="cpu", seed=0, scale=0.1):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(device)


_BLOCKS = {}


def block(num_experts, num_shared, hidden, inter, dtype, device, seed=0):
    """router [E, H] fp32, w13 [E+S, 2I, H], w2 [E+S, H, I]; cached (the real shapes are slow to make)."""
    key = (num_experts, num_shared, hidden, inter, dtype, str(device), seed)
    if key not in _BLOCKS:
        _BLOCKS.clear()
        _BLOCKS[key] = _make_block(num_experts, num_shared, hidden, inter, dtype, device, seed)
    return _BLOCKS[key]


def _make_block(num_experts, num_shared, hidden, inter, dtype, device, seed):
    router = randn(num_experts, hidden, device=device, seed=seed)
    w13 = randn(num_experts + num_shared, 2 * inter, hidden, dtype=dtype, device=device, seed=seed + 1)
    w2 = randn(num_experts + num_shared, hidden, inter, dtype=dtype, device=device, seed=seed + 2)
    return router, w13, w2


# ---- gating appends the shared experts -------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_tokens,num_experts,top_k,num_shared", [(1, 64, 6, 2), (7, 8, 2, 2), (83, 64, 6, 1)])
def test_gating_appends_shared_experts(device, num_tokens, num_experts, top_k, num_shared):
    x = randn(num_tokens, 256, dtype=torch.bfloat16, device=device, seed=num_tokens)
    router = randn(num_experts, 256, device=device, seed=1)
    weights, ids = torch.ops.xverse.gating_topk(x, router, top_k, num_shared)
    ref_weights, ref_ids = moe.gating_topk_torch(x, router, top_k, num_shared)
    assert weights.shape == ids.shape == (num_tokens, top_k + num_shared)
    shared_ids = torch.arange(num_experts, num_experts + num_shared, dtype=torch.int32)
    assert (ids[:, top_k:].cpu() == shared_ids).all(), "the shared experts E.. come last in every row"
    assert (weights[:, top_k:].cpu() == 1.0).all(), "with weight exactly 1.0"
    routed, routed_ref = ids[:, :top_k].cpu().sort(1).values, ref_ids[:, :top_k].cpu().sort(1).values
    assert torch.equal(routed, routed_ref)
    torch.testing.assert_close(weights.cpu().sort(1).values, ref_weights.cpu().sort(1).values, rtol=1e-5, atol=1e-6)
    # the routed part is exactly what gating without shared experts gives
    plain_weights, plain_ids = torch.ops.xverse.gating_topk(x, router, top_k)
    assert torch.equal(plain_ids, ids[:, :top_k]) and torch.equal(plain_weights, weights[:, :top_k])


# ---- align: the token mask (graph padding rows route nowhere) ----------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("block_m", [8, 16])
def test_align_token_mask_leaves_padding_rows_out(device, block_m):
    num_tokens, num_experts, top_k = 6, 10, 4
    gen = torch.Generator().manual_seed(5)
    ids = torch.rand(num_tokens, num_experts, generator=gen).topk(top_k, dim=1).indices.int().to(device)
    mask = torch.tensor([True, True, True, False, True, False], device=device)
    got = torch.ops.xverse.moe_align(ids, num_experts, block_m, mask)
    ref = moe.moe_align_torch(ids, num_experts, block_m, mask)
    sorted_ids, block_ids, num_padded = (t.cpu() for t in got)
    assert torch.equal(num_padded, ref[2].cpu()) and torch.equal(block_ids, ref[1].cpu())
    real = sorted_ids[sorted_ids < ids.numel()]
    tokens = set((real // top_k).tolist())
    assert tokens == {0, 1, 2, 4}, f"masked tokens 3 and 5 must not be routed, got tokens {sorted(tokens)}"
    assert sorted(real.tolist()) == sorted(ref[0][ref[0] < ids.numel()].tolist())
    # the padded count is what the 4 real rows alone need
    alone = torch.ops.xverse.moe_align(ids[[0, 1, 2, 4]].contiguous(), num_experts, block_m)
    assert int(num_padded) == int(alone[2].cpu())


def test_align_token_mask_rejects_bad_mask():
    ids = torch.zeros(4, 2, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="token_mask must be a"):
        torch.ops.xverse.moe_align(ids, 8, 8, torch.ones(3, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="token_mask must be a"):
        torch.ops.xverse.moe_align(ids, 8, 8, torch.ones(4, dtype=torch.int32))


# ---- grouped GEMM contract: pairs missing from the layout give zeros ---------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_tokens", [3, 40])
def test_pairs_missing_from_the_layout_give_zero_rows(device, dtype, num_tokens):
    """A masked token's pairs are not in the layout (as an expert-parallel rank's foreign experts are not):
    their act rows are 0 and they add 0, so the token's output is exactly 0 on every device."""
    num_experts, top_k, hidden, inter = 8, 2, 64, 32
    router, w13, w2 = block(num_experts, 0, hidden, inter, dtype, device)
    x = randn(num_tokens, hidden, dtype=dtype, device=device, seed=3)
    weights, ids = torch.ops.xverse.gating_topk(x, router, top_k)
    mask = torch.ones(num_tokens, dtype=torch.bool, device=device)
    mask[1::2] = False
    block_m = moe.choose_block_m(ids.numel(), num_experts)
    layout = torch.ops.xverse.moe_align(ids, num_experts, block_m, mask)
    act = torch.ops.xverse.moe_gate_up(x, w13, *layout, top_k, block_m)
    out = torch.ops.xverse.moe_down_combine(act, w2, *layout, weights, None, block_m)
    masked_pairs = (~mask).repeat_interleave(top_k)
    assert (act[masked_pairs] == 0).all(), "act rows of pairs missing from the layout must be 0"
    assert (out[~mask] == 0).all(), "a token with no pair in the layout gets a 0 output row"
    ref_act = moe.moe_gate_up_torch(x, w13, *layout, top_k, block_m)
    ref_out = moe.moe_down_combine_torch(ref_act, w2, *layout, weights, None, block_m)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=2e-2)
    torch.testing.assert_close(out.float().cpu(), ref_out.float().cpu(), **tol)


@pytest.mark.parametrize("device", DEVICES)
def test_shared_out_is_added_in_fp32(device):
    """shared_out in fp32 with bf16 activations: added before the one rounding to bf16, as the twin does."""
    num_tokens, num_experts, top_k, hidden, inter = 5, 8, 2, 64, 32
    router, w13, w2 = block(num_experts, 0, hidden, inter, torch.bfloat16, device)
    x = randn(num_tokens, hidden, dtype=torch.bfloat16, device=device, seed=3)
    weights, ids = torch.ops.xverse.gating_topk(x, router, top_k)
    layout = torch.ops.xverse.moe_align(ids, num_experts, 8)
    act = torch.ops.xverse.moe_gate_up(x, w13, *layout, top_k, 8)
    # values that bf16 cannot hold: rounding them first would change the sum
    shared = randn(num_tokens, hidden, device=device, seed=9) + 1.0 + 1e-3
    out = torch.ops.xverse.moe_down_combine(act, w2, *layout, weights, shared, 8)
    ref = moe.moe_down_combine_torch(act, w2, *layout, weights, shared, 8)
    torch.testing.assert_close(out.float().cpu(), ref.float().cpu(), rtol=0, atol=0)


# ---- the folded shared experts equal a separate shared MLP ---------------------------------------------------

@pytest.mark.parametrize("kernels", ["torch", "cpu"])
@pytest.mark.parametrize("num_tokens", [1, 5, 33])
def test_folded_shared_experts_equal_the_separate_shared_mlp(kernels, num_tokens):
    """Experts E, E+1 holding halves of the shared SwiGLU's intermediate dim give the shared MLP's output
    (down(silu(g) u) is a sum over the intermediate dim), added after the routed sum."""
    num_experts, top_k, num_shared, hidden, inter = 8, 2, 2, 64, 32
    router, w13, w2 = block(num_experts, num_shared, hidden, inter, torch.float32, "cpu", seed=4)
    x = randn(num_tokens, hidden, seed=7, scale=1.0)
    folded = moe.fused_moe(x, router, w13, w2, top_k, kernels=kernels, num_shared=num_shared)
    # the same shared experts as one SwiGLU of 2I (the checkpoint's layout)
    gate = torch.cat([w13[num_experts + s, :inter] for s in range(num_shared)])        # [2I, H]
    up = torch.cat([w13[num_experts + s, inter:] for s in range(num_shared)])
    down = torch.cat([w2[num_experts + s] for s in range(num_shared)], dim=1)           # [H, 2I]
    shared = F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)
    separate = moe.fused_moe(x, router, w13[:num_experts], w2[:num_experts], top_k, shared_out=shared,
                             kernels=kernels)
    torch.testing.assert_close(folded, separate, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_pairs,expected", [(1, 8), (64, 8), (65, 16)])
def test_decode_block_height(num_pairs, expected):
    assert moe.choose_block_m(num_pairs, 66) == expected


DECODE_CASES = [(1, 2560, 1728, torch.bfloat16), (4, 2560, 1728, torch.bfloat16)] + [
    (t, h, i, dtype) for t, h, i in ((8, 136, 72), (3, 40, 24)) for dtype in (torch.bfloat16, torch.float16)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_tokens,hidden,inter,dtype", DECODE_CASES)
def test_decode_gemms_match_twins(device, num_tokens, hidden, inter, dtype):
    """block_m = 8 (the weight-streaming decode kernel on CUDA) on the real shapes with 6 routed + 2 shared,
    and on small ones with K and N tails (K = 40: one 32-chunk plus 8; N = 24 / 72: partial 16/32 tiles)."""
    num_experts, top_k, num_shared = 8, 6 if hidden == 2560 else 2, 2  # 8 routed experts keep the CPU run short
    router, w13, w2 = block(num_experts, num_shared, hidden, inter, dtype, device, seed=hidden)
    x = randn(num_tokens, hidden, dtype=dtype, device=device, seed=num_tokens) + 0.05
    weights, ids = torch.ops.xverse.gating_topk(x, router, top_k, num_shared)
    pairs = top_k + num_shared
    assert moe.choose_block_m(ids.numel(), num_experts + num_shared) == 8
    layout = torch.ops.xverse.moe_align(ids, num_experts + num_shared, 8)
    act = torch.ops.xverse.moe_gate_up(x, w13, *layout, pairs, 8)
    ref_act = moe.moe_gate_up_torch(x, w13, *layout, pairs, 8)
    tol = dict(rtol=1.6e-2, atol=2e-2)
    torch.testing.assert_close(act.float().cpu(), ref_act.float().cpu(), **tol)
    out = torch.ops.xverse.moe_down_combine(ref_act, w2, *layout, weights, None, 8)
    ref_out = moe.moe_down_combine_torch(ref_act, w2, *layout, weights, None, 8)
    torch.testing.assert_close(out.float().cpu(), ref_out.float().cpu(), **tol)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_new_arguments(device):
    x = randn(5, 32, dtype=torch.bfloat16, device=device)
    router = randn(8, 32, device=device, seed=1)
    torch.library.opcheck(torch.ops.xverse.gating_topk.default, (x, router, 2, 2))
    _, ids = torch.ops.xverse.gating_topk(x, router, 2, 2)
    mask = torch.tensor([True, False, True, True, False], device=device)
    torch.library.opcheck(torch.ops.xverse.moe_align.default, (ids, 10, 8, mask))
