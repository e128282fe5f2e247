"""The sampler's draw among the top-k / top-p survivors as one op: torch.ops.xverse.draw_top_k_top_p. Its
pure-PyTorch twin (the readable contract), the counter-based Gumbel noise it shares with the sampler
(xverse_engine/layers/sampler.py imports it from here), the front the sampler calls, and the fake impl.

Legend: B rows, K candidates per row (the output of `scaled.topk(K)`: best first).

draw_top_k_top_p(values [B, K] fp32, token_ids [B, K] int64, top_ks [B] int64, top_ps [B] fp32, keys [B] int64)
    -> [B] int64, the drawn token id of each row:
    1. top-k: rank r is removed when top_k > 0 and r >= top_k (0 = off);
    2. top-p, on rows with top_p < 1 (1 = off): probs = softmax of the values with the top-k-removed ranks at
       -inf; rank r is removed when cumsum(probs)[r] - probs[r] >= top_p (the best token always stays);
    3. the drawn rank is the argmax over the kept ranks of value + gumbel(key, token id), ties to the lowest
       rank; every rank removed (top_p <= 0, or all values -inf): rank 0.
    The noise is gumbel_noise_at: bits = fmix32(key ^ (token_id * 0x27D4EB2F mod 2^32)),
    u = ((bits >> 8) + 0.5) * 2^-24, g = -log(-log(u)), all in fp32.

The kernels (csrc/sampling/) compute the same formulas in fp32 with accurate expf / logf, never fast-math
intrinsics; the softmax sum and the cumulative sum accumulate in double (torch's CPU cumsum does too), each
probability and cumulative mass rounded to fp32 as the twin's tensors are. Library exp / log and the order of
the softmax sum may still round a last bit differently from torch's, so the kernels' top-p cutoff or argmax can
differ from the twin's only where a cumulative mass equals top_p, or two candidates' noisy values tie, to within
a few units in the last place. NaN values are not supported (the twin's argmax would pick a NaN; the kernels
skip it).
"""
import numpy as np
import torch

from .extension import extension_available

MASK32 = 0xFFFFFFFF
MAX_CUDA_CANDIDATES = 1024  # the CUDA kernel's limit on K (one warp per row); the front falls back beyond it


# ---- the noise (shared with layers/sampler.py) --------------------------------------------------------------

def _fmix32(x):
    # the murmur3 finaliser on values held in int64 (only the low 32 bits are kept)
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & MASK32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & MASK32
    return x ^ (x >> 16)


def row_keys(seeds, steps):
    """The 32-bit key of each row's draw, from (seed, step): [B] int64. Works on torch tensors and on
    numpy int64 arrays alike (the engine computes it on the host; two's-complement wrap-around of the
    products only touches bits that the masks drop)."""
    seeds = seeds & MASK32 ^ ((seeds >> 32) & MASK32)
    return _fmix32(seeds ^ _fmix32((steps * 0x9E3779B9) & MASK32))


def fold_seeds(seeds):
    """The 32 bits of each int64 seed that row_keys uses, as a numpy uint32 array: [B]."""
    return (seeds & MASK32 ^ ((seeds >> 32) & MASK32)).astype(np.uint32)


def row_keys_host(folded_seeds, steps):
    """row_keys on the host for seeds already folded (fold_seeds, once per batch): the same keys, as uint32,
    in native 32-bit arithmetic (no masks) and in place: about half the numpy calls of row_keys. steps: [B]."""
    x = steps.astype(np.uint32)
    x *= np.uint32(0x9E3779B9)
    x = _fmix32_u32(x)
    x ^= folded_seeds
    return _fmix32_u32(x)


def _fmix32_u32(x):
    # _fmix32 on a numpy uint32 array, in place: products wrap at 2**32 by themselves
    x ^= x >> 16
    x *= np.uint32(0x85EBCA6B)
    x ^= x >> 13
    x *= np.uint32(0xC2B2AE35)
    x ^= x >> 16
    return x


def gumbel_noise_at(seeds, steps, token_ids, keys=None):
    """Deterministic Gumbel(0, 1) noise of (seed, step, token id). seeds, steps: [B]; token_ids: [B, K] or
    [K]; keys: row_keys(seeds, steps) when already known."""
    row = row_keys(seeds, steps) if keys is None else keys                               # [B]
    bits = _fmix32((row[:, None] ^ ((token_ids * 0x27D4EB2F) & MASK32)) & MASK32)        # [B, K]
    uniform = ((bits >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))                 # (0, 1)
    return -torch.log(-torch.log(uniform))


# ---- twin ------------------------------------------------------------------------------------------------

def removed_ranks(sorted_logits, top_ks, top_ps, any_top_k: bool = True, any_top_p: bool = True):
    """sorted_logits: [B, K] best first -> [B, K] bool: which ranks top-k, then top-p, remove. A row's top-k
    applies when its top_k > 0, its top-p when its top_p < 1; any_top_k / any_top_p = False (no row has
    one) only skips work."""
    width = sorted_logits.shape[-1]
    remove = None
    if any_top_k:
        ranks = torch.arange(width, device=sorted_logits.device)[None, :]
        remove = ranks >= torch.where(top_ks > 0, top_ks, width)[:, None]
    if any_top_p:
        kept = sorted_logits if remove is None else sorted_logits.masked_fill(remove, float("-inf"))
        probs = kept.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        # keep the smallest prefix reaching top_p (>= 1 token); rows at top_p = 1 keep everything, even where
        # fp32 rounding brings the cumulative mass to 1 before the last rank
        beyond = (mass_before >= top_ps[:, None]) & (top_ps < 1)[:, None]
        remove = beyond if remove is None else remove | beyond
    return torch.zeros_like(sorted_logits, dtype=torch.bool) if remove is None else remove


def draw_top_k_top_p_torch(values, token_ids, top_ks, top_ps, keys):
    # values: [B, K] fp32 best first  token_ids: [B, K] int64  top_ks, keys: [B] int64  top_ps: [B] fp32 -> [B]
    remove = removed_ranks(values, top_ks, top_ps)
    noisy = values.masked_fill(remove, float("-inf")) + gumbel_noise_at(None, None, token_ids, keys)
    return token_ids.gather(1, noisy.argmax(dim=-1, keepdim=True)).squeeze(1)


# ---- front -----------------------------------------------------------------------------------------------

def draw_top_k_top_p(values, token_ids, top_ks, top_ps, keys, kernels: str = "torch"):
    """The token drawn in each row among its top-k / top-p survivors: [B] int64 (see the module docstring).
    kernels="cuda" with more than MAX_CUDA_CANDIDATES candidates per row runs the twin."""
    if kernels == "torch" or (kernels == "cuda" and values.shape[-1] > MAX_CUDA_CANDIDATES):
        return draw_top_k_top_p_torch(values, token_ids, top_ks, top_ps, keys)
    return torch.ops.xverse.draw_top_k_top_p(values, token_ids, top_ks, top_ps, keys)


# ---- fake (meta) implementation ------------------------------------------------------------------------------

if extension_available() and hasattr(torch.ops.xverse, "draw_top_k_top_p"):
    @torch.library.register_fake("xverse::draw_top_k_top_p")
    def _draw_top_k_top_p_fake(values, token_ids, top_ks, top_ps, keys):
        return values.new_empty(values.shape[:1], dtype=torch.int64)
