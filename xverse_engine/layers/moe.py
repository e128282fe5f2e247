import torch
from torch import nn

from ..ops import fused_moe
from .mlp import SwiGLU


class MoE(nn.Module):
    """Routed experts (fp32 router, softmax, top-k, renormalise) plus the shared experts.

    Experts are stacked so one grouped GEMM serves them all: w13 [E', 2I, H] (gate rows, then up rows)
    and w2 [E', H, I]. The router stays float32 as in the checkpoint.
    Lean: the S shared experts (the checkpoint's one SwiGLU of S * I) are experts E .. E+S-1 of the stack
    (E' = E + S), picked by every token with weight 1.0, so one gate_up and one down launch serve routed and
    shared alike. Otherwise (the unfused baseline) they run as a separate SwiGLU added at the end.
    """

    def __init__(self, config, dtype, device, kernels: str, lean: bool = True):
        super().__init__()
        E, H, I = config.num_experts, config.hidden_size, config.intermediate_size
        self.top_k = config.moe_top_k
        self.kernels = kernels
        self.num_shared = config.num_shared_experts if lean else 0
        stacked = E + self.num_shared
        self.router = nn.Linear(H, E, bias=False, dtype=torch.float32, device=device)
        self.w13 = nn.Parameter(torch.empty(stacked, 2 * I, H, dtype=dtype, device=device), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(stacked, H, I, dtype=dtype, device=device), requires_grad=False)
        self.shared_experts = (SwiGLU(H, config.shared_intermediate_size, dtype, device)
                               if config.num_shared_experts > 0 and not lean else None)

    def forward(self, x, token_mask=None):
        # x: [T, H] -> [T, H]; token_mask: [T] bool (False: a padding row, routed to no expert) or None
        shared = self.shared_experts(x) if self.shared_experts is not None else None
        return fused_moe(x, self.router.weight, self.w13, self.w2, self.top_k, shared_out=shared,
                         kernels=self.kernels, num_shared=self.num_shared, token_mask=token_mask)
