"""The MoE ops (torch.ops.xverse.*) against their pure-PyTorch twins, and the whole fused_moe block
against an independent float64 per-expert-loop reference written here from MODEL.md.

CPU: the C++ kernels (the extension must be built; CI builds it). CUDA: the same tests under
@pytest.mark.gpu, skipped without a GPU. Expert ids are compared as sets per row (top-k order is not
part of the contract), pair ids as sets per expert group (order inside a group is unspecified).
"""
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICES, require_extension
from xverse_engine.ops import moe

require_extension()

DTYPES = [torch.float32, torch.bfloat16]
# (rtol, atol) per dtype, on inputs scaled by 0.1
TOL = {torch.float32: (1e-4, 1e-5), torch.bfloat16: (1.6e-2, 2e-2)}
REAL_H, REAL_I = 2560, 1728


def shapes(num_tokens, num_experts):
    """(H, I): the real model's at small T with E = 8; otherwise small ones that are not multiples of any
    tile: odd (scalar / SIMT paths) with E = 8, multiples of 8 (the tensor-core path's tails) with E = 64."""
    if num_tokens <= 83 and num_experts == 8:
        return REAL_H, REAL_I
    return (67, 45) if num_experts == 8 else (136, 72)


_WEIGHTS = {}


def expert_weights(num_experts, hidden, inter, dtype, device):
    """w13 [E, 2I, H], w2 [E, H, I], router [E, H] fp32, scaled by 0.1; cached (the real shapes are big)."""
    key = (num_experts, hidden, inter, dtype, device)
    if key not in _WEIGHTS:  # at most 3 shapes x 2 dtypes x devices: ~0.7 GB on the CPU
        gen = torch.Generator().manual_seed(num_experts * 7919 + hidden)
        w13 = (torch.randn(num_experts, 2 * inter, hidden, generator=gen) * 0.1).to(dtype)
        w2 = (torch.randn(num_experts, hidden, inter, generator=gen) * 0.1).to(dtype)
        router = torch.randn(num_experts, hidden, generator=gen) * 0.1
        _WEIGHTS[key] = (w13.to(device), w2.to(device), router.to(device))
    return _WEIGHTS[key]


def hidden_states(num_tokens, hidden, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed + num_tokens)
    return (torch.randn(num_tokens, hidden, generator=gen) * 0.1 + 0.1).to(dtype).to(device)


def where(mismatch):
    """A short 'where and how much' for assertion messages."""
    idx = mismatch.nonzero()[:3].tolist()
    return f"{int(mismatch.sum())} mismatches, first at {idx}"


def assert_close(actual, expected, dtype, what):
    rtol, atol = TOL[dtype]
    actual, expected = actual.float().cpu(), expected.float().cpu()
    err = (actual - expected).abs()
    bad = err > atol + rtol * expected.abs()
    assert not bad.any(), f"{what}: max abs err {err.max().item():.3e}; {where(bad)}"


def assert_same_routing(weights, ids, ref_weights, ref_ids, ref_probs, what):
    """ids as sets per row, weights matched by id. A row may differ only at a near-tie of the reference
    probabilities (two summation orders of the logits can swap nearly equal experts)."""
    weights, ids = weights.cpu(), ids.cpu().long()
    ref_weights, ref_ids, ref_probs = ref_weights.cpu(), ref_ids.cpu().long(), ref_probs.cpu()
    assert ids.dtype == torch.int64 and ids.shape == ref_ids.shape
    ids_sorted, order = ids.sort(dim=1)
    ref_sorted, ref_order = ref_ids.sort(dim=1)
    differ = (ids_sorted != ref_sorted).any(dim=1)
    for row in differ.nonzero().flatten().tolist():
        mine = set(ids[row].tolist()) ^ set(ref_ids[row].tolist())
        probs = ref_probs[row, list(mine)]
        assert (probs.max() - probs.min()).item() < 1e-6, (
            f"{what}: row {row} ids {ids[row].tolist()} vs reference {ref_ids[row].tolist()} (not a near-tie)")
    same = ~differ
    w = weights.gather(1, order)[same]
    w_ref = ref_weights.gather(1, ref_order)[same]
    torch.testing.assert_close(w, w_ref, rtol=1e-5, atol=1e-6, equal_nan=True, msg=lambda m: f"{what}: {m}")
    assert differ.float().mean().item() < 0.01, f"{what}: {int(differ.sum())} rows route differently"


def reference_probs(x, router):
    return torch.softmax(x.float().cpu() @ router.float().cpu().t(), dim=-1)


# ---- gating / top-k ------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("top_k", [1, 2, 6])
@pytest.mark.parametrize("num_experts", [8, 64])
@pytest.mark.parametrize("num_tokens", [1, 7, 83, 4096])
def test_gating_topk(device, num_tokens, num_experts, top_k, dtype):
    hidden = REAL_H if num_tokens <= 83 else 67
    gen = torch.Generator().manual_seed(num_tokens * 31 + num_experts)
    router = (torch.randn(num_experts, hidden, generator=gen) * 0.1).to(device)
    x = hidden_states(num_tokens, hidden, dtype, device)
    weights, ids = torch.ops.xverse.gating_topk(x, router, top_k)
    ref_weights, ref_ids = moe.gating_topk_torch(x, router, top_k)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int32 and weights.device == x.device
    assert_same_routing(weights, ids.long(), ref_weights, ref_ids.long(), reference_probs(x, router),
                        f"gating T={num_tokens} E={num_experts} k={top_k} {dtype} {device}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_experts", [8, 64])
def test_gating_ties_nan_and_inf(device, num_experts):
    top_k, hidden = 6, 40
    router = torch.randn(num_experts, hidden) * 0.1
    router[5] = router[2]              # experts 2 and 5 always tie: 2 must win
    router[num_experts - 1] = router[0]
    x = torch.randn(6, hidden) * 0.1
    x[0] = 0.0                         # all logits 0: every expert ties -> ids 0..k-1
    x[1] = float("nan")                # all-NaN row (graph padding) -> valid ids 0..k-1
    x[2, 3] = float("inf")             # inf -> NaN probs -> ids 0..k-1
    x[3] = router[2] * 100.0           # expert 2 / 5 on top by far
    router, x = router.to(device), x.to(device)
    weights, ids = torch.ops.xverse.gating_topk(x, router, top_k)
    ref_weights, ref_ids = moe.gating_topk_torch(x, router, top_k)
    ids, weights = ids.cpu(), weights.cpu()
    first = list(range(top_k))
    for row in (0, 1, 2):
        assert sorted(ids[row].tolist()) == first, f"row {row}: ids {ids[row].tolist()} should be {first}"
    assert torch.allclose(weights[0], torch.full((top_k,), 1.0 / top_k), atol=1e-5), weights[0]
    assert torch.isnan(weights[1]).all() and torch.isnan(weights[2]).all()
    assert 2 in ids[3].tolist(), f"expert 2 (the lower of a tie with 5) must be picked: {ids[3].tolist()}"
    assert ((ids >= 0) & (ids < num_experts)).all()
    for row in range(6):
        assert set(ids[row].tolist()) == set(ref_ids[row].tolist()), f"row {row}: {ids[row]} vs {ref_ids[row]}"


# ---- align / permute -------------------------------------------------------------------------------------

def random_topk_ids(num_tokens, num_experts, top_k, device, skew=False):
    """[T, k] int32, distinct experts per row; skew=True sends most tokens to a few experts."""
    gen = torch.Generator().manual_seed(num_tokens * 13 + num_experts * 3 + top_k)
    scores = torch.rand(num_tokens, num_experts, generator=gen)
    if skew:
        scores[:, : top_k] += 1.0
    return scores.topk(top_k, dim=1).indices.to(torch.int32).to(device)


def assert_same_layout(got, ref, num_pairs, block_m, what):
    sorted_ids, block_ids, num_padded = (t.cpu() for t in got)
    ref_sorted, ref_blocks, ref_padded = ref
    assert sorted_ids.dtype == block_ids.dtype == num_padded.dtype == torch.int32, what
    assert sorted_ids.shape == ref_sorted.shape and block_ids.shape == ref_blocks.shape, what
    assert num_padded.tolist() == ref_padded.tolist(), f"{what}: num_padded {num_padded} vs {ref_padded}"
    assert torch.equal(block_ids, ref_blocks), f"{what}: block_expert_ids differ: {where(block_ids != ref_blocks)}"
    padded = int(ref_padded)
    assert (sorted_ids[padded:] == num_pairs).all(), f"{what}: slots past num_padded must hold the sentinel"
    # Each expert's group: the same multiset of pair ids (and sentinels), in any order.
    starts = torch.arange(0, padded, block_m)
    experts = ref_blocks[: len(starts)]
    for e in experts.unique().tolist():
        slots = torch.cat([torch.arange(s, s + block_m) for s in starts[experts == e].tolist()])
        assert torch.equal(sorted_ids[slots].sort().values, ref_sorted[slots].sort().values), f"{what}: expert {e}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("block_m", [16, 64])
@pytest.mark.parametrize("top_k", [1, 2, 6])
@pytest.mark.parametrize("num_experts", [8, 64])
@pytest.mark.parametrize("num_tokens", [1, 7, 83, 4096])
def test_moe_align(device, num_tokens, num_experts, top_k, block_m):
    for skew in (False, True):
        ids = random_topk_ids(num_tokens, num_experts, top_k, device, skew)
        got = torch.ops.xverse.moe_align(ids, num_experts, block_m)
        ref = moe.moe_align_torch(ids.cpu(), num_experts, block_m)
        assert all(t.device == ids.device for t in got)
        assert_same_layout(got, ref, ids.numel(), block_m, f"align T={num_tokens} E={num_experts} k={top_k} "
                           f"block_m={block_m} skew={skew} {device}")


# ---- grouped GEMMs ---------------------------------------------------------------------------------------

def routed_layout(x, router, top_k, device):
    num_experts = router.shape[0]
    weights, ids = moe.gating_topk_torch(x, router, top_k)
    block_m = moe.choose_block_m(ids.numel(), num_experts)
    layout = moe.moe_align_torch(ids.cpu(), num_experts, block_m)
    return weights.to(device), tuple(t.to(device) for t in layout), block_m


GEMM_CASES = [(t, e, k) for t in (1, 7, 83, 4096) for e in (8, 64) for k in (1, 2, 6)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens,num_experts,top_k", GEMM_CASES)
def test_moe_gate_up(device, num_tokens, num_experts, top_k, dtype):
    hidden, inter = shapes(num_tokens, num_experts)
    w13, _, router = expert_weights(num_experts, hidden, inter, dtype, device)
    x = hidden_states(num_tokens, hidden, dtype, device)
    _, layout, block_m = routed_layout(x, router, top_k, device)
    act = torch.ops.xverse.moe_gate_up(x, w13, *layout, top_k, block_m)
    ref = moe.moe_gate_up_torch(x, w13, *layout, top_k, block_m)
    assert act.shape == ref.shape and act.dtype == dtype and act.device == x.device
    assert_close(act, ref, dtype, f"gate_up T={num_tokens} E={num_experts} k={top_k} H={hidden} I={inter} "
                 f"block_m={block_m} {dtype} {device}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens,num_experts,top_k", GEMM_CASES)
def test_moe_down_combine(device, num_tokens, num_experts, top_k, dtype):
    hidden, inter = shapes(num_tokens, num_experts)
    _, w2, router = expert_weights(num_experts, hidden, inter, dtype, device)
    x = hidden_states(num_tokens, hidden, dtype, device)
    weights, layout, block_m = routed_layout(x, router, top_k, device)
    act = hidden_states(num_tokens * top_k, inter, dtype, device, seed=1)
    shared = hidden_states(num_tokens, hidden, dtype, device, seed=2) if num_tokens % 2 else None
    out = torch.ops.xverse.moe_down_combine(act, w2, *layout, weights, shared, block_m)
    ref = moe.moe_down_combine_torch(act, w2, *layout, weights, shared, block_m)
    assert out.shape == ref.shape and out.dtype == dtype and out.device == x.device
    assert_close(out, ref, dtype, f"down_combine T={num_tokens} E={num_experts} k={top_k} H={hidden} I={inter} "
                 f"block_m={block_m} shared={shared is not None} {dtype} {device}")


@pytest.mark.parametrize("device", DEVICES)
def test_down_combine_is_deterministic(device):
    num_tokens, num_experts, top_k, dtype = 33, 64, 6, torch.bfloat16
    hidden, inter = shapes(num_tokens, num_experts)
    _, w2, router = expert_weights(num_experts, hidden, inter, dtype, device)
    x = hidden_states(num_tokens, hidden, dtype, device)
    weights, layout, block_m = routed_layout(x, router, top_k, device)
    act = hidden_states(num_tokens * top_k, inter, dtype, device, seed=3)
    first = torch.ops.xverse.moe_down_combine(act, w2, *layout, weights, None, block_m)
    for _ in range(3):
        assert torch.equal(first, torch.ops.xverse.moe_down_combine(act, w2, *layout, weights, None, block_m))


# ---- opcheck -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    num_tokens, num_experts, top_k, hidden, inter = 5, 8, 2, 32, 24
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(num_tokens, hidden, generator=gen) * 0.1).to(torch.bfloat16).to(device)
    router = (torch.randn(num_experts, hidden, generator=gen) * 0.1).to(device)
    w13 = (torch.randn(num_experts, 2 * inter, hidden, generator=gen) * 0.1).to(torch.bfloat16).to(device)
    w2 = (torch.randn(num_experts, hidden, inter, generator=gen) * 0.1).to(torch.bfloat16).to(device)
    weights, ids = torch.ops.xverse.gating_topk(x, router, top_k)
    block_m = 16
    layout = torch.ops.xverse.moe_align(ids, num_experts, block_m)
    act = torch.ops.xverse.moe_gate_up(x, w13, *layout, top_k, block_m)
    cases = [
        (torch.ops.xverse.gating_topk.default, (x, router, top_k)),
        (torch.ops.xverse.moe_align.default, (ids, num_experts, block_m)),
        (torch.ops.xverse.moe_gate_up.default, (x, w13, *layout, top_k, block_m)),
        (torch.ops.xverse.moe_down_combine.default, (act, w2, *layout, weights, x, block_m)),
        (torch.ops.xverse.moe_down_combine.default, (act, w2, *layout, weights, None, block_m)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


# ---- the whole block against an independent float64 reference -------------------------------------------

def reference_moe_float64(x, router, w13, w2, top_k, shared_out):
    """MODEL.md's MoE block, per expert, in float64: softmax over fp32-style logits, top-k, renormalise
    (sum + 1e-6), weights cast to the activation dtype, SwiGLU per expert, weighted sum, + shared."""
    x64 = x.double().cpu()
    probs = torch.softmax(x64 @ router.double().cpu().t(), dim=-1)
    top_vals, top_ids = probs.topk(top_k, dim=-1)
    top_w = top_vals / (top_vals.sum(dim=-1, keepdim=True) + 1e-6)
    top_w = top_w.to(x.dtype).double()          # the model casts the routing weights to the activation dtype
    inter = w13.shape[1] // 2
    out = torch.zeros(x.shape[0], w2.shape[1], dtype=torch.float64)
    for e in range(router.shape[0]):
        token, slot = (top_ids == e).nonzero(as_tuple=True)
        if token.numel() == 0:
            continue
        w_gate, w_up = w13[e, :inter].double().cpu(), w13[e, inter:].double().cpu()
        h = F.silu(x64[token] @ w_gate.t()) * (x64[token] @ w_up.t())
        out.index_add_(0, token, (h @ w2[e].double().cpu().t()) * top_w[token, slot].unsqueeze(1))
    if shared_out is not None:
        out += shared_out.double().cpu()
    return out


FUSED_KERNELS = [
    pytest.param("torch", "cpu", id="torch"),
    pytest.param("cpu", "cpu", id="cpu"),
    pytest.param("cuda", "cuda", id="cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA device")]),
]


@pytest.mark.parametrize("kernels,device", FUSED_KERNELS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens,num_experts,top_k,hidden,inter", [
    (1, 8, 2, 64, 48), (7, 8, 6, 72, 40), (83, 64, 6, 80, 56), (256, 64, 6, 136, 72), (1000, 8, 1, 33, 17)])
def test_fused_moe_matches_float64_reference(kernels, device, dtype, num_tokens, num_experts, top_k, hidden,
                                             inter):
    gen = torch.Generator().manual_seed(num_tokens + hidden)
    x = (torch.randn(num_tokens, hidden, generator=gen) * 0.1).to(dtype)
    router = torch.randn(num_experts, hidden, generator=gen)
    w13 = (torch.randn(num_experts, 2 * inter, hidden, generator=gen) * 0.1).to(dtype)
    w2 = (torch.randn(num_experts, hidden, inter, generator=gen) * 0.1).to(dtype)
    shared = (torch.randn(num_tokens, hidden, generator=gen) * 0.1).to(dtype)
    ref = reference_moe_float64(x, router, w13, w2, top_k, shared)
    out = moe.fused_moe(x.to(device), router.to(device), w13.to(device), w2.to(device), top_k,
                        shared_out=shared.to(device), kernels=kernels)
    assert out.shape == (num_tokens, hidden) and out.dtype == dtype
    # bf16: the activation is rounded to bf16 between the GEMMs, as the model does; ~1 % of the output.
    rtol, atol = (1e-4, 1e-5) if dtype == torch.float32 else (1.6e-2, 2e-2 * max(1.0, math.sqrt(inter) * 0.1))
    err = (out.double().cpu() - ref).abs()
    bad = err > atol + rtol * ref.abs()
    assert not bad.any(), (f"fused_moe[{kernels}] T={num_tokens} E={num_experts} k={top_k} H={hidden} I={inter} "
                           f"{dtype}: max abs err {err.max().item():.3e}; {where(bad)}")
