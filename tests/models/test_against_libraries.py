"""The same weights give the same outputs in fastpeft as in AdapterHub `adapters` (bottleneck adapters on BERT)
and in Hugging Face `peft` (LoRA, including GPT-2's fused c_attn): the placements agree with the libraries
users have today."""

import pytest
import torch

import fastpeft
from model_helpers import assert_close64, build, inputs, output


def _adapterhub():
    try:
        import adapters  # pins transformers 4.57; it does not import with 5.x
    except Exception as error:  # noqa: BLE001 - any import failure means the library is unusable here
        pytest.skip(f"AdapterHub adapters is not usable with this transformers: {type(error).__name__}: {error}")
    return adapters


ADAPTERHUB_CASES = {
    # AdapterHub config name -> fastpeft config with the same placement and math (r = 32 / reduction factor).
    "seq_bn": fastpeft.UnifiedConfig(
        ffn=fastpeft.AdapterConfig(r=2, activation="relu", insertion="sequential", init="bert", original_ln_before=True)
    ),
    "double_seq_bn": fastpeft.UnifiedConfig(
        attn=fastpeft.AdapterConfig(r=2, activation="silu", insertion="sequential", init="bert"),
        ffn=fastpeft.AdapterConfig(r=2, activation="silu", insertion="sequential", init="bert"),
    ),
    "par_bn": fastpeft.UnifiedConfig(
        ffn=fastpeft.AdapterConfig(r=16, activation="relu", insertion="parallel", scale=4.0)
    ),
}


@pytest.mark.parametrize("name", sorted(ADAPTERHUB_CASES))
def test_bottleneck_adapters_match_adapterhub(name):
    adapters = _adapterhub()
    theirs = build("bert")
    adapters.init(theirs)
    theirs.add_adapter("a", config=name)
    theirs.set_active_adapters("a")
    theirs.double()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if ".adapters.a." in n:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    ours = fastpeft.apply(build("bert").double(), ADAPTERHUB_CASES[name])
    mapping = {"adapter_down.0.": "adapter.down.", "adapter_up.": "adapter.up."}
    params = dict(ours.named_parameters())
    copied = 0
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if ".adapters.a." not in n:
                continue
            sublayer, rest = n.split(".adapters.a.")
            for old, new in mapping.items():
                rest = rest.replace(old, new)
            params[f"{sublayer}.dense.{rest}"].copy_(p)
            copied += 1
    assert copied == sum(1 for n in params if ".adapter." in n)
    theirs.eval()
    data = inputs("bert")
    with torch.no_grad():
        assert_close64(output(ours, data), output(theirs, data))


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bart"])
def test_lora_matches_peft(arch):
    peft = pytest.importorskip("peft")
    targets = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"], "bart": ["q_proj", "v_proj"]}[arch]
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, fan_in_fan_out=arch == "gpt2")
    theirs = peft.get_peft_model(build(arch).double(), config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if ".lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    # peft's LoRA on the fused c_attn is one A and one B over [q | k | v]: fastpeft's q, k, v roles with that A
    # and the matching slices of B.
    roles = ("q", "k", "v") if arch == "gpt2" else ("q", "v")
    ours = fastpeft.apply(build(arch).double(), fastpeft.LoRAConfig(r=4, alpha=8, targets=roles))
    params = dict(ours.named_parameters())
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if ".lora_A." not in n:
                continue
            path = n.removeprefix("base_model.model.").split(".lora_A.")[0]
            b = dict(theirs.named_parameters())[n.replace(".lora_A.", ".lora_B.")]
            for role in roles:
                if arch == "gpt2":
                    index = roles.index(role)
                    params[f"{path}.lora_A.{role}"].copy_(p)
                    params[f"{path}.lora_B.{role}"].copy_(b.chunk(3, dim=0)[index])
                elif path.endswith(f"{role}_proj"):
                    params[f"{path}.lora_A.{role}"].copy_(p)
                    params[f"{path}.lora_B.{role}"].copy_(b)
    data = inputs(arch)
    with torch.no_grad():
        assert_close64(output(ours, data), output(theirs.eval(), data))
