"""Edge cases of :func:`hdgsa_sinkhorn.sinkhorn_knopp` found by differential testing against
float64: ``eps = 0`` and subnormal ``eps`` with sizes that are not a power of two (the Triton
kernels pad the columns to one), low-precision inputs, and autocast regions of either half dtype."""

from __future__ import annotations

import pytest
import torch

from hdgsa_core import runnable_backends
from hdgsa_core.testing import assert_matches_reference, grads_of, make_tensor
from hdgsa_sinkhorn import sinkhorn_knopp, sinkhorn_knopp_reference

DEVICES = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
CASES = [
    pytest.param(device, backend, id=f"{device.type}-{backend}")
    for device in DEVICES
    for backend in runnable_backends(device)
]
TRITON_CASES = [case for case in CASES if case.values[1] == "triton"]
HALF_DTYPES = (torch.float16, torch.bfloat16)
SUBNORMAL_EPS = 1e-40  # below float32's smallest normal number (1.2e-38), still > 0


def _value_and_grad(logits, grad_output, num_iters, eps, backend):
    leaf = logits.detach().clone().requires_grad_(True)
    if backend is None:
        out = sinkhorn_knopp_reference(leaf.double(), num_iters, eps)
    else:
        out = sinkhorn_knopp(leaf, num_iters, eps, backend=backend)
    (grad,) = grads_of(out, [leaf], grad_output.to(out.dtype))
    return out.detach(), grad


def _check(logits, num_iters, eps, backend):
    grad_output = make_tensor(*logits.shape, dtype=logits.dtype, device=logits.device, seed=3)
    out, grad = _value_and_grad(logits, grad_output, num_iters, eps, backend)
    out64, grad64 = _value_and_grad(logits.double(), grad_output.double(), num_iters, eps, None)
    out_lp, grad_lp = _value_and_grad(logits, grad_output, num_iters, eps, "torch")
    assert torch.isfinite(out).all()
    assert torch.isfinite(grad).all()
    assert_matches_reference(f"P ({backend}, eps={eps})", out, out64, out_lp)
    assert_matches_reference(f"d logits ({backend}, eps={eps})", grad, grad64, grad_lp)


@pytest.mark.parametrize(("device", "backend"), TRITON_CASES)
@pytest.mark.parametrize("eps", [0.0, SUBNORMAL_EPS])
@pytest.mark.parametrize("num_iters", [1, 2])
def test_eps_zero_non_power_of_two_is_finite(device, backend, eps, num_iters):
    """A 3 x 3 matrix: the padded fourth column's sum (0 + eps) must not be divided by, nor its
    0 * inf = NaN reach the next row sum (it made the forward NaN from 2 iterations, the
    gradient from 1)."""
    torch.manual_seed(0)
    logits = torch.randn(3, 3, device=device)
    _check(logits, num_iters, eps, backend)


@pytest.mark.parametrize(("device", "backend"), CASES)
@pytest.mark.parametrize("eps", [0.0, SUBNORMAL_EPS])
@pytest.mark.parametrize("n", [1, 2, 3, 5, 6, 7, 12])
@pytest.mark.parametrize("num_iters", [1, 3, 20])
def test_tiny_eps_every_size(device, backend, eps, n, num_iters):
    logits = make_tensor(2, n, n, device=device, seed=10 * n + num_iters, scale=2.0)
    _check(logits, num_iters, eps, backend)


@pytest.mark.parametrize(("device", "backend"), CASES)
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("eps", [0.0, SUBNORMAL_EPS, 1e-8])
def test_tiny_eps_half_inputs(device, backend, dtype, eps):
    logits = make_tensor(3, 5, 5, device=device, dtype=dtype, seed=4)
    _check(logits, 20, eps, backend)


@pytest.mark.parametrize(("device", "backend"), CASES)
@pytest.mark.parametrize("dtype", [torch.float32, *HALF_DTYPES], ids=str)
@pytest.mark.parametrize("autocast_dtype", HALF_DTYPES, ids=str)
def test_autocast_changes_nothing(device, backend, dtype, autocast_dtype):
    """Inside an autocast region of either half dtype (also the other one than the inputs'),
    the output and the gradient are bitwise those computed outside it."""
    logits = make_tensor(2, 3, 5, 5, device=device, dtype=dtype, seed=5)
    grad_output = make_tensor(2, 3, 5, 5, device=device, dtype=dtype, seed=6)
    expected = _value_and_grad(logits, grad_output, 7, 1e-8, backend)
    with torch.autocast(device.type, dtype=autocast_dtype):
        got = _value_and_grad(logits, grad_output, 7, 1e-8, backend)
    for name, actual, reference in zip(("P", "d logits"), got, expected, strict=True):
        assert actual.dtype == reference.dtype, name
        assert torch.equal(actual, reference), f"{name} changed under autocast({autocast_dtype})"
