import torch
from torch import nn


class RMSNorm(nn.Module):
    """RMSNorm as the model's code: normalise in fp32, cast back to the activation dtype, then scale."""

    def __init__(self, hidden_size: int, eps: float, dtype, device):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype, device=device), requires_grad=False)
        self.eps = eps

    def forward(self, x):
        # x: [T, H]
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)
