"""The attention ops' contract on the C++ CPU kernels (the emulated CUDA side: test_attention_emu.py; a real GPU:
the gpu-marked tests of test_attention_ops.py).

- prefill rows past query_start_loc[B] (graph padding) come out as zeros, as in the twin;
- B = 0 with T > 0 is rejected, T = 0 / Hq = 0 give empty outputs;
- the block-table contract: lengths past the capacity and entries outside the cache are errors on the CPU;
- decode's max_context_len only sizes the CUDA split-K: every value gives the same result, and opcheck
  accepts the schema with and without it.
"""
import itertools

import pytest
import torch

from conftest import require_extension
from test_attention_ops import assert_close, paged_batch
from xverse_engine.ops import attention as attn

require_extension()


def test_prefill_graph_padding_rows_are_zero():
    contexts, q_lens = [20, 9], [4, 9]
    key_cache, value_cache, tables, lens, gen = paged_batch(contexts, 4, 2, 80, 8, torch.float32, "cpu")
    qsl = torch.tensor([0] + list(itertools.accumulate(q_lens)), dtype=torch.int32)
    query = torch.randn(sum(q_lens) + 5, 4, 80, generator=gen)  # 5 rows past query_start_loc[B]
    out = torch.ops.xverse.paged_attention_prefill(query, key_cache, value_cache, tables, qsl, lens, 0.1)
    expected = attn.paged_attention_prefill_torch(query, key_cache, value_cache, tables, qsl, lens, 0.1)
    assert_close(out, expected, torch.float32, "prefill with graph padding")
    assert (out[-5:] == 0).all()


def test_prefill_query_start_loc_past_the_tokens_is_rejected():
    key_cache, value_cache, tables, lens, _ = paged_batch([5], 2, 2, 80, 8, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="query_start_loc must run from 0 to at most the 4 query tokens"):
        torch.ops.xverse.paged_attention_prefill(torch.randn(4, 2, 80), key_cache, value_cache, tables,
                                                 torch.tensor([0, 5], dtype=torch.int32), lens, 0.1)


def test_prefill_tokens_without_sequences_are_rejected():
    cache = torch.zeros(2, 1, 16, 80)
    tables, qsl, lens = torch.zeros(0, 1, dtype=torch.int32), torch.zeros(1, dtype=torch.int32), \
        torch.zeros(0, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="3 query tokens but no sequences"):
        torch.ops.xverse.paged_attention_prefill(torch.randn(3, 2, 80), cache, cache, tables, qsl, lens, 0.1)
    assert torch.ops.xverse.paged_attention_prefill(torch.randn(0, 2, 80), cache, cache, tables, qsl, lens,
                                                    0.1).shape == (0, 2, 80)


def test_zero_heads_give_empty_outputs():
    key_cache, value_cache, tables, lens, _ = paged_batch([20, 5], 2, 2, 80, 16, torch.float32, "cpu")
    out = torch.ops.xverse.paged_attention_decode(torch.zeros(2, 0, 80), key_cache, value_cache, tables, lens, 0.1)
    assert out.shape == (2, 0, 80)


def test_block_table_contract_on_cpu():
    key_cache, value_cache, tables, lens, gen = paged_batch([40, 30], 2, 2, 80, 16, torch.float32, "cpu")
    query = torch.randn(2, 2, 80, generator=gen)
    bad = tables.clone()
    bad[0, 2] = -1  # inside the 40-token context (blocks 0..2)
    with pytest.raises(RuntimeError, match=r"block_tables\[0, 2\] = -1 is not a block of the cache"):
        torch.ops.xverse.paged_attention_decode(query, key_cache, value_cache, bad, lens, 0.1)
    past = tables.clone()
    past[0, 3:] = -7  # past the context: never read, so allowed
    out = torch.ops.xverse.paged_attention_decode(query, key_cache, value_cache, past, lens, 0.1)
    assert_close(out, attn.paged_attention_decode_torch(query, key_cache, value_cache, tables, lens, 0.1),
                 torch.float32, "entries past the context are ignored")
    too_long = torch.tensor([40, tables.shape[1] * 16 + 1], dtype=torch.int32)
    with pytest.raises(RuntimeError, match=r"context_lens\[1\] = .* is outside \[0, max_blocks \* block_size"):
        torch.ops.xverse.paged_attention_decode(query, key_cache, value_cache, tables, too_long, 0.1)


@pytest.mark.parametrize("hint", [0, 1, 37, 100000])
def test_decode_hint_never_changes_the_result(hint):
    key_cache, value_cache, tables, lens, gen = paged_batch([37, 3, 0], 4, 2, 80, 8, torch.bfloat16, "cpu")
    query = torch.randn(3, 4, 80, generator=gen).to(torch.bfloat16)
    with_hint = torch.ops.xverse.paged_attention_decode(query, key_cache, value_cache, tables, lens, 0.1, hint)
    without = torch.ops.xverse.paged_attention_decode(query, key_cache, value_cache, tables, lens, 0.1)
    assert torch.equal(with_hint, without)
    front = attn.paged_attention_decode(query, key_cache, value_cache, tables, lens, 0.1, kernels="cpu",
                                        max_context_len=hint)
    assert torch.equal(front, without)


def test_opcheck_decode_with_hint():
    key_cache, value_cache, tables, lens, gen = paged_batch([3, 20], 4, 2, 80, 8, torch.float32, "cpu")
    query = torch.randn(2, 4, 80, generator=gen)
    torch.library.opcheck(torch.ops.xverse.paged_attention_decode.default,
                          (query, key_cache, value_cache, tables, lens, 0.125, 32))
