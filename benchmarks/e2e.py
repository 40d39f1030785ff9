"""End-to-end benchmark: real models with each method applied by each provider.

Tasks, per (model, method, provider), on one freshly built model each (same seed, so the same base weights):
- train: one optimizer step (forward with labels, backward, AdamW step, zero_grad), tokens/s over the batch;
- forward: inference forward (eval, `torch.inference_mode`), the training batch shape;
- generate: greedy `model.generate` of a fixed number of new tokens (decoders only: BART and Llama).

On a GPU the model runs in bf16 (every parameter, the method's included); on the CPU in float32 with tiny configs.
Peak memory is the process's peak allocation over one more call after the timed ones (model, optimizer state,
activations), so it includes everything the step needs, not only what the method adds.
"""

from __future__ import annotations

import gc
import math
from typing import Callable, Optional

import torch

from benchmarks import e2e_models, e2e_providers, harness

SUBJECT = "e2e"
TASKS = ("train", "forward", "generate")
METHODS = e2e_providers.METHODS
PROVIDERS = e2e_providers.PROVIDERS


def plan(models, methods, providers, tasks, quick: bool) -> list[tuple]:
    """Every (model, method, provider, [tasks]) the filters keep."""
    jobs = []
    for model in models:
        work = e2e_models.workload(model, quick)
        model_tasks = [t for t in tasks if t != "generate" or work.gen_new]
        for method in methods:
            for provider in e2e_providers.providers_for(method):
                if provider in providers and model_tasks:
                    jobs.append((model, method, provider, model_tasks))
    return jobs


def run_job(model_name, method, provider, tasks, *, quick, device, dtype, timer) -> list[dict]:
    """Builds the model with `method` by `provider` and measures each task; one record per task."""
    work = e2e_models.workload(model_name, quick)
    shape = {k: v for k, v in vars(work).items() if v}
    base = {"subject": SUBJECT, "model": model_name, "method": method, "provider": provider,
            "dtype": str(dtype).replace("torch.", ""), "shape": shape,
            "spec": {k: v for k, v in vars(e2e_providers.method_spec(method)).items() if v}}
    model = None
    try:
        model = e2e_models.build_model(model_name, quick, device)
        torch.manual_seed(1)
        model = e2e_providers.prepare(model, model_name, method, provider).to(dtype)
        trainable, total = e2e_providers.parameter_counts(model)
        records = []
        for task in tasks:
            record = {**base, "task": task, "case": f"{model_name} {task}",
                      "trainable_params": trainable, "total_params": total}
            try:
                with e2e_providers.run_context(provider):
                    record.update(_measure(task, model, model_name, work, device, timer))
                record["status"] = "ok"
            except Exception as error:  # noqa: BLE001 - a failed task is reported, the suite goes on
                record.update(harness.error_fields(error))
            records.append(record)
    except e2e_providers.Unavailable as why:
        records = [{**base, "task": t, "case": f"{model_name} {t}", "status": "skipped", "reason": str(why)}
                   for t in tasks]
    except Exception as error:  # noqa: BLE001 - a provider that fails to set up is reported, not fatal
        records = [{**base, "task": t, "case": f"{model_name} {t}", **harness.error_fields(error)} for t in tasks]
    del model
    free_memory(device)
    return records


def _measure(task, model, model_name, work, device, timer) -> dict:
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(2)
    batches = [e2e_models.training_batch(model_name, work, vocab, device, generator) for _ in range(2)]
    if task == "train":
        return _train(model, batches, device, timer, e2e_models.tokens_per_step(model_name, work))
    model.eval()
    try:
        if task == "forward":
            inputs = [_inference_inputs(model_name, b) for b in batches]
            return _timed(lambda i: model(**inputs[i % 2]), device, timer,
                          e2e_models.tokens_per_step(model_name, work))
        prompts = [b["input_ids"][: work.gen_batch, : work.gen_prompt] for b in batches]
        lengths = []

        def generate(i):
            prompt = prompts[i % 2]
            out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                 max_new_tokens=work.gen_new, min_new_tokens=work.gen_new,
                                 pad_token_id=model.config.pad_token_id)
            lengths.append(out.shape[1])

        result = _timed(generate, device, timer, None)
        # Decoder-only models return the prompt too; BART returns its decoder start token and the new tokens.
        new_tokens = lengths[-1] - (1 if model_name == "bart-large" else work.gen_prompt)
        result["generated_tokens"] = new_tokens
        result["tokens_per_s"] = work.gen_batch * new_tokens / (result["ms"]["p50"] / 1e3)
        return result
    finally:
        model.train()


def _inference_inputs(model_name, batch):
    if model_name == "bart-large":
        return {"input_ids": batch["input_ids"], "decoder_input_ids": batch["labels"]}
    return {"input_ids": batch["input_ids"]}


def _train(model, batches, device, timer, tokens) -> dict:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    losses = []

    def step(i):
        loss = model(**batches[i % 2]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    try:
        result = _timed(step, device, timer, tokens, grad=True)
        result["final_loss"] = float(losses[-1])
        if not math.isfinite(result["final_loss"]):
            raise FloatingPointError(f"the training loss is {result['final_loss']}")
        return result
    finally:
        del optimizer


def _timed(call: Callable[[int], object], device, timer, tokens: Optional[int], grad: bool = False) -> dict:
    peak_mb = None
    with torch.enable_grad() if grad else torch.inference_mode():
        # Warm-up and timing by the shared timer; peak memory over one more call after it (GPU only: PyTorch
        # keeps no allocation statistics on the CPU).
        times = timer.measure(call, device)
        if device.type == "cuda":
            with harness.PeakMemory(device) as peak:
                call(len(times) + 1)
            peak_mb = peak.absolute_mb
    stats = harness.spread(times)
    result = {"ms": stats, "peak_memory_mb": peak_mb}
    if tokens is not None:
        result["tokens_per_s"] = tokens / (stats["p50"] / 1e3)
    return result


def free_memory(device):
    """Returns the last model's memory to the GPU before the next one is built (nothing to do on the CPU)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
