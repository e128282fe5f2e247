"""One Python front for every custom op: torch.ops.xverse.* (C++/CUDA) or its pure-PyTorch twin.

Each front function takes `kernels` ("cuda" | "cpu" | "torch", already resolved) and calls either
the extension's op or the twin of the same contract; fake (meta) implementations are registered here
so that the ops trace under torch.compile and pass torch.library.opcheck.
"""
from .attention import paged_attention_decode, paged_attention_prefill, reshape_and_cache
from .extension import KERNEL_CHOICES, extension_available, extension_built_with_cuda, resolve_kernels
from .fused import add_rmsnorm, rope_cache
from .moe import fused_moe
from .sampling import draw_top_k_top_p

__all__ = [
    "KERNEL_CHOICES", "extension_available", "extension_built_with_cuda", "resolve_kernels",
    "fused_moe", "add_rmsnorm", "rope_cache", "reshape_and_cache", "paged_attention_decode", "paged_attention_prefill",
    "draw_top_k_top_p",
]
