"""The fused decode-path ops (torch.ops.xverse.add_rmsnorm, rope_cache) against their pure-PyTorch twins, on
the CPU (C++ kernels) and, marked gpu, on CUDA; bad input; torch.library.opcheck."""
import pytest
import torch

from conftest import DEVICES, require_extension
from xverse_engine.layers.rotary import RotaryEmbedding
from xverse_engine.ops import fused

require_extension()

# (rtol, atol) per dtype: one rounding of the output dtype apart at most
TOL = {torch.float32: (1e-5, 1e-6), torch.bfloat16: (1.6e-2, 1e-2), torch.float16: (2e-3, 1e-3)}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def randn(*shape, dtype, device, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(device)


def assert_close(actual, expected, dtype, what):
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(actual.float().cpu(), expected.float().cpu(), rtol=rtol, atol=atol,
                               msg=lambda m: f"{what}: {m}")


# ---- add_rmsnorm -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens,hidden", [(1, 2560), (7, 2560), (83, 67), (5, 128), (0, 64)])
def test_add_rmsnorm_matches_twin(device, dtype, num_tokens, hidden):
    x = randn(num_tokens, hidden, dtype=dtype, device=device, seed=1)
    residual = randn(num_tokens, hidden, dtype=dtype, device=device, seed=2, scale=3.0)
    weight = randn(hidden, dtype=dtype, device=device, seed=3) + 1
    x_ref, residual_ref = x.clone(), residual.clone()
    fused.add_rmsnorm_torch(x_ref, residual_ref, weight, 1e-6)
    x_out, residual_out = fused.add_rmsnorm(x, residual, weight, 1e-6, kernels=device)
    assert x_out is x and residual_out is residual, "the op works in place and returns its inputs"
    # the residual is a plain add rounded to the dtype: exact
    assert torch.equal(residual.cpu(), residual_ref.cpu()), "residual += x must be bit-exact"
    assert_close(x, x_ref, dtype, f"add_rmsnorm T={num_tokens} H={hidden} {dtype} {device}")


def test_add_rmsnorm_rejects_bad_input():
    x, residual, weight = torch.randn(3, 8), torch.randn(3, 8), torch.ones(8)
    with pytest.raises(RuntimeError, match="residual shape"):
        torch.ops.xverse.add_rmsnorm(x, torch.randn(3, 9), weight, 1e-6)
    with pytest.raises(RuntimeError, match="weight must be"):
        torch.ops.xverse.add_rmsnorm(x, residual, torch.ones(9), 1e-6)
    with pytest.raises(RuntimeError, match="one dtype"):
        torch.ops.xverse.add_rmsnorm(x, residual.bfloat16(), weight, 1e-6)
    with pytest.raises(RuntimeError, match="contiguous"):
        torch.ops.xverse.add_rmsnorm(torch.randn(8, 3).t(), residual, weight, 1e-6)
    with pytest.raises(RuntimeError, match="distinct"):
        torch.ops.xverse.add_rmsnorm(x, x, weight, 1e-6)


# ---- rope_cache ------------------------------------------------------------------------------------------

def rope_inputs(num_tokens, num_heads, num_kv, head_dim, dtype, device, block_size=8, num_blocks=6, seed=0,
                rope_scaling=None, theta=500000.0):
    """q/k/v as strided views of one packed qkv row (as the model has them), caches, slots (some padding),
    positions, and the cos/sin table of a RotaryEmbedding."""
    qkv = randn(num_tokens, (num_heads + 2 * num_kv) * head_dim, dtype=dtype, device=device, seed=seed)
    q, k, v = qkv.split([num_heads * head_dim, num_kv * head_dim, num_kv * head_dim], dim=-1)
    q = q.view(num_tokens, num_heads, head_dim)
    k = k.view(num_tokens, num_kv, head_dim)
    v = v.view(num_tokens, num_kv, head_dim)
    cache_shape = (num_blocks, num_kv, block_size, head_dim)
    key_cache = randn(*cache_shape, dtype=dtype, device=device, seed=seed + 1)
    value_cache = randn(*cache_shape, dtype=dtype, device=device, seed=seed + 2)
    gen = torch.Generator().manual_seed(seed + 3)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[::3] = -1  # every third token is padding: nothing written
    positions = torch.randint(0, 500, (num_tokens,), generator=gen)
    rotary = RotaryEmbedding(head_dim, 512, theta, rope_scaling, device, max_len=1024)
    return q, k, v, key_cache, value_cache, slots.to(device), positions.to(device), rotary.cos_sin


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens,num_heads,num_kv,head_dim", [(1, 32, 32, 80), (7, 4, 2, 64), (20, 3, 1, 6)])
def test_rope_cache_matches_twin(device, dtype, num_tokens, num_heads, num_kv, head_dim):
    args = rope_inputs(num_tokens, num_heads, num_kv, head_dim, dtype, device)
    q, k, v, key_cache, value_cache, slots, positions, cos_sin = args
    ref = [t.clone() for t in (q, key_cache, value_cache)]
    fused.rope_cache_torch(ref[0], k, v, ref[1], ref[2], slots, positions, cos_sin)
    k_before = k.clone()
    fused.rope_cache(q, k, v, key_cache, value_cache, slots, positions, cos_sin, kernels=device)
    what = f"rope_cache T={num_tokens} Hq={num_heads} Hkv={num_kv} D={head_dim} {dtype} {device}"
    assert_close(q, ref[0], dtype, what + " query")
    assert_close(key_cache, ref[1], dtype, what + " key_cache")
    assert torch.equal(value_cache.cpu(), ref[2].cpu()), what + ": value rows are copied exactly"
    assert torch.equal(k.cpu(), k_before.cpu()), what + ": key itself is not modified"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scaling", [None, {"type": "linear", "factor": 2.0}, {"type": "dynamic", "factor": 2.0}])
def test_rope_cache_honours_rope_scaling(device, scaling):
    """The rotation is the one MODEL.md gives: inv_freq = 1 / theta^(2i/D) in fp32; linear scaling divides
    positions by the factor; dynamic NTK (served length 1024 > 512) rescales the base once."""
    head_dim, theta = 16, 10000.0
    q, k, v, key_cache, value_cache, slots, positions, cos_sin = rope_inputs(
        5, 2, 2, head_dim, torch.float32, device, rope_scaling=scaling, theta=theta)
    original = q.clone()
    fused.rope_cache(q, k, v, key_cache, value_cache, slots, positions, cos_sin, kernels=device)
    base, pos = theta, positions.double().cpu()
    if scaling and scaling["type"] == "linear":
        pos = pos / 2.0
    if scaling and scaling["type"] == "dynamic":
        base = theta * (2.0 * 1024 / 512 - 1) ** (head_dim / (head_dim - 2))
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angle = pos[:, None, None] * inv_freq                                      # [T, 1, D/2]
    x1, x2 = original.double().cpu().chunk(2, dim=-1)
    expected = torch.cat((x1 * angle.cos() - x2 * angle.sin(), x2 * angle.cos() + x1 * angle.sin()), dim=-1)
    torch.testing.assert_close(q.double().cpu(), expected, rtol=1e-4, atol=1e-4)


def test_rope_cache_rejects_bad_input():
    q, k, v, key_cache, value_cache, slots, positions, cos_sin = rope_inputs(4, 2, 2, 8, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="outside the RoPE table"):
        torch.ops.xverse.rope_cache(q, k, v, key_cache, value_cache, slots, positions + 10_000, cos_sin)
    with pytest.raises(RuntimeError, match="past the cache"):
        torch.ops.xverse.rope_cache(q, k, v, key_cache, value_cache, slots.abs() + 1000, positions, cos_sin)
    with pytest.raises(RuntimeError, match="positions must be"):
        torch.ops.xverse.rope_cache(q, k, v, key_cache, value_cache, slots, positions.int(), cos_sin)
    with pytest.raises(RuntimeError, match="cos_sin must be"):
        torch.ops.xverse.rope_cache(q, k, v, key_cache, value_cache, slots, positions, cos_sin.double())
    with pytest.raises(RuntimeError, match="query dtype"):
        torch.ops.xverse.rope_cache(q.bfloat16(), k, v, key_cache, value_cache, slots, positions, cos_sin)


# ---- opcheck ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    x = randn(5, 64, dtype=torch.bfloat16, device=device, seed=1)
    residual = randn(5, 64, dtype=torch.bfloat16, device=device, seed=2)
    weight = randn(64, dtype=torch.bfloat16, device=device, seed=3)
    torch.library.opcheck(torch.ops.xverse.add_rmsnorm.default, (x, residual, weight, 1e-6))
    q, k, v, key_cache, value_cache, slots, positions, cos_sin = rope_inputs(6, 4, 2, 16, torch.bfloat16, device)
    torch.library.opcheck(torch.ops.xverse.rope_cache.default,
                          (q, k, v, key_cache, value_cache, slots, positions, cos_sin))
