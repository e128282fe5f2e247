import torch
from torch import nn

from ..ops.fused import rotate_half


class RotaryEmbedding(nn.Module):
    """Non-interleaved ("rotate half") RoPE over the full head_dim, with an fp32 cos/sin table.

    rope_scaling "linear" divides positions by the factor. "dynamic" (NTK) keeps the base while the engine
    serves no more than max_position tokens (as transformers does for such sequences) and otherwise rescales
    it once for the longest served length, since a paged cache cannot re-rotate keys already written.
    """

    def __init__(self, head_dim: int, max_position: int, theta: float, rope_scaling, device,
                 max_len: int = None):
        super().__init__()
        scale_positions = 1.0
        table_len = max_position
        if rope_scaling is not None:
            kind = rope_scaling.get("type", rope_scaling.get("rope_type"))
            factor = float(rope_scaling["factor"])
            table_len = int(max_position * factor)
            if kind == "linear":
                scale_positions = factor
            elif max_len is not None and max_len > max_position:  # dynamic NTK at the longest served length
                theta = theta * (factor * max_len / max_position - (factor - 1)) ** (head_dim / (head_dim - 2))
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
        positions = torch.arange(table_len, dtype=torch.float32, device=device) / scale_positions
        freqs = torch.outer(positions, inv_freq)                                  # [P, D/2]
        # [P, D]: cos | sin per position, the table the fused rope_cache op reads (one row per token)
        self.register_buffer("cos_sin", torch.cat([freqs.cos(), freqs.sin()], dim=-1), persistent=False)
        self.max_position = table_len

    @property
    def cos(self):  # [P, D/2], a view
        return self.cos_sin[:, : self.cos_sin.shape[1] // 2]

    @property
    def sin(self):  # [P, D/2], a view
        return self.cos_sin[:, self.cos_sin.shape[1] // 2:]

    def forward(self, positions, q, k):
        # positions: [T]  q: [T, Hq, D]  k: [T, Hkv, D]
        cos = self.cos[positions].unsqueeze(1)                                    # [T, 1, D/2]
        sin = self.sin[positions].unsqueeze(1)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x, cos, sin):
    return rotate_half(x, cos, sin)
