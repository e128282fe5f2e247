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


# ---- defect 10: a queued request holds storage for its tokens, not for max_new_tokens ------------------

def _bytes_held(seq) -> int:
    import numpy as np
    import torch
    held = 0
    for value in vars(seq).values():
        if isinstance(value, torch.Tensor):
            held += value.untyped_storage().nbytes()
        elif isinstance(value, np.ndarray):
            held += value.nbytes
        elif isinstance(value, list):
            held += 8 * len(value)
    return held


def test_queued_requests_do_not_preallocate_their_output(moe_ckpt):
    engine = make_engine(moe_ckpt, max_model_len=400)
    huge = SamplingParams(max_new_tokens=10 ** 9, temperature=0, ignore_eos=True)
    ids = [engine.add_request(None, huge, prompt_token_ids=[7, 8, 9]) for _ in range(3)]
    for request_id in ids:
        assert _bytes_held(engine._requests[request_id].seq) < 1000
    big = Sequence(0, None, [5, 6, 7], GREEDY, seed=0, max_tokens=10 ** 8)   # 800 MB if preallocated
    assert _bytes_held(big) < 1000


# ---- defect 1: a step of one-token rows where one row is a non-final prefill chunk ---------------------

def test_token_budget_below_max_num_seqs_is_refused(moe_ckpt):
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        make_engine(moe_ckpt, max_num_seqs=8, max_num_batched_tokens=4)


# ---- defects 6 and 7: a decode step's work does not grow with context, nor its ops with the batch ------

class StubModel:
    """Stands in for the model's compute: fixed hidden states and logits (a stub, for counting host work)."""

    def __init__(self, engine, seed=0):
        import torch
        self.engine = engine
        vocab = engine.config.vocab_size
        self.logits_table = torch.randn((engine.runner.max_num_seqs * 4, vocab),
                                        generator=torch.Generator().manual_seed(seed))
        engine.model.forward = lambda input_ids, positions, meta, kv: input_ids[:, None].float()
        engine.model.compute_logits = lambda hidden: self.logits_table[:hidden.shape[0]]


def _ops_in_one_decode_step(engine):
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            outs = out if isinstance(out, (tuple, list)) else [out]
            self.calls.append((str(func), [tuple(o.shape) for o in outs if hasattr(o, "shape")],
                               [o.dtype for o in outs if hasattr(o, "dtype")]))
            return out
    with Record() as record:
        engine.step()
    return record.calls


def _decoding_engine(moe_ckpt, batch, prompt_len, params, **kw):
    engine = make_engine(moe_ckpt, max_model_len=512, num_kv_blocks=1024, max_num_seqs=16,
                         max_num_batched_tokens=4096, **kw)
    StubModel(engine)
    for prompt in prompts_of_lengths([prompt_len] * batch):
        engine.add_request(None, params, prompt_token_ids=prompt)
    for _ in range(3):          # prefill, then decode steps
        engine.step()
    assert all(s.num_computed_tokens >= prompt_len for s in engine.scheduler.running)
    return engine


def test_logprobs_cost_the_same_ops_for_any_batch(moe_ckpt):
    params = SamplingParams(max_new_tokens=50, temperature=0.7, top_k=20, top_p=0.9, logprobs=5, seed=1,
                            repetition_penalty=1.1, ignore_eos=True)
    counts = [len(_ops_in_one_decode_step(_decoding_engine(moe_ckpt, b, 8, params))) for b in (2, 8)]
    assert counts[0] == counts[1], counts


def test_repetition_penalty_state_is_not_rebuilt_from_the_history(moe_ckpt):
    import torch
    params = SamplingParams(max_new_tokens=50, temperature=0, repetition_penalty=1.1, ignore_eos=True)
    batch, context = 4, 300
    engine = _decoding_engine(moe_ckpt, batch, context, params)
    for name, shapes, dtypes in _ops_in_one_decode_step(engine):
        for shape, dtype in zip(shapes, dtypes):
            if not dtype.is_floating_point and dtype != torch.bool:
                numel = 1
                for d in shape:
                    numel *= d
                assert numel < batch * context, (name, shape)    # no [B, context] token history


# ---- defect 8: the warm-up that sizes the KV cache runs the largest step, sampler included --------------

def test_warm_up_runs_the_largest_step_with_sampling(moe_ckpt, monkeypatch):
    import torch
    from xverse_engine.engine import model_runner
    engine = make_engine(moe_ckpt, max_model_len=32, max_num_seqs=4, max_num_batched_tokens=80)
    forwards, samples = [], []
    real_forward, real_sample = engine.model.forward, model_runner.sample
    engine.model.forward = lambda ids, pos, meta, kv: (forwards.append(meta), real_forward(ids, pos, meta, kv))[1]
    monkeypatch.setattr(model_runner, "sample", lambda logits, batch, *kernels: (
        samples.append((logits.shape, batch)), real_sample(logits, batch, *kernels))[1])
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    engine.runner._warm_up()
    assert len(forwards) == 1
    lengths = (forwards[0].query_start_loc[1:] - forwards[0].query_start_loc[:-1]).tolist()
    assert sum(lengths) == 80 and max(lengths) <= 32 and len(lengths) <= 4
    assert len(samples) == 1
    shape, batch = samples[0]
    assert shape[0] == len(lengths)
    assert not batch.all_greedy and batch.any_top_k and batch.any_top_p and batch.num_logprobs == 20
    assert batch.repetition_penalties.ne(1).all()


# ---- defect 1 and the replay's static buffers (issue 15), on the CPU --------------------------------------

def _graph_engine(moe_ckpt, **kw):
    """An engine whose decode steps take the CUDA-graph replay path, replayed eagerly (no GPU needed)."""
    engine = make_engine(moe_ckpt, **kw)
    engine.runner.enable_decode_graphs(capture=False)
    return engine


def test_replay_fill_resets_padding_rows(moe_ckpt):
    import torch

    from xverse_engine.layers.attention import AttentionMetadata
    graphs = _graph_engine(moe_ckpt, max_num_seqs=4, max_num_batched_tokens=8).runner.decode_graphs

    def decode_inputs(batch):
        meta = AttentionMetadata(slot_mapping=torch.arange(10, 10 + batch), block_tables=torch.ones((batch, 3),
                                 dtype=torch.int32), context_lens=torch.full((batch,), 9, dtype=torch.int32),
                                 query_start_loc=torch.arange(batch + 1, dtype=torch.int32), is_decode=True)
        return torch.arange(100, 100 + batch), torch.full((batch,), 8), meta
    assert graphs.fill(*decode_inputs(4)) == 4
    assert graphs.fill(*decode_inputs(3)) == 4                      # 3 rows replay in the bucket of 4
    s = graphs.static
    assert s["slot_mapping"].tolist() == [10, 11, 12, -1]           # the padding row writes no KV
    assert s["context_lens"].tolist() == [9, 9, 9, 0]               # and attends to nothing
    assert s["input_ids"].tolist() == [100, 101, 102, 0] and s["positions"].tolist() == [8, 8, 8, 0]


def test_graph_replay_with_a_non_sampling_row_equals_each_alone(moe_ckpt):
    """Budget == max_num_seqs: three sequences decode and a new prompt gets a one-token (non-final) chunk,
    so every row has one new token (the decode graph runs) but one row does not sample."""
    params = SamplingParams(max_new_tokens=8, temperature=0.8, top_k=40, seed=5, repetition_penalty=1.1,
                            ignore_eos=True)
    prompts = prompts_of_lengths([2, 3, 2, 11])
    alone = [make_engine(moe_ckpt).generate(prompt_token_ids=[p], sampling_params=params)[0].token_ids
             for p in prompts]
    engine = _graph_engine(moe_ckpt, max_num_seqs=4, max_num_batched_tokens=4)
    replays = []
    run = engine.runner.decode_graphs.run
    engine.runner.decode_graphs.run = lambda ids, pos, meta: (replays.append(ids.shape[0]), run(ids, pos, meta))[1]
    mixed_steps = []
    schedule = engine.scheduler.schedule

    def recording_schedule():
        items = schedule()
        if items and all(i.num_new_tokens == 1 for i in items) and not all(i.samples for i in items):
            mixed_steps.append(len(items))
        return items
    engine.scheduler.schedule = recording_schedule
    ids = [engine.add_request(None, params, prompt_token_ids=p) for p in prompts[:3]]
    engine.step()
    engine.step()
    ids.append(engine.add_request(None, params, prompt_token_ids=prompts[3]))
    while engine.has_unfinished():
        engine.step()
    assert mixed_steps and replays
    assert [engine.get_output(i).token_ids for i in ids] == alone


def test_graph_replay_of_padded_batches_equals_eager(moe_ckpt):
    """Batches of 1..5 sequences replay in buckets of 1, 2, 4, 8: padding rows must never disturb the KV."""
    params = [SamplingParams(max_new_tokens=2 + 3 * i, temperature=0, repetition_penalty=1.1, ignore_eos=True)
              for i in range(5)]
    prompts = prompts_of_lengths([3, 9, 4, 7, 5])
    eager = make_engine(moe_ckpt, max_num_seqs=8).generate(prompt_token_ids=prompts, sampling_params=params)
    graphed = _graph_engine(moe_ckpt, max_num_seqs=8).generate(prompt_token_ids=prompts, sampling_params=params)
    assert [o.token_ids for o in graphed] == [o.token_ids for o in eager]


# ---- asynchronous scheduling gives exactly the tokens of synchronous stepping ---------------------------

def _mixed_workload(tokenizer_text: bool):
    prompts = prompts_of_lengths([3, 17, 6, 30, 9, 4, 22, 12, 5, 14])
    params = []
    for i in range(len(prompts)):
        kind = i % 5
        if kind == 0:
            params.append(SamplingParams(max_new_tokens=7, temperature=0, repetition_penalty=1.1, ignore_eos=True))
        elif kind == 1:
            params.append(SamplingParams(max_new_tokens=9, temperature=0.9, top_k=30, top_p=0.85, seed=i,
                                         logprobs=3, ignore_eos=True))
        elif kind == 2:
            params.append(SamplingParams(max_new_tokens=12, temperature=0.7, seed=i, repetition_penalty=1.2))
        elif kind == 3:
            params.append(SamplingParams(max_new_tokens=10, temperature=0, top_p=0.5, stop_token_ids=[71, 200],
                                         logprobs=0))
        else:
            params.append(SamplingParams(max_new_tokens=1 + i % 4, temperature=1.2, top_p=0.7, seed=i,
                                         ignore_eos=True))
    return prompts, params


def _outputs(engine, prompts, params):
    outs = engine.generate(prompt_token_ids=prompts, sampling_params=params)
    return [(o.token_ids, o.finish_reason, o.text, [(e.token_id, e.logprob, sorted(e.top)) for e in o.logprobs or []])
            for o in outs]


def _same_outputs(a, b):
    """Equal tokens, texts, reasons and top-n ids; logprobs to 1e-4 (a preempted sequence recomputes its KV
    in a prefill, which rounds differently)."""
    assert [(t, r, x, [(i, top) for i, _, top in lp]) for t, r, x, lp in a] == \
        [(t, r, x, [(i, top) for i, _, top in lp]) for t, r, x, lp in b]
    for (*_, la), (*_, lb) in zip(a, b):
        assert [v for _, v, _ in la] == pytest.approx([v for _, v, _ in lb], abs=1e-4)


@pytest.mark.parametrize("setting", [dict(), dict(num_kv_blocks=20, max_model_len=64, max_num_seqs=8),
                                     dict(max_num_seqs=4, max_num_batched_tokens=6)])
def test_async_scheduling_equals_synchronous(moe_ckpt, setting):
    """Penalties, top-k/top-p, seeds, stop ids, logprobs, max_tokens; plain, under preemption, chunked."""
    prompts, params = _mixed_workload(False)
    sync = _outputs(make_engine(moe_ckpt, async_scheduling=False, **setting), prompts, params)
    engine = make_engine(moe_ckpt, async_scheduling=True, **setting)
    _same_outputs(_outputs(engine, prompts, params), sync)
    if "num_kv_blocks" in setting:
        assert engine.scheduler.num_preemptions > 0
    assert not engine.has_unfinished()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_async_stop_strings_and_max_tokens_are_exact(moe_ckpt):
    engine = make_engine(moe_ckpt, async_scheduling=False)
    prompt = "北京的景点：故宫"
    free = engine.generate([prompt], SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True))[0]
    assert len(free.text) >= 4, free.text
    stop = free.text[2:4]
    params = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True, stop=[stop])
    sync = engine.generate([prompt, prompt], [params, SamplingParams(max_new_tokens=3, temperature=0)])
    engine = make_engine(moe_ckpt, async_scheduling=True)
    outs = engine.generate([prompt, prompt], [params, SamplingParams(max_new_tokens=3, temperature=0)])
    assert [(o.text, o.token_ids, o.finish_reason) for o in outs] == \
        [(o.text, o.token_ids, o.finish_reason) for o in sync]
    assert outs[0].finish_reason == "stop" and outs[0].text == free.text[:free.text.index(stop)]
    assert len(outs[1].token_ids) <= 3
    streamed = "".join(d.text for d in engine.stream(prompt, params))
    assert streamed == outs[0].text


def test_abort_while_a_step_is_in_flight(moe_ckpt):
    engine = make_engine(moe_ckpt)
    params = SamplingParams(max_new_tokens=30, temperature=0, ignore_eos=True)
    keep, drop = (engine.add_request(None, params, prompt_token_ids=p) for p in prompts_of_lengths([5, 6]))
    for _ in range(3):
        engine.step()
    engine.abort(drop)
    tokens_at_abort = list(engine.get_output(drop, release=False).token_ids)
    while engine.has_unfinished():
        engine.step()
    assert engine.get_output(drop).token_ids == tokens_at_abort and engine.stats()["running"] == 0
    alone = make_engine(moe_ckpt).generate(prompt_token_ids=prompts_of_lengths([5]), sampling_params=params)[0]
    assert engine.get_output(keep).token_ids == alone.token_ids
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_steady_decode_uploads_the_fixed_inputs_once(moe_ckpt, monkeypatch):
    """While the same sequences decode, their rows, query starts and sampling settings are worked out and
    uploaded once, not every step."""
    from xverse_engine.engine.input_batch import InputBatch
    fixes = []
    real_fix = InputBatch._fix
    monkeypatch.setattr(InputBatch, "_fix", lambda self, *a: fixes.append(1) or real_fix(self, *a))
    engine = make_engine(moe_ckpt)
    params = SamplingParams(max_new_tokens=40, temperature=0.8, top_k=20, top_p=0.9, seed=3, ignore_eos=True)
    outs = engine.generate(prompt_token_ids=prompts_of_lengths([5, 7, 6]), sampling_params=params)
    assert [len(o.token_ids) for o in outs] == [40] * 3
    assert len(fixes) <= 4, len(fixes)     # the prompt step, the first decode step, and no more


@pytest.mark.parametrize("zero_copy", [True, False])   # False: the slicing of the device copy (GPU path)
def test_packed_upload_returns_each_array_in_its_dtype_and_shape(zero_copy):
    import numpy as np
    import torch

    from xverse_engine.engine.input_batch import InputBatch
    batch = InputBatch(4, 8, 16, 32, "cpu")
    longs = [[7, 8, 9], None, np.arange(5) * 3, np.array([], dtype=np.int64)]
    ints = [np.array([1, 2, 3]), np.arange(21, dtype=np.int32).reshape(3, 7), np.array([-5], dtype=np.int32)]
    out_longs, out_ints = batch.upload_packed(longs, ints, zero_copy=zero_copy)
    assert out_longs[1] is None
    for got, want in zip(out_longs[:1] + out_longs[2:], [longs[0], longs[2], longs[3]]):
        assert got.dtype == torch.int64 and got.tolist() == list(want)
    for got, want in zip(out_ints, ints):
        assert got.dtype == torch.int32 and got.shape == want.shape and got.tolist() == want.tolist()


def test_a_row_that_changes_hands_takes_its_new_sequences_settings(moe_ckpt):
    """With one row, each request decodes in the row the previous one left: each must keep its own
    temperature, seed and penalty, exactly as when it runs alone."""
    params = [SamplingParams(max_new_tokens=8, temperature=0, repetition_penalty=1.0, ignore_eos=True),
              SamplingParams(max_new_tokens=8, temperature=1.5, seed=11, ignore_eos=True),
              SamplingParams(max_new_tokens=8, temperature=0, repetition_penalty=2.0, ignore_eos=True)]
    prompts = prompts_of_lengths([5, 5, 5])
    together = make_engine(moe_ckpt, max_num_seqs=1).generate(prompt_token_ids=prompts, sampling_params=params)
    alone = [make_engine(moe_ckpt).generate(prompt_token_ids=[p], sampling_params=s)[0]
             for p, s in zip(prompts, params)]
    assert [o.token_ids for o in together] == [o.token_ids for o in alone]
    assert len({tuple(o.token_ids) for o in together}) == 3


def test_a_penalty_below_one_in_the_batch_turns_the_penalty_shortcut_off(moe_ckpt):
    from xverse_engine.engine import model_runner
    params = [SamplingParams(max_new_tokens=8, temperature=0, repetition_penalty=p, ignore_eos=True)
              for p in (0.7, 1.3)]
    prompts = prompts_of_lengths([5, 6])
    flags, real = [], model_runner.sample
    model_runner.sample = lambda logits, batch, *kernels: (flags.append(batch.penalties_at_least_one),
                                                          real(logits, batch, *kernels))[1]
    try:
        together = make_engine(moe_ckpt).generate(prompt_token_ids=prompts, sampling_params=params)
        assert set(flags) == {False}
        flags.clear()
        alone = make_engine(moe_ckpt).generate(prompt_token_ids=prompts[1:], sampling_params=params[1])
        assert set(flags) == {True}
    finally:
        model_runner.sample = real
    assert together[1].token_ids == alone[0].token_ids


def test_penalty_mask_holds_exactly_the_tokens_seen(moe_ckpt):
    import torch
    engine = make_engine(moe_ckpt, async_scheduling=False, num_kv_blocks=24, max_model_len=64, max_num_seqs=8)
    params = SamplingParams(max_new_tokens=12, temperature=0, repetition_penalty=1.3, ignore_eos=True)
    for prompt in prompts_of_lengths([5, 9, 13, 7, 11, 6]):
        engine.add_request(None, params, prompt_token_ids=prompt)
    checked = 0
    while engine.has_unfinished():
        engine.step()
        for seq in engine.scheduler.running:
            if seq.row >= 0 and not seq.num_pending:
                seen = torch.nonzero(engine.runner.batch.seen[seq.row]).flatten().tolist()
                assert seen == sorted(set(seq.token_ids)), seq.request_id
                checked += 1
    assert checked > 10 and engine.scheduler.num_preemptions > 0


# ---- sampling on the device without a full-vocabulary sort (issue 12) ------------------------------------

def _reference_draw(logits, batch):
    """The full-vocabulary definition: penalty, temperature, top-k, top-p by one sort, Gumbel over all V."""
    import torch

    from xverse_engine.layers.sampler import apply_repetition_penalty_mask, filter_top_k_top_p, gumbel_noise
    logits = apply_repetition_penalty_mask(logits, batch.seen_mask, batch.repetition_penalties)
    greedy = logits.argmax(-1)
    scaled = logits / torch.where(batch.temperatures > 0, batch.temperatures, 1.0)[:, None]
    scaled = filter_top_k_top_p(scaled, batch.top_ks, batch.top_ps, True, True)
    drawn = (scaled + gumbel_noise(batch.seeds, batch.steps, logits.shape[-1])).argmax(-1)
    return torch.where(batch.temperatures > 0, drawn, greedy)


def _random_batch(rows, vocab, top_ks, top_ps, seed=0):
    import torch

    from xverse_engine.layers.sampler import SamplingBatch
    g = torch.Generator().manual_seed(seed)
    temps = torch.tensor([0.0 if i % 7 == 3 else 0.5 + (i % 4) * 0.3 for i in range(rows)])
    return torch.randn((rows, vocab), generator=g) * 3, SamplingBatch(
        temperatures=temps, top_ks=torch.tensor(top_ks), top_ps=torch.tensor(top_ps),
        repetition_penalties=torch.full((rows,), 1.2), seeds=torch.arange(rows) * 7919, steps=torch.arange(rows),
        seen_mask=torch.rand((rows, vocab), generator=g) < 0.05, all_greedy=False,
        any_top_k=any(k > 0 for k in top_ks), any_top_p=any(p < 1 for p in top_ps))


def _count_sorts(fn):
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        sorts, topk_widths = 0, []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if "sort" in str(func):
                Count.sorts += 1
            if "topk" in str(func):
                Count.topk_widths.append(args[1])
            return func(*args, **(kwargs or {}))
    with Count():
        out = fn()
    return out, Count.sorts, Count.topk_widths


@pytest.mark.parametrize("vocab", [50, 1000])
def test_top_k_sampler_equals_the_full_sort_definition_without_sorting(vocab):
    from xverse_engine.layers.sampler import sample
    rows = 64
    top_ks = [(5, 17, 1, 40, 0)[i % 5] for i in range(rows)]
    top_ps = [(1.0, 0.9, 0.5, 1.0, 1.0, 0.75, 0.3)[i % 7] for i in range(rows)]
    top_ps = [p if k > 0 else 1.0 for p, k in zip(top_ps, top_ks)]      # top-p only with top-k: no sort
    for seed in range(5):
        logits, batch = _random_batch(rows, vocab, top_ks, top_ps, seed)
        batch.num_candidates = min(max(top_ks), vocab)
        (tokens, _), sorts, widths = _count_sorts(lambda: sample(logits, batch))
        assert tokens.tolist() == _reference_draw(logits, batch).tolist()
        assert sorts == 0 and widths == [min(40, vocab)]


def test_top_p_without_top_k_falls_back_to_an_exact_full_sort():
    from xverse_engine.layers.sampler import sample
    rows, vocab = 32, 300
    top_ks = [0, 10] * (rows // 2)
    top_ps = [0.8, 0.6, 1.0, 0.95] * (rows // 4)
    for seed in range(5):
        logits, batch = _random_batch(rows, vocab, top_ks, top_ps, seed)
        batch.num_candidates = vocab      # what the engine passes when a row has top-p without top-k
        tokens, _ = sample(logits, batch)
        assert tokens.tolist() == _reference_draw(logits, batch).tolist()


def test_engine_asks_for_the_top_k_width_only(moe_ckpt):
    engine = make_engine(moe_ckpt)
    StubModel(engine)
    seen = []
    from xverse_engine.engine import model_runner
    real = model_runner.sample
    model_runner.sample = lambda logits, batch, *kernels: (seen.append(batch.num_candidates),
                                                          real(logits, batch, *kernels))[1]
    try:
        engine.generate(prompt_token_ids=prompts_of_lengths([4, 5]), sampling_params=[
            SamplingParams(max_new_tokens=3, temperature=1.0, top_k=30, top_p=0.85, seed=1, ignore_eos=True),
            SamplingParams(max_new_tokens=3, temperature=1.0, top_k=7, seed=2, ignore_eos=True)])
        engine.generate(prompt_token_ids=prompts_of_lengths([4]), sampling_params=SamplingParams(
            max_new_tokens=2, temperature=1.0, top_p=0.9, top_k=0, seed=1, ignore_eos=True))
    finally:
        model_runner.sample = real
    assert seen == [30] * 3 + [engine.config.vocab_size] * 2


# ---- detokenisation is linear in the output ---------------------------------------------------------------

def test_detokenisation_decodes_each_token_through_a_short_window(moe_ckpt):
    from xverse_engine.engine.detokenizer import OutputText
    from xverse_engine.tokenizer import Tokenizer
    tokenizer = Tokenizer(str(moe_ckpt))
    text = "北京的景点：故宫、天坛、万里长城等。深圳 Hello, world 123! " * 60
    ids = tokenizer.encode(text)
    windows = []
    decode = tokenizer.decode
    tokenizer.decode = lambda window, **kw: (windows.append(len(window)), decode(window, **kw))[1]
    out = OutputText(tokenizer, ["never appears"], prompt_token_ids=[])
    deltas = []
    for token in ids:
        out.add(token)
        deltas.append(out.take_delta(final=False))
    deltas.append(out.take_delta(final=True))
    tokenizer.decode = decode
    assert "".join(deltas) == out.text == decode(ids)
    assert len(windows) <= 2 * len(ids) and max(windows) <= 16      # O(1) work per token, whatever the length


def test_stop_string_found_late_in_a_long_output(moe_ckpt):
    from xverse_engine.engine.detokenizer import OutputText
    from xverse_engine.tokenizer import Tokenizer
    tokenizer = Tokenizer(str(moe_ckpt))
    text = "abc xyz, " * 200 + "the END marker" + " tail" * 5
    ids = tokenizer.encode(text)
    out = OutputText(tokenizer, ["END", "zzz"], prompt_token_ids=[])
    streamed, stopped_at = [], None
    for i, token in enumerate(ids):
        if out.add(token):
            stopped_at = i
            break
        streamed.append(out.take_delta(final=False))
    streamed.append(out.take_delta(final=True))
    assert stopped_at is not None and out.text == text[:text.index("END")]
    assert "".join(streamed) == out.text
