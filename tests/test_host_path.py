"""The engine's host path (issue 11): request bookkeeping that scales, seeds that cannot kill a batch, a
prefix cache that can never hand out another request's KV, and the persistent batch / asynchronous
stepping that keep host time per step small without changing a single output token."""
import pytest

from xverse_engine import Engine, SamplingParams
from xverse_engine.engine.sequence import Sequence

GREEDY = SamplingParams(max_new_tokens=6, temperature=0, repetition_penalty=1.0, ignore_eos=True)


def make_engine(path, **kw):
    settings = dict(device="cpu", kernels="torch", num_kv_blocks=256, block_size=4, max_model_len=128,
                    show_progress=False)
    settings.update(kw)
    return Engine(str(path), **settings)


def prompts_of_lengths(lengths, vocab=500):
    return [[(i * 31 + j * 7) % (vocab - 6) + 6 for j in range(n)] for i, n in enumerate(lengths)]


# ---- defect 5: a Sequence is compared by identity ------------------------------------------------------

def test_sequences_with_equal_fields_are_distinct():
    a = Sequence(0, None, [5, 6, 7], GREEDY, seed=0, max_tokens=16)
    b = Sequence(0, None, [5, 6, 7], GREEDY, seed=0, max_tokens=16)
    a.arrival_time = b.arrival_time
    assert a != b and b not in [a]
    running = [a, b]
    running.remove(b)          # must remove b itself, not the first sequence that looks like it
    assert running[0] is a


# ---- defect 2: any integer seed works, and never kills the batch ---------------------------------------

@pytest.mark.parametrize("seed", [2 ** 63, 2 ** 64 + 5, -(2 ** 63) - 1, 10 ** 30])
def test_seed_outside_int64_works_and_spares_the_batch(moe_ckpt, seed):
    engine = make_engine(moe_ckpt)
    prompts = prompts_of_lengths([5, 7])
    sampled = SamplingParams(max_new_tokens=6, temperature=1.0, seed=seed, ignore_eos=True)
    outs = engine.generate(prompt_token_ids=prompts, sampling_params=[GREEDY, sampled])
    assert [o.finish_reason for o in outs] == ["length", "length"]
    again = engine.generate(prompt_token_ids=prompts[1:], sampling_params=sampled)[0]
    assert again.token_ids == outs[1].token_ids        # still a seed: the same tokens every time


def test_seed_folding_keeps_int64_seeds_and_wraps_the_rest():
    from xverse_engine.sampling_params import seed_as_int64
    assert [seed_as_int64(s) for s in (0, 5, -7, 2 ** 63 - 1, -(2 ** 63))] == [0, 5, -7, 2 ** 63 - 1, -(2 ** 63)]
    assert seed_as_int64(2 ** 63) == -(2 ** 63) and seed_as_int64(2 ** 64 + 5) == 5


# ---- defect 4: reusing cached blocks costs the same however long the free list is ----------------------

def _seconds_to_admit_cached_prefix(num_blocks: int, prefix_tokens: int = 1920, block_size: int = 16) -> float:
    import time

    from xverse_engine.engine.block_manager import BlockManager
    manager = BlockManager(num_blocks, block_size)
    prompt = [(7 * j) % 500 + 6 for j in range(prefix_tokens)]
    first = Sequence(0, None, prompt + [1], GREEDY, seed=0, max_tokens=4096)
    manager.allocate(first)
    first.num_computed_tokens = first.num_tokens
    manager.register_computed_blocks(first)
    manager.free(first)                       # its blocks wait, still findable, at the back of the free list
    best = float("inf")
    for _ in range(5):
        again = Sequence(1, None, prompt + [2], GREEDY, seed=0, max_tokens=4096)
        start = time.perf_counter()
        manager.allocate(again)
        best = min(best, time.perf_counter() - start)
        assert again.num_cached_prompt_tokens == prefix_tokens
        manager.free(again)
    return best


def test_prefix_reuse_does_not_scan_the_free_list():
    small, large = _seconds_to_admit_cached_prefix(200), _seconds_to_admit_cached_prefix(20000)
    assert large < 5 * small + 1e-4, (small, large)   # O(free blocks) took ~50x here


# ---- defect 9: a prefix-cache hit verifies the whole chain, so a hash collision cannot leak KV ---------

def test_hash_collision_never_hands_out_another_requests_kv(moe_ckpt, monkeypatch):
    from xverse_engine.engine import block_manager
    x, y, z = [11, 12, 13, 14], [21, 22, 23, 24], [31, 32, 33]
    params = SamplingParams(max_new_tokens=5, temperature=0, repetition_penalty=1.0, ignore_eos=True)
    expected = make_engine(moe_ckpt, enable_prefix_caching=False).generate(
        prompt_token_ids=[y + z], sampling_params=params)[0].token_ids
    monkeypatch.setattr(block_manager, "chain_hash", lambda tokens, previous: 0)   # every key collides
    engine = make_engine(moe_ckpt)
    engine.generate(prompt_token_ids=[x + y + [40]], sampling_params=SamplingParams(
        max_new_tokens=1, temperature=0, ignore_eos=True))   # caches block y, computed after x
    out = engine.generate(prompt_token_ids=[y + z], sampling_params=params)[0]
    assert out.metrics.num_cached_prompt_tokens == 0      # y after nothing is not y after x
    assert out.token_ids == expected
