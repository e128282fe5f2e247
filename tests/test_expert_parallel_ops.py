"""Expert parallelism at the op level: the contract that an expert id of -1 means "another rank's expert",
so moe_align places the pair nowhere and the grouped GEMMs never compute it. Checked on the twin and on
the extension's op (CPU; CUDA where a GPU exists), and end to end: the ranks' partial MoE outputs sum to
the whole block's output.
"""
import pytest
import torch

from conftest import DEVICES, require_extension
from test_moe_ops import assert_same_layout, random_topk_ids
from xverse_engine.ops import moe

require_extension()


def test_local_expert_ids_keep_own_experts_and_mark_the_rest():
    ids = torch.tensor([[0, 5, 9], [15, 8, 4]], dtype=torch.int32)
    # 16 experts over 4 ranks: rank 1 holds experts 4..7, rank 2 holds 8..11
    assert moe.local_expert_ids(ids, 4, 4).tolist() == [[-1, 1, -1], [-1, -1, 0]]
    assert moe.local_expert_ids(ids, 8, 4).tolist() == [[-1, -1, 1], [-1, 0, -1]]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_tokens,num_experts,top_k,ranks", [(1, 64, 6, 2), (7, 16, 6, 4), (83, 64, 6, 4),
                                                                 (300, 8, 2, 2)])
def test_align_places_only_this_ranks_pairs(device, num_tokens, num_experts, top_k, ranks):
    global_ids = random_topk_ids(num_tokens, num_experts, top_k, "cpu")
    num_local = num_experts // ranks
    block_m = moe.choose_block_m(global_ids.numel(), num_experts)
    for rank in range(ranks):
        ids = moe.local_expert_ids(global_ids, rank * num_local, num_local)
        ref = moe.moe_align_torch(ids, num_local, block_m)
        got = torch.ops.xverse.moe_align(ids.to(device), num_local, block_m)
        assert_same_layout(got, ref, ids.numel(), block_m, f"rank {rank}/{ranks} T={num_tokens} E={num_experts}")
        # the twin places exactly the pairs of this rank's experts, each under its local expert
        sorted_ids, block_ids, num_padded = ref
        real = sorted_ids[: int(num_padded)] < ids.numel()
        placed = sorted_ids[: int(num_padded)][real].long()
        expert_of_slot = block_ids.long().repeat_interleave(block_m)[: int(num_padded)][real]
        flat = ids.reshape(-1).long()
        assert sorted(placed.tolist()) == (flat >= 0).nonzero().squeeze(1).tolist()
        assert torch.equal(expert_of_slot, flat[placed]), f"rank {rank}: a pair sits under the wrong expert"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", [-2, 8])
def test_align_rejects_other_out_of_range_ids(device, bad):
    ids = torch.tensor([[0, bad]], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="outside"):
        moe.moe_align_torch(ids, 8, 16)
    if device == "cpu":  # the CUDA kernel cannot raise from the device: it drops such ids
        with pytest.raises(RuntimeError, match="outside"):
            torch.ops.xverse.moe_align(ids, 8, 16)


@pytest.mark.parametrize("kernels", ["torch", "cpu"])
@pytest.mark.parametrize("num_experts,ranks", [(64, 2), (16, 4)])
def test_partial_moe_outputs_of_all_ranks_sum_to_the_whole_block(kernels, num_experts, ranks):
    """Each rank runs its experts and its share of the shared expert; the all-reduce's sum is the block."""
    gen = torch.Generator().manual_seed(num_experts + ranks)
    T, H, I, S, k = 37, 48, 24, 32, 6
    x = torch.randn(T, H, generator=gen)
    router = torch.randn(num_experts, H, generator=gen) * 0.3
    w13 = torch.randn(num_experts, 2 * I, H, generator=gen) / H ** 0.5
    w2 = torch.randn(num_experts, H, I, generator=gen) / I ** 0.5
    shared_gate_up = torch.randn(2 * S, H, generator=gen) / H ** 0.5
    shared_down = torch.randn(H, S, generator=gen) / S ** 0.5

    def shared(gate_up, down):
        gate, up = (x @ gate_up.t()).chunk(2, dim=-1)
        return (torch.nn.functional.silu(gate) * up) @ down.t()

    whole = moe.fused_moe(x, router, w13, w2, k, shared_out=shared(shared_gate_up, shared_down), kernels=kernels)
    total = torch.zeros_like(whole)
    E, Sr = num_experts // ranks, S // ranks
    for r in range(ranks):
        cols = slice(r * Sr, (r + 1) * Sr)
        gate_up = torch.cat([shared_gate_up[:S][cols], shared_gate_up[S:][cols]])
        partial_shared = shared(gate_up, shared_down[:, cols])
        total += moe.fused_moe(x, router, w13[r * E:(r + 1) * E], w2[r * E:(r + 1) * E], k,
                               shared_out=partial_shared, kernels=kernels, first_expert=r * E)
    torch.testing.assert_close(total, whole, rtol=1e-5, atol=1e-5)
