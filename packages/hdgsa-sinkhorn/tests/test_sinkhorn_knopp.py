"""Tests for :func:`hdgsa_sinkhorn.sinkhorn_knopp`: values and gradients against float64, on every
backend that can run here (PyTorch; Triton on CUDA or under TRITON_INTERPRET=1)."""

from __future__ import annotations

import inspect

import pytest
import torch

from hdgsa_core import interpreter_enabled, runnable_backends
from hdgsa_core.testing import assert_close, assert_matches_reference, grads_of, make_tensor, strided_rows
from hdgsa_sinkhorn import sinkhorn_knopp, sinkhorn_knopp_reference

DEVICES = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
CASES = [
    pytest.param(device, backend, id=f"{device.type}-{backend}")
    for device in DEVICES
    for backend in runnable_backends(device)
]
# The interpreter runs Triton on numpy one op at a time: keep its batches tiny.
SMALL = interpreter_enabled()


def _run(logits: torch.Tensor, grad_output: torch.Tensor, num_iters: int, eps: float, backend: str):
    """Output and d(logits) of one backend (``backend=None``: the float64 reference)."""
    leaf = (
        logits.detach().clone().requires_grad_(True)
        if logits.is_contiguous()
        else logits.detach().requires_grad_(True)
    )
    if backend is None:
        out = sinkhorn_knopp_reference(leaf.to(torch.float64), num_iters, eps)
    else:
        out = sinkhorn_knopp(leaf, num_iters, eps, backend=backend)
    (grad,) = grads_of(out, [leaf], grad_output.to(out.dtype))
    return out.detach(), grad


def _check(logits: torch.Tensor, num_iters: int, backend: str, eps: float = 1e-8, seed: int = 1) -> None:
    grad_output = make_tensor(*logits.shape, dtype=logits.dtype, device=logits.device, seed=seed)
    out, grad = _run(logits, grad_output, num_iters, eps, backend)
    out64, grad64 = _run(logits.to(torch.float64), grad_output.to(torch.float64), num_iters, eps, None)
    out_lp, grad_lp = _run(logits, grad_output, num_iters, eps, "torch")
    assert out.shape == logits.shape
    assert out.dtype == logits.dtype
    assert grad.shape == logits.shape
    assert grad.dtype == logits.dtype
    assert_matches_reference(f"P ({backend})", out, out64, out_lp)
    assert_matches_reference(f"d logits ({backend})", grad, grad64, grad_lp)


@pytest.mark.parametrize(("device", "backend"), CASES)
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 8, 16, 32])
@pytest.mark.parametrize("num_iters", [0, 1, 20, 50])
def test_values_and_grads_vs_float64(device, backend, n, num_iters):
    batch = (3,) if SMALL and n >= 16 else (5,)
    logits = make_tensor(*batch, n, n, device=device, seed=n * 100 + num_iters, scale=2.0)
    _check(logits, num_iters, backend)


@pytest.mark.parametrize(("device", "backend"), CASES)
@pytest.mark.parametrize("shape", [(4, 4), (1, 1), (2, 3, 4, 4), (2, 1, 3, 5, 5), (7, 3, 3)], ids=str)
def test_batch_shapes(device, backend, shape):
    logits = make_tensor(*shape, device=device, seed=len(shape), scale=1.5)
    _check(logits, 20, backend)


@pytest.mark.parametrize(("device", "backend"), CASES)
@pytest.mark.parametrize("n", [3, 4, 8])
def test_non_contiguous(device, backend, n):
    base = make_tensor(6, n, n, device=device, seed=7)
    _check(base.transpose(-1, -2), 20, backend)  # columns are the contiguous axis
    _check(strided_rows(base, pad=3), 20, backend)  # padded rows
    _check(make_tensor(n, n, 6, device=device, seed=8).permute(2, 0, 1), 20, backend)  # batch innermost
    _check(make_tensor(12, n, n, device=device, seed=9)[::2], 20, backend)  # every other matrix
    _check(make_tensor(1, n, n, device=device, seed=10).expand(3, n, n), 20, backend)  # broadcast batch


@pytest.mark.parametrize(("device", "backend"), CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [4, 5])
def test_low_precision(device, backend, dtype, n):
    logits = make_tensor(2, 3, n, n, device=device, dtype=dtype, seed=11)
    _check(logits, 20, backend)


@pytest.mark.parametrize(("device", "backend"), CASES)
@pytest.mark.parametrize("eps", [0.0, 1e-9, 1e-8, 1e-3, 1.0, 10.0])
def test_eps(device, backend, eps):
    """Both sides of the Triton kernels' scaling-form range (eps in [1e-8, 1]) and its edges."""
    _check(make_tensor(4, 4, 4, device=device, seed=12), 10, backend, eps=eps)


@pytest.mark.parametrize(("device", "backend"), CASES)
@pytest.mark.parametrize("n", [2, 4, 7])
def test_doubly_stochastic_after_convergence(device, backend, n):
    logits = make_tensor(8, n, n, device=device, seed=13)
    probs = sinkhorn_knopp(logits, 50, backend=backend)
    ones = torch.ones(8, n, device=device)
    torch.testing.assert_close(probs.sum(-2), ones, atol=1e-5, rtol=0)  # last step: columns
    torch.testing.assert_close(probs.sum(-1), ones, atol=1e-3, rtol=0)
    assert (probs >= 0).all()


@pytest.mark.parametrize(("device", "backend"), CASES)
@pytest.mark.parametrize("n", [1, 4, 5, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extreme_logits_stay_finite(device, backend, n, dtype):
    signs = torch.randint(0, 2, (6, n, n), generator=torch.Generator().manual_seed(n)) * 2 - 1
    logits = (signs * 1e4).to(device=device, dtype=dtype)
    logits[0] = 1e4  # all equal: ties in the max
    logits[1, 0, 0] = -1e4
    logits = logits.requires_grad_(True)
    probs = sinkhorn_knopp(logits, 20, backend=backend)
    (grad,) = torch.autograd.grad(probs, logits, make_tensor(6, n, n, device=device, dtype=dtype, seed=3))
    assert torch.isfinite(probs).all()
    assert torch.isfinite(grad).all()
    reference = sinkhorn_knopp_reference(logits.detach().double(), 20)
    torch.testing.assert_close(probs.double(), reference, atol=2e-2, rtol=0)


@pytest.mark.parametrize(("device", "backend"), CASES)
@pytest.mark.parametrize("gap", [88.0, 90.0])
def test_row_far_below_the_max(device, backend, gap):
    """A row whose logits sit ~90 below the matrix max: exp gives float32 subnormals, and the
    iterations still normalize the row as float64 does (a scaling form that keeps exp(L - max)
    and clamps its normalizers at FLT_MIN got such rows wrong by 0.02 at 90). Further down,
    subnormals keep too few bits for float32 to match float64 (gap 95: 2e-4 relative)."""
    logits = make_tensor(4, 4, 4, device=device, seed=int(gap))
    logits[:, 1] -= gap
    _check(logits, 20, backend)


@pytest.mark.parametrize(("device", "backend"), CASES)
def test_eps_zero_zero_row_is_nan_as_the_formula(device, backend):
    """With eps = 0 a row of -inf is 0 / 0 at the first row step: NaN, then every column."""
    logits = make_tensor(3, 4, 4, device=device, seed=21)
    logits[0, 2] = float("-inf")
    probs = sinkhorn_knopp(logits, 3, 0.0, backend=backend)
    assert probs[0].isnan().all()
    assert torch.isfinite(probs[1:]).all()


@pytest.mark.parametrize(("device", "backend"), CASES)
def test_empty_batch(device, backend):
    logits = torch.randn(0, 3, 4, 4, device=device, requires_grad=True)
    probs = sinkhorn_knopp(logits, 20, backend=backend)
    assert probs.shape == (0, 3, 4, 4)
    (grad,) = torch.autograd.grad(probs, logits, torch.ones_like(probs))
    assert grad.shape == logits.shape


@pytest.mark.parametrize(("device", "backend"), CASES)
def test_deterministic(device, backend):
    logits = make_tensor(5, 3, 4, 4, device=device, seed=21, requires_grad=True)
    grad_output = make_tensor(5, 3, 4, 4, device=device, seed=22)
    first, second = (sinkhorn_knopp(logits, 20, backend=backend) for _ in range(2))
    assert torch.equal(first, second)
    grads = [torch.autograd.grad(out, logits, grad_output)[0] for out in (first, second)]
    assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize(("device", "backend"), CASES)
def test_input_unchanged(device, backend):
    logits = make_tensor(3, 4, 4, device=device, seed=23)
    saved = logits.clone()
    sinkhorn_knopp(logits, 5, backend=backend)
    assert torch.equal(logits, saved)


@pytest.mark.parametrize(("device", "backend"), CASES)
@pytest.mark.parametrize("n", [3, 4])
def test_grad_through_tied_maxima(device, backend, n):
    """The max path of the gradient: tied maxima share it evenly (as autograd's amax does)."""
    logits = make_tensor(4, n, n, device=device, seed=81, scale=2.0)
    logits[0] = 0.5  # every entry ties
    logits[1, 0, 0] = logits[1, n - 1, 1] = logits[1].max() + 1.0  # two tied maxima
    logits[2, :, 0] = logits[2].max() + 0.25  # a whole column ties
    _check(logits, 20, backend, seed=82)
    _check(logits, 0, backend, seed=83)


@pytest.mark.parametrize(("device", "backend"), CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_autocast_does_not_change_the_computation(device, backend, dtype):
    """float32 inside, output in the input dtype, whatever autocast region surrounds the call."""
    logits = make_tensor(2, 3, 4, 4, device=device, dtype=dtype, seed=84, requires_grad=True)
    grad_output = make_tensor(2, 3, 4, 4, device=device, dtype=dtype, seed=85)
    expected = sinkhorn_knopp(logits, 20, backend=backend)
    (expected_grad,) = torch.autograd.grad(expected, logits, grad_output)
    low = torch.bfloat16 if device.type == "cpu" else torch.float16
    with torch.autocast(device.type, dtype=low):
        probs = sinkhorn_knopp(logits, 20, backend=backend)
        (grad,) = torch.autograd.grad(probs, logits, grad_output)
    assert probs.dtype == dtype
    assert grad.dtype == dtype
    assert torch.equal(probs, expected)
    assert torch.equal(grad, expected_grad)


@pytest.mark.parametrize(("device", "backend"), CASES)
def test_input_without_grad_builds_no_graph(device, backend):
    logits = make_tensor(3, 4, 4, device=device, seed=86)
    probs = sinkhorn_knopp(logits, 5, backend=backend)
    assert probs.grad_fn is None
    assert not probs.requires_grad
    with torch.no_grad():
        assert sinkhorn_knopp(logits.requires_grad_(True), 5, backend=backend).grad_fn is None


@pytest.mark.parametrize(("device", "backend"), CASES)
@pytest.mark.parametrize("layout", ["transposed", "strided"])
def test_output_is_contiguous(device, backend, layout):
    base = make_tensor(3, 5, 5, device=device, seed=87)
    logits = base.mT if layout == "transposed" else base[:, ::2, ::2]
    probs = sinkhorn_knopp(logits, 5, backend=backend)
    assert probs.is_contiguous()
    expected = sinkhorn_knopp_reference(logits.double().contiguous(), 5)
    assert_close("P", probs, expected, 1e-5)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy
@pytest.mark.parametrize(("device", "backend"), CASES)
@pytest.mark.parametrize("num_iters", [0, 3, 20, 50])
def test_special_values(device, backend, num_iters):
    """What the formula gives, on both backends: -inf logits give P = 0 (a -inf row a zero row)
    and zero gradient; a NaN, or a matrix that is -inf everywhere, makes its whole matrix NaN; a
    +inf is NaN at its entry (P = 0 elsewhere) until an iteration spreads it. Other matrices of
    the batch are unaffected."""
    n = 4
    logits = make_tensor(6, n, n, device=device, seed=88, scale=2.0)
    logits[0, 1, 2] = float("-inf")
    logits[1, 2] = float("-inf")  # a whole row
    logits[2, 0, 3] = float("nan")
    logits[3, 1, 1] = float("inf")
    logits[4] = float("-inf")  # the whole matrix
    grad_output = make_tensor(6, n, n, device=device, seed=89)

    def run(backend):
        leaf = logits.clone().requires_grad_(True)
        probs = sinkhorn_knopp(leaf, num_iters, backend=backend)
        (grad,) = torch.autograd.grad(probs, leaf, grad_output)
        return probs.detach(), grad

    probs, grad = run(backend)
    finite = [0, 1, 5]
    assert torch.isfinite(probs[finite]).all()
    assert torch.isfinite(grad[finite]).all()
    assert probs[0, 1, 2] == 0
    assert grad[0, 1, 2] == 0
    assert (probs[1, 2] == 0).all()
    assert (grad[1, 2] == 0).all()
    assert probs[[2, 4]].isnan().all()
    assert probs[3, 1, 1].isnan()
    assert probs[3].isnan().all() == (num_iters > 0)
    assert grad[[2, 4]].isnan().all()
    assert grad[3, 1, 1].isnan()
    torch_probs, torch_grad = run("torch")
    assert torch.equal(probs.isnan(), torch_probs.isnan())
    if num_iters > 0:  # with 0 iterations autograd's amax spreads the +inf entry's NaN, Triton not
        assert torch.equal(grad.isnan(), torch_grad.isnan())
    reference = sinkhorn_knopp_reference(logits[finite].double(), num_iters)
    assert_close("P", probs[finite], reference, 1e-5)


@pytest.mark.parametrize(("device", "backend"), CASES)
def test_large_n_within_the_triton_limit(device, backend):
    """A padded size below the Triton limit (32, which test_values_and_grads covers)."""
    for n in (17,):
        _check(make_tensor(1, n, n, device=device, seed=n, scale=2.0), 2, backend)


@pytest.mark.parametrize("device", DEVICES)
def test_large_n_beyond_the_triton_limit(device):
    """n > TRITON_MAX_N: the PyTorch backend computes it and ``auto`` picks it."""
    from hdgsa_sinkhorn.api import TRITON_MAX_N

    for n in (TRITON_MAX_N + 1, 1000):
        logits = make_tensor(1, n, n, device=device, seed=n, scale=2.0)
        probs = sinkhorn_knopp(logits, 3)
        assert torch.equal(probs, sinkhorn_knopp(logits, 3, backend="torch"))
        torch.testing.assert_close(probs.sum(-2), torch.ones(1, n, device=device), atol=1e-5, rtol=0)
    _check(make_tensor(2, TRITON_MAX_N + 1, TRITON_MAX_N + 1, device=device, seed=100), 5, "torch")


@pytest.mark.parametrize(("device", "backend"), CASES)
def test_torch_compile_dynamic_shapes(device, backend):
    """fullgraph tracing through either backend (argument checks, backend choice, autocast guard,
    custom op) with dynamic shapes, bitwise equal to eager; "aot_eager" keeps Inductor's compile
    time out of the suite (test_torch_compile_fullgraph runs Inductor on CUDA)."""
    torch._dynamo.reset()

    def step(x, eps):
        return sinkhorn_knopp(x.mT, 5, eps, backend=backend)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager", dynamic=True)
    for batch, eps in ((2, 1e-8), (3, 1e-3)):
        logits = make_tensor(batch, 4, 4, device=device, seed=90 + batch, requires_grad=True)
        grad_output = make_tensor(batch, 4, 4, device=device, seed=95 + batch)
        probs = compiled(logits, eps)
        (grad,) = torch.autograd.grad(probs, logits, grad_output)
        expected = step(logits, eps)
        (expected_grad,) = torch.autograd.grad(expected, logits, grad_output)
        assert torch.equal(probs, expected)
        assert torch.equal(grad, expected_grad)


# ---- bad inputs (docs/api.md, "Errors") ----------------------------------------------------------


def test_rejects_non_tensor():
    with pytest.raises(TypeError, match="logits"):
        sinkhorn_knopp([[1.0]])


@pytest.mark.parametrize("shape", [(4,), (), (3, 4), (2, 4, 5), (2, 0, 0)], ids=str)
def test_rejects_bad_shape(shape):
    with pytest.raises(ValueError, match="logits"):
        sinkhorn_knopp(torch.zeros(shape))


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32, torch.int64, torch.bool, torch.complex64])
def test_rejects_bad_dtype(dtype):
    with pytest.raises(TypeError, match="logits"):
        sinkhorn_knopp(torch.zeros(2, 3, 3, dtype=dtype))


def test_bad_shape_message_names_expected_and_actual():
    with pytest.raises(ValueError, match=r"logits: expected shape \[\.\.\., n, n\].*got shape \[2, 4, 5\]"):
        sinkhorn_knopp(torch.zeros(2, 4, 5))


@pytest.mark.parametrize("num_iters", [-1, -20])
def test_rejects_negative_num_iters(num_iters):
    with pytest.raises(ValueError, match="num_iters"):
        sinkhorn_knopp(torch.randn(2, 3, 3), num_iters)


@pytest.mark.parametrize("num_iters", [2.0, 1.5, True, "3", None, torch.tensor(3)], ids=repr)
def test_rejects_non_int_num_iters(num_iters):
    with pytest.raises(TypeError, match="num_iters"):
        sinkhorn_knopp(torch.randn(2, 3, 3), num_iters)


@pytest.mark.parametrize("eps", [-1e-8, float("nan"), float("inf"), -float("inf")])
def test_rejects_bad_eps_value(eps):
    with pytest.raises(ValueError, match="eps"):
        sinkhorn_knopp(torch.randn(2, 3, 3), 5, eps)


@pytest.mark.parametrize("eps", ["1e-8", None, True, 1e-8j, torch.tensor(1e-8)], ids=repr)
def test_rejects_non_real_eps(eps):
    with pytest.raises(TypeError, match="eps"):
        sinkhorn_knopp(torch.randn(2, 3, 3), 5, eps)


def test_accepts_integral_and_real_scalars():
    """numpy integers and floats, and an int ``eps``, are numbers like any other."""
    np = pytest.importorskip("numpy")
    logits = make_tensor(2, 3, 3, seed=71)
    expected = sinkhorn_knopp(logits, 3, 0.0, backend="torch")
    torch.testing.assert_close(
        sinkhorn_knopp(logits, np.int64(3), 0, backend="torch"), expected, rtol=0, atol=0
    )
    torch.testing.assert_close(
        sinkhorn_knopp(logits, 3, np.float32(0.0), backend="torch"), expected, rtol=0, atol=0
    )


def test_signature():
    parameters = inspect.signature(sinkhorn_knopp).parameters
    assert list(parameters) == ["logits", "num_iters", "eps", "backend"]
    assert parameters["logits"].default is inspect.Parameter.empty
    assert parameters["num_iters"].default == 20
    assert parameters["eps"].default == 1e-8
    assert parameters["backend"].default == "auto"
    assert parameters["backend"].kind is inspect.Parameter.KEYWORD_ONLY


@pytest.mark.skipif(interpreter_enabled(), reason="Triton can run on CPU under the interpreter")
def test_argument_errors_come_before_the_backend_choice():
    logits = torch.randn(2, 3, 3)
    with pytest.raises(TypeError, match="num_iters"):
        sinkhorn_knopp(logits, 2.0, backend="triton")
    with pytest.raises(ValueError, match="logits"):
        sinkhorn_knopp(torch.randn(2, 3, 4), backend="triton")
    with pytest.raises(TypeError, match="logits"):
        sinkhorn_knopp(logits.double(), backend="triton")


@pytest.mark.parametrize(
    ("value", "error"), [("torch", None), ("triton", "triton"), ("fla", ValueError), ("bogus", ValueError)]
)
def test_hdgsa_backend_environment(monkeypatch, value, error):
    """``HDGSA_BACKEND`` overrides ``auto`` (and only ``auto``)."""
    monkeypatch.setenv("HDGSA_BACKEND", value)
    logits = make_tensor(2, 4, 4, seed=72)
    expected = sinkhorn_knopp(logits, 5, backend="torch")
    if error is None:
        assert torch.equal(sinkhorn_knopp(logits, 5), expected)
    elif error == "triton":
        if "triton" in runnable_backends(logits.device):
            assert torch.equal(sinkhorn_knopp(logits, 5), sinkhorn_knopp(logits, 5, backend="triton"))
        else:
            with pytest.raises(RuntimeError, match="triton"):
                sinkhorn_knopp(logits, 5)
    else:
        with pytest.raises(error, match="HDGSA_BACKEND"):
            sinkhorn_knopp(logits, 5)
    assert torch.equal(sinkhorn_knopp(logits, 5, backend="torch"), expected)


def test_rejects_unknown_backend():
    with pytest.raises(ValueError, match="backend"):
        sinkhorn_knopp(torch.randn(2, 3, 3), backend="cuda")


@pytest.mark.skipif(interpreter_enabled(), reason="Triton can run on CPU under the interpreter")
def test_triton_on_cpu_without_interpreter_raises():
    with pytest.raises(RuntimeError, match="triton"):
        sinkhorn_knopp(torch.randn(2, 3, 3), backend="triton")


def _literal_steps(logits: torch.Tensor, num_iters: int, eps: float) -> torch.Tensor:
    """The documented math written out: division steps, not the log domain the reference uses."""
    probs = torch.exp(logits - logits.amax(dim=(-2, -1), keepdim=True))
    for _ in range(num_iters):
        probs = probs / (probs.sum(-1, keepdim=True) + eps)
        probs = probs / (probs.sum(-2, keepdim=True) + eps)
    return probs


@pytest.mark.parametrize("num_iters", [0, 1, 20])
@pytest.mark.parametrize("eps", [1e-8, 0.1])
def test_reference_is_the_literal_computation(num_iters, eps):
    """The log-domain reference is the same function, with the same gradient, as the documented steps."""
    logits = make_tensor(4, 2, 5, 5, dtype=torch.float64, seed=31, scale=2.0, requires_grad=True)
    logits.data[0, 0, 1, 2] = logits.data[0, 0].max()  # a tie in the max
    grad_output = make_tensor(4, 2, 5, 5, dtype=torch.float64, seed=32)
    expected = _literal_steps(logits, num_iters, eps)
    actual = sinkhorn_knopp_reference(logits, num_iters, eps)
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-14)
    grads = [torch.autograd.grad(out, logits, grad_output)[0] for out in (actual, expected)]
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-12)


# ---- Triton internals: segmented backward, custom op, torch.compile -------------------------

TRITON_DEVICES = [
    pytest.param(device, id=device.type) for device in DEVICES if "triton" in runnable_backends(device)
]


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize(
    ("n", "num_iters", "seg"), [(4, 20, 3), (4, 20, 5), (3, 7, 2), (5, 9, 4), (8, 6, 6), (4, 1, 1)]
)
def test_triton_backward_segments(device, n, num_iters, seg):
    """The backward in several segments (each recomputing the forward up to its start), with a
    short first segment when seg does not divide num_iters, equals the float64 gradient."""
    from hdgsa_sinkhorn._triton import sinkhorn_knopp_bwd

    logits = make_tensor(5, n, n, device=device, seed=41, scale=2.0)
    grad_output = make_tensor(5, n, n, device=device, seed=42)
    grad = sinkhorn_knopp_bwd(logits, grad_output, num_iters, 1e-8, seg=seg)
    _, grad64 = _run(logits.double(), grad_output.double(), num_iters, 1e-8, None)
    assert_matches_reference("d logits", grad, grad64)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("n", [2, 3, 4, 8])
@pytest.mark.parametrize("num_iters", [4, 7, 20])
@pytest.mark.parametrize(("restart", "pair_rows"), [(1, False), (2, False), (3, True), (4, False), (4, True)])
def test_triton_scaling_form_choices(device, n, num_iters, restart, pair_rows):
    """Every choice of the forward's scaling form (restart 1 is the plain form; blocks that do or
    do not divide num_iters; paired row reciprocals, ignored for odd n) gives the float64 values,
    here with a zero row whose factor grows 1 / eps a step."""
    from hdgsa_sinkhorn._triton import sinkhorn_knopp_fwd

    logits = make_tensor(5, n, n, device=device, seed=43, scale=2.0)
    logits[1, n - 1] = float("-inf")
    probs = sinkhorn_knopp_fwd(logits, num_iters, 1e-8, restart=restart, pair_rows=pair_rows)
    probs64 = sinkhorn_knopp_reference(logits.double(), num_iters, 1e-8)
    assert (probs[1, n - 1] == 0).all()
    assert_matches_reference("P", probs, probs64)


@pytest.mark.parametrize(("restart", "eps"), [(4, 1e-9), (5, 1e-8), (2, 2.0), (4, 0.0)])
def test_triton_scaling_form_refuses_unsafe_blocks(restart, eps):
    """A block length whose factors could overflow (eps ** -restart > 1e32), or eps outside
    [1e-8, 1], is refused before any launch (the kernels would give NaN for a zero row)."""
    pytest.importorskip("triton")  # host code of the Triton backend, imported with it
    from hdgsa_sinkhorn._triton import _scaling

    with pytest.raises(ValueError, match="restart"):
        _scaling(4, eps, restart, None)
    # The default: blocks of 4 inside [1e-8, 1], the plain form outside.
    assert _scaling(4, eps, None, None)[0] == (4 if 1e-8 <= eps <= 1 else 1)
    assert _scaling(4, 1e-8, 4, None) == (4, True)


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_custom_op_opcheck(device):
    import hdgsa_sinkhorn._triton  # noqa: F401  (registers the ops)

    logits = make_tensor(3, 4, 4, device=device, seed=51, requires_grad=True)
    grad_output = make_tensor(3, 4, 4, device=device, seed=52)
    torch.library.opcheck(torch.ops.hdgsa.sinkhorn_knopp_fwd.default, (logits, 5, 1e-8))
    torch.library.opcheck(torch.ops.hdgsa.sinkhorn_knopp_bwd.default, (logits.detach(), grad_output, 5, 1e-8))
    # Strided inputs (transposed matrices, a transposed gradient), n = 3 (padded), 0 iterations.
    logits = make_tensor(3, 3, 3, device=device, seed=53).mT.requires_grad_(True)
    grad_output = make_tensor(3, 3, 3, device=device, seed=54).mT
    torch.library.opcheck(torch.ops.hdgsa.sinkhorn_knopp_fwd.default, (logits, 0, 1e-8))
    torch.library.opcheck(torch.ops.hdgsa.sinkhorn_knopp_bwd.default, (logits.detach(), grad_output, 2, 1e-8))


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("layout", ["transposed", "every_other"])  # contiguous: test_custom_op_opcheck
def test_eager_function_and_custom_op_agree(device, layout):
    """Eager calls go through an autograd.Function, compiled graphs through the custom op: the
    same kernels, so bitwise the same P and gradient; the fake (meta) output has the real one's
    shape, dtype and strides."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from hdgsa_sinkhorn._triton import SinkhornKnoppFunction

    base = make_tensor(6, 5, 5, device=device, seed=55)
    logits = {"contiguous": base, "transposed": base.mT, "every_other": base[::2]}[layout]
    grad_output = make_tensor(*logits.shape, device=device, seed=56)
    leaves = [
        logits.detach().clone(memory_format=torch.preserve_format).requires_grad_(True) for _ in range(2)
    ]
    eager = SinkhornKnoppFunction.apply(leaves[0], 7, 1e-8)
    through_op = torch.ops.hdgsa.sinkhorn_knopp_fwd(leaves[1], 7, 1e-8)
    assert torch.equal(eager, through_op)
    grads = [
        torch.autograd.grad(out, leaf, grad_output)[0]
        for out, leaf in zip((eager, through_op), leaves, strict=True)
    ]
    assert torch.equal(grads[0], grads[1])
    with FakeTensorMode() as mode:
        fake_logits, fake_grad = mode.from_tensor(logits), mode.from_tensor(grad_output)
        fake_probs = torch.ops.hdgsa.sinkhorn_knopp_fwd(fake_logits, 7, 1e-8)
        fake_dlogits = torch.ops.hdgsa.sinkhorn_knopp_bwd(fake_logits, fake_grad, 7, 1e-8)
    for fake, real in ((fake_probs, eager), (fake_dlogits, grads[0])):
        assert (fake.shape, fake.dtype, fake.stride()) == (real.shape, real.dtype, real.stride())


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_triton_double_backward_raises(device):
    """The backward kernel is not differentiable: asking for a second derivative is an error,
    not a silently missing term."""
    logits = make_tensor(2, 4, 4, device=device, seed=57, requires_grad=True)
    probs = sinkhorn_knopp(logits, 5, backend="triton")
    (grad,) = torch.autograd.grad(probs.square().sum(), logits, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        (grad.square().sum() + probs.sum()).backward()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_triton_on_a_device_that_is_not_current():
    """Triton launches on the current device; the launchers make the tensors' device current."""
    logits = make_tensor(3, 4, 4, device="cuda:1", seed=58, requires_grad=True)
    grad_output = make_tensor(3, 4, 4, device="cuda:1", seed=59)
    with torch.cuda.device(0):
        probs = sinkhorn_knopp(logits, 20, backend="triton")
        (grad,) = torch.autograd.grad(probs, logits, grad_output)
    assert probs.device == logits.device
    expected = _run(logits.detach().cpu(), grad_output.cpu(), 20, 1e-8, "torch")
    assert_close("P", probs, expected[0], 1e-5)
    assert_close("d logits", grad, expected[1], 1e-4)


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()
    # On CPU (interpreter) "aot_eager" traces the graph without Inductor's C++ toolchain.
    compiler = "inductor" if device.type == "cuda" else "aot_eager"

    def step(x):
        return sinkhorn_knopp(x * 2.0, 7, backend="triton").square().sum()

    compiled = torch.compile(step, fullgraph=True, backend=compiler)
    logits = make_tensor(2, 3, 4, 4, device=device, seed=53, requires_grad=True)
    loss = compiled(logits)
    (grad,) = torch.autograd.grad(loss, logits)
    logits64 = logits.detach().double().requires_grad_(True)
    loss64 = sinkhorn_knopp_reference(logits64 * 2.0, 7).square().sum()
    (grad64,) = torch.autograd.grad(loss64, logits64)
    assert_matches_reference("loss", loss.detach(), loss64.detach())
    assert_matches_reference("d logits", grad, grad64)


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_triton_size_limit(device):
    from hdgsa_sinkhorn.api import TRITON_MAX_N

    logits = make_tensor(1, TRITON_MAX_N + 1, TRITON_MAX_N + 1, device=device, seed=61)
    with pytest.raises(RuntimeError, match="n <= "):
        sinkhorn_knopp(logits, 2, backend="triton")
    torch.testing.assert_close(sinkhorn_knopp(logits, 2), sinkhorn_knopp_reference(logits, 2))  # auto: torch
