"""Which part of each checkpoint tensor a tensor-parallel rank reads, and which parameter view it fills.

    selection(name) -> None (the whole tensor), SKIP (another rank's expert: never read), or
                       (dim, start, count): the rows (dim 0) or columns (dim 1) this rank holds
    slot(params, name) -> the view of this rank's parameter that the selection is copied into

Column-parallel (split output rows, dim 0): q/k/v by heads, gate/up by intermediate, lm_head by vocab.
Row-parallel (split input columns, dim 1): o_proj by heads, down by intermediate; their outputs are
partial sums that the layer all-reduces. Experts are whole, each on one rank. Norms, router, embedding:
whole on every rank.
"""
import re

from ..loader import parameter_slot

SKIP = "skip"

_EXPERT = re.compile(r"^(layers\.\d+\.mlp)\.experts\.(\d+)\.(gate|up|down)_proj\.weight$")
_ATTN = re.compile(r"^(layers\.\d+\.self_attn)\.([qkvo])_proj\.weight$")
_MLP = re.compile(r"^layers\.\d+\.mlp(?:\.shared_experts)?\.(gate|up|down)_proj\.weight$")


class CheckpointSharding:
    def __init__(self, config, tp):
        self.config, self.tp = config, tp
        D = config.head_dim
        self.q_start, self.q_rows = (n * D for n in tp.shard(config.num_attention_heads))
        self.kv_start, self.kv_rows = (n * D for n in tp.shard(config.num_key_value_heads))
        self.first_expert, self.num_local_experts = tp.shard(config.num_experts) if config.is_moe else (0, 0)
        self.vocab_start, self.vocab_rows, _ = tp.padded_shard(config.vocab_size)

    @staticmethod
    def _short(name: str) -> str:
        return name[len("model."):] if name.startswith("model.") else name

    def selection(self, name: str):
        short = self._short(name)
        if m := _EXPERT.match(short):
            e = int(m.group(2))
            return None if self.first_expert <= e < self.first_expert + self.num_local_experts else SKIP
        if m := _ATTN.match(short):
            which = m.group(2)
            if which == "q":
                return 0, self.q_start, self.q_rows
            if which == "o":
                return 1, self.q_start, self.q_rows
            return 0, self.kv_start, self.kv_rows
        if m := _MLP.match(short):
            full = (self.config.shared_intermediate_size if ".shared_experts." in short
                    else self.config.intermediate_size)
            start, count = self.tp.shard(full)
            return (1 if m.group(1) == "down" else 0), start, count
        if short == "lm_head.weight":
            return 0, self.vocab_start, self.vocab_rows
        return None

    def slot(self, params: dict, name: str):
        short = self._short(name)
        if m := _EXPERT.match(short):
            prefix, e, which = m.group(1), int(m.group(2)) - self.first_expert, m.group(3)
            if which == "down":
                return params[prefix + ".w2"][e]
            I = self.config.intermediate_size
            return params[prefix + ".w13"][e, :I] if which == "gate" else params[prefix + ".w13"][e, I:]
        if m := _ATTN.match(short):
            which = m.group(2)
            if which == "o":
                return params[m.group(1) + ".o_proj.weight"]
            start = {"q": 0, "k": self.q_rows, "v": self.q_rows + self.kv_rows}[which]
            size = self.q_rows if which == "q" else self.kv_rows
            return params[m.group(1) + ".qkv_proj.weight"][start:start + size]
        if short == "lm_head.weight":
            return params[short][:self.vocab_rows]   # padding rows past the vocabulary: cut from the logits
        return parameter_slot(params, self.config, name)  # whole tensors; gate/up halves of a packed weight
