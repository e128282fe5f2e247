from dataclasses import dataclass

import torch
from torch import nn

from ..distributed.parallel_state import SINGLE
from ..ops import paged_attention_decode, paged_attention_prefill, reshape_and_cache
from ..ops.fused import rope_cache
from .rotary import RotaryEmbedding


@dataclass
class AttentionMetadata:
    """Where each token's K/V goes and what each sequence attends to; passed explicitly to every layer.

    B sequences, T tokens in this step (sequences back to back).
    """
    slot_mapping: torch.Tensor      # [T] int64: cache slot of each new token (< 0: padding, not written)
    block_tables: torch.Tensor      # [B, max_blocks] int32
    context_lens: torch.Tensor      # [B] int32: cached + new tokens per sequence
    query_start_loc: torch.Tensor   # [B + 1] int32: offsets of each sequence's new tokens
    is_decode: bool                 # every sequence has exactly one new token (the decode kernel applies)
    max_context_len: int = 0        # bucketed bound on context_lens (sizes the decode split-K); 0: table capacity


class Attention(nn.Module):
    """Multi-head (or grouped-query) attention over a paged KV cache; q/k/v packed into one GEMM.

    Lean: RoPE and the cache write are one op (q rotated in place, rotated k and v written by slot);
    otherwise RoPE and the cache write run separately (the unfused baseline).

    Tensor parallel (tp.size > 1): this rank holds heads [r * n / N, (r + 1) * n / N) of q and of k/v
    (qkv column-parallel), caches only those, and its o_proj columns give a partial sum (row-parallel)
    that one all-reduce completes."""

    def __init__(self, config, dtype, device, kernels: str, max_model_len: int = None, tp=SINGLE,
                 lean: bool = True):
        super().__init__()
        self.tp = tp
        self.num_heads = config.num_attention_heads // tp.size      # this rank's heads
        self.num_kv_heads = config.num_key_value_heads // tp.size
        self.head_dim = config.head_dim
        self.scale = self.head_dim ** -0.5
        self.kernels = kernels
        self.lean = lean
        qkv_rows = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, qkv_rows, bias=False, dtype=dtype, device=device)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False, dtype=dtype,
                                device=device)
        self.rotary = RotaryEmbedding(self.head_dim, config.max_position_embeddings, config.rope_theta,
                                      config.rope_scaling, device, max_len=max_model_len)

    def forward(self, positions, x, meta: AttentionMetadata, kv_cache):
        # positions: [T]  x: [T, H]  kv_cache: (key_cache, value_cache), each [N, n_kv, block_size, D]
        T = x.shape[0]
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = self.qkv_proj(x).split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(T, self.num_heads, self.head_dim)         # views into the qkv rows: no copies
        k = k.view(T, self.num_kv_heads, self.head_dim)
        v = v.view(T, self.num_kv_heads, self.head_dim)
        key_cache, value_cache = kv_cache
        if self.lean:
            rope_cache(q, k, v, key_cache, value_cache, meta.slot_mapping, positions, self.rotary.cos_sin,
                       kernels=self.kernels)
        else:
            q, k = self.rotary(positions, q, k)
            reshape_and_cache(k, v, key_cache, value_cache, meta.slot_mapping, kernels=self.kernels)
        if meta.is_decode:
            out = paged_attention_decode(q, key_cache, value_cache, meta.block_tables, meta.context_lens,
                                         self.scale, kernels=self.kernels, max_context_len=meta.max_context_len)
        else:
            out = paged_attention_prefill(q, key_cache, value_cache, meta.block_tables, meta.query_start_loc,
                                          meta.context_lens, self.scale, kernels=self.kernels)
        return self.tp.all_reduce(self.o_proj(out.reshape(T, q_size)))  # tp: sum the ranks' partials
