"""The serving loop: continuous batching, chunked prefill, preemption, prefix caching, abort, no leaks."""
import pytest

from xverse_engine import Engine, SamplingParams
from xverse_engine.engine.block_manager import BlockManager
from xverse_engine.engine.sequence import Sequence

GREEDY = SamplingParams(temperature=0, repetition_penalty=1.0, ignore_eos=True)


def make_engine(path, **kw):
    settings = dict(device="cpu", kernels="torch", num_kv_blocks=256, block_size=4, max_model_len=128,
                    show_progress=False)
    settings.update(kw)
    return Engine(str(path), **settings)


def workload(n=32):
    """n requests of mixed prompt and output lengths."""
    prompts = [[(i * 13 + j * 5) % 490 + 6 for j in range(1 + (i * 7) % 23)] for i in range(n)]
    params = [SamplingParams(max_new_tokens=1 + (i * 5) % 9, temperature=0, repetition_penalty=1.0,
                             ignore_eos=True) if i % 3 else
              SamplingParams(max_new_tokens=1 + (i * 5) % 9, temperature=0.8, top_p=0.9, seed=i, ignore_eos=True)
              for i in range(n)]
    return prompts, params


@pytest.fixture(scope="module")
def alone(moe_ckpt):
    """What each request of the workload gives when it runs by itself."""
    engine = make_engine(moe_ckpt)
    prompts, params = workload()
    return [engine.generate(prompt_token_ids=[p], sampling_params=s)[0].token_ids for p, s in zip(prompts, params)]


def run_with_arrivals(engine, prompts, params):
    """Requests arrive a few at a time while earlier ones are running."""
    ids, results, pending = [], {}, list(zip(prompts, params))
    while pending or engine.has_unfinished():
        for _ in range(3):
            if pending:
                p, s = pending.pop(0)
                ids.append(engine.add_request(None, s, prompt_token_ids=p))
        engine.step()
    for rid in ids:
        out = engine.get_output(rid)
        assert out.finished
        results[rid] = out.token_ids
    return [results[rid] for rid in ids]


def assert_no_leak(engine):
    assert not engine.has_unfinished()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert all(b.ref_count == 0 for b in engine.block_manager.blocks)


def test_arrivals_while_running_equal_each_alone(moe_ckpt, alone):
    engine = make_engine(moe_ckpt, max_num_seqs=8)
    prompts, params = workload()
    assert run_with_arrivals(engine, prompts, params) == alone
    assert_no_leak(engine)


def test_chunked_prefill_equals_each_alone(moe_ckpt, alone):
    engine = make_engine(moe_ckpt, max_num_seqs=8, max_num_batched_tokens=8)
    prompts, params = workload()
    outs = engine.generate(prompt_token_ids=prompts, sampling_params=params)
    assert [o.token_ids for o in outs] == alone
    assert_no_leak(engine)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_forced_preemption_gives_identical_results(moe_ckpt, alone, async_scheduling):
    # 80 tokens of KV for 32 requests (asynchronous stepping frees finished blocks a step later, so it
    # admits differently; this size preempts in both modes)
    engine = make_engine(moe_ckpt, num_kv_blocks=20, max_model_len=64, max_num_seqs=16,
                         async_scheduling=async_scheduling)
    prompts, params = workload()
    outs = engine.generate(prompt_token_ids=prompts, sampling_params=params)
    assert engine.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outs] == alone
    assert_no_leak(engine)


def test_prefix_cache_hits_give_identical_results_and_skip_prefill(moe_ckpt):
    header = [(j * 11) % 490 + 6 for j in range(20)]      # a shared few-shot header: 5 full blocks of 4
    prompts = [header + [100 + i, 200 + i, 300 + i] for i in range(4)]
    params = SamplingParams(max_new_tokens=6, temperature=0, repetition_penalty=1.0, ignore_eos=True)
    cold = make_engine(moe_ckpt, enable_prefix_caching=False)
    expected = [cold.generate(prompt_token_ids=[p], sampling_params=params)[0].token_ids for p in prompts]
    warm = make_engine(moe_ckpt)
    first = warm.generate(prompt_token_ids=prompts[:1], sampling_params=params)[0]
    assert first.metrics.num_cached_prompt_tokens == 0
    rest = warm.generate(prompt_token_ids=prompts[1:], sampling_params=params)
    assert [first.token_ids] + [o.token_ids for o in rest] == expected
    assert all(o.metrics.num_cached_prompt_tokens == 20 for o in rest)
    assert warm.stats()["prefix_cache_hit_rate"] > 0.5
    assert_no_leak(warm)


def test_prefix_cache_never_serves_uncomputed_blocks(moe_ckpt):
    """Two identical long prompts admitted in the same step under a small token budget: the second must not
    read blocks the first has not yet computed."""
    prompt = [(j * 7) % 490 + 6 for j in range(40)]
    params = SamplingParams(max_new_tokens=5, temperature=0, repetition_penalty=1.0, ignore_eos=True)
    expected = make_engine(moe_ckpt, enable_prefix_caching=False).generate(
        prompt_token_ids=[prompt], sampling_params=params)[0].token_ids
    engine = make_engine(moe_ckpt, max_num_batched_tokens=12, max_num_seqs=4)   # budget >= max_num_seqs
    outs = engine.generate(prompt_token_ids=[prompt, prompt, prompt], sampling_params=params)
    assert [o.token_ids for o in outs] == [expected] * 3
    assert_no_leak(engine)


def test_abort_frees_every_block(moe_ckpt):
    engine = make_engine(moe_ckpt)
    ids = [engine.add_request(None, SamplingParams(max_new_tokens=50, ignore_eos=True), prompt_token_ids=[9] * 30)
           for _ in range(3)]
    engine.step()
    engine.step()
    assert engine.block_manager.num_free_blocks < engine.block_manager.num_blocks
    for rid in ids:
        engine.abort(rid)
    assert all(engine.get_output(rid).finish_reason == "abort" for rid in ids)
    assert_no_leak(engine)


def test_block_manager_reference_counts():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = Sequence(0, None, list(range(10, 22)), GREEDY, seed=0, max_tokens=64)   # 12 tokens: 3 blocks
    bm.allocate(a)
    a.num_computed_tokens = 12
    bm.register_computed_blocks(a)
    b = Sequence(1, None, list(range(10, 22)) + [5], GREEDY, seed=0, max_tokens=64)
    bm.allocate(b)                      # shares a's 3 full blocks, adds one
    assert b.block_table[:3] == a.block_table and b.num_computed_tokens == 12
    assert bm.num_free_blocks == 8 - 4
    bm.free(a)
    assert bm.num_free_blocks == 8 - 4  # still held by b
    bm.free(b)
    assert bm.num_free_blocks == 8
