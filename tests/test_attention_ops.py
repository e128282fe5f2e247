"""The paged KV cache ops (torch.ops.xverse.reshape_and_cache / paged_attention_decode / paged_attention_prefill)
against their pure-PyTorch twins, and the twins against torch's own SDPA on contiguous K/V.

CPU: the C++ kernels (the extension must be built; CI builds it). CUDA: the same tests under
@pytest.mark.gpu, skipped without a GPU, plus CUDA-graph capture of decode.
Every batch uses shuffled (non-contiguous) physical blocks, unused block-table entries that point far outside
the cache, and NaN in every cache slot no sequence owns: a kernel that reads past a context fails loudly.
"""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICES, require_extension
from xverse_engine.ops import attention as attn

require_extension()

# (rtol, atol) of an op's output against its twin, per dtype
TOL = {torch.float32: (1e-4, 2e-5), torch.bfloat16: (1.6e-2, 1e-2)}
BAD_BLOCK = 1 << 30  # unused block-table entries: an out-of-bounds read of them faults instead of passing
CONTEXTS = [1, 15, 16, 17, 511, 4096]
# (block_size, head_dim, (num_heads, num_kv_heads), dtype): CUDA runs every combination the issue names;
# the 2-core CPU runs a covering subset in which every pair of values of two factors appears.
GRID = list(itertools.product([8, 16, 32], [80, 128], [(32, 32), (32, 8)], [torch.bfloat16, torch.float32]))
MHA, GQA, BF16, FP32 = (32, 32), (32, 8), torch.bfloat16, torch.float32
PAIRWISE = [(8, 80, MHA, BF16), (8, 128, GQA, FP32), (16, 80, GQA, FP32), (16, 128, MHA, BF16),
            (32, 80, MHA, FP32), (32, 128, GQA, BF16)]


def grid_id(case):
    bs, d, (hq, hkv), dtype = case
    return f"bs{bs}-d{d}-h{hq}x{hkv}-{str(dtype).split('.')[-1]}"


def device_grid():
    """pytest params (device, case): the pairwise subset on CPU, the whole grid on CUDA."""
    cpu = [pytest.param("cpu", case, id=f"cpu-{grid_id(case)}") for case in PAIRWISE]
    cuda = [pytest.param("cuda", case, id=f"cuda-{grid_id(case)}", marks=DEVICES[1].marks) for case in GRID]
    return cpu + cuda


def paged_batch(context_lens, num_heads, num_kv, head_dim, block_size, dtype, device, seed=0, extra_blocks=1):
    """A cache holding each sequence's context in shuffled blocks.

    Returns (key_cache, value_cache, block_tables, context_lens, query_gen) with caches
    [num_blocks, n_kv, block_size, D], NaN in every slot past a context, block_tables int32 [B, max_blocks].
    """
    gen = torch.Generator().manual_seed(seed)
    needed = [math.ceil(c / block_size) for c in context_lens]
    max_blocks = max(needed + [0]) + extra_blocks
    num_blocks = sum(needed) + 3
    physical = torch.randperm(num_blocks, generator=gen).tolist()
    tables = torch.full((len(context_lens), max_blocks), BAD_BLOCK, dtype=torch.int32)
    shape = (num_blocks, num_kv, block_size, head_dim)
    key_cache = torch.full(shape, float("nan"))
    value_cache = torch.full(shape, float("nan"))
    for b, (ctx, n) in enumerate(zip(context_lens, needed)):
        blocks = [physical.pop() for _ in range(n)]
        tables[b, :n] = torch.tensor(blocks, dtype=torch.int32)
        for i, block in enumerate(blocks):
            used = min(block_size, ctx - i * block_size)
            key_cache[block, :, :used] = torch.randn(num_kv, used, head_dim, generator=gen)
            value_cache[block, :, :used] = torch.randn(num_kv, used, head_dim, generator=gen)
    lens = torch.tensor(context_lens, dtype=torch.int32)
    to = dict(device=device)
    return (key_cache.to(dtype).to(**to), value_cache.to(dtype).to(**to), tables.to(**to), lens.to(**to), gen)


def assert_close(actual, expected, dtype, what):
    rtol, atol = TOL[dtype]
    actual, expected = actual.float().cpu(), expected.float().cpu()
    assert torch.isfinite(actual).all(), f"{what}: non-finite output at {(~torch.isfinite(actual)).nonzero()[:5]}"
    err = (actual - expected).abs()
    where = tuple(int(i) for i in torch.unravel_index(err.argmax(), err.shape)) if err.numel() else ()
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol,
                               msg=lambda m: f"{what}: max abs err {err.max():.3g} at {where}\n{m}")


# ---- reshape_and_cache ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("block_size,head_dim,dtype",
                         list(itertools.product([8, 16, 32], [80, 128], [torch.bfloat16, torch.float32])))
def test_reshape_and_cache(device, block_size, head_dim, dtype):
    num_kv, num_tokens, num_blocks = 4, 37, 9
    gen = torch.Generator().manual_seed(block_size + head_dim)
    # key / value as strided views of one fused qkv projection, as the model produces them
    qkv = torch.randn(num_tokens, 3, num_kv, head_dim, generator=gen).to(dtype).to(device)
    key, value = qkv[:, 1], qkv[:, 2]
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[::5] = -1  # padding tokens
    slots = slots.to(device)
    key_cache = torch.randn(num_blocks, num_kv, block_size, head_dim, generator=gen).to(dtype).to(device)
    value_cache = torch.randn(num_blocks, num_kv, block_size, head_dim, generator=gen).to(dtype).to(device)
    expected_k, expected_v = key_cache.clone(), value_cache.clone()
    before_k = key_cache.clone()

    attn.reshape_and_cache_torch(key, value, expected_k, expected_v, slots)
    torch.ops.xverse.reshape_and_cache(key, value, key_cache, value_cache, slots)

    assert torch.equal(key_cache, expected_k) and torch.equal(value_cache, expected_v)
    # exactly the real slots changed; padding left everything else untouched
    changed = (key_cache != before_k).any(-1).any(1)  # [num_blocks, block_size]: slot = block * bs + offset
    changed_slots = set(torch.nonzero(changed.reshape(-1)).flatten().tolist())
    real = set(s for s in slots.tolist() if s >= 0)
    assert changed_slots == real
    written = slots[slots >= 0]
    blocks, offsets = written // block_size, written % block_size
    assert torch.equal(key_cache[blocks, :, offsets], key[slots >= 0])


@pytest.mark.parametrize("device", DEVICES)
def test_reshape_and_cache_writes_slot_zero(device):
    """Slot 0 is the first slot of block 0, a real slot: only negative slots are padding."""
    gen = torch.Generator().manual_seed(0)
    key, value = (torch.randn(3, 2, 8, generator=gen).to(device) for _ in range(2))
    key_cache, value_cache = (torch.zeros(2, 2, 4, 8, device=device) for _ in range(2))
    slots = torch.tensor([0, -1, 5], device=device)
    torch.ops.xverse.reshape_and_cache(key, value, key_cache, value_cache, slots)
    assert torch.equal(key_cache[0, :, 0], key[0]) and torch.equal(value_cache[0, :, 0], value[0])
    assert torch.equal(key_cache[1, :, 1], key[2]) and torch.equal(value_cache[1, :, 1], value[2])


def test_reshape_and_cache_rejects_bad_args():
    key = torch.randn(3, 2, 80)
    cache = torch.zeros(4, 2, 16, 80)
    with pytest.raises(RuntimeError, match="slot_mapping must be Long"):
        torch.ops.xverse.reshape_and_cache(key, key, cache, cache.clone(), torch.zeros(3, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="past the cache"):
        torch.ops.xverse.reshape_and_cache(key, key, cache, cache.clone(), torch.tensor([0, 1, 64]))
    with pytest.raises(RuntimeError, match="key shape"):
        torch.ops.xverse.reshape_and_cache(key[:, :, :64], key[:, :, :64], cache, cache.clone(),
                                           torch.tensor([0, 1, 2]))


# ---- decode ----------------------------------------------------------------------------------------------------

def decode_case(device, block_size, head_dim, heads, dtype, contexts, seed=0):
    num_heads, num_kv = heads
    key_cache, value_cache, tables, lens, gen = paged_batch(contexts, num_heads, num_kv, head_dim, block_size,
                                                            dtype, device, seed=seed)
    query = torch.randn(len(contexts), num_heads, head_dim, generator=gen).to(dtype).to(device)
    scale = head_dim ** -0.5
    expected = attn.paged_attention_decode_torch(query, key_cache, value_cache, tables, lens, scale)
    actual = torch.ops.xverse.paged_attention_decode(query, key_cache, value_cache, tables, lens, scale)
    assert actual.shape == query.shape and actual.dtype == dtype and actual.is_contiguous()
    assert_close(actual, expected, dtype, f"decode contexts={contexts} bs={block_size} D={head_dim} "
                                          f"heads={heads} {dtype} seed={seed}")
    return actual


@pytest.mark.parametrize("device,case", device_grid())
def test_decode_mixed_contexts(device, case):
    """Contexts 1..4096 in one batch: on CUDA the 4096 one spans 9 partitions (split-K + reduce)."""
    decode_case(device, *case, contexts=CONTEXTS)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_decode_short_and_empty(device, dtype):
    """Capacity <= one partition (the CUDA single-pass path), and context_len 0 giving zeros."""
    out = decode_case(device, 16, 80, (32, 32), dtype, contexts=[0, 1, 15, 16, 17, 300, 0])
    assert (out[0] == 0).all() and (out[-1] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_decode_with_scores_in_the_hundreds(device):
    """exp() of a score above ~88 overflows fp32: the softmax must subtract the row's max first."""
    key_cache, value_cache, tables, lens, gen = paged_batch([37, 300], 8, 2, 64, 16, torch.float32, device)
    query = (torch.randn(2, 8, 64, generator=gen) * 100).to(device)
    scale = 64 ** -0.5
    scores = torch.einsum("hd,hkd->hk", query[0].cpu(), key_cache[tables[0, 0].item()].cpu().repeat_interleave(4, dim=0))
    assert (scores * scale).abs().max() > 200      # the case the test is about
    expected = attn.paged_attention_decode_torch(query, key_cache, value_cache, tables, lens, scale)
    actual = torch.ops.xverse.paged_attention_decode(query, key_cache, value_cache, tables, lens, scale)
    assert_close(actual, expected, torch.float32, "decode with large scores")


@pytest.mark.parametrize("device", DEVICES)
def test_decode_strided_query(device):
    """query as a view of a fused qkv projection (token stride 3 * Hq * D)."""
    key_cache, value_cache, tables, lens, gen = paged_batch([5, 40], 8, 8, 80, 16, torch.float32, device)
    qkv = torch.randn(2, 3, 8, 80, generator=gen).to(device)
    query = qkv[:, 0]
    expected = attn.paged_attention_decode_torch(query.contiguous(), key_cache, value_cache, tables, lens, 0.1)
    actual = torch.ops.xverse.paged_attention_decode(query, key_cache, value_cache, tables, lens, 0.1)
    assert_close(actual, expected, torch.float32, "decode strided query")


def test_decode_rejects_bad_args():
    key_cache, value_cache, tables, lens, _ = paged_batch([5, 9], 4, 4, 80, 16, torch.float32, "cpu")
    query = torch.randn(2, 4, 80)
    with pytest.raises(RuntimeError, match="block_tables must be int32"):
        torch.ops.xverse.paged_attention_decode(query, key_cache, value_cache, tables.long(), lens, 0.1)
    with pytest.raises(RuntimeError, match="context_lens must be Int"):
        torch.ops.xverse.paged_attention_decode(query, key_cache, value_cache, tables, lens.long(), 0.1)
    with pytest.raises(RuntimeError, match="head_dim 64 must equal key_cache head_dim 80"):
        torch.ops.xverse.paged_attention_decode(query[..., :64], key_cache, value_cache, tables, lens, 0.1)
    with pytest.raises(RuntimeError, match="multiple of the cache's num_kv_heads"):
        torch.ops.xverse.paged_attention_decode(torch.randn(2, 6, 80), key_cache, value_cache, tables, lens, 0.1)
    with pytest.raises(RuntimeError, match="query dtype"):
        torch.ops.xverse.paged_attention_decode(query.bfloat16(), key_cache, value_cache, tables, lens, 0.1)


# ---- prefill ---------------------------------------------------------------------------------------------------

# (context_len, new tokens): with a cached prefix (chunked prefill / prefix reuse), and whole prompts
CHUNKED = [(1, 1), (15, 3), (17, 17), (511, 37), (4096, 16), (0, 0), (33, 1)]
WHOLE = [(1, 1), (15, 15), (16, 16), (17, 17), (100, 100)]


def prefill_case(device, block_size, head_dim, heads, dtype, seqs, seed=0):
    num_heads, num_kv = heads
    contexts = [c for c, _ in seqs]
    key_cache, value_cache, tables, lens, gen = paged_batch(contexts, num_heads, num_kv, head_dim, block_size,
                                                            dtype, device, seed=seed)
    q_lens = [q for _, q in seqs]
    query_start_loc = torch.tensor([0] + list(itertools.accumulate(q_lens)), dtype=torch.int32, device=device)
    query = torch.randn(sum(q_lens), num_heads, head_dim, generator=gen).to(dtype).to(device)
    scale = head_dim ** -0.5
    expected = attn.paged_attention_prefill_torch(query, key_cache, value_cache, tables, query_start_loc, lens,
                                                  scale)
    actual = torch.ops.xverse.paged_attention_prefill(query, key_cache, value_cache, tables, query_start_loc, lens,
                                                      scale)
    assert actual.shape == query.shape and actual.dtype == dtype
    assert_close(actual, expected, dtype, f"prefill seqs={seqs} bs={block_size} D={head_dim} heads={heads} {dtype}")


@pytest.mark.parametrize("device,case", device_grid())
@pytest.mark.parametrize("seqs", [CHUNKED, WHOLE], ids=["cached_prefix", "whole_prompts"])
def test_prefill(device, case, seqs):
    prefill_case(device, *case, seqs=seqs)


@pytest.mark.parametrize("device", DEVICES)
def test_write_then_prefill_matches_sdpa(device):
    """End to end, independent of the twins: write a prompt's K/V with reshape_and_cache, then paged prefill
    equals torch's causal SDPA on the contiguous K/V; the decode of one more token equals SDPA too."""
    num_heads, num_kv, head_dim, block_size, prompt = 32, 8, 80, 16, 45
    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(prompt + 1, h, head_dim, generator=gen).to(device)
               for h in (num_heads, num_kv, num_kv))
    num_blocks = 8
    key_cache = torch.zeros(num_blocks, num_kv, block_size, head_dim, device=device)
    value_cache = torch.zeros_like(key_cache)
    table = torch.tensor([[5, 2, 7, 0]], dtype=torch.int32, device=device)  # shuffled blocks
    slots = (table[0].long()[torch.arange(prompt + 1, device=device) // block_size] * block_size
             + torch.arange(prompt + 1, device=device) % block_size)
    torch.ops.xverse.reshape_and_cache(k[:prompt], v[:prompt], key_cache, value_cache, slots[:prompt])
    lens = torch.tensor([prompt], dtype=torch.int32, device=device)
    qsl = torch.tensor([0, prompt], dtype=torch.int32, device=device)
    out = torch.ops.xverse.paged_attention_prefill(q[:prompt], key_cache, value_cache, table, qsl, lens,
                                                   head_dim ** -0.5)
    group = num_heads // num_kv
    kk, vv = k.repeat_interleave(group, 1).transpose(0, 1), v.repeat_interleave(group, 1).transpose(0, 1)
    ref = F.scaled_dot_product_attention(q[:prompt].transpose(0, 1), kk[:, :prompt], vv[:, :prompt],
                                         is_causal=True).transpose(0, 1)
    assert_close(out, ref, torch.float32, "prefill vs SDPA")
    # one decode step: write token `prompt`, attend with it as the last of prompt + 1
    torch.ops.xverse.reshape_and_cache(k[prompt:], v[prompt:], key_cache, value_cache, slots[prompt:])
    dec = torch.ops.xverse.paged_attention_decode(q[prompt:], key_cache, value_cache, table, lens + 1,
                                                  head_dim ** -0.5)
    ref = F.scaled_dot_product_attention(q[prompt:].transpose(0, 1), kk, vv).transpose(0, 1)
    assert_close(dec, ref, torch.float32, "decode vs SDPA")


# ---- opcheck -------------------------------------------------------------------------------------------------

def test_opcheck_schemas():
    key_cache, value_cache, tables, lens, gen = paged_batch([3, 20], 4, 2, 80, 8, torch.float32, "cpu")
    query = torch.randn(2, 4, 80, generator=gen)
    torch.library.opcheck(torch.ops.xverse.paged_attention_decode.default,
                          (query, key_cache, value_cache, tables, lens, 0.125))
    qsl = torch.tensor([0, 2, 5], dtype=torch.int32)
    torch.library.opcheck(torch.ops.xverse.paged_attention_prefill.default,
                          (torch.randn(5, 4, 80, generator=gen), key_cache, value_cache, tables, qsl, lens, 0.125))
    kc, vc = torch.zeros(6, 2, 8, 80), torch.zeros(6, 2, 8, 80)
    torch.library.opcheck(torch.ops.xverse.reshape_and_cache.default,
                          (torch.randn(3, 2, 80), torch.randn(3, 2, 80), kc, vc, torch.tensor([4, -1, 17])))


# ---- CUDA only -------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_decode_cuda_graph_replay():
    """Decode captured once in a CUDA graph replays correctly after context_lens / query change in place."""
    device = "cuda"
    key_cache, value_cache, tables, lens, gen = paged_batch([100, 700, 2000, 1], 32, 32, 80, 16, torch.bfloat16,
                                                            device)
    query = torch.randn(4, 32, 80, generator=gen).to(torch.bfloat16).to(device)
    scale = 80 ** -0.5
    torch.ops.xverse.paged_attention_decode(query, key_cache, value_cache, tables, lens, scale)  # warm up
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = torch.ops.xverse.paged_attention_decode(query, key_cache, value_cache, tables, lens, scale)
    lens.copy_(torch.tensor([99, 513, 1999, 0], dtype=torch.int32))
    query.copy_(torch.randn(4, 32, 80, generator=gen).to(torch.bfloat16))
    graph.replay()
    torch.cuda.synchronize()
    expected = attn.paged_attention_decode_torch(query, key_cache, value_cache, tables, lens, scale)
    assert_close(out, expected, torch.bfloat16, "decode graph replay")
    assert (out[3] == 0).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("heads", [(32, 32), (32, 8)])
def test_decode_cuda_large_batch(heads):
    """The benchmark's regime: 64 sequences of random lengths up to 3000, real head shape."""
    contexts = torch.randint(1, 3000, (64,), generator=torch.Generator().manual_seed(3)).tolist()
    decode_case("cuda", 16, 80, heads, torch.bfloat16, contexts=contexts, seed=3)
