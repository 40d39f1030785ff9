"""Shared by test_from_peft.py and test_from_adapters.py: float32 comparisons and the gradient check.

Gradients are compared through the converter itself: after a backward pass on the source, each trainable source
parameter's value is replaced by its gradient and the source is converted again. Conversion maps values linearly
(copies, slices, transposes), so the second conversion holds the source's gradients under fastpeft's parameter
names, and must equal the gradients of the first conversion, name by name. That the mapping itself is right is what
the output comparisons (with random weights) show.
"""

from __future__ import annotations

import torch

import fastpeft
from model_helpers import task_labels


def assert_f32_close(actual, expected, what: str) -> None:
    """Equal within float32 rounding: 1e-5 relative, measured against the tensor's own scale."""
    actual, expected = actual.detach().double(), expected.detach().double()
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * max(scale, 1e-6), msg=lambda m: f"{what}: {m}")


def loss(model, arch: str, data: dict, seed: int = 11) -> torch.Tensor:
    # The same seed before each model's forward: dropout masks, where there is dropout, are drawn alike.
    torch.manual_seed(seed)
    out = model(**data, **task_labels(arch, data))
    return out.loss


def gradients(model, arch: str, data: dict) -> dict:
    model.zero_grad(set_to_none=True)
    loss(model, arch, data).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def check_gradients(source, convert, arch: str, data: dict) -> int:
    """Gradients of the converted model equal the source's; returns how many parameters were compared.

    `convert(source)` converts; the converted model shares the source's base weights (and so its task head).
    """
    ours = convert(source)
    source.train()
    ours.train()
    ours_grads = gradients(ours, arch, data)
    source_grads = gradients(source, arch, data)
    # Both train the same number of values, and every one of them gets a gradient.
    assert sum(p.numel() for p in source.parameters() if p.requires_grad) == fastpeft.trainable_parameters(ours)[0]
    assert set(ours_grads) == {n for n, p in ours.named_parameters() if p.requires_grad}
    assert set(source_grads) == {n for n, p in source.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for name, p in source.named_parameters():
            if name in source_grads:
                p.copy_(source_grads[name])
    expected = dict(convert(source).named_parameters())
    for name, grad in ours_grads.items():
        assert_f32_close(grad, expected[name], f"gradient of {name}")
    return len(ours_grads)


def generated(model, data: dict, **kwargs) -> list:
    data = {k: v for k, v in data.items() if k != "decoder_input_ids"}
    return model.generate(**data, max_new_tokens=5, do_sample=False, **kwargs).tolist()


def differs_from_base(ours, base, data: dict) -> float:
    """How much the converted adapter changes the last hidden state: a conversion that dropped it would change
    nothing. (The last hidden state, because a tiny random classifier's logits hardly move.)"""

    def last_hidden(model):
        out = model(**data, output_hidden_states=True)
        return (out.decoder_hidden_states if "decoder_hidden_states" in out else out.hidden_states)[-1]

    with torch.no_grad():
        return (last_hidden(ours) - last_hidden(base)).abs().max().item()
