"""The end-to-end models and workloads: real architectures at their real sizes, random weights built from configs.

Nothing is downloaded: every model is built from a config with `from_config`, seeded, so every provider starts
from the same base weights. `--quick` (and any CPU run) uses tiny configs of the same architectures.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

MODELS = ("roberta-base", "bart-large", "llama-1b")


@dataclass(frozen=True)
class Workload:
    """Batch and sequence sizes of one model: what a user would train with, and what inference measures."""

    batch: int  # training and forward batch
    seq: int  # tokens per example (the encoder side for BART)
    target: int = 0  # decoder tokens per example (BART only)
    gen_batch: int = 0  # generation batch (0: the model does not generate)
    gen_prompt: int = 0  # prompt tokens for generation
    gen_new: int = 0  # tokens generated


FULL_WORKLOADS = {
    # GLUE-style sequence classification (the paper's MNLI/SST-2 setting).
    "roberta-base": Workload(batch=32, seq=128),
    # XSum-style summarization: long source, short target; greedy generation of a summary.
    "bart-large": Workload(batch=8, seq=512, target=128, gen_batch=8, gen_prompt=512, gen_new=64),
    # Causal LM fine-tuning; single-stream decoding latency.
    "llama-1b": Workload(batch=4, seq=1024, gen_batch=1, gen_prompt=128, gen_new=64),
}

QUICK_WORKLOADS = {
    "roberta-base": Workload(batch=2, seq=32),
    "bart-large": Workload(batch=2, seq=32, target=16, gen_batch=2, gen_prompt=16, gen_new=8),
    "llama-1b": Workload(batch=2, seq=32, gen_batch=1, gen_prompt=16, gen_new=8),
}


def model_config(name: str, quick: bool):
    """The transformers config of `name`: its published shape, or a tiny one of the same architecture."""
    import transformers

    if name == "roberta-base":
        shape = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                     vocab_size=50265, max_position_embeddings=514)
        if quick:
            shape = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                         vocab_size=512, max_position_embeddings=514)
        return transformers.RobertaConfig(**shape, type_vocab_size=1, pad_token_id=1, bos_token_id=0,
                                          eos_token_id=2, num_labels=3, attn_implementation="sdpa")
    if name == "bart-large":
        shape = dict(d_model=1024, encoder_layers=12, decoder_layers=12, encoder_attention_heads=16,
                     decoder_attention_heads=16, encoder_ffn_dim=4096, decoder_ffn_dim=4096, vocab_size=50265,
                     max_position_embeddings=1024)
        if quick:
            shape = dict(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                         decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, vocab_size=512,
                         max_position_embeddings=512)
        return transformers.BartConfig(**shape, attn_implementation="sdpa")
    if name == "llama-1b":
        # The shape of Llama 3.2 1B (1.24 B parameters with tied embeddings).
        shape = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, max_position_embeddings=4096)
        if quick:
            shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=512, max_position_embeddings=512)
        return transformers.LlamaConfig(**shape, rope_theta=500000.0, tie_word_embeddings=True, bos_token_id=1,
                                        eos_token_id=2, pad_token_id=0, attn_implementation="sdpa")
    raise ValueError(f"unknown model {name!r}; expected one of {MODELS}")


def build_model(name: str, quick: bool, device: torch.device, seed: int = 0):
    """A freshly initialised model (float32, train mode) on `device`; the same weights for the same seed."""
    import transformers

    config = model_config(name, quick)
    auto = {
        "roberta-base": transformers.AutoModelForSequenceClassification,
        "bart-large": transformers.AutoModelForSeq2SeqLM,
        "llama-1b": transformers.AutoModelForCausalLM,
    }[name]
    torch.manual_seed(seed)
    with device:
        model = auto.from_config(config)
    return model.train()


def workload(name: str, quick: bool) -> Workload:
    return (QUICK_WORKLOADS if quick else FULL_WORKLOADS)[name]


def training_batch(name: str, work: Workload, vocab: int, device, generator: Optional[torch.Generator] = None):
    """Random token ids (never padding) and labels for one training step of model `name`."""

    def ids(batch, length):
        return torch.randint(3, vocab, (batch, length), generator=generator).to(device)

    if name == "roberta-base":
        return {"input_ids": ids(work.batch, work.seq),
                "labels": torch.randint(0, 3, (work.batch,), generator=generator).to(device)}
    if name == "bart-large":
        return {"input_ids": ids(work.batch, work.seq), "labels": ids(work.batch, work.target)}
    source = ids(work.batch, work.seq)
    return {"input_ids": source, "labels": source.clone()}


def tokens_per_step(name: str, work: Workload) -> int:
    """Tokens one training step or forward processes (encoder plus decoder tokens for BART)."""
    return work.batch * (work.seq + work.target)
