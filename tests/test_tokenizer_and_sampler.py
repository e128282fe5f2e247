"""The tokenizer front (no BOS, UTF-8-safe streaming, chat template) and the sampler's pieces."""
import random

import pytest
import torch

from xverse_engine.layers.sampler import (SamplingBatch, apply_repetition_penalty, filter_top_k_top_p,
                                          gumbel_noise, sample)
from xverse_engine.tokenizer import IncrementalDecoder, Tokenizer, apply_chat_template

TEXTS = ["北京的景点：故宫、天坛、万里长城等。\n深圳的景点：", "Hello, world 123!", "emoji 🚀 and rare 龘 chars",
         "  spaces   and\ttabs\n\nnew paragraphs"]


@pytest.fixture(scope="module")
def tokenizer(moe_ckpt):
    return Tokenizer(str(moe_ckpt))


@pytest.mark.parametrize("text", TEXTS[:3])
def test_encode_adds_no_bos_and_round_trips(tokenizer, text):
    ids = tokenizer.encode(text)
    assert ids and ids[0] != 2
    assert tokenizer.decode(ids) == text


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_decoding_equals_full_decoding(tokenizer, text):
    ids = tokenizer.encode(text)
    decoder = IncrementalDecoder(tokenizer)
    deltas = [decoder.add(i) for i in ids]
    assert "".join(deltas) == tokenizer.decode(ids)
    assert all("\ufffd" not in d for d in deltas)   # never half a character


def test_incremental_decoding_of_random_texts(tokenizer):
    """Random mixes of common and rare characters (rare ones go through byte fallback, several tokens
    per character): the stream never shows half a character and adds up to the full decode."""
    pool = list("abc xyz,.!?0123456789北京深圳的景点") + ["龘", "🚀", "é", "ß", "\n"]
    rng = random.Random(0)
    for _ in range(30):
        ids = tokenizer.encode("".join(rng.choice(pool) for _ in range(rng.randrange(1, 25))))
        decoder = IncrementalDecoder(tokenizer)
        deltas = [decoder.add(i) for i in ids]
        assert "".join(deltas) == tokenizer.decode(ids)
        assert all("\ufffd" not in d for d in deltas)


def test_incremental_decoding_after_a_prompt_keeps_the_leading_space(tokenizer):
    prompt, answer = tokenizer.encode("The capital of France is"), tokenizer.encode(" Paris. 北京")
    full = tokenizer.decode(prompt + answer)
    decoder = IncrementalDecoder(tokenizer, context_ids=prompt[-6:])
    streamed = "".join(decoder.add(i) for i in answer)
    assert tokenizer.decode(prompt) + streamed == full
    assert streamed.startswith(" Paris")


def test_chat_template():
    assert apply_chat_template("你好") == "Human: 你好\n\nAssistant: "
    assert apply_chat_template("hi", system="Be brief.") == "Be brief.\n\nHuman: hi\n\nAssistant: "


def test_repetition_penalty_has_transformers_semantics():
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0]])
    seen = torch.tensor([[0, 1, -1]])               # tokens 0 and 1 seen; -1 is padding
    out = apply_repetition_penalty(logits, seen, torch.tensor([2.0]))
    assert out.tolist() == [[1.0, -4.0, 1.0, -1.0]]


def test_top_k_and_top_p_keep_the_right_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.25, 0.25, 0.25, 0.25]]))
    kept = filter_top_k_top_p(logits, torch.tensor([2, 0]), torch.tensor([1.0, 1.0]), True, False)
    assert torch.isfinite(kept).tolist() == [[True, True, False, False], [True, True, True, True]]
    kept = filter_top_k_top_p(logits, torch.tensor([0, 0]), torch.tensor([0.7, 0.6]), False, True)
    # row 0: 0.5 < 0.7, 0.5 + 0.3 >= 0.7 -> two tokens; row 1: three tokens of 0.25 reach 0.6
    assert torch.isfinite(kept).sum(-1).tolist() == [2, 3]


def test_gumbel_noise_is_a_function_of_seed_and_step_only():
    a = gumbel_noise(torch.tensor([5, 6]), torch.tensor([0, 3]), 100)
    b = gumbel_noise(torch.tensor([7, 5, 6]), torch.tensor([1, 0, 3]), 100)
    assert torch.equal(a, b[1:])
    assert not torch.equal(a[0], gumbel_noise(torch.tensor([5]), torch.tensor([1]), 100)[0])


def test_sampled_frequencies_follow_the_distribution():
    probs = torch.tensor([0.6, 0.3, 0.1, 0.0])
    n = 4000
    batch = SamplingBatch(
        temperatures=torch.ones(n), top_ks=torch.zeros(n, dtype=torch.int64), top_ps=torch.ones(n),
        repetition_penalties=torch.ones(n), seeds=torch.full((n,), 11), steps=torch.arange(n),
        seen_token_ids=None, num_logprobs=-1, all_greedy=False, any_top_k=False, any_top_p=False)
    tokens, _ = sample(torch.log(probs).expand(n, 4).clone(), batch)
    freq = torch.bincount(tokens, minlength=4).float() / n
    assert torch.allclose(freq, probs, atol=0.03), freq


def test_sentencepiece_model_when_no_tokenizer_json(tmp_path):
    """A checkpoint that ships tokenizer.model (sentencepiece) instead of tokenizer.json."""
    sentencepiece = pytest.importorskip("sentencepiece", reason="CI installs sentencepiece; optional at run time")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(["北京的景点：故宫、天坛。", "Hello world, hello tokens.", "深圳的景点：世界之窗。"] * 50),
                      encoding="utf-8")
    sentencepiece.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "tokenizer"),
                                             vocab_size=400, hard_vocab_limit=False, byte_fallback=True, character_coverage=1.0,
                                             normalization_rule_name="identity", minloglevel=2)
    tokenizer = Tokenizer(str(tmp_path))
    text = "北京的景点：故宫 and 龘"
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    decoder = IncrementalDecoder(tokenizer)
    assert "".join(decoder.add(i) for i in ids) == text
