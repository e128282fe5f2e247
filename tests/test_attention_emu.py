"""The CUDA attention kernels, run on the CPU by the SIMT emulator (torch.ops.xverse_emu.*), against the
pure-PyTorch twins. Each call goes through the op's real CUDA launcher: the same checks, the same kernel
choice (tensor-core prefill for bf16/fp16, SIMT for fp32), the decode split-K plan of a 132-SM card.

- prefill (csrc/attention/prefill_mma.cu): prompts of 1, 15, 16, 17, 127, 128, 129 and 1000 tokens in one
  varlen batch; cached prefixes ending mid-block (chunked prefill / prefix reuse); block sizes 8 / 16 / 32;
  bf16 and fp16; head_dim 80 and 128; MHA and GQA; graph-padding rows past query_start_loc[B].
- decode (csrc/attention/paged_attention.cu): one partition (no reduce) and many, contexts longer than the
  max_context_len hint, the tile-by-tile online softmax of the cp.async ring; grouped-query layouts (one block
  per KV head's group of 1, 2, 4 or 8 query heads) over head_dim 80 / 128, bf16 / fp16 / fp32, block sizes
  8 / 16 / 32, ragged and empty contexts; and that the K/V bytes the kernel copies are each KV byte once.
- the review fixes: int64 partition arithmetic near INT32_MAX, context_lens clamped in the reduce, B = 0 with
  T > 0 rejected, Hq = 0 returning at once, the block-table contract (debug check, never dereferenced).
"""
import itertools

import pytest
import torch

from test_attention_ops import BAD_BLOCK, paged_batch
from xverse_engine.ops import attention as attn


pytestmark = pytest.mark.emu

# (rtol, atol) against the fp32 twin: bf16 / fp16 inputs, P rounded to 16 bits before P V (as FA2 does)
TOL = {torch.float32: (1e-4, 2e-5), torch.bfloat16: (1.6e-2, 1.2e-2), torch.float16: (4e-3, 2e-3)}
PROMPTS = [1, 15, 16, 17, 127, 128, 129, 1000]


def assert_close(actual, expected, dtype, what):
    rtol, atol = TOL[dtype]
    actual, expected = actual.float(), expected.float()
    assert torch.isfinite(actual).all(), f"{what}: non-finite output at {(~torch.isfinite(actual)).nonzero()[:5]}"
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol,
                               msg=lambda m: f"{what}: max abs err {(actual - expected).abs().max():.3g}\n{m}")


def prefill_inputs(seqs, block_size, head_dim, heads, dtype, pad_rows=0, seed=0):
    """seqs: (cached, new) tokens per sequence. Returns (query, caches, tables, query_start_loc, lens) with
    pad_rows extra query rows past query_start_loc[B] (graph padding)."""
    num_heads, num_kv = heads
    contexts = [cached + new for cached, new in seqs]
    key_cache, value_cache, tables, lens, gen = paged_batch(contexts, num_heads, num_kv, head_dim, block_size,
                                                            dtype, "cpu", seed=seed)
    q_lens = [new for _, new in seqs]
    qsl = torch.tensor([0] + list(itertools.accumulate(q_lens)), dtype=torch.int32)
    query = torch.randn(sum(q_lens) + pad_rows, num_heads, head_dim, generator=gen).to(dtype)
    return query, key_cache, value_cache, tables, qsl, lens


def check_prefill(emu, seqs, block_size, head_dim, heads, dtype, pad_rows=0, seed=0):
    query, key_cache, value_cache, tables, qsl, lens = prefill_inputs(seqs, block_size, head_dim, heads, dtype,
                                                                      pad_rows, seed)
    scale = head_dim ** -0.5
    out = emu.paged_attention_prefill(query, key_cache, value_cache, tables, qsl, lens, scale)
    expected = attn.paged_attention_prefill_torch(query, key_cache, value_cache, tables, qsl, lens, scale)
    assert out.shape == query.shape and out.dtype == dtype
    assert_close(out, expected, dtype, f"prefill seqs={seqs} bs={block_size} D={head_dim} heads={heads} {dtype}")
    if pad_rows:
        assert (out[-pad_rows:] == 0).all(), "graph-padding rows must come out as zeros"
    return out


# ---- tensor-core prefill ---------------------------------------------------------------------------------------

@pytest.mark.slow
def test_prefill_issue_prompt_mix(emu):
    """The issue's prompt lengths in one varlen batch (1000 spans 16 query tiles and 16 key tiles), at the real
    head shape (one head: the heads are independent CTAs), plus graph-padding rows."""
    check_prefill(emu, [(0, n) for n in PROMPTS], 16, 80, (1, 1), torch.bfloat16, pad_rows=3)


# (block_size, head_dim, dtype): every block size, both head dims, both 16-bit dtypes
PREFILL_GRID = [(8, 80, torch.bfloat16), (16, 128, torch.float16), (32, 80, torch.float16),
                (8, 128, torch.bfloat16), (16, 80, torch.float16), (32, 128, torch.bfloat16)]
# cached prefixes ending mid-block, whole prompts, one new token over a prefix, an empty (padding) sequence
CHUNKED = [(5, 1), (13, 15), (0, 16), (3, 17), (40, 70), (0, 0), (9, 129)]


@pytest.mark.parametrize("block_size,head_dim,dtype", PREFILL_GRID,
                         ids=[f"bs{b}-d{d}-{str(t).split('.')[-1]}" for b, d, t in PREFILL_GRID])
def test_prefill_chunked_varlen(emu, block_size, head_dim, dtype):
    check_prefill(emu, CHUNKED, block_size, head_dim, (2, 1), dtype, pad_rows=2, seed=block_size + head_dim)


def test_prefill_gqa_and_strided_query(emu):
    """4 query heads over 2 KV heads; query as a view of a fused qkv projection."""
    seqs = [(7, 20), (0, 33)]
    query, key_cache, value_cache, tables, qsl, lens = prefill_inputs(seqs, 16, 80, (4, 2), torch.bfloat16)
    qkv = torch.stack([query, torch.zeros_like(query)], dim=1)  # [T, 2, H, D]
    strided = qkv[:, 0]
    out = emu.paged_attention_prefill(strided, key_cache, value_cache, tables, qsl, lens, 0.1)
    expected = attn.paged_attention_prefill_torch(query, key_cache, value_cache, tables, qsl, lens, 0.1)
    assert_close(out, expected, torch.bfloat16, "prefill GQA, strided query")


def test_prefill_fp32_takes_the_simt_kernel(emu):
    check_prefill(emu, [(3, 17), (0, 5)], 8, 80, (2, 1), torch.float32, pad_rows=1)


# ---- decode: partitions sized from the work -----------------------------------------------------------------

def decode_inputs(contexts, block_size=16, head_dim=80, heads=(2, 1), dtype=torch.bfloat16, seed=0, extra_blocks=1):
    num_heads, num_kv = heads
    key_cache, value_cache, tables, lens, gen = paged_batch(contexts, num_heads, num_kv, head_dim, block_size,
                                                            dtype, "cpu", seed=seed, extra_blocks=extra_blocks)
    query = torch.randn(len(contexts), num_heads, head_dim, generator=gen).to(dtype)
    return query, key_cache, value_cache, tables, lens


@pytest.mark.parametrize("hint", [0, 1, 64, 700, 1 << 20], ids=lambda h: f"hint{h}")
def test_decode_result_does_not_depend_on_the_hint(emu, hint):
    """With 2 heads (one block: they share a KV head) x 3 sequences the 132-SM plan splits a 700-token context into
    128-token partitions (hint 0 or 700); hint 1 gives one partition that walks 700 keys through the cp.async ring
    of 16-key tiles (no reduce pass); hint 64 is shorter than the contexts (the last partition takes the rest)."""
    contexts = [700, 1, 0]
    query, key_cache, value_cache, tables, lens = decode_inputs(contexts, seed=hint % 97)
    out = emu.paged_attention_decode(query, key_cache, value_cache, tables, lens, 80 ** -0.5, hint)
    expected = attn.paged_attention_decode_torch(query, key_cache, value_cache, tables, lens, 80 ** -0.5)
    assert_close(out, expected, torch.bfloat16, f"decode hint={hint}")
    assert (out[2] == 0).all(), "an empty context (graph padding) gives zeros"


@pytest.mark.parametrize("dtype,head_dim,block_size", [(torch.float16, 128, 8), (torch.float32, 80, 32)])
def test_decode_dtypes_and_head_dims(emu, dtype, head_dim, block_size):
    query, key_cache, value_cache, tables, lens = decode_inputs([300, 17], block_size, head_dim, (2, 2), dtype)
    out = emu.paged_attention_decode(query, key_cache, value_cache, tables, lens, 0.1)
    expected = attn.paged_attention_decode_torch(query, key_cache, value_cache, tables, lens, 0.1)
    assert_close(out, expected, dtype, f"decode {dtype} D={head_dim} bs={block_size}")


# ---- decode: grouped-query attention, one block per KV head's group ------------------------------------------

# (Hq, Hkv, head_dim, dtype, block_size, hint). Query heads per block G = the largest of 8/4/2/1 dividing Hq / Hkv:
# every G on both head dims and all three dtypes, every block size, split-K on (hint 0: the table capacity, 2-3
# partitions) and off (hint 1: one partition, no reduce). Hq / Hkv = 6 and 16 run several blocks per KV head.
GQA_GRID = [
    (8, 8, 80, torch.bfloat16, 16, 0), (8, 8, 128, torch.float32, 8, 1), (8, 8, 128, torch.float16, 32, 0),
    (4, 2, 80, torch.bfloat16, 8, 1), (4, 2, 128, torch.float32, 32, 0), (4, 2, 80, torch.float16, 16, 0),
    (8, 2, 80, torch.float32, 16, 0), (8, 2, 128, torch.float16, 32, 1), (32, 8, 128, torch.bfloat16, 16, 0),
    (8, 1, 80, torch.float16, 32, 0), (8, 1, 128, torch.bfloat16, 8, 1), (8, 1, 80, torch.float32, 8, 0),
    (6, 1, 80, torch.float16, 16, 0), (16, 1, 128, torch.bfloat16, 16, 1),
]
# ragged: a long context (several tiles and partitions), an empty (graph-padding) row, a tail of one tile + 1
GQA_CONTEXTS = [300, 0, 17, 129]


@pytest.mark.parametrize("num_heads,num_kv,head_dim,dtype,block_size,hint", GQA_GRID,
                         ids=[f"{h}q{k}kv-d{d}-{str(t).split('.')[-1]}-bs{b}-{'split' if n == 0 else 'one'}"
                              for h, k, d, t, b, n in GQA_GRID])
def test_decode_grouped_query_heads(emu, num_heads, num_kv, head_dim, dtype, block_size, hint):
    query, key_cache, value_cache, tables, lens = decode_inputs(GQA_CONTEXTS, block_size, head_dim,
                                                                (num_heads, num_kv), dtype, seed=num_heads + head_dim)
    scale = head_dim ** -0.5
    out = emu.paged_attention_decode(query, key_cache, value_cache, tables, lens, scale, hint)
    expected = attn.paged_attention_decode_torch(query, key_cache, value_cache, tables, lens, scale)
    assert out.shape == query.shape and out.dtype == dtype
    assert_close(out, expected, dtype, f"decode Hq={num_heads} Hkv={num_kv} D={head_dim} bs={block_size} hint={hint}")
    assert (out[1] == 0).all(), "an empty context (graph padding) gives zeros"


# (Hq, Hkv, hint, times each KV byte is read): groups of 1, 4 and 8 query heads read it once; Hq / Hkv = 6 runs
# blocks of 2 (the compiled groups are 1 / 2 / 4 / 8), 3 per KV head, so 3 times (per query head would be 6).
KV_READS = [(8, 8, 0, 1), (8, 2, 0, 1), (8, 1, 1, 1), (6, 1, 0, 3)]


@pytest.mark.parametrize("num_heads,num_kv,hint,reads", KV_READS, ids=["mha-split", "g4-split", "g8-one", "g6-split"])
def test_decode_reads_each_kv_byte_once_per_group(emu, num_heads, num_kv, hint, reads):
    """The decode kernel reads K/V only through cp.async (the emulator counts the bytes those copies read):
    whatever the partitioning, that is exactly every context token's K and V row of every KV head, once per
    block group. A kernel that streamed a KV head once per query head would read Hq / Hkv times as much."""
    from xverse_engine.ops import emulated
    counter = emulated.selftests().async_copy_source_bytes
    contexts, head_dim, dtype = [300, 0, 17, 129], 80, torch.bfloat16
    query, key_cache, value_cache, tables, lens = decode_inputs(contexts, 16, head_dim, (num_heads, num_kv), dtype)
    before = counter()
    out = emu.paged_attention_decode(query, key_cache, value_cache, tables, lens, 0.1, hint)
    read = counter() - before
    kv_bytes = 2 * sum(contexts) * num_kv * head_dim * dtype.itemsize
    assert read == reads * kv_bytes, \
        f"the kernel read {read} K/V bytes, {read / kv_bytes:.2f}x the {kv_bytes} in the contexts (expected {reads}x)"
    expected = attn.paged_attention_decode_torch(query, key_cache, value_cache, tables, lens, 0.1)
    assert_close(out, expected, dtype, "decode (byte count)")


# ---- review fixes (REVIEWS.md, csrc/attention/) ----------------------------------------------------------------

def test_decode_capacity_near_int32_max(emu):
    """max_blocks * block_size within 511 of INT32_MAX: the partition arithmetic is int64 (an int32 ceil_div
    overflowed here) and the result is right."""
    block_size = 256
    max_blocks = (2**31 - 1) // block_size  # capacity 2^31 - 256
    query, key_cache, value_cache, small_tables, lens = decode_inputs([40], block_size, 80, (2, 1))
    tables = torch.full((1, max_blocks), BAD_BLOCK, dtype=torch.int32)
    tables[:, :small_tables.shape[1]] = small_tables
    assert 2**31 - 1 - max_blocks * block_size < 511
    out = emu.paged_attention_decode(query, key_cache, value_cache, tables, lens, 0.1)
    expected = attn.paged_attention_decode_torch(query, key_cache, value_cache, small_tables, lens, 0.1)
    assert_close(out, expected, torch.bfloat16, "decode at capacity 2^31 - 256")


def test_context_lens_past_capacity_are_clamped(emu):
    """A context_len past the table's capacity is clamped by the decode AND the reduce kernel (several
    partitions, so the reduce runs): the result is that of the full table."""
    query, key_cache, value_cache, tables, lens = decode_inputs([600, 300], extra_blocks=0)
    capacity = tables.shape[1] * 16
    assert lens[0] == capacity - 8  # 600 tokens in 38 blocks of 16
    too_long = torch.tensor([capacity + 1000, 300], dtype=torch.int32)
    # the cache slots past 600 hold NaN (paged_batch): fill them so "clamped to capacity" is well defined
    gen = torch.Generator().manual_seed(5)
    last = tables[0, -1].item()
    key_cache[last, :, 8:] = torch.randn(key_cache[last, :, 8:].shape, generator=gen).to(key_cache.dtype)
    value_cache[last, :, 8:] = torch.randn(value_cache[last, :, 8:].shape, generator=gen).to(value_cache.dtype)
    out = emu.paged_attention_decode(query, key_cache, value_cache, tables, too_long, 0.1, capacity)
    clamped = torch.tensor([capacity, 300], dtype=torch.int32)
    expected = attn.paged_attention_decode_torch(query, key_cache, value_cache, tables, clamped, 0.1)
    assert_close(out, expected, torch.bfloat16, "decode with context_lens past capacity")
    with pytest.raises(RuntimeError, match=r"context_lens\[0\] = .* is outside"):  # the CPU op refuses it
        torch.ops.xverse.paged_attention_decode(query, key_cache, value_cache, tables, too_long, 0.1)


@pytest.mark.parametrize("ops_name", ["cpu", "emu"])
def test_prefill_tokens_without_sequences_are_rejected(emu, ops_name):
    """B = 0 with T > 0: both implementations raise (CUDA used to return uninitialised memory)."""
    ops = torch.ops.xverse if ops_name == "cpu" else emu
    cache = torch.zeros(2, 1, 16, 80, dtype=torch.bfloat16)
    query = torch.randn(3, 2, 80).to(torch.bfloat16)
    tables, qsl, lens = torch.zeros(0, 1, dtype=torch.int32), torch.zeros(1, dtype=torch.int32), \
        torch.zeros(0, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="3 query tokens but no sequences"):
        ops.paged_attention_prefill(query, cache, cache, tables, qsl, lens, 0.1)
    empty = ops.paged_attention_prefill(query[:0], cache, cache, tables, qsl, lens, 0.1)
    assert empty.shape == (0, 2, 80)


@pytest.mark.parametrize("ops_name", ["cpu", "emu"])
def test_zero_heads_return_empty(emu, ops_name):
    """Hq = 0 (and so n_kv = 0 is impossible: the cache has heads) -> an empty output, no launch."""
    ops = torch.ops.xverse if ops_name == "cpu" else emu
    query, key_cache, value_cache, tables, lens = decode_inputs([20, 5])
    # a query with 0 heads is not a multiple of the cache's n_kv unless... it is: 0 % n_kv == 0
    no_heads = query[:, :0]
    out = ops.paged_attention_decode(no_heads, key_cache, value_cache, tables, lens, 0.1)
    assert out.shape == (2, 0, 80)
    qsl = torch.tensor([0, 20, 25], dtype=torch.int32)
    out = ops.paged_attention_prefill(torch.zeros(25, 0, 80, dtype=torch.bfloat16), key_cache, value_cache, tables,
                                      qsl, lens, 0.1)
    assert out.shape == (25, 0, 80)


def test_block_table_contract(emu, monkeypatch):
    """An entry outside [0, num_blocks) inside a context: the CPU op and the CUDA op with
    XVERSE_CHECK_BLOCK_TABLES=1 raise the same error; without the flag the CUDA kernels never dereference it
    (under the emulator's AddressSanitizer job a read there fails) and their other rows stay right."""
    query, key_cache, value_cache, tables, lens = decode_inputs([40, 30])
    bad = tables.clone()
    bad[0, 1] = key_cache.shape[0] + 5
    message = r"block_tables\[0, 1\] = .* is not a block of the cache"
    with pytest.raises(RuntimeError, match=message):
        torch.ops.xverse.paged_attention_decode(query, key_cache, value_cache, bad, lens, 0.1)
    monkeypatch.setenv("XVERSE_CHECK_BLOCK_TABLES", "1")
    with pytest.raises(RuntimeError, match=message):
        emu.paged_attention_decode(query, key_cache, value_cache, bad, lens, 0.1)
    qsl = torch.tensor([0, 1, 2], dtype=torch.int32)
    with pytest.raises(RuntimeError, match=message):
        emu.paged_attention_prefill(query, key_cache, value_cache, bad, qsl, lens, 0.1)
    monkeypatch.delenv("XVERSE_CHECK_BLOCK_TABLES")
    expected = attn.paged_attention_decode_torch(query, key_cache, value_cache, tables, lens, 0.1)
    for out in (emu.paged_attention_decode(query, key_cache, value_cache, bad, lens, 0.1),
                emu.paged_attention_prefill(query, key_cache, value_cache, bad, qsl, lens, 0.1)):
        assert torch.isfinite(out.float()).all()
        assert_close(out[1], expected[1], torch.bfloat16, "the sequence with a good table")


# ---- the model with the emulated CUDA attention kernels -----------------------------------------------------------

@pytest.fixture
def emulated_attention(emu, monkeypatch):
    """The attention layer calls the emulated CUDA ops (every other op stays on the C++ CPU kernels); counts
    the calls so a test can see that both kernels ran."""
    from xverse_engine.layers import attention as layer
    calls = {"decode": 0, "prefill": 0}

    def decode(query, key_cache, value_cache, block_tables, context_lens, scale, kernels="torch", max_context_len=0):
        calls["decode"] += 1
        return emu.paged_attention_decode(query, key_cache, value_cache, block_tables, context_lens, scale,
                                          max_context_len)

    def prefill(query, key_cache, value_cache, block_tables, query_start_loc, context_lens, scale, kernels="torch"):
        calls["prefill"] += 1
        return emu.paged_attention_prefill(query, key_cache, value_cache, block_tables, query_start_loc,
                                           context_lens, scale)
    monkeypatch.setattr(layer, "paged_attention_decode", decode)
    monkeypatch.setattr(layer, "paged_attention_prefill", prefill)
    return calls


@pytest.mark.slow
def test_model_greedy_equals_reference_with_emulated_cuda_attention(real_head_ckpt, reference_data,
                                                                    emulated_attention):
    """head_dim 80, fp32 (SIMT prefill + split-K decode): exactly the tokens of the float64 reference's full
    recomputation at every step, as test_model_vs_reference.py asks of the other kernel paths."""
    from reference import reference_greedy
    from test_model_vs_reference import PROMPT
    from xverse_engine import Engine, SamplingParams
    state_dict, config = reference_data(real_head_ckpt)
    prompt = [i % config["vocab_size"] for i in PROMPT]
    expected = reference_greedy(state_dict, config, prompt, 8, repetition_penalty=1.1)
    engine = Engine(str(real_head_ckpt), device="cpu", dtype="float32", kernels="cpu", num_kv_blocks=64,
                    block_size=8, show_progress=False)
    out = engine.generate(prompt_token_ids=[prompt], sampling_params=SamplingParams(max_new_tokens=8,
                                                                                   ignore_eos=True))[0]
    assert out.token_ids == expected
    assert emulated_attention["prefill"] > 0 and emulated_attention["decode"] > 0


@pytest.mark.slow
def test_model_bf16_tensor_core_prefill_matches_cpu_kernels(real_head_ckpt, emulated_attention, monkeypatch):
    """bf16 (the tensor-core prefill at head_dim 80, several prompts with prefixes ending mid-block): the
    greedy tokens of the C++ CPU kernels."""
    from xverse_engine import Engine, SamplingParams
    prompts = [[(i * 37 + j * 11) % 500 + 6 for j in range(n)] for i, n in enumerate((21, 9, 70))]
    params = SamplingParams(max_new_tokens=6, temperature=0, repetition_penalty=1.0, ignore_eos=True)

    def greedy():
        engine = Engine(str(real_head_ckpt), device="cpu", dtype="bfloat16", kernels="cpu", num_kv_blocks=64,
                        block_size=8, show_progress=False)
        return [o.token_ids for o in engine.generate(prompt_token_ids=prompts, sampling_params=params)]
    emulated = greedy()
    assert emulated_attention["prefill"] > 0 and emulated_attention["decode"] > 0
    monkeypatch.undo()  # back to the C++ CPU attention kernels
    assert emulated == greedy()
