"""Fused decode-path ops: residual-add + RMSNorm in place, and RoPE fused with the KV-cache write.
Their pure-PyTorch twins (the readable contract), the fronts the layers call, and fake implementations.

Legend: T tokens, H hidden, Hq / Hkv query / key-value heads, D head_dim, P positions in the RoPE table.

add_rmsnorm(x, residual, weight, eps), both x and residual mutated, as the model's own code rounds:
    residual = residual + x                          (in the activation dtype)
    x        = weight * (rmsnorm_fp32(residual) cast to the activation dtype)

rope_cache(query, key, value, key_cache, value_cache, slot_mapping, positions, cos_sin):
    query rotated in place ("rotate half", fp32 arithmetic); rotated key and value written into the paged
    cache at slot_mapping (slot < 0: padding, nothing written). cos_sin: [P, D] fp32, cos in the first D/2
    columns, sin in the last D/2 (see layers/rotary.py). Positions must be < P.
"""
import torch

from .attention import reshape_and_cache_torch
from .extension import extension_available


# ---- twins ---------------------------------------------------------------------------------------------

def rms_norm_torch(x, weight, eps: float):
    # x: [T, H] -> [T, H]: normalise in fp32, cast back to x's dtype, then scale (the model's XverseRMSNorm)
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def add_rmsnorm_torch(x, residual, weight, eps: float):
    # x, residual: [T, H], mutated: residual += x; x = rmsnorm(residual) * weight
    residual.add_(x)
    x.copy_(rms_norm_torch(residual, weight, eps))


def rotate_half(x, cos, sin):
    # x: [T, N, D]  cos, sin: [T, 1, D/2] fp32 -> [T, N, D] in x's dtype
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def rope_cache_torch(query, key, value, key_cache, value_cache, slot_mapping, positions, cos_sin):
    # query: [T, Hq, D] (mutated)  key, value: [T, Hkv, D]  caches: [N, Hkv, block_size, D]
    cos, sin = cos_sin[positions].unsqueeze(1).chunk(2, dim=-1)              # [T, 1, D/2] each
    query.copy_(rotate_half(query, cos, sin))
    reshape_and_cache_torch(rotate_half(key, cos, sin), value, key_cache, value_cache, slot_mapping)


# ---- fronts --------------------------------------------------------------------------------------------

def add_rmsnorm(x, residual, weight, eps: float, kernels: str = "torch"):
    """residual += x; x = rmsnorm(residual) * weight, both in place. Returns (x, residual)."""
    if kernels == "torch":
        add_rmsnorm_torch(x, residual, weight, eps)
    else:
        torch.ops.xverse.add_rmsnorm(x, residual, weight, eps)
    return x, residual


def rope_cache(query, key, value, key_cache, value_cache, slot_mapping, positions, cos_sin,
               kernels: str = "torch"):
    """Rotates query in place; writes rotated key and value into the paged cache."""
    if kernels == "torch":
        return rope_cache_torch(query, key, value, key_cache, value_cache, slot_mapping, positions, cos_sin)
    return torch.ops.xverse.rope_cache(query, key, value, key_cache, value_cache, slot_mapping, positions,
                                       cos_sin)


# ---- fake (meta) implementations -----------------------------------------------------------------------

if extension_available() and hasattr(torch.ops.xverse, "add_rmsnorm"):
    @torch.library.register_fake("xverse::add_rmsnorm")
    def _add_rmsnorm_fake(x, residual, weight, eps):
        return None

    @torch.library.register_fake("xverse::rope_cache")
    def _rope_cache_fake(query, key, value, key_cache, value_cache, slot_mapping, positions, cos_sin):
        return None
