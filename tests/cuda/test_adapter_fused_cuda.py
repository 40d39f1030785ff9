"""The fused adapter kernels on a GPU (skipped without one): fastpeft.adapter and the kernel ops against float64.

Error bound: for the output and every gradient, max |fastpeft - truth| <= 2 x max |eager - truth| + one rounding of
the largest value (eps(dtype) x max |truth|), where truth is the float64 reference on the same (rounded) inputs and
eager is the reference path (plain PyTorch, what the eager chain computes) at the test's dtype. TF32 is off.
Outputs are poisoned before every kernel run: an element the kernels fail to write stays NaN and fails the bound.

Sanitizer subset, a few small shapes through every kernel and path (split K, unaligned rows, x is h, every dtype):

    compute-sanitizer --tool memcheck  python -m pytest -q tests/cuda/test_adapter_fused_cuda.py -k sanitizer
    compute-sanitizer --tool racecheck python -m pytest -q tests/cuda/test_adapter_fused_cuda.py -k sanitizer
    compute-sanitizer --tool synccheck python -m pytest -q tests/cuda/test_adapter_fused_cuda.py -k sanitizer
    compute-sanitizer --tool initcheck python -m pytest -q tests/cuda/test_adapter_fused_cuda.py -k sanitizer

(`FASTPEFT_SKIP_POISON=1` skips the 256 MB poisoning allocations, which only slow the sanitizers down.)
"""

from __future__ import annotations

import contextlib
import os
import warnings

import pytest
import torch

import fastpeft
from adapter_kernel_contract import EmulatedKernels
from fastpeft._notice import FastPeftFallbackWarning
from fastpeft.ops import _adapter_cuda as cuda_path
from helpers import assert_error_bounded, requires_kernels

pytestmark = requires_kernels

ACTIVATIONS = ["identity", "relu", "gelu", "gelu_tanh", "silu", "tanh"]
KERNEL_DTYPES = [torch.float16, torch.bfloat16, torch.float32]
DTYPE_IDS = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


@pytest.fixture(autouse=True)
def _tf32_off_and_kernel_warnings_are_errors():
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    with warnings.catch_warnings():
        warnings.simplefilter("error", FastPeftFallbackWarning)  # a kernel dtype must never fall back
        yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def poison_allocator(device="cuda"):
    """Fill freed cached memory with NaN so that the next allocations start out as NaN, in both pools of the caching
    allocator (blocks up to 1 MB come from 2 MB segments of the small pool, larger ones from the large pool)."""
    if os.environ.get("FASTPEFT_SKIP_POISON") == "1":
        return
    large = torch.full((64 * 2**20,), float("nan"), device=device)
    small = [torch.full((2**18,), float("nan"), device=device) for _ in range(64)]
    del large, small


# ------------------------------------------------------------------------------------------------ the public op


def _masters(n, d_in, d_out, r, bias, sequential, learned, seed=0):
    """float64 inputs on the GPU, scaled so that pre-activations are of order one."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).cuda()

    x = rand(n, d_in)
    return dict(
        x=x,
        h=None if sequential else rand(n, d_out),
        w_down=rand(r, d_in, scale=d_in**-0.5),
        w_up=rand(d_out, r, scale=r**-0.5),
        b_down=rand(r) if bias else None,
        b_up=rand(d_out) if bias else None,
        scale=rand((), scale=0.5) + 1.0 if learned else 2.0,
        dy=rand(n, d_out),
    )


def _run_adapter(masters, dtype, activation, *, kernels, compute_dtype=None, poison=False):
    """fastpeft.adapter and all its gradients for inputs rounded to `dtype`, computed in `compute_dtype`."""
    compute_dtype = compute_dtype or dtype
    leaves = {}
    for name in ("x", "h", "w_down", "w_up", "b_down", "b_up", "scale"):
        value = masters[name]
        if isinstance(value, torch.Tensor):
            leaves[name] = value.to(dtype).to(compute_dtype).requires_grad_(True)
    x = leaves["x"]
    h = leaves.get("h", x)  # sequential: x is h
    scale = leaves.get("scale", masters["scale"])
    dy = masters["dy"].to(dtype).to(compute_dtype)
    switch = contextlib.nullcontext() if kernels else fastpeft.disable_kernels()
    with switch:
        if poison:
            poison_allocator()
        y = fastpeft.adapter(x, h, leaves["w_down"], leaves["w_up"], leaves.get("b_down"), leaves.get("b_up"),
                             scale, activation)
        if poison:
            poison_allocator()
        grads = torch.autograd.grad(y, list(leaves.values()), dy)
    return {"y": y.detach(), **{f"d{name}": g for name, g in zip(leaves, grads)}}


def _error_floors(masters, dtype, activation, sequential, truth):
    """The `atol` of each output's bound: errors below it are no evidence against the kernels.

    Every output: one rounding of its largest element to dtype. Sums over the N rows with few elements (the
    learned scale's gradient is one number; db_down has r, db_up d_out) cannot be judged by comparing their largest
    error with eager's largest error: with one or a few numbers that is a coin toss. Their floor is the random-walk
    rounding error of their sum, 4 sigma: 4 (eps + 2^-24 sqrt(K)) sqrt(sum over n of t_n^2), where each term t_n
    carries one rounding to dtype plus float32 accumulation over its own K products.
    """
    eps = torch.finfo(dtype).eps
    floors = {name: eps * t.abs().max().item() if t.numel() else 0.0 for name, t in truth.items()}

    def f64(name):
        value = masters[name]
        return value.to(dtype).double() if isinstance(value, torch.Tensor) else value

    x, w_down, w_up, b_down, dy, s = (f64(k) for k in ("x", "w_down", "w_up", "b_down", "dy", "scale"))
    h = x if sequential else f64("h")
    z = torch.nn.functional.linear(x, w_down, b_down)
    up = (truth["y"] - h) / s  # act(z) w_up^T + b_up
    dz = s * dy.matmul(w_up) * fastpeft.reference.activation_derivative(z, activation)
    terms = {  # name: (the terms t_n of each element's sum over n, stacked on dim 0; K)
        "dscale": ((dy * up).reshape(-1, 1), w_up.shape[1] + 1),
        "db_down": (dz, dy.shape[1]),
        "db_up": (s * dy, 1),
    }
    for name, (t, k) in terms.items():
        if name in truth and (name == "dscale" or truth[name].numel() < 64) and t.numel():
            random_walk = t.pow(2).sum(0).sqrt().max().item()
            floors[name] = max(floors[name], 4 * (eps + 2.0**-24 * k**0.5) * random_walk)
    return floors


def check_adapter_case(n, d_in, d_out, r, activation, dtype, bias, sequential, learned, seed=0):
    if sequential:
        d_out = d_in
    masters = _masters(n, d_in, d_out, r, bias, sequential, learned, seed)
    truth = _run_adapter(masters, dtype, activation, kernels=False, compute_dtype=torch.float64)
    eager = _run_adapter(masters, dtype, activation, kernels=False)
    ours = _run_adapter(masters, dtype, activation, kernels=True, poison=True)
    assert ours.keys() == truth.keys()
    floors = _error_floors(masters, dtype, activation, sequential, truth)
    for name in truth:
        assert ours[name].dtype == eager[name].dtype and ours[name].shape == truth[name].shape, name
        assert_error_bounded(ours[name], eager[name], truth[name], factor=2.0, atol=floors[name], name=name)


@pytest.mark.parametrize("learned", [False, True], ids=["fixed-scale", "learned-scale"])
@pytest.mark.parametrize("sequential", [False, True], ids=["parallel", "x-is-h"])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_every_option_against_float64(activation, dtype, bias, sequential, learned):
    """Every activation, dtype, bias, insertion and scale form; N, d_in, d_out, r all leave partial tiles."""
    check_adapter_case(67, 96, 160, 24, activation, dtype, bias, sequential, learned)


SHAPES = [  # (d_in, d_out, r): the range is d in [64, 16384], r in [1, 1024]
    (64, 64, 1),
    (64, 192, 8),
    (768, 768, 16),
    (1024, 512, 64),
    (136, 4096, 100),  # r not a multiple of 8: element-by-element loads of r-wide rows
    (4096, 1024, 1024),
    (16384, 64, 8),  # K of the shrink split many ways at small N
    (72, 16384, 64),
    (100, 60, 3),  # below the range and not multiples of 8: every row unaligned
]


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("d_in, d_out, r", SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("n", [0, 1, 130, 2048])
def test_shapes_against_float64(n, d_in, d_out, r, dtype):
    check_adapter_case(n, d_in, d_out, r, "gelu", dtype, bias=True, sequential=False, learned=True, seed=n + r)


@pytest.mark.parametrize("d, r", [(64, 1), (4096, 64), (1000, 1024)])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=DTYPE_IDS.get)
def test_sequential_shapes_against_float64(d, r, dtype):
    check_adapter_case(300, d, d, r, "relu", dtype, bias=True, sequential=True, learned=False)


@pytest.mark.parametrize(
    "n, d_in, d_out, r, sequential",
    [(5, 40, 24, 3, False), (130, 72, 72, 70, True), (33, 520, 16, 9, False), (1, 64, 64, 16, True)],
    ids=["partial-tiles", "x-is-h-two-row-blocks", "split-k", "one-row"],
)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=DTYPE_IDS.get)
def test_sanitizer_small_shapes(n, d_in, d_out, r, sequential, dtype):
    """The subset to run under compute-sanitizer (module docstring): every kernel, both load paths, split K."""
    check_adapter_case(n, d_in, d_out, r, "silu", dtype, bias=True, sequential=sequential, learned=True)


# ------------------------------------------------------------------------------------------------ layouts, paths


def test_strided_unaligned_and_transposed_inputs_give_the_same_bits():
    """Row strides are read in place, unaligned rows take the element path, other layouts are copied: the same
    arithmetic in every case, so the same bits."""
    dtype, n, d, r = torch.bfloat16, 70, 96, 12
    m = _masters(n, d, d, r, True, False, True)
    base = {k: (v.to(dtype) if isinstance(v, torch.Tensor) else v) for k, v in m.items()}
    wide_x = torch.zeros(n, 2 * d + 1, dtype=dtype, device="cuda")
    wide_x[:, 1 : d + 1] = base["x"]
    variants = {
        "row-stride-unaligned": wide_x[:, 1 : d + 1],  # row stride 193 elements, base 2 bytes off: element path
        "row-stride": torch.cat([base["x"], base["x"]], 1)[:, :d],  # row stride 192: vector path, no copy
        "column-major": base["x"].t().contiguous().t(),  # inner stride n: copied
    }
    w_up_t = base["w_up"].t().contiguous().t()  # [d, r] with strides (1, d): copied
    expected = fastpeft.adapter(base["x"], base["h"], base["w_down"], base["w_up"], base["b_down"], base["b_up"],
                                base["scale"], "gelu")
    for name, x in variants.items():
        y = fastpeft.adapter(x, base["h"], base["w_down"], w_up_t, base["b_down"], base["b_up"], base["scale"],
                             "gelu")
        assert torch.equal(y, expected), name


def test_results_are_bitwise_reproducible():
    """No atomics: split-K partials and column sums are added in a fixed order."""
    m = _masters(40, 4096, 512, 64, True, False, True)  # few rows, long K: the shrink and grad_z split K
    assert cuda_path.skinny_splits(40, 64, 4096, torch.bfloat16, cuda_path._sm_count(0)) > 1
    first = _run_adapter(m, torch.bfloat16, "tanh", kernels=True)
    for _ in range(3):
        again = _run_adapter(m, torch.bfloat16, "tanh", kernels=True, poison=True)
        for name in first:
            assert torch.equal(first[name], again[name]), name


def test_the_fused_kernels_run():
    m = _masters(300, 256, 128, 32, True, False, False)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        _run_adapter(m, torch.float16, "relu", kernels=True)
        torch.cuda.synchronize()
    names = " ".join(event.name for event in prof.events())
    for kernel in ("skinny_gemm_kernel", "wide_gemm_kernel"):
        assert kernel in names, f"{kernel} did not run"


def test_float64_falls_back_to_the_reference_once():
    m = _masters(9, 32, 16, 4, True, False, True)
    with pytest.warns(FastPeftFallbackWarning, match="float64"):
        ours = _run_adapter(m, torch.float64, "gelu", kernels=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = _run_adapter(m, torch.float64, "gelu", kernels=True)  # once per process
    reference = _run_adapter(m, torch.float64, "gelu", kernels=False)
    for name in reference:
        assert torch.equal(ours[name], reference[name]) and torch.equal(again[name], reference[name]), name


# ------------------------------------------------------------------------------------------------ graphs, compile


def test_cuda_graph_replay_reads_new_inputs_and_scale():
    """Forward and backward ops captured in a CUDA graph: no host synchronisation, the learned scale is read on the
    device at every replay."""
    dtype, n, d, r = torch.bfloat16, 256, 512, 64
    m = _masters(n, d, d, r, True, False, True)
    t = {k: v.to(dtype) for k, v in m.items() if isinstance(v, torch.Tensor)}
    needs = [True] * 6

    def step():
        y, z = torch.ops.fastpeft.adapter_fwd(t["x"], t["h"], t["w_down"], t["w_up"], t["b_down"], t["b_up"],
                                              t["scale"], 1.0, "gelu")
        grads = torch.ops.fastpeft.adapter_bwd(t["dy"], t["x"], t["w_down"], t["w_up"], t["b_up"], z, t["scale"],
                                               1.0, "gelu", False, needs)
        return (y, *grads)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up outside the capture (cuBLAS workspaces, lazy initialisation)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()

    for trial in range(2):
        for name, value in t.items():
            value.copy_(torch.randn_like(value, dtype=torch.float32).to(dtype) * (0.1 if name == "w_down" else 1.0))
        t["scale"].fill_(0.25 + trial)
        graph.replay()
        expected = step()
        for got, want in zip(captured, expected):
            assert torch.equal(got, want)


@pytest.mark.parametrize("sequential", [False, True])
def test_torch_compile_fullgraph_matches_eager_kernels(sequential):
    m = _masters(64, 128, 128, 16, True, sequential, True)
    t = {k: v.float().requires_grad_(True) for k, v in m.items() if isinstance(v, torch.Tensor) and k != "dy"}

    def fn(x, h, w_down, w_up, b_down, b_up, scale):
        return fastpeft.adapter(x, x if h is None else h, w_down, w_up, b_down, b_up, scale, "silu")

    args = [t["x"], t.get("h"), t["w_down"], t["w_up"], t["b_down"], t["b_up"], t["scale"]]
    leaves = [a for a in args if a is not None]
    compiled = torch.compile(fn, fullgraph=True)
    y = compiled(*args)
    grads = torch.autograd.grad(y, leaves, m["dy"].float())
    y_ref = fn(*args)
    grads_ref = torch.autograd.grad(y_ref, leaves, m["dy"].float())
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    for g, e in zip(grads, grads_ref):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ the kernel ops


def _activation_rtol(dtype):
    """act(z) in float32 on the device against float64 in the contract, both rounded to dtype: at most one unit in
    the last place of dtype apart; float32 itself carries the libm functions' few-ulp error (erff, tanhf, expf)."""
    eps = torch.finfo(dtype).eps
    return 16 * eps if dtype == torch.float32 else eps


def _bound(ours, contract, magnitude, depth, dtype):
    """|ours - contract| <= one rounding to dtype + float32 accumulation over `depth` terms of size `magnitude`."""
    eps = torch.finfo(dtype).eps
    err = (ours.double() - contract.double()).abs()
    allowed = eps * contract.double().abs() + (depth + 4) * 2.0**-24 * magnitude + torch.finfo(dtype).tiny
    bad = ~(err <= allowed)  # NaN (an unwritten element) is bad
    assert not bad.any(), f"{int(bad.sum())} elements off, worst {err[bad].max().item():.3e}"


@pytest.mark.parametrize("splits", [1, 2, 7, 64])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=DTYPE_IDS.get)
def test_shrink_and_grad_z_ops_match_their_contract(dtype, splits):
    n, d, r = 150, 1000, 72  # 2 row blocks, 2 column blocks, K steps not a multiple of the split
    gen = torch.Generator().manual_seed(splits)
    x, dy = (torch.randn(n, d, generator=gen).to(dtype).cuda() for _ in range(2))
    w_down = (torch.randn(r, d, generator=gen) * d**-0.5).to(dtype).cuda()
    w_up = (torch.randn(d, r, generator=gen) * d**-0.5).to(dtype).cuda()
    b_down, z = torch.randn(r, generator=gen).to(dtype).cuda(), torch.randn(n, r, generator=gen).to(dtype).cuda()
    scale = torch.tensor(-0.75, device="cuda")
    contract = EmulatedKernels()

    poison_allocator()
    z_out, act = torch.ops.fastpeft_cuda.adapter_shrink(x, w_down, b_down, "gelu_tanh", splits)
    z_want, _ = contract.adapter_shrink(x, w_down, b_down, "gelu_tanh", splits)
    magnitude = x.double().abs().matmul(w_down.double().abs().t()) + b_down.double().abs()
    _bound(z_out, z_want, magnitude, d, dtype)
    _, act_want = contract.adapter_shrink(z_out, torch.eye(r, dtype=dtype, device="cuda"), None, "gelu_tanh", 1)
    tiny = torch.finfo(dtype).tiny  # half types: act near zero may be subnormal
    torch.testing.assert_close(act, act_want, rtol=_activation_rtol(dtype), atol=tiny)  # act of the rounded z

    poison_allocator()
    dz, act_z, colsum = torch.ops.fastpeft_cuda.adapter_grad_z(dy, w_up, z, scale, 1.0, "silu", splits, True, True)
    dz_want, act_z_want, colsum_want = contract.adapter_grad_z(dy, w_up, z, scale, 1.0, "silu", splits, True, True)
    deriv = fastpeft.reference.activation_derivative(z.double(), "silu").abs()
    _bound(dz, dz_want, 0.75 * deriv * dy.double().abs().matmul(w_up.double().abs()), d, dtype)
    torch.testing.assert_close(act_z, act_z_want, rtol=_activation_rtol(dtype), atol=tiny)
    _bound(colsum, colsum_want, dy.double().abs().sum(0), n, torch.float32)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=DTYPE_IDS.get)
def test_expand_and_grad_x_ops_match_their_contract(dtype):
    n, d, r = 130, 264, 70
    gen = torch.Generator().manual_seed(1)
    a, dz = (torch.randn(n, r, generator=gen).to(dtype).cuda() for _ in range(2))
    w_up = (torch.randn(d, r, generator=gen) * r**-0.5).to(dtype).cuda()
    w_down = (torch.randn(r, d, generator=gen) * r**-0.5).to(dtype).cuda()
    h, dy = (torch.randn(n, d, generator=gen).to(dtype).cuda() for _ in range(2))
    b_up = torch.randn(d, generator=gen).to(dtype).cuda()
    contract = EmulatedKernels()
    for residual, bias, scale_tensor in [(h, b_up, torch.tensor(1.5, device="cuda")), (None, None, None)]:
        poison_allocator()
        y = torch.ops.fastpeft_cuda.adapter_expand(a, w_up, residual, bias, scale_tensor, 3.0)
        want = contract.adapter_expand(a, w_up, residual, bias, scale_tensor, 3.0)
        s = 1.5 if scale_tensor is not None else 3.0
        magnitude = (0 if residual is None else h.double().abs()) + s * (
            a.double().abs().matmul(w_up.double().abs().t()) + (0 if bias is None else b_up.double().abs()))
        _bound(y, want, magnitude, r, dtype)
    for residual in (dy, None):
        poison_allocator()
        dx = torch.ops.fastpeft_cuda.adapter_grad_x(dz, w_down, residual)
        want = contract.adapter_grad_x(dz, w_down, residual)
        magnitude = dz.double().abs().matmul(w_down.double().abs()) + (0 if residual is None else dy.double().abs())
        _bound(dx, want, magnitude, r, dtype)


def test_ops_handle_empty_inputs():
    x = torch.randn(0, 64, device="cuda", dtype=torch.bfloat16)
    w_down, w_up = torch.randn(8, 64, device="cuda").bfloat16(), torch.randn(64, 8, device="cuda").bfloat16()
    z, act = torch.ops.fastpeft_cuda.adapter_shrink(x, w_down, None, "relu", 4)
    assert z.shape == act.shape == (0, 8)
    assert torch.ops.fastpeft_cuda.adapter_expand(act, w_up, x, None, None, 1.0).shape == (0, 64)
    dz, a, colsum = torch.ops.fastpeft_cuda.adapter_grad_z(x, w_up, z, None, 1.0, "relu", 1, True, True)
    assert dz.shape == a.shape == (0, 8) and torch.equal(colsum, torch.zeros(64, device="cuda"))
    assert torch.ops.fastpeft_cuda.adapter_grad_x(dz, w_down, x).shape == (0, 64)


@pytest.mark.parametrize(
    "call, words",
    [
        (lambda t: torch.ops.fastpeft_cuda.adapter_shrink(t["x"].double(), t["w_down"].double(), None, "relu", 1),
         ["'x'", "float64", "reference path"]),
        (lambda t: torch.ops.fastpeft_cuda.adapter_shrink(t["x"].cpu(), t["w_down"], None, "relu", 1),
         ["'x'", "CUDA"]),
        (lambda t: torch.ops.fastpeft_cuda.adapter_shrink(t["x"], t["w_down"][:, :8], None, "relu", 1),
         ["'w_down'", "d_in"]),
        (lambda t: torch.ops.fastpeft_cuda.adapter_shrink(t["x"], t["w_down"], t["b_up"], "relu", 1),
         ["'b_down'", "r"]),
        (lambda t: torch.ops.fastpeft_cuda.adapter_shrink(t["x"], t["w_down"].half(), None, "relu", 1),
         ["'w_down'", "must match"]),
        (lambda t: torch.ops.fastpeft_cuda.adapter_shrink(t["x"], t["w_down"], None, "swish", 1),
         ["'activation'", "'swish'"]),
        (lambda t: torch.ops.fastpeft_cuda.adapter_shrink(t["x"], t["w_down"], None, "relu", 0), ["'splits'"]),
        (lambda t: torch.ops.fastpeft_cuda.adapter_expand(t["a"], t["w_up"], t["x"][:, :8], None, None, 1.0),
         ["'residual'", "d_out"]),
        (lambda t: torch.ops.fastpeft_cuda.adapter_expand(t["a"], t["w_up"], None, None, t["two"], 1.0),
         ["'scale_tensor'", "one value"]),
        (lambda t: torch.ops.fastpeft_cuda.adapter_grad_z(t["x"], t["w_up"], t["a"][:3], None, 1.0, "relu", 1, False,
                                                          False), ["'z'", "N"]),
        (lambda t: torch.ops.fastpeft_cuda.adapter_grad_x(t["a"], t["w_down"], t["x"][:, :8]), ["'dy'", "d_in"]),
    ],
)
def test_ops_reject_bad_arguments_naming_them(call, words):
    t = dict(
        x=torch.randn(10, 64, device="cuda").bfloat16(),
        w_down=torch.randn(4, 64, device="cuda").bfloat16(),
        w_up=torch.randn(64, 4, device="cuda").bfloat16(),
        a=torch.randn(10, 4, device="cuda").bfloat16(),
        b_up=torch.randn(64, device="cuda").bfloat16(),
        two=torch.ones(2, device="cuda"),
    )
    with pytest.raises(RuntimeError) as info:
        call(t)
    for word in words:
        assert word in str(info.value), f"{word!r} not in {info.value}"
