"""fastpeft.prefix_attention on a GPU against explicit concatenation in float64. Skips without one."""

from __future__ import annotations

import pytest
import torch

import fastpeft
from helpers import requires_kernels
from test_prefix_attention_op import concat_attention64, padding_mask

pytestmark = requires_kernels


@pytest.mark.parametrize("causal", [False, True])
def test_matches_concatenation_float64_on_gpu(causal):
    torch.manual_seed(0)
    q = torch.randn(2, 4, 9, 16, device="cuda", dtype=torch.float64)
    k, v = (torch.randn(2, 2, 11, 16, device="cuda", dtype=torch.float64) for _ in range(2))
    pk, pv = (torch.randn(2, 3, 16, device="cuda", dtype=torch.float64) for _ in range(2))
    mask = padding_mask(2, 11, [11, 5]).cuda()
    out = fastpeft.prefix_attention(q, k, v, pk, pv, causal=causal, attn_mask=mask)
    expected = concat_attention64(q.cpu(), k.cpu(), v.cpu(), pk.cpu(), pv.cpu(), attn_mask=mask.cpu(), causal=causal)
    torch.testing.assert_close(out.cpu(), expected, rtol=1e-10, atol=1e-10)
