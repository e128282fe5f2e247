"""bfloat16 as the spec says, with tolerances derived from bf16 rounding rather than guessed.

bf16 keeps p = 8 significant bits, so rounding to nearest has a relative error of at most u = 2**-8 (about
3.9e-3), and over many values the error is close to uniform on [-u, u] in relative terms: standard
deviation u / sqrt(3). Each test below writes down which roundings separate the engine from the float64
judge and builds its tolerance from u and that count, then checks that the planted bug it guards against
would exceed it (a tolerance that cannot fail proves nothing).
"""
import math

import pytest
import torch
import torch.nn.functional as F

from checkpoints import make_preset_checkpoint
from reference import reference_logits, rms_norm as reference_rms_norm
from test_model_vs_reference import PROMPT, engine_prompt_logits
from xverse_engine import Engine
from xverse_engine.layers.norm import RMSNorm
from xverse_engine.ops import moe

U = 2.0 ** -8                        # bf16 unit roundoff (round to nearest, 8 significant bits)
NOISE = U / math.sqrt(3.0)           # std of one rounding's relative error (uniform on [-u, u])


# ---- RMSNorm: the cast back comes before the weight ---------------------------------------------------------

@pytest.mark.parametrize("kernels,lean", [("torch", True), ("cpu", True), ("torch", False)])
def test_rmsnorm_in_bf16_casts_back_before_the_weight(kernels, lean):
    """The model normalises in fp32, casts to bf16, THEN multiplies by the bf16 weight (a bf16 product).
    That order is bit-exact reproducible, so the layer must equal the reference bit for bit; multiplying by
    the weight in fp32 before the cast rounds once instead of twice and differs in many elements.
    (The layer adds the residual first: a zero residual leaves x as it is.)"""
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(64, 256, generator=gen) * 3).to(torch.bfloat16)
    weight = (1 + 0.3 * torch.randn(256, generator=gen)).to(torch.bfloat16)
    norm = RMSNorm(256, 1e-6, torch.bfloat16, "cpu", kernels=kernels, lean=lean)
    norm.weight.data.copy_(weight)
    expected = reference_rms_norm(x, weight, 1e-6)
    assert expected.dtype == torch.bfloat16
    out, residual = norm(x.clone(), torch.zeros_like(x))
    assert torch.equal(residual, x)
    assert torch.equal(out, expected)
    x32 = x.float()
    weight_first = (weight.float() * x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)
    assert (weight_first != expected).float().mean() > 0.05       # the bug is visible at this size


# ---- the MoE block with routed experts that matter -----------------------------------------------------------

def moe_float64_with_error_scale(x, router, w13, w2, top_k, shared):
    """MODEL.md's MoE block in float64 from the same bf16 inputs, and per output element the scale its bf16
    rounding error is bounded by. Legend: T tokens, H hidden, I expert intermediate, k top_k."""
    x64, inter = x.double(), w13.shape[1] // 2
    probs = torch.softmax(x64 @ router.double().t(), dim=-1)
    top_vals, ids = probs.topk(top_k, dim=-1)                                     # [T, k]
    weights = (top_vals / (top_vals.sum(-1, keepdim=True) + 1e-6)).to(x.dtype).double()
    w13_k, w2_k = w13[ids].double(), w2[ids].double()                             # [T, k, 2I, H], [T, k, H, I]
    gate_up = torch.einsum("tkoh,th->tko", w13_k, x64)                            # [T, k, 2I]
    act = F.silu(gate_up[..., :inter]) * gate_up[..., inter:]                     # [T, k, I]
    routed = torch.einsum("tkhi,tki->tkh", w2_k, act)                             # [T, k, H]
    routed_sum = (routed * weights[..., None]).sum(1)                             # [T, H]
    # |error| of sum_j c_j a_j when every a_j carries a relative error <= u: at most u * sum_j |c_j a_j|
    abs_path = (torch.einsum("tkhi,tki->tkh", w2_k.abs(), act.abs()) * weights[..., None]).sum(1)
    return routed_sum + shared.double(), routed_sum, abs_path


@pytest.mark.parametrize("kernels", ["torch", "cpu"])
def test_fused_moe_in_bf16_with_routed_experts_that_matter(kernels):
    """Unit-scale inputs and weights scaled to unit gain, so the routed experts carry about as much of the
    output as the shared one. The kernel's result differs from float64 by (worst case, first order) three
    roundings the float64 sum does not make: the gate/up products (through SiLU, whose relative sensitivity
    |g silu'(g) / silu(g)| stays below 2 for these inputs: counted as 2 roundings), the activation rounded
    to bf16 between the GEMMs (1), and the output (1). So |err| <= 4u * (sum over the path of |terms|) + u|out|."""
    T, E, k, H, I = 64, 16, 6, 128, 72
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(T, H, generator=gen).to(torch.bfloat16)
    router = torch.randn(E, H, generator=gen) / math.sqrt(H)
    w13 = (torch.randn(E, 2 * I, H, generator=gen) / math.sqrt(H)).to(torch.bfloat16)
    w2 = (torch.randn(E, H, I, generator=gen) / math.sqrt(I)).to(torch.bfloat16)
    shared = (0.5 * torch.randn(T, H, generator=gen)).to(torch.bfloat16)
    expected, routed, abs_path = moe_float64_with_error_scale(x, router, w13, w2, k, shared)
    tolerance = 4 * U * abs_path + U * expected.abs()
    # the routed experts matter beyond the tolerance: dropping them breaks it almost everywhere
    dropped = ((shared.double() - expected).abs() > tolerance).float().mean().item()
    assert dropped > 0.8, f"only {dropped:.0%} of the elements would notice the routed experts missing"
    out = moe.fused_moe(x, router, w13, w2, k, shared_out=shared, kernels=kernels)
    err = (out.double() - expected).abs()
    assert out.dtype == torch.bfloat16
    assert (err <= tolerance).all(), f"{int((err > tolerance).sum())} elements out; worst err/tol " \
                                     f"{(err / tolerance).max():.2f}"


# ---- the whole model --------------------------------------------------------------------------------------------

# Where the model's bf16 path rounds, from the embedding to the logits (MODEL.md's dtype rules), per layer:
ATTENTION_ROUNDINGS = ["input norm output", "qkv weights", "qkv outputs", "RoPE output",
                       "softmax probabilities cast back", "probabilities x V", "o_proj weights", "o_proj output",
                       "residual add"]
MOE_ROUNDINGS = ["post-attention norm output", "routing weights cast", "gate/up weights", "gate/up outputs",
                 "SiLU", "SiLU x up", "down weights", "down output", "weighted sum of experts", "residual add"]
FINAL_ROUNDINGS = ["embedding weights", "final norm output", "lm_head weights", "logits"]


def predicted_relative_noise(num_layers: int) -> float:
    """First-order model: every rounding adds an independent relative error of std u/sqrt(3) that reaches the
    logits with unit gain (weights are scaled to unit gain, residual connections pass errors unchanged), so
    the errors add in quadrature: std of (logit error / logit RMS) = u/sqrt(3) * sqrt(number of roundings)."""
    count = num_layers * (len(ATTENTION_ROUNDINGS) + len(MOE_ROUNDINGS)) + len(FINAL_ROUNDINGS)
    return NOISE * math.sqrt(count)


@pytest.fixture(scope="module")
def real_head_bf16_ckpt(tmp_path_factory):
    return make_preset_checkpoint(tmp_path_factory.mktemp("bf16"), "real-head", max_position_embeddings=512)


@pytest.mark.parametrize("kernels", ["torch", "cpu"])
@pytest.mark.parametrize("which", ["moe", "real-head"])
def test_whole_model_in_bf16_is_within_rounding_noise_of_float64(which, kernels, moe_ckpt, real_head_bf16_ckpt,
                                                                  reference_data):
    """Logits of the engine in bf16 against the float64 reference. With sigma the predicted relative noise
    above, a position's V logit errors are ~Gaussian with std sigma * RMS(logits), so their maximum stays
    below z * sigma * RMS with z = sqrt(2 ln(2V / alpha)) (alpha = 1e-3: a one-in-a-thousand false alarm per
    position). A near tie in a router's top-k may flip under bf16 and move one token's logits further: that
    is allowed for at most 10% of the positions. The float64 reference run in bf16 (the same rounding
    schedule, done exactly) is held to the same bound, so the derivation is not tighter than bf16 itself."""
    path = moe_ckpt if which == "moe" else real_head_bf16_ckpt
    state_dict, config = reference_data(path)
    ids = [i % config["vocab_size"] for i in PROMPT]
    expected = reference_logits(state_dict, config, ids)                                 # [S, V] float64
    vocab = expected.shape[-1]
    sigma = predicted_relative_noise(config["num_hidden_layers"])
    bound = math.sqrt(2 * math.log(2 * vocab / 1e-3)) * sigma * expected.pow(2).mean(-1).sqrt()   # [S]

    def positions_out_of_bound(logits):
        return int(((logits.double() - expected).abs().max(-1).values > bound).sum())

    allowed = max(1, len(ids) // 10)
    assert positions_out_of_bound(reference_logits(state_dict, config, ids, dtype=torch.bfloat16)) <= allowed
    engine = Engine(str(path), device="cpu", dtype="bfloat16", kernels=kernels, num_kv_blocks=64, show_progress=False)
    got = engine_prompt_logits(engine, ids)
    assert positions_out_of_bound(got) <= allowed, f"max error {(got - expected).abs().max():.3f}"
    # and overall the error is the size the model predicts, not bigger
    relative_rms = ((got - expected).pow(2).mean() / expected.pow(2).mean()).sqrt()
    assert relative_rms < sigma, f"relative RMS error {relative_rms:.4f} > predicted {sigma:.4f}"
