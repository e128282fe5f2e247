"""Every CUDA kernel of csrc/, run on the CPU by the SIMT emulator (torch.ops.xverse_emu.*), against its
pure-PyTorch twin. The emulated op goes through the op's real CUDA launcher (checks, grid and shared-memory
arithmetic, split-K partition counts), and its kernels run with real barriers, warp shuffles, mma.sync and
cp.async emulated from the PTX ISA.

The case grid is the CPU op tests' (test_moe_ops.py, test_attention_ops.py, test_sampling_ops.py, whose helpers
this reuses) cut down to emulation-friendly sizes: a 128-thread block costs about 128 thread wake-ups per barrier.
"""
import itertools

import pytest
import torch

import test_attention_ops as attention_cases
import test_moe_ops as moe_cases
import test_sampling_ops as sampling_cases
from xverse_engine.ops import attention as attn
from xverse_engine.ops import emulated
from xverse_engine.ops import moe
from xverse_engine.ops import sampling

pytestmark = pytest.mark.emu


def test_every_cuda_op_is_emulated(emu):
    assert emulated.ops_without_emulation() == [], (
        "add the op's *_cuda launcher to csrc/emu/emu_bindings.cpp and emulated tests here")


# ---- MoE -----------------------------------------------------------------------------------------------

GATING = [  # (T, E, k, H, dtype): H % 4 == 0 takes the vectorised loads; odd H the scalar loop
    (1, 8, 1, 64, torch.float32), (7, 64, 6, 67, torch.bfloat16), (9, 8, 2, 64, torch.bfloat16),
    (5, 64, 6, 64, torch.float32),
]


@pytest.mark.parametrize("num_tokens,num_experts,top_k,hidden,dtype", GATING)
def test_gating_topk(emu, num_tokens, num_experts, top_k, hidden, dtype):
    gen = torch.Generator().manual_seed(num_tokens * 31 + num_experts)
    router = torch.randn(num_experts, hidden, generator=gen) * 0.1
    x = moe_cases.hidden_states(num_tokens, hidden, dtype, "cpu")
    weights, ids = emu.gating_topk(x, router, top_k)
    ref_weights, ref_ids = moe.gating_topk_torch(x, router, top_k)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int32
    moe_cases.assert_same_routing(weights, ids.long(), ref_weights, ref_ids.long(),
                                  moe_cases.reference_probs(x, router), f"emulated gating T={num_tokens} "
                                  f"E={num_experts} k={top_k} H={hidden} {dtype}")


def test_gating_ties_nan_and_graph_padding(emu):
    """Ties go to the lower index; an all-NaN row (CUDA-graph padding) and all-equal logits give ids 0..k-1."""
    top_k, hidden, num_experts = 6, 40, 8
    router = torch.randn(num_experts, hidden) * 0.1
    router[5] = router[2]
    x = torch.randn(4, hidden) * 0.1
    x[0] = 0.0
    x[1] = float("nan")
    x[3] = router[2] * 100.0
    weights, ids = emu.gating_topk(x, router, top_k)
    assert sorted(ids[0].tolist()) == list(range(top_k)) and sorted(ids[1].tolist()) == list(range(top_k))
    assert torch.isnan(weights[1]).all()
    assert 2 in ids[3].tolist()
    _, ref_ids = moe.gating_topk_torch(x, router, top_k)
    for row in range(4):
        assert set(ids[row].tolist()) == set(ref_ids[row].tolist()), f"row {row}"


@pytest.mark.parametrize("num_tokens,num_experts,top_k,block_m", [(1, 8, 1, 16), (7, 64, 6, 16), (83, 8, 2, 64)])
def test_moe_align(emu, num_tokens, num_experts, top_k, block_m):
    for skew in (False, True):
        ids = moe_cases.random_topk_ids(num_tokens, num_experts, top_k, "cpu", skew)
        got = emu.moe_align(ids, num_experts, block_m)
        ref = moe.moe_align_torch(ids, num_experts, block_m)
        moe_cases.assert_same_layout(got, ref, ids.numel(), block_m, f"emulated align T={num_tokens} "
                                     f"E={num_experts} k={top_k} block_m={block_m} skew={skew}")


def expert_layout(num_tokens, num_experts, top_k, hidden, dtype, block_m):
    """x [T, H], router weights [T, k] and the aligned layout for a given block_m (all three GEMM tiles)."""
    gen = torch.Generator().manual_seed(num_tokens * 7 + hidden)
    router = torch.randn(num_experts, hidden, generator=gen) * 0.1
    x = moe_cases.hidden_states(num_tokens, hidden, dtype, "cpu")
    weights, ids = moe.gating_topk_torch(x, router, top_k)
    return x, weights, moe.moe_align_torch(ids, num_experts, block_m)


def expert_weights(num_experts, hidden, inter, dtype):
    gen = torch.Generator().manual_seed(num_experts * 7919 + hidden + inter)
    w13 = (torch.randn(num_experts, 2 * inter, hidden, generator=gen) * 0.1).to(dtype)
    w2 = (torch.randn(num_experts, hidden, inter, generator=gen) * 0.1).to(dtype)
    return w13, w2


# (T, E, k, H, I, block_m, dtype). bf16 with H, I multiples of 8: the mma.sync / cp.async kernel with each of
# its three tiles (block_m 16 / 32 / 64) and ragged tails; odd sizes or fp32: the SIMT kernel.
GEMM = [
    (7, 8, 2, 136, 72, 16, torch.bfloat16), (5, 4, 3, 80, 48, 32, torch.bfloat16),
    (19, 4, 2, 40, 24, 64, torch.bfloat16), (3, 8, 6, 67, 45, 16, torch.bfloat16),
    (7, 8, 2, 67, 45, 16, torch.float32), (4, 4, 2, 136, 72, 32, torch.float32),
    (5, 8, 2, 48, 40, 16, torch.float16),  # the mma.sync f16 variant
    (2, 64, 6, 64, 24, 16, torch.bfloat16),  # decode-like: 12 pairs over 64 experts, most blocks unused
]
# (rtol, atol) on inputs scaled by 0.1: the CPU op tests' table, fp16 as bf16
TOL = {**moe_cases.TOL, torch.float16: moe_cases.TOL[torch.bfloat16]}


def assert_moe_close(actual, expected, dtype, what):
    rtol, atol = TOL[dtype]
    err = (actual.float() - expected.float()).abs()
    bad = err > atol + rtol * expected.float().abs()
    assert not bad.any(), f"{what}: max abs err {err.max().item():.3e}; {moe_cases.where(bad)}"


@pytest.mark.parametrize("num_tokens,num_experts,top_k,hidden,inter,block_m,dtype", GEMM)
def test_moe_gate_up(emu, num_tokens, num_experts, top_k, hidden, inter, block_m, dtype):
    w13, _ = expert_weights(num_experts, hidden, inter, dtype)
    x, _, layout = expert_layout(num_tokens, num_experts, top_k, hidden, dtype, block_m)
    act = emu.moe_gate_up(x, w13, *layout, top_k, block_m)
    ref = moe.moe_gate_up_torch(x, w13, *layout, top_k, block_m)
    assert act.shape == ref.shape and act.dtype == dtype
    assert_moe_close(act, ref, dtype, f"emulated gate_up T={num_tokens} E={num_experts} k={top_k} "
                           f"H={hidden} I={inter} block_m={block_m} {dtype}")


@pytest.mark.parametrize("num_tokens,num_experts,top_k,hidden,inter,block_m,dtype", GEMM)
def test_moe_down_combine(emu, num_tokens, num_experts, top_k, hidden, inter, block_m, dtype):
    _, w2 = expert_weights(num_experts, hidden, inter, dtype)
    x, weights, layout = expert_layout(num_tokens, num_experts, top_k, hidden, dtype, block_m)
    act = moe_cases.hidden_states(num_tokens * top_k, inter, dtype, "cpu", seed=1)
    shared = moe_cases.hidden_states(num_tokens, hidden, dtype, "cpu", seed=2) if num_tokens % 2 else None
    out = emu.moe_down_combine(act, w2, *layout, weights, shared, block_m)
    ref = moe.moe_down_combine_torch(act, w2, *layout, weights, shared, block_m)
    assert out.shape == ref.shape and out.dtype == dtype
    assert_moe_close(out, ref, dtype, f"emulated down_combine T={num_tokens} E={num_experts} k={top_k} "
                           f"H={hidden} I={inter} block_m={block_m} shared={shared is not None} {dtype}")


# ---- paged attention -------------------------------------------------------------------------------------

@pytest.mark.parametrize("block_size,head_dim,dtype", [(16, 80, torch.bfloat16), (8, 80, torch.float32),
                                                       (16, 128, torch.float32)])
def test_reshape_and_cache(emu, block_size, head_dim, dtype):
    num_kv, num_tokens, num_blocks = 2, 11, 4
    gen = torch.Generator().manual_seed(block_size + head_dim)
    qkv = torch.randn(num_tokens, 3, num_kv, head_dim, generator=gen).to(dtype)
    key, value = qkv[:, 1], qkv[:, 2]  # strided views, as the model produces them
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[::4] = -1  # CUDA-graph padding rows
    key_cache = torch.randn(num_blocks, num_kv, block_size, head_dim, generator=gen).to(dtype)
    value_cache = torch.randn(num_blocks, num_kv, block_size, head_dim, generator=gen).to(dtype)
    expected_k, expected_v = key_cache.clone(), value_cache.clone()
    attn.reshape_and_cache_torch(key, value, expected_k, expected_v, slots)
    emu.reshape_and_cache(key, value, key_cache, value_cache, slots)
    assert torch.equal(key_cache, expected_k) and torch.equal(value_cache, expected_v)
    # the element-wise (non-16-byte) path: a head_dim whose rows are not whole 16-byte units
    odd_k, odd_v = key[..., :6].contiguous(), value[..., :6].contiguous()
    caches = [torch.zeros(num_blocks, num_kv, block_size, 6, dtype=dtype) for _ in range(4)]
    attn.reshape_and_cache_torch(odd_k, odd_v, caches[0], caches[1], slots)
    emu.reshape_and_cache(odd_k, odd_v, caches[2], caches[3], slots)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])


def decode(emu, contexts, block_size, head_dim, heads, dtype, seed=0):
    num_heads, num_kv = heads
    key_cache, value_cache, tables, lens, gen = attention_cases.paged_batch(contexts, num_heads, num_kv, head_dim,
                                                                            block_size, dtype, "cpu", seed=seed)
    query = torch.randn(len(contexts), num_heads, head_dim, generator=gen).to(dtype)
    scale = head_dim ** -0.5
    expected = attn.paged_attention_decode_torch(query, key_cache, value_cache, tables, lens, scale)
    actual = emu.paged_attention_decode(query, key_cache, value_cache, tables, lens, scale)
    assert actual.shape == query.shape and actual.dtype == dtype
    attention_cases.assert_close(actual, expected, dtype, f"emulated decode contexts={contexts} bs={block_size} "
                                                          f"D={head_dim} heads={heads} {dtype}")
    return actual


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_decode_split_k(emu, dtype):
    """Capacity > 1024 tokens: three partitions per sequence (split-K) and the reduce kernel, with sequences
    that fill one, two or three of them; context 0 rows (CUDA-graph padding) give zeros; head_dim 80, GQA."""
    out = decode(emu, [0, 1, 17, 600, 1100], 16, 80, (4, 2), dtype)
    assert (out[0] == 0).all()


def test_decode_strided_query(emu):
    """query as a view of a fused qkv projection (token stride 3 * Hq * D)."""
    key_cache, value_cache, tables, lens, gen = attention_cases.paged_batch([5, 40], 2, 2, 80, 16, torch.float32,
                                                                            "cpu")
    query = torch.randn(2, 3, 2, 80, generator=gen)[:, 0]
    expected = attn.paged_attention_decode_torch(query.contiguous(), key_cache, value_cache, tables, lens, 0.1)
    actual = emu.paged_attention_decode(query, key_cache, value_cache, tables, lens, 0.1)
    attention_cases.assert_close(actual, expected, torch.float32, "emulated decode strided query")


@pytest.mark.parametrize("block_size,head_dim,heads,dtype", [(16, 80, (2, 2), torch.bfloat16),
                                                             (8, 128, (4, 1), torch.float32),
                                                             (32, 64, (2, 1), torch.bfloat16)])
def test_decode_single_pass(emu, block_size, head_dim, heads, dtype):
    decode(emu, [5, 16, 33, 0], block_size, head_dim, heads, dtype)


@pytest.mark.parametrize("block_size,head_dim,heads,dtype", [(16, 80, (2, 1), torch.bfloat16),
                                                             (8, 80, (2, 2), torch.float32)])
def test_prefill(emu, block_size, head_dim, heads, dtype):
    """Cached prefixes (chunked prefill), whole prompts, an empty sequence (padding), a 21-token chunk that
    spans two 16-row tiles."""
    seqs = [(1, 1), (15, 3), (17, 17), (0, 0), (40, 21)]
    num_heads, num_kv = heads
    contexts = [c for c, _ in seqs]
    key_cache, value_cache, tables, lens, gen = attention_cases.paged_batch(contexts, num_heads, num_kv, head_dim,
                                                                            block_size, dtype, "cpu")
    q_lens = [q for _, q in seqs]
    query_start_loc = torch.tensor([0] + list(itertools.accumulate(q_lens)), dtype=torch.int32)
    query = torch.randn(sum(q_lens), num_heads, head_dim, generator=gen).to(dtype)
    scale = head_dim ** -0.5
    expected = attn.paged_attention_prefill_torch(query, key_cache, value_cache, tables, query_start_loc, lens,
                                                  scale)
    actual = emu.paged_attention_prefill(query, key_cache, value_cache, tables, query_start_loc, lens, scale)
    assert actual.shape == query.shape and actual.dtype == dtype
    attention_cases.assert_close(actual, expected, dtype, f"emulated prefill seqs={seqs} bs={block_size} "
                                                          f"D={head_dim} heads={heads} {dtype}")


def test_launcher_checks_run_too(emu):
    """The emulated op is the CUDA launcher: its argument checks reject bad input the same way."""
    key_cache, value_cache, tables, lens, _ = attention_cases.paged_batch([5, 9], 4, 4, 80, 16, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="block_tables must be int32"):
        emu.paged_attention_decode(torch.randn(2, 4, 80), key_cache, value_cache, tables.long(), lens, 0.1)
    with pytest.raises(RuntimeError, match="head_dim must be one of 64, 80, 96, 128"):
        emu.paged_attention_decode(torch.randn(2, 4, 40), key_cache[..., :40].contiguous(),
                                   value_cache[..., :40].contiguous(), tables, lens, 0.1)


# ---- sampling ------------------------------------------------------------------------------------------------
# draw_top_k_top_p: one warp per row; widths that cover one lane, part of a warp, several warp-sized chunks with a
# tail (the scan's carry) and the kernel's 1024 limit.

@pytest.mark.parametrize("rows,width", [(3, 1), (10, 7), (20, 32), (12, 45), (10, 100), (2, 1024)])
def test_draw_top_k_top_p(emu, rows, width):
    for seed in range(2):
        args = sampling_cases.draw_inputs(rows, width, seed=seed)
        expected = sampling.draw_top_k_top_p_torch(*args)
        assert torch.equal(emu.draw_top_k_top_p(*args), expected), f"emulated draw B={rows} K={width} seed={seed}"


def test_draw_top_k_top_p_hand_made_rules(emu):
    """The exact top-p boundary (equal values: the rank whose mass before equals top_p is removed), and rank 0
    when every value is -inf or top_p = 0."""
    rows = 64
    boundary = (torch.zeros(rows, 4), torch.tensor([[10, 11, 12, 13]]).repeat(rows, 1),
                torch.zeros(rows, dtype=torch.int64), torch.full((rows,), 0.5), torch.arange(rows) * 7919)
    assert set(emu.draw_top_k_top_p(*boundary).tolist()) == {10, 11}
    values = torch.tensor([[float("-inf")] * 5, [3.0, 2.0, 1.0, 0.0, -1.0]])
    token_ids = torch.tensor([[40, 41, 42, 43, 44], [50, 51, 52, 53, 54]])
    nothing_kept = (values, token_ids, torch.tensor([0, 0]), torch.tensor([1.0, 0.0]), torch.tensor([123, 456]))
    assert emu.draw_top_k_top_p(*nothing_kept).tolist() == [40, 50]


def test_draw_top_k_top_p_launcher_checks(emu):
    args = sampling_cases.draw_inputs(2, sampling.MAX_CUDA_CANDIDATES + 1)
    with pytest.raises(RuntimeError, match="at most 1024 candidates per row, got K = 1025"):
        emu.draw_top_k_top_p(*args)
    values, token_ids, top_ks, top_ps, keys = sampling_cases.draw_inputs(2, 8)
    with pytest.raises(RuntimeError, match="top_ps must be float32"):
        emu.draw_top_k_top_p(values, token_ids, top_ks, top_ps.double(), keys)
    assert emu.draw_top_k_top_p(*sampling_cases.draw_inputs(0, 8)).shape == (0,)
