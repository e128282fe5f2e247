"""The sampler's rules on hand-made logits, without a model (milliseconds; the statistical tests through the
engine are in test_spec_sampler.py):

- the noise is the documented counter-based hash of (seed, step, token id), recomputed here in plain Python;
- a sampled row draws argmax(penalised logits / T + noise) over the tokens top-k, then top-p (over the
  renormalised survivors, transformers' order) keep; a greedy row takes the argmax of the penalised logits;
- every row's draw is the same alone as in any batch, and the same whatever candidate width K is used;
- logprobs are the log-softmax of the raw logits.
"""
import math

import pytest
import torch

from xverse_engine.ops import extension_available
from xverse_engine.layers.sampler import (SamplingBatch, apply_repetition_penalty, apply_repetition_penalty_mask,
                                          filter_top_k_top_p, gumbel_noise, gumbel_noise_at, row_keys, sample)

M32 = 0xFFFFFFFF


def fmix32(x: int) -> int:
    """murmur3's 32-bit finaliser."""
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & M32
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & M32
    return x ^ (x >> 16)


def spec_key(seed: int, step: int) -> int:
    """A row's key: the seed's two 32-bit halves folded, mixed with the hashed step."""
    seed %= 1 << 64
    return fmix32((seed & M32) ^ (seed >> 32) ^ fmix32((step * 0x9E3779B9) & M32))


def spec_noise(seed: int, step: int, token: int) -> float:
    """Gumbel(0, 1) from the top 24 bits of the hash of (row key, token id), at the centre of its bucket."""
    bits = fmix32(spec_key(seed, step) ^ ((token * 0x27D4EB2F) & M32))
    uniform = ((bits >> 8) + 0.5) / (1 << 24)
    return -math.log(-math.log(uniform))


SEEDS = [0, 1, 12345, 2**31 + 7, 2**40 + 3, -5, -(2**63)]


def test_row_keys_are_the_documented_hash():
    seeds = torch.tensor(SEEDS, dtype=torch.int64)
    steps = torch.tensor([0, 1, 7, 100, 3, 2, 9], dtype=torch.int64)
    assert row_keys(seeds, steps).tolist() == [spec_key(s, t) for s, t in zip(SEEDS, steps.tolist())]


def test_the_hosts_row_keys_are_the_documented_hash():
    # the engine computes the keys on the host, with the seeds folded once per batch and 32-bit arithmetic
    import numpy as np
    from xverse_engine.ops.sampling import fold_seeds, row_keys_host
    seeds = np.array(SEEDS, dtype=np.int64)
    steps = np.array([0, 1, 7, 100, 3, 2, 9], dtype=np.int64) + np.array([0, 0, 0, 0, 1 << 33, 123457, 5])
    keys = row_keys_host(fold_seeds(seeds), steps)
    assert keys.dtype == np.uint32
    assert keys.tolist() == [spec_key(s, t) for s, t in zip(SEEDS, steps.tolist())]


def test_noise_is_the_documented_hash_of_seed_step_and_token():
    seeds = torch.tensor(SEEDS, dtype=torch.int64)
    steps = torch.arange(len(SEEDS), dtype=torch.int64) * 3
    tokens = torch.tensor([0, 1, 2, 511, 65535, 100_000], dtype=torch.int64)
    expected = torch.tensor([[spec_noise(s, t, k) for k in tokens.tolist()] for s, t in zip(SEEDS, steps.tolist())],
                            dtype=torch.float64)
    torch.testing.assert_close(gumbel_noise_at(seeds, steps, tokens).double(), expected, rtol=1e-5, atol=1e-5)
    # the same noise per token whether asked for some token ids or the whole vocabulary
    whole = gumbel_noise(seeds, steps, 600)
    torch.testing.assert_close(whole[:, [0, 1, 2, 511]], gumbel_noise_at(seeds, steps, tokens[:4]))
    keys = row_keys(seeds, steps)
    assert torch.equal(gumbel_noise(None, None, 600, keys=keys), whole)


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_seen_tokens():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5, 3.0, 0.0]])
    seen = torch.tensor([[0, 1, 3, 5, -1, -1]])            # padded with -1: must not mark the last token
    penalised = apply_repetition_penalty(logits, seen, torch.tensor([2.0]))
    assert penalised.tolist() == [[1.0, -4.0, 1.0, 0.25, 3.0, 0.0]]
    mask = torch.tensor([[True, True, False, True, False, True]])
    assert torch.equal(apply_repetition_penalty_mask(logits, mask, torch.tensor([2.0])), penalised)


def test_the_penalty_shortcut_for_penalties_of_at_least_one_is_exact():
    # at_least_one (every penalty >= 1) takes the smaller of logit / p and logit * p: bit for bit the same rule
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn((6, 64), generator=generator) * 5
    logits[:, :4] = torch.tensor([0.0, -0.0, float("inf"), float("-inf")])
    seen = torch.rand((6, 64), generator=generator) < 0.5
    penalties = torch.tensor([1.0, 1.1, 1.3, 2.0, 1.0000001, 17.0])
    reference = apply_repetition_penalty_mask(logits, seen, penalties)
    shortcut = apply_repetition_penalty_mask(logits, seen, penalties, at_least_one=True)
    assert torch.equal(shortcut, reference)
    assert torch.equal(torch.signbit(shortcut), torch.signbit(reference))   # -0.0 stays -0.0
    below_one = torch.tensor([0.5, 1.1, 1.1, 1.1, 1.1, 1.1])   # a penalty < 1 (a bonus): the shortcut is wrong
    assert not torch.equal(apply_repetition_penalty_mask(logits, seen, below_one, at_least_one=True),
                           apply_repetition_penalty_mask(logits, seen, below_one))


PROBS = [0.05, 0.5, 0.1, 0.2, 0.15]                        # ranks: 1, 3, 4, 2, 0


@pytest.mark.parametrize("top_k, top_p, kept", [
    (0, 1.0, [0, 1, 2, 3, 4]),
    (3, 1.0, [1, 3, 4]),
    (0, 0.45, [1]),                 # the smallest prefix reaching top_p: 0.5 alone
    (0, 0.55, [1, 3]),
    (0, 0.75, [1, 3, 4]),           # 0.5 + 0.2 = 0.7 < 0.75: one more
    (3, 0.8, [1, 3]),               # renormalised over the top 3: 0.588, 0.824 reaches 0.8
    (2, 0.6, [1]),                  # top 2 renormalised: 0.714 alone reaches 0.6 (unrenormalised 0.5 would not)
])
def test_top_k_then_top_p_over_the_renormalised_survivors(top_k, top_p, kept):
    logits = torch.tensor([PROBS]).log()
    filtered = filter_top_k_top_p(logits, torch.tensor([top_k]), torch.tensor([top_p]), top_k > 0, top_p < 1)
    assert torch.isfinite(filtered[0]).nonzero().flatten().tolist() == kept
    assert torch.equal(filtered[0, kept], logits[0, kept])


@pytest.mark.parametrize("top_p, kept", [(0.5, [0]), (0.75, [0, 1]), (0.7500001, [0, 1, 2])])
def test_top_p_keeps_the_smallest_prefix_whose_mass_reaches_it_exactly(top_p, kept):
    logits = torch.tensor([[0.5, 0.25, 0.125, 0.125]]).log()      # exact in fp32: masses 0.5, 0.75, 0.875
    filtered = filter_top_k_top_p(logits, torch.tensor([0]), torch.tensor([top_p]), False, True)
    assert torch.isfinite(filtered[0]).nonzero().flatten().tolist() == kept


def spec_draw(logits, seed, step, temperature, top_k=0, top_p=1.0, penalty=1.0, seen=()):
    """The token a row draws, computed from the rules alone (float64, plain loops over the vocabulary)."""
    logits = [float(x) for x in logits]
    for t in set(seen):
        logits[t] = logits[t] / penalty if logits[t] > 0 else logits[t] * penalty
    if temperature == 0:
        return max(range(len(logits)), key=lambda t: logits[t])
    scaled = [x / temperature for x in logits]
    order = sorted(range(len(scaled)), key=lambda t: -scaled[t])
    survivors = order[:top_k] if top_k > 0 else order
    weights = [math.exp(scaled[t] - scaled[survivors[0]]) for t in survivors]
    total, mass, kept = sum(weights), 0.0, []
    for t, w in zip(survivors, weights):
        if mass >= top_p:
            break
        kept.append(t)
        mass += w / total
    return max(kept, key=lambda t: scaled[t] + spec_noise(seed, step, t))


def make_batch(rows, vocab, num_logprobs=-1, keys=False):
    """SamplingBatch of rows = [(seed, step, temperature, top_k, top_p, penalty, seen)], flags set as the
    engine sets them."""
    seeds = torch.tensor([r[0] for r in rows], dtype=torch.int64)
    steps = torch.tensor([r[1] for r in rows], dtype=torch.int64)
    temps = torch.tensor([r[2] for r in rows], dtype=torch.float32)
    top_ks = torch.tensor([r[3] for r in rows], dtype=torch.int64)
    top_ps = torch.tensor([r[4] for r in rows], dtype=torch.float32)
    penalties = torch.tensor([r[5] for r in rows], dtype=torch.float32)
    seen_mask = torch.zeros(len(rows), vocab, dtype=torch.bool)
    for i, r in enumerate(rows):
        seen_mask[i, list(r[6])] = True
    sampled = temps > 0
    filtered = sampled & ((top_ks > 0) | (top_ps < 1))
    widths = torch.where(top_ks[filtered] > 0, top_ks[filtered].clamp(max=vocab), vocab)
    return SamplingBatch(
        temperatures=temps, top_ks=top_ks, top_ps=top_ps, repetition_penalties=penalties,
        seeds=None if keys else seeds, steps=None if keys else steps, keys=row_keys(seeds, steps) if keys else None,
        seen_mask=seen_mask if bool((penalties != 1).any()) else None, num_logprobs=num_logprobs,
        all_greedy=not bool(sampled.any()), all_sampled=bool(sampled.all()),
        any_top_k=bool((top_ks[sampled] > 0).any()), any_top_p=bool((top_ps[sampled] < 1).any()),
        num_candidates=int(widths.max()) if len(widths) else 0, any_unfiltered=bool((sampled & ~filtered).any()))


VOCAB = 64
# who draws among the top-k / top-p survivors: the twin, and the fused C++ op when the extension is built
KERNELS = ["torch", pytest.param("cpu", marks=pytest.mark.skipif(
    not extension_available(), reason="the C++ extension is not built (pip install -e .)"))]
ROWS = [   # (seed, step, temperature, top_k, top_p, repetition penalty, seen tokens)
    (11, 0, 0.0, 0, 1.0, 1.0, ()),              # greedy
    (12, 3, 1.0, 0, 1.0, 1.0, ()),              # the whole vocabulary
    (13, 1, 0.5, 0, 1.0, 1.0, ()),              # T = 0.5
    (14, 2, 2.0, 5, 1.0, 1.0, ()),              # top-k
    (15, 0, 1.0, 0, 0.6, 1.0, ()),              # top-p alone (needs every token ordered)
    (16, 5, 0.7, 30, 0.85, 1.0, ()),            # the checkpoint's defaults: both
    (17, 4, 1.3, 8, 0.9, 1.5, (0, 1, 2, 3)),    # and a repetition penalty
    (18, 9, 0.0, 4, 0.5, 1.3, (5, 6)),          # greedy with a penalty; its filters do not matter
    (19, 6, 1.5, 1, 1.0, 1.0, ()),              # top-k 1: the best token, whatever the noise
]


# every setting above with five seeds
MANY = [(seed + 1000 * j, *rest) for j in range(5) for seed, *rest in ROWS]


def logits_for(num_rows, seed=0):
    """Logits spread like a model's (std 1.5): the noise often picks another token than the argmax."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(num_rows, VOCAB, generator=generator) * 1.5


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("keys", [False, True])
def test_each_row_draws_what_the_rules_say_in_a_mixed_batch(keys, kernels):
    logits = logits_for(len(MANY))
    tokens, top = sample(logits, make_batch(MANY, VOCAB, keys=keys), kernels)
    expected = [spec_draw(logits[i], *r) for i, r in enumerate(MANY)]
    assert tokens.tolist() == expected and top is None
    # the test can tell a draw from the argmax: most sampled rows do not take it
    sampled = [i for i, r in enumerate(MANY) if r[2] > 0 and r[3] != 1]
    assert sum(tokens[i].item() != logits[i].argmax().item() for i in sampled) > len(sampled) // 2


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("index", range(len(ROWS)))
def test_a_row_draws_the_same_alone(index, kernels):
    logits = logits_for(len(ROWS))
    together, _ = sample(logits, make_batch(ROWS, VOCAB), kernels)
    alone, _ = sample(logits[index:index + 1], make_batch(ROWS[index:index + 1], VOCAB), kernels)
    assert alone.item() == together[index].item()


@pytest.mark.parametrize("kernels", KERNELS)
def test_unfiltered_rows_draw_over_the_whole_vocabulary_beside_narrow_top_k_rows(kernels):
    rows = [(s, 0, 1.0, 3, 1.0, 1.0, ()) if s % 2 else (s, 0, 1.3, 0, 1.0, 1.0, ()) for s in range(16)]
    logits = logits_for(16, seed=5)
    batch = make_batch(rows, VOCAB)
    assert batch.num_candidates == 3 and batch.any_unfiltered
    tokens, _ = sample(logits, batch, kernels)
    assert tokens.tolist() == [spec_draw(logits[i], *r) for i, r in enumerate(rows)]
    top3 = logits.topk(3).indices
    assert any(tokens[i] not in top3[i] for i in range(0, 16, 2))     # the test can tell


def test_the_reference_form_of_the_seen_tokens_gives_the_same_draws():
    """seen_token_ids [B, L] padded with -1 (the reference form) penalises exactly like the engine's mask."""
    logits = logits_for(len(MANY), seed=6)
    batch = make_batch(MANY, VOCAB)
    seen = [sorted(r[6]) + [-1] * (4 - len(r[6])) for r in MANY]
    batch.seen_token_ids, batch.seen_mask = torch.tensor(seen, dtype=torch.int64), None
    tokens, _ = sample(logits, batch)
    assert tokens.tolist() == [spec_draw(logits[i], *r) for i, r in enumerate(MANY)]


def test_all_sampled_and_all_greedy_batches_follow_the_same_rules():
    logits = logits_for(8, seed=1)
    for rows in ([r for r in ROWS if r[2] > 0], [r for r in ROWS if r[2] == 0]):
        tokens, _ = sample(logits[:len(rows)], make_batch(rows, VOCAB))
        assert tokens.tolist() == [spec_draw(logits[i], *r) for i, r in enumerate(rows)]


def test_temperature_sharpens_and_flattens_the_draws():
    """Over many seeds: T -> 0 is greedy, T = 0.5 draws from softmax(2 * logits) (checked exactly against the
    rule, and it differs from T = 1 draws)."""
    logits = torch.tensor([1.0, 0.8, 0.5, 0.0, -1.0] + [-9.0] * (VOCAB - 5))
    seeds = range(200)
    cold = [r.item() for r in sample(logits.repeat(200, 1), make_batch([(s, 0, 1e-4, 0, 1.0, 1.0, ()) for s in seeds],
                                                                        VOCAB))[0]]
    assert cold == [0] * 200
    half = sample(logits.repeat(200, 1), make_batch([(s, 0, 0.5, 0, 1.0, 1.0, ()) for s in seeds], VOCAB))[0]
    one = sample(logits.repeat(200, 1), make_batch([(s, 0, 1.0, 0, 1.0, 1.0, ()) for s in seeds], VOCAB))[0]
    assert half.tolist() == [spec_draw(logits, s, 0, 0.5) for s in seeds]
    assert half.tolist() != one.tolist()
    assert (half == 0).sum() > (one == 0).sum()     # colder: the best token more often


@pytest.mark.parametrize("kernels", KERNELS)
def test_the_candidate_width_does_not_change_any_draw(kernels):
    """Top-k rows draw among their K best: asking for more candidates (up to the whole vocabulary) changes
    nothing."""
    rows = [(s, 2, 0.9, 6, 0.95, 1.0, ()) for s in range(16)]
    logits = logits_for(16, seed=2)
    batch = make_batch(rows, VOCAB)
    assert batch.num_candidates == 6
    narrow, _ = sample(logits, batch, kernels)
    batch.num_candidates = VOCAB
    wide, _ = sample(logits, batch, kernels)
    batch.num_candidates = 0          # 0: the whole vocabulary
    whole, _ = sample(logits, batch, kernels)
    assert narrow.tolist() == wide.tolist() == whole.tolist() == [spec_draw(logits[i], *r) for i, r in enumerate(rows)]


def test_top_p_without_top_k_draws_over_the_whole_vocabulary():
    """Candidate width 0 means every token: a top-p row with a flat distribution can draw any of them."""
    rows = [(s, 1, 5.0, 0, 0.99, 1.0, ()) for s in range(2)]
    logits = logits_for(2, seed=4)
    batch = make_batch(rows, VOCAB)
    assert batch.num_candidates == VOCAB
    batch.num_candidates = 0
    tokens, _ = sample(logits, batch)
    assert tokens.tolist() == [spec_draw(logits[i], *r) for i, r in enumerate(rows)]


@pytest.mark.parametrize("num_logprobs, width", [(0, 1), (1, 1), (5, 5)])
def test_logprobs_are_the_log_softmax_of_the_raw_logits(num_logprobs, width):
    """Before penalty and temperature: the model's own distribution. chosen: the sampled token's logprob."""
    logits = logits_for(len(ROWS), seed=3)
    tokens, top = sample(logits, make_batch(ROWS, VOCAB, num_logprobs=num_logprobs))
    expected = logits.double() - logits.double().exp().sum(-1, keepdim=True).log()
    torch.testing.assert_close(top.chosen.double(), expected.gather(1, tokens[:, None]).squeeze(1), rtol=0,
                               atol=1e-5)
    best = expected.sort(dim=-1, descending=True)
    assert top.values.shape == top.token_ids.shape == (len(ROWS), width)
    torch.testing.assert_close(top.values.double(), best.values[:, :width], rtol=0, atol=1e-5)
    assert torch.equal(top.token_ids, best.indices[:, :width])
