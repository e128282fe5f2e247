"""The checkpoint's tokenizer: tokenizer.json through `tokenizers` (sentencepiece .model when a checkpoint
ships that instead), plus the chat template and incremental, UTF-8-safe decoding for streaming.

XVERSE's tokenizer adds no BOS (post_processor null) and falls back to byte tokens <0x..>, so one
character may span several tokens: the incremental decoder holds text back until it is complete.
"""
import os

DEFAULT_CHAT_TEMPLATE = "Human: {query}\n\nAssistant: "
DEFAULT_SYSTEM_TEMPLATE = "{system}\n\n"


class Tokenizer:
    def __init__(self, path: str):
        json_file = os.path.join(path, "tokenizer.json")
        sp_file = os.path.join(path, "tokenizer.model")
        if os.path.isfile(json_file):
            from tokenizers import Tokenizer as HFTokenizer
            self._hf = HFTokenizer.from_file(json_file)
            self._sp = None
            self.vocab_size = self._hf.get_vocab_size(with_added_tokens=True)
            self._special_ids = {i for i, token in self._hf.get_added_tokens_decoder().items() if token.special}
        elif os.path.isfile(sp_file):
            import sentencepiece
            self._hf = None
            self._sp = sentencepiece.SentencePieceProcessor(model_file=sp_file)
            self.vocab_size = self._sp.get_piece_size()
            self._special_ids = {i for i in range(self.vocab_size) if self._sp.is_control(i)}
        else:
            raise FileNotFoundError(f"no tokenizer.json or tokenizer.model in {path}; pass prompt_token_ids "
                                    f"instead of text, or add the tokenizer files to the checkpoint")

    def encode(self, text: str) -> list:
        if self._hf is not None:
            return self._hf.encode(text, add_special_tokens=False).ids
        return self._sp.encode(text)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        if self._hf is not None:
            return self._hf.decode(list(ids), skip_special_tokens=skip_special_tokens)
        ids = [i for i in ids if not (skip_special_tokens and i in self._special_ids)]
        return self._sp.decode(ids)


def apply_chat_template(query: str, system: str = None, template: str = DEFAULT_CHAT_TEMPLATE) -> str:
    """XVERSE-Chat's prompt: optional "{system}\\n\\n", then "Human: {query}\\n\\nAssistant: "."""
    prefix = DEFAULT_SYSTEM_TEMPLATE.format(system=system) if system else ""
    return prefix + template.format(query=query)


class IncrementalDecoder:
    """Turns a growing list of generated ids into text deltas, never splitting a UTF-8 character.

    Decodes a short window ids[prefix:] and emits what lies past the text of ids[prefix:read]; so the
    word-boundary handling of the decoder (the Metaspace "▁" at a window's start) never leaks, and the
    cost per token stays constant. `context_ids` (the prompt's last tokens) make the first output token
    decode as a continuation, so a leading space survives ("is" + "▁Paris" -> " Paris"), as when the
    whole sequence is decoded and the prompt's text cut off.
    """

    def __init__(self, tokenizer: Tokenizer, context_ids=()):
        self.tokenizer = tokenizer
        self.ids = list(context_ids)
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        if self.read_offset == 0:  # start of the output: the decoder's own start-of-text handling applies
            prefix_text = ""
            new_text = decode(self.ids)
        else:
            prefix_text = decode(self.ids[self.prefix_offset:self.read_offset])
            new_text = decode(self.ids[self.prefix_offset:])
        if new_text.endswith("\ufffd") or len(new_text) <= len(prefix_text):
            return ""  # an incomplete character (byte fallback), or nothing visible yet
        delta = new_text[len(prefix_text):]
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        self.text += delta
        return delta
