"""BlockManager as the spec says, without a model: blocks on demand, reference counts, and the prefix cache
(a full block is found by its content after the same chain of blocks; freed blocks stay findable until
they are handed out again, least recently freed first; the last prompt token is always computed).
These tests take milliseconds.
"""
import pytest

from xverse_engine import SamplingParams
from xverse_engine.engine import block_manager
from xverse_engine.engine.block_manager import BlockManager
from xverse_engine.engine.sequence import Sequence

BLOCK = 4
GREEDY = SamplingParams(temperature=0, repetition_penalty=1.0, ignore_eos=True)


def seq(tokens, request_id=0):
    return Sequence(request_id, None, list(tokens), GREEDY, seed=0, max_tokens=1024)


def computed(bm, s):
    """s allocated and its KV written: its full blocks become findable."""
    bm.allocate(s)
    s.num_computed_tokens = s.num_tokens
    bm.register_computed_blocks(s)
    return s


PROMPT = list(range(100, 112))   # 12 tokens: three full blocks


def test_blocks_needed_rounds_up():
    bm = BlockManager(num_blocks=8, block_size=BLOCK)
    assert [bm.blocks_needed(n) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]


def test_a_new_sequence_takes_one_block_per_started_block_and_computes_everything():
    bm = BlockManager(num_blocks=8, block_size=BLOCK)
    s = seq(PROMPT[:9])
    assert bm.can_allocate(s)
    bm.allocate(s)
    assert len(s.block_table) == 3 and len(set(s.block_table)) == 3
    assert bm.num_free_blocks == 5
    assert (s.num_computed_tokens, s.num_cached_prompt_tokens, s.num_hashed_blocks) == (0, 0, 0)
    assert bm.prefix_hit_rate == 0.0


def test_can_allocate_counts_every_block_as_new():
    bm = BlockManager(num_blocks=3, block_size=BLOCK)
    assert bm.can_allocate(seq(PROMPT))               # 3 blocks, 3 free
    assert not bm.can_allocate(seq(PROMPT + [1]))     # 4 blocks


def test_a_shared_prefix_reuses_the_blocks_and_counts_as_computed():
    bm = BlockManager(num_blocks=8, block_size=BLOCK)
    a = computed(bm, seq(PROMPT))
    b = seq(PROMPT + [7, 8], request_id=1)
    bm.allocate(b)
    assert b.block_table[:3] == a.block_table and b.block_table[3] not in a.block_table
    assert (b.num_computed_tokens, b.num_cached_prompt_tokens, b.num_hashed_blocks) == (12, 12, 3)
    assert bm.num_free_blocks == 8 - 4
    # a looked up its first block, missed, and stopped looking; b found all three
    assert (bm.prefix_queries, bm.prefix_hits, bm.prefix_hit_rate) == (1 + 3, 3, 0.75)


def test_the_last_prompt_token_is_always_computed():
    """Its logits are needed, so the block holding it is never served from the cache, even when cached."""
    bm = BlockManager(num_blocks=8, block_size=BLOCK)
    a = computed(bm, seq(PROMPT))
    b = seq(PROMPT, request_id=1)
    bm.allocate(b)
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] != a.block_table[2]
    assert b.num_computed_tokens == 8 and bm.prefix_queries == 1 + 2      # a's one miss, b's two hits


def test_the_shared_prefix_ends_at_the_first_different_block():
    bm = BlockManager(num_blocks=12, block_size=BLOCK)
    a = computed(bm, seq(PROMPT + [1]))
    other = PROMPT[:4] + [0, 0, 0, 0] + PROMPT[8:] + [1]     # block 1 differs; block 2 is a's block 2 again
    b = seq(other, request_id=1)
    bm.allocate(b)
    assert b.block_table[0] == a.block_table[0] and not set(b.block_table[1:]) & set(a.block_table)
    assert b.num_computed_tokens == 4
    # a: one miss; b: a hit, a miss, and no lookups after the first miss
    assert (bm.prefix_queries, bm.prefix_hits) == (1 + 2, 1)
    assert bm.prefix_hit_rate == 1 / 3


def test_the_same_content_at_another_position_is_not_a_hit():
    bm = BlockManager(num_blocks=12, block_size=BLOCK)
    computed(bm, seq(PROMPT + [1]))
    b = seq(PROMPT[4:8] + PROMPT + [1], request_id=1)        # a's block 1 first, then a's blocks 0..2
    bm.allocate(b)
    assert b.num_computed_tokens == 0


def test_only_blocks_whose_kv_is_computed_are_registered():
    bm = BlockManager(num_blocks=8, block_size=BLOCK)
    a = seq(PROMPT + [1])
    bm.allocate(a)
    a.num_computed_tokens = 7                 # a chunk of the prompt: block 0 full, block 1 not yet
    bm.register_computed_blocks(a)
    assert a.num_hashed_blocks == 1
    b = seq(PROMPT + [1], request_id=1)
    bm.allocate(b)
    assert b.num_computed_tokens == 4 and b.block_table[0] == a.block_table[0]
    a.num_computed_tokens = 13
    bm.register_computed_blocks(a)
    assert a.num_hashed_blocks == 3


def test_tokens_not_yet_on_the_host_are_not_registered():
    """A pending token's KV is being written, but its value is unknown: its block cannot be found yet."""
    bm = BlockManager(num_blocks=8, block_size=BLOCK)
    a = seq(PROMPT[:7])
    bm.allocate(a)
    a.num_pending = 1
    a.num_computed_tokens = 8                  # 7 known + 1 pending token computed
    bm.register_computed_blocks(a)
    assert a.num_hashed_blocks == 1
    a.num_pending = 0
    a.append_token(PROMPT[7])
    bm.register_computed_blocks(a)
    assert a.num_hashed_blocks == 2


def test_without_prefix_caching_nothing_is_shared_or_registered():
    bm = BlockManager(num_blocks=8, block_size=BLOCK, enable_prefix_caching=False)
    a = computed(bm, seq(PROMPT))
    assert a.num_hashed_blocks == 0 and not bm.hash_to_block
    b = seq(PROMPT + [1], request_id=1)
    bm.allocate(b)
    assert not set(a.block_table) & set(b.block_table) and b.num_computed_tokens == 0
    assert bm.prefix_queries == 0


def test_shared_blocks_are_freed_by_their_last_user():
    bm = BlockManager(num_blocks=8, block_size=BLOCK)
    a = computed(bm, seq(PROMPT))
    b = seq(PROMPT + [1], request_id=1)
    bm.allocate(b)
    bm.free(a)
    assert bm.num_free_blocks == 4 and a.block_table == []
    assert (a.num_computed_tokens, a.num_hashed_blocks) == (0, 0)
    bm.free(b)
    assert bm.num_free_blocks == 8
    assert all(block.ref_count == 0 for block in bm.blocks)


def test_a_freed_block_is_still_found_until_it_is_handed_out_again():
    bm = BlockManager(num_blocks=4, block_size=BLOCK)
    a = computed(bm, seq(PROMPT))
    a_table = list(a.block_table)
    bm.free(a)
    b = seq(PROMPT + [1], request_id=1)
    bm.allocate(b)                             # all of a's blocks come back out of the free list
    assert b.block_table[:3] == a_table and b.num_computed_tokens == 12
    assert bm.num_free_blocks == 0
    bm.free(b)
    # fill the cache with other content: a's blocks are overwritten, and the old content no longer found
    c = seq([1] * 16, request_id=2)
    bm.allocate(c)
    bm.free(c)
    d = seq(PROMPT + [1], request_id=3)
    bm.allocate(d)
    assert d.num_computed_tokens == 0


def test_the_least_recently_freed_block_is_handed_out_first():
    bm = BlockManager(num_blocks=4, block_size=BLOCK)
    a = computed(bm, seq(PROMPT[:8]))               # blocks 0, 1
    b = computed(bm, seq(PROMPT[4:12], request_id=1))   # blocks 2, 3 (other content)
    assert (a.block_table, b.block_table) == ([0, 1], [2, 3])
    bm.free(b)
    bm.free(a)              # free order: b's blocks, then a's; each sequence's last block first (evicted first)
    c = seq([1, 2, 3], request_id=2)
    bm.allocate(c)
    assert c.block_table == [3]
    d = seq(PROMPT[:8] + [1], request_id=3)
    bm.allocate(d)
    assert d.num_computed_tokens == 8                # a's content survived: it was freed last


def test_a_new_token_gets_a_block_only_when_the_last_one_is_full():
    bm = BlockManager(num_blocks=3, block_size=BLOCK)
    s = seq(PROMPT[:4])
    bm.allocate(s)
    s.append_token(1)                      # 5 tokens: needs a second block
    assert bm.can_append(s)
    bm.append_slot(s)
    assert len(s.block_table) == 2 and bm.num_free_blocks == 1
    for t in (2, 3, 4):                    # 6, 7, 8 tokens: the second block fills up, exactly
        s.append_token(t)
        bm.append_slot(s)
        assert len(s.block_table) == 2
    s.append_token(5)
    assert bm.can_append(s)                # the 9th needs the one free block
    bm.append_slot(s)
    assert len(s.block_table) == 3 and bm.num_free_blocks == 0
    for t in (6, 7, 8):
        s.append_token(t)
    assert bm.can_append(s)                # 12 tokens in 3 full blocks: no new block needed
    s.append_token(9)
    assert not bm.can_append(s)            # the 13th needs a block, none is free


def test_a_block_overwritten_by_another_sequence_leaves_the_cache():
    bm = BlockManager(num_blocks=3, block_size=BLOCK)
    a = computed(bm, seq(PROMPT))
    bm.free(a)
    assert len(bm.hash_to_block) == 3
    c = seq([5], request_id=1)
    bm.allocate(c)                          # takes a's last block (freed first)
    assert len(bm.hash_to_block) == 2
    assert bm.blocks[c.block_table[0]].token_ids is None and bm.blocks[c.block_table[0]].ref_count == 1


def test_a_hit_needs_the_very_parent_block_even_when_hashes_collide(monkeypatch):
    """A hash only finds a candidate: with a parent-blind hash, block Y cached after W must not serve Y
    after X (its KV was computed after W)."""
    monkeypatch.setattr(block_manager, "chain_hash", lambda tokens, previous: hash(tuple(tokens)))
    bm = BlockManager(num_blocks=8, block_size=BLOCK)
    x, w, y = [1] * BLOCK, [2] * BLOCK, [3] * BLOCK
    a = computed(bm, seq(x + y + [9]))
    c = computed(bm, seq(w + y + [9], request_id=1))     # the cache's entry for Y is now c's block
    b = seq(x + y + [9], request_id=2)
    bm.allocate(b)
    assert b.block_table[0] == a.block_table[0]
    assert b.block_table[1] not in (a.block_table[1], c.block_table[1])
    assert b.num_computed_tokens == BLOCK


def test_allocating_a_sequence_that_holds_blocks_is_refused():
    bm = BlockManager(num_blocks=8, block_size=BLOCK)
    s = seq(PROMPT)
    bm.allocate(s)
    with pytest.raises(AssertionError, match="^sequence already holds blocks$"):
        bm.allocate(s)
