"""fastpeft.from_peft and fastpeft.load_peft_checkpoint against Hugging Face peft itself (on both transformers lines).

For LoRA (peft's default targets, every projection with rsLoRA and dropout, selected layers) on every architecture,
and prefix tuning (flat and with its projection MLP) on every architecture peft runs it on among fastpeft's: the same
outputs in eval mode, the same gradients in train mode, the same generated tokens, and a `save_pretrained` directory
loads into a fresh model with the same outputs. What fastpeft cannot reproduce raises an error naming the flag.
"""

import json

import pytest
import torch

import fastpeft
from interop_helpers import assert_f32_close, check_gradients, differs_from_base, generated
from model_helpers import ARCHS, DECODERS, SEQ2SEQ, TF5, assert_same_model, build, inputs, output, snapshot_model

peft = pytest.importorskip("peft")

TASKS = {"bert": "SEQ_CLS", "roberta": "SEQ_CLS", "bart": "SEQ_2_SEQ_LM", "mbart": "SEQ_2_SEQ_LM"}
_BERT_PROJECTIONS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
EVERY_PROJECTION = {
    "bert": _BERT_PROJECTIONS,  # not "dense", which takes BERT's pooler too: see REFUSED
    "roberta": _BERT_PROJECTIONS,
    "gpt2": ["c_attn", "c_proj", "c_fc"],  # c_proj: the attention's and the MLP's
}
# peft's default targets for the model type (q and v; GPT-2's fused c_attn); mBART has none in peft.
DEFAULT_TARGETS = {"mbart": ["q_proj", "v_proj"]}

LORA_CASES = {
    "lora": lambda arch: dict(r=4, lora_alpha=8, target_modules=DEFAULT_TARGETS.get(arch)),
    # Every attention and FFN projection (cross-attention too), rsLoRA scaling, LoRA dropout.
    "lora_every_projection": lambda arch: dict(
        r=4, lora_alpha=8, use_rslora=True, lora_dropout=0.1, target_modules=EVERY_PROJECTION.get(arch, "all-linear")
    ),
    # One layer of each stack (peft counts layers per stack).
    "lora_one_layer": lambda arch: dict(r=2, lora_alpha=6, layers_to_transform=[1], target_modules=DEFAULT_TARGETS.get(arch)),
}
PREFIX_CASES = {
    "prefix": dict(num_virtual_tokens=3),
    "prefix_projection": dict(num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=16),
}
# peft's prefix tuning runs on one-stack models (encoder-decoder models are refused, see REFUSED).
PREFIX_ARCHS = [a for a in ARCHS if a not in SEQ2SEQ]
PAIRS = [(c, a) for c in LORA_CASES for a in ARCHS] + [(c, a) for c in PREFIX_CASES for a in PREFIX_ARCHS]


def prepared(case: str, arch: str, **peft_options):
    """A tiny model with peft's adapter `case` (random weights), in eval mode."""
    if "prefix" in case and arch == "roberta" and not TF5:
        pytest.skip("peft's prefix tuning fails on RoBERTa with transformers 4.57 (its embeddings take a past length)")
    # Mistral's sliding window would hide peft's prefix (it sits in the KV cache) from later tokens: see REFUSED.
    model = build(arch, "task", **({"sliding_window": None} if arch == "mistral" and "prefix" in case else {}))
    task = TASKS.get(arch, "CAUSAL_LM")
    if case in LORA_CASES:
        config = peft.LoraConfig(task_type=task, **LORA_CASES[case](arch), **peft_options)
    else:
        config = peft.PrefixTuningConfig(task_type=task, **PREFIX_CASES[case], **peft_options)
    theirs = peft.get_peft_model(model, config)
    randomize(theirs)
    return theirs.eval()


def randomize(model, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.mark.parametrize("case,arch", PAIRS)
def test_outputs_gradients_and_generation_match(case, arch):
    theirs = prepared(case, arch)
    ours = fastpeft.from_peft(theirs)
    assert type(ours) is type(theirs.get_base_model()) and fastpeft.is_patched(ours)
    data = inputs(arch)
    with torch.no_grad():
        assert_f32_close(output(ours, data), output(theirs, data), f"{case} on {arch}: output")
    assert differs_from_base(ours, build(arch, "task"), data) > 1e-3
    if arch in DECODERS or arch in SEQ2SEQ:
        assert generated(ours, data) == generated(theirs, data)
    assert check_gradients(theirs, fastpeft.from_peft, arch, data) > 0


@pytest.mark.parametrize("case,arch", PAIRS)
def test_save_pretrained_directory_loads(case, arch, tmp_path):
    theirs = prepared(case, arch)
    theirs.save_pretrained(tmp_path)
    overrides = {"sliding_window": None} if arch == "mistral" and "prefix" in case else {}
    fresh = build(arch, "task", **overrides)
    assert fastpeft.load_peft_checkpoint(fresh, tmp_path) is fresh
    data = inputs(arch)
    with torch.no_grad():
        expected = output(theirs, data)
        assert_f32_close(output(fresh, data), expected, f"{case} on {arch} from save_pretrained")
    # peft's own loading (inference mode: a projected prefix comes back flat), then from_peft.
    reloaded = peft.PeftModel.from_pretrained(build(arch, "task", **overrides), tmp_path)
    with torch.no_grad():
        assert_f32_close(output(fastpeft.from_peft(reloaded), data), expected, f"{case} on {arch} via PeftModel")


def test_config_translation_is_what_fastpeft_reports():
    gpt2 = fastpeft.get_patch_config(fastpeft.from_peft(prepared("lora", "gpt2")))
    # peft's one LoRA on the fused c_attn: q, k and v with one shared A.
    assert gpt2.attn == fastpeft.LoRAConfig(
        r=4, alpha=8, targets=("q", "k", "v"), fuse_slices=True, layers=(0, 1), cross_attention=False
    )
    llama = fastpeft.get_patch_config(fastpeft.from_peft(prepared("lora_every_projection", "llama")))
    assert llama.attn.targets == ("q", "k", "v", "o") and llama.ffn.targets == ("ffn_in", "ffn_out")
    assert llama.attn.rslora and llama.attn.scale == 8 / 2
    bart = fastpeft.get_patch_config(fastpeft.from_peft(prepared("lora_one_layer", "bart")))
    assert bart.attn.layers == (1, 3) and bart.attn.cross_attention  # layer 1 of the encoder and of the decoder
    prefix = fastpeft.get_patch_config(fastpeft.from_peft(prepared("prefix_projection", "llama")))
    # Grouped-query attention: peft's prefix embedding is as wide as the keys (2 heads x 8), not the model.
    assert prefix.attn == fastpeft.PrefixConfig(
        length=3, reparam_dim=16, embedding_dim=16, cross_attention=False, shift_positions=True
    )
    assert not prefix.train_head  # CAUSAL_LM: peft trains the prefix only


def test_pissa_initialised_base_weights_are_shared():
    # PiSSA rewrites the base weights; from_peft takes them from the live model.
    theirs = prepared("lora", "llama", init_lora_weights="pissa")
    ours = fastpeft.from_peft(theirs)
    data = inputs("llama")
    with torch.no_grad():
        assert_f32_close(output(ours, data), output(theirs, data), "PiSSA-initialised LoRA")


def test_positions_shift_only_the_real_tokens():
    # Explicit position ids are shifted too, as peft does.
    theirs = prepared("prefix", "gpt2")
    ours = fastpeft.from_peft(theirs)
    data = dict(inputs("gpt2", padded=False), position_ids=torch.tensor([[0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0]]))
    with torch.no_grad():
        assert_f32_close(output(ours, data), output(theirs, data), "explicit position ids")
    fastpeft.remove(ours)  # the position hook goes with the rest
    with torch.no_grad():
        assert_f32_close(output(ours, data), output(build("gpt2", "task"), data), "after remove")


# ----------------------------------------------------------------------------------------------------------------
# Refused configurations
# ----------------------------------------------------------------------------------------------------------------

REFUSED = [
    ("llama", lambda: peft.LoraConfig(r=4, use_dora=True), r"LoraConfig\.use_dora=True is not supported"),
    ("llama", lambda: peft.LoraConfig(r=4, bias="all"), r"LoraConfig\.bias='all' is not supported"),
    ("llama", lambda: peft.LoraConfig(r=4, bias="lora_only"), r"LoraConfig\.bias='lora_only'"),
    ("llama", lambda: peft.LoraConfig(r=4, lora_bias=True), r"LoraConfig\.lora_bias=True"),
    ("llama", lambda: peft.LoraConfig(r=4, alpha_pattern={"q_proj": 16}), r"LoraConfig\.alpha_pattern=\{'q_proj': 16\}"),
    ("llama", lambda: peft.LoraConfig(r=4, trainable_token_indices=[1, 2]), r"LoraConfig\.trainable_token_indices="),
    ("llama", lambda: peft.LoraConfig(r=4, target_modules=["up_proj"]), r"fastpeft would also adapt: layer 0 mlp\.gate_proj"),
    (
        "llama",
        lambda: peft.LoraConfig(r=4, target_modules=r".*0\.self_attn\.q_proj|.*1\.self_attn\.v_proj"),
        r"fastpeft cannot adapt exactly the projections the source adapts",
    ),
    ("bert", lambda: peft.LoraConfig(r=4, target_modules=["query", "dense"]), r"LoRA on 'bert\.pooler\.dense'"),
    ("llama", lambda: peft.LoraConfig(r=4, modules_to_save=["lm_head"]), r"LoraConfig\.modules_to_save=\['lm_head'\]"),
    ("llama", lambda: peft.IA3Config(), r"peft_type='IA3' is not supported"),
    ("bart", lambda: peft.PrefixTuningConfig(num_virtual_tokens=3), r"encoder-decoder models \(bart\) is not supported"),
    ("mistral", lambda: peft.PrefixTuningConfig(num_virtual_tokens=3), r"sliding_window=4 is not supported"),
]


@pytest.mark.filterwarnings("ignore:`lora_bias=True` was passed")  # peft's own note on the refused config
@pytest.mark.parametrize("arch,make,message", REFUSED, ids=[m for _, _, m in REFUSED])
def test_refused_flags_name_flag_and_value(arch, make, message):
    config = make()
    config.task_type = TASKS.get(arch, "CAUSAL_LM")
    theirs = peft.get_peft_model(build(arch, "task"), config)
    before = snapshot_model(theirs)
    with pytest.raises(fastpeft.ConversionError, match=message):
        fastpeft.from_peft(theirs)
    assert_same_model(theirs, before)


def test_merged_and_several_active_adapters_are_refused():
    theirs = prepared("lora", "llama")
    theirs.merge_adapter()
    with pytest.raises(fastpeft.ConversionError, match="merged into the base model"):
        fastpeft.from_peft(theirs)
    theirs.unmerge_adapter()
    theirs.add_adapter("other", peft.LoraConfig(task_type="CAUSAL_LM", r=2))
    theirs.base_model.set_adapter(["default", "other"])
    with pytest.raises(fastpeft.ConversionError, match=r"2 adapters are active \(\['default', 'other'\]\)"):
        fastpeft.from_peft(theirs)
    with pytest.raises(TypeError, match="must be a peft.PeftModel"):
        fastpeft.from_peft(build("llama", "task"))


def test_refused_checkpoint_leaves_the_base_model_unchanged(tmp_path):
    prepared("lora", "llama").save_pretrained(tmp_path)
    # An initialisation that rewrote the base weights: the checkpoint needs that rewritten base model.
    path = tmp_path / "adapter_config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "init_lora_weights": "pissa"}))
    fresh = build("llama", "task")
    before = snapshot_model(fresh)
    with pytest.raises(fastpeft.ConversionError, match=r"LoraConfig\.init_lora_weights='pissa' is not supported when loading"):
        fastpeft.load_peft_checkpoint(fresh, tmp_path)
    assert_same_model(fresh, before)
    path.write_text(json.dumps(config))
    with pytest.raises(fastpeft.ConversionError, match="not a projection inside the layers of this GPT2LMHeadModel"):
        fastpeft.load_peft_checkpoint(build("gpt2", "task"), tmp_path)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        fastpeft.load_peft_checkpoint(fresh, tmp_path / "missing")
    assert_same_model(fresh, before)


# ----------------------------------------------------------------------------------------------------------------
# The converted model is an ordinary fastpeft model
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case,arch", [("lora", "gpt2"), ("lora_every_projection", "llama"), ("prefix_projection", "llama")])
def test_converted_model_saves_loads_merges_and_ejects(case, arch, tmp_path):
    theirs = prepared(case, arch)
    ours = fastpeft.from_peft(theirs)
    data = inputs(arch)
    with torch.no_grad():
        expected = output(theirs, data)
    fastpeft.save_adapter(ours, tmp_path)
    fresh = fastpeft.load_adapter(build(arch, "task"), tmp_path)
    assert fastpeft.get_patch_config(fresh) == fastpeft.get_patch_config(ours)
    if "prefix" in case:
        fastpeft.eject_prefix(fresh)
    else:
        fastpeft.merge_lora(fresh)  # the fused c_attn update and the rsLoRA scale fold into the weights
    with torch.no_grad():
        assert_f32_close(output(fresh, data), expected, f"{case} on {arch} after save, load and merge / eject")


def test_new_config_fields_are_checked():
    with pytest.raises(ValueError, match=r"AdapterConfig: 'dropout_position' must be one of \('input', 'output'\), got 'middle'"):
        fastpeft.AdapterConfig(r=2, dropout_position="middle")
    with pytest.raises(ValueError, match=r"'residual_input' must be False with original_ln_before"):
        fastpeft.AdapterConfig(r=2, insertion="sequential", original_ln_before=True, residual_input=True)
    with pytest.raises(ValueError, match=r"LoRAConfig: 'rslora' must be a bool, got 1"):
        fastpeft.LoRAConfig(rslora=1)
    with pytest.raises(ValueError, match=r"PrefixConfig: 'embedding_dim' must be unset without a reparametrization"):
        fastpeft.PrefixConfig(reparam_dim=None, embedding_dim=8)
    with pytest.raises(ValueError, match=r"'reparam_per_kind' must be unset without a reparametrization"):
        fastpeft.PrefixConfig(reparam_dim=None, reparam_per_kind=True)
    assert fastpeft.LoRAConfig(r=4, alpha=8, rslora=True).scale == 4.0
    model = build("bart", "task")
    before = snapshot_model(model)
    with pytest.raises(ValueError, match="shift_positions is not supported for bart"):
        fastpeft.apply(model, fastpeft.PrefixConfig(length=2, shift_positions=True))
    assert_same_model(model, before)


def test_base_weights_are_shared_not_copied_and_the_source_is_untouched():
    theirs = prepared("lora", "llama")
    before = snapshot_model(theirs)
    ours = fastpeft.from_peft(theirs)
    assert_same_model(theirs, before)  # same modules, weights, flags, hooks
    q_theirs = theirs.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
    q_ours = ours.model.layers[0].self_attn.q_proj.base_layer.weight
    assert q_ours.data_ptr() == q_theirs.data_ptr() and q_ours is not q_theirs
    assert ours.lm_head.weight.data_ptr() == theirs.get_base_model().lm_head.weight.data_ptr()
