"""The benchmark suite: the harness's statistics, the baselines computing the same math as fastpeft, and a smoke run
of `python -m benchmarks --quick` on the CPU whose records and plots are checked. Timings are never asserted."""

from __future__ import annotations

import contextlib
import io
import math

import pytest
import torch

from benchmarks import harness, micro_adapter, micro_prefix, plot, run

ENV_FIELDS = {"device": str, "cpu": str, "torch": str, "fastpeft": str, "git_commit": str, "extension_built": bool,
              "kernels_usable": bool, "python": str}


def test_spread_is_deciles_of_the_times():
    stats = harness.spread([float(v) for v in range(10, 0, -1)])
    assert stats["reps"] == 10
    assert stats["p50"] == pytest.approx(5.5)
    assert stats["p20"] == pytest.approx(2.8)
    assert stats["p80"] == pytest.approx(8.2)
    with pytest.raises(ValueError):
        harness.spread([1.0])


def test_rotation_covers_several_caches():
    cpu = torch.device("cpu")
    cache = harness.cache_bytes(cpu)
    small = harness.rotation_count(cache // 10, cpu)
    assert small * cache // 10 >= 4 * cache or small == 64
    assert harness.rotation_count(100 * cache, cpu) == 1


def test_timer_counts_calls_between_bounds():
    calls = []
    timer = harness.Timer(warmup_ms=0.0, rep_ms=0.0, min_reps=7, max_reps=9, min_warmup=2)
    times = timer.measure(lambda i: calls.append(i), torch.device("cpu"))
    assert len(times) == 7 and all(t >= 0 for t in times)
    assert calls == list(range(2 + 7))  # warm-up then timed calls; the index keeps counting (input rotation)
    calls.clear()
    times = harness.Timer(warmup_ms=1.0, rep_ms=1.0, min_reps=3, max_reps=5).measure(calls.append, torch.device("cpu"))
    assert 3 <= len(times) <= 5
    assert calls == list(range(len(calls))) and len(calls) >= 1 + len(times)


def test_ratios_are_medians_over_fastpeft_medians():
    records = [
        {"case": "a", "provider": "fastpeft", "status": "ok", "ms": {"p50": 2.0}},
        {"case": "a", "provider": "eager", "status": "ok", "ms": {"p50": 3.0}},
        {"case": "b", "provider": "eager", "status": "ok", "ms": {"p50": 3.0}},
        {"case": "a", "provider": "peft", "status": "error"},
    ]
    harness.add_ratios(records, ("case",))
    assert [r["ratio_to_fastpeft"] for r in records] == [1.0, 1.5, None, None]


def _outputs_and_grads(module, case, provider):
    torch.manual_seed(0)
    op = module.build(case, provider, torch.device("cpu"), torch.float64)
    torch.manual_seed(1)
    inputs = op.make_inputs()
    out = op.fn(*inputs)
    torch.manual_seed(2)
    out.backward(torch.randn_like(out))
    leaves = [t for t in inputs if t.requires_grad] + list(op.params)
    return out.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("module", [micro_adapter, micro_prefix], ids=["adapter", "prefix"])
def test_every_provider_computes_the_same_thing(module):
    """The baselines are the same math as fastpeft (the floor `sdpa` excepted: it has no prefix), so a ratio
    compares implementations, not problems. Same seed, same weights; float64 on the CPU."""
    for case in module.cases(quick=True)[:: len(module.cases(quick=True)) // len(module.METHODS)]:
        expected, expected_grads = _outputs_and_grads(module, case, "fastpeft")
        for provider in module.providers(case["method"]):
            if provider in ("fastpeft", "sdpa", "compile"):  # compile: checked by the smoke run (slow to build)
                continue
            out, grads = _outputs_and_grads(module, case, provider)
            torch.testing.assert_close(out, expected, msg=f"{provider} {case}")
            assert len(grads) == len(expected_grads), provider
            for got, want in zip(grads, expected_grads):
                torch.testing.assert_close(got, want, msg=f"{provider} {case} gradient")


def _check_env(record):
    for field, kind in ENV_FIELDS.items():
        assert isinstance(record["env"][field], kind), field
    assert record["env"]["device"] == "cpu" and record["env"]["gpu"] is None


def _check_timing(record):
    ms = record["ms"]
    assert set(ms) == {"p20", "p50", "p80", "reps"}
    assert 0 < ms["p20"] <= ms["p50"] <= ms["p80"], ms
    assert ms["reps"] == 3


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One quick CPU run of every subject (a few methods), as `make bench` runs it; returns (dir, records, stdout)."""
    out = tmp_path_factory.mktemp("bench")
    argv = ["--quick", "--device", "cpu", "--out", str(out), "--no-progress", "--reps", "3",
            "--method", "lora,causal,full", "--model", "llama-1b", "--task", "train,generate",
            "--provider", "fastpeft,eager,addmm,compile,peft,concat,sdpa,full"]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert run.main(argv) == 0
    return out, harness.read_records([out]), stdout.getvalue()


def test_smoke_run_says_what_cpu_numbers_are(smoke):
    _, _, stdout = smoke
    assert "fastpeft runs its reference path" in stdout and "not its CUDA kernels" in stdout
    assert "adapter | lora | full" in stdout and "prefix | causal | forward" in stdout
    assert "e2e | llama-1b | train" in stdout


def test_unknown_filter_names_are_refused():
    with pytest.raises(SystemExit, match="unknown method"):
        run.parse_args(["--method", "lora,houlsbee"])
    with pytest.raises(SystemExit, match="unknown subject"):
        run.parse_args(["adapters"])


def test_smoke_run_writes_one_file_per_subject(smoke):
    out, records, _ = smoke
    assert sorted(p.name.split("-")[0] for p in out.glob("*.jsonl")) == ["adapter", "ceiling", "e2e", "prefix"]
    assert len({r["run_id"] for r in records}) == 1
    for record in records:
        assert record["schema"] == harness.SCHEMA_VERSION
        _check_env(record)


def test_smoke_ceilings(smoke):
    _, records, _ = smoke
    ceilings = {r["case"]: r for r in records if r["subject"] == "ceiling"}
    assert set(ceilings) == {"copy", "matmul"}
    _check_timing(ceilings["copy"])
    copy, matmul = ceilings["copy"], ceilings["matmul"]
    assert copy["gbps"] == pytest.approx(2 * copy["shape"]["bytes"] / copy["ms"]["p50"] / 1e6)
    assert matmul["tflops"] == pytest.approx(2 * matmul["shape"]["n"] ** 3 / matmul["ms"]["p50"] / 1e9)


@pytest.mark.parametrize("module", [micro_adapter, micro_prefix], ids=["adapter", "prefix"])
def test_smoke_micro_records(smoke, module):
    _, records, _ = smoke
    mine = [r for r in records if r["subject"] == module.SUBJECT]
    methods = {"adapter": ("lora",), "prefix": ("causal",)}[module.SUBJECT]
    expected = {(c["case"], c["method"], p, mode) for c in module.cases(quick=True) if c["method"] in methods
                for p in module.providers(c["method"]) for mode in ("forward", "backward", "full")}
    assert {(r["case"], r["method"], r["provider"], r["mode"]) for r in mine} == expected
    fastpeft = {(r["case"], r["method"], r["mode"]): r["ms"]["p50"] for r in mine if r["provider"] == "fastpeft"}
    for r in mine:
        assert r["status"] == "ok", (r["provider"], r["case"], r.get("reason"))
        _check_timing(r)
        assert r["dtype"] == "float32" and isinstance(r["shape"], dict)
        assert r["rotation"] >= 1 and r["peak_memory_mb"] is None  # no allocator statistics on the CPU
        assert r["ratio_to_fastpeft"] == pytest.approx(r["ms"]["p50"] / fastpeft[(r["case"], r["method"], r["mode"])])
        assert r["bytes"] > 0 and r["flops"] > 0
        assert r["gbps"] == pytest.approx(r["bytes"] / r["ms"]["p50"] / 1e6)
        assert r["frac_copy_bw"] == pytest.approx(r["gbps"] / r["ceilings"]["copy_gbps"])
        assert r["frac_matmul"] == pytest.approx(r["tflops"] / r["ceilings"]["matmul_tflops"])
        if r["provider"] == "fastpeft":
            assert r["kernels"] is False  # the CPU runs the reference path


def test_smoke_e2e_records(smoke):
    _, records, _ = smoke
    mine = [r for r in records if r["subject"] == "e2e"]
    assert {(r["method"], r["provider"], r["task"]) for r in mine} == {
        (m, p, t) for m, providers in (("lora", ("fastpeft", "peft")), ("full", ("full",)))
        for p in providers for t in ("train", "generate")
    }
    for r in mine:
        assert r["status"] == "ok", (r["provider"], r["method"], r.get("reason"))
        _check_timing(r)
        assert r["tokens_per_s"] > 0 and 0 < r["trainable_params"] <= r["total_params"]
        if r["task"] == "train":
            assert math.isfinite(r["final_loss"])
        else:
            assert r["generated_tokens"] == r["shape"]["gen_new"]
    fastpeft = {(r["method"], r["task"]): r["ms"]["p50"] for r in mine if r["provider"] == "fastpeft"}
    for r in mine:
        if r["method"] == "full":  # no fastpeft record to compare with
            assert r["ratio_to_fastpeft"] is None
        else:
            assert r["ratio_to_fastpeft"] == pytest.approx(r["ms"]["p50"] / fastpeft[(r["method"], r["task"])])


def test_smoke_plots(smoke, tmp_path):
    out, _, _ = smoke
    written = plot.plot([out], tmp_path)
    names = {p.name for p in written}
    assert {"adapter-lora-forward.png", "adapter-lora-full.png", "prefix-causal-backward.png",
            "e2e-llama-1b-train.png"} <= names
    for path in written:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_method_sizes_follow_fastpeft_presets(monkeypatch):
    """Every library gets the sizes `fastpeft.apply(model, name)` builds, read from fastpeft's preset."""
    from dataclasses import dataclass

    import fastpeft
    from benchmarks import e2e_providers

    @dataclass
    class AdapterConfig:
        r: int
        activation: str
        scale: object

    @dataclass
    class PrefixConfig:
        length: int
        reparam_dim: object

    @dataclass
    class UnifiedConfig:
        attn: object = None
        ffn: object = None
        train_layernorm: bool = False

    presets = {"mam": UnifiedConfig(attn=PrefixConfig(16, None), ffn=AdapterConfig(32, "silu", "learned"))}
    monkeypatch.setattr(fastpeft, "get_config", lambda name: presets[name], raising=False)
    spec = e2e_providers.method_spec("mam")
    assert (spec.r, spec.activation, spec.scale, spec.prefix, spec.reparam) == (32, "silu", "learned", 16, 0)
    assert e2e_providers.method_spec("full") == e2e_providers.MethodSpec()
