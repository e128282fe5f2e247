"""Stop strings as the spec says: matched in the decoded text across token boundaries, cut from the output,
and never streamed out before it is known they are not the start of a stop string.

The embedded default model (trained, real tokenizer) writes real words, several characters per token, so
a stop string can be chosen to start inside one token's text and end inside a later one.
"""
import pytest

from xverse_engine import Engine, SamplingParams

PROMPT = "北京的景点："


@pytest.fixture(scope="module")
def engine():
    return Engine(device="cpu", kernels="cpu", num_kv_blocks=64, block_size=8, max_model_len=256,
                  show_progress=False)


def greedy(**extra):
    return SamplingParams(max_new_tokens=16, temperature=0, repetition_penalty=1.0, ignore_eos=True, **extra)


@pytest.fixture(scope="module")
def free_run(engine):
    """The greedy continuation without stops: its text, token ids, and the text each token added."""
    pieces = []
    for delta in engine.stream(PROMPT, greedy()):
        assert len(delta.token_ids) <= 1
        if delta.token_ids:
            pieces.append(delta.text)
    out = engine.generate([PROMPT], greedy())[0]
    assert "".join(pieces) == out.text and len(pieces) == len(out.token_ids) == 16
    return out.text, out.token_ids, pieces


def spanning_stop(text, pieces, tokens_spanned: int):
    """A stop string that starts with the last character of one token's text and ends with the first character
    of the token `tokens_spanned - 1` later, at the first place in `text` where that string occurs first.
    Returns (stop, index of the token that completes it, where the stop starts in the text)."""
    ends = [sum(len(p) for p in pieces[:i + 1]) for i in range(len(pieces))]   # text offset after token i
    for first in range(len(pieces) - tokens_spanned + 1):
        last = first + tokens_spanned - 1
        if not pieces[first] or not pieces[last] or any(not p for p in pieces[first:last + 1]):
            continue
        start, end = ends[first] - 1, ends[last - 1] + 1
        stop = text[start:end]
        if text.find(stop) == start and len(stop) >= 2:
            return stop, last, start
    pytest.fail(f"no stop string spans {tokens_spanned} tokens in {pieces}")


def streamed(engine, params):
    """The stream's deltas concatenated, checking on the way that no delta ever shows text that the final
    output will not have."""
    text, finish = "", None
    for delta in engine.stream(PROMPT, params):
        text += delta.text
        if delta.finished:
            finish = delta.finish_reason
    return text, finish


@pytest.mark.parametrize("tokens_spanned", [2, 3])
def test_stop_string_spanning_token_boundaries_cuts_the_text(engine, free_run, tokens_spanned):
    text, token_ids, pieces = free_run
    stop, completing_token, start = spanning_stop(text, pieces, tokens_spanned)
    out = engine.generate([PROMPT], greedy(stop=[stop]))[0]
    assert out.finish_reason == "stop"
    assert out.text == text[:start]                       # the stop string and all after it are cut
    assert out.token_ids == token_ids[:completing_token + 1]   # generation ends with the completing token


@pytest.mark.parametrize("tokens_spanned", [2, 3])
def test_streamed_text_equals_final_text_when_a_stop_is_held_back(engine, free_run, tokens_spanned):
    """While the text ends with the beginning of a stop string that beginning is held back; when the stop
    completes it is cut, so the stream never showed it."""
    text, _, pieces = free_run
    stop, _, start = spanning_stop(text, pieces, tokens_spanned)
    params = greedy(stop=[stop])
    final = engine.generate([PROMPT], params)[0].text
    got, finish = streamed(engine, params)
    assert (got, finish) == (final, "stop")
    assert got == text[:start]


def test_held_back_text_is_released_when_no_stop_completes(engine, free_run):
    """Stop strings whose beginnings appear (one mid-text, one at the very end) but which never complete:
    the held-back characters come out by the end, and the stream adds up to the full text."""
    text, _, pieces = free_run
    never = "\u2603\u2603"                          # snowmen: the model never writes them
    stops = [pieces[1][-1] + never, text[-1] + never]
    got, finish = streamed(engine, greedy(stop=stops))
    assert (got, finish) == (text, "length")


def test_the_earliest_of_several_stop_strings_wins(engine, free_run):
    """Two stop strings completed by the same token: the text is cut where the earlier one starts."""
    text, _, pieces = free_run
    early, _, early_start = spanning_stop(text, pieces, 3)
    late = early[1:]                                  # completes with the same token, starts one later
    assert text.find(late) == early_start + 1
    out = engine.generate([PROMPT], greedy(stop=[late, early]))[0]
    assert out.text == text[:early_start] and out.finish_reason == "stop"


def test_output_text_keeps_the_leading_space_of_its_first_word(engine):
    """The output is decoded in the context of the prompt's last tokens, so its text is exactly what the
    whole sequence decodes to after the prompt (a first word keeps its leading space)."""
    prompt = "The capital"
    out = engine.generate([prompt], greedy())[0]
    ids = engine.tokenizer.encode(prompt)
    assert out.text == engine.tokenizer.decode(ids + out.token_ids)[len(engine.tokenizer.decode(ids)):]
    assert out.text.startswith(" ")


def test_without_a_tokenizer_token_ids_still_come_out(tmp_path):
    """A checkpoint without tokenizer files (dummy weights of a preset, say): token ids in and out, text empty."""
    from checkpoints import make_checkpoint
    path = make_checkpoint(tmp_path, max_position_embeddings=64, tokenizer=False)
    engine = Engine(str(path), device="cpu", kernels="cpu", num_kv_blocks=16, block_size=8, show_progress=False)
    out = engine.generate(prompt_token_ids=[[5, 6, 7]], sampling_params=greedy(stop=["x"]))[0]
    assert len(out.token_ids) == 16 and out.text == "" and out.finish_reason == "length"
