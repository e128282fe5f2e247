"""Bytes a tensor-parallel step moves between ranks, for the benchmarks' reports.

Each decoder layer ends its attention and its MLP/MoE block with one all-reduce of the [T, H] activations:
a ring all-reduce sends (and receives) 2 (N-1)/N of the tensor per rank, which we count as 2 T H bytes
(the issue's convention, an upper bound). Once per step: the vocab-parallel logits all-gather of the
[S, V] fp32 sample rows, and rank 0's broadcast of the step's inputs (small, not counted).
"""


def communication_volume(config, tp_size: int, tokens: int, sample_rows: int, activation_bytes: int) -> dict:
    H, L = config.hidden_size, config.num_hidden_layers
    if tp_size == 1:
        return {"tensor_parallel_size": 1, "tokens": tokens, "all_reduce_bytes": 0, "bytes_per_layer": 0,
                "all_reduces_per_layer": 0, "logits_gather_bytes": 0, "bytes_per_step": 0}
    all_reduce = 2 * tokens * H * activation_bytes
    per_layer = 2 * all_reduce                                     # after attention, after the MLP / MoE
    vocab_padded = -(-config.vocab_size // tp_size) * tp_size
    logits = 0 if config.tie_word_embeddings else sample_rows * vocab_padded * 4 * (tp_size - 1) // tp_size
    return {"tensor_parallel_size": tp_size, "tokens": tokens, "all_reduce_bytes": all_reduce,
            "all_reduces_per_layer": 2, "bytes_per_layer": per_layer, "logits_gather_bytes": logits,
            "bytes_per_step": L * per_layer + logits}
