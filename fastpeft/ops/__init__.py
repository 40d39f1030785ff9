"""fastpeft's two ops, registered as PyTorch custom ops (torch.ops.fastpeft.*)."""

from fastpeft.ops.adapter import adapter
from fastpeft.ops.prefix_attention import prefix_attention

__all__ = ["adapter", "prefix_attention"]
