"""fastpeft.from_adapters and fastpeft.load_adapters_checkpoint against AdapterHub `adapters` itself.

For every supported configuration and every architecture AdapterHub supports among fastpeft's (prefix tuning is not
available for Qwen2 in AdapterHub): the same outputs in eval mode, the same gradients in train mode, the same
generated tokens, and a checkpoint written by `save_adapter` loads into a fresh model with the same outputs.
Configurations fastpeft cannot reproduce raise errors naming the flag and its value.
"""

import json

import pytest
import torch
import transformers

try:
    import adapters  # pins transformers 4.57; it does not import with 5.x
except Exception as error:  # noqa: BLE001 - any import failure means the library is unusable here
    pytest.skip(
        f"AdapterHub adapters does not import with transformers {transformers.__version__}: "
        f"{type(error).__name__}: {error}",
        allow_module_level=True,
    )

import fastpeft
from interop_helpers import assert_f32_close, check_gradients, differs_from_base, generated
from model_helpers import ARCHS, DECODERS, SEQ2SEQ, assert_same_model, build, inputs, output, snapshot_model

PREFIX = {"prefix_length": 3, "bottleneck_size": 16}


def _lora(arch: str):
    # AdapterHub's "intermediate" / "output" LoRA sit on different projections per model: on Llama and Mistral
    # intermediate_lora is down_proj (output_lora would be up_proj alone); on Qwen2 (plugin interface) output_lora is
    # down_proj (intermediate_lora would be up_proj alone). fastpeft's FFN roles cover gate and up together.
    if arch in ("llama", "mistral"):
        return adapters.LoRAConfig(r=4, alpha=8, intermediate_lora=True)
    if arch == "qwen2":
        return adapters.LoRAConfig(r=4, alpha=8, output_lora=True, attn_matrices=["q", "k", "v"])
    return adapters.LoRAConfig(r=4, alpha=8, attn_matrices=["q", "k", "v"], intermediate_lora=True, output_lora=True)


CASES = {
    # The presets, with sizes scaled down where the defaults would be large.
    "seq_bn": lambda arch: "seq_bn",
    "double_seq_bn": lambda arch: "double_seq_bn",
    "par_bn": lambda arch: adapters.ParBnConfig(reduction_factor=8),
    "scaled_par_bn": lambda arch: adapters.ParBnConfig(reduction_factor=8, scaling="learned"),
    "prefix_tuning": lambda arch: adapters.PrefixTuningConfig(**PREFIX),
    "prefix_tuning_flat": lambda arch: adapters.PrefixTuningConfig(prefix_length=3, flat=True),
    "lora": _lora,
    "mam": lambda arch: adapters.MAMConfig(adapters.PrefixTuningConfig(**PREFIX), adapters.ParBnConfig(reduction_factor=8)),
    # Other flags fastpeft reproduces: per-layer selection, output dropout, a reduction factor mapping, GELU.
    "seq_bn_options": lambda arch: adapters.SeqBnConfig(
        reduction_factor={"default": 8}, non_linearity="gelu_new", leave_out=[1], dropout=0.3
    ),
    "prefix_options": lambda arch: adapters.PrefixTuningConfig(**PREFIX, leave_out=[0], cross_prefix=False),
    "lora_with_seq_bn": lambda arch: adapters.ConfigUnion(
        adapters.LoRAConfig(r=2, alpha=4, leave_out=[0], dropout=0.2), adapters.SeqBnConfig(reduction_factor=8)
    ),
}
NO_PREFIX = {"qwen2"}  # AdapterHub's plugin interface (Qwen2) has no prefix tuning
PAIRS = [
    (case, arch)
    for case in CASES
    for arch in ARCHS
    if not (arch in NO_PREFIX and ("prefix" in case or case == "mam"))
    # The option cases run on one post-LN and one pre-LN model each.
    and (not case.endswith(("_options", "_with_seq_bn")) or arch in ("bert", "gpt2", "bart", "llama"))
]


def prepared(case: str, arch: str, attn_implementation: str = "eager"):
    """A tiny model with AdapterHub's adapter `case` (random weights), as a user would have it: eager attention
    (AdapterHub's prefix tuning is only correct there), train_adapter called, in eval mode."""
    model = build(arch, "task", attn_implementation=attn_implementation)
    adapters.init(model)
    model.add_adapter("a", config=CASES[case](arch) if case in CASES else case)
    model.train_adapter("a")
    randomize(model)
    return model.eval()


def randomize(model, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(f".{kind}.a." in name for kind in ("adapters", "loras", "prefix_tunings")):
                values = torch.randn(p.shape, generator=g) * 0.3
                p.copy_(1.0 + values.abs() if name.endswith(".scaling") else values)


@pytest.mark.parametrize("case,arch", PAIRS)
def test_outputs_gradients_and_generation_match(case, arch):
    theirs = prepared(case, arch)
    ours = fastpeft.from_adapters(theirs)
    assert fastpeft.is_patched(ours) and not fastpeft.is_patched(theirs)
    data = inputs(arch)
    with torch.no_grad():
        assert_f32_close(output(ours, data), output(theirs, data), f"{case} on {arch}: output")
    assert differs_from_base(ours, build(arch, "task", attn_implementation="eager"), data) > 1e-3
    if arch in DECODERS or arch in SEQ2SEQ:
        # AdapterHub's Llama / Mistral ignore the KV cache on transformers 4.57 (their forward takes
        # `past_key_value`, transformers passes `past_key_values`), so its cached generation disagrees with its
        # own forward; without a cache it recomputes everything and is right. fastpeft generates with the cache.
        assert generated(ours, data) == generated(theirs, data, use_cache=False)
    assert check_gradients(theirs, fastpeft.from_adapters, arch, data) > 0


@pytest.mark.parametrize("case,arch", PAIRS)
def test_save_adapter_directory_loads(case, arch, tmp_path):
    theirs = prepared(case, arch)
    # AdapterHub's default file is pytorch_adapter.bin; it cannot write prefix tuning as safetensors (its prefix
    # pool is shared by every layer), so safetensors is exercised on every other case, on alternate models.
    safetensors = "prefix" not in case and case != "mam" and ARCHS.index(arch) % 2 == 1
    theirs.save_adapter(str(tmp_path), "a", use_safetensors=safetensors)
    assert (tmp_path / ("adapter.safetensors" if safetensors else "pytorch_adapter.bin")).is_file()
    fresh = build(arch, "task", attn_implementation="eager")
    assert fastpeft.load_adapters_checkpoint(fresh, tmp_path) is fresh
    data = inputs(arch)
    with torch.no_grad():
        assert_f32_close(output(fresh, data), output(theirs, data), f"{case} on {arch} from save_adapter")
    # The loaded model trains like any fastpeft model: the adapter's parameters (and the head).
    assert fastpeft.trainable_parameters(fresh)[0] > 0


def test_config_translation_is_what_fastpeft_reports():
    bert = fastpeft.get_patch_config(fastpeft.from_adapters(prepared("seq_bn", "bert")))
    assert bert.ffn == fastpeft.AdapterConfig(
        r=2, activation="relu", insertion="sequential", init="bert", original_ln_before=True, dropout_position="output"
    )
    llama = fastpeft.get_patch_config(fastpeft.from_adapters(prepared("seq_bn", "llama")))
    assert llama.ffn.residual_input and not llama.ffn.original_ln_before  # pre-LN: reads h + residual
    par = fastpeft.get_patch_config(fastpeft.from_adapters(prepared("scaled_par_bn", "gpt2")))
    assert par.ffn.insertion == "parallel" and par.ffn.residual_input and par.ffn.scale == "learned"
    mam = fastpeft.get_patch_config(fastpeft.from_adapters(prepared("mam", "bart")))
    assert mam.attn == fastpeft.PrefixConfig(length=3, reparam_dim=16, reparam_per_kind=True)


def test_adapter_model_converts_its_base_transformer():
    config = build("bert", "base").config
    torch.manual_seed(0)
    theirs = adapters.BertAdapterModel(config)
    theirs.add_adapter("a", config="double_seq_bn")
    theirs.train_adapter("a")
    randomize(theirs)
    theirs.eval()
    ours = fastpeft.from_adapters(theirs)
    assert type(ours) is transformers.BertModel
    data = inputs("bert")
    with torch.no_grad():
        expected = theirs(**data, output_hidden_states=True).hidden_states[-1]
        assert_f32_close(output(ours, data), expected, "BertAdapterModel's last hidden state")


def test_dropout_is_on_the_adapter_output():
    # In train mode with dropout, the same random masks give the same outputs only if dropout sits where
    # AdapterHub puts it (on s * Delta h).
    theirs = prepared("seq_bn_options", "bert")
    ours = fastpeft.from_adapters(theirs)
    data = inputs("bert")
    outs = []
    for model in (theirs, ours):
        model.train()
        torch.manual_seed(5)
        with torch.no_grad():
            outs.append(output(model, data))
    assert_f32_close(outs[1], outs[0], "train-mode output with adapter dropout")
    theirs.eval()
    with torch.no_grad():
        assert (outs[0] - output(theirs, data)).abs().max() > 1e-3  # dropout did act


# ----------------------------------------------------------------------------------------------------------------
# Refused configurations
# ----------------------------------------------------------------------------------------------------------------

REFUSED = [
    ("bert", lambda: adapters.SeqBnConfig(ln_before=True), r"BnConfig\.ln_before=True is not supported"),
    ("bert", lambda: adapters.SeqBnConfig(ln_after=True), r"BnConfig\.ln_after=True is not supported"),
    ("bert", lambda: adapters.SeqBnConfig(residual_before_ln=False), r"BnConfig\.residual_before_ln=False"),
    ("bert", lambda: adapters.SeqBnConfig(original_ln_after=False), r"BnConfig\.original_ln_after=False"),
    ("bert", lambda: adapters.SeqBnConfig(use_gating=True), r"BnConfig\.use_gating=True"),
    ("bert", lambda: adapters.ParBnConfig(scaling="channel"), r"BnConfig\.scaling='channel'"),
    ("bert", lambda: adapters.SeqBnConfig(non_linearity="leakyrelu"), r"BnConfig\.non_linearity='leakyrelu'"),
    ("bert", lambda: "seq_bn_inv", r"BnConfig\.inv_adapter='nice'"),
    ("bert", lambda: adapters.CompacterPlusPlusConfig(reduction_factor=8), r"BnConfig\.phm_layer=True"),
    ("bert", lambda: adapters.SeqBnConfig(reduction_factor={"0": 4, "default": 8}), r"reduction_factor=.*different sizes"),
    ("bart", lambda: adapters.DoubleSeqBnConfig(cross_adapter=True), r"BnConfig\.cross_adapter=True"),
    ("bert", lambda: adapters.PrefixTuningConfig(prefix_length=2, dropout=0.1), r"PrefixTuningConfig\.dropout=0\.1"),
    ("gpt2", lambda: adapters.PrefixTuningConfig(prefix_length=2, non_linearity="relu"), r"non_linearity='relu'"),
    ("bert", lambda: "unipelt", r"use_gating=True"),
    ("bert", lambda: "ia3", r"LoRAConfig\.composition_mode='scale'"),
    ("bert", lambda: "dora", r"LoRAConfig\.use_dora=True"),
    ("llama", lambda: adapters.LoRAConfig(output_lora=True), r"fastpeft would also adapt: layer 0 mlp\.gate_proj"),
    ("bert", lambda: adapters.ConfigUnion(adapters.LoRAConfig(output_lora=True), adapters.SeqBnConfig()), r"same ffn site"),
]


@pytest.mark.parametrize("arch,make,message", REFUSED, ids=[m for _, _, m in REFUSED])
def test_refused_flags_name_flag_and_value(arch, make, message):
    model = build(arch, "task", attn_implementation="eager")
    adapters.init(model)
    model.add_adapter("a", config=make())
    model.set_active_adapters("a")
    before = snapshot_model(model)
    with pytest.raises(fastpeft.ConversionError, match=message):
        fastpeft.from_adapters(model)
    assert_same_model(model, before)


def test_prefix_under_sdpa_is_refused_where_adapterhub_loses_it():
    theirs = prepared("prefix_tuning", "llama", attn_implementation="sdpa")
    with pytest.raises(fastpeft.ConversionError, match=r"attn_implementation='sdpa' on llama"):
        fastpeft.from_adapters(theirs)


def test_compositions_are_refused():
    model = build("bert", "task")
    adapters.init(model)
    model.add_adapter("a", config="seq_bn")
    model.add_adapter("b", config="seq_bn")
    with pytest.raises(fastpeft.ConversionError, match="no active adapter"):
        fastpeft.from_adapters(model)
    model.set_active_adapters(adapters.Stack("a", "b"))
    with pytest.raises(fastpeft.ConversionError, match=r"Stack\[a, b\] composes several adapters"):
        fastpeft.from_adapters(model)
    with pytest.raises(TypeError, match="must be prepared with adapters.init"):
        fastpeft.from_adapters(build("bert", "task"))


def test_refused_checkpoint_leaves_the_base_model_unchanged(tmp_path):
    source = build("bert", "task")
    adapters.init(source)
    source.add_adapter("a", config=adapters.SeqBnConfig(ln_after=True))
    source.save_adapter(str(tmp_path / "ln_after"), "a")
    fresh = build("bert", "task")
    before = snapshot_model(fresh)
    with pytest.raises(fastpeft.ConversionError, match=r"BnConfig\.ln_after=True"):
        fastpeft.load_adapters_checkpoint(fresh, tmp_path / "ln_after")
    assert_same_model(fresh, before)
    with pytest.raises(fastpeft.ConversionError, match="saved from a 'bert' model, this model is 'gpt2'"):
        fastpeft.load_adapters_checkpoint(build("gpt2", "task"), tmp_path / "ln_after")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        fastpeft.load_adapters_checkpoint(fresh, tmp_path)
    assert_same_model(fresh, before)


@pytest.mark.parametrize("case,arch", [("mam", "bart"), ("prefix_tuning_flat", "mbart"), ("lora", "gpt2")])
def test_converted_model_saves_loads_merges_and_ejects(case, arch, tmp_path):
    theirs = prepared(case, arch)
    ours = fastpeft.from_adapters(theirs)
    data = inputs(arch)
    with torch.no_grad():
        expected = output(theirs, data)
    fastpeft.save_adapter(ours, tmp_path)
    fresh = fastpeft.load_adapter(build(arch, "task", attn_implementation="eager"), tmp_path)
    assert fastpeft.get_patch_config(fresh) == fastpeft.get_patch_config(ours)
    if case == "mam":
        fastpeft.eject_prefix(fresh)  # one MLP per kind of attention, ejected
        assert not fastpeft.get_patch_config(fresh).attn.reparam_per_kind
    elif case == "lora":
        fastpeft.merge_lora(fresh)
    with torch.no_grad():
        assert_f32_close(output(fresh, data), expected, f"{case} on {arch} after save, load and merge / eject")


def test_files_without_a_version_use_the_old_activation_names(tmp_path):
    # adapter-transformers wrote "gelu" for what AdapterHub now calls "gelu_new"; AdapterHub renames on loading.
    theirs = prepared("seq_bn_options", "bert")
    theirs.save_adapter(str(tmp_path), "a")
    path = tmp_path / "adapter_config.json"
    record = json.loads(path.read_text())
    del record["version"]
    record["config"]["non_linearity"] = "gelu"
    path.write_text(json.dumps(record))
    fresh = fastpeft.load_adapters_checkpoint(build("bert", "task", attn_implementation="eager"), tmp_path)
    assert fastpeft.get_patch_config(fresh).ffn.activation == "gelu_tanh"
    data = inputs("bert")
    with torch.no_grad():
        assert_f32_close(output(fresh, data), output(theirs, data), "old activation name")


def test_the_source_keeps_its_flags_and_weights():
    # Without train_adapter every parameter of the source trains; converting must not freeze them.
    model = build("gpt2", "task", attn_implementation="eager")
    adapters.init(model)
    model.add_adapter("a", config="par_bn")
    model.set_active_adapters("a")
    before = snapshot_model(model)
    ours = fastpeft.from_adapters(model)
    assert_same_model(model, before)
    assert ours.transformer.wte.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    assert ours.lm_head.weight is ours.transformer.wte.weight  # tied as in the source
