"""Tiny random-weight transformers models (built from configs: nothing is downloaded) and the independent
float64 reference the patched models are checked against.

The reference is an unpatched copy of the base model plus hooks written here with explicit math: explicit
adapter and LoRA formulas, and an attention that concatenates the prefix onto the keys and values. Where each
method sits is stated here again, independently of `fastpeft.architectures`, in terms a reader can check
against PAPER.md: a parallel adapter reads the sublayer's input (the output of the LayerNorm in front of it in
pre-LN models, the block input or the previous LayerNorm's output in post-LN models).
"""

from __future__ import annotations

import copy
import types

import torch
import transformers
from transformers import AttentionInterface

import fastpeft
from helpers import activation64

TF5 = int(transformers.__version__.split(".")[0]) >= 5
VOCAB = 64
HIDDEN = 32
HEADS = 4
HEAD_DIM = HIDDEN // HEADS

# Small method settings (r, prefix length, MLP width) so that every (architecture, method) pair runs in
# milliseconds; the presets' own sizes are checked in test_api.py and test_param_counts.py.
SMALL = {"r": 4, "length": 3, "reparam_dim": 16}


def tiny_config(arch: str, **overrides):
    """A 2-layer (2 + 2 for encoder-decoders), hidden-32, 4-head config; dropout off unless overridden."""
    common = dict(vocab_size=VOCAB)
    if arch in ("bert", "roberta"):
        cls = transformers.BertConfig if arch == "bert" else transformers.RobertaConfig
        config = cls(
            hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=HEADS, intermediate_size=64,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, max_position_embeddings=64,
            pad_token_id=1, **common,
        )
    elif arch == "gpt2":
        config = transformers.GPT2Config(
            n_embd=HIDDEN, n_layer=2, n_head=HEADS, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, pad_token_id=0, **common,
        )
    elif arch in ("llama", "mistral", "qwen2"):
        cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig, "qwen2": transformers.Qwen2Config}[arch]
        extra = {"sliding_window": 4} if arch == "mistral" else {}  # a window shorter than the inputs
        config = cls(
            hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=HEADS, num_key_value_heads=2,
            intermediate_size=64, max_position_embeddings=64, bos_token_id=0, eos_token_id=0, pad_token_id=0,
            tie_word_embeddings=False, **extra, **common,
        )
    elif arch in ("bart", "mbart"):
        cls = transformers.BartConfig if arch == "bart" else transformers.MBartConfig
        config = cls(
            d_model=HIDDEN, encoder_layers=2, decoder_layers=2, encoder_attention_heads=HEADS,
            decoder_attention_heads=HEADS, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
            dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, pad_token_id=1, bos_token_id=0,
            eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None, **common,
        )
    else:
        raise ValueError(arch)
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


ARCHS = ("bert", "roberta", "gpt2", "llama", "mistral", "qwen2", "bart", "mbart")
DECODERS = ("gpt2", "llama", "mistral", "qwen2")
SEQ2SEQ = ("bart", "mbart")


def build(arch: str, kind: str = "base", seed: int = 0, attn_implementation: str = "sdpa", **overrides):
    """A tiny model with deterministic weights: kind "base" (AutoModel), "task" (classification for encoders,
    causal LM for decoders, seq2seq LM for BART)."""
    config = tiny_config(arch, **overrides)
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    if kind == "base":
        model = transformers.AutoModel.from_config(config, attn_implementation=attn_implementation)
    elif arch in ("bert", "roberta"):
        config.num_labels = 3
        model = transformers.AutoModelForSequenceClassification.from_config(config, attn_implementation=attn_implementation)
    elif arch in SEQ2SEQ:
        model = transformers.AutoModelForSeq2SeqLM.from_config(config, attn_implementation=attn_implementation)
    else:
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    return model.eval()


def inputs(arch: str, batch: int = 2, length: int = 6, seed: int = 1, padded: bool = True) -> dict:
    """Token ids and a padding mask (right padding for encoders and BART's encoder, left for decoders)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    if padded and batch > 1:
        if arch in DECODERS:
            mask[1, :2] = 0
        else:
            mask[1, -2:] = 0
    data = {"input_ids": ids, "attention_mask": mask}
    if arch in SEQ2SEQ:
        data["decoder_input_ids"] = torch.randint(3, VOCAB, (batch, length - 1), generator=g)
    return data


def task_labels(arch: str, data: dict) -> dict:
    if arch in ("bert", "roberta"):
        return {"labels": torch.tensor([0, 2])[: data["input_ids"].shape[0]]}
    if arch in SEQ2SEQ:
        return {"labels": data["decoder_input_ids"]}
    labels = data["input_ids"].masked_fill(data["attention_mask"] == 0, -100)
    return {"labels": labels}


def output(model, data: dict) -> torch.Tensor:
    """The first output (last hidden state for base models, logits for task models)."""
    out = model(**data)
    return out[0] if isinstance(out, tuple) else next(iter(out.values()))


# ----------------------------------------------------------------------------------------------------------------
# Methods exercised for every architecture
# ----------------------------------------------------------------------------------------------------------------


def method_config(name: str) -> fastpeft.UnifiedConfig:
    """Presets (scaled down) and a few variants that cover the remaining options."""
    if name in fastpeft.PRESETS:
        preset = fastpeft.PRESETS[name]
        fields = {f for _, m in preset.methods() for f in m.__dataclass_fields__}
        return fastpeft.get_config(name, **{k: v for k, v in SMALL.items() if k in fields})
    if name == "lora_all":
        return fastpeft.UnifiedConfig(
            attn=fastpeft.LoRAConfig(r=4, alpha=8, targets=("q", "k", "v", "o")),
            ffn=fastpeft.LoRAConfig(r=2, alpha=8, targets=("ffn_in", "ffn_out")),
        )
    if name == "attn_parallel_learned":
        return fastpeft.UnifiedConfig(
            attn=fastpeft.AdapterConfig(r=4, activation="silu", insertion="parallel", scale="learned"),
            ffn=fastpeft.AdapterConfig(r=4, activation="tanh", insertion="sequential", init="bert"),
        )
    if name == "prefix_flat":
        return fastpeft.UnifiedConfig(attn=fastpeft.PrefixConfig(length=3, reparam_dim=None))
    raise ValueError(name)


METHODS = tuple(fastpeft.PRESETS) + ("lora_all", "attn_parallel_learned", "prefix_flat")


def has_prefix(config: fastpeft.UnifiedConfig) -> bool:
    return isinstance(config.attn, fastpeft.PrefixConfig)


def identity_init(config: fastpeft.UnifiedConfig) -> fastpeft.UnifiedConfig:
    """The same placement with identity initialisation (adapters: W_up = 0; LoRA has B = 0 already)."""
    import dataclasses

    sites = {}
    for site, method in config.methods():
        sites[site] = dataclasses.replace(method, init="lora") if isinstance(method, fastpeft.AdapterConfig) else method
    return dataclasses.replace(config, **sites)


def randomize_method_parameters(model, seed: int = 3) -> None:
    """Give every inserted parameter random values, so that no part of a method is a no-op in the comparison."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name or ".adapter." in name or name.startswith("fastpeft_prefix."):
                values = torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.3
                if name.endswith(".adapter.scale"):
                    values = 1.0 + values.abs()
                p.copy_(values.to(p.dtype))


def method_parameter_names(model) -> set:
    """Names of inserted parameters, recognised by their names (not by fastpeft's own bookkeeping)."""
    return {
        n
        for n, _ in model.named_parameters()
        if ".lora_" in n or ".adapter." in n or n.startswith("fastpeft_prefix.")
    }


# ----------------------------------------------------------------------------------------------------------------
# Where each method sits (stated independently of fastpeft.architectures)
# ----------------------------------------------------------------------------------------------------------------

# Per architecture: the base-model paths of the layer lists, then per layer the LoRA targets by role
# (path, slice of 3 for GPT-2's fused c_attn), and per site the output projection and where the sublayer's
# input comes from: ("output", module) is that module's output, ("input", module, arg name, position) its input.
_BERT = {
    "stacks": ["encoder.layer"],
    "lora": {
        "q": [("attention.self.query", None)], "k": [("attention.self.key", None)],
        "v": [("attention.self.value", None)], "o": [("attention.output.dense", None)],
        "ffn_in": [("intermediate.dense", None)], "ffn_out": [("output.dense", None)],
    },
    "attn": ("attention.output.dense", ("input", "attention", "hidden_states", 0)),
    "ffn": ("output.dense", ("output", "attention.output.LayerNorm")),
    "attention": ["attention.self"],
    # Post-LN: the LayerNorm each block applies to (sublayer output + sublayer input).
    "post_norm": {"attn": "attention.output.LayerNorm", "ffn": "output.LayerNorm"},
}
_LLAMA = {
    "stacks": ["layers"],
    "lora": {
        "q": [("self_attn.q_proj", None)], "k": [("self_attn.k_proj", None)], "v": [("self_attn.v_proj", None)],
        "o": [("self_attn.o_proj", None)], "ffn_in": [("mlp.gate_proj", None), ("mlp.up_proj", None)],
        "ffn_out": [("mlp.down_proj", None)],
    },
    "attn": ("self_attn.o_proj", ("output", "input_layernorm")),
    "ffn": ("mlp.down_proj", ("output", "post_attention_layernorm")),
    "attention": ["self_attn"],
}


def _bart_layout(pre_ln: bool):
    def ffn_input(stack):
        if pre_ln:
            return ("output", "final_layer_norm")
        return ("output", "self_attn_layer_norm" if stack == "encoder" else "encoder_attn_layer_norm")

    attn_x = ("output", "self_attn_layer_norm") if pre_ln else ("input", "self_attn", "hidden_states", 0)
    return {
        "stacks": ["encoder.layers", "decoder.layers"],
        "lora": {
            "q": [("self_attn.q_proj", None), ("encoder_attn.q_proj", None)],
            "k": [("self_attn.k_proj", None), ("encoder_attn.k_proj", None)],
            "v": [("self_attn.v_proj", None), ("encoder_attn.v_proj", None)],
            "o": [("self_attn.out_proj", None), ("encoder_attn.out_proj", None)],
            "ffn_in": [("fc1", None)], "ffn_out": [("fc2", None)],
        },
        "attn": ("self_attn.out_proj", attn_x),
        "ffn": ("fc2", ffn_input),
        "attention": ["self_attn", "encoder_attn"],
        "post_norm": None if pre_ln else {"attn": "self_attn_layer_norm", "ffn": "final_layer_norm"},
    }


LAYOUT = {
    "bert": _BERT,
    "roberta": _BERT,
    "gpt2": {
        "stacks": ["h"],
        "lora": {
            "q": [("attn.c_attn", 0)], "k": [("attn.c_attn", 1)], "v": [("attn.c_attn", 2)],
            "o": [("attn.c_proj", None)], "ffn_in": [("mlp.c_fc", None)], "ffn_out": [("mlp.c_proj", None)],
        },
        "attn": ("attn.c_proj", ("output", "ln_1")),
        "ffn": ("mlp.c_proj", ("output", "ln_2")),
        "attention": ["attn"],
    },
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "bart": _bart_layout(pre_ln=False),
    "mbart": _bart_layout(pre_ln=True),
}


def _join(*parts):
    return ".".join(p for p in parts if p)


def _layers(model, arch):
    """[(stack index, layer path)] over all layers, encoder first (paths relative to `model`)."""
    base = model.base_model
    prefix = next(n for n, m in model.named_modules() if m is base)
    out = []
    for s, stack in enumerate(LAYOUT[arch]["stacks"]):
        layers = base.get_submodule(stack)
        out += [(s, _join(prefix, stack, str(i))) for i in range(len(layers))]
    return out


# ----------------------------------------------------------------------------------------------------------------
# Explicit math
# ----------------------------------------------------------------------------------------------------------------


act = activation64  # the explicit activation formulas, shared with the op tests


def adapter_math(x, h, wd, bd, wu, bu, s, activation):
    return h + s * (act(x @ wd.T + bd, activation) @ wu.T + bu)


def concat_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """Attention over torch.cat([prefix, keys]) with the model's own mask extended by visible prefix columns."""
    prefix_k, prefix_v = module.reference_prefix
    batch, hq, t, d = query.shape
    hkv, s, length = key.shape[1], key.shape[2], prefix_k.shape[1]
    keys = torch.cat([prefix_k.unsqueeze(0).expand(batch, -1, -1, -1), key], dim=2)
    values = torch.cat([prefix_v.unsqueeze(0).expand(batch, -1, -1, -1), value], dim=2)
    keys = keys.repeat_interleave(hq // hkv, dim=1)
    values = values.repeat_interleave(hq // hkv, dim=1)
    scores = query @ keys.transpose(-1, -2) * (scaling if scaling is not None else d**-0.5)
    if attention_mask is not None:
        mask = attention_mask[..., :s]
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=scores.dtype).masked_fill(~mask, float("-inf"))
        mask = torch.cat([torch.zeros(*mask.shape[:-1], length, dtype=scores.dtype), mask.to(scores.dtype)], dim=-1)
        scores = scores + mask
    else:
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        if causal and t > 1:
            visible = torch.ones(t, s, dtype=torch.bool).tril(s - t)
            hidden = torch.cat([torch.zeros(t, length, dtype=torch.bool), ~visible], dim=-1)
            scores = scores.masked_fill(hidden, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return (probs @ values).transpose(1, 2).contiguous(), probs


AttentionInterface.register("fastpeft_test_concat", concat_attention)


def _bert_concat_forward(self, hidden_states, attention_mask=None, *args, **kwargs):
    """BERT / RoBERTa self-attention with the prefix concatenated (the same in both transformers lines)."""
    batch, t, _ = hidden_states.shape
    shape = (batch, t, self.num_attention_heads, self.attention_head_size)
    q, k, v = (getattr(self, n)(hidden_states).view(shape).transpose(1, 2) for n in ("query", "key", "value"))
    out, _ = concat_attention(self, q, k, v, attention_mask, scaling=self.attention_head_size**-0.5, is_causal=False)
    return out.reshape(batch, t, -1), None


# ----------------------------------------------------------------------------------------------------------------
# The reference model
# ----------------------------------------------------------------------------------------------------------------


def explicit_prefixes(patched, config: fastpeft.PrefixConfig) -> torch.Tensor:
    """All prefixes as [rows, L, D] from the patched model's parameters, by the documented layout."""
    params = dict(patched.named_parameters())
    if config.reparam_dim is None:
        return params["fastpeft_prefix.prefix"].double()
    e = params["fastpeft_prefix.embedding"].double()
    hidden = torch.tanh(e @ params["fastpeft_prefix.down.weight"].double().T + params["fastpeft_prefix.down.bias"].double())
    flat = hidden @ params["fastpeft_prefix.up.weight"].double().T + params["fastpeft_prefix.up.bias"].double()
    return flat.view(config.length, -1, HEAD_DIM).transpose(0, 1)


def reference_model(arch, base_factory, patched, config: fastpeft.UnifiedConfig):
    """An unpatched float64 model with `patched`'s base weights and method weights, computed by explicit hooks."""
    reference = base_factory().double().eval()
    reference.load_state_dict(_unwrapped_state_dict(patched))
    params = {n: p.double() for n, p in patched.named_parameters()}
    layout = LAYOUT[arch]
    layers = _layers(reference, arch)
    stack_names = ["encoder", "decoder"]

    for site, method in config.methods():
        if isinstance(method, fastpeft.LoRAConfig):
            for _, layer in layers:
                targets = {}
                for role in method.targets:
                    for rel, part in layout["lora"][role]:
                        path = _join(layer, rel)
                        if rel.startswith("encoder_attn") and (not method.cross_attention or not _exists(reference, path)):
                            continue
                        targets.setdefault(path, []).append((role, part))
                for path, roles in targets.items():
                    _lora_hook(reference, path, roles, params, method.alpha / method.r)
        elif isinstance(method, fastpeft.AdapterConfig):
            out_rel, x_spec = layout[site]
            norm = layout["post_norm"][site] if method.original_ln_before else None
            for stack_index, layer in layers:
                spec = x_spec(stack_names[stack_index]) if callable(x_spec) else x_spec
                _adapter_hooks(reference, layer, out_rel, spec, params, method, norm)
        else:
            prefixes = explicit_prefixes(patched, method)
            row = 0
            for _, layer in layers:
                for rel in layout["attention"]:
                    path = _join(layer, rel)
                    if not _exists(reference, path) or (rel == "encoder_attn" and not method.cross_attention):
                        continue
                    module = reference.get_submodule(path)
                    hkv = getattr(reference.config, "num_key_value_heads", HEADS)
                    module.reference_prefix = (prefixes[row : row + hkv], prefixes[row + hkv : row + 2 * hkv])
                    row += 2 * hkv
                    if arch in ("bert", "roberta"):
                        module.forward = types.MethodType(_bert_concat_forward, module)
                    else:
                        own = copy.copy(module.config)
                        own._attn_implementation = "fastpeft_test_concat"
                        module.config = own
            assert row == prefixes.shape[0], "the prefix holds rows for sites the reference did not find"
    return reference


def _exists(model, path):
    try:
        model.get_submodule(path)
        return True
    except AttributeError:
        return False


def _unwrapped_state_dict(patched):
    """The patched model's base weights under their original names (wrappers hold them as `base_layer`)."""
    out = {}
    for name, tensor in patched.state_dict().items():
        if ".lora_" in name or ".adapter." in name or name.startswith("fastpeft_prefix."):
            continue
        out[name.replace(".base_layer.", ".")] = tensor
    return out


def _lora_hook(model, path, roles, params, scale):
    module = model.get_submodule(path)
    weights = [(params[f"{path}.lora_A.{role}"], params[f"{path}.lora_B.{role}"], part) for role, part in roles]

    def hook(mod, args, out):
        x = args[0]
        out = out.clone()
        size = out.shape[-1] // 3
        for a, b, part in weights:
            delta = scale * (x @ a.T @ b.T)
            if part is None:
                out = out + delta
            else:
                out[..., part * size : (part + 1) * size] += delta
        return out

    module.register_forward_hook(hook)


def layer_norm(v, module):
    mean = v.mean(-1, keepdim=True)
    var = ((v - mean) ** 2).mean(-1, keepdim=True)
    return (v - mean) / torch.sqrt(var + module.eps) * module.weight + module.bias


def _adapter_hooks(model, layer, out_rel, x_spec, params, method, norm=None):
    """Sequential: h + s f(h); parallel: h + s f(sublayer input); with `norm` (AdapterHub's
    original_ln_before): h + s f(LayerNorm(h + sublayer input))."""
    out_path = _join(layer, out_rel)
    name = f"{out_path}.adapter"
    wd, bd = params[f"{name}.down.weight"], params[f"{name}.down.bias"]
    wu, bu = params[f"{name}.up.weight"], params[f"{name}.up.bias"]
    scale = params[f"{name}.scale"] if method.scale == "learned" else method.scale
    captured = {}
    if method.insertion == "parallel" or norm is not None:
        if x_spec[0] == "output":
            model.get_submodule(_join(layer, x_spec[1])).register_forward_hook(
                lambda mod, args, out: captured.__setitem__("x", out)
            )
        else:
            _, rel, arg, position = x_spec

            def pre_hook(mod, args, kwargs):
                captured["x"] = kwargs[arg] if arg in kwargs else args[position]

            model.get_submodule(_join(layer, rel)).register_forward_pre_hook(pre_hook, with_kwargs=True)

    norm_module = model.get_submodule(_join(layer, norm)) if norm is not None else None

    def hook(mod, args, out):
        if norm_module is not None:
            x = layer_norm(out + captured.pop("x"), norm_module)
        else:
            x = out if method.insertion == "sequential" else captured.pop("x")
        return adapter_math(x, out, wd, bd, wu, bu, scale, method.activation)

    model.get_submodule(out_path).register_forward_hook(hook)


def assert_close64(actual, expected, what="output"):
    torch.testing.assert_close(actual.double(), expected.double(), rtol=1e-9, atol=1e-10, msg=lambda m: f"{what}: {m}")


def snapshot_model(model):
    """Everything `remove` must restore: modules, weights, flags, hooks, configs, attributes."""
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "modules": [(n, type(m)) for n, m in model.named_modules()],
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "hooks": {
            n: (len(m._forward_hooks), len(m._forward_pre_hooks))
            for n, m in model.named_modules()
        },
        "configs": {n: id(m.config) for n, m in model.named_modules() if hasattr(m, "config")},
        "attributes": {n: sorted(vars(m)) for n, m in model.named_modules()},
    }


def assert_same_model(model, snapshot):
    now = snapshot_model(model)
    assert now["modules"] == snapshot["modules"]
    assert now["requires_grad"] == snapshot["requires_grad"]
    assert now["hooks"] == snapshot["hooks"]
    assert now["configs"] == snapshot["configs"]
    assert now["attributes"] == snapshot["attributes"]
    assert now["state"].keys() == snapshot["state"].keys()
    for key, value in snapshot["state"].items():
        assert torch.equal(now["state"][key], value), key
