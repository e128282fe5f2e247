import torch
from torch import nn

from ..ops.fused import add_rmsnorm, rms_norm_torch


class RMSNorm(nn.Module):
    """RMSNorm as the model's code: normalise in fp32, cast back to the activation dtype, then scale.

    Called as `x, residual = norm(x, residual)`: the residual stream absorbs x first (the decoder layer's
    skip connection), then x becomes the normalised stream. Lean: one fused op, in place on both tensors;
    otherwise the add and the norm run as separate PyTorch ops (the unfused baseline).
    """

    def __init__(self, hidden_size: int, eps: float, dtype, device, kernels: str = "torch", lean: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype, device=device), requires_grad=False)
        self.eps = eps
        self.kernels = kernels
        self.lean = lean

    def forward(self, x, residual):
        # x, residual: [T, H] -> (normalised x, updated residual)
        if self.lean:
            return add_rmsnorm(x, residual, self.weight, self.eps, kernels=self.kernels)
        residual = x + residual
        return rms_norm_torch(residual, self.weight, self.eps), residual
