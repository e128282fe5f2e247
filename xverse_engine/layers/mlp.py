import torch.nn.functional as F
from torch import nn

from ..distributed.parallel_state import SINGLE


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), gate and up packed into one [2I, H] weight (one GEMM instead of two).
    Serves the dense model's MLP and the MoE block's shared experts.

    Tensor parallel (tp.size > 1): this rank holds 1/N of the intermediate columns (gate/up rows, down
    columns) and all-reduces its partial output. The MoE block's shared experts pass their share as
    intermediate_size and tp=SINGLE: their partial joins the routed partial in the block's one all-reduce."""

    def __init__(self, hidden_size: int, intermediate_size: int, dtype, device, tp=SINGLE):
        super().__init__()
        intermediate_size //= tp.size
        self.tp = tp
        self.gate_up_proj = nn.Linear(hidden_size, 2 * intermediate_size, bias=False, dtype=dtype, device=device)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False, dtype=dtype, device=device)
        self.intermediate_size = intermediate_size

    def forward(self, x):
        # x: [T, H] -> [T, H]
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
        return self.tp.all_reduce(self.down_proj(F.silu(gate) * up))
