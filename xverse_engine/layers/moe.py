import torch
from torch import nn

from ..ops import fused_moe
from .mlp import SwiGLU


class MoE(nn.Module):
    """Routed experts (fp32 router, softmax, top-k, renormalise) plus the shared experts' SwiGLU.

    Experts are stacked so one grouped GEMM serves them all: w13 [E, 2I, H] (gate rows, then up rows)
    and w2 [E, H, I]. The router stays float32 as in the checkpoint.
    """

    def __init__(self, config, dtype, device, kernels: str):
        super().__init__()
        E, H, I = config.num_experts, config.hidden_size, config.intermediate_size
        self.top_k = config.moe_top_k
        self.kernels = kernels
        self.router = nn.Linear(H, E, bias=False, dtype=torch.float32, device=device)
        self.w13 = nn.Parameter(torch.empty(E, 2 * I, H, dtype=dtype, device=device), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(E, H, I, dtype=dtype, device=device), requires_grad=False)
        self.shared_experts = (SwiGLU(H, config.shared_intermediate_size, dtype, device)
                               if config.num_shared_experts > 0 else None)

    def forward(self, x):
        # x: [T, H] -> [T, H]
        shared = self.shared_experts(x) if self.shared_experts is not None else None
        return fused_moe(x, self.router.weight, self.w13, self.w2, self.top_k, shared_out=shared,
                         kernels=self.kernels)
