"""The fastpeft options the converters rely on, checked with explicit math on both transformers lines (AdapterHub
itself only runs on 4.57, where test_from_adapters.py compares with it; `load_adapters_checkpoint` also runs on 5.x).

- `AdapterConfig(residual_input=True)`: a parallel adapter reads the block's residual stream (in pre-LN models the
  input of the norm in front of the sublayer), a sequential one h + that residual.
- `AdapterConfig(dropout_position="output")`: dropout on s * Delta h.
- `PrefixConfig(reparam_per_kind=True)`: one MLP per kind of attention, rows laid out by site.
- `PrefixConfig(shift_positions=True)`: the same as passing positions shifted by the prefix length.
"""

import pytest
import torch

import fastpeft
from model_helpers import ARCHS, LAYOUT, _join, _layers, act, build, inputs, output, randomize_method_parameters
from interop_helpers import assert_f32_close

PRE_LN = ("gpt2", "llama", "mistral", "qwen2", "mbart")


def _residual_capture(model, arch, layer, site, store):
    """Record the block's residual stream at `site` of `layer`, stated from the layout in model_helpers: the
    sublayer's input in post-LN models; in pre-LN models the input of the norm whose output the sublayer reads."""
    _, spec = LAYOUT[arch][site]
    if callable(spec):
        spec = spec("encoder" if ".encoder." in f".{layer}." else "decoder")
    module = model.get_submodule(_join(layer, spec[1]))
    if spec[0] == "output" and arch in PRE_LN:
        module.register_forward_pre_hook(lambda m, args: store.__setitem__("r", args[0]))
    elif spec[0] == "output":
        module.register_forward_hook(lambda m, args, out: store.__setitem__("r", out))
    else:
        _, _, name, position = spec

        def pre(m, args, kwargs):
            store["r"] = kwargs[name] if name in kwargs else args[position]

        module.register_forward_pre_hook(pre, with_kwargs=True)


@pytest.mark.parametrize("insertion", ["parallel", "sequential"])
@pytest.mark.parametrize("arch", ARCHS)
def test_residual_input_reads_the_residual_stream(arch, insertion):
    config = fastpeft.UnifiedConfig(
        attn=fastpeft.AdapterConfig(r=3, activation="silu", insertion=insertion, residual_input=True, scale=2.0),
        ffn=fastpeft.AdapterConfig(r=3, activation="relu", insertion=insertion, residual_input=True),
    )
    model = fastpeft.apply(build(arch, "task"), config)
    randomize_method_parameters(model)
    checked = []
    for _, layer in _layers(model, arch):
        for site in ("attn", "ffn"):
            store = {}
            _residual_capture(model, arch, layer, site, store)
            wrapper = model.get_submodule(_join(layer, LAYOUT[arch][site][0]))

            def check(module, args, out, store=store, site=site):
                h = module.base_layer(*args)
                a = module.adapter
                x = store["r"] if insertion == "parallel" else h + store["r"]
                expected = h + a.scale * (act(x @ a.down.weight.T + a.down.bias, a.activation) @ a.up.weight.T + a.up.bias)
                assert_f32_close(out, expected, f"{arch} {layer} {site}")
                checked.append(site)

            wrapper.register_forward_hook(check)
    with torch.no_grad():
        output(model, inputs(arch))
    assert len(checked) == 2 * len(_layers(model, arch))


def test_dropout_on_the_output():
    adapter = fastpeft.modules.BottleneckAdapter(
        8, 8, fastpeft.AdapterConfig(r=2, dropout=0.5, dropout_position="output", scale=3.0, init="bert")
    )
    x, h = torch.randn(4, 8), torch.randn(4, 8)
    torch.manual_seed(1)
    out = adapter(x, h)
    delta = 3.0 * (torch.relu(x @ adapter.down.weight.T + adapter.down.bias) @ adapter.up.weight.T + adapter.up.bias)
    torch.manual_seed(1)
    assert_f32_close(out, h + torch.nn.functional.dropout(delta, 0.5), "output dropout")
    assert ((out - h).abs() < 1e-7).any()  # some of the change was dropped, none of h
    adapter.eval()
    assert_f32_close(adapter(x, h), h + delta, "eval")


def test_one_prefix_mlp_per_kind_of_attention():
    model = fastpeft.apply(build("bart", "task"), fastpeft.PrefixConfig(length=2, reparam_dim=8, reparam_per_kind=True))
    randomize_method_parameters(model)
    encoder = model.fastpeft_prefix
    assert sorted(encoder.reparams) == ["cross", "decoder", "encoder"]

    def mlp(kind):
        m = encoder.reparams[kind]
        out = torch.tanh(m.embedding @ m.down.weight.T + m.down.bias) @ m.up.weight.T + m.up.bias
        return out.view(2, -1, 8).transpose(0, 1)  # [rows of that kind, L, D]

    e, d, c = mlp("encoder"), mlp("decoder"), mlp("cross")
    heads2 = 2 * 4  # keys and values of 4 heads per site
    # Sites: encoder layers 0, 1, then decoder layers 0, 1 with self-attention before cross-attention.
    expected = torch.cat([e[:heads2], e[heads2:], d[:heads2], c[:heads2], d[heads2:], c[heads2:]])
    with torch.no_grad():
        assert_f32_close(encoder.compute(), expected, "per-kind prefixes")
        fastpeft.eject_prefix(model)
        assert_f32_close(model.fastpeft_prefix.prefix, expected, "ejected")


@pytest.mark.parametrize("arch", ["bert", "roberta", "gpt2", "llama", "qwen2"])
def test_shift_positions_is_passing_shifted_positions(arch):
    shifted = fastpeft.apply(build(arch, "task"), fastpeft.PrefixConfig(length=3, reparam_dim=None, shift_positions=True))
    randomize_method_parameters(shifted)
    plain = fastpeft.apply(build(arch, "task"), fastpeft.PrefixConfig(length=3, reparam_dim=None))
    plain.fastpeft_prefix.prefix.data.copy_(shifted.fastpeft_prefix.prefix)
    data = inputs(arch, padded=False)
    first = 2 if arch == "roberta" else 0  # RoBERTa counts positions from its padding index + 1
    positions = torch.arange(first, first + data["input_ids"].shape[1]).expand_as(data["input_ids"])
    with torch.no_grad():
        assert_f32_close(output(shifted, data), output(plain, dict(data, position_ids=positions + 3)), arch)
