"""This rank's place in the tensor-parallel group, passed explicitly to every layer (no global context).

Layers ask it for their share (`shard(n)`) and call its collectives; with size 1 every collective is a
no-op, so the single-device model is the same code with `SINGLE`.
"""
from dataclasses import dataclass
from typing import Any, Optional

import torch


class TensorParallelError(ValueError):
    """A tensor_parallel_size this model cannot be split by; raised before any process starts."""


def check_tensor_parallel(config, size: int):
    """Rejects a size that does not divide the heads, the KV heads, the experts or the MLP width."""
    if not isinstance(size, int) or size < 1:
        raise TensorParallelError(f"tensor_parallel_size must be a positive integer, got {size!r}")
    if size == 1:
        return
    checks = [("num_attention_heads", config.num_attention_heads),
              ("num_key_value_heads", config.num_key_value_heads)]
    if config.is_moe:
        checks.append(("num_experts", config.num_experts))
        if config.num_shared_experts:
            checks.append(("shared experts' intermediate size", config.shared_intermediate_size))
    else:
        checks.append(("intermediate_size", config.intermediate_size))
    for what, value in checks:
        if value % size:
            divisors = [d for d in range(1, value + 1) if value % d == 0 and d <= 16]
            raise TensorParallelError(
                f"tensor_parallel_size={size} does not divide {what}={value}: each rank must hold an equal share. "
                f"Use one of {divisors} (every size must also divide the other counts)")


@dataclass(frozen=True)
class TensorParallel:
    rank: int = 0
    size: int = 1
    group: Optional[Any] = None        # collectives on the model's tensors (NCCL on GPUs, gloo on CPU)
    cpu_group: Optional[Any] = None    # gloo: step headers and small host-side agreements

    def shard(self, n: int):
        """(start, count) of this rank's equal share of n items (n divisible by size)."""
        count = n // self.size
        return self.rank * count, count

    def padded_shard(self, n: int):
        """(start, count, padded count): a share of n rounded up so every rank has the same count; the
        last rank's share is short by the padding."""
        padded = -(-n // self.size)
        start = self.rank * padded
        return start, max(0, min(padded, n - start)), padded

    def all_reduce(self, x):
        """Sums x across ranks in place; returns it."""
        if self.size > 1:
            torch.distributed.all_reduce(x, group=self.group)
        return x

    def all_gather_last_dim(self, x):
        """[..., n] on every rank -> [..., size * n], rank r's columns at [r * n, (r + 1) * n)."""
        if self.size == 1:
            return x
        out = x.new_empty((self.size * x.shape[0],) + tuple(x.shape[1:]))   # ranks stacked on dim 0 (gloo's layout)
        _all_gather(out, x.contiguous(), group=self.group)
        out = out.view((self.size,) + tuple(x.shape))
        return out.movedim(0, -2).reshape(*x.shape[:-1], self.size * x.shape[-1])

    def min_over_ranks(self, value: int) -> int:
        """The smallest of an integer across ranks (e.g. KV blocks that fit on every device)."""
        if self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN, group=self.cpu_group)
        return int(t.item())


SINGLE = TensorParallel()

# torch >= 2.14 names it all_gather_single (all_gather_into_tensor is deprecated there); the GPU machine has 2.11
_all_gather = getattr(torch.distributed, "all_gather_single", None) or torch.distributed.all_gather_into_tensor
