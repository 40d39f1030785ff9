"""CUDA path of the prefix-attention op (called only when `kernels_usable` says the extension can run).

Until the fused prefix kernel lands (issue 4), this path runs the reference math on the GPU.
"""

from __future__ import annotations

from fastpeft import reference


def forward(q, k, v, prefix_k, prefix_v, attn_mask, causal, scale):
    return reference.prefix_attention_forward(q, k, v, prefix_k, prefix_v, attn_mask, causal, scale)


def backward(dout, q, k, v, prefix_k, prefix_v, attn_mask, out, lse, causal, scale, needs):
    return reference.prefix_attention_backward(dout, q, k, v, prefix_k, prefix_v, attn_mask, out, lse, causal, scale)
