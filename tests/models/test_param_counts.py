"""Parameter counts against PAPER.md section 5, on BART-large- and RoBERTa-base-shaped models built without
weights (meta device)."""

import torch
import transformers

import fastpeft


def _meta(config_class, model_class, **config):
    with torch.device("meta"):
        return model_class(config_class(**config))


def _method_count(model):
    return sum(p.numel() for n, p in model.named_parameters() if p.requires_grad)


def test_mam_on_bart_large():
    model = _meta(
        transformers.BartConfig,
        transformers.BartModel,
        vocab_size=50265, d_model=1024, encoder_layers=12, decoder_layers=12, encoder_attention_heads=16,
        decoder_attention_heads=16, encoder_ffn_dim=4096, decoder_ffn_dim=4096, max_position_embeddings=1024,
    )
    base = sum(p.numel() for p in model.parameters())
    fastpeft.apply(model, "mam")
    d, l, r, m = 1024, 30, 512, 512
    attention_sublayers, ffn_sublayers = 3 * 12, 2 * 12  # per encoder+decoder layer pair: 3 attentions, 2 FFNs
    adapters = ffn_sublayers * (2 * r * d + r + d)  # weights 2rd (PAPER.md) plus the two biases
    # While training: the embedding [l, d] and the MLP d -> m -> (2 l d per attention sublayer, per token).
    mlp = l * d + (d * m + m) + (m * 2 * d * attention_sublayers + 2 * d * attention_sublayers)
    assert _method_count(model) == mlp + adapters
    fastpeft.eject_prefix(model)
    prefix = attention_sublayers * 2 * l * d
    paper = 2 * 30 * 1024 * 3 * 12 + 2 * 512 * 1024 * 2 * 12  # PAPER.md section 5, biases left out
    assert _method_count(model) == paper + ffn_sublayers * (r + d) == prefix + adapters
    assert round(paper / 1e6, 1) == 27.4
    # "6.7 % of the model": the method's parameters relative to the pretrained model.
    assert round(100 * _method_count(model) / base, 1) == 6.7


def test_mam_with_l_r_16_on_roberta_base():
    model = _meta(
        transformers.RobertaConfig,
        transformers.RobertaModel,
        vocab_size=50265, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
        max_position_embeddings=514, type_vocab_size=1,
    )
    base = sum(p.numel() for p in model.parameters())
    fastpeft.apply(model, fastpeft.get_config("mam", length=16, r=16, reparam_dim=None))
    d = 768
    expected = 12 * 2 * 16 * d + 12 * (2 * 16 * d + 16 + d)  # prefix 2ld per attention, adapter 2rd (+ biases) per FFN
    assert _method_count(model) == expected
    assert abs(100 * expected / base - 0.5) < 0.05  # "about 0.5 %"


def test_lora_and_houlsby_counts_on_roberta_base():
    d, layers = 768, 12
    model = _meta(
        transformers.RobertaConfig, transformers.RobertaModel,
        hidden_size=d, num_hidden_layers=layers, num_attention_heads=12, intermediate_size=3072,
    )
    fastpeft.apply(model, fastpeft.get_config("lora", r=8))
    assert _method_count(model) == layers * 4 * 8 * d  # LoRA on q and v: 4 r d per attention sublayer
    fastpeft.remove(model)
    fastpeft.apply(model, fastpeft.get_config("houlsby", r=64))
    norms = sum(p.numel() for n, p in model.named_parameters() if "LayerNorm" in n)
    assert _method_count(model) == 2 * layers * (2 * 64 * d + 64 + d) + norms
