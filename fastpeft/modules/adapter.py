"""Bottleneck adapters: the adapter weights, and the wrapper that puts one on a sublayer's output projection.

Sequential insertion (Houlsby, Pfeiffer): y = h + s * f(h), h the output projection's output.
Parallel insertion (He et al.): y = h + s * f(x), x the sublayer's input, captured by a forward pre-hook on the
module that receives it (`CaptureInput`), because in most models the input and the output projection are not
the same module (BERT's FFN input reaches `BertOutput`, its output projection is `BertOutput.dense`).
AdapterHub's variants read the block's residual stream instead, captured the same way: a parallel adapter reads
the residual itself, a sequential one h + residual (normalised by the block's LayerNorm in post-LN models).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from fastpeft.config import AdapterConfig
from fastpeft.modules._common import like
from fastpeft.ops import adapter as adapter_op


class BottleneckAdapter(nn.Module):
    """Delta h = act(x W_down^T + b_down) W_up^T + b_up, added with scale s.

    Parameters (nn.Linear layout, settable from outside): `down.weight` [r, d_in], `down.bias` [r],
    `up.weight` [d_out, r], `up.bias` [d_out], and `scale` (a 0-d parameter) when the config says "learned";
    otherwise `scale` is a float.
    """

    def __init__(self, d_in: int, d_out: int, config: AdapterConfig, *, device=None, dtype=None):
        super().__init__()
        self.down = nn.Linear(d_in, config.r, device=device, dtype=dtype)
        self.up = nn.Linear(config.r, d_out, device=device, dtype=dtype)
        self.activation = config.activation
        self.dropout = config.dropout
        self.dropout_position = config.dropout_position
        if config.scale == "learned":
            self.scale = nn.Parameter(torch.ones((), device=device, dtype=dtype))
        else:
            self.scale = float(config.scale)
        self.reset_parameters(config.init)

    @torch.no_grad()
    def reset_parameters(self, init: str) -> None:
        if init == "lora":
            # Kaiming-uniform down-projection (nn.Linear's default), zero up-projection: exactly the identity.
            nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
            nn.init.zeros_(self.up.weight)
        elif init == "bert":
            nn.init.normal_(self.down.weight, std=0.02)
            nn.init.normal_(self.up.weight, std=0.02)
        elif init == "houlsby":
            # Near-identity: N(0, 1e-2) truncated at 2 std (PAPER.md section 4).
            for weight in (self.down.weight, self.up.weight):
                nn.init.trunc_normal_(weight, std=1e-2, a=-2e-2, b=2e-2)
        else:
            raise ValueError(f"BottleneckAdapter: 'init' must be 'lora', 'bert' or 'houlsby', got {init!r}")
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: Tensor, h: Tensor) -> Tensor:
        """h + s * Delta h(x). Passing `x is h` is sequential insertion."""
        dropping = self.dropout > 0.0 and self.training
        if dropping and self.dropout_position == "input":
            # Dropout on the adapter's input; the residual h stays undropped.
            x = nn.functional.dropout(x, self.dropout, training=True)
        scale = self.scale if isinstance(self.scale, float) else like(self.scale, h)
        weights = (like(self.down.weight, h), like(self.up.weight, h), like(self.down.bias, h), like(self.up.bias, h))
        if dropping and self.dropout_position == "output":
            # Dropout on s * Delta h (AdapterHub): the op adds the change onto zeros, then h is added.
            delta = adapter_op(x, torch.zeros_like(h), *weights, scale=scale, activation=self.activation)
            return h + nn.functional.dropout(delta, self.dropout, training=True)
        return adapter_op(x, h, *weights, scale=scale, activation=self.activation)

    def extra_repr(self) -> str:
        scale = "learned" if isinstance(self.scale, nn.Parameter) else self.scale
        dropout = f"{self.dropout} on the {self.dropout_position}" if self.dropout else "0.0"
        return f"activation={self.activation}, scale={scale}, dropout={dropout}"


class AdapterLayer(nn.Module):
    """Wraps a sublayer's output projection `base_layer` and adds the adapter to its output.

    What the adapter reads (`CaptureInput` hands over the captured tensor c just before the sublayer runs):

    - sequential: h itself, or with `reads_sum`, h + c, c being the block's residual, normalised by `post_norm`
      when given (AdapterHub's `original_ln_before` in post-LN models); the adapter still adds onto h.
    - parallel: c, the sublayer's input (or the block's residual stream).
    """

    def __init__(
        self, base_layer: nn.Module, adapter: BottleneckAdapter, sequential: bool, post_norm=None, reads_sum=False
    ):
        super().__init__()
        self.base_layer = base_layer
        self.adapter = adapter
        self.sequential = sequential
        self.reads_sum = sequential and (reads_sum or post_norm is not None)
        # The model's own LayerNorm, held in a list so that it is not registered (and counted) twice.
        self.post_norm = [post_norm] if post_norm is not None else []
        # Set by `CaptureInput` just before the sublayer runs; consumed (and released) by `forward`.
        self.captured_input: Optional[Tensor] = None

    def forward(self, *args, **kwargs) -> Tensor:
        h = self.base_layer(*args, **kwargs)
        if self.sequential and not self.reads_sum:
            return self.adapter(h, h)
        x, self.captured_input = self.captured_input, None
        if x is None:
            raise RuntimeError(
                "fastpeft: an adapter ran without the sublayer's input; the sublayer module that feeds this "
                "output projection was not called (was the output projection called directly?)"
            )
        if self.sequential:
            x = h + x
            if self.post_norm:
                x = self.post_norm[0](x)
        return self.adapter(x, h)

    def extra_repr(self) -> str:
        insertion = "sequential" if self.sequential else "parallel"
        if self.post_norm:
            return f"insertion={insertion}, original_ln_before=True"
        return f"insertion={insertion}" + (", reads h + residual" if self.reads_sum else "")


class CaptureInput:
    """Forward pre-hook that hands the sublayer's input to a parallel `AdapterLayer`.

    A callable object rather than a closure, so that `copy.deepcopy` of the model points the copy's hook at the
    copy's adapter.
    """

    def __init__(self, target: AdapterLayer, name: str, position: int):
        self.target = target
        self.name = name
        self.position = position

    def __call__(self, module, args, kwargs):
        if self.name in kwargs:
            self.target.captured_input = kwargs[self.name]
        else:
            self.target.captured_input = args[self.position]
        return None
