"""Turns the last position's logits of each sequence into the next token, all rows at once.

Order as transformers applies it: repetition penalty, temperature, top-k, top-p, then a draw. Greedy
rows take the argmax of the penalised logits. Sampled rows use the Gumbel-max trick with noise from a
counter-based hash of (request seed, step, token id): no generator state, no host sync, and a request's
draws depend only on its own seed and position, never on which other requests share the batch.
"""
from dataclasses import dataclass
from typing import Optional

import torch

MASK32 = 0xFFFFFFFF


@dataclass
class SamplingBatch:
    """Per-row sampling settings for B rows, already on the logits' device."""
    temperatures: torch.Tensor              # [B] fp32, 0 = greedy
    top_ks: torch.Tensor                    # [B] int64, 0 = off
    top_ps: torch.Tensor                    # [B] fp32, 1 = off
    repetition_penalties: torch.Tensor      # [B] fp32, 1 = off
    seeds: torch.Tensor                     # [B] int64
    steps: torch.Tensor                     # [B] int64: tokens this request generated so far
    seen_token_ids: Optional[torch.Tensor]  # [B, L] int64 of prompt + output ids, padded with -1; None if no penalty
    num_logprobs: int                       # the largest top-n asked for in the batch; -1 = none asked
    all_greedy: bool
    any_top_k: bool
    any_top_p: bool


def _fmix32(x):
    # the murmur3 finaliser on values held in int64 (only the low 32 bits are kept)
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & MASK32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & MASK32
    return x ^ (x >> 16)


def gumbel_noise(seeds, steps, vocab_size: int):
    """Deterministic Gumbel(0, 1) noise [B, V] from (seed, step, token id)."""
    seeds = seeds & MASK32 ^ ((seeds >> 32) & MASK32)
    row = _fmix32(seeds ^ _fmix32((steps * 0x9E3779B9) & MASK32))                      # [B]
    token = torch.arange(vocab_size, device=seeds.device, dtype=torch.int64)
    bits = _fmix32((row[:, None] ^ ((token[None, :] * 0x27D4EB2F) & MASK32)) & MASK32)  # [B, V]
    uniform = ((bits >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))                 # (0, 1)
    return -torch.log(-torch.log(uniform))


def apply_repetition_penalty(logits, seen_token_ids, penalties):
    # logits: [B, V]; seen tokens' logits divided (if > 0) or multiplied (if < 0) by the penalty, as HF
    vocab = logits.shape[-1]
    # padding (-1) goes to an extra column that is dropped, so it can never unmark a real token
    index = torch.where(seen_token_ids >= 0, seen_token_ids, vocab)
    seen = torch.zeros((logits.shape[0], vocab + 1), dtype=torch.bool, device=logits.device)
    seen.scatter_(1, index, True)
    seen = seen[:, :vocab]
    penalty = penalties[:, None].expand_as(logits)
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def filter_top_k_top_p(logits, top_ks, top_ps, any_top_k: bool, any_top_p: bool):
    # logits: [B, V] (already divided by temperature) -> the same with filtered tokens at -inf
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    remove = torch.zeros_like(sorted_logits, dtype=torch.bool)
    if any_top_k:
        ranks = torch.arange(vocab, device=logits.device)[None, :]
        k = torch.where(top_ks > 0, top_ks, vocab)[:, None]
        remove |= ranks >= k
    if any_top_p:
        probs = sorted_logits.masked_fill(remove, float("-inf")).softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        remove |= mass_before >= top_ps[:, None]     # keep the smallest prefix reaching top_p (>= 1 token)
    remove_in_place = torch.zeros_like(remove).scatter_(1, order, remove)
    return logits.masked_fill(remove_in_place, float("-inf"))


def sample(logits, batch: SamplingBatch):
    """logits: [B, V] fp32 -> (next token ids [B] int64, logprobs [B, V] of the raw logits or None)."""
    logprobs = torch.log_softmax(logits, dim=-1) if batch.num_logprobs >= 0 else None
    if batch.seen_token_ids is not None:
        logits = apply_repetition_penalty(logits, batch.seen_token_ids, batch.repetition_penalties)
    greedy_tokens = logits.argmax(dim=-1)
    if batch.all_greedy:
        return greedy_tokens, logprobs
    temperatures = torch.where(batch.temperatures > 0, batch.temperatures, torch.ones_like(batch.temperatures))
    scaled = logits / temperatures[:, None]
    if batch.any_top_k or batch.any_top_p:
        scaled = filter_top_k_top_p(scaled, batch.top_ks, batch.top_ps, batch.any_top_k, batch.any_top_p)
    drawn = (scaled + gumbel_noise(batch.seeds, batch.steps, logits.shape[-1])).argmax(dim=-1)
    return torch.where(batch.temperatures > 0, drawn, greedy_tokens), logprobs
