"""Paged KV cache ops (cache write, decode attention, varlen prefill attention), their pure-PyTorch twins,
and the fronts the model calls.

Cache layout: key_cache / value_cache [num_blocks, n_kv, block_size, D]. One (block, head) is a contiguous
block_size x D tile, so the decode kernel reads each head's keys as one coalesced run.
A token's slot = block_id * block_size + offset; slot_mapping < 0 marks padding that is not written.
Block tables are int32 [B, max_blocks_per_seq]; context_lens int32 [B] count cached + new tokens.

The C++/CUDA ops take the same arguments; they also require key/value/query dtype == cache dtype, int64
slot_mapping, and (CUDA) head_dim in {64, 80, 96, 128}. Prefill on CUDA runs our own paged kernel rather than
SDPA over gathered K/V: gathering varlen contexts needs their lengths on the host (a sync), and the paged
kernel serves chunked prefill and prefix reuse with no copy. bf16/fp16 prefill runs on tensor cores
(csrc/attention/prefill_mma.cu, FlashAttention-2 style, head_dim 80 native); fp32 on a SIMT kernel.
Decode splits each context across blocks sized from the work (csrc/attention/paged_attention.cu).
Prefill rows past query_start_loc[B] (graph padding) come out as zeros.

Block tables: the entries of the blocks a context covers must be blocks of the cache; the rest are never read.
The CPU ops check this on every call; the CUDA ops only with XVERSE_CHECK_BLOCK_TABLES=1 (a host sync), and
otherwise never dereference an out-of-range entry (its keys read as zeros; the output is then unspecified).
"""
import torch

from .extension import extension_available


def gather_context(cache, block_table, context_len: int):
    """One sequence's cached K or V in token order. cache: [N, n_kv, bs, D] -> [context_len, n_kv, D]"""
    block_size = cache.shape[2]
    num_blocks = (context_len + block_size - 1) // block_size
    blocks = cache[block_table[:num_blocks].long()]                           # [nb, n_kv, bs, D]
    return blocks.permute(0, 2, 1, 3).reshape(-1, cache.shape[1], cache.shape[3])[:context_len]


# ---- twins -----------------------------------------------------------------------------------------------

def reshape_and_cache_torch(key, value, key_cache, value_cache, slot_mapping):
    # key, value: [T, n_kv, D]  slot_mapping: [T] int64, < 0 = skip
    block_size = key_cache.shape[2]
    real = slot_mapping >= 0
    slots = slot_mapping[real].long()
    blocks, offsets = slots // block_size, slots % block_size
    key_cache[blocks, :, offsets] = key[real].to(key_cache.dtype)
    value_cache[blocks, :, offsets] = value[real].to(value_cache.dtype)


def paged_attention_prefill_torch(query, key_cache, value_cache, block_tables, query_start_loc, context_lens,
                                  scale: float):
    # query: [T, Hq, D] (sequences back to back)  ->  out: [T, Hq, D]
    # The q_len new tokens of sequence b sit at positions context_len - q_len .. context_len - 1.
    out = torch.zeros_like(query)
    num_heads, num_kv = query.shape[1], key_cache.shape[1]
    starts, lens = query_start_loc.tolist(), context_lens.tolist()
    for b, context_len in enumerate(lens):
        q_start, q_end = starts[b], starts[b + 1]
        q_len = q_end - q_start
        if q_len == 0 or context_len == 0:
            continue
        k = gather_context(key_cache, block_tables[b], context_len).float()   # [C, n_kv, D]
        v = gather_context(value_cache, block_tables[b], context_len).float()
        k = k.repeat_interleave(num_heads // num_kv, dim=1)                    # GQA: [C, Hq, D]
        v = v.repeat_interleave(num_heads // num_kv, dim=1)
        q = query[q_start:q_end].float()                                       # [q_len, Hq, D]
        scores = torch.einsum("qhd,khd->hqk", q, k) * scale                    # [Hq, q_len, C]
        q_pos = torch.arange(context_len - q_len, context_len, device=query.device)
        k_pos = torch.arange(context_len, device=query.device)
        scores.masked_fill_(k_pos[None, None, :] > q_pos[None, :, None], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[q_start:q_end] = torch.einsum("hqk,khd->qhd", probs, v).to(query.dtype)
    return out


def paged_attention_decode_torch(query, key_cache, value_cache, block_tables, context_lens, scale: float,
                                 max_context_len: int = 0):
    # query: [B, Hq, D], one new token per sequence  ->  out: [B, Hq, D]; context_len 0 gives zeros.
    # max_context_len only sizes the CUDA kernel's split-K: it never changes the result.
    batch = query.shape[0]
    query_start_loc = torch.arange(batch + 1, dtype=torch.int32, device=query.device)
    return paged_attention_prefill_torch(query, key_cache, value_cache, block_tables, query_start_loc,
                                         context_lens, scale)


# ---- fronts ----------------------------------------------------------------------------------------------

def reshape_and_cache(key, value, key_cache, value_cache, slot_mapping, kernels: str = "torch"):
    if kernels == "torch":
        return reshape_and_cache_torch(key, value, key_cache, value_cache, slot_mapping)
    return torch.ops.xverse.reshape_and_cache(key, value, key_cache, value_cache, slot_mapping)


def paged_attention_decode(query, key_cache, value_cache, block_tables, context_lens, scale: float,
                           kernels: str = "torch", max_context_len: int = 0):
    """max_context_len: a bound on this step's contexts, bucketed (e.g. to a power of two) so that a captured
    CUDA graph stays valid while contexts grow; 0 means the block table's capacity. It only sizes the CUDA
    kernel's split-K: a context longer than the bound is still computed right, just with less parallelism."""
    if kernels == "torch":
        return paged_attention_decode_torch(query, key_cache, value_cache, block_tables, context_lens, scale)
    return torch.ops.xverse.paged_attention_decode(query, key_cache, value_cache, block_tables, context_lens,
                                                   scale, max_context_len)


def paged_attention_prefill(query, key_cache, value_cache, block_tables, query_start_loc, context_lens,
                            scale: float, kernels: str = "torch"):
    if kernels == "torch":
        return paged_attention_prefill_torch(query, key_cache, value_cache, block_tables, query_start_loc,
                                             context_lens, scale)
    return torch.ops.xverse.paged_attention_prefill(query, key_cache, value_cache, block_tables,
                                                    query_start_loc, context_lens, scale)


# ---- fake (meta) implementations ---------------------------------------------------------------------------

if extension_available():
    @torch.library.register_fake("xverse::reshape_and_cache")
    def _reshape_and_cache_fake(key, value, key_cache, value_cache, slot_mapping):
        return None

    @torch.library.register_fake("xverse::paged_attention_decode")
    def _paged_attention_decode_fake(query, key_cache, value_cache, block_tables, context_lens, scale,
                                     max_context_len=0):
        # the kernels return a fresh contiguous tensor, whatever the strides of query
        return query.new_empty(query.shape)

    @torch.library.register_fake("xverse::paged_attention_prefill")
    def _paged_attention_prefill_fake(query, key_cache, value_cache, block_tables, query_start_loc,
                                      context_lens, scale):
        return query.new_empty(query.shape)
