"""A request's output text as tokens arrive: incremental decoding, stop strings matched across token
boundaries, and the text held back while it might still be the start of a stop string."""
from ..tokenizer import IncrementalDecoder, Tokenizer


class OutputText:
    CONTEXT_TOKENS = 6   # prompt tokens decoded with the output, so its first word keeps its leading space

    def __init__(self, tokenizer: Tokenizer, stop: list, prompt_token_ids=()):
        self.decoder = (IncrementalDecoder(tokenizer, prompt_token_ids[-self.CONTEXT_TOKENS:])
                        if tokenizer is not None else None)
        self.stop = stop
        self.text = ""          # the final text so far (stop string excluded)
        self.emitted = 0        # characters of self.text already handed out as deltas
        self.stopped = False

    def add(self, token_id: int) -> bool:
        """Adds a token; True when a stop string completed (the text is then cut before it)."""
        if self.decoder is None or self.stopped:
            return self.stopped
        old_len = len(self.text)
        self.text += self.decoder.add(token_id)
        # no stop string was in the old text, so a match must end inside the new characters
        found = [at for stop in self.stop
                 if (at := self.text.find(stop, max(0, old_len - len(stop) + 1))) != -1]
        if found:
            self.text = self.text[:min(found)]
            self.stopped = True
        return self.stopped

    def take_delta(self, final: bool) -> str:
        """Text not yet handed out, minus a tail that could begin a stop string (unless final)."""
        end = len(self.text)
        if not final:
            end -= self._held_back()
        delta = self.text[self.emitted:end]
        self.emitted = max(self.emitted, end)
        return delta

    def _held_back(self) -> int:
        longest = 0
        for stop in self.stop:
            for n in range(min(len(stop) - 1, len(self.text)), 0, -1):
                if self.text.endswith(stop[:n]):
                    longest = max(longest, n)
                    break
        return longest
