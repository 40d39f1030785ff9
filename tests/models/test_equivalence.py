"""Every (architecture, method): the patched model against an independent float64 computation, identity
initialisation, and `remove`."""

import pytest
import torch

import fastpeft
from model_helpers import (
    ARCHS,
    METHODS,
    assert_close64,
    build,
    has_prefix,
    identity_init,
    inputs,
    method_config,
    output,
    randomize_method_parameters,
    reference_model,
    snapshot_model,
    assert_same_model,
    task_labels,
)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ARCHS)
def test_matches_explicit_float64_computation(arch, method):
    config = method_config(method)
    model = build(arch).double()
    data = inputs(arch)
    with torch.no_grad():
        unpatched = output(model, data)
    fastpeft.apply(model, config)
    randomize_method_parameters(model)
    with torch.no_grad():
        actual = output(model, data)
        expected = output(reference_model(arch, lambda: build(arch), model, config), data)
    assert_close64(actual, expected)
    # The method does change the output (otherwise the comparison above would prove nothing).
    assert (actual - unpatched).abs().max() > 1e-3


@pytest.mark.parametrize("method", [m for m in METHODS if not has_prefix(method_config(m))])
@pytest.mark.parametrize("arch", ARCHS)
def test_identity_init_leaves_the_model_unchanged(arch, method):
    # Prefixes have no identity initialisation: the prefix always takes part of the attention.
    model = build(arch)
    data = inputs(arch)
    with torch.no_grad():
        before = output(model, data)
        fastpeft.apply(model, identity_init(method_config(method)))
        after = output(model, data)
    assert torch.equal(after, before)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ARCHS)
def test_remove_restores_the_model_bit_for_bit(arch, method):
    model = build(arch, "task")
    data = inputs(arch)
    with torch.no_grad():
        before = output(model, data)
    snapshot = snapshot_model(model)
    fastpeft.apply(model, method_config(method))
    randomize_method_parameters(model)
    # A training step, so that anything a step could touch has been touched.
    model.train()
    loss = model(**data, **task_labels(arch, data)).loss
    loss.backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    model.eval()
    for p in model.parameters():
        p.grad = None
    fastpeft.remove(model)
    assert not fastpeft.is_patched(model)
    assert_same_model(model, snapshot)
    with torch.no_grad():
        assert torch.equal(output(model, data), before)


@pytest.mark.parametrize("method", ["mam", "prefix_flat"])
@pytest.mark.parametrize("arch", ARCHS)
def test_prefix_with_eager_attention_masks(arch, method):
    # Eager models build additive float masks (sdpa ones: boolean or none); both reach the prefix attention.
    config = method_config(method)
    factory = lambda: build(arch, attn_implementation="eager")  # noqa: E731
    model = factory().double()
    fastpeft.apply(model, config)
    randomize_method_parameters(model)
    data = inputs(arch)
    with torch.no_grad():
        actual = output(model, data)
        expected = output(reference_model(arch, factory, model, config), data)
    assert_close64(actual, expected)


@pytest.mark.parametrize("arch", ["bert", "roberta", "bart"])
def test_original_ln_before_on_post_ln_models(arch):
    adapter = fastpeft.AdapterConfig(r=4, insertion="sequential", init="bert", original_ln_before=True)
    config = fastpeft.UnifiedConfig(attn=adapter, ffn=adapter)
    model = build(arch).double()
    fastpeft.apply(model, config)
    randomize_method_parameters(model)
    data = inputs(arch)
    with torch.no_grad():
        actual = output(model, data)
        expected = output(reference_model(arch, lambda: build(arch), model, config), data)
    assert_close64(actual, expected)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "mbart"])
def test_original_ln_before_needs_a_post_ln_model(arch):
    model = build(arch)
    snapshot = snapshot_model(model)
    config = fastpeft.AdapterConfig(r=4, insertion="sequential", original_ln_before=True)
    with pytest.raises(ValueError, match=rf"original_ln_before needs a post-LN architecture.*{arch} normalises before"):
        fastpeft.apply(model, config)
    assert_same_model(model, snapshot)
