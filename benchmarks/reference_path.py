"""The model's own reference path: generation the way the XVERSE modeling code runs under transformers.

This is the baseline the benchmarks compare the engine with: what a user of the README's
`model.generate(...)` runs today. It follows modeling_xverse.py step for step:
  - one padded batch, LEFT-padded, with an attention mask (padding keys are masked out);
  - a contiguous KV cache per layer, [B, n_kv, S, D], grown by torch.cat at every step (no paging);
  - attention by SDPA over the whole cache with an explicit boolean mask;
  - the MoE block as a Python loop over the experts, skipping those without tokens (torch.where, index_add_),
    fp32 router -> softmax -> top-k -> renormalise (sum + 1e-6) -> weights cast to the activation dtype;
  - greedy decoding; every sequence runs max_new_tokens steps (ignore_eos, as the benchmarks do).
Only the last position's logits are computed (transformers' logits_to_keep), so a long prefill does not
materialise [B, S, V] logits.

It reuses the loaded engine's weight tensors (engine.model): the real model fits on a GPU only once.
Legend: B batch, S sequence length (cached + new), T new tokens per step, H hidden, D head_dim,
Nq / Nkv query / key-value heads, E experts, k top_k, I expert intermediate size.
"""
import time

import torch
import torch.nn.functional as F


def rms_norm(x, weight, eps):
    # x: [..., H]; fp32 statistics, cast back, then scale (the model's XverseRMSNorm)
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def rotate(x, cos, sin):
    # x: [B, N, T, D]  cos, sin: [B, 1, T, D/2]; "rotate half" RoPE in fp32
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def swiglu(x, gate_weight, up_weight, down_weight):
    # x: [n, H] -> [n, H]: down(silu(gate(x)) * up(x))
    return F.linear(F.silu(F.linear(x, gate_weight)) * F.linear(x, up_weight), down_weight)


class ReferencePath:
    """HF-style greedy generation over an XverseForCausalLM's weights (shared, not copied)."""

    def __init__(self, model, config, pad_token_id: int = None):
        self.model, self.config = model, config
        self.pad_token_id = config.pad_token_id if pad_token_id is None else pad_token_id
        self.last_timing = {}   # ttft_s, decode_s, e2e_s, tpot_s of the last generate()

    # ---- one layer ------------------------------------------------------------------------------------
    def attention(self, layer, x, positions, cache, mask):
        # x: [B, T, H]  positions: [B, T]  cache: (k, v) [B, Nkv, S_old, D] or None  mask: [B, 1, T, S] bool
        attn, cfg = layer.self_attn, self.config
        B, T, _ = x.shape
        Nq, Nkv, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        q, k, v = F.linear(x, attn.qkv_proj.weight).split([Nq * D, Nkv * D, Nkv * D], dim=-1)
        q = q.view(B, T, Nq, D).transpose(1, 2)                                  # [B, Nq, T, D]
        k = k.view(B, T, Nkv, D).transpose(1, 2)                                 # [B, Nkv, T, D]
        v = v.view(B, T, Nkv, D).transpose(1, 2)
        cos = attn.rotary.cos[positions].unsqueeze(1)                            # [B, 1, T, D/2]
        sin = attn.rotary.sin[positions].unsqueeze(1)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        if cache is not None:  # the contiguous cache grows by one copy of itself per step
            k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)   # [B, Nkv, S, D]
        groups = Nq // Nkv  # grouped-query attention: each kv head serves `groups` query heads (repeat_kv)
        out = F.scaled_dot_product_attention(q, k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1),
                                             attn_mask=mask, scale=attn.scale)   # [B, Nq, T, D]
        return F.linear(out.transpose(1, 2).reshape(B, T, Nq * D), attn.o_proj.weight), (k, v)

    def moe(self, mlp, x):
        # x: [n, H] -> [n, H]; the per-expert loop of the model's own MoE block
        cfg = self.config
        I = cfg.intermediate_size
        probs = torch.softmax(F.linear(x.float(), mlp.router.weight), dim=-1)   # [n, E] fp32
        weights, experts = torch.topk(probs, cfg.moe_top_k, dim=-1)              # [n, k]
        weights = (weights / (weights.sum(dim=-1, keepdim=True) + 1e-6)).to(x.dtype)
        out = torch.zeros_like(x)
        expert_mask = F.one_hot(experts, cfg.num_experts).permute(2, 1, 0)       # [E, k, n]
        for e in range(cfg.num_experts):
            choice, token = torch.where(expert_mask[e])                          # which tokens chose e
            if token.shape[0] == 0:  # a host sync per expert, as in the original
                continue
            gate, up = mlp.w13[e, :I], mlp.w13[e, I:]                            # [I, H] each: views
            y = swiglu(x[token], gate, up, mlp.w2[e]) * weights[token, choice, None]
            out.index_add_(0, token, y)
        if mlp.shared_experts is not None:
            out = out + self.dense_mlp(mlp.shared_experts, x)
        elif mlp.w13.shape[0] > cfg.num_experts:  # the engine folds the shared MLP into experts E.. (halves of 2I)
            shared = 0
            for e in range(cfg.num_experts, mlp.w13.shape[0]):
                shared = shared + swiglu(x, mlp.w13[e, :I], mlp.w13[e, I:], mlp.w2[e])
            out = out + shared
        return out

    @staticmethod
    def dense_mlp(mlp, x):
        # a SwiGLU module with packed gate_up_proj [2I, H] and down_proj [H, I]
        gate, up = mlp.gate_up_proj.weight.chunk(2, dim=0)
        return swiglu(x, gate, up, mlp.down_proj.weight)

    def forward(self, input_ids, positions, caches, mask):
        # input_ids, positions: [B, T]  mask: [B, 1, T, S]  ->  last position's logits [B, V] fp32, new caches
        x = self.model.embed_tokens(input_ids)                                   # [B, T, H]
        new_caches = []
        for layer, cache in zip(self.model.layers, caches):
            h = rms_norm(x, layer.input_layernorm.weight, layer.input_layernorm.eps)
            h, cache = self.attention(layer, h, positions, cache, mask)
            new_caches.append(cache)
            x = x + h
            h = rms_norm(x, layer.post_attention_layernorm.weight, layer.post_attention_layernorm.eps)
            B, T, H = h.shape
            mlp = self.moe(layer.mlp, h.reshape(B * T, H)) if self.config.is_moe else \
                self.dense_mlp(layer.mlp, h.reshape(B * T, H))
            x = x + mlp.view(B, T, H)
        x = rms_norm(x[:, -1], self.model.norm.weight, self.model.norm.eps)      # [B, H]
        return self.model.compute_logits(x), new_caches

    # ---- generation ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, prompt_token_ids: list, max_new_tokens: int) -> list:
        """Greedy continuation of each prompt by max_new_tokens tokens; returns the new token ids."""
        device = self.model.embed_tokens.weight.device
        B, S = len(prompt_token_ids), max(len(p) for p in prompt_token_ids)
        start = time.perf_counter()
        ids = torch.full((B, S), self.pad_token_id, dtype=torch.int64)
        valid = torch.zeros((B, S), dtype=torch.bool)                            # attention_mask
        for i, prompt in enumerate(prompt_token_ids):
            ids[i, S - len(prompt):] = torch.tensor(prompt)
            valid[i, S - len(prompt):] = True
        ids, valid = ids.to(device), valid.to(device)
        positions = (valid.long().cumsum(-1) - 1).clamp(min=0)                   # [B, S], 0 at the first real token
        causal = torch.ones((S, S), dtype=torch.bool, device=device).tril()
        # padding keys masked; a padding query still sees itself, so no row is empty (no NaN in the cache)
        mask = (causal & valid[:, None, None, :]) | torch.eye(S, dtype=torch.bool, device=device)
        logits, caches = self.forward(ids, positions, [None] * len(self.model.layers), mask)
        next_token = logits.argmax(dim=-1)                                       # [B]
        generated = [next_token]
        self._sync(device)
        first_token = time.perf_counter()
        for _ in range(max_new_tokens - 1):
            valid = torch.cat([valid, valid.new_ones((B, 1))], dim=1)            # [B, S + 1]
            positions = positions[:, -1:] + 1                                    # [B, 1]
            logits, caches = self.forward(next_token[:, None], positions, caches, valid[:, None, None, :])
            next_token = logits.argmax(dim=-1)
            generated.append(next_token)
        tokens = torch.stack(generated, dim=1).tolist()                          # [B, max_new_tokens]
        end = time.perf_counter()
        self.last_timing = {"ttft_s": first_token - start, "decode_s": end - first_token, "e2e_s": end - start,
                            "tpot_s": (end - first_token) / (max_new_tokens - 1) if max_new_tokens > 1 else None}
        return tokens

    @staticmethod
    def _sync(device):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
