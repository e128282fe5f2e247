"""The OpenAI API of `python -m xverse_engine.serve`, driven by the official `openai` client against a real server
on 127.0.0.1: greedy outputs equal Engine.generate offline, usage numbers are right, 64 concurrent streams all
finish correctly, and clients that hang up leave no request running and no KV block held."""
import asyncio
import json

import pytest

openai = pytest.importorskip("openai", reason="the [test] extra installs openai")

from serve_process import ServerProcess, finished_count  # noqa: E402
from xverse_engine import Engine, SamplingParams  # noqa: E402
from xverse_engine.tokenizer import apply_chat_template  # noqa: E402

MODEL = "tiny-xverse-moe"
PROMPTS = ["The capital of France is", "北京的景点：故宫、天坛、万里长城等。\n深圳的景点：", "New York is", "Hello"]


@pytest.fixture(scope="module")
def server():
    process = ServerProcess()
    yield process
    assert process.stop() == 0, process.log


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def offline():
    return Engine(device="cpu", show_progress=False)


def greedy(max_tokens, **kw):
    return SamplingParams(max_new_tokens=max_tokens, temperature=0.0, **kw)


def check_usage(usage, outputs):
    assert usage.prompt_tokens == sum(len(o.prompt_token_ids) for o in outputs)
    assert usage.completion_tokens == sum(len(o.token_ids) for o in outputs)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


# ---- completions ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prompt", PROMPTS)
def test_completion_equals_offline(client, offline, prompt):
    (expected,) = offline.generate([prompt], greedy(24))
    response = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0)
    (choice,) = response.choices
    assert choice.text == expected.text and choice.finish_reason == expected.finish_reason
    assert response.model == MODEL and response.object == "text_completion" and response.id.startswith("cmpl-")
    check_usage(response.usage, [expected])


def test_completion_stream_equals_offline(client, offline):
    prompt = PROMPTS[1]
    (expected,) = offline.generate([prompt], greedy(40))
    stream = client.completions.create(model=MODEL, prompt=prompt, max_tokens=40, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert text == expected.text
    assert len(chunks) > 3, "the text must arrive in pieces, not at once"
    assert reasons[-1] == expected.finish_reason and not any(reasons[:-1])
    assert chunks[-1].choices == [] and all(c.usage is None for c in chunks[:-1])
    check_usage(chunks[-1].usage, [expected])


def test_stop_string_ends_the_text_before_it(client, offline):
    prompt = PROMPTS[0]
    (expected,) = offline.generate([prompt], greedy(40, stop=[" is", "Tower"]))
    assert expected.finish_reason == "stop", "the prompt must reach a stop string for this test to say anything"
    for stream in (False, True):
        response = client.completions.create(model=MODEL, prompt=prompt, max_tokens=40, temperature=0,
                                             stop=[" is", "Tower"], stream=stream)
        if stream:
            chunks = list(response)
            text, reason = "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
        else:
            text, reason = response.choices[0].text, response.choices[0].finish_reason
        assert (text, reason) == (expected.text, "stop")
        assert " is" not in text and "Tower" not in text


def test_prompt_lists_token_ids_and_n(client, offline):
    expected = offline.generate([PROMPTS[0], PROMPTS[2]], greedy(12))
    response = client.completions.create(model=MODEL, prompt=[PROMPTS[0], PROMPTS[2]], max_tokens=12, temperature=0,
                                         n=2)
    assert [c.index for c in response.choices] == [0, 1, 2, 3]     # prompt-major, then choice
    assert [c.text for c in response.choices] == [expected[0].text] * 2 + [expected[1].text] * 2
    # each prompt counts once, whatever n is; every choice's tokens count
    assert response.usage.prompt_tokens == sum(len(o.prompt_token_ids) for o in expected)
    assert response.usage.completion_tokens == 2 * sum(len(o.token_ids) for o in expected)
    ids = [o.prompt_token_ids for o in expected]
    for prompt in (ids, ids[1]):   # token ids: a batch of them, and a single one
        response = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
        assert [c.text for c in response.choices] == [o.text for o in expected][-len(response.choices):]


def test_seeded_sampling_is_reproducible_and_matches_offline(client, offline):
    prompt, kw = PROMPTS[3], dict(max_tokens=20, temperature=1.0, top_p=0.95, seed=1234)
    first = client.completions.create(model=MODEL, prompt=prompt, n=2, **kw)
    second = client.completions.create(model=MODEL, prompt=prompt, n=2, **kw)
    assert [c.text for c in first.choices] == [c.text for c in second.choices]
    offline_texts = [o.text for o in offline.generate(
        [prompt, prompt], [SamplingParams(max_new_tokens=20, temperature=1.0, top_p=0.95, seed=s)
                           for s in (1234, 1235)])]
    assert [c.text for c in first.choices] == offline_texts   # choice i is sampled with seed + i


def test_completion_logprobs_match_offline(client, offline):
    prompt = PROMPTS[0]
    (expected,) = offline.generate([prompt], greedy(10, logprobs=3))
    response = client.completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0, logprobs=3)
    lp = response.choices[0].logprobs
    assert len(lp.tokens) == len(expected.token_ids) == len(lp.token_logprobs) == len(lp.top_logprobs)
    assert "".join(lp.tokens) == response.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    for got, want, top in zip(lp.token_logprobs, expected.logprobs, lp.top_logprobs):
        assert got == pytest.approx(want.logprob, abs=1e-4) and got <= 0
        assert len(top) == 3 and max(top.values()) == pytest.approx(got, abs=1e-4)  # greedy: the top token


# ---- chat ----------------------------------------------------------------------------------------------------
def test_chat_equals_offline_with_the_model_template(client, offline):
    query, system = "深圳的景点有哪些？", "你是一个导游。"
    (expected,) = offline.generate([apply_chat_template(query, system=system)], greedy(32))
    messages = [{"role": "system", "content": system}, {"role": "user", "content": query}]
    response = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=32, temperature=0)
    (choice,) = response.choices
    assert choice.message.role == "assistant" and choice.message.content == expected.text
    assert choice.finish_reason == expected.finish_reason
    check_usage(response.usage, [expected])

    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=32, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text
    assert [c for c in chunks if c.choices][-1].choices[0].finish_reason == expected.finish_reason
    check_usage(chunks[-1].usage, [expected])


def test_multi_turn_chat_uses_human_assistant_turns(client, offline):
    messages = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi there."},
                {"role": "user", "content": [{"type": "text", "text": "Where is "},
                                             {"type": "text", "text": "Paris?"}]}]
    prompt = "Human: Hello\n\nAssistant: Hi there.<|endoftext|>Human: Where is Paris?\n\nAssistant: "
    assert offline.tokenizer.encode(prompt).count(3) == 1, "<|endoftext|> must encode as the eos token"
    (expected,) = offline.generate([prompt], greedy(16))
    response = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0)
    assert response.choices[0].message.content == expected.text
    assert response.usage.prompt_tokens == len(expected.prompt_token_ids)


def test_chat_logprobs(client, offline):
    messages = [{"role": "user", "content": "Hello"}]
    (expected,) = offline.generate([apply_chat_template("Hello")], greedy(6, logprobs=2))
    response = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0,
                                              logprobs=True, top_logprobs=2)
    content = response.choices[0].logprobs.content
    assert len(content) == len(expected.token_ids)
    for item, want in zip(content, expected.logprobs):
        assert item.logprob == pytest.approx(want.logprob, abs=1e-4) and len(item.top_logprobs) == 2
        assert bytes(item.bytes).decode("utf-8") == item.token


# ---- models, metrics -----------------------------------------------------------------------------------------
def test_models_lists_the_served_model(client, server):
    (card,) = client.models.list().data
    assert card.id == MODEL and card.object == "model"
    assert client.models.retrieve(MODEL).id == MODEL
    status, body = server.request("GET", "/v1/models")
    assert body["data"][0]["max_model_len"] == 2048
    assert body["data"][0]["generation_config"]["repetition_penalty"] == 1.1


def test_metrics_count_tokens_and_latencies(client, server, offline):
    before = server.wait_idle()
    client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=7, temperature=0,
                              extra_body={"ignore_eos": True})
    after = server.wait_idle()
    n_prompt = len(offline.tokenizer.encode(PROMPTS[0]))
    assert after["xverse_generation_tokens_total"] - before["xverse_generation_tokens_total"] == 7
    assert after["xverse_prompt_tokens_total"] - before["xverse_prompt_tokens_total"] == n_prompt
    assert finished_count(after, "length") - finished_count(before, "length") == 1
    for histogram in ("xverse_time_to_first_token_seconds", "xverse_time_per_output_token_seconds",
                      "xverse_e2e_request_latency_seconds"):
        assert after[f"{histogram}_count"] - before.get(f"{histogram}_count", 0) == 1
    assert after["xverse_kv_cache_blocks_total"] > 0 and after["xverse_kv_cache_usage_ratio"] == 0
    assert after['xverse_http_requests_total{endpoint=/v1/completions,status=200}'] >= 1


# ---- load and disconnects -------------------------------------------------------------------------------------
def test_64_concurrent_streams_equal_offline(server, offline):
    prompts = [f"{PROMPTS[i % len(PROMPTS)]}{' ' * (i // len(PROMPTS) % 3)}" for i in range(64)]
    lengths = [4 + (7 * i) % 13 for i in range(64)]
    expected = offline.generate(prompts, [greedy(n) for n in lengths], use_tqdm=False)

    async def one(client, prompt, n):
        stream = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=n, temperature=0,
                                                 stream=True, stream_options={"include_usage": True})
        text, usage, reason = "", None, None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].text
                reason = chunk.choices[0].finish_reason or reason
            usage = chunk.usage or usage
        return text, reason, usage

    async def all_clients():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                                      timeout=300) as client:
            return await asyncio.wait_for(asyncio.gather(*(one(client, p, n) for p, n in zip(prompts, lengths))),
                                          timeout=600)

    results = asyncio.run(all_clients())
    for (text, reason, usage), want in zip(results, expected):
        assert (text, reason) == (want.text, want.finish_reason)
        assert usage.completion_tokens == len(want.token_ids) and usage.prompt_tokens == len(want.prompt_token_ids)
    server.wait_idle()


def test_clients_that_hang_up_mid_stream_are_aborted(server):
    before = server.wait_idle()
    body = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 1500, "ignore_eos": True, "stream": True}
    sockets = [server.open_stream("/v1/completions", body) for _ in range(6)]
    for sock in sockets:
        head = server.read_until(sock, b"data: ")
        assert head.startswith(b"HTTP/1.1 200"), head[:200]
    server.wait_for(lambda m: m["xverse_num_requests_running"] == 6, what="6 running requests")
    for sock in sockets:
        sock.close()
    after = server.wait_idle(timeout=30)
    assert finished_count(after, "abort") - finished_count(before, "abort") == 6
    generated = after["xverse_generation_tokens_total"] - before["xverse_generation_tokens_total"]
    assert generated < 6 * 1500 / 2, f"the aborted requests generated {generated} tokens: not stopped at once"


def test_non_streaming_client_that_hangs_up_is_aborted(server):
    before = server.wait_idle()
    body = {"model": MODEL, "prompt": PROMPTS[1], "max_tokens": 1500, "ignore_eos": True}
    sockets = [server.open_stream("/v1/completions", body) for _ in range(3)]
    server.wait_for(lambda m: m["xverse_num_requests_running"] == 3, what="3 running requests")
    for sock in sockets:
        sock.close()
    after = server.wait_idle(timeout=30)
    assert finished_count(after, "abort") - finished_count(before, "abort") == 3
    status, body = server.request("POST", "/v1/completions", {"prompt": "Hello", "max_tokens": 2})
    assert status == 200 and body["usage"]["completion_tokens"] >= 1


def test_raw_sse_ends_with_done(server):
    sock = server.open_stream("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}],
                                                        "max_tokens": 3, "stream": True})
    raw = server.read_until(sock, b"data: [DONE]\n\n")
    sock.close()
    head, _, events = raw.partition(b"\r\n\r\n")
    assert b"text/event-stream" in head
    payloads = [line[len(b"data: "):] for line in events.split(b"\n") if line.startswith(b"data: ")]
    assert payloads[-1] == b"[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
