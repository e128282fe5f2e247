"""Independent pure-PyTorch reference of the XVERSE decoder (dense and MoE), written from MODEL.md.

It is the judge of the engine in tests, so it is deliberately plain: no KV cache (every call
recomputes the whole sequence), a Python loop over experts, Hugging Face weight names read
straight from a state dict. It must never import xverse_engine.

Dtype rules (as the model's own code):
- RMSNorm: normalise in fp32, cast back to the activation dtype, then multiply by the weight.
- RoPE: inv_freq, angles, cos and sin in fp32 ("rotate half", full head_dim), then cast.
- Router: input cast to fp32, fp32 weight, fp32 softmax / top-k / renormalisation.
- Attention softmax in fp32, cast back.
In float64 mode everything that is "fp32 inside" runs in float64 instead (except RoPE's
cos/sin table, which the engine also builds in fp32), so the reference is as exact as it can be.

The code is dtype-generic and autograd-friendly: scripts/make_tiny_model.py trains through
`reference_forward` in float32.

Legend: B batch, S sequence, H hidden, N heads, K kv heads, D head_dim, E experts, k top-k,
I expert intermediate, V vocab, T = B*S tokens.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

Tensor = torch.Tensor
ROUTER_EPS = 1e-6  # added to the sum of the top-k weights before renormalising (model's code)


# ----------------------------------------------------------------------------- config helpers

def is_moe(config: dict) -> bool:
    """MoE iff num_experts is set (MODEL.md: same architecture name as the dense models)."""
    return config.get("num_experts") is not None


def head_dim(config: dict) -> int:
    return config["hidden_size"] // config["num_attention_heads"]


def num_kv_heads(config: dict) -> int:
    return config.get("num_key_value_heads") or config["num_attention_heads"]


def _inner(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the model's "fp32 inside" computations: fp32, or float64 in float64 mode."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------- building blocks

def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    # x: [..., H]; statistics in fp32 (float64 in float64 mode), weight applied after the cast back.
    xf = x.to(_inner(x.dtype))
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rope_inv_freq(config: dict, seq_len: int) -> Tensor:
    """inv_freq [D/2] in fp32, with dynamic NTK scaling applied when the config asks for it."""
    d = head_dim(config)
    base = float(config.get("rope_theta", 10000.0))
    scaling = config.get("rope_scaling") or {}
    max_pos = config.get("max_position_embeddings", 8192)
    if scaling.get("type") == "dynamic" and seq_len > max_pos:
        # HF "dynamic NTK": the base grows once the sequence is longer than the trained length.
        # With full recomputation the whole sequence uses the base of its current length.
        factor = float(scaling["factor"])
        base = base * ((factor * seq_len / max_pos) - (factor - 1)) ** (d / (d - 2))
    return 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))


def rope_cos_sin(config: dict, positions: Tensor, dtype: torch.dtype, seq_len: int | None = None) -> tuple[Tensor, Tensor]:
    """cos, sin: [S, D] for integer positions [S], computed in fp32 then cast to `dtype`."""
    inv_freq = rope_inv_freq(config, int(positions.max()) + 1 if seq_len is None else seq_len)
    t = positions.to(torch.float32)
    scaling = config.get("rope_scaling") or {}
    if scaling.get("type") == "linear":
        t = t / float(scaling["factor"])  # position interpolation
    freqs = torch.outer(t, inv_freq)  # [S, D/2]
    emb = torch.cat([freqs, freqs], dim=-1)  # [S, D]: non-interleaved halves
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: Tensor) -> Tensor:
    # x: [..., D] -> [-x2, x1]
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    # x: [B, N, S, D]; cos, sin: [S, D]
    return x * cos + rotate_half(x) * sin


def attention(x: Tensor, p: dict, pre: str, config: dict, cos: Tensor, sin: Tensor) -> Tensor:
    # x: [B, S, H] -> [B, S, H]; plain causal multi-head (or grouped-query) attention
    B, S, _ = x.shape
    N, K, D = config["num_attention_heads"], num_kv_heads(config), head_dim(config)
    q = (x @ p[pre + "q_proj.weight"].T).view(B, S, N, D).transpose(1, 2)  # [B, N, S, D]
    k = (x @ p[pre + "k_proj.weight"].T).view(B, S, K, D).transpose(1, 2)  # [B, K, S, D]
    v = (x @ p[pre + "v_proj.weight"].T).view(B, S, K, D).transpose(1, 2)  # [B, K, S, D]
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    # GQA: query head h reads kv head h // (N / K)
    k = k.repeat_interleave(N // K, dim=1)  # [B, N, S, D]
    v = v.repeat_interleave(N // K, dim=1)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(D)  # [B, N, S, S]
    causal = torch.ones(S, S, dtype=torch.bool, device=x.device).tril()
    scores = scores.masked_fill(~causal, float("-inf"))
    probs = torch.softmax(scores.to(_inner(x.dtype)), dim=-1).to(x.dtype)
    out = (probs @ v).transpose(1, 2).reshape(B, S, N * D)  # [B, S, H]
    return out @ p[pre + "o_proj.weight"].T


def swiglu(x: Tensor, p: dict, pre: str) -> Tensor:
    # x: [T, H] -> [T, H]; down(silu(gate(x)) * up(x))
    gate = x @ p[pre + "gate_proj.weight"].T
    up = x @ p[pre + "up_proj.weight"].T
    return (F.silu(gate) * up) @ p[pre + "down_proj.weight"].T


def route(probs: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
    """Top-k of router probabilities [T, E] -> (renormalised weights [T, k], expert ids [T, k]).

    A stable descending sort keeps equal values in index order, so ties go to the lower expert id.
    """
    vals, ids = torch.sort(probs, dim=-1, descending=True, stable=True)
    vals, ids = vals[:, :top_k], ids[:, :top_k]
    return vals / (vals.sum(dim=-1, keepdim=True) + ROUTER_EPS), ids


def moe(x: Tensor, p: dict, pre: str, config: dict) -> Tensor:
    # x: [T, H] (post-attention-norm output) -> [T, H]
    E, k = config["num_experts"], config["moe_top_k"]
    rd = _inner(x.dtype)
    logits = x.to(rd) @ p[pre + "router.weight"].to(rd).T  # [T, E] fp32 router
    weights, ids = route(torch.softmax(logits, dim=-1), k)  # [T, k], [T, k]
    weights = weights.to(x.dtype)
    out = torch.zeros_like(x)
    for e in range(E):
        tok, slot = (ids == e).nonzero(as_tuple=True)  # tokens that chose expert e, and in which slot
        if tok.numel() == 0:
            continue
        y = swiglu(x[tok], p, f"{pre}experts.{e}.") * weights[tok, slot, None]  # [t_e, H]
        out = out.index_add(0, tok, y)
    if config.get("num_shared_experts"):
        out = out + swiglu(x, p, pre + "shared_experts.")  # merged shared expert, added after
    return out


def router_choice(x: Tensor, router_weight: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
    """The MoE routing alone, for tests: hidden [T, H] -> (weights [T, k] fp32+, ids [T, k])."""
    rd = _inner(x.dtype)
    return route(torch.softmax(x.to(rd) @ router_weight.to(rd).T, dim=-1), top_k)


# ----------------------------------------------------------------------------- the model

def reference_forward(params: dict[str, Tensor], config: dict, input_ids: Tensor) -> Tensor:
    """Full forward of a batch of equal-length sequences, no cache, no padding.

    params: HF-named tensors, all in the compute dtype (the router may stay fp32).
    input_ids: [B, S] int64. Returns logits [B, S, V] in the compute dtype.
    """
    p = params
    B, S = input_ids.shape
    eps = config.get("rms_norm_eps", 1e-6)
    x = p["model.embed_tokens.weight"][input_ids]  # [B, S, H]
    cos, sin = rope_cos_sin(config, torch.arange(S), x.dtype, seq_len=S)  # [S, D]
    for i in range(config["num_hidden_layers"]):
        pre = f"model.layers.{i}."
        h = rms_norm(x, p[pre + "input_layernorm.weight"], eps)
        x = x + attention(h, p, pre + "self_attn.", config, cos, sin)
        h = rms_norm(x, p[pre + "post_attention_layernorm.weight"], eps).reshape(B * S, -1)  # [T, H]
        if is_moe(config):
            m = moe(h, p, pre + "mlp.", config)
        else:
            m = swiglu(h, p, pre + "mlp.")
        x = x + m.view(B, S, -1)
    x = rms_norm(x, p["model.norm.weight"], eps)
    return x @ p["lm_head.weight"].T  # [B, S, V]


def cast_state_dict(state_dict: dict[str, Tensor], dtype: torch.dtype) -> dict[str, Tensor]:
    """Every tensor in `dtype`, except router weights, which stay at least fp32."""
    return {
        name: t.to(_inner(dtype) if name.endswith("mlp.router.weight") else dtype)
        for name, t in state_dict.items()
    }


@torch.no_grad()
def reference_logits(state_dict: dict[str, Tensor], config: dict, input_ids: list[int],
                     dtype: torch.dtype = torch.float64) -> Tensor:
    """Logits [len(input_ids), V] of one sequence, computed from scratch in `dtype` on CPU."""
    p = cast_state_dict(state_dict, dtype)
    ids = torch.tensor([list(input_ids)], dtype=torch.int64)
    return reference_forward(p, config, ids)[0]


def apply_repetition_penalty(logits: Tensor, seen_ids: list[int], penalty: float) -> Tensor:
    """HF semantics: for every id already seen, positive logits / penalty, negative * penalty."""
    if penalty == 1.0 or not seen_ids:
        return logits
    logits = logits.clone()
    ids = torch.tensor(sorted(set(seen_ids)), dtype=torch.int64)
    s = logits[ids]
    logits[ids] = torch.where(s < 0, s * penalty, s / penalty)
    return logits


@torch.no_grad()
def reference_greedy(state_dict: dict[str, Tensor], config: dict, prompt_ids: list[int],
                     max_new_tokens: int, *, dtype: torch.dtype = torch.float64,
                     repetition_penalty: float = 1.0, eos_token_id: int | None = None) -> list[int]:
    """Greedy continuation by full recomputation at every step. Returns the NEW token ids only.

    Stops after max_new_tokens, or after emitting eos_token_id (included) when one is given.
    Ties in argmax go to the lowest token id (torch.argmax returns the first maximum).
    """
    p = cast_state_dict(state_dict, dtype)
    ids = list(prompt_ids)
    new: list[int] = []
    for _ in range(max_new_tokens):
        logits = reference_forward(p, config, torch.tensor([ids], dtype=torch.int64))[0, -1]  # [V]
        logits = apply_repetition_penalty(logits, ids, repetition_penalty)
        nxt = int(torch.argmax(logits))
        ids.append(nxt)
        new.append(nxt)
        if eos_token_id is not None and nxt == eos_token_id:
            break
    return new
