"""Prefix tuning in generation: with a KV cache, padding and grouped-query attention, `generate` equals greedy
decoding computed without a cache by the explicit-concatenation reference; the prefix is not in the cache, and
its reparametrization runs once per forward."""

import pytest
import torch
from transformers import GenerationConfig

import fastpeft
from model_helpers import DECODERS, SEQ2SEQ, build, inputs, randomize_method_parameters, reference_model

NEW_TOKENS = 4


def _generation_config(model):
    # No end-of-sequence token: exactly NEW_TOKENS greedy steps, no logits processor.
    model.generation_config.eos_token_id = None
    model.generation_config.forced_eos_token_id = None
    return GenerationConfig(
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
        num_beams=1,
        use_cache=True,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=model.config.pad_token_id,
        eos_token_id=None,
        bos_token_id=model.config.bos_token_id,
        decoder_start_token_id=getattr(model.config, "decoder_start_token_id", None),
    )


def _reference_step_logits(arch, reference, data, sequence):
    """Logits for the next token after `sequence`, by a full forward without a cache."""
    if arch in SEQ2SEQ:
        return reference(
            input_ids=data["input_ids"], attention_mask=data["attention_mask"], decoder_input_ids=sequence, use_cache=False
        ).logits[:, -1]
    mask = torch.cat([data["attention_mask"], torch.ones(sequence.shape[0], sequence.shape[1] - data["input_ids"].shape[1], dtype=torch.long)], 1)
    # Positions as generate computes them: real tokens count from 0 whatever the left padding.
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    return reference(input_ids=sequence, attention_mask=mask, position_ids=positions, use_cache=False).logits[:, -1]


@pytest.mark.parametrize("reparam_dim", [16, None], ids=["mlp", "flat"])
@pytest.mark.parametrize("arch", DECODERS + SEQ2SEQ)
def test_generate_with_prefix_equals_generation_by_concatenation(arch, reparam_dim):
    config = fastpeft.UnifiedConfig(attn=fastpeft.PrefixConfig(length=3, reparam_dim=reparam_dim))
    model = build(arch, "task").double()
    fastpeft.apply(model, config)
    randomize_method_parameters(model)
    data = inputs(arch)
    data.pop("decoder_input_ids", None)
    with torch.no_grad():
        result = model.generate(**data, generation_config=_generation_config(model))
        reference = reference_model(arch, lambda: build(arch, "task"), model, config)
        start = 1 if arch in SEQ2SEQ else data["input_ids"].shape[1]
        sequences = result.sequences
        assert sequences.shape[1] == start + NEW_TOKENS
        for step in range(NEW_TOKENS):
            expected = _reference_step_logits(arch, reference, data, sequences[:, : start + step])
            # generate returns the logits in float32: equal up to that rounding (one float32 ulp).
            torch.testing.assert_close(result.logits[step].double(), expected, rtol=1.2e-7, atol=1e-12)
            assert torch.equal(sequences[:, start + step], expected.argmax(-1))


@pytest.mark.parametrize("arch", DECODERS + SEQ2SEQ)
def test_prefix_is_not_in_the_kv_cache(arch):
    model = build(arch, "task")
    fastpeft.apply(model, fastpeft.UnifiedConfig(attn=fastpeft.PrefixConfig(length=5, reparam_dim=8)))
    data = inputs(arch, padded=False)
    with torch.no_grad():
        out = model(**data, use_cache=True)
    cache = out.past_key_values
    real = data["decoder_input_ids" if arch in SEQ2SEQ else "input_ids"].shape[1]
    assert cache.get_seq_length() == real
    if arch in SEQ2SEQ:
        assert cache.cross_attention_cache.get_seq_length() == data["input_ids"].shape[1]


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("arch", ["bart", "llama", "bert"])
def test_reparametrization_runs_once_per_forward(arch, batch):
    model = build(arch, "task")
    fastpeft.apply(model, "prefix")
    encoder = model.fastpeft_prefix
    calls = []
    compute = encoder.compute

    def counting():
        out = compute()
        calls.append(tuple(out.shape))
        return out

    encoder.compute = counting
    data = inputs(arch, batch=batch, padded=False)
    with torch.no_grad():
        model(**data)
    # One evaluation for the whole forward (encoder and decoder stacks included), never per batch element.
    assert calls == [(encoder.rows, 200, encoder.head_dim)]
