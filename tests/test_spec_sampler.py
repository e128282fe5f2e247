"""Sampling as the spec says, seen through Engine.generate and judged by the float64 reference.

The distribution a request samples from is worked out here, independently of the engine, from the
reference's logits: temperature first, then top-k, then top-p over the renormalised survivors (the order
transformers applies its logits warpers). Many seeded one-token requests then give a sample of the
engine's draws, and a chi-square test compares the counts with that distribution. Every test also checks
that it could tell the spec from the planted bug it guards against (ignored temperature, top-p over the
unrenormalised mass, a different order), so a test that cannot fail is itself a failure.
"""
import math

import pytest
import torch

from reference import reference_logits
from xverse_engine import Engine, SamplingParams

PROMPT = [7, 100, 33, 250]       # its next-token distribution is broad: top token ~0.32 at T = 1
NUM_DRAWS = 800


@pytest.fixture(scope="module")
def engine(moe_ckpt):
    return Engine(str(moe_ckpt), device="cpu", kernels="cpu", num_kv_blocks=320, block_size=8,
                  max_num_seqs=256, show_progress=False)


@pytest.fixture(scope="module")
def next_token_logits(moe_ckpt, reference_data):
    """float64 reference logits [V] for the token after PROMPT."""
    state_dict, config = reference_data(moe_ckpt)
    return reference_logits(state_dict, config, PROMPT)[-1]


def draw_first_tokens(engine, num_draws=NUM_DRAWS, **sampling) -> torch.Tensor:
    """Counts [V] of the first generated token over num_draws requests with seeds 0..num_draws-1. Filters are
    off unless asked for (the checkpoint's generation_config would otherwise set top_k 30, top_p 0.85)."""
    sampling = {"top_k": 0, "top_p": 1.0, **sampling}
    params = [SamplingParams(max_new_tokens=1, repetition_penalty=1.0, ignore_eos=True, seed=seed, **sampling)
              for seed in range(num_draws)]
    outs = engine.generate(prompt_token_ids=[PROMPT] * num_draws, sampling_params=params)
    tokens = torch.tensor([out.token_ids[0] for out in outs])
    return torch.bincount(tokens, minlength=engine.config.vocab_size).double()


# ---- the distribution the spec defines -------------------------------------------------------------------

def spec_distribution(logits, temperature=1.0, top_k=0, top_p=1.0):
    """transformers order: logits / T, keep the top_k, then keep the smallest prefix (by probability) of those
    survivors whose renormalised mass reaches top_p; sample from the renormalised remainder."""
    probs = torch.softmax(logits / temperature, dim=-1)
    order = probs.argsort(descending=True)
    keep = torch.zeros_like(probs, dtype=torch.bool)
    survivors = order[:top_k] if top_k > 0 else order
    renormalised = probs[survivors] / probs[survivors].sum()
    mass_before = renormalised.cumsum(0) - renormalised
    keep[survivors[mass_before < top_p]] = True
    kept = torch.where(keep, probs, torch.zeros_like(probs))
    return kept / kept.sum()


def top_p_over_unrenormalised_mass(logits, temperature, top_k, top_p):
    """A planted bug: top-p measured against the full distribution's mass instead of the survivors'."""
    probs = torch.softmax(logits / temperature, dim=-1)
    order = probs.argsort(descending=True)[:top_k]
    mass_before = probs[order].cumsum(0) - probs[order]
    keep = torch.zeros_like(probs, dtype=torch.bool)
    keep[order[mass_before < top_p]] = True
    kept = torch.where(keep, probs, torch.zeros_like(probs))
    return kept / kept.sum()


def chi_square(counts, probs):
    """Pearson's statistic over the tokens expected >= 5 times (the rest pooled into one bin), and its
    degrees of freedom. A token of probability 0 that was drawn makes the statistic infinite."""
    n = counts.sum()
    expected = n * probs
    if (counts[probs == 0] > 0).any():
        return math.inf, 1
    big = expected >= 5
    observed_bins = torch.cat([counts[big], counts[~big].sum().reshape(1)])
    expected_bins = torch.cat([expected[big], expected[~big].sum().reshape(1)])
    if expected_bins[-1] < 5:   # too little pooled mass for a bin of its own: fold it into the largest
        observed_bins, expected_bins = observed_bins[:-1].clone(), expected_bins[:-1].clone()
        observed_bins[0] += counts[~big].sum()
        expected_bins[0] += expected[~big].sum()
    stat = ((observed_bins - expected_bins) ** 2 / expected_bins).sum().item()
    return stat, len(expected_bins) - 1


def chi_square_critical(df: int, z: float = 4.265) -> float:
    """Upper quantile of chi-square(df) at the standard normal quantile z (4.265: a 1e-5 false alarm rate),
    by the Wilson-Hilferty cube-root approximation (no scipy needed)."""
    h = 2.0 / (9.0 * df)
    return df * (1.0 - h + z * math.sqrt(h)) ** 3


def assert_follows(counts, probs, wrong_probs, what):
    stat, df = chi_square(counts, probs)
    assert stat < chi_square_critical(df), f"{what}: chi-square {stat:.1f} > {chi_square_critical(df):.1f} (df {df})"
    # the same draws must reject the planted bug's distribution, or this test could not catch it
    wrong_stat, wrong_df = chi_square(counts, wrong_probs)
    assert wrong_stat > chi_square_critical(wrong_df), f"{what}: the draws cannot tell the bug apart"


# ---- temperature ------------------------------------------------------------------------------------------

def test_temperature_half_samples_softmax_of_twice_the_logits(engine, next_token_logits):
    """At T = 0.5 the token probabilities are softmax(logits / 0.5): each probability squared, renormalised."""
    expected = spec_distribution(next_token_logits, temperature=0.5)
    squared = torch.softmax(next_token_logits, -1) ** 2
    assert torch.allclose(expected, squared / squared.sum())      # the hand derivation of softmax(2z)
    counts = draw_first_tokens(engine, temperature=0.5)
    assert_follows(counts, expected, spec_distribution(next_token_logits, temperature=1.0), "T=0.5")


def test_temperature_one_samples_the_model_distribution(engine, next_token_logits):
    counts = draw_first_tokens(engine, temperature=1.0)
    assert_follows(counts, spec_distribution(next_token_logits), spec_distribution(next_token_logits, 0.5), "T=1")


@pytest.mark.parametrize("temperature", [1e-4, 1e-6])
def test_temperature_towards_zero_is_greedy(engine, temperature):
    """Seeded sampling at a vanishing temperature picks the argmax at every step, as temperature=0 does."""
    prompts = [[(i * 31 + j * 7) % 494 + 6 for j in range(n)] for i, n in enumerate([3, 9, 14, 5])]
    greedy = SamplingParams(max_new_tokens=10, temperature=0, repetition_penalty=1.0, ignore_eos=True)
    cold = [SamplingParams(max_new_tokens=10, temperature=temperature, repetition_penalty=1.0, ignore_eos=True,
                           seed=seed) for seed in range(len(prompts))]
    expected = [o.token_ids for o in engine.generate(prompt_token_ids=prompts, sampling_params=greedy)]
    assert [o.token_ids for o in engine.generate(prompt_token_ids=prompts, sampling_params=cold)] == expected


# ---- top-k with top-p ---------------------------------------------------------------------------------------

TOP_K, TOP_P, TEMPERATURE = 6, 0.8, 1.0


def test_top_k_then_top_p_over_the_renormalised_survivors(engine, next_token_logits):
    """The checkpoint's defaults use both (top_k 30, top_p 0.85): top-p is measured on the top-k survivors
    renormalised, so here it keeps the 3 tokens whose share of the top-6 mass reaches 0.8 (of the full
    distribution the same tokens hold only ~0.46, so a top-p over the raw mass keeps all 6)."""
    expected = spec_distribution(next_token_logits, TEMPERATURE, TOP_K, TOP_P)
    wrong = top_p_over_unrenormalised_mass(next_token_logits, TEMPERATURE, TOP_K, TOP_P)
    assert (expected > 0).sum() == 3 and (wrong > 0).sum() == 6      # the setting tells them apart
    counts = draw_first_tokens(engine, temperature=TEMPERATURE, top_k=TOP_K, top_p=TOP_P)
    assert set(counts.nonzero().flatten().tolist()) <= set(expected.nonzero().flatten().tolist())
    assert_follows(counts, expected, wrong, "top_k=6 top_p=0.8")


def test_temperature_applies_before_top_p(engine, next_token_logits):
    """T = 0.5 sharpens the distribution before top-p cuts it: the top token alone reaches top_p = 0.8.
    (Top-p on the unscaled probabilities would keep three tokens.)"""
    expected = spec_distribution(next_token_logits, temperature=0.5, top_k=TOP_K, top_p=TOP_P)
    before = spec_distribution(next_token_logits, temperature=1.0, top_k=TOP_K, top_p=TOP_P)
    assert (expected > 0).sum() == 1 and (before > 0).sum() == 3
    counts = draw_first_tokens(engine, num_draws=200, temperature=0.5, top_k=TOP_K, top_p=TOP_P)
    assert counts[expected.argmax()] == 200


# ---- logprobs ------------------------------------------------------------------------------------------------

def test_logprobs_equal_an_independent_log_softmax(engine, moe_ckpt, reference_data):
    """Each step's logprob and top-n are log_softmax of the model's logits at that step, recomputed here from
    the float64 reference over prompt + the tokens generated so far."""
    state_dict, config = reference_data(moe_ckpt)
    prompt = [12, 400, 77, 5, 9]
    out = engine.generate(prompt_token_ids=[prompt], sampling_params=SamplingParams(
        max_new_tokens=4, temperature=0, repetition_penalty=1.0, ignore_eos=True, logprobs=5))[0]
    assert len(out.logprobs) == len(out.token_ids) == 4
    for step, (token, entry) in enumerate(zip(out.token_ids, out.logprobs)):
        logits = reference_logits(state_dict, config, prompt + out.token_ids[:step])[-1]
        expected = torch.log_softmax(logits, dim=-1)
        assert entry.token_id == token
        assert entry.logprob == pytest.approx(expected[token].item(), abs=1e-4)
        top_values, top_ids = expected.topk(5)
        assert sorted(entry.top) == sorted(top_ids.tolist())
        for token_id, value in zip(top_ids.tolist(), top_values.tolist()):
            assert entry.top[token_id] == pytest.approx(value, abs=1e-4)
