"""How output travels from the engine to a stream: Engine.take_delta hands out each token, logprob and character
exactly once (and nothing after the request finished), and the server's mailboxes merge the deltas a slow
handler missed into one, so a stream that falls behind still says exactly what offline generation says."""
import asyncio
import json
import threading

import pytest

from xverse_engine import Engine, SamplingParams
from xverse_engine.server.engine_loop import Delta, EngineLoop, RequestGroup

PROMPTS = ["北京的景点：", "The capital of France is", "Hello", "深圳的景点："]


@pytest.fixture(scope="module")
def engine():
    return Engine(device="cpu", kernels="cpu", num_kv_blocks=128, block_size=8, max_model_len=256,
                  show_progress=False)


def greedy(max_tokens=24, **extra):
    return SamplingParams(max_new_tokens=max_tokens, temperature=0, **extra)


def run_taking_deltas(engine, prompts, params, take_every=1):
    """Steps the engine by hand, taking deltas of touched requests only every `take_every` steps (a consumer that
    falls behind); returns per prompt the list of deltas it got."""
    ids = [engine.add_request(p, params) for p in prompts]
    deltas = {i: [] for i in ids}
    untaken, step = set(), 0
    while engine.has_unfinished() or untaken:
        untaken.update(engine.step())
        step += 1
        if step % take_every == 0 or not engine.has_unfinished():
            for request_id in sorted(untaken):
                deltas[request_id].append(engine.take_delta(request_id))
            untaken.clear()
    return [deltas[i] for i in ids]


@pytest.mark.parametrize("take_every", [1, 3])
def test_take_delta_hands_out_each_token_once_and_equals_generate(engine, take_every):
    expected = engine.generate(PROMPTS, greedy())
    for deltas, out in zip(run_taking_deltas(engine, PROMPTS, greedy(), take_every), expected):
        assert [t for d in deltas for t in d.token_ids] == out.token_ids
        assert "".join(d.text for d in deltas) == out.text
        assert [d.finished for d in deltas] == [False] * (len(deltas) - 1) + [True]
        final = deltas[-1]
        assert final.finish_reason == out.finish_reason
        assert final.metrics.num_output_tokens == len(out.token_ids)
        assert all(d.metrics is None for d in deltas[:-1])
        if take_every > 1:
            assert len(deltas) < len(out.token_ids), "a late consumer gets merged deltas, not one per token"


def test_take_delta_without_text_leaves_decoding_to_the_caller(engine):
    """text=False (the engine in its own process: the HTTP side decodes): the same tokens, no text, and the
    caller's own OutputText over those tokens gives offline's text."""
    from xverse_engine.engine.detokenizer import OutputText
    expected = engine.generate(PROMPTS, greedy())
    ids = [engine.add_request(p, greedy()) for p in PROMPTS]
    decoders = {i: OutputText(engine.tokenizer, [], out.prompt_token_ids) for i, out in zip(ids, expected)}
    texts, tokens = {i: "" for i in ids}, {i: [] for i in ids}
    while engine.has_unfinished():
        for request_id in engine.step():
            delta = engine.take_delta(request_id, text=False)
            assert delta.text == ""
            tokens[request_id] += delta.token_ids
            decoders[request_id].source += delta.token_ids
            texts[request_id] += decoders[request_id].take_delta(final=delta.finished)
    assert [tokens[i] for i in ids] == [out.token_ids for out in expected]
    assert [texts[i] for i in ids] == [out.text for out in expected]


def test_nothing_is_handed_out_after_the_finished_delta(engine):
    request_id = engine.add_request("Hello", greedy(4))
    while engine.has_unfinished():
        engine.step()
    final = engine.take_delta(request_id)
    assert final.finished and len(final.token_ids) == 4
    with pytest.raises(KeyError, match="already finished"):
        engine.take_delta(request_id)


def test_take_delta_holds_back_a_possible_stop_string_start(engine):
    (free,) = engine.generate([PROMPTS[0]], greedy(16, ignore_eos=True))
    stop = free.text[len(free.text) // 2:len(free.text) // 2 + 2]   # surely reached: it is in the free text
    (expected,) = engine.generate([PROMPTS[0]], greedy(16, ignore_eos=True, stop=[stop]))
    assert expected.finish_reason == "stop"
    (deltas,) = run_taking_deltas(engine, [PROMPTS[0]], greedy(16, ignore_eos=True, stop=[stop]))
    shown = ""
    for delta in deltas:
        shown += delta.text
        assert expected.text.startswith(shown), "no delta may show text the final output does not have"
    assert shown == expected.text


def test_logprobs_come_once_per_token(engine):
    params = greedy(8, logprobs=2)
    (expected,) = engine.generate([PROMPTS[1]], params)
    (deltas,) = run_taking_deltas(engine, [PROMPTS[1]], params, take_every=2)
    got = [lp for d in deltas for lp in d.logprobs]
    assert [lp.token_id for lp in got] == expected.token_ids
    assert [lp.logprob for lp in got] == pytest.approx([lp.logprob for lp in expected.logprobs])


def test_an_aborted_request_ends_with_an_abort_delta(engine):
    request_id = engine.add_request("Hello", greedy(32))
    engine.step()
    engine.step()
    engine.abort(request_id)
    final = engine.take_delta(request_id)
    assert final.finished and final.finish_reason == "abort"
    with pytest.raises(KeyError):
        engine.take_delta(request_id)
    assert not engine.has_unfinished()


def test_a_handler_that_falls_behind_gets_one_merged_delta_equal_to_offline(engine):
    """The engine thread keeps stepping while the handler does not look; when it does, the mailbox holds the whole
    output as one delta: the coalescing that keeps a slow stream from costing one SSE chunk per token."""
    expected = engine.generate(PROMPTS, greedy())
    finished = []
    all_finished = threading.Event()

    def on_finished(delta):   # engine thread
        finished.append(delta)
        if len(finished) == len(expected):
            all_finished.set()

    loop_thread = EngineLoop(lambda: engine, on_finished=on_finished)

    async def scenario():
        group = RequestGroup([(out.prompt_token_ids, greedy()) for out in expected], asyncio.get_running_loop())
        loop_thread.start()
        assert loop_thread.wait_ready(60)
        loop_thread.submit(group)
        # every request runs to its end while the handler does not look at the group
        assert await asyncio.get_running_loop().run_in_executor(None, all_finished.wait, 120)
        return await group.next()

    try:
        ready = asyncio.run(asyncio.wait_for(scenario(), 120))
    finally:
        loop_thread.shutdown()
    assert [index for index, _ in ready] == list(range(len(expected)))
    for (_, delta), out in zip(ready, expected):
        assert delta.finished and delta.finish_reason == out.finish_reason
        assert delta.text == out.text and delta.token_ids == out.token_ids


# ---- how often a handler is woken --------------------------------------------------------------------------------
def delta(tokens: int, finished: bool = False):
    return Delta(text="x" * tokens, token_ids=[0] * tokens, finished=finished,
                 finish_reason="length" if finished else None)


def put(group: RequestGroup, index: int, d: Delta) -> bool:
    """What the engine thread does: leave the delta, and wake the handler if put() says so."""
    wake = group.put(index, d)
    if wake:
        RequestGroup.wake_all([group])
    return wake


def run(scenario):
    return asyncio.run(asyncio.wait_for(scenario(), 30))


def test_a_stream_is_woken_for_its_first_token_then_every_n_tokens_then_at_its_end():
    async def scenario():
        group = RequestGroup([([1], greedy())], asyncio.get_running_loop(), wake_every=3)
        wakes = [put(group, 0, delta(1))]        # the first token goes out at once
        await group.next()
        wakes += [put(group, 0, delta(1)), put(group, 0, delta(1)), put(group, 0, delta(1))]
        (_, three), = await group.next()
        wakes += [put(group, 0, delta(1)), put(group, 0, delta(0, finished=True))]   # the end goes out with the rest
        (_, last), = await group.next()
        return wakes, three, last

    wakes, three, last = run(scenario)
    assert wakes == [True, False, False, True, False, True]
    assert three.token_ids == [0, 0, 0] and last.finished and last.token_ids == [0]


def test_a_call_answered_at_once_is_woken_only_when_a_choice_ends():
    async def scenario():
        group = RequestGroup([([1], greedy()), ([2], greedy())], asyncio.get_running_loop(), wake_every=None)
        wakes = [put(group, 0, delta(1)), put(group, 1, delta(1)), put(group, 0, delta(2))]
        wakes.append(put(group, 1, delta(1, finished=True)))
        return wakes, await group.next()

    wakes, ready = run(scenario)
    assert wakes == [False, False, False, True]
    assert [(i, len(d.token_ids), d.finished) for i, d in ready] == [(0, 3, False), (1, 2, True)]


def test_stream_interval_sends_fewer_chunks_with_the_same_text(engine):
    pytest.importorskip("fastapi", reason="the [test] extra installs the [serve] extra")
    from serve_process import ServerProcess
    prompt = PROMPTS[1]
    (expected,) = engine.generate([prompt], greedy(24, ignore_eos=True))
    server = ServerProcess("--stream-interval", "4")
    try:
        sock = server.open_stream("/v1/completions", {"prompt": prompt, "max_tokens": 24, "temperature": 0,
                                                      "ignore_eos": True, "stream": True})
        body = server.read_until(sock, b"data: [DONE]").decode()
        sock.close()
    finally:
        assert server.stop() == 0, server.log
    chunks = [json.loads(line[len("data: "):]) for line in body.splitlines()
              if line.startswith("data: {")]
    assert "".join(c["choices"][0]["text"] for c in chunks) == expected.text
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    # 24 tokens: the first alone, then at most 4 per chunk, so about 1 + 23/4 chunks, not 24
    assert 6 <= len(chunks) <= 8, len(chunks)
