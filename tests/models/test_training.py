"""Every (architecture, method): a few optimizer steps lower the loss and change exactly the intended parameters;
save then load into a fresh model gives identical outputs."""

import pytest
import torch
from torch import nn

import fastpeft
from model_helpers import ARCHS, METHODS, build, inputs, method_config, method_parameter_names, output, task_labels


def intended_parameters(model, config) -> set:
    """What the method should train, by name: inserted parameters, the classification head, and the norms for
    methods that train them (Houlsby)."""
    names = method_parameter_names(model) | {n for n, _ in model.named_parameters() if n.startswith("classifier.")}
    if config.train_layernorm:
        for module_name, module in model.named_modules():
            if isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("RMSNorm"):
                names |= {f"{module_name}.{n}" for n, _ in module.named_parameters(recurse=False)}
    return names


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ARCHS)
def test_training_steps_and_save_load(arch, method, tmp_path):
    config = method_config(method)
    model = build(arch, "task")
    fastpeft.apply(model, config)
    data = inputs(arch)
    labels = task_labels(arch, data)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=1e-2)
    model.train()
    losses = []
    for _ in range(6):
        loss = model(**data, **labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    # On one fixed batch with a small step, every step lowers the loss.
    assert all(later < earlier for earlier, later in zip(losses, losses[1:])), losses

    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == intended_parameters(model, config)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == changed

    model.eval()
    fastpeft.save_adapter(model, tmp_path)
    fresh = build(arch, "task")
    fastpeft.load_adapter(fresh, tmp_path)
    with torch.no_grad():
        assert torch.equal(output(fresh, data), output(model, data))
    assert fastpeft.get_patch_config(fresh) == config
