"""Training and inference features: gradient checkpointing, bf16 autocast, torch.compile, dropout in train()
and eval(), dtype changes, and the Hugging Face Trainer."""

import pytest
import torch

import fastpeft
from model_helpers import build, inputs, output, randomize_method_parameters, task_labels

SMALL_MAM = dict(r=4, length=3, reparam_dim=16)


def _grads(model, arch, data):
    model.zero_grad(set_to_none=True)
    loss = model(**data, **task_labels(arch, data)).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non_reentrant"])
@pytest.mark.parametrize("preset", ["mam", "houlsby", "lora"])
@pytest.mark.parametrize("arch", ["bert", "llama", "bart"])
def test_gradient_checkpointing_gives_the_same_gradients(arch, preset, reentrant):
    model = build(arch, "task").double()
    fields = {"lora": dict(r=4), "houlsby": dict(r=4), "mam": SMALL_MAM}[preset]
    fastpeft.apply(model, fastpeft.get_config(preset, **fields))
    randomize_method_parameters(model)
    model.train()
    data = inputs(arch)
    loss, expected = _grads(model, arch, data)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    checkpointed_loss, actual = _grads(model, arch, data)
    torch.testing.assert_close(checkpointed_loss, loss, rtol=1e-12, atol=0)
    assert actual.keys() == expected.keys()
    for name in expected:
        assert expected[name].abs().max() > 0, name
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("arch", ["roberta", "qwen2", "mbart"])
def test_bf16_autocast_trains(arch):
    model = build(arch, "task")
    fastpeft.apply(model, fastpeft.get_config("mam", **SMALL_MAM))
    randomize_method_parameters(model)
    model.train()
    data = inputs(arch)
    with torch.no_grad():
        reference = model(**data).logits
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**data, **task_labels(arch, data))
    assert out.logits.dtype in (torch.bfloat16, torch.float32)
    # bfloat16 keeps 8 bits of mantissa: logits of size ~1 agree to a few 1e-2 after two layers.
    torch.testing.assert_close(out.logits.float(), reference, rtol=0.05, atol=0.05)
    out.loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.dtype == p.dtype and torch.isfinite(p.grad).all(), name


def test_torch_compile_matches_eager():
    model = build("llama", "task")
    fastpeft.apply(model, fastpeft.get_config("mam", **SMALL_MAM))
    randomize_method_parameters(model)
    model.train()
    data = inputs("llama")
    labels = task_labels("llama", data)
    eager_loss = model(**data, **labels).loss
    eager_loss.backward()
    eager_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")
    loss = compiled(**data, **labels).loss
    loss.backward()
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("arch", ["bert", "gpt2", "bart"])
def test_dropout_acts_in_train_only(arch):
    config = fastpeft.UnifiedConfig(
        attn=fastpeft.PrefixConfig(length=3, reparam_dim=8),
        ffn=fastpeft.AdapterConfig(r=4, dropout=0.5),
    )
    # Attention dropout reaches the prefix attention through transformers' own dropout setting.
    dropout = {"bert": dict(attention_probs_dropout_prob=0.5), "gpt2": dict(attn_pdrop=0.5), "bart": dict(attention_dropout=0.5)}
    model = build(arch, **dropout[arch])
    fastpeft.apply(model, config)
    randomize_method_parameters(model)
    data = inputs(arch)
    with torch.no_grad():
        model.eval()
        first, second = output(model, data), output(model, data)
        assert torch.equal(first, second)
        model.train()
        noisy = output(model, data)
        assert not torch.allclose(noisy, first, atol=1e-3)
        model.eval()
        assert torch.equal(output(model, data), first)

    lora = build(arch)
    fastpeft.apply(lora, fastpeft.LoRAConfig(r=4, dropout=0.5))
    randomize_method_parameters(lora)
    with torch.no_grad():
        clean = output(lora.eval(), data)
        assert not torch.allclose(output(lora.train(), data), clean, atol=1e-3)


@pytest.mark.parametrize("arch", ["gpt2", "bart"])
def test_dtype_changes_after_apply(arch):
    model = build(arch)
    fastpeft.apply(model, fastpeft.get_config("mam", **SMALL_MAM))
    randomize_method_parameters(model)
    data = inputs(arch)
    with torch.no_grad():
        fp32 = output(model, data)
        model.to(torch.float64)
        assert all(p.dtype == torch.float64 for p in model.parameters())
        fp64 = output(model, data)
        assert fp64.dtype == torch.float64
        torch.testing.assert_close(fp64.float(), fp32, rtol=1e-4, atol=1e-5)
        model.to(torch.bfloat16)
        bf16 = output(model, data)
        assert bf16.dtype == torch.bfloat16
        torch.testing.assert_close(bf16.float(), fp32, rtol=0.05, atol=0.05)


def test_float32_method_weights_on_a_bfloat16_model():
    model = build("llama").to(torch.bfloat16)
    fastpeft.apply(model, fastpeft.get_config("mam", **SMALL_MAM))
    randomize_method_parameters(model)
    for name, p in model.named_parameters():
        if p.requires_grad:
            p.data = p.data.float()  # trained weights in float32, base model in bfloat16
    data = inputs("llama")
    out = output(model, data)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.requires_grad)


def test_hugging_face_trainer(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = build("bert", "task")
    fastpeft.apply(model, fastpeft.get_config("mam", **SMALL_MAM))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    g = torch.Generator().manual_seed(0)
    examples = [
        {"input_ids": torch.randint(3, 64, (6,), generator=g), "attention_mask": torch.ones(6, dtype=torch.long),
         "labels": torch.tensor(i % 3)}
        for i in range(8)
    ]
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=8, learning_rate=1e-2,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=examples)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 8 and losses[-1] < losses[0]
    for name, value in frozen.items():
        assert torch.equal(dict(model.named_parameters())[name], value), name
