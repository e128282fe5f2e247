"""The MoE block as four ops (gating/top-k, align, gate_up GEMM, down GEMM + combine), their pure-PyTorch
twins, and `fused_moe`, the front the model calls.

Legend: T tokens, H hidden, E experts, I expert intermediate size, k top_k, S shared experts,
P = T * (k + S) pairs. A pair p = t * (k + S) + j is token t's j-th choice; with S > 0, gating appends the
shared experts E .. E+S-1 to every token with weight 1.0 (j = k .. k+S-1), so the grouped GEMM serves them
too (their weights are stacked after the routed experts: w13 [E+S, 2I, H]) and the combine adds them after
the routed ones, in fixed j order. The align op groups pairs by expert, each group padded to
a multiple of the GEMM block height `block_m` with the sentinel P, so that every block of `block_m`
rows belongs to one expert (`block_expert_ids`). All buffers are sized for the worst case from shapes
alone: nothing reads device data on the host, so the whole block can be captured in a CUDA graph.
"""
import torch
import torch.nn.functional as F

from .extension import extension_available

ROUTER_EPS = 1e-6  # renormalisation: w / (sum(w) + 1e-6), as the model's own code


def max_padded_blocks(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Worst-case number of `block_m`-row blocks after padding each expert's group."""
    worst_rows = num_pairs + min(num_experts, num_pairs) * (block_m - 1)
    return (worst_rows + block_m - 1) // block_m


DECODE_BLOCK_M = 8        # the weight-streaming decode GEMM: tokens are the narrow (n8) side of the MMA
DECODE_MAX_PAIRS = 64     # up to this many pairs a step is a decode step (bound by reading the weights)


def choose_block_m(num_pairs: int, num_experts: int) -> int:
    """GEMM block height: 8 for decode (the weight-streaming kernel), 16..64 for larger batches."""
    if num_pairs <= DECODE_MAX_PAIRS:
        return DECODE_BLOCK_M
    rows_per_expert = num_pairs / max(num_experts, 1)
    if rows_per_expert <= 16:
        return 16
    if rows_per_expert <= 64:
        return 32
    return 64


# ---- twins: the readable reference of each op's contract ---------------------------------------------

def gating_topk_torch(hidden, router_weight, top_k: int, num_shared: int = 0):
    # hidden: [T, H]  router_weight: [E, H] fp32  ->  weights [T, k + S] fp32, ids [T, k + S] int32
    # (the S shared experts E .. E+S-1 last, weight 1.0)
    logits = hidden.float() @ router_weight.float().t()                      # [T, E] fp32
    probs = torch.softmax(logits, dim=-1)
    # NaN ranks below every number and ties go to the lower index, so padding rows still get valid ids.
    ranked = torch.nan_to_num(probs, nan=float("-inf"))
    ids = torch.sort(ranked, dim=-1, descending=True, stable=True).indices[:, :top_k]
    weights = probs.gather(1, ids)
    weights = weights / (weights.sum(dim=-1, keepdim=True) + ROUTER_EPS)
    if num_shared > 0:
        num_tokens, num_experts = hidden.shape[0], router_weight.shape[0]
        shared = torch.arange(num_experts, num_experts + num_shared, device=ids.device).expand(num_tokens, -1)
        ids = torch.cat([ids, shared], dim=1)
        weights = torch.cat([weights, weights.new_ones(num_tokens, num_shared)], dim=1)
    return weights, ids.to(torch.int32)


def moe_align_torch(topk_ids, num_experts: int, block_m: int, token_mask=None):
    # topk_ids: [T, k] -> sorted_pair_ids [max_blocks * block_m], block_expert_ids [max_blocks], num_padded [1]
    # An id of -1 marks a pair whose expert lives on another tensor-parallel rank: it is placed nowhere,
    # so the GEMMs skip it and its rows stay 0. Any other id outside [0, num_experts) is an error.
    # token_mask: [T] bool or None; the pairs of a token whose mask is False are left out of the layout too
    # (graph padding rows route to no expert), as if they were not there.
    device = topk_ids.device
    num_pairs = topk_ids.numel()
    max_blocks = max_padded_blocks(num_pairs, num_experts, block_m)
    expert_of_pair = topk_ids.reshape(-1).long()                              # [P]
    bad = (expert_of_pair < -1) | (expert_of_pair >= num_experts)
    if bad.any():
        p = int(bad.nonzero()[0])
        raise RuntimeError(f"moe_align: topk_ids[{p}] = {int(expert_of_pair[p])} is outside [0, {num_experts}) "
                           f"(-1 alone marks another rank's expert)")
    kept = expert_of_pair >= 0
    if token_mask is not None:
        kept &= token_mask.reshape(-1, 1).expand(topk_ids.shape).reshape(-1)
    local = kept.nonzero().squeeze(1)                                        # [P_local] pairs to place
    counts = torch.bincount(expert_of_pair[local], minlength=num_experts)   # [E]
    padded = (counts + block_m - 1) // block_m * block_m                     # [E]
    group_start = torch.cumsum(padded, 0) - padded                           # [E]
    order = local[torch.sort(expert_of_pair[local], stable=True).indices]   # local pair ids, grouped by expert
    expert_sorted = expert_of_pair[order]
    rank_in_group = torch.arange(order.numel(), device=device) - (torch.cumsum(counts, 0) - counts)[expert_sorted]
    sorted_pair_ids = torch.full((max_blocks * block_m,), num_pairs, dtype=torch.int32, device=device)
    sorted_pair_ids[group_start[expert_sorted] + rank_in_group] = order.to(torch.int32)
    expert_blocks = torch.repeat_interleave(torch.arange(num_experts, device=device), padded // block_m)
    block_expert_ids = torch.full((max_blocks,), -1, dtype=torch.int32, device=device)
    block_expert_ids[: expert_blocks.numel()] = expert_blocks.to(torch.int32)
    num_padded = padded.sum().reshape(1).to(torch.int32)
    return sorted_pair_ids, block_expert_ids, num_padded


def _routed_pairs(sorted_pair_ids, block_expert_ids, num_padded, num_pairs: int, block_m: int):
    """(pair ids, their experts) of the real rows, read back from the aligned layout."""
    slots = torch.arange(sorted_pair_ids.numel(), device=sorted_pair_ids.device)
    expert_of_slot = block_expert_ids.long().repeat_interleave(block_m)
    real = (sorted_pair_ids < num_pairs) & (slots < num_padded.long())
    return sorted_pair_ids[real].long(), expert_of_slot[real]


def moe_gate_up_torch(x, w13, sorted_pair_ids, block_expert_ids, num_padded, top_k: int, block_m: int):
    # x: [T, H]  w13: [E, 2I, H]  ->  act: [P, I] = silu(x w_gate^T) * (x w_up^T), rows by pair id
    num_pairs = x.shape[0] * top_k
    inter = w13.shape[1] // 2
    pairs, experts = _routed_pairs(sorted_pair_ids, block_expert_ids, num_padded, num_pairs, block_m)
    act = torch.zeros(num_pairs, inter, dtype=torch.float32, device=x.device)
    for e in torch.unique(experts).tolist():  # per-expert loop: the reference, not the fast path
        rows = pairs[experts == e]
        gate_up = x[rows // top_k].float() @ w13[e].float().t()              # [n, 2I]
        act[rows] = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
    return act.to(x.dtype)


def moe_down_combine_torch(act, w2, sorted_pair_ids, block_expert_ids, num_padded, topk_weights,
                           shared_out, block_m: int):
    # act: [P, I]  w2: [E, H, I]  topk_weights: [T, k] fp32  ->  out: [T, H]
    num_tokens, top_k = topk_weights.shape
    num_pairs = num_tokens * top_k
    pairs, experts = _routed_pairs(sorted_pair_ids, block_expert_ids, num_padded, num_pairs, block_m)
    down = torch.zeros(num_pairs, w2.shape[1], dtype=torch.float32, device=act.device)   # [P, H]
    for e in torch.unique(experts).tolist():
        rows = pairs[experts == e]
        down[rows] = act[rows].float() @ w2[e].float().t()
    weighted = down.view(num_tokens, top_k, -1) * topk_weights.float().unsqueeze(-1)    # [T, k, H]
    out = torch.zeros(num_tokens, w2.shape[1], dtype=torch.float32, device=act.device)
    for j in range(top_k):  # fixed summation order: deterministic
        out += weighted[:, j]
    if shared_out is not None:
        out += shared_out.float()
    return out.to(act.dtype)


TWINS = {
    "gating_topk": gating_topk_torch,
    "moe_align": moe_align_torch,
    "moe_gate_up": moe_gate_up_torch,
    "moe_down_combine": moe_down_combine_torch,
}


def op(name: str, kernels: str):
    """The implementation of op `name` for resolved `kernels`."""
    if kernels == "torch":
        return TWINS[name]
    return getattr(torch.ops.xverse, name)


def local_expert_ids(topk_ids, first_expert: int, num_local: int):
    """Expert parallelism: global ids [T, k] -> this rank's local ids, -1 where the expert lives on another
    rank (moe_align skips -1, so those pairs are never computed here)."""
    local = topk_ids - first_expert
    return torch.where((local >= 0) & (local < num_local), local, torch.full_like(local, -1))


def fused_moe(x, router_weight, w13, w2, top_k: int, shared_out=None, kernels: str = "torch",
              first_expert: int = 0, num_shared: int = 0, token_mask=None):
    """One MoE block: the routed experts, the S = num_shared shared experts stacked after them in w13 / w2
    (each picked by every token with weight 1.0), plus `shared_out` (if given) added at the end.
    x: [T, H]  router_weight: [E, H] fp32  w13: [E_local + S, 2I, H]  w2: [E_local + S, H, I]
    shared_out: [T, H]  token_mask: [T] bool or None (False: a padding row, routed nowhere; its output is 0)
    -> [T, H]. Under expert parallelism w13/w2 hold experts [first_expert, first_expert + E_local) only and
    the result is this rank's partial sum (pairs of other ranks' experts contribute 0); shared experts are
    folded into the stack only without it (S = 0 there)."""
    num_experts = router_weight.shape[0]
    num_local = w13.shape[0] - num_shared
    if num_shared and num_local != num_experts:
        raise ValueError(f"fused_moe: shared experts fold into the stack only without expert parallelism "
                         f"(w13 holds {num_local} routed experts of {num_experts})")
    pairs_per_token = top_k + num_shared
    block_m = choose_block_m(x.shape[0] * pairs_per_token, num_experts + num_shared)
    weights, ids = op("gating_topk", kernels)(x, router_weight, top_k, num_shared)
    if num_local != num_experts:
        ids = local_expert_ids(ids, first_expert, num_local)
    sorted_ids, block_ids, num_padded = op("moe_align", kernels)(ids, num_local + num_shared, block_m, token_mask)
    act = op("moe_gate_up", kernels)(x, w13, sorted_ids, block_ids, num_padded, pairs_per_token, block_m)
    return op("moe_down_combine", kernels)(act, w2, sorted_ids, block_ids, num_padded, weights, shared_out,
                                           block_m)


# ---- fake (meta) implementations: output shapes from input shapes alone ------------------------------

if extension_available():
    @torch.library.register_fake("xverse::gating_topk")
    def _gating_topk_fake(hidden, router_weight, top_k, num_shared=0):
        shape = (hidden.shape[0], top_k + num_shared)
        return (hidden.new_empty(shape, dtype=torch.float32), hidden.new_empty(shape, dtype=torch.int32))

    @torch.library.register_fake("xverse::moe_align")
    def _moe_align_fake(topk_ids, num_experts, block_m, token_mask=None):
        max_blocks = max_padded_blocks(topk_ids.numel(), num_experts, block_m)
        return (topk_ids.new_empty((max_blocks * block_m,), dtype=torch.int32),
                topk_ids.new_empty((max_blocks,), dtype=torch.int32),
                topk_ids.new_empty((1,), dtype=torch.int32))

    @torch.library.register_fake("xverse::moe_gate_up")
    def _moe_gate_up_fake(x, w13, sorted_pair_ids, block_expert_ids, num_padded, top_k, block_m):
        return x.new_empty((x.shape[0] * top_k, w13.shape[1] // 2))

    @torch.library.register_fake("xverse::moe_down_combine")
    def _moe_down_combine_fake(act, w2, sorted_pair_ids, block_expert_ids, num_padded, topk_weights,
                               shared_out, block_m):
        return act.new_empty((topk_weights.shape[0], w2.shape[1]))
