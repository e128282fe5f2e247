"""The XVERSE decoder (MoE or dense): embedding, attention + MoE/MLP blocks, final norm, lm_head.

Parameter names follow the Hugging Face checkpoint with "model." dropped, except the packed ones that the
loader fills from several checkpoint tensors: self_attn.qkv_proj, mlp.w13 / mlp.w2 (stacked experts, the
shared experts stacked after the routed ones), gate_up_proj (dense MLP). loader.py holds the mapping.

The residual stream runs beside the normalised one: each RMSNorm takes (x, residual), adds x into the
residual and normalises it, so a decoder layer is: add+norm, qkv GEMM, RoPE+cache write, attention, o GEMM,
add+norm, gating, align, expert gate_up GEMM, expert down GEMM + combine (10 ops, `lean=True`).
`lean=False` builds the unfused layer (separate add / norm ops, RoPE, cache write, shared-expert MLP): the
baseline that benchmarks/decode_cpu.py compares against.
In a decode step, a token whose slot_mapping is negative is graph padding: it writes no KV and is routed to
no expert (its MoE output row is 0).
"""
import torch
from torch import nn

from .distributed.parallel_state import SINGLE
from .layers.attention import Attention, AttentionMetadata
from .layers.mlp import SwiGLU
from .layers.moe import MoE
from .layers.norm import RMSNorm


class DecoderLayer(nn.Module):
    def __init__(self, config, dtype, device, kernels: str, max_model_len: int = None, tp=SINGLE,
                 lean: bool = True):
        super().__init__()
        H, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = RMSNorm(H, eps, dtype, device, kernels, lean)
        self.self_attn = Attention(config, dtype, device, kernels, max_model_len, tp=tp, lean=lean)
        self.post_attention_layernorm = RMSNorm(H, eps, dtype, device, kernels, lean)
        self.is_moe = config.is_moe
        self.mlp = (MoE(config, dtype, device, kernels, tp=tp, lean=lean) if config.is_moe
                    else SwiGLU(H, config.intermediate_size, dtype, device, tp=tp))

    def forward(self, positions, x, residual, meta, kv_cache, token_mask=None):
        # x, residual: [T, H] -> (this layer's MLP output, the residual stream before it is added)
        x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(positions, x, meta, kv_cache)
        x, residual = self.post_attention_layernorm(x, residual)
        x = self.mlp(x, token_mask) if self.is_moe else self.mlp(x)
        return x, residual


class XverseForCausalLM(nn.Module):
    """Tensor parallel (tp.size > 1): the layers split as their classes say. The embedding stays whole on
    every rank: a lookup needs no math, and splitting it would add an all-reduce of [T, H] per step to save
    (N-1)/N of 0.5 GB (2% of a rank's share at N=2). lm_head is vocab-parallel: its 0.5 GB and its
    [B, H] x [H, V] GEMM split N ways (rows padded up to a multiple of N), and one all-gather of the
    [B, V / N] fp32 logits per step gives every rank the whole row (rank 0 samples from it)."""

    def __init__(self, config, dtype, device, kernels: str, max_model_len: int = None, tp=SINGLE,
                 lean: bool = True):
        super().__init__()
        self.config = config
        self.tp = tp
        self.lean = lean
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, dtype=dtype, device=device)
        self.layers = nn.ModuleList(DecoderLayer(config, dtype, device, kernels, max_model_len, tp=tp, lean=lean)
                                    for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device, kernels, lean)
        if config.tie_word_embeddings:
            self.lm_head = None  # logits from the whole embedding on every rank: no split, no gather
        else:
            vocab_rows = tp.padded_shard(config.vocab_size)[2]
            self.lm_head = nn.Linear(config.hidden_size, vocab_rows, bias=False, dtype=dtype, device=device)
        self.requires_grad_(False)

    def forward(self, input_ids, positions, meta: AttentionMetadata, kv_caches):
        # input_ids, positions: [T]  ->  hidden: [T, H]
        x = self.embed_tokens(input_ids)
        residual = torch.zeros_like(x)  # the first add+norm then starts the residual stream at the embedding
        # graph padding rows of a decode step (slot < 0) route to no expert: no stale expert traffic
        token_mask = meta.slot_mapping >= 0 if (self.lean and meta.is_decode and self.config.is_moe) else None
        for layer, kv_cache in zip(self.layers, kv_caches):
            x, residual = layer(positions, x, residual, meta, kv_cache, token_mask)
        x, _ = self.norm(x, residual)
        return x

    def compute_logits(self, hidden):
        # hidden: [B, H]  ->  logits: [B, V] fp32
        if self.lm_head is None:
            return torch.nn.functional.linear(hidden, self.embed_tokens.weight).float()
        logits = torch.nn.functional.linear(hidden, self.lm_head.weight).float()     # [B, V / N (padded)]
        return self.tp.all_gather_last_dim(logits)[:, :self.config.vocab_size]
