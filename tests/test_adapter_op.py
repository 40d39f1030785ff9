"""fastpeft.adapter against an independent float64 formula, with gradients, custom-op checks and error paths."""

from __future__ import annotations

import pytest
import torch

import fastpeft
from helpers import activation64 as act64, assert_error_bounded, max_error, randn

ACTIVATIONS = ["identity", "relu", "gelu", "gelu_tanh", "silu", "tanh"]


def formula64(x, h, w_down, w_up, b_down, b_up, scale, activation):
    """h + s * (act(x w_down^T + b_down) w_up^T + b_up), in float64 with einsum."""
    x, h, w_down, w_up = (t.double() for t in (x, h, w_down, w_up))
    z = torch.einsum("...i,ri->...r", x, w_down)
    if b_down is not None:
        z = z + b_down.double()
    up = torch.einsum("...r,or->...o", act64(z, activation), w_up)
    if b_up is not None:
        up = up + b_up.double()
    s = scale.double().reshape(()) if isinstance(scale, torch.Tensor) else scale
    return h + s * up


def make_inputs(n=(3, 5), d_in=16, d_out=12, r=4, dtype=torch.float64, bias=True, grad=False):
    return dict(
        x=randn(*n, d_in, dtype=dtype, requires_grad=grad),
        h=randn(*n, d_out, dtype=dtype, requires_grad=grad),
        w_down=randn(r, d_in, dtype=dtype, requires_grad=grad, scale=0.3),
        w_up=randn(d_out, r, dtype=dtype, requires_grad=grad, scale=0.3),
        b_down=randn(r, dtype=dtype, requires_grad=grad) if bias else None,
        b_up=randn(d_out, dtype=dtype, requires_grad=grad) if bias else None,
    )


# ------------------------------------------------------------------------------------------------ values


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("bias", [True, False])
def test_matches_formula(activation, bias):
    args = make_inputs(bias=bias)
    y = fastpeft.adapter(**args, scale=0.75, activation=activation)
    expected = formula64(**args, scale=0.75, activation=activation)
    assert y.shape == args["h"].shape
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("scale", [2.0, 4, "0-d", "1-element"])
def test_scale_forms(scale):
    args = make_inputs()
    if scale == "0-d":
        scale = torch.tensor(-1.5, dtype=torch.float64)
    elif scale == "1-element":
        scale = torch.tensor([0.25], dtype=torch.float32)
    y = fastpeft.adapter(**args, scale=scale, activation="relu")
    torch.testing.assert_close(y, formula64(**args, scale=scale, activation="relu"), rtol=1e-6, atol=1e-6)


def test_sequential_matches_formula():
    x = randn(4, 7, 16)
    args = make_inputs(d_in=16, d_out=16)
    y = fastpeft.adapter(x, x, args["w_down"], args["w_up"], args["b_down"], args["b_up"], 3.0, "gelu")
    expected = formula64(x, x, args["w_down"], args["w_up"], args["b_down"], args["b_up"], 3.0, "gelu")
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)


def test_one_dimensional_input_and_non_contiguous():
    args = make_inputs(n=(6,), d_in=16, d_out=16)
    x_t = randn(16, 6).t()  # non-contiguous [6, 16]
    h_slice = randn(6, 32)[:, ::2]  # non-contiguous [6, 16]
    assert not x_t.is_contiguous() and not h_slice.is_contiguous()
    y = fastpeft.adapter(x_t, h_slice, args["w_down"], args["w_up"], scale=0.5, activation="tanh")
    torch.testing.assert_close(y, formula64(x_t, h_slice, args["w_down"], args["w_up"], None, None, 0.5, "tanh"))
    x1, h1 = randn(16), randn(16)
    y1 = fastpeft.adapter(x1, h1, args["w_down"], args["w_up"], activation="silu")
    assert y1.shape == (16,)
    torch.testing.assert_close(y1, formula64(x1, h1, args["w_down"], args["w_up"], None, None, 1.0, "silu"))


def test_empty_batch():
    args = make_inputs(n=(0,), grad=True)
    y = fastpeft.adapter(**args, scale=2.0, activation="gelu")
    assert y.shape == (0, 12)
    y.sum().backward()
    assert torch.equal(args["w_down"].grad, torch.zeros_like(args["w_down"]))
    assert torch.equal(args["w_up"].grad, torch.zeros_like(args["w_up"]))
    assert args["x"].grad.shape == (0, 16)


# ------------------------------------------------------------------------------------------------ gradients


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradcheck_all_inputs_with_learned_scale(activation):
    args = make_inputs(n=(2, 3), d_in=6, d_out=5, r=3, grad=True)
    scale = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
    names = list(args)

    def fn(*tensors):
        kwargs = dict(zip(names, tensors[:-1]))
        return fastpeft.adapter(**kwargs, scale=tensors[-1], activation=activation)

    assert torch.autograd.gradcheck(fn, (*args.values(), scale))


@pytest.mark.parametrize("activation", ["relu", "gelu", "identity"])
def test_gradcheck_sequential(activation):
    x = randn(3, 6, requires_grad=True)
    w_down, w_up = randn(2, 6, requires_grad=True), randn(6, 2, requires_grad=True)
    b_down, b_up = randn(2, requires_grad=True), randn(6, requires_grad=True)
    scale = torch.tensor([1.7], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda *t: fastpeft.adapter(t[0], t[0], *t[1:5], scale=t[5], activation=activation),
        (x, w_down, w_up, b_down, b_up, scale),
    )


def test_sequential_gradients_match_formula_autograd():
    """x is h: dx must include both uses (residual and adapter input)."""
    x = randn(5, 8, requires_grad=True)
    args = make_inputs(d_in=8, d_out=8, grad=True)
    weights = [args[k] for k in ("w_down", "w_up", "b_down", "b_up")]
    dy = randn(5, 8)
    y = fastpeft.adapter(x, x, *weights, scale=2.0, activation="silu")
    grads = torch.autograd.grad(y, [x, *weights], dy)
    x_ref = x.detach().clone().requires_grad_(True)
    w_ref = [w.detach().clone().requires_grad_(True) for w in weights]
    y_ref = formula64(x_ref, x_ref, *w_ref, 2.0, "silu")
    expected = torch.autograd.grad(y_ref, [x_ref, *w_ref], dy)
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)


def test_only_needed_gradients_are_computed():
    args = make_inputs()
    args["w_up"].requires_grad_(True)
    y = fastpeft.adapter(**args, scale=1.0, activation="relu")
    y.sum().backward()
    assert args["w_up"].grad is not None
    assert all(args[k].grad is None for k in ("x", "h", "w_down", "b_down", "b_up"))


def test_saves_nothing_of_size_n_by_d_beyond_inputs():
    """Backward keeps x and the weights (the caller's own tensors) and at most the [N, r] pre-activation."""
    n, d, r = 64, 32, 4
    args = make_inputs(n=(n,), d_in=d, d_out=d, r=r, grad=True)
    inputs = {t.untyped_storage().data_ptr() for t in args.values() if t is not None}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fastpeft.adapter(**args, scale=torch.tensor(2.0, dtype=torch.float64, requires_grad=True), activation="gelu")
    new = [t for t in saved if t.untyped_storage().data_ptr() not in inputs]
    assert saved, "nothing was saved for backward"
    assert all(t.numel() <= n * r for t in new), [tuple(t.shape) for t in new]


# ------------------------------------------------------------------------------------------------ custom op


def _op_samples():
    yield make_inputs(n=(5,), grad=True) | {"scale_tensor": None, "scale": 2.0, "activation": "gelu"}
    no_bias = make_inputs(n=(5,), bias=False, grad=True)
    yield no_bias | {"scale_tensor": randn((), requires_grad=True), "scale": 1.0, "activation": "identity"}
    seq = make_inputs(n=(4,), d_in=12, d_out=12, grad=True)
    yield seq | {"h": None, "scale_tensor": None, "scale": 0.5, "activation": "silu"}


@pytest.mark.parametrize("sample", list(_op_samples()), ids=["bias", "learned-scale", "sequential"])
def test_opcheck_forward(sample):
    torch.library.opcheck(torch.ops.fastpeft.adapter_fwd.default, tuple(sample.values()))


def test_opcheck_backward():
    args = make_inputs(n=(5,))
    z = randn(5, 4)
    needs = [True, True, True, True, True, True]
    sample = (randn(5, 12), args["x"], args["w_down"], args["w_up"], args["b_up"], z, randn(()), 1.5, "tanh", False, needs)
    torch.library.opcheck(torch.ops.fastpeft.adapter_bwd.default, sample)
    partial = list(sample)
    partial[-1] = [False, True, False, True, False, False]
    torch.library.opcheck(torch.ops.fastpeft.adapter_bwd.default, tuple(partial))


@pytest.mark.parametrize("sequential", [False, True])
def test_torch_compile_fullgraph(sequential):
    args = make_inputs(n=(4, 3), d_in=16, d_out=16, dtype=torch.float32, grad=True)
    scale = torch.tensor(0.5, requires_grad=True)

    def fn(x, h, w_down, w_up, b_down, b_up, scale):
        return fastpeft.adapter(x, x if sequential else h, w_down, w_up, b_down, b_up, scale, "gelu").square().sum()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    loss = compiled(*args.values(), scale)
    grads = torch.autograd.grad(loss, [*args.values(), scale], allow_unused=True)
    loss_ref = fn(*args.values(), scale)
    grads_ref = torch.autograd.grad(loss_ref, [*args.values(), scale], allow_unused=True)
    torch.testing.assert_close(loss, loss_ref)
    for g, e in zip(grads, grads_ref):
        if e is None:
            assert g is None
        else:
            torch.testing.assert_close(g, e)


def test_torch_compile_inductor():
    args = make_inputs(n=(8,), dtype=torch.float32)
    compiled = torch.compile(lambda *a: fastpeft.adapter(*a, scale=2.0, activation="relu") * 2, fullgraph=True)
    torch.testing.assert_close(compiled(*args.values()), fastpeft.adapter(**args, scale=2.0, activation="relu") * 2)


# ------------------------------------------------------------------------------------------------ precision


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("activation", ["relu", "gelu", "identity"])
def test_low_precision_error_bounded_by_eager(dtype, activation):
    args64 = make_inputs(n=(64,), d_in=64, d_out=48, r=16)
    args = {k: v.to(dtype) for k, v in args64.items()}
    truth = formula64(**args, scale=4.0, activation=activation)  # float64 math on the rounded inputs
    z = torch.nn.functional.linear(args["x"], args["w_down"], args["b_down"])
    a = {"identity": z, "relu": torch.relu(z), "gelu": torch.nn.functional.gelu(z)}[activation]
    eager = args["h"] + 4.0 * torch.nn.functional.linear(a, args["w_up"], args["b_up"])
    y = fastpeft.adapter(**args, scale=4.0, activation=activation)
    assert y.dtype == dtype
    assert_error_bounded(y, eager, truth, factor=2.0)


def test_autocast_casts_like_linear():
    args = make_inputs(n=(8,), dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fastpeft.adapter(**args, scale=1.0, activation="relu")
    assert y.dtype == torch.bfloat16
    expected = fastpeft.adapter(**{k: v.bfloat16() for k, v in args.items()}, scale=1.0, activation="relu")
    torch.testing.assert_close(y, expected)


# ------------------------------------------------------------------------------------------------ errors


def _call(**overrides):
    args = make_inputs() | {"scale": 1.0, "activation": "relu"}
    args.update(overrides)
    return fastpeft.adapter(**args)


@pytest.mark.parametrize(
    "overrides, error, words",
    [
        ({"w_down": randn(4, 16, dtype=torch.float32)}, TypeError, ["'w_down'", "torch.float64", "torch.float32"]),
        ({"x": randn(3, 5, 16).int()}, TypeError, ["'x'", "torch.int32"]),
        ({"h": randn(3, 5, 12, device="meta")}, ValueError, ["'h'", "device", "meta"]),
        ({"w_down": randn(4, 15)}, ValueError, ["'w_down'", "[r, d_in]", "(4, 15)"]),
        ({"w_up": randn(12, 5)}, ValueError, ["'w_up'", "[d_out, r]", "(12, 5)"]),
        ({"b_down": randn(5)}, ValueError, ["'b_down'", "[r]"]),
        ({"b_up": randn(11)}, ValueError, ["'b_up'", "[d_out]"]),
        ({"h": randn(3, 4, 12)}, ValueError, ["'h'", "leading dims", "(3, 5)"]),
        ({"w_down": randn(4, 16, 1)}, ValueError, ["'w_down'", "2-D"]),
        ({"activation": "swish"}, ValueError, ["'activation'", "'swish'", "gelu_tanh"]),
        ({"scale": "4"}, TypeError, ["'scale'", "str"]),
        ({"scale": True}, TypeError, ["'scale'", "bool"]),
        ({"scale": randn(2)}, ValueError, ["'scale'", "1-element", "(2,)"]),
        ({"scale": torch.tensor(2)}, TypeError, ["'scale'", "floating"]),
        ({"x": [[1.0]]}, TypeError, ["'x'", "list"]),
    ],
)
def test_bad_arguments_give_clear_errors(overrides, error, words):
    with pytest.raises(error) as info:
        _call(**overrides)
    message = str(info.value)
    assert message.startswith("fastpeft.adapter:"), message
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


def test_meta_tensors_give_shapes_without_computing():
    """Both ops run on the meta device (shape inference, parameter counting on models built without weights)."""
    args = {k: v.to("meta") if v is not None else None for k, v in make_inputs().items()}
    y = fastpeft.adapter(**args, scale=2.0, activation="gelu")
    assert y.device.type == "meta" and y.shape == (3, 5, 12)
    q, k = torch.empty(2, 4, 5, 8, device="meta"), torch.empty(2, 2, 7, 8, device="meta")
    prefix = torch.empty(2, 3, 8, device="meta")
    out = fastpeft.prefix_attention(q, k, k, prefix, prefix, causal=True)
    assert out.device.type == "meta" and out.shape == (2, 4, 5, 8)
