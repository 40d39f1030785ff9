"""Configs, presets and the model API: defaults, clear errors that leave the model unchanged, merge, eject,
save/load checks, parameter counting."""

import copy
import json

import pytest
import torch
import transformers

import fastpeft
from fastpeft.config import config_from_dict, config_to_dict
from model_helpers import (
    assert_close64,
    build,
    inputs,
    method_config,
    output,
    randomize_method_parameters,
    snapshot_model,
    assert_same_model,
)

# ----------------------------------------------------------------------------------------------------------------
# Configs and presets
# ----------------------------------------------------------------------------------------------------------------


def test_presets_carry_the_papers_defaults():
    mam = fastpeft.get_config("mam")
    assert mam.attn == fastpeft.PrefixConfig(length=30, reparam_dim=512)
    assert (mam.ffn.r, mam.ffn.scale, mam.ffn.insertion, mam.ffn.activation, mam.ffn.init) == (
        512, 4.0, "parallel", "relu", "lora"
    )
    houlsby = fastpeft.get_config("houlsby")
    assert houlsby.train_layernorm and houlsby.attn.insertion == houlsby.ffn.insertion == "sequential"
    assert (houlsby.attn.site, houlsby.ffn.site, houlsby.ffn.r, houlsby.ffn.init) == ("attn", "ffn", 64, "houlsby")
    pfeiffer = fastpeft.get_config("pfeiffer")
    assert pfeiffer.attn is None and pfeiffer.ffn.insertion == "sequential"
    assert fastpeft.get_config("parallel").ffn.scale == 1.0
    assert fastpeft.get_config("scaled_parallel").ffn.scale == 4.0
    lora = fastpeft.get_config("lora").attn
    assert (lora.r, lora.alpha, lora.targets, lora.scale) == (8, 16, ("q", "v"), 2.0)
    assert fastpeft.get_config("prefix").attn.length == 200
    assert fastpeft.get_config("mam").train_head and not fastpeft.get_config("mam").train_layernorm


def test_get_config_overrides():
    config = fastpeft.get_config("mam", r=16, length=16, train_head=False)
    assert (config.ffn.r, config.attn.length, config.train_head) == (16, 16, False)
    assert fastpeft.get_config("houlsby", r=8).attn.r == 8  # every method with the field
    with pytest.raises(ValueError, match=r"unknown preset 'maam'.*'mam'"):
        fastpeft.get_config("maam")
    with pytest.raises(ValueError, match=r"preset 'lora' has no field 'length'"):
        fastpeft.get_config("lora", length=3)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: fastpeft.AdapterConfig(r=0), r"AdapterConfig: 'r' must be an integer >= 1, got 0"),
        (lambda: fastpeft.AdapterConfig(r=4, activation="swish"), r"'activation' must be one of"),
        (lambda: fastpeft.AdapterConfig(r=4, insertion="serial"), r"'insertion' must be one of"),
        (lambda: fastpeft.AdapterConfig(r=4, scale="auto"), r"'scale' must be a float or 'learned'"),
        (lambda: fastpeft.AdapterConfig(r=4, dropout=1.0), r"'dropout' must be a float in \[0, 1\)"),
        (lambda: fastpeft.LoRAConfig(targets=("q", "x")), r"LoRAConfig: 'targets' must be a non-empty sequence"),
        (lambda: fastpeft.LoRAConfig(alpha=0), r"'alpha' must be a positive number"),
        (lambda: fastpeft.PrefixConfig(length=0), r"PrefixConfig: 'length' must be an integer >= 1"),
        (lambda: fastpeft.PrefixConfig(layers=[-1]), r"'layers' must be an integer >= 0"),
        (lambda: fastpeft.UnifiedConfig(ffn=fastpeft.PrefixConfig()), r"UnifiedConfig: 'ffn' must be None or one of"),
        (lambda: fastpeft.UnifiedConfig(attn=fastpeft.LoRAConfig(targets=("ffn_in",))), r"targets are among"),
        (lambda: fastpeft.UnifiedConfig(), r"at least one of 'attn' and 'ffn'"),
    ],
)
def test_config_errors_name_the_argument(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_lone_configs_become_unified():
    from fastpeft.config import as_unified

    adapter = fastpeft.AdapterConfig(r=4, site="attn")
    assert as_unified(adapter).attn == adapter and as_unified(adapter).ffn is None
    split = as_unified(fastpeft.LoRAConfig(r=4, targets=("q", "ffn_out")))
    assert split.attn.targets == ("q",) and split.ffn.targets == ("ffn_out",) and split.ffn.r == 4
    # Inside a UnifiedConfig the slot decides the site.
    assert fastpeft.UnifiedConfig(attn=fastpeft.AdapterConfig(r=4)).attn.site == "attn"
    with pytest.raises(TypeError, match="'config' must be a preset name"):
        as_unified(42)


@pytest.mark.parametrize("name", sorted(fastpeft.PRESETS) + ["lora_all", "attn_parallel_learned"])
def test_config_json_round_trip(name):
    config = method_config(name)
    assert config_from_dict(json.loads(json.dumps(config_to_dict(config)))) == config


# ----------------------------------------------------------------------------------------------------------------
# apply: errors leave the model unchanged
# ----------------------------------------------------------------------------------------------------------------


def test_unsupported_architecture_names_the_supported_ones():
    config = transformers.OPTConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, ffn_dim=32, vocab_size=50, word_embed_proj_dim=16
    )
    model = transformers.AutoModel.from_config(config)
    snapshot = snapshot_model(model)
    with pytest.raises(ValueError, match=r"unsupported architecture 'opt'.*bert, roberta, gpt2, llama, mistral, qwen2, bart, mbart"):
        fastpeft.apply(model, "lora")
    assert_same_model(model, snapshot)


def _bad_q_proj(model):
    model.layers[0].self_attn.q_proj = torch.nn.Identity()
    return model


@pytest.mark.parametrize(
    "arch, prepare, config, message",
    [
        ("bert", None, "maam", r"unknown preset 'maam'"),
        ("llama", None, fastpeft.LoRAConfig(layers=(0, 2)), r"LoRAConfig.layers must be indices in \[0, 2\)"),
        ("bart", None, fastpeft.PrefixConfig(layers=(4,)), r"indices in \[0, 4\) for this model \(4 layers"),
        ("llama", _bad_q_proj, "lora", r"LoRA target 'layers.0.self_attn.q_proj' must be nn.Linear or Conv1D, got Identity"),
        ("gpt2", lambda m: setattr(m.config, "_attn_implementation", "flex_attention") or m, "mam",
         r"prefix tuning supports attn_implementation \('eager', 'sdpa'\).*'flex_attention'"),
        ("bert", lambda m: fastpeft.apply(m, "lora"), "lora", r"already patched"),
    ],
)
def test_apply_errors_leave_the_model_unchanged(arch, prepare, config, message):
    model = build(arch)
    if prepare is not None:
        model = prepare(model)
    snapshot = snapshot_model(model)
    with pytest.raises(ValueError, match=message):
        fastpeft.apply(model, config)
    assert_same_model(model, snapshot)


def test_apply_rolls_back_when_it_fails_midway(monkeypatch):
    model = build("bart", "task")
    data = inputs("bart")
    with torch.no_grad():
        before = output(model, data)
    snapshot = snapshot_model(model)
    from fastpeft import patching

    calls = []
    original = patching.BottleneckAdapter.__init__

    def failing(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("out of memory (simulated)")
        original(self, *args, **kwargs)

    monkeypatch.setattr(patching.BottleneckAdapter, "__init__", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        fastpeft.apply(model, fastpeft.get_config("mam", r=4, length=2, reparam_dim=8))
    assert not fastpeft.is_patched(model)
    assert_same_model(model, snapshot)
    with torch.no_grad():
        assert torch.equal(output(model, data), before)


def test_operations_on_an_unpatched_model_say_so():
    model = build("bert")
    for op in (fastpeft.remove, fastpeft.merge_lora, fastpeft.eject_prefix):
        with pytest.raises(ValueError, match=rf"fastpeft.{op.__name__}: the model is not patched"):
            op(model)
    with pytest.raises(ValueError, match="not patched"):
        fastpeft.save_adapter(model, "/nonexistent")


# ----------------------------------------------------------------------------------------------------------------
# Trainable parameters
# ----------------------------------------------------------------------------------------------------------------


def test_trainable_parameters_and_freezing(capsys):
    model = build("roberta", "task")
    total = sum(p.numel() for p in model.parameters())
    fastpeft.apply(model, fastpeft.get_config("lora", r=4))
    trainable, all_params = fastpeft.trainable_parameters(model)
    lora = 2 * 2 * (4 * 32 + 32 * 4)  # layers x (q, v) x (A + B)
    head = sum(p.numel() for n, p in model.named_parameters() if n.startswith("classifier."))
    assert (trainable, all_params) == (lora + head, total + lora)
    fastpeft.print_trainable_parameters(model)
    printed = capsys.readouterr().out.strip()
    assert printed == (
        f"trainable params: {lora + head:,d} || all params: {total + lora:,d} || "
        f"trainable%: {100 * (lora + head) / (total + lora):.4f}"
    )


def test_lm_heads_and_tied_embeddings_stay_frozen():
    for arch in ("gpt2", "llama", "bart"):
        model = build(arch, "task")
        fastpeft.apply(model, fastpeft.get_config("lora", r=2))
        trained = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trained and all(".lora_" in n for n in trained), trained


def test_train_head_false_trains_the_method_only():
    model = build("bert", "task")
    fastpeft.apply(model, fastpeft.get_config("pfeiffer", r=2, train_head=False))
    assert all(".adapter." in n for n, p in model.named_parameters() if p.requires_grad)


# ----------------------------------------------------------------------------------------------------------------
# merge_lora and eject_prefix
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["gpt2", "llama", "bart"])
def test_merge_lora_folds_the_update_and_remove_restores(arch):
    model = build(arch).double()
    data = inputs(arch)
    with torch.no_grad():
        original = output(model, data)
    fastpeft.apply(model, method_config("lora_all"))
    randomize_method_parameters(model)
    with torch.no_grad():
        unmerged = output(model, data)
        fastpeft.merge_lora(model)
        merged = output(model, data)
    assert not any(".lora_" in n for n, _ in model.named_parameters())
    assert_close64(merged, unmerged)
    assert (merged - original).abs().max() > 1e-3
    with pytest.raises(ValueError, match="merged into the base weights"):
        fastpeft.save_adapter(model, "/tmp/unused")
    with pytest.raises(ValueError, match="no \\(unmerged\\) LoRA modules"):
        fastpeft.merge_lora(model)
    fastpeft.remove(model)
    with torch.no_grad():
        assert torch.equal(output(model, data), original)


@pytest.mark.parametrize("arch", ["bert", "mistral", "bart"])
def test_eject_prefix_keeps_outputs_and_saves_flat(arch, tmp_path):
    model = build(arch, "task")
    fastpeft.apply(model, fastpeft.get_config("mam", r=4, length=3, reparam_dim=16))
    randomize_method_parameters(model)
    data = inputs(arch)
    with torch.no_grad():
        before = output(model, data)
        fastpeft.eject_prefix(model)
        after = output(model, data)
    assert torch.equal(after, before)
    names = {n for n, p in model.named_parameters() if p.requires_grad and n.startswith("fastpeft_prefix.")}
    assert names == {"fastpeft_prefix.prefix"}
    assert fastpeft.get_patch_config(model).attn.reparam_dim is None
    with pytest.raises(ValueError, match="already a plain parameter"):
        fastpeft.eject_prefix(model)
    fastpeft.save_adapter(model, tmp_path)
    fresh = fastpeft.load_adapter(build(arch, "task"), tmp_path)
    with torch.no_grad():
        assert torch.equal(output(fresh, data), after)


def test_prefix_encoder_set_site():
    model = build("llama")
    fastpeft.apply(model, fastpeft.PrefixConfig(length=2, reparam_dim=None))
    encoder = model.fastpeft_prefix
    keys, values = torch.randn(2, 2, 8), torch.randn(2, 2, 8)  # [Hkv=2 (GQA), L, D]
    encoder.set_site(1, keys, values)
    k, v = encoder.site(1, keys)
    assert torch.equal(k, keys) and torch.equal(v, values)
    with pytest.raises(ValueError, match=r"'keys' must be \[Hkv, L, D\] = \(2, 2, 8\), got \(4, 2, 8\)"):
        encoder.set_site(0, torch.randn(4, 2, 8), values)


# ----------------------------------------------------------------------------------------------------------------
# save_adapter / load_adapter checks
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture
def saved_lora(tmp_path):
    model = build("llama", "task")
    fastpeft.apply(model, fastpeft.get_config("lora", r=4))
    randomize_method_parameters(model)
    fastpeft.save_adapter(model, tmp_path)
    return tmp_path


def test_saved_files_are_safetensors_and_json(saved_lora):
    record = json.loads((saved_lora / "fastpeft_config.json").read_text())
    assert record["architecture"] == "llama" and record["model_type"] == "llama"
    assert record["config"]["attn"]["type"] == "LoRAConfig"
    assert set(record["tensors"]) == {
        f"model.layers.{i}.self_attn.{p}_proj.lora_{m}.{p}" for i in range(2) for p in "qv" for m in "AB"
    }
    assert sorted(f.name for f in saved_lora.iterdir()) == ["fastpeft_config.json", "fastpeft_model.safetensors"]


def test_load_into_a_different_shape_fails_cleanly(saved_lora):
    model = build("llama", "task", hidden_size=48, num_attention_heads=4, head_dim=12)
    snapshot = snapshot_model(model)
    with pytest.raises(ValueError, match=r"does not fit this model: shape mismatch: model.layers.0.self_attn.q_proj.lora_A.q: model \[4, 48\], file \[4, 32\]"):
        fastpeft.load_adapter(model, saved_lora)
    assert_same_model(model, snapshot)


def test_load_into_another_architecture_fails_cleanly(saved_lora):
    model = build("mistral", "task")
    snapshot = snapshot_model(model)
    with pytest.raises(ValueError, match=r"saved from a 'llama' model, this model is 'mistral'"):
        fastpeft.load_adapter(model, saved_lora)
    assert_same_model(model, snapshot)


def test_load_into_a_model_patched_differently_fails(saved_lora):
    model = fastpeft.apply(build("llama", "task"), fastpeft.get_config("lora", r=2))
    with pytest.raises(ValueError, match=r"the model is patched with .*r=2.*saved with .*r=4"):
        fastpeft.load_adapter(model, saved_lora)


def test_load_checks_names_and_files(saved_lora, tmp_path_factory):
    # A file whose tensors do not match its config.
    broken = tmp_path_factory.mktemp("broken")
    record = json.loads((saved_lora / "fastpeft_config.json").read_text())
    name = next(iter(record["tensors"]))
    record["tensors"]["model.layers.9.extra"] = record["tensors"].pop(name)
    (broken / "fastpeft_config.json").write_text(json.dumps(record))
    (broken / "fastpeft_model.safetensors").write_bytes((saved_lora / "fastpeft_model.safetensors").read_bytes())
    model = build("llama", "task")
    snapshot = snapshot_model(model)
    with pytest.raises(ValueError, match=r"does not hold the tensors its config lists: missing from the file: model.layers.9.extra"):
        fastpeft.load_adapter(model, broken)
    # Unreadable config, missing weights.
    (broken / "fastpeft_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        fastpeft.load_adapter(model, broken)
    (broken / "fastpeft_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="fastpeft_model.safetensors' not found"):
        fastpeft.load_adapter(model, broken)
    assert_same_model(model, snapshot)


def test_load_into_an_already_patched_model_with_the_same_config(saved_lora):
    model = fastpeft.apply(build("llama", "task"), fastpeft.get_config("lora", r=4))
    fastpeft.load_adapter(model, saved_lora)
    fresh = fastpeft.load_adapter(build("llama", "task"), saved_lora)
    data = inputs("llama")
    with torch.no_grad():
        assert torch.equal(output(model, data), output(fresh, data))


def test_deepcopy_of_a_patched_model_is_independent():
    model = build("gpt2", "task")
    data = inputs("gpt2")
    with torch.no_grad():
        original = output(model, data)
    fastpeft.apply(model, fastpeft.get_config("mam", r=4, length=2, reparam_dim=8))
    randomize_method_parameters(model)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        patched = output(model, data)
        assert torch.equal(output(twin, data), patched)
        fastpeft.remove(twin)
        assert torch.equal(output(twin, data), original)
        assert torch.equal(output(model, data), patched)


def test_layers_and_cross_attention_select_sites():
    model = build("bart")
    # Layer indices count encoder layers first: 0, 1 encoder; 2, 3 decoder.
    fastpeft.apply(model, fastpeft.PrefixConfig(length=2, reparam_dim=None, layers=(0, 3), cross_attention=False))
    state = model._fastpeft
    assert state.site_names == ["encoder.layers.0.self_attn", "decoder.layers.1.self_attn"]
    assert model.fastpeft_prefix.prefix.shape == (2 * 2 * 4, 2, 8)
    fastpeft.remove(model)
    fastpeft.apply(model, fastpeft.LoRAConfig(r=2, targets=("q",), layers=(1, 2)))
    wrapped = sorted(n for n, m in model.named_modules() if isinstance(m, fastpeft.modules.LoRALinear))
    assert wrapped == [
        "decoder.layers.0.encoder_attn.q_proj", "decoder.layers.0.self_attn.q_proj", "encoder.layers.1.self_attn.q_proj"
    ]
