"""Edge cases of :func:`hdgsa_rmsnorm.rms_norm` found by differential testing against float64:
the prenorm backward of a low-precision ``h`` (its gradient is that of the float32 ``h`` the
forward normalized, also where the rounded ``h`` overflows), mixed dtypes of activations,
residual and weight, ``eps`` of 0 and subnormal, and autocast regions of either half dtype."""

from __future__ import annotations

import itertools

import pytest
import torch

from hdgsa_core import runnable_backends
from hdgsa_core.testing import DEFAULT_TOLERANCE, assert_matches_reference, make_tensor
from hdgsa_rmsnorm import rms_norm, rms_norm_reference

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DEVICE_BACKENDS = [
    pytest.param(device, backend, id=f"{device}-{backend}")
    for device in DEVICES
    for backend in runnable_backends(torch.device(device))
]
TRITON_DEVICES = [device for device in DEVICES if "triton" in runnable_backends(torch.device(device))]
FLOATS = (torch.float32, torch.float16, torch.bfloat16)
HALF_DTYPES = (torch.float16, torch.bfloat16)
SUBNORMAL_EPS = 1e-40


def _name(dtype):
    return str(dtype).removeprefix("torch.") if dtype is not None else "none"


def _run(backend, x, w, r, eps, prenorm, residual_in_fp32, upstream):
    """Outputs and the gradients of ``sum(out * upstream)`` for x, w, r (None where absent)."""
    if backend is None:  # the float64 reference
        x, w, r = (None if t is None else t.detach().double().requires_grad_(True) for t in (x, w, r))
        outs = rms_norm_reference(x, w, eps, r, prenorm, residual_in_fp32)
    else:
        outs = rms_norm(x, w, eps, r, prenorm=prenorm, residual_in_fp32=residual_in_fp32, backend=backend)
    outs = outs if isinstance(outs, tuple) else (outs,)
    leaves = [t for t in (x, w, r) if t is not None]
    grads = iter(
        torch.autograd.grad(outs, leaves, [u.to(o.dtype) for o, u in zip(outs, upstream, strict=False)])
    )
    return [o.detach() for o in outs], [None if t is None else next(grads) for t in (x, w, r)]


def _check(backend, x, w, r, *, eps=1e-6, prenorm=True, residual_in_fp32=False, floor=None):
    """Outputs and every gradient against float64, each within the tolerance of its own dtype
    (``floor`` overrides it for float32 gradients) or twice the error of the PyTorch backend."""
    out_dtypes = [x.dtype, torch.float32 if residual_in_fp32 else x.dtype][: 2 if prenorm else 1]
    upstream = [
        make_tensor(*x.shape, dtype=d, device=x.device, seed=20 + i) for i, d in enumerate(out_dtypes)
    ]
    outs, grads = _run(backend, x, w, r, eps, prenorm, residual_in_fp32, upstream)
    outs64, grads64 = _run(None, x, w, r, eps, prenorm, residual_in_fp32, upstream)
    outs_lp, grads_lp = _run("torch", x, w, r, eps, prenorm, residual_in_fp32, upstream)
    for name, out, out64, out_lp in zip(("y", "h"), outs, outs64, outs_lp, strict=False):
        assert_matches_reference(f"{backend} {name}", out, out64, out_lp)
    for name, grad, grad64, grad_lp, source in zip(
        ("dx", "dweight", "dresidual"), grads, grads64, grads_lp, (x, w, r), strict=False
    ):
        if source is None:
            continue
        assert grad.dtype == source.dtype, name
        tol = DEFAULT_TOLERANCE[source.dtype]
        if floor is not None and source.dtype == torch.float32:
            tol = floor
        assert_matches_reference(f"{backend} {name}", grad, grad64, grad_lp, tol=tol)


def _leaf(*shape, dtype, device, seed, **kwargs):
    return make_tensor(*shape, dtype=dtype, device=device, seed=seed, requires_grad=True, **kwargs)


@pytest.mark.parametrize(("device", "backend"), DEVICE_BACKENDS)
def test_prenorm_weight_gradient_is_float32_exact(device, backend):
    """bf16 activations, a float32 residual stream and weight (mixed-precision training),
    ``prenorm=True`` with ``h`` returned in bf16: ``dweight`` and ``dresidual`` are the
    gradients of the float32 ``h`` the forward normalized (the backward read the bf16 ``h``:
    3e-3 relative error against float64, where float32 math gives 1e-7)."""
    x = _leaf(8, 1024, dtype=torch.bfloat16, device=device, seed=1)
    r = _leaf(8, 1024, dtype=torch.float32, device=device, seed=2)
    w = _leaf(1024, dtype=torch.float32, device=device, seed=3)
    _check(backend, x, w, r, floor=1e-6)
    # The same with a bf16 residual: dweight (float32) stays float32-exact.
    _check(backend, x, w, r.detach().bfloat16().requires_grad_(True), floor=None)


@pytest.mark.parametrize(("device", "backend"), DEVICE_BACKENDS)
@pytest.mark.parametrize("use_h", [False, True], ids=["y-only", "y-and-h"])
def test_prenorm_h_overflowing_x_dtype_gives_finite_gradients(device, backend, use_h):
    """``h = x + residual`` overflows float16 (returned as inf) while ``y`` (normalized in
    float32) is finite: the gradients of ``y`` are finite and equal to the PyTorch backend's."""
    x = torch.ones(1, 4, dtype=torch.float16, device=device, requires_grad=True)
    r = torch.tensor([[1e5, -2e5, 3e5, 5.0]], device=device, requires_grad=True)
    w = torch.tensor([0.5, 1.0, 1.5, 2.0], device=device, requires_grad=True)
    dy = torch.tensor([[1.0, -2.0, 0.5, 3.0]], dtype=torch.float16, device=device)
    results = {}
    for name in ("torch", backend):
        y, h = rms_norm(x, w, 1e-6, r, prenorm=True, backend=name)
        assert torch.isfinite(y).all()
        assert torch.isinf(h).any()
        if use_h:  # a finite gradient into h's finite entries only
            dh = torch.where(torch.isfinite(h), torch.ones_like(h), torch.zeros_like(h))
            grads = torch.autograd.grad((y, h), (x, w, r), (dy, dh))
        else:
            grads = torch.autograd.grad(y, (x, w, r), dy)
        results[name] = (y.detach(), *grads)
    for name, ours, theirs in zip(
        ("y", "dx", "dweight", "dresidual"), results[backend], results["torch"], strict=False
    ):
        assert torch.isfinite(ours).all(), f"{name} not finite"
        torch.testing.assert_close(ours, theirs, rtol=2e-3 if ours.dtype == torch.float16 else 1e-5, atol=0)


MIXED = [
    pytest.param(x_dtype, w_dtype, r_dtype, id=f"x-{_name(x_dtype)}-w-{_name(w_dtype)}-r-{_name(r_dtype)}")
    for x_dtype, w_dtype, r_dtype in itertools.product(FLOATS, (*FLOATS, None), (*FLOATS, None))
    if len({x_dtype, w_dtype or x_dtype, r_dtype or x_dtype}) > 1 or x_dtype == torch.float32
]


@pytest.mark.parametrize(("device", "backend"), DEVICE_BACKENDS)
@pytest.mark.parametrize(("x_dtype", "w_dtype", "r_dtype"), MIXED)
@pytest.mark.parametrize("residual_in_fp32", [False, True], ids=["h-x-dtype", "h-fp32"])
def test_mixed_dtypes_prenorm(device, backend, x_dtype, w_dtype, r_dtype, residual_in_fp32):
    """Every mix of activation, weight and residual dtypes: each gradient is as accurate as its
    own dtype allows (a float32 weight or residual gets a float32-exact gradient)."""
    x = _leaf(3, 130, dtype=x_dtype, device=device, seed=4)
    w = None if w_dtype is None else _leaf(130, dtype=w_dtype, device=device, seed=5, scale=0.5, offset=1.0)
    r = None if r_dtype is None else _leaf(3, 130, dtype=r_dtype, device=device, seed=6)
    _check(backend, x, w, r, residual_in_fp32=residual_in_fp32)


@pytest.mark.parametrize(("device", "backend"), DEVICE_BACKENDS)
@pytest.mark.parametrize("eps", [0.0, SUBNORMAL_EPS])
@pytest.mark.parametrize("hidden", [3, 7, 130, 1000])
@pytest.mark.parametrize("prenorm", [False, True])
def test_tiny_eps_non_power_of_two(device, backend, eps, hidden, prenorm):
    """eps = 0 and a subnormal eps on rows that are not a power of two long: padding must not
    enter the mean square (a nonzero row has a positive one, so everything is finite)."""
    x = _leaf(3, hidden, dtype=torch.float32, device=device, seed=7)
    w = _leaf(hidden, dtype=torch.float32, device=device, seed=8, scale=0.5, offset=1.0)
    r = _leaf(3, hidden, dtype=torch.float32, device=device, seed=9)
    _check(backend, x, w, r, eps=eps, prenorm=prenorm)
    _check(backend, x.detach().bfloat16().requires_grad_(True), w, None, eps=eps, prenorm=prenorm)


@pytest.mark.parametrize(("device", "backend"), DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", FLOATS, ids=_name)
@pytest.mark.parametrize("autocast_dtype", HALF_DTYPES, ids=_name)
@pytest.mark.parametrize("residual_dtype", [None, torch.float32], ids=["r-like-x", "r-fp32"])
def test_autocast_changes_nothing(device, backend, dtype, autocast_dtype, residual_dtype):
    """Inside an autocast region of either half dtype (also the other one than the inputs'),
    outputs and gradients are bitwise those computed outside it."""
    x = _leaf(5, 70, dtype=dtype, device=device, seed=10)
    w = _leaf(70, dtype=torch.float32, device=device, seed=11)
    r = _leaf(5, 70, dtype=residual_dtype or dtype, device=device, seed=12)
    dy = make_tensor(5, 70, dtype=dtype, device=device, seed=13)
    dh = make_tensor(5, 70, dtype=dtype, device=device, seed=14)

    def run():
        y, h = rms_norm(x, w, 1e-6, r, prenorm=True, backend=backend)
        return (y, h, *torch.autograd.grad((y, h), (x, w, r), (dy, dh)))

    outside = run()
    with torch.autocast(device, dtype=autocast_dtype):
        inside = run()
    for name, a, b in zip(("y", "h", "dx", "dweight", "dresidual"), outside, inside, strict=True):
        assert a.dtype == b.dtype, name
        assert torch.equal(a, b), f"{name} changed under autocast({autocast_dtype})"


@pytest.mark.parametrize(("device", "backend"), DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=_name)
def test_weight_gradient_sums_rows_in_float32(device, backend, dtype):
    """``dweight`` sums over rows: in float32, then rounded once. In float16 the partial sum
    40000 + 40000 overflows where the total 40000 + 40000 - 40000 - 39000 fits. (``x`` of ones
    and ``eps = 0``: the normalized rows are exactly 1, so ``dweight`` is the column sum of
    ``dy``.)"""
    x = torch.ones(4, 2, dtype=dtype, device=device, requires_grad=True)
    w = torch.ones(2, dtype=dtype, device=device, requires_grad=True)
    column = torch.tensor([40000.0, 40000.0, -40000.0, -39000.0], device=device)
    dy = torch.stack([column, -column], dim=-1).to(dtype)
    (dw,) = torch.autograd.grad(rms_norm(x, w, 0.0, backend=backend), (w,), dy)
    assert torch.equal(dw, dy.double().sum(0).to(dtype))
