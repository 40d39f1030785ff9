"""LoRA on a linear projection (`nn.Linear`, or transformers' `Conv1D` as in GPT-2), fused projections included.

y = W x + b + (alpha / r) * B A x, computed as `fastpeft.adapter(x, base(x), A, B, scale=alpha/r,
activation="identity")`: the base projection's output is the h the low-rank update is added onto.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from fastpeft.config import LoRAConfig
from fastpeft.modules._common import like
from fastpeft.ops import adapter as adapter_op


def is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2): a linear layer whose weight is stored [in, out]."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is what fastpeft patches
        return False
    return isinstance(module, Conv1D)


def linear_features(module: nn.Module) -> Optional[tuple]:
    """(in_features, out_features) of a projection LoRA can wrap, or None."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if is_conv1d(module):
        return module.weight.shape[0], module.weight.shape[1]
    return None


class LoRALinear(nn.Module):
    """A projection with one LoRA per role.

    `parts` maps each role to the slice of the output it adapts: None for the whole output, or (index, count)
    for slice `index` of `count` equal slices of a fused projection (GPT-2's c_attn is [q | k | v]). A role on the
    whole of a fused projection is named by its roles joined with "_" ("q_k_v", `LoRAConfig.fuse_slices`).

    Parameters (settable from outside): `lora_A[role]` [r, in_features] and `lora_B[role]` [slice size, r];
    the wrapped projection is `base_layer`.
    """

    def __init__(self, base_layer: nn.Module, parts: dict, config: LoRAConfig):
        super().__init__()
        features = linear_features(base_layer)
        if features is None:
            raise TypeError(f"LoRALinear: 'base_layer' must be nn.Linear or Conv1D, got {type(base_layer).__name__}")
        in_features, out_features = features
        weight = base_layer.weight
        self.base_layer = base_layer
        self.r = config.r
        self.alpha = config.alpha
        self.scale = config.scale
        self.dropout = config.dropout
        self.parts = dict(parts)
        counts = {part[1] for part in self.parts.values() if part is not None}
        if None in self.parts.values() and (len(self.parts) != 1):
            raise ValueError(f"LoRALinear: a role on the whole output must be the only one, got parts {parts}")
        if len(counts) > 1:
            raise ValueError(f"LoRALinear: the slices of a fused projection must share one count, got parts {parts}")
        # None: one update on the whole output; n: updates on slices of n equal slices of the output.
        self.fused_parts = counts.pop() if counts else None
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        for role, part in self.parts.items():
            rows = out_features if part is None else out_features // part[1]
            self.lora_A[role] = nn.Parameter(torch.empty(config.r, in_features, device=weight.device, dtype=weight.dtype))
            self.lora_B[role] = nn.Parameter(torch.empty(rows, config.r, device=weight.device, dtype=weight.dtype))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        # A Kaiming-uniform, B = 0: the update starts at exactly zero (PAPER.md section 4).
        for role in self.parts:
            nn.init.kaiming_uniform_(self.lora_A[role], a=math.sqrt(5))
            nn.init.zeros_(self.lora_B[role])

    def forward(self, x: Tensor) -> Tensor:
        h = self.base_layer(x)
        if self.dropout > 0.0 and self.training:
            x = nn.functional.dropout(x, self.dropout, training=True)
        if self.fused_parts is None:
            (role,) = self.parts
            return self._update(role, x, h)
        chunks = list(h.chunk(self.fused_parts, dim=-1))
        for role, (index, _) in self.parts.items():
            chunks[index] = self._update(role, x, chunks[index])
        return torch.cat(chunks, dim=-1)

    def _update(self, role: str, x: Tensor, h: Tensor) -> Tensor:
        a, b = like(self.lora_A[role], h), like(self.lora_B[role], h)
        return adapter_op(x, h, a, b, scale=self.scale, activation="identity")

    @torch.no_grad()
    def merged_weight(self) -> Tensor:
        """The base weight with every update folded in, W + s * B A (computed in float32 or better)."""
        weight = self.base_layer.weight
        compute = torch.float64 if weight.dtype == torch.float64 else torch.float32
        merged = weight.to(compute).clone()
        transposed = is_conv1d(self.base_layer)
        out_features = weight.shape[1] if transposed else weight.shape[0]
        for role, part in self.parts.items():
            delta = self.scale * (self.lora_B[role].to(compute) @ self.lora_A[role].to(compute))
            if part is None:
                rows = slice(None)
            else:
                size = out_features // part[1]
                rows = slice(part[0] * size, (part[0] + 1) * size)
            if transposed:
                merged[:, rows] += delta.t()
            else:
                merged[rows] += delta
        return merged.to(weight.dtype)

    def extra_repr(self) -> str:
        return f"r={self.r}, scale={self.scale:g}, roles={list(self.parts)}, dropout={self.dropout}"
