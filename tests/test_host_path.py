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
