"""PyTorch's private fused-attention ops that return the log-sum-exp, behind a schema guard.

The prefix path runs the main attention (over the sequence's own keys) with PyTorch's flash or memory-efficient
kernels, because they return the natural-log log-sum-exp (LSE) the gated merge needs, and their backward ops take the
output and LSE, so they can be run with the *merged* output and LSE (the ring-attention recipe, PAPER.md section 3).

These ops are private (`torch.ops.aten._scaled_dot_product_*`): their signatures move between releases. Each use is
guarded by `schema_problem`, which compares the installed schema with the arguments this module passes (positions,
types, the names it relies on) and the results it reads. A mismatch never fails the user's call: the caller falls back
to the reference path with a one-time notice.

Torch 2.11 (the GPU machine's) and 2.14 (here) have identical schemas for the four ops (read from 2.11's ATen op
headers; tests/test_prefix_dispatch.py holds them). Earlier releases named the flash forward's 7th and 8th results
`philox_seed, philox_offset` instead of `rng_state, unused`: we never read them, so the guard checks only how many
results there are and the types of the two we read (out, logsumexp). The efficient kernel's LSE padding (meta
registration) is the same in both. What does differ: 2.11's documentation lists grouped-query attention for flash
and math only (2.14 adds the memory-efficient kernel), hence the per-group calls below.

Conventions of the two kernels (the prefix kernel fixes them up, see csrc/prefix/prefix_params.h):

- flash: q, k, v [B, H, T|S, D] (grouped-query attention native: Hq a multiple of Hkv); no mask; `is_causal` is
  bottom-right aligned (FA2), as fastpeft's `causal` is; LSE [B, Hq, T] float32, natural log; a row that sees no key
  (causal with T > S) gets out 0 and LSE **+inf**.
- efficient (memory-efficient / cutlass): additive bias in q's dtype, 4-D, last dim contiguous, other strides
  multiples of 16 elements (zero strides allowed); `is_causal` is **top-left** aligned (so it is only used when
  T == S, where both alignments agree); LSE [B, H, ceil(T / 32) * 32] float32, natural log, **padded** (entries past T
  are not written); a row whose keys are all -inf gets a non-finite LSE (-inf) and an output we never read. We do
  not rely on its grouped-query attention support (not in 2.11): a GQA call runs once per query group
  (`main_forward` / `main_backward` in `fastpeft/ops/_prefix_cuda.py`).

tests/cuda/test_prefix_private_ops_cuda.py checks these conventions on the GPU machine's torch;
tests/prefix_emulation.py reproduces them for the CPU tests of the glue.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

FLASH_FWD = "_scaled_dot_product_flash_attention"
FLASH_BWD = "_scaled_dot_product_flash_attention_backward"
EFFICIENT_FWD = "_scaled_dot_product_efficient_attention"
EFFICIENT_BWD = "_scaled_dot_product_efficient_attention_backward"

# The efficient kernel pads its LSE's last dim to a multiple of this (CUDA builds; ROCm does not pad).
EFFICIENT_LSE_ALIGN = 32
# The efficient kernel wants the bias' row strides to be multiples of this many elements (PyTorch pads to 16 too).
EFFICIENT_BIAS_ALIGN = 16


@dataclass(frozen=True)
class Signature:
    """What we rely on in an op's schema: the positional arguments we pass, in order, as (name, type) with None for
    a name we do not rely on; the keyword-only arguments we pass; how many results there are and the types of the
    leading results we read."""

    positional: tuple
    keyword: tuple
    num_returns: int
    leading_returns: tuple


SIGNATURES = {
    FLASH_FWD: Signature(
        positional=(("query", "Tensor"), ("key", "Tensor"), ("value", "Tensor"), ("dropout_p", "float"),
                    ("is_causal", "bool"), ("return_debug_mask", "bool")),
        keyword=(("scale", "float?"),),
        num_returns=9,
        leading_returns=("Tensor", "Tensor"),  # output, logsumexp
    ),
    FLASH_BWD: Signature(
        positional=(("grad_out", "Tensor"), ("query", "Tensor"), ("key", "Tensor"), ("value", "Tensor"),
                    ("out", "Tensor"), ("logsumexp", "Tensor"), ("cum_seq_q", "Tensor"), ("cum_seq_k", "Tensor"),
                    ("max_q", "SymInt"), ("max_k", "SymInt"), ("dropout_p", "float"), ("is_causal", "bool"),
                    (None, "Tensor"), (None, "Tensor")),  # philox seed / offset (rng state): unused without dropout
        keyword=(("scale", "float?"),),
        num_returns=3,
        leading_returns=("Tensor", "Tensor", "Tensor"),
    ),
    EFFICIENT_FWD: Signature(
        positional=(("query", "Tensor"), ("key", "Tensor"), ("value", "Tensor"), ("attn_bias", "Tensor?"),
                    ("compute_log_sumexp", "bool"), ("dropout_p", "float"), ("is_causal", "bool")),
        keyword=(("scale", "float?"),),
        num_returns=4,
        leading_returns=("Tensor", "Tensor"),
    ),
    EFFICIENT_BWD: Signature(
        positional=((None, "Tensor"), ("query", "Tensor"), ("key", "Tensor"), ("value", "Tensor"),
                    ("attn_bias", "Tensor"), ("out", "Tensor"), ("logsumexp", "Tensor"), (None, "Tensor"),
                    (None, "Tensor"), ("dropout_p", "float"), ("grad_input_mask", "bool[4]"), ("is_causal", "bool")),
        keyword=(("scale", "float?"),),
        num_returns=4,
        leading_returns=("Tensor", "Tensor", "Tensor"),
    ),
}


def _type_name(t) -> str:
    """A schema type as torch prints it ("Tensor", "Optional[Tensor]", "List[bool]", "SymInt", ...)."""
    return str(t)


@functools.lru_cache(maxsize=None)
def _schema_type(type_name: str) -> str:
    """The printed form of a type written as in native_functions.yaml ("Tensor?", "bool[4]", "float?")."""
    return _type_name(torch._C.parse_schema(f"f({type_name} x) -> ()").arguments[0].type)


def schema_problem(schema, expected: Signature) -> Optional[str]:
    """None when `schema` (a torch._C.FunctionSchema) has what `expected` relies on, else what differs."""
    positional = [a for a in schema.arguments if not a.kwarg_only]
    keyword = {a.name: a for a in schema.arguments if a.kwarg_only}
    if len(positional) < len(expected.positional):
        return f"{schema.name}: {len(positional)} positional arguments, expected at least {len(expected.positional)}"
    for index, ((name, type_name), arg) in enumerate(zip(expected.positional, positional)):
        actual_type = _type_name(arg.type)
        # SymInt and int are the same at run time for us (we pass Python ints).
        types_match = actual_type == _schema_type(type_name) or {actual_type, type_name} == {"SymInt", "int"}
        if not types_match or (name is not None and arg.name != name):
            return f"{schema.name}: argument {index} is '{actual_type} {arg.name}', expected '{type_name} {name}'"
    # Positional arguments we do not pass must have defaults (a new required argument breaks our calls).
    for arg in positional[len(expected.positional):]:
        if not arg.has_default_value():
            return f"{schema.name}: new required argument '{arg.name}'"
    for name, type_name in expected.keyword:
        if name not in keyword or _type_name(keyword[name].type) != _schema_type(type_name):
            return f"{schema.name}: keyword-only argument '{type_name} {name}' missing or changed"
    for name, arg in keyword.items():
        if name not in dict(expected.keyword) and not arg.has_default_value():
            return f"{schema.name}: new required keyword-only argument '{name}'"
    if len(schema.returns) != expected.num_returns:
        return f"{schema.name}: {len(schema.returns)} results, expected {expected.num_returns}"
    for index, type_name in enumerate(expected.leading_returns):
        if _type_name(schema.returns[index].type) != _schema_type(type_name):
            return f"{schema.name}: result {index} is {schema.returns[index].type}, expected {type_name}"
    return None


def installed_schema(op_name: str):
    """The installed schema of `aten::<op_name>.default`, or None when the op does not exist."""
    packet = getattr(torch.ops.aten, op_name, None)
    if packet is None:
        return None
    try:
        return packet.default._schema
    except AttributeError:
        return None


@functools.lru_cache(maxsize=None)
def backend_problem(backend: str) -> Optional[str]:
    """None when the forward and backward ops of `backend` ("flash" or "efficient") match what we call, else why not.
    Cached: the installed torch does not change while the process runs."""
    if torch.version.hip is not None:
        return "ROCm builds of torch use other attention kernels (LSE layout, GQA) than the ones guarded here"
    names = (FLASH_FWD, FLASH_BWD) if backend == "flash" else (EFFICIENT_FWD, EFFICIENT_BWD)
    for name in names:
        schema = installed_schema(name)
        if schema is None:
            return f"torch {torch.__version__} has no aten::{name}"
        problem = schema_problem(schema, SIGNATURES[name])
        if problem is not None:
            return f"torch {torch.__version__}: {problem}"
    return None


def padded_lse_length(t: int) -> int:
    """Length of the efficient kernel's LSE rows for t queries."""
    return -(-t // EFFICIENT_LSE_ALIGN) * EFFICIENT_LSE_ALIGN


class AtenAttention:
    """Thin calls of the guarded private ops, one kernel launch each. Arguments are already prepared (see
    `fastpeft/ops/_prefix_cuda.py`); results follow the conventions in this module's docstring.

    Tests substitute an object with the same four methods (an emulation of the kernels' conventions on the CPU)."""

    def flash_forward(self, q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
        results = torch.ops.aten._scaled_dot_product_flash_attention.default(q, k, v, 0.0, causal, False, scale=scale)
        return results[0], results[1]

    def flash_backward(self, dout, q, k, v, out, lse, causal: bool, scale: float) -> tuple[Tensor, Tensor, Tensor]:
        # Without dropout the rng-state arguments are not read; pass tensors shaped like the forward's (meta: a [2]
        # and a [] uint64 tensor), uninitialised (no fill kernels). cum_seq_q / cum_seq_k are undefined (None) for
        # dense, non-varlen inputs.
        seed = torch.empty(2, dtype=torch.uint64, device=q.device)
        offset = torch.empty((), dtype=torch.uint64, device=q.device)
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward.default(
            dout, q, k, v, out, lse, None, None, q.shape[2], k.shape[2], 0.0, causal, seed, offset, scale=scale
        )
        return dq, dk, dv

    def efficient_forward(self, q, k, v, bias: Optional[Tensor], causal: bool, scale: float):
        out, lse, _, _ = torch.ops.aten._scaled_dot_product_efficient_attention.default(
            q, k, v, bias, True, 0.0, causal, scale=scale
        )
        return out, lse

    def efficient_backward(self, dout, q, k, v, bias, out, lse_padded, causal: bool, scale: float, needs):
        seed = torch.empty((), dtype=torch.int64, device=q.device)  # not read without dropout
        offset = torch.empty((), dtype=torch.int64, device=q.device)
        dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward.default(
            dout, q, k, v, bias, out, lse_padded, seed, offset, 0.0, [bool(n) for n in needs] + [False], causal,
            scale=scale,
        )
        return dq, dk, dv
