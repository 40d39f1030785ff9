"""The end-to-end benchmark's providers on tiny models of each architecture (CPU, quick sizes), on both transformers
lines: each provider really applies its method (the model's output changes, the trainable parameters are what the
method trains), trains with a finite loss and generates the requested number of tokens. Timings are not asserted."""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks import e2e, e2e_models, e2e_providers, harness

CPU = torch.device("cpu")
TIMER = harness.Timer(warmup_ms=0, rep_ms=0, min_reps=2, max_reps=2)

# Known failures of the libraries compared against, reported as "error" records by the benchmark.
KNOWN_FAILURES = {
    # peft 0.21's PeftModelForSequenceClassification hands the prefix cache to RoBERTa's classifier.
    ("roberta-base", "prefix", "peft"): "TypeError: '<' not supported between instances of 'tuple' and 'int'",
}


def _adapters_unavailable():
    try:
        import adapters  # noqa: F401
    except Exception as error:  # noqa: BLE001 - adapters 1.3 imports only with transformers 4.57
        return f"adapters cannot be imported here ({type(error).__name__})"
    return None


def _jobs(providers):
    return [(model, method, provider) for model in e2e_models.MODELS for method in e2e_providers.METHODS
            for provider in e2e_providers.providers_for(method) if provider in providers]


def _tasks(model):
    return [t for t in e2e.TASKS if t != "generate" or e2e_models.workload(model, True).gen_new]


def _check_records(records, model, method, provider):
    assert [r["task"] for r in records] == _tasks(model)
    for r in records:
        known = KNOWN_FAILURES.get((model, method, provider))
        if known and r["status"] == "error":
            assert r["reason"].startswith(known)
            continue
        assert r["status"] == "ok", r.get("reason")
        assert 0 < r["ms"]["p20"] <= r["ms"]["p50"] <= r["ms"]["p80"]
        assert r["tokens_per_s"] > 0
        if provider == "full":
            assert r["trainable_params"] == r["total_params"]
        else:
            assert 0 < r["trainable_params"] < r["total_params"]
        if r["task"] == "train":
            assert math.isfinite(r["final_loss"])
        if r["task"] == "generate":
            assert r["generated_tokens"] == e2e_models.workload(model, True).gen_new


def _output(model, model_name):
    torch.manual_seed(5)
    batch = e2e_models.training_batch(model_name, e2e_models.workload(model_name, True), model.config.vocab_size, CPU)
    inputs = {"input_ids": batch["input_ids"]}
    if model_name == "bart-large":
        inputs["decoder_input_ids"] = batch["labels"]
    with torch.no_grad():
        return model.eval()(**inputs).logits


def _check_method_is_active(model_name, method, provider):
    """Same seed, same base weights: the adapted model must compute something else than the base model."""
    base = _output(e2e_models.build_model(model_name, True, CPU), model_name)
    model = e2e_models.build_model(model_name, True, CPU)
    torch.manual_seed(1)
    adapted = e2e_providers.prepare(model, model_name, method, provider)
    with e2e_providers.run_context(provider):
        out = _output(adapted, model_name)
    assert out.shape == base.shape
    assert not torch.allclose(out, base), f"{provider} {method}: the method changes nothing"


@pytest.mark.parametrize("model,method,provider", _jobs(("adapters", "peft", "full")))
def test_library_provider(model, method, provider):
    if provider == "adapters" and _adapters_unavailable():
        pytest.skip(_adapters_unavailable())
    records = e2e.run_job(model, method, provider, _tasks(model), quick=True, device=CPU, dtype=torch.float32,
                          timer=TIMER)
    _check_records(records, model, method, provider)
    if provider != "full" and (model, method, provider) not in KNOWN_FAILURES:
        _check_method_is_active(model, method, provider)


@pytest.mark.parametrize("model,method,provider", _jobs(("fastpeft", "fastpeft_ref")))
def test_fastpeft_provider(model, method, provider):
    records = e2e.run_job(model, method, provider, _tasks(model), quick=True, device=CPU, dtype=torch.float32,
                          timer=TIMER)
    _check_records(records, model, method, provider)
    _check_method_is_active(model, method, provider)


# BART's prefix: AdapterHub keeps one reparametrization per kind of attention (encoder, decoder, cross), fastpeft one.
DIFFERENT_SIZES = {("bart-large", "prefix"), ("bart-large", "mam")}


@pytest.mark.parametrize("model", e2e_models.MODELS)
def test_adapters_gets_the_sizes_fastpeft_trains(model):
    """The matching AdapterHub config trains exactly as many parameters as fastpeft's preset."""
    if _adapters_unavailable():
        pytest.skip(_adapters_unavailable())
    for method in e2e_providers.METHODS:
        if method == "full" or (model, method) in DIFFERENT_SIZES:
            continue
        counts = [e2e_providers.parameter_counts(e2e_providers.prepare(e2e_models.build_model(model, True, CPU), model,
                                                                       method, provider))[0]
                  for provider in ("fastpeft", "adapters")]
        assert counts[0] == counts[1], (model, method, counts)


def test_peft_has_only_lora_and_prefix():
    model = e2e_models.build_model("llama-1b", True, CPU)
    with pytest.raises(e2e_providers.Unavailable, match="no bottleneck adapters"):
        e2e_providers.prepare(model, "llama-1b", "houlsby", "peft")
