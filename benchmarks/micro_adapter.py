"""Micro benchmark of `fastpeft.adapter` (issue 3): y = h + s * (act(x W_down^T + b_down) W_up^T + b_up).

Methods (how the op is used):
- parallel: x and h are different tensors (the sublayer's input and output), ReLU, both biases, s = 4 (scaled PA);
- sequential: x is h (Houlsby / Pfeiffer), ReLU, both biases, s = 1;
- lora: a whole LoRA-adapted linear layer, y = x W^T + s (x A^T) B^T with W frozen [d, d], s = alpha / r = 2
  (fastpeft: `adapter(x, x @ W^T, A, B, activation="identity")`).

Providers:
- fastpeft: the op (CUDA kernels where built and usable, else the reference path);
- eager: the chain `adapters` and `peft` run: linear, activation, linear, scale, add;
- addmm: a strong eager baseline: the down bias and the residual h ride in cuBLAS epilogues (`torch.addmm` with h as
  the bias); the up bias rides in the same product as extra columns (ones against b_up / 8, 8 columns so the
  inner dimension stays a multiple of 8). LoRA: `addmm(x W^T, x A^T, B^T, alpha=s)`;
- compile: `torch.compile(fullgraph=True, dynamic=False)` of the eager chain, recompiled per case;
- peft: a real `peft.tuners.lora.Linear` around an `nn.Linear` (lora only).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import fastpeft
from benchmarks.micro import Op

SUBJECT = "adapter"
METHODS = ("parallel", "sequential", "lora")
PROVIDERS = ("fastpeft", "eager", "addmm", "compile", "peft")
SCALES = {"parallel": 4.0, "sequential": 1.0, "lora": 2.0}

# Issue 3: N in {2k, 16k, 64k} tokens, (d, r) in {(1024, 64), (4096, 64), (4096, 512), (768, 16)}.
FULL_TOKENS = (2048, 16384, 65536)
FULL_DIMS = ((1024, 64), (4096, 64), (4096, 512), (768, 16))
QUICK_TOKENS = (256,)
QUICK_DIMS = ((256, 16), (512, 64))


def cases(quick: bool) -> list[dict]:
    tokens, dims = (QUICK_TOKENS, QUICK_DIMS) if quick else (FULL_TOKENS, FULL_DIMS)
    return [
        {"case": f"N={n} d={d} r={r}", "method": method, "shape": {"N": n, "d": d, "r": r}}
        for method in METHODS
        for n in tokens
        for d, r in dims
    ]


def providers(method: str) -> tuple[str, ...]:
    return PROVIDERS if method == "lora" else PROVIDERS[:-1]


def work(case: dict, mode: str, provider: str, element_bytes: int) -> dict:
    """Minimal bytes moved and useful FLOPs (the same for every provider)."""
    n, d, r = case["shape"]["N"], case["shape"]["d"], case["shape"]["r"]
    method = case["method"]
    adapter_flops = 4 * n * d * r
    weights = 2 * d * r
    if method == "lora":
        fwd_flops, bwd_flops = adapter_flops + 2 * n * d * d, 2 * adapter_flops + 2 * n * d * d
        fwd_elems, bwd_elems = 2 * n * d + d * d + weights, 3 * n * d + d * d + 2 * weights
    else:
        residual = n * d if method == "parallel" else 0  # read h besides x
        fwd_flops, bwd_flops = adapter_flops, 2 * adapter_flops
        fwd_elems, bwd_elems = 2 * n * d + residual + weights, 3 * n * d + n * r + 2 * weights
    flops = {"forward": fwd_flops, "backward": bwd_flops, "full": fwd_flops + bwd_flops}[mode]
    elems = {"forward": fwd_elems, "backward": bwd_elems, "full": fwd_elems + bwd_elems}[mode]
    return {"bytes": elems * element_bytes, "flops": flops}


def build(case: dict, provider: str, device: torch.device, dtype: torch.dtype) -> Op:
    n, d, r = case["shape"]["N"], case["shape"]["d"], case["shape"]["r"]
    method, s = case["method"], SCALES[case["method"]]

    def weight(*shape, std):
        return (torch.randn(*shape, device=device) * std).to(dtype).requires_grad_()

    def activation_input():
        return torch.randn(n, d, device=device, dtype=dtype).requires_grad_()

    if method == "lora":
        return _lora(n, d, r, s, provider, device, dtype, weight, activation_input)

    w_down, b_down = weight(r, d, std=d**-0.5), weight(r, std=0.1)
    w_up, b_up = weight(d, r, std=r**-0.5), weight(d, std=0.1)
    params = [w_down, b_down, w_up, b_up]
    sequential = method == "sequential"
    make = (lambda: (activation_input(),)) if sequential else (lambda: (activation_input(), activation_input()))

    def eager(x, h):
        return h + s * F.linear(torch.relu(F.linear(x, w_down, b_down)), w_up, b_up)

    if provider == "fastpeft":
        def fn(x, h=None):
            return fastpeft.adapter(x, x if h is None else h, w_down, w_up, b_down, b_up, scale=s, activation="relu")
    elif provider == "eager":
        def fn(x, h=None):
            return eager(x, x if h is None else h)
    elif provider == "addmm":
        ones = torch.ones(n, 8, device=device, dtype=dtype)

        def fn(x, h=None):
            a = torch.relu(torch.addmm(b_down, x, w_down.t()))
            w = torch.cat([w_up, (b_up / 8).unsqueeze(1).expand(d, 8)], dim=1)
            return torch.addmm(x if h is None else h, torch.cat([a, ones], dim=1), w.t(), alpha=s)
    elif provider == "compile":
        torch._dynamo.reset()
        compiled = torch.compile(eager, fullgraph=True, dynamic=False)

        def fn(x, h=None):
            return compiled(x, x if h is None else h)
    else:
        raise ValueError(f"provider {provider!r} has no {method!r} adapter")
    return Op(fn=fn, make_inputs=make, params=params)


def _lora(n, d, r, s, provider, device, dtype, weight, activation_input) -> Op:
    base = torch.randn(d, d, device=device).mul(d**-0.5).to(dtype)  # frozen
    lora_a, lora_b = weight(r, d, std=d**-0.5), weight(d, r, std=r**-0.5)  # B non-zero: never time zeros
    params = [lora_a, lora_b]

    def eager(x):
        return F.linear(x, base) + F.linear(F.linear(x, lora_a), lora_b) * s

    if provider == "fastpeft":
        def fn(x):
            return fastpeft.adapter(x, F.linear(x, base), lora_a, lora_b, scale=s, activation="identity")
    elif provider == "eager":
        fn = eager
    elif provider == "addmm":
        def fn(x):
            return torch.addmm(F.linear(x, base), F.linear(x, lora_a), lora_b.t(), alpha=s)
    elif provider == "compile":
        torch._dynamo.reset()
        fn = torch.compile(eager, fullgraph=True, dynamic=False)
    elif provider == "peft":
        import peft

        linear = torch.nn.Linear(d, d, bias=False, device=device, dtype=dtype)
        with torch.no_grad():
            linear.weight.copy_(base)
        linear.requires_grad_(False)
        config = peft.LoraConfig(r=r, lora_alpha=int(s * r), lora_dropout=0.0)
        layer = peft.tuners.lora.Linear(linear, "default", config=config, r=r, lora_alpha=int(s * r))
        layer.to(device=device, dtype=dtype)
        with torch.no_grad():
            layer.lora_A["default"].weight.copy_(lora_a)
            layer.lora_B["default"].weight.copy_(lora_b)
        fn, params = layer, [p for p in layer.parameters() if p.requires_grad]
    else:
        raise ValueError(f"unknown provider {provider!r}")
    return Op(fn=fn, make_inputs=lambda: (activation_input(),), params=params)
