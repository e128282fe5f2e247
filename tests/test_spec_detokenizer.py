"""OutputText as the spec says, token by token, with a tokenizer whose pieces we choose: the text is the
decoded output, a stop string is cut however many tokens it spans, a stream delta never shows what may
still begin a stop string, and the deltas add up to the final text.

The tokenizer below decodes each id to a fixed byte string, so a test fixes exactly which characters each
token adds (and a character split over two tokens decodes to U+FFFD until it is complete, as byte
fallback does). No model runs: these tests take milliseconds.
"""
import pytest

from xverse_engine.engine.detokenizer import OutputText


class BytesTokenizer:
    """decode(ids) = the UTF-8 decoding of the ids' byte strings joined (bad bytes as U+FFFD)."""

    def __init__(self, pieces):
        self.pieces = [p.encode() if isinstance(p, str) else p for p in pieces]

    def decode(self, ids, skip_special_tokens=True):
        return b"".join(self.pieces[i] for i in ids).decode("utf-8", errors="replace")


def run(pieces, stop, final_each=False):
    """Feeds the pieces one token each; returns (the delta after each token, the final delta, the
    OutputText, the index of the token that completed a stop or None)."""
    tokenizer = BytesTokenizer(pieces)
    out = OutputText(tokenizer, stop, prompt_token_ids=[])
    deltas, stopped_at = [], None
    for i in range(len(pieces)):
        if out.add(i):
            stopped_at = i
            break
        deltas.append(out.take_delta(final=final_each))
    return deltas, out.take_delta(final=True), out, stopped_at


def test_without_stop_strings_each_delta_is_the_new_text():
    deltas, last, out, stopped_at = run(["ab", "c", "def", " g"], stop=[])
    assert deltas == ["ab", "c", "def", " g"] and last == "" and stopped_at is None
    assert out.text == "abcdef g"


def test_a_delta_shows_everything_that_cannot_begin_a_stop_string():
    """Only the tail that is a proper prefix of a stop string waits; all before it comes out at once."""
    deltas, last, out, stopped_at = run(["ab", "cdX", "Yq", "rs"], stop=["XYZ"])
    assert deltas == ["ab", "cd", "XYq", "rs"] and last == ""
    assert stopped_at is None and out.text == "abcdXYqrs"


def test_the_longest_stop_prefix_is_held_back_across_several_pieces():
    deltas, last, out, _ = run(["hello wor", "l", "d", "?"], stop=["world!", "zz"])
    assert deltas == ["hello ", "", "", "world?"] and last == ""
    assert out.text == "hello world?"


def test_a_stop_completed_after_text_was_sent_never_shows_in_the_stream():
    deltas, last, out, stopped_at = run(["ab", "cdX", "Y", "Z", "never read"], stop=["XYZ"])
    assert stopped_at == 3
    assert deltas == ["ab", "cd", ""] and last == ""
    assert out.text == "abcd" and "".join(deltas) + last == out.text


def test_a_stop_spanning_several_pieces_cuts_them_all():
    """The cut falls inside the first piece of the stop string; the pieces after it go entirely."""
    _, _, out, stopped_at = run(["x", "ab", "cd", "e"], stop=["bcde"])
    assert stopped_at == 3 and out.text == "xa"
    _, _, out, stopped_at = run(["x", "ab", "c", "def", "g"], stop=["bcd"])
    assert stopped_at == 3 and out.text == "xa"


def test_a_stop_inside_one_piece_cuts_at_its_first_occurrence():
    deltas, last, out, stopped_at = run(["one ", "two STOP three STOP"], stop=["STOP"])
    assert stopped_at == 1 and out.text == "one two " and deltas + [last] == ["one ", "two "]


def test_one_character_stop_strings():
    """Nothing is ever held back (no proper prefix), and the first occurrence cuts."""
    deltas, last, out, stopped_at = run(["ab", "c", "dXe", "X"], stop=["X", "."])
    assert deltas == ["ab", "c"] and stopped_at == 2 and out.text == "abcd" and last == "d"


def test_the_prompt_text_never_completes_a_stop_string():
    """Stop strings are matched in the generated text only, even when the prompt ends with their beginning."""
    pieces = ["say X", "YZ", "!"]
    out = OutputText(BytesTokenizer(pieces), ["XYZ"], prompt_token_ids=[0])
    assert out.add(1) is False and out.add(2) is False
    assert out.text == "YZ!"


def test_decoding_reads_a_short_window_even_after_a_long_prompt():
    """Each token costs O(1) decoding: the window reaches only a few tokens back into the prompt."""
    pieces = ["w%d " % i for i in range(200)]
    tokenizer = BytesTokenizer(pieces)
    windows = []
    decode = tokenizer.decode
    tokenizer.decode = lambda ids, **kw: (windows.append(len(ids)), decode(ids, **kw))[1]
    out = OutputText(tokenizer, ["never"], prompt_token_ids=list(range(150)))
    for token in range(150, 200):
        out.add(token)
    assert out.text == "".join(pieces[150:])
    assert max(windows) <= OutputText.CONTEXT_TOKENS + 2


def test_only_requests_with_stop_strings_need_each_token_decoded_on_arrival():
    """Without stop strings (or without a tokenizer, when there is no text) decoding can wait for a reader."""
    tokenizer = BytesTokenizer(["a"])
    assert OutputText(tokenizer, ["x"]).checks_stops
    assert not OutputText(tokenizer, []).checks_stops
    assert not OutputText(None, ["x"]).checks_stops


def test_without_a_tokenizer_there_is_no_text_and_no_stop():
    out = OutputText(None, ["x"], prompt_token_ids=[1, 2])
    assert out.add(3) is False and out.add(4) is False
    assert out.text == "" and out.take_delta(final=True) == ""


def test_a_stopped_text_holds_nothing_back():
    """Once a stop string completed the text is final: even a non-final delta carries all of it, also a
    tail that looks like the start of a stop string."""
    tokenizer = BytesTokenizer(["xa", "aab", "more"])
    out = OutputText(tokenizer, ["aab"], prompt_token_ids=[])
    assert out.add(0) is False
    assert out.add(1) is True              # "xaaab": the stop starts at index 2
    assert out.text == "xa"                # ends with "a", a prefix of the stop string
    assert out.take_delta(final=False) == "xa"
    assert out.add(2) is True and out.text == "xa"   # later tokens are ignored


def test_a_character_split_over_two_tokens_comes_out_whole():
    e_acute = "é".encode()
    deltas, last, out, _ = run([b"caf", e_acute[:1], e_acute[1:], b"!"], stop=[])
    assert deltas == ["caf", "", "é", "!"] and out.text == "café!"


def test_deltas_always_add_up_to_the_text_read_so_far():
    """Read the text and the stream in any interleaving: the stream never runs ahead of the text."""
    pieces = ["Sto", "p", " here", ": S", "t", "o", "ck", " S", "top"]
    tokenizer = BytesTokenizer(pieces)
    out = OutputText(tokenizer, ["Stop!", "Stock"], prompt_token_ids=[])
    streamed = ""
    for i in range(len(pieces)):
        if out.add(i):
            break
        streamed += out.take_delta(final=False)
        assert out.text.startswith(streamed)
    streamed += out.take_delta(final=True)
    assert out.text == streamed == "Stop here: "     # "Stock" completed with token 6


@pytest.mark.parametrize("context", [0, 3, 10])
def test_output_is_decoded_after_the_prompt(context):
    """Prompt tokens give the decoder its context; only the output's characters are the text."""
    pieces = ["p%d " % i for i in range(context)] + ["out", " put"]
    tokenizer = BytesTokenizer(pieces)
    out = OutputText(tokenizer, [], prompt_token_ids=list(range(context)))
    out.add(context)
    out.add(context + 1)
    assert out.text == "out put" and out.take_delta(final=True) == "out put"


def test_text_read_once_at_the_end_equals_the_text_read_token_by_token():
    """Without stop strings the engine decodes lazily: many tokens (a split character among them) arrive in
    the sequence's list before the text is read."""
    e_acute = "é".encode()
    pieces = [b"caf", e_acute[:1], e_acute[1:], b"! ", b"ok"]
    source = []
    out = OutputText(BytesTokenizer(pieces), [], prompt_token_ids=[], source=source)
    source.extend(range(len(pieces)))
    assert out.text == "café! ok"
    assert out.take_delta(final=False) == "café! ok"
