"""Build a small tokenizer.json with the XVERSE pipeline (MODEL.md "Tokenizer").

Shared by the test checkpoint factory (tests/checkpoints.py) and the embedded tiny model
(scripts/make_tiny_model.py). Layout of the ids, as in the real tokenizer:

    0..5                    special tokens <sep> <pad> <|startoftext|> <|endoftext|> <|endofprompt|> <|endofknowledge|>
    6..vocab_size-257       BPE tokens learnt from a small text (plus filler single characters if the text is short)
    vocab_size-256..-1      byte tokens <0x00>..<0xFF> (byte fallback)

Pipeline: no normalizer; pre-tokenizer Sequence[Metaspace("▁", prepend always), Digits(individual),
Punctuation(isolated)]; BPE with byte_fallback; decoder Sequence[Metaspace, ByteFallback]; no
post-processor (so no BOS is added).
"""
from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

SPECIAL_TOKENS = ["<sep>", "<pad>", "<|startoftext|>", "<|endoftext|>", "<|endofprompt|>", "<|endofknowledge|>"]
NUM_BYTE_TOKENS = 256
CORPUS_PATH = Path(__file__).resolve().parents[1] / "scripts" / "tiny_corpus.txt"


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.Punctuation(behavior="isolated"),
    ])


def _decoder() -> decoders.Decoder:
    # Metaspace turns "▁" back into spaces (dropping the one prepended to the first token);
    # ByteFallback turns runs of <0xXX> tokens back into UTF-8 text. Nothing else is needed:
    # the decoded pieces are concatenated as they are.
    return decoders.Sequence([
        decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True),
        decoders.ByteFallback(),
    ])


def _learn_bpe(texts: list[str], budget: int) -> tuple[list[str], list[tuple[str, str]]]:
    """Learn up to `budget` tokens (alphabet + merges) with the XVERSE pre-tokenizer.

    A plain greedy BPE written here rather than `tokenizers.trainers.BpeTrainer`, whose choice
    among equally frequent pairs changes from run to run: the tokenizer must be reproducible.
    """
    pre = _pre_tokenizer()
    words: dict[str, int] = {}
    for line in texts:
        for w, _ in pre.pre_tokenize_str(line):
            words[w] = words.get(w, 0) + 1

    # Alphabet: "▁" and the ten digits always (digits are split one by one, so each must be a
    # token), then the most frequent characters; about half of the budget is kept for merges so
    # the vocab holds real multi-character pieces. Characters left out go through byte fallback.
    char_count: dict[str, int] = {c: 0 for c in "▁0123456789"}
    for w, n in words.items():
        for c in w:
            char_count[c] = char_count.get(c, 0) + n
    chars = sorted(char_count, key=lambda c: (c not in "▁0123456789", -char_count[c], c))
    alphabet = chars[: max(budget // 2, 1)]
    tokens = list(alphabet)
    known = set(alphabet)

    # Each word is a list of symbols; None marks a byte-fallback character that never merges.
    seqs = [([c if c in known else None for c in w], n) for w, n in words.items()]
    merges: list[tuple[str, str]] = []
    while len(tokens) < budget:
        pairs: dict[tuple[str, str], int] = {}
        for syms, n in seqs:
            for a, b in zip(syms, syms[1:]):
                if a is not None and b is not None:
                    pairs[(a, b)] = pairs.get((a, b), 0) + n
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))  # most frequent; ties by the pair itself
        if pairs[best] < 2:
            break
        merged = best[0] + best[1]
        merges.append(best)
        if merged not in known:
            tokens.append(merged)
            known.add(merged)
        for syms, _ in seqs:
            i = 0
            while i < len(syms) - 1:
                if syms[i] == best[0] and syms[i + 1] == best[1]:
                    syms[i : i + 2] = [merged]
                i += 1
    return tokens, merges


def build_tokenizer(vocab_size: int, texts: list[str] | None = None) -> Tokenizer:
    """A `tokenizers.Tokenizer` with exactly `vocab_size` ids in the XVERSE layout."""
    budget = vocab_size - len(SPECIAL_TOKENS) - NUM_BYTE_TOKENS
    if budget < 2:
        raise ValueError(f"vocab_size {vocab_size} too small: needs > {len(SPECIAL_TOKENS) + NUM_BYTE_TOKENS + 1}")
    if texts is None:
        texts = CORPUS_PATH.read_text(encoding="utf-8").splitlines()
    learnt, merges = _learn_bpe(texts, budget)
    kept = set(learnt)

    # Fill a short vocab with single characters (printable ASCII, then CJK): real, reachable
    # tokens rather than dead ids.
    fill = iter([chr(c) for c in range(0x21, 0x7F)] + [chr(c) for c in range(0x4E00, 0x9FFF)])
    while len(learnt) < budget:
        c = next(fill)
        if c not in kept:
            learnt.append(c)
            kept.add(c)

    byte_tokens = [f"<0x{b:02X}>" for b in range(NUM_BYTE_TOKENS)]
    tokens = SPECIAL_TOKENS + learnt + byte_tokens
    assert len(tokens) == vocab_size and len(set(tokens)) == vocab_size
    vocab = {t: i for i, t in enumerate(tokens)}

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, fuse_unk=False))
    tok.normalizer = None
    tok.pre_tokenizer = _pre_tokenizer()
    tok.decoder = _decoder()
    tok.post_processor = None
    # Already in the vocab, so they keep ids 0..5; registering them makes them matched whole in
    # text and skipped by decode(skip_special_tokens=True).
    tok.add_special_tokens(SPECIAL_TOKENS)
    return tok


def make_tokenizer_json(path: str | Path, vocab_size: int, texts: list[str] | None = None) -> Path:
    """Write tokenizer.json (into `path` if it is a directory). Returns the file path."""
    path = Path(path)
    if path.is_dir() or path.suffix != ".json":
        path.mkdir(parents=True, exist_ok=True)
        path = path / "tokenizer.json"
    build_tokenizer(vocab_size, texts).save(str(path))
    return path
