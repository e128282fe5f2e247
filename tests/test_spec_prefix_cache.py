"""Prefix caching as the spec says: a cached KV block may serve a request only when the request's tokens up to
and including that block equal the tokens the block was computed for. The KV of a block depends on every
token before it (attention) and on its position (RoPE), so equal block content is not enough.

Each test runs a first request that fills the cache, then a second one, and compares the second with a
cold engine (prefix caching off): same tokens, same logprobs, and the number of prompt tokens served from
the cache (RequestOutput.metrics.num_cached_prompt_tokens) exactly what the spec allows.
"""
import pytest

from xverse_engine import Engine, SamplingParams

BLOCK = 4
PARAMS = SamplingParams(max_new_tokens=6, temperature=0, repetition_penalty=1.0, ignore_eos=True, logprobs=2)


def block(seed):
    """One block's worth of token ids, different for each seed."""
    return [(seed * 37 + j * 11) % 490 + 10 for j in range(BLOCK)]


P, Q, X, Y = block(1), block(2), block(3), block(4)


def make_engine(path, caching=True):
    return Engine(str(path), device="cpu", kernels="cpu", num_kv_blocks=64, block_size=BLOCK, max_model_len=128,
                  enable_prefix_caching=caching, show_progress=False)


@pytest.fixture(scope="module")
def cold(moe_ckpt):
    return make_engine(moe_ckpt, caching=False)


def run(engine, prompt):
    return engine.generate(prompt_token_ids=[prompt], sampling_params=PARAMS)[0]


def assert_same_output(got, expected):
    assert got.token_ids == expected.token_ids
    for a, b in zip(got.logprobs, expected.logprobs):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4)


def second_after_first(moe_ckpt, cold, first, second):
    """Runs `first` then `second` on a fresh caching engine; checks `second` against the cold engine."""
    engine = make_engine(moe_ckpt)
    run(engine, first)
    out = run(engine, second)
    assert_same_output(out, run(cold, second))
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks   # nothing leaked
    return out


def test_same_block_content_at_another_position_is_not_a_hit(moe_ckpt, cold):
    """X was cached as the 2nd block of P X; as the 1st block of X Y its KV would be wrong (other position,
    other context): a cache keyed on a block's own tokens, ignoring its parent, would hand it out."""
    out = second_after_first(moe_ckpt, cold, first=P + X + [7], second=X + Y + [7])
    assert out.metrics.num_cached_prompt_tokens == 0


def test_same_block_after_a_different_parent_is_not_a_hit(moe_ckpt, cold):
    """P Q X then P Y X: P is shared, X sits at the same position but after another block, so only P hits."""
    out = second_after_first(moe_ckpt, cold, first=P + Q + X + [7], second=P + Y + X + [7])
    assert out.metrics.num_cached_prompt_tokens == BLOCK


def test_a_hit_serves_the_whole_matching_chain(moe_ckpt, cold):
    """P Q X + one token, then P Q X + another: the three full blocks are served, the rest computed."""
    out = second_after_first(moe_ckpt, cold, first=P + Q + X + [7], second=P + Q + X + [8, 9])
    assert out.metrics.num_cached_prompt_tokens == 3 * BLOCK


def test_the_last_prompt_token_is_always_computed(moe_ckpt, cold):
    """A prompt that is exactly a cached chain still computes its last block (its logits are needed)."""
    out = second_after_first(moe_ckpt, cold, first=P + Q + X + [7], second=P + Q + X)
    assert out.metrics.num_cached_prompt_tokens == 2 * BLOCK


def test_a_generated_block_is_cached_for_the_next_request(moe_ckpt, cold):
    """Blocks filled by generated tokens are cached too: a prompt that repeats prompt + output hits them."""
    engine = make_engine(moe_ckpt)
    first = run(engine, P + [7])
    again = P + [7] + first.token_ids + [9]                  # 1 + 1 + 6 + 1 tokens after P: blocks P, *, *
    out = run(engine, again)
    assert_same_output(out, run(cold, again))
    assert out.metrics.num_cached_prompt_tokens == 2 * BLOCK


@pytest.mark.parametrize("weak_hash,hits_survive", [
    (lambda tokens, previous: hash(tuple(tokens)), True),     # parent-blind: distinct blocks keep distinct keys
    (lambda tokens, previous: 0, False),                      # constant: one key, so most hits become misses
], ids=["parent-blind", "constant"])
def test_a_hit_verifies_its_whole_chain_even_when_keys_collide(moe_ckpt, cold, monkeypatch, weak_hash, hits_survive):
    """The hash only finds a candidate: with a key function that collides on purpose (ignoring the parent, or
    the same for every block), a hit still needs the same tokens in the block and in every block before it,
    so collisions cost misses, never another request's KV."""
    from xverse_engine.engine import block_manager
    monkeypatch.setattr(block_manager, "chain_hash", weak_hash)
    out = second_after_first(moe_ckpt, cold, first=P + X + [7], second=X + Y + [7])
    assert out.metrics.num_cached_prompt_tokens == 0
    out = second_after_first(moe_ckpt, cold, first=P + Q + X + [7], second=P + Q + X + [8])
    if hits_survive:
        assert out.metrics.num_cached_prompt_tokens == 3 * BLOCK
