"""Engine.generate / stream as a user sees them: batching, sampling, stops, logprobs, bad requests."""
import pytest

from xverse_engine import Engine, SamplingParams

GREEDY = SamplingParams(max_new_tokens=8, temperature=0, repetition_penalty=1.0, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(moe_ckpt):
    return Engine(str(moe_ckpt), device="cpu", kernels="torch", num_kv_blocks=128, block_size=8,
                  show_progress=False)


def prompts_of_lengths(lengths, vocab=500):
    return [[(i * 31 + j * 7) % (vocab - 6) + 6 for j in range(n)] for i, n in enumerate(lengths)]


def test_batch_of_mixed_lengths_equals_each_alone(engine):
    prompts = prompts_of_lengths([1, 3, 8, 9, 17, 30, 5, 12])
    together = engine.generate(prompt_token_ids=prompts, sampling_params=GREEDY)
    for prompt, out in zip(prompts, together):
        alone = engine.generate(prompt_token_ids=[prompt], sampling_params=GREEDY)[0]
        assert out.token_ids == alone.token_ids
        assert out.finish_reason == "length" and len(out.token_ids) == 8


def test_seeded_sampling_repeats_and_ignores_batch_company(engine):
    prompt = prompts_of_lengths([10])[0]
    params = SamplingParams(max_new_tokens=12, temperature=1.0, top_k=50, top_p=0.9, seed=1234, ignore_eos=True)
    first = engine.generate(prompt_token_ids=[prompt], sampling_params=params)[0].token_ids
    again = engine.generate(prompt_token_ids=[prompt], sampling_params=params)[0].token_ids
    others = prompts_of_lengths([4, 22, 7])
    unseeded = SamplingParams(max_new_tokens=12, temperature=1.0, ignore_eos=True)
    in_batch = engine.generate(prompt_token_ids=others + [prompt], sampling_params=[unseeded] * 3 + [params])
    assert first == again == in_batch[-1].token_ids
    other_seed = engine.generate(prompt_token_ids=[prompt], sampling_params=SamplingParams(
        max_new_tokens=12, temperature=1.0, top_k=50, top_p=0.9, seed=99, ignore_eos=True))[0].token_ids
    assert other_seed != first


def test_sampling_follows_top_k(engine):
    """With top_k=1 sampling at any temperature is greedy."""
    prompt = prompts_of_lengths([6])[0]
    greedy = engine.generate(prompt_token_ids=[prompt], sampling_params=GREEDY)[0].token_ids
    top1 = engine.generate(prompt_token_ids=[prompt], sampling_params=SamplingParams(
        max_new_tokens=8, temperature=5.0, top_k=1, repetition_penalty=1.0, seed=3, ignore_eos=True))[0].token_ids
    assert top1 == greedy


def test_stop_token_ids_and_eos(engine):
    prompt = prompts_of_lengths([9])[0]
    free = engine.generate(prompt_token_ids=[prompt], sampling_params=GREEDY)[0].token_ids
    stop_at = free[3]
    out = engine.generate(prompt_token_ids=[prompt], sampling_params=SamplingParams(
        max_new_tokens=8, temperature=0, repetition_penalty=1.0, ignore_eos=True, stop_token_ids=[stop_at]))[0]
    assert out.finish_reason == "stop"
    assert out.token_ids == free[:free.index(stop_at) + 1]
    eos = engine.config.eos_token_id
    with_eos = engine.generate(prompt_token_ids=[prompt], sampling_params=SamplingParams(
        max_new_tokens=8, temperature=0, repetition_penalty=1.0))[0]
    if eos in free:
        assert with_eos.token_ids == free[:free.index(eos) + 1] and with_eos.finish_reason == "stop"
    else:
        assert with_eos.token_ids == free and with_eos.finish_reason == "length"


def test_stop_strings_cut_text_and_streaming_holds_them_back(engine):
    prompt = "北京的景点：故宫"
    base = engine.generate([prompt], GREEDY)[0]
    assert len(base.text) >= 3, base.text
    stop = base.text[1:3]
    params = SamplingParams(max_new_tokens=8, temperature=0, repetition_penalty=1.0, ignore_eos=True, stop=[stop])
    out = engine.generate([prompt], params)[0]
    assert out.finish_reason == "stop"
    assert out.text == base.text[:base.text.index(stop)]
    streamed = "".join(d.text for d in engine.stream(prompt, params))
    assert streamed == out.text


def test_stream_deltas_concatenate_to_generate_text(engine):
    prompts = ["Hello, world", "深圳的景点：", "The capital"]
    params = SamplingParams(max_new_tokens=10, temperature=0, ignore_eos=True)
    outs = engine.generate(prompts, params)
    texts, tokens, finished = [""] * 3, [[] for _ in prompts], [None] * 3
    for delta in engine.stream(prompts, params):
        texts[delta.index] += delta.text
        tokens[delta.index] += delta.token_ids
        if delta.finished:
            finished[delta.index] = delta.finish_reason
    assert texts == [o.text for o in outs]
    assert tokens == [o.token_ids for o in outs]
    assert finished == ["length"] * 3


def test_closing_a_stream_early_aborts_and_frees_blocks(engine):
    stream = engine.stream(["Hello", "World"], SamplingParams(max_new_tokens=50, ignore_eos=True))
    next(stream)
    stream.close()
    assert not engine.has_unfinished()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_logprobs_are_log_softmax_of_the_model(engine):
    prompt = prompts_of_lengths([5])[0]
    out = engine.generate(prompt_token_ids=[prompt], sampling_params=SamplingParams(
        max_new_tokens=3, temperature=0, repetition_penalty=1.0, ignore_eos=True, logprobs=4))[0]
    assert len(out.logprobs) == 3
    for step, entry in zip(out.token_ids, out.logprobs):
        assert entry.token_id == step
        assert len(entry.top) == 4
        assert max(entry.top.values()) == pytest.approx(entry.logprob)  # greedy picks the top token
        assert all(v <= 0 for v in entry.top.values())


def test_defaults_come_from_generation_config(engine):
    params = SamplingParams().resolved(engine.generation_config)
    assert params.temperature == 0.0            # do_sample: false
    assert params.repetition_penalty == 1.1
    assert params.top_k == 30 and params.top_p == 0.85
    assert SamplingParams(temperature=0.7).resolved(engine.generation_config).temperature == 0.7


def test_bad_request_fails_alone(engine):
    too_long = [7] * engine.max_model_len
    good = prompts_of_lengths([4])[0]
    outs = engine.generate(prompt_token_ids=[good, too_long, [], [10 ** 9]], sampling_params=GREEDY)
    assert outs[0].finish_reason == "length" and len(outs[0].token_ids) == 8
    assert outs[1].finish_reason == "error" and "max_model_len" in outs[1].error
    assert outs[2].finish_reason == "error" and "empty" in outs[2].error
    assert outs[3].finish_reason == "error" and "vocabulary" in outs[3].error
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_max_model_len_caps_generation(moe_ckpt):
    engine = Engine(str(moe_ckpt), device="cpu", kernels="torch", num_kv_blocks=8, block_size=8, max_model_len=24,
                    show_progress=False)
    out = engine.generate(prompt_token_ids=[list(range(10, 30))], sampling_params=GREEDY)[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 4


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_k=-2), dict(max_new_tokens=0),
                                 dict(repetition_penalty=0), dict(logprobs=100), dict(stop=[""])])
def test_bad_sampling_params_name_the_field(bad):
    with pytest.raises(ValueError, match=list(bad)[0]):
        SamplingParams(**bad)
