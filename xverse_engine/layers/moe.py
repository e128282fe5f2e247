import torch
from torch import nn

from ..distributed.parallel_state import SINGLE
from ..ops import fused_moe
from .mlp import SwiGLU


class MoE(nn.Module):
    """Routed experts (fp32 router, softmax, top-k, renormalise) plus the shared experts.

    Experts are stacked so one grouped GEMM serves them all: w13 [E', 2I, H] (gate rows, then up rows)
    and w2 [E', H, I]. The router stays float32 as in the checkpoint.
    Lean (one rank): the S shared experts (the checkpoint's one SwiGLU of S * I) are experts E .. E+S-1 of the
    stack (E' = E + S), picked by every token with weight 1.0, so one gate_up and one down launch serve routed
    and shared alike. Otherwise (the unfused baseline, or tensor parallel) they run as a separate SwiGLU
    added at the end.

    Tensor parallel (tp.size > 1): experts are split (expert parallel: rank r holds [r E/N, (r+1) E/N));
    the fp32 router is replicated so every rank picks the same top-k, and runs only the pairs of its own
    experts. The shared experts are split over their intermediate size. One all-reduce sums the ranks'
    routed + shared partials.
    """

    def __init__(self, config, dtype, device, kernels: str, tp=SINGLE, lean: bool = True):
        super().__init__()
        H, I = config.hidden_size, config.intermediate_size
        self.first_expert, E = tp.shard(config.num_experts)    # this rank's experts
        self.tp = tp
        self.top_k = config.moe_top_k
        self.kernels = kernels
        fold_shared = lean and tp.size == 1 and config.num_shared_experts > 0
        self.num_shared = config.num_shared_experts if fold_shared else 0
        self.router = nn.Linear(H, config.num_experts, bias=False, dtype=torch.float32, device=device)
        self.w13 = nn.Parameter(torch.empty(E + self.num_shared, 2 * I, H, dtype=dtype, device=device),
                                requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(E + self.num_shared, H, I, dtype=dtype, device=device), requires_grad=False)
        self.shared_experts = (SwiGLU(H, config.shared_intermediate_size // tp.size, dtype, device)
                               if config.num_shared_experts > 0 and not fold_shared else None)

    def forward(self, x, token_mask=None):
        # x: [T, H] -> [T, H]; token_mask: [T] bool (False: a padding row, routed to no expert) or None
        shared = self.shared_experts(x) if self.shared_experts is not None else None
        out = fused_moe(x, self.router.weight, self.w13, self.w2, self.top_k, shared_out=shared,
                        kernels=self.kernels, first_expert=self.first_expert, num_shared=self.num_shared,
                        token_mask=token_mask)
        return self.tp.all_reduce(out)  # tp: one all-reduce for routed + shared partials
