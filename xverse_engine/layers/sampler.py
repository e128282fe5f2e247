"""Turns the last position's logits of each sequence into the next token, all rows at once.

Order as transformers applies it: repetition penalty, temperature, top-k, top-p, then a draw. Greedy
rows take the argmax of the penalised logits. Sampled rows use the Gumbel-max trick with noise from a
counter-based hash of (request seed, step, token id): no generator state, no host sync, and a request's
draws depend only on its own seed and position, never on which other requests share the batch.

No full-vocabulary sort: top-k and top-p only ever keep tokens among the K = max(top_k) best, so one
`topk(K)` gives them in order, and the softmax / cumulative sum of top-p run over those K survivors. The
noise is the same function of the token id either way, so the draw equals a draw over the whole masked
vocabulary. Rows without top-k or top-p draw over the whole vocabulary (an argmax, no sort). The one case
that needs every token ordered is top-p without top-k: the caller then passes K = V, a full sort.
K comes from the host's sampling parameters, so nothing here waits for the device. After the `topk`, the draw
among the survivors (top-k, top-p, noise, argmax) is one fused op, ops.sampling.draw_top_k_top_p, or its
PyTorch twin when kernels="torch".
"""
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

# the noise and the top-k / top-p rule live with the fused draw op (ops/sampling.py)
from ..ops.sampling import draw_top_k_top_p, gumbel_noise_at, removed_ranks as _removed_ranks, row_keys


@dataclass
class SamplingBatch:
    """Per-row sampling settings for B rows, already on the logits' device."""
    temperatures: torch.Tensor              # [B] fp32, 0 = greedy
    top_ks: torch.Tensor                    # [B] int64, 0 = off
    top_ps: torch.Tensor                    # [B] fp32, 1 = off
    repetition_penalties: torch.Tensor      # [B] fp32, 1 = off
    seeds: torch.Tensor                     # [B] int64
    steps: torch.Tensor                     # [B] int64: tokens this request generated so far
    seen_token_ids: Optional[torch.Tensor] = None  # [B, L] int64 ids seen, padded with -1 (reference form)
    num_logprobs: int = -1                  # the largest top-n asked for in the batch; -1 = none asked
    all_greedy: bool = False
    any_top_k: bool = False
    any_top_p: bool = False
    seen_mask: Optional[torch.Tensor] = None  # [B, V] bool: tokens seen (prompt + output); the engine's form
    num_candidates: int = 0                 # K: covers every top-k / top-p row (0: the whole vocabulary)
    any_unfiltered: bool = True             # some sampled row has neither top-k nor top-p
    all_sampled: bool = False               # every row samples (temperature > 0): no greedy rows to merge
    keys: Optional[torch.Tensor] = None     # [B] int64 row_keys(seeds, steps), computed on the host
    penalties_at_least_one: bool = False    # every repetition penalty >= 1 (the usual case: fewer ops)


class TopLogprobs(NamedTuple):
    chosen: torch.Tensor                    # [B] fp32: logprob of the sampled token
    values: torch.Tensor                    # [B, n] fp32: the n best logprobs, best first
    token_ids: torch.Tensor                 # [B, n] int64


def gumbel_noise(seeds, steps, vocab_size: int, keys=None):
    """The noise of every token: [B, V]."""
    device = (seeds if keys is None else keys).device
    return gumbel_noise_at(seeds, steps, torch.arange(vocab_size, device=device, dtype=torch.int64), keys)


def apply_repetition_penalty(logits, seen_token_ids, penalties):
    # logits: [B, V]; seen_token_ids: [B, L] padded with -1. The reference form of the mask version below.
    vocab = logits.shape[-1]
    # padding (-1) goes to an extra column that is dropped, so it can never unmark a real token
    index = torch.where(seen_token_ids >= 0, seen_token_ids, vocab)
    seen = torch.zeros((logits.shape[0], vocab + 1), dtype=torch.bool, device=logits.device)
    seen.scatter_(1, index, True)
    return apply_repetition_penalty_mask(logits, seen[:, :vocab], penalties)


def apply_repetition_penalty_mask(logits, seen, penalties, at_least_one: bool = False):
    # logits: [B, V]; seen: [B, V] bool. Seen tokens' logits divided (if > 0) or multiplied (if <= 0) by the
    # penalty, as transformers does. When every penalty is >= 1 that is the smaller of the two, exactly (one
    # cheap minimum instead of a comparison and a select); at_least_one says so (the caller knows the settings)
    penalty = penalties[:, None]
    if at_least_one:
        penalised = torch.minimum(logits * penalty, logits / penalty)
    else:
        penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def filter_top_k_top_p(logits, top_ks, top_ps, any_top_k: bool, any_top_p: bool):
    """Full-vocabulary reference (one sort of [B, V]): the same logits with filtered tokens at -inf."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    remove = _removed_ranks(sorted_logits, top_ks, top_ps, any_top_k, any_top_p)
    remove_in_place = torch.zeros_like(remove).scatter_(1, order, remove)
    return logits.masked_fill(remove_in_place, float("-inf"))


def _draw_filtered(scaled, batch: SamplingBatch, kernels: str):
    # scaled: [B, V] -> [B] token drawn among the top-k / top-p survivors: one topk, then the fused draw
    k = batch.num_candidates or scaled.shape[-1]
    values, token_ids = scaled.topk(min(k, scaled.shape[-1]), dim=-1)                  # [B, K] best first
    keys = batch.keys if batch.keys is not None else row_keys(batch.seeds, batch.steps)
    return draw_top_k_top_p(values, token_ids, batch.top_ks, batch.top_ps, keys, kernels)


def sample(logits, batch: SamplingBatch, kernels: str = "torch"):
    """logits: [B, V] fp32 -> (next token ids [B] int64, TopLogprobs of the raw logits, or None). kernels: who
    draws among the top-k / top-p survivors ("torch": the twin; "cpu" / "cuda": the fused op)."""
    top = None
    if batch.num_logprobs >= 0:
        logprobs = torch.log_softmax(logits, dim=-1)
    if batch.seen_mask is not None:
        logits = apply_repetition_penalty_mask(logits, batch.seen_mask, batch.repetition_penalties,
                                               batch.penalties_at_least_one)
    elif batch.seen_token_ids is not None:
        logits = apply_repetition_penalty(logits, batch.seen_token_ids, batch.repetition_penalties)
    if not batch.all_sampled:
        tokens = logits.argmax(dim=-1)
    if not batch.all_greedy:
        if batch.all_sampled:
            scaled = logits / batch.temperatures[:, None]
        else:
            sampled = batch.temperatures > 0
            scaled = logits / torch.where(sampled, batch.temperatures, 1.0)[:, None]
        if batch.any_top_k or batch.any_top_p:
            drawn = _draw_filtered(scaled, batch, kernels)
            if batch.any_unfiltered:
                filtered = (batch.top_ks > 0) | (batch.top_ps < 1)
                whole = (scaled + gumbel_noise(batch.seeds, batch.steps, logits.shape[-1], batch.keys)).argmax(-1)
                drawn = torch.where(filtered, drawn, whole)
        else:
            drawn = (scaled + gumbel_noise(batch.seeds, batch.steps, logits.shape[-1], batch.keys)).argmax(dim=-1)
        tokens = drawn if batch.all_sampled else torch.where(sampled, drawn, tokens)
    if batch.num_logprobs >= 0:
        values, token_ids = logprobs.topk(max(batch.num_logprobs, 1), dim=-1)
        top = TopLogprobs(logprobs.gather(1, tokens[:, None]).squeeze(1), values, token_ids)
    return tokens, top
