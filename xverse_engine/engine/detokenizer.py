"""A request's output text as tokens arrive: incremental decoding, stop strings matched across token
boundaries, and the text held back while it might still be the start of a stop string.

Linear in the output length: each token is decoded once, through a window of a few tokens; the text is
kept as a list of pieces (never re-concatenated per token); a stop string is looked for only in the last
len(stop) - 1 old characters plus the new ones; a stream delta joins only the pieces not yet sent.
Decoding is lazy: without stop strings nothing is decoded until the text is read (get_output, a stream
delta), so a step costs no tokenizer call at all for such requests.
"""
from ..tokenizer import Tokenizer


class OutputText:
    CONTEXT_TOKENS = 6   # prompt tokens decoded with the output, so its first word keeps its leading space

    def __init__(self, tokenizer: Tokenizer, stop: list, prompt_token_ids=(), source: list = None):
        """source: the sequence's token list (prompt, then output), read as it grows; None: feed add()."""
        self.tokenizer = tokenizer
        self.stop = list(stop)
        self.source = list(prompt_token_ids) if source is None else source
        start = len(prompt_token_ids)
        self.decoded = start                                   # source[:decoded] went through the decoder
        self.prefix_offset = max(0, start - self.CONTEXT_TOKENS)   # decode window: source[prefix_offset:]
        self.read_offset = start                               # source[prefix_offset:read_offset] is shown
        self.pieces = []         # the text so far (stop string excluded), in pieces
        self.length = 0          # its length in characters
        self.emitted = 0         # characters already handed out as deltas
        self.keep = max((len(s) for s in self.stop), default=1) - 1   # old characters a stop match may span
        self.tail = ""           # the last `keep` characters of the text
        self.stopped = False
        # must see every token as it arrives (to stop on time); otherwise decoding waits for a reader
        self.checks_stops = bool(self.stop) and tokenizer is not None

    def add(self, token_id: int) -> bool:
        """Adds a token (when no source list was given); True once a stop string completed."""
        self.source.append(token_id)
        return self.update()

    def update(self) -> bool:
        """Decodes the tokens that arrived in source; True once a stop string completed (the text is then
        cut before it, and later tokens are ignored)."""
        if self.tokenizer is None:
            return False
        source, decode = self.source, self.tokenizer.decode
        while self.decoded < len(source) and not self.stopped:
            self.decoded += 1
            prefix_text = decode(source[self.prefix_offset:self.read_offset])
            new_text = decode(source[self.prefix_offset:self.decoded])
            if new_text.endswith("\ufffd") or len(new_text) <= len(prefix_text):
                continue  # an incomplete character (byte fallback), or nothing visible yet
            self.prefix_offset, self.read_offset = self.read_offset, self.decoded
            self._append(new_text[len(prefix_text):])
        return self.stopped

    def _append(self, delta: str):
        window = self.tail + delta
        # no stop string was in the old text, so a match must end inside the new characters
        found = [at for stop in self.stop if (at := window.find(stop)) != -1]
        self.pieces.append(delta)
        self.length += len(delta)
        if found:
            self._truncate(self.length - len(window) + min(found))
            self.stopped = True
        self.tail = window[-self.keep:] if self.keep else ""

    def _truncate(self, length: int):
        drop = self.length - length
        while drop and len(self.pieces[-1]) <= drop:
            drop -= len(self.pieces.pop())
        if drop:
            self.pieces[-1] = self.pieces[-1][:-drop]
        self.length = length

    def _last_chars(self, n: int) -> str:
        parts = []
        for piece in reversed(self.pieces):
            if n <= 0:
                break
            parts.append(piece[-n:] if len(piece) > n else piece)
            n -= len(piece)
        return "".join(reversed(parts))

    @property
    def text(self) -> str:
        self.update()
        if len(self.pieces) > 1:
            self.pieces = ["".join(self.pieces)]
        return self.pieces[0] if self.pieces else ""

    def take_delta(self, final: bool) -> str:
        """Text not yet handed out, minus a tail that could begin a stop string (unless final)."""
        self.update()
        end = self.length if final else self.length - self._held_back()
        if end <= self.emitted:
            return ""
        delta = self._last_chars(self.length - self.emitted)[:end - self.emitted]
        self.emitted = end
        return delta

    def _held_back(self) -> int:
        if self.stopped or not self.stop:
            return 0
        tail = self._last_chars(self.keep)
        longest = 0
        for stop in self.stop:
            for n in range(min(len(stop) - 1, len(tail)), 0, -1):
                if tail.endswith(stop[:n]):
                    longest = max(longest, n)
                    break
        return longest
