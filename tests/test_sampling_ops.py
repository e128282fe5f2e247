"""The sampler's fused draw (torch.ops.xverse.draw_top_k_top_p) against its pure-PyTorch twin
(xverse_engine/ops/sampling.py), on the CPU (C++ kernel) and, marked gpu, on CUDA; the twin against the
full-vocabulary rule; the front's fallback; bad input; torch.library.opcheck.

A draw: top-k by rank (0 = off), then top-p over the survivors' softmax (1 = off), then the argmax of value +
Gumbel noise of (row key, token id) among the kept ranks, ties to the lowest rank."""
import pytest
import torch

from conftest import DEVICES, require_extension
from xverse_engine.layers.sampler import filter_top_k_top_p, gumbel_noise
from xverse_engine.ops import sampling

require_extension()

# (B, K): one candidate, odd widths, a warp's worth and its tails, the CUDA kernel's limit
SHAPES = [(1, 1), (6, 1), (7, 2), (64, 30), (33, 50), (9, 31), (9, 33), (5, 257), (3, 1024)]


def draw_inputs(rows, width, device="cpu", seed=0, vocab=None):
    """(values, token_ids, top_ks, top_ps, keys) as the sampler makes them: the `width` best of random scaled
    logits, best first. Rows cycle through every kind: both filters, top-k only (also top_k = 1 and > K),
    top-p only (also tiny: only the best survives), both off, -inf tails, equal values, every value -inf."""
    gen = torch.Generator().manual_seed(seed)
    vocab = vocab or max(2 * width, 64)
    logits = torch.randn(rows, vocab, generator=gen) * 2.5
    values, token_ids = logits.topk(width, dim=-1)
    top_ks = torch.randint(1, width + 1, (rows,), generator=gen)
    top_ps = torch.rand(rows, generator=gen) * 0.9 + 0.05
    for row in range(rows):
        kind = row % 10
        if kind == 1:
            top_ps[row] = 1.0                        # top-k only
        elif kind == 2:
            top_ks[row] = 0                          # top-p only
        elif kind == 3:
            top_ks[row], top_ps[row] = 0, 1.0        # both off
        elif kind == 4:
            top_ks[row] = width + 5                  # top_k beyond K: all kept by top-k
        elif kind == 5:
            top_ps[row] = 1e-6                       # only the best token survives top-p
        elif kind == 6:
            values[row, width // 2:] = float("-inf")  # a -inf tail (masked logits)
        elif kind == 7:
            values[row] = 0.5                        # every value equal
        elif kind == 8:
            top_ks[row] = 1
        elif kind == 9 and row % 20 == 9:
            values[row] = float("-inf")              # every value -inf: rank 0
    keys = torch.randint(0, 2**32, (rows,), generator=gen, dtype=torch.int64)
    return tuple(t.to(device) for t in (values, token_ids, top_ks, top_ps, keys))


# ---- the op against its twin --------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rows,width", SHAPES)
def test_draw_matches_twin(device, rows, width):
    for seed in range(3):
        args = draw_inputs(rows, width, device, seed=seed)
        expected = sampling.draw_top_k_top_p_torch(*args)
        drawn = sampling.draw_top_k_top_p(*args, kernels=device)
        assert drawn.dtype == torch.int64 and drawn.shape == (rows,)
        assert torch.equal(drawn.cpu(), expected.cpu()), f"B={rows} K={width} seed={seed} {device}"


def test_cpu_op_takes_any_width():
    """The C++ CPU kernel has no limit on K (top-p without top-k passes K = V)."""
    args = draw_inputs(20, 3000, seed=4)
    assert torch.equal(torch.ops.xverse.draw_top_k_top_p(*args), sampling.draw_top_k_top_p_torch(*args))


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(device):
    args = draw_inputs(0, 8, device)
    assert sampling.draw_top_k_top_p(*args, kernels=device).shape == (0,)


# ---- the rules, on hand-made rows ---------------------------------------------------------------------------

@pytest.mark.parametrize("kernels", ["torch", "cpu"])
def test_top_p_removes_a_rank_whose_mass_before_reaches_it(kernels):
    """Four equal values: probabilities 1/4 each (exact), mass before ranks 0..3 = 0, .25, .5, .75. top_p = 0.5
    keeps ranks 0 and 1 (the mass before rank 2 equals top_p: removed); every key draws one of them, and both
    are drawn."""
    rows = 200
    values = torch.zeros(rows, 4)
    token_ids = torch.tensor([[10, 11, 12, 13]]).repeat(rows, 1)
    keys = torch.arange(rows, dtype=torch.int64) * 7919
    args = (values, token_ids, torch.zeros(rows, dtype=torch.int64), torch.full((rows,), 0.5), keys)
    drawn = sampling.draw_top_k_top_p(*args, kernels=kernels)
    assert set(drawn.tolist()) == {10, 11}
    assert torch.equal(drawn, sampling.draw_top_k_top_p_torch(*args))


@pytest.mark.parametrize("kernels", ["torch", "cpu"])
def test_only_the_best_survives_top_k_1_or_a_tiny_top_p(kernels):
    values, token_ids, _, _, keys = draw_inputs(16, 20, seed=5)
    off_k, off_p = torch.zeros(16, dtype=torch.int64), torch.ones(16)
    assert torch.equal(sampling.draw_top_k_top_p(values, token_ids, off_k + 1, off_p, keys, kernels=kernels),
                       token_ids[:, 0])
    assert torch.equal(sampling.draw_top_k_top_p(values, token_ids, off_k, off_p * 1e-6, keys, kernels=kernels),
                       token_ids[:, 0])


@pytest.mark.parametrize("kernels", ["torch", "cpu"])
def test_ties_and_nothing_kept_give_rank_0(kernels):
    """Every value -inf (all noisy values tie at -inf), or top_p = 0 (every rank removed): rank 0's token."""
    values = torch.tensor([[float("-inf")] * 5, [3.0, 2.0, 1.0, 0.0, -1.0]])
    token_ids = torch.tensor([[40, 41, 42, 43, 44], [50, 51, 52, 53, 54]])
    args = (values, token_ids, torch.tensor([0, 0]), torch.tensor([1.0, 0.0]), torch.tensor([123, 456]))
    assert sampling.draw_top_k_top_p(*args, kernels=kernels).tolist() == [40, 50]


def test_twin_equals_the_full_vocabulary_rule():
    """The twin over K = V candidates draws what the sampler's full-vocabulary reference draws: argmax over every
    token of (logits with top-k / top-p filtered to -inf) + the token's noise. (Top-p without top-k needs K = V.)"""
    _, _, top_ks, top_ps, keys = draw_inputs(40, 300, vocab=300, seed=6)
    logits = torch.randn(40, 300, generator=torch.Generator().manual_seed(6)) * 2.5
    values, token_ids = logits.topk(300, dim=-1)
    filtered = filter_top_k_top_p(logits, top_ks, top_ps, any_top_k=True, any_top_p=True)
    whole = (filtered + gumbel_noise(None, None, 300, keys)).argmax(dim=-1)
    assert torch.equal(sampling.draw_top_k_top_p_torch(values, token_ids, top_ks, top_ps, keys), whole)
    assert torch.equal(torch.ops.xverse.draw_top_k_top_p(values, token_ids, top_ks, top_ps, keys), whole)


def test_rows_at_top_p_1_are_unfiltered_whatever_the_batch():
    """top_p = 1 is off row by row: the same draw as with top-p skipped for the whole batch, even where the
    fp32 cumulative mass reaches 1 before the last rank (a best token holding nearly all the mass)."""
    values = torch.tensor([[30.0, 10.0, 9.0, 8.0, 7.5, 7.0]])
    token_ids = torch.arange(6)[None, :]
    keys = torch.arange(300, dtype=torch.int64)
    values, token_ids = values.repeat(300, 1), token_ids.repeat(300, 1)
    top_ks, top_ps = torch.zeros(300, dtype=torch.int64), torch.ones(300)
    unfiltered = sampling.removed_ranks(values, top_ks, top_ps, any_top_k=False, any_top_p=False)
    assert not sampling.removed_ranks(values, top_ks, top_ps).any() and not unfiltered.any()
    assert torch.equal(torch.ops.xverse.draw_top_k_top_p(values, token_ids, top_ks, top_ps, keys),
                       sampling.draw_top_k_top_p_torch(values, token_ids, top_ks, top_ps, keys))


# ---- the front ------------------------------------------------------------------------------------------------

def test_front_runs_the_twin_beyond_the_cuda_limit():
    """kernels="cuda" with K > 1024 candidates: the twin (here on CPU tensors, so no CUDA call can happen)."""
    args = draw_inputs(4, sampling.MAX_CUDA_CANDIDATES + 1, seed=7)
    assert torch.equal(sampling.draw_top_k_top_p(*args, kernels="cuda"), sampling.draw_top_k_top_p_torch(*args))


# ---- bad input ------------------------------------------------------------------------------------------------

def test_rejects_bad_input():
    values, token_ids, top_ks, top_ps, keys = draw_inputs(4, 8)
    op = torch.ops.xverse.draw_top_k_top_p
    with pytest.raises(RuntimeError, match=r"values must be \[B, K\]"):
        op(values[0], token_ids, top_ks, top_ps, keys)
    with pytest.raises(RuntimeError, match="at least one candidate"):
        op(values[:, :0], token_ids[:, :0], top_ks, top_ps, keys)
    with pytest.raises(RuntimeError, match="values must be float32"):
        op(values.double(), token_ids, top_ks, top_ps, keys)
    with pytest.raises(RuntimeError, match="token_ids shape"):
        op(values, token_ids[:, :4], top_ks, top_ps, keys)
    with pytest.raises(RuntimeError, match="token_ids must be int64"):
        op(values, token_ids.int(), top_ks, top_ps, keys)
    with pytest.raises(RuntimeError, match=r"top_ks must be \[B\] = \[4\]"):
        op(values, token_ids, top_ks[:3], top_ps, keys)
    with pytest.raises(RuntimeError, match="top_ps must be float32"):
        op(values, token_ids, top_ks, top_ps.double(), keys)
    with pytest.raises(RuntimeError, match=r"keys must be int64 \(row_keys\)"):
        op(values, token_ids, top_ks, top_ps, keys.int())
    with pytest.raises(RuntimeError, match="contiguous"):
        op(values.t().contiguous().t(), token_ids, top_ks, top_ps, keys)


# ---- opcheck --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    torch.library.opcheck(torch.ops.xverse.draw_top_k_top_p.default, draw_inputs(12, 40, device, seed=8))
