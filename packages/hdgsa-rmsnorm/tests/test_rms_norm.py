"""rms_norm against a float64 reference: values and gradients of x, residual and weight, on
every backend that can run here (torch; triton on CUDA or with TRITON_INTERPRET=1), plus the
documented errors for bad inputs."""

from __future__ import annotations

import pytest
import torch

from hdgsa_core import HAS_TRITON, runnable_backends, triton_unavailable_reason
from hdgsa_core.testing import (
    DEFAULT_TOLERANCE,
    assert_matches_reference,
    make_tensor,
    must_not_run,
    strided_rows,
)
from hdgsa_rmsnorm import api, rms_norm, rms_norm_reference

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DEVICE_BACKENDS = [
    pytest.param(device, backend, id=f"{device}-{backend}")
    for device in DEVICES
    for backend in runnable_backends(torch.device(device))
]
DTYPES = [
    pytest.param(dtype, id=str(dtype).removeprefix("torch."))
    for dtype in (torch.float32, torch.float16, torch.bfloat16)
]


def _inputs(
    shape, dtype, device, *, weight=True, residual=True, residual_dtype=None, weight_dtype=None, seed=0
):
    hidden = shape[-1]
    x = make_tensor(*shape, dtype=dtype, device=device, seed=seed, requires_grad=True)
    w = None
    if weight:
        w = make_tensor(
            hidden,
            dtype=weight_dtype or dtype,
            device=device,
            seed=seed + 1,
            scale=0.5,
            offset=1.0,
            requires_grad=True,
        )
    r = None
    if residual:
        r = make_tensor(
            *shape, dtype=residual_dtype or dtype, device=device, seed=seed + 2, requires_grad=True
        )
    return x, w, r


def _as64(tensor):
    return None if tensor is None else tensor.detach().double().requires_grad_(True)


def _outputs_and_grads(fn, x, w, r, upstream):
    """Outputs of ``fn(x, w, r)`` (a tuple) and the gradients of sum(out * upstream) wrt
    each given input (x, w, r order; None where not given)."""
    outs = fn(x, w, r)
    outs = outs if isinstance(outs, tuple) else (outs,)
    inputs = [t for t in (x, w, r) if t is not None]
    grads = iter(
        torch.autograd.grad(outs, inputs, [u.to(o.dtype) for o, u in zip(outs, upstream, strict=False)])
    )
    return [o.detach() for o in outs], [next(grads) if t is not None else None for t in (x, w, r)]


def check_against_float64(
    shape,
    dtype,
    device,
    backend,
    *,
    weight=True,
    residual=True,
    prenorm=False,
    residual_in_fp32=False,
    eps=1e-6,
    residual_dtype=None,
    weight_dtype=None,
    layout=None,
    seed=0,
):
    """Run rms_norm on ``backend``; compare outputs and gradients with float64, holding it to
    2x the error of the PyTorch reference run on the same low-precision inputs."""
    x, w, r = _inputs(
        shape,
        dtype,
        device,
        weight=weight,
        residual=residual,
        residual_dtype=residual_dtype,
        weight_dtype=weight_dtype,
        seed=seed,
    )
    if layout is not None:
        x = layout(x)
        r = layout(r) if r is not None else None

    def ours(x_, w_, r_):
        return rms_norm(x_, w_, eps, r_, prenorm=prenorm, residual_in_fp32=residual_in_fp32, backend=backend)

    def reference(x_, w_, r_):
        return rms_norm_reference(x_, w_, eps, r_, prenorm, residual_in_fp32)

    n_out = 2 if prenorm else 1
    # upstream gradients in the outputs' dtypes, so the float64 reference sees the same values
    out_dtypes = [dtype, torch.float32 if residual_in_fp32 else dtype][:n_out]
    upstream = [
        make_tensor(*shape, dtype=d, device=device, seed=seed + 10 + i) for i, d in enumerate(out_dtypes)
    ]
    outs, grads = _outputs_and_grads(ours, x, w, r, upstream)
    outs64, grads64 = _outputs_and_grads(reference, _as64(x), _as64(w), _as64(r), upstream)
    outs_lp, grads_lp = _outputs_and_grads(reference, x, w, r, upstream)

    assert outs[0].dtype == dtype
    assert outs[0].shape == x.shape
    assert outs[0].device == x.device
    if prenorm:
        h_dtype = torch.float32 if residual_in_fp32 else dtype
        assert outs[1].dtype == h_dtype
        assert outs[1].shape == x.shape
    for name, out, out64, out_lp in zip(("y", "h"), outs, outs64, outs_lp, strict=False):
        assert_matches_reference(f"{backend} {name}", out, out64, out_lp)
    for name, grad, grad64, grad_lp, source in zip(
        ("dx", "dweight", "dresidual"), grads, grads64, grads_lp, (x, w, r), strict=False
    ):
        if source is None:
            continue
        assert grad.dtype == source.dtype
        assert grad.shape == source.shape
        assert_matches_reference(
            f"{backend} {name}", grad, grad64, grad_lp, tol=DEFAULT_TOLERANCE[source.dtype]
        )
    return outs, grads


# ----------------------------------------------------------------------------- values, grads


@pytest.mark.parametrize(("device", "backend"), DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [1, 3, 130, 1000, 4097])
def test_prenorm_residual_weight(device, backend, dtype, hidden):
    check_against_float64((5, hidden), dtype, device, backend, prenorm=True)


FLAGS = {
    "plain": dict(weight=False, residual=False),
    "weight": dict(residual=False),
    "residual-no-weight": dict(weight=False),
    "residual-weight": dict(),
    "prenorm-no-residual": dict(residual=False, prenorm=True),
    "prenorm-no-weight": dict(weight=False, prenorm=True),
    "prenorm-residual-in-fp32": dict(prenorm=True, residual_in_fp32=True),
    "fp32-residual-stream": dict(prenorm=True, residual_in_fp32=True, residual_dtype=torch.float32),
    "fp32-weight": dict(weight_dtype=torch.float32),
    "eps-0.1": dict(prenorm=True, eps=0.1),
}


@pytest.mark.parametrize(("device", "backend"), DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("flags", list(FLAGS), ids=list(FLAGS))
@pytest.mark.parametrize("hidden", [7, 520])
def test_flags(device, backend, dtype, flags, hidden):
    check_against_float64((3, 4, hidden), dtype, device, backend, **FLAGS[flags])


@pytest.mark.parametrize(("device", "backend"), DEVICE_BACKENDS)
@pytest.mark.parametrize("shape", [(1, 1), (64,), (2, 3, 4, 96), (37, 48), (3, 10000)], ids=str)
def test_shapes(device, backend, shape):
    check_against_float64(shape, torch.bfloat16, device, backend, prenorm=True)


LAYOUTS = {
    # rows not packed: a view into a wider buffer (stride(-1) == 1; read in place)
    "strided-rows": strided_rows,
    # leading dims that cannot be merged into one row stride
    "transposed-leading": lambda t: (
        t.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_(True)
    ),
    # every other row of a taller buffer
    "row-step-2": lambda t: torch.repeat_interleave(t.detach(), 2, dim=-2)[..., ::2, :].requires_grad_(True),
    # last dim not contiguous: the kernel needs a copy
    "column-major": lambda t: (
        t.detach().transpose(-1, -2).contiguous().transpose(-1, -2).requires_grad_(True)
    ),
}


@pytest.mark.parametrize(("device", "backend"), DEVICE_BACKENDS)
@pytest.mark.parametrize("layout", list(LAYOUTS), ids=list(LAYOUTS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_layouts(device, backend, layout, dtype):
    check_against_float64((3, 5, 200), dtype, device, backend, prenorm=True, layout=LAYOUTS[layout])


@pytest.mark.parametrize(("device", "backend"), DEVICE_BACKENDS)
@pytest.mark.parametrize("hidden", [65536, 262144])
def test_large_hidden(device, backend, hidden):
    rows = 2 if device == "cpu" else 33
    check_against_float64((rows, hidden), torch.bfloat16, device, backend, prenorm=True)


@pytest.mark.parametrize(("device", "backend"), DEVICE_BACKENDS)
@pytest.mark.parametrize("shape", [(0, 16), (4, 0), (2, 0, 8)], ids=str)
def test_empty(device, backend, shape):
    x, w, r = _inputs(shape, torch.float32, device)
    y, h = rms_norm(x, w, 1e-6, r, prenorm=True, backend=backend)
    assert y.shape == x.shape
    assert h.shape == x.shape
    dx, dw, dr = torch.autograd.grad((y.sum() + h.sum()), (x, w, r))
    assert dx.shape == x.shape
    assert dw.shape == w.shape
    assert dr.shape == r.shape
    assert torch.all(dw == 0)


@pytest.mark.parametrize(("device", "backend"), DEVICE_BACKENDS)
def test_inputs_unchanged_and_outputs_new(device, backend):
    x, w, r = _inputs((4, 33), torch.float32, device)
    saved = [t.detach().clone() for t in (x, w, r)]
    y, h = rms_norm(x, w, 1e-6, r, prenorm=True, backend=backend)
    for before, after in zip(saved, (x, w, r), strict=False):
        assert torch.equal(before, after)
    _y2, h2 = rms_norm(x, None, 1e-6, None, prenorm=True, backend=backend)
    assert h2.data_ptr() != x.data_ptr()
    assert torch.equal(h2, x.detach())
    assert y.is_contiguous()
    assert h.is_contiguous()


@pytest.mark.parametrize(("device", "backend"), DEVICE_BACKENDS)
def test_deterministic(device, backend):
    """Same inputs, bitwise the same outputs and gradients, run after run."""
    x, w, r = _inputs((65, 300), torch.bfloat16, device)
    dy = make_tensor(65, 300, dtype=torch.bfloat16, device=device, seed=5)
    dh = make_tensor(65, 300, dtype=torch.bfloat16, device=device, seed=6)
    runs = []
    for _ in range(2):
        y, h = rms_norm(x, w, 1e-6, r, prenorm=True, backend=backend)
        grads = torch.autograd.grad((y, h), (x, w, r), (dy, dh))
        runs.append((y, h, *grads))
    for first, second in zip(*runs, strict=False):
        assert torch.equal(first, second)


@pytest.mark.parametrize(("device", "backend"), DEVICE_BACKENDS)
def test_no_grad_and_partial_grads(device, backend):
    x, w, r = _inputs((6, 40), torch.float16, device)
    with torch.no_grad():
        y = rms_norm(x, w, 1e-6, r, backend=backend)
    expected = rms_norm_reference(x.detach().double(), w.detach().double(), 1e-6, r.detach().double())
    assert_matches_reference("no-grad y", y, expected)
    # only y gets a gradient although prenorm returns h too; weight frozen
    w_frozen = w.detach()
    y, _h = rms_norm(x, w_frozen, 1e-6, r, prenorm=True, backend=backend)
    dx, dr = torch.autograd.grad(y.float().sum(), (x, r))
    x64, r64 = _as64(x), _as64(r)
    y64 = rms_norm_reference(x64, w_frozen.double(), 1e-6, r64)
    dx64, dr64 = torch.autograd.grad(y64.sum(), (x64, r64))
    assert_matches_reference("y-only dx", dx, dx64)
    assert_matches_reference("y-only dresidual", dr, dr64)


WEIGHT_LAYOUTS = {
    # every other element of a longer vector
    "strided": lambda base, hidden: base[: 2 * hidden : 2],
    # one value for every column (stride 0)
    "expanded": lambda base, hidden: base[:1].expand(hidden),
}


def _check_weight_layout(device, backend, hidden, layout):
    rows = 3
    x, _w, r = _inputs((rows, hidden), torch.float32, device, weight=False)
    base = make_tensor(2 * hidden, device=device, seed=7, scale=0.5, offset=1.0, requires_grad=True)
    weight = WEIGHT_LAYOUTS[layout](base, hidden)
    dy = make_tensor(rows, hidden, device=device, seed=8)
    y = rms_norm(x, weight, 1e-6, r, backend=backend)
    dx, dbase = torch.autograd.grad(y, (x, base), dy)
    x64, r64, base64 = _as64(x), _as64(r), _as64(base)
    y64 = rms_norm_reference(x64, WEIGHT_LAYOUTS[layout](base64, hidden), 1e-6, r64)
    dx64, dbase64 = torch.autograd.grad(y64, (x64, base64), dy.double())
    assert_matches_reference(f"{layout} weight y", y, y64)
    assert_matches_reference(f"{layout} weight dx", dx, dx64)
    assert_matches_reference(f"{layout} weight dweight", dbase, dbase64)


@pytest.mark.parametrize(("device", "backend"), DEVICE_BACKENDS)
@pytest.mark.parametrize("layout", list(WEIGHT_LAYOUTS))
def test_weight_layouts(device, backend, layout):
    """A weight that is not packed (a strided slice, an expanded scalar) is read as it is."""
    _check_weight_layout(device, backend, 37, layout)


REQUIRES_GRAD = ["none", "x", "weight", "residual", "x+weight", "weight+residual", "all"]


@pytest.mark.parametrize(("device", "backend"), DEVICE_BACKENDS)
@pytest.mark.parametrize("which", REQUIRES_GRAD)
@pytest.mark.parametrize("prenorm", [False, True], ids=["y", "prenorm"])
def test_requires_grad_combinations(device, backend, which, prenorm):
    """Each input that requires grad gets the float64 gradient; the others get none."""
    shape = (4, 45)
    names = ("x", "weight", "residual")
    wanted = {name: which == "all" or name in which.split("+") for name in names}
    x, w, r = (
        t.detach().requires_grad_(wanted[n])
        for n, t in zip(names, _inputs(shape, torch.bfloat16, device), strict=True)
    )
    outs = rms_norm(x, w, 1e-6, r, prenorm=prenorm, backend=backend)
    outs = outs if isinstance(outs, tuple) else (outs,)
    assert outs[0].requires_grad == any(wanted.values())
    if prenorm:  # h = x + residual does not depend on the weight
        assert outs[1].requires_grad == (wanted["x"] or wanted["residual"])
    if not any(wanted.values()):
        return
    upstream = [
        make_tensor(*shape, dtype=torch.bfloat16, device=device, seed=20 + i) for i in range(len(outs))
    ]
    given = [t for t in (x, w, r) if t.requires_grad]
    differentiable = [i for i, out in enumerate(outs) if out.requires_grad]
    grads = torch.autograd.grad(
        [outs[i] for i in differentiable], given, [upstream[i] for i in differentiable]
    )
    x64, w64, r64 = _as64(x), _as64(w), _as64(r)
    outs64 = rms_norm_reference(x64, w64, 1e-6, r64, prenorm)
    outs64 = outs64 if isinstance(outs64, tuple) else (outs64,)
    outs64, upstream = [outs64[i] for i in differentiable], [upstream[i] for i in differentiable]
    given64 = [t64 for t, t64 in zip((x, w, r), (x64, w64, r64), strict=True) if t.requires_grad]
    grads64 = torch.autograd.grad(outs64, given64, [u.double() for u in upstream])
    for tensor, grad, grad64 in zip(given, grads, grads64, strict=True):
        assert grad.dtype == tensor.dtype
        assert_matches_reference(f"{which} grad", grad, grad64, tol=DEFAULT_TOLERANCE[tensor.dtype])


@pytest.mark.parametrize(("device", "backend"), DEVICE_BACKENDS)
@pytest.mark.parametrize("residual", [False, True], ids=["no-residual", "residual"])
def test_gradient_through_h_only(device, backend, residual):
    """prenorm with only h reaching the loss: dx = dresidual = dh, weight gets nothing (or 0)."""
    x, w, r = _inputs((3, 50), torch.float32, device, residual=residual)
    _y, h = rms_norm(x, w, 1e-6, r, prenorm=True, backend=backend)
    dh = make_tensor(3, 50, device=device, seed=4)
    grads = torch.autograd.grad(h, [t for t in (x, w, r) if t is not None], dh, allow_unused=True)
    assert torch.equal(grads[0], dh)
    assert grads[1] is None or torch.all(grads[1] == 0)
    if residual:
        assert torch.equal(grads[2], dh)


def _autocast_dtype(device):
    return torch.bfloat16 if device == "cpu" else torch.float16


@pytest.mark.parametrize(("device", "backend"), DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_autocast_does_not_change_the_result(device, backend, dtype):
    """float32 math inside whatever autocast says: bitwise the same outputs and gradients
    inside and outside an autocast region, in the inputs' dtypes."""
    x, w, r = _inputs((5, 70), dtype, device, weight_dtype=torch.float32)
    dy = make_tensor(5, 70, dtype=dtype, device=device, seed=5)
    dh = make_tensor(5, 70, dtype=dtype, device=device, seed=6)

    def run():
        y, h = rms_norm(x, w, 1e-6, r, prenorm=True, backend=backend)
        return (y, h, *torch.autograd.grad((y, h), (x, w, r), (dy, dh)))

    outside = run()
    with torch.autocast(device, dtype=_autocast_dtype(device)):
        inside = run()
    for name, a, b in zip(("y", "h", "dx", "dweight", "dresidual"), outside, inside, strict=True):
        assert a.dtype == b.dtype, name
        assert torch.equal(a, b), name
    assert inside[0].dtype == dtype
    assert inside[3].dtype == torch.float32


@pytest.mark.parametrize(("device", "backend"), DEVICE_BACKENDS)
def test_torch_compile_aot_eager_fullgraph(device, backend):
    """fullgraph tracing on every backend (aot_eager: no C++ compiler needed); same values
    and gradients as eager."""
    torch._dynamo.reset()

    def block(x, w, r):
        y, h = rms_norm(x, w, 1e-6, r, prenorm=True, backend=backend)
        return y * 2, h

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    x, w, r = _inputs((4, 3, 72), torch.bfloat16, device)
    dy = make_tensor(4, 3, 72, dtype=torch.bfloat16, device=device, seed=3)
    results = []
    for fn in (compiled, block):
        y, h = fn(x, w, r)
        results.append((y, h, *torch.autograd.grad((y, h), (x, w, r), (dy, dy))))
    for name, got, expected in zip(("y", "h", "dx", "dw", "dr"), *results, strict=True):
        assert torch.equal(got, expected), name


@pytest.mark.parametrize(("device", "backend"), DEVICE_BACKENDS)
def test_inputs_unchanged_by_backward(device, backend):
    x, w, r = _inputs((4, 33), torch.bfloat16, device)
    saved = [t.detach().clone() for t in (x, w, r)]
    y, h = rms_norm(x, w, 1e-6, r, prenorm=True, backend=backend)
    dy = make_tensor(4, 33, dtype=torch.bfloat16, device=device, seed=3)
    dy_saved = dy.clone()
    torch.autograd.grad((y, h), (x, w, r), (dy, dy))
    for before, after in zip([*saved, dy_saved], (x, w, r, dy), strict=True):
        assert torch.equal(before, after)


# ----------------------------------------------------------------------------- bad inputs


def test_bad_inputs():
    x = torch.randn(4, 8)
    with pytest.raises(TypeError, match="x"):
        rms_norm([[1.0]])
    with pytest.raises(TypeError, match="x: dtype int64"):
        rms_norm(torch.ones(4, 8, dtype=torch.int64))
    with pytest.raises(TypeError, match="x: dtype float64"):
        rms_norm(torch.ones(4, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="x: expected shape"):
        rms_norm(torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"weight: expected shape \[N\] = \[8\], got shape \[7\]"):
        rms_norm(x, torch.ones(7))
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, torch.ones(1, 8))
    with pytest.raises(TypeError, match="weight: dtype int32"):
        rms_norm(x, torch.ones(8, dtype=torch.int32))
    with pytest.raises(TypeError, match="weight"):
        rms_norm(x, [1.0] * 8)
    with pytest.raises(ValueError, match=r"residual: expected shape .*\[4, 8\], got shape \[4, 7\]"):
        rms_norm(x, None, 1e-6, torch.randn(4, 7))
    with pytest.raises(ValueError, match="residual"):
        rms_norm(x, None, 1e-6, torch.randn(8))
    with pytest.raises(TypeError, match="residual: dtype int64"):
        rms_norm(x, None, 1e-6, torch.ones(4, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match="one device"):
        rms_norm(x, torch.ones(8, device="meta"))
    with pytest.raises(ValueError, match="one device"):
        rms_norm(x, None, 1e-6, torch.ones(4, 8, device="meta"))
    with pytest.raises(ValueError, match="eps"):
        rms_norm(x, eps=-1.0)
    with pytest.raises(ValueError, match="eps"):
        rms_norm(x, eps=float("nan"))
    with pytest.raises(TypeError, match="eps"):
        rms_norm(x, eps="1e-6")
    with pytest.raises(ValueError, match="backend"):
        rms_norm(x, backend="cuda")


BAD_CALLS = {
    # name: (arguments, error, message pattern)
    "prenorm-not-bool": (lambda x: rms_norm(x, prenorm="yes"), TypeError, "prenorm"),
    "prenorm-int": (lambda x: rms_norm(x, prenorm=1), TypeError, "prenorm"),
    "residual_in_fp32-none": (lambda x: rms_norm(x, residual_in_fp32=None), TypeError, "residual_in_fp32"),
    "eps-inf": (lambda x: rms_norm(x, eps=float("inf")), ValueError, "eps"),
    "eps-tensor": (lambda x: rms_norm(x, eps=torch.tensor(1e-6)), TypeError, "eps"),
    "eps-bool": (lambda x: rms_norm(x, eps=True), TypeError, "eps"),
    "eps-none": (lambda x: rms_norm(x, eps=None), TypeError, "eps"),
    "x-none": (lambda x: rms_norm(None), TypeError, "x"),
    "x-sparse": (lambda x: rms_norm(x.to_sparse()), TypeError, "x: expected a dense"),
    "weight-sparse": (lambda x: rms_norm(x, torch.ones(8).to_sparse()), TypeError, "weight"),
    "residual-sparse": (lambda x: rms_norm(x, None, 1e-6, x.to_sparse()), TypeError, "residual"),
    "residual-list": (lambda x: rms_norm(x, None, 1e-6, x.tolist()), TypeError, "residual"),
    "x-bool": (lambda x: rms_norm(x > 0), TypeError, "x: dtype bool"),
    "x-complex": (lambda x: rms_norm(x.to(torch.complex64)), TypeError, "x: dtype complex64"),
    "weight-float64": (
        lambda x: rms_norm(x, torch.ones(8, dtype=torch.float64)),
        TypeError,
        "weight: dtype float64",
    ),
    "residual-float64": (
        lambda x: rms_norm(x, None, 1e-6, x.double()),
        TypeError,
        "residual: dtype float64",
    ),
    "residual-transposed-shape": (
        lambda x: rms_norm(x, None, 1e-6, torch.randn(8, 4)),
        ValueError,
        r"residual: expected shape .*\[4, 8\], got shape \[8, 4\]",
    ),
    "weight-scalar": (
        lambda x: rms_norm(x, torch.tensor(1.0)),
        ValueError,
        r"weight: expected shape .*got shape \[\]",
    ),
    "backend-none": (lambda x: rms_norm(x, backend=None), ValueError, "backend"),
    "backend-uppercase": (lambda x: rms_norm(x, backend="TORCH"), ValueError, "backend"),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_inputs_raise_before_computing(case, monkeypatch):
    """Each bad argument gets its documented error before any backend runs."""
    monkeypatch.setattr(api, "rms_norm_reference", must_not_run)
    if HAS_TRITON:
        from hdgsa_rmsnorm import _triton

        monkeypatch.setattr(_triton, "rms_norm_triton", must_not_run)
    call, error, pattern = BAD_CALLS[case]
    with pytest.raises(error, match=pattern):
        call(torch.randn(4, 8))


def test_backend_environment_variable(monkeypatch):
    """HDGSA_BACKEND overrides "auto" only; an explicit backend wins; empty means unset."""
    x = torch.randn(4, 8)
    expected = rms_norm_reference(x)
    monkeypatch.setenv("HDGSA_BACKEND", "torch")
    assert torch.equal(rms_norm(x, backend="torch"), expected)
    assert torch.equal(rms_norm(x), expected)
    monkeypatch.setenv("HDGSA_BACKEND", "")
    rms_norm(x)
    monkeypatch.setenv("HDGSA_BACKEND", "triton")
    assert torch.equal(rms_norm(x, backend="torch"), expected)
    reason = triton_unavailable_reason(x.device)
    if reason is not None:
        with pytest.raises(RuntimeError, match="triton"):
            rms_norm(x)
    else:
        assert_matches_reference("HDGSA_BACKEND=triton", rms_norm(x), rms_norm_reference(x.double()))
    monkeypatch.setenv("HDGSA_BACKEND", "fla")
    with pytest.raises(ValueError, match="HDGSA_BACKEND"):
        rms_norm(x)
    monkeypatch.setenv("HDGSA_BACKEND", "bogus")
    with pytest.raises(ValueError, match="HDGSA_BACKEND"):
        rms_norm(x)


def test_unavailable_backend_raises(monkeypatch):
    x = torch.randn(4, 8)
    if "triton" not in runnable_backends(x.device):
        with pytest.raises(RuntimeError, match="triton"):
            rms_norm(x, backend="triton")
    monkeypatch.setenv("HDGSA_BACKEND", "torch")
    expected = rms_norm_reference(x.double()).float()
    assert_matches_reference("HDGSA_BACKEND=torch", rms_norm(x), expected.double())
    monkeypatch.setenv("HDGSA_BACKEND", "bogus")
    with pytest.raises(ValueError, match="HDGSA_BACKEND"):
        rms_norm(x)


# ----------------------------------------------------------------------------- Triton specifics

TRITON_DEVICES = [
    pytest.param(
        device,
        id=device,
        marks=[
            pytest.mark.skip(
                reason=f"Triton cannot run here: {triton_unavailable_reason(torch.device(device))}"
            )
        ]
        if triton_unavailable_reason(torch.device(device))
        else [],
    )
    for device in DEVICES
]


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("prenorm", [False, True], ids=["y", "prenorm"])
def test_split_rows_strided(device, prenorm):
    """Rows longer than one program holds, read in place from a padded buffer."""
    hidden = 20000
    check_against_float64((3, hidden), torch.bfloat16, device, "triton", prenorm=prenorm, layout=strided_rows)
    check_against_float64(
        (2, 2, hidden),
        torch.float32,
        device,
        "triton",
        prenorm=prenorm,
        residual_dtype=torch.bfloat16,
        layout=LAYOUTS["transposed-leading"],
    )


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("hidden", [300, 20000])
def test_triton_deterministic_dw(device, hidden):
    """dw is reduced in a fixed order: bitwise the same, run after run, also for many rows."""
    rows = 257 if device == "cuda" else 9
    x, w, r = _inputs((rows, hidden), torch.bfloat16, device)
    dy = make_tensor(rows, hidden, dtype=torch.bfloat16, device=device, seed=5)
    results = []
    for _ in range(3):
        y = rms_norm(x, w, 1e-6, r, backend="triton")
        results.append((y, *torch.autograd.grad(y, (x, w, r), dy)))
    for other in results[1:]:
        for first, again in zip(results[0], other, strict=True):
            assert torch.equal(first, again)


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_gradients_not_aliased_on_leaves(device):
    """dx also serves as the residual's gradient; the leaves' .grad must still be separate."""
    x, w, r = _inputs((4, 64), torch.float32, device)
    rms_norm(x, w, 1e-6, r, backend="triton").sum().backward()
    assert torch.equal(x.grad, r.grad)
    assert x.grad.data_ptr() != r.grad.data_ptr()


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_only_h_used(device):
    """prenorm with only h reaching the loss: gradients pass straight through h = x + residual."""
    x, w, r = _inputs((3, 50), torch.bfloat16, device)
    _y, h = rms_norm(x, w, 1e-6, r, prenorm=True, residual_in_fp32=True, backend="triton")
    dx, dw, dr = torch.autograd.grad(h.sum(), (x, w, r), allow_unused=True)
    assert torch.equal(dx, torch.ones_like(x))
    assert torch.equal(dr, torch.ones_like(r))
    assert dw is None or torch.all(dw == 0)


def _op_args(device, *, prenorm=True, residual_in_fp32=False):
    x, w, r = _inputs((3, 5, 40), torch.float16, device)
    return (x, w, r, 1e-6, residual_in_fp32, prenorm, True)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("variant", ["prenorm", "residual-in-fp32", "no-weight-no-residual"])
def test_opcheck(device, variant):
    from hdgsa_rmsnorm import _triton  # noqa: F401  (registers the custom ops)

    if variant == "prenorm":
        args = _op_args(device)
    elif variant == "residual-in-fp32":
        args = _op_args(device, residual_in_fp32=True)
    else:
        x = make_tensor(7, 33, dtype=torch.bfloat16, device=device, requires_grad=True)
        args = (x, None, None, 1e-5, False, False, True)
    torch.library.opcheck(torch.ops.hdgsa.rms_norm_fwd.default, args)

    x, w, r = (t.detach() for t in _inputs((6, 40), torch.bfloat16, device))
    _y, h, rstd = torch.ops.hdgsa.rms_norm_fwd(x, w, r, 1e-6, False, True, True)
    dy = make_tensor(6, 40, dtype=torch.bfloat16, device=device, seed=9)
    dh = make_tensor(6, 40, dtype=torch.bfloat16, device=device, seed=10)
    bwd = torch.ops.hdgsa.rms_norm_bwd.default
    torch.library.opcheck(bwd, (dy, dh, h, None, rstd, w, torch.bfloat16, torch.bfloat16, True))
    torch.library.opcheck(bwd, (dy, None, x, r.float(), rstd, None, torch.bfloat16, torch.float32, False))


def _inductor_unavailable_reason(device: str) -> str | None:
    if device != "cpu":
        return None
    import shutil

    if shutil.which("g++") is None and shutil.which("c++") is None and shutil.which("clang++") is None:
        return "torch.compile's inductor backend needs a C++ compiler on the CPU and none is installed"
    return None


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_torch_compile_fullgraph(device):
    reason = _inductor_unavailable_reason(device)
    if reason:
        pytest.skip(reason)
    torch._dynamo.reset()

    def block(x, w, r):
        y, h = rms_norm(x, w, 1e-6, r, prenorm=True, backend="triton")
        return y * 2, h

    compiled = torch.compile(block, fullgraph=True)
    x, w, r = _inputs((4, 3, 72), torch.bfloat16, device)
    y, h = compiled(x, w, r)
    y_eager, h_eager = block(x, w, r)
    assert torch.equal(y, y_eager)
    assert torch.equal(h, h_eager)
    dy = make_tensor(4, 3, 72, dtype=torch.bfloat16, device=device, seed=3)
    grads = torch.autograd.grad((y, h), (x, w, r), (dy, dy))
    grads_eager = torch.autograd.grad((y_eager, h_eager), (x, w, r), (dy, dy))
    for name, got, expected in zip(("dx", "dw", "dr"), grads, grads_eager, strict=True):
        assert torch.equal(got, expected), name
    # y only (no prenorm): the backward recomputes h from x and residual
    compiled_y = torch.compile(lambda x, w, r: rms_norm(x, w, 1e-6, r, backend="triton"), fullgraph=True)
    y = compiled_y(x, w, r)
    assert torch.equal(y, rms_norm(x, w, 1e-6, r, backend="triton"))
    dx_c, dr_c = torch.autograd.grad(y, (x, r), dy)
    dx_e, dr_e = torch.autograd.grad(rms_norm(x, w, 1e-6, r, backend="triton"), (x, r), dy)
    assert torch.equal(dx_c, dx_e)
    assert torch.equal(dr_c, dr_e)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("layout", list(WEIGHT_LAYOUTS))
def test_split_rows_weight_layouts(device, layout):
    """The split-row kernels read a strided or expanded weight as it is too."""
    _check_weight_layout(device, "triton", 20000, layout)


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_double_backward_raises(device):
    """The backward kernels have no gradient of their own: differentiating twice is an error,
    not a silently missing term."""
    x, w, _r = _inputs((3, 20), torch.float32, device, residual=False)
    y = rms_norm(x, w, backend="triton")
    (dx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        dx.sum().backward()


def test_one_pass_split_needs_a_cooperative_launch(monkeypatch):
    """The one-pass split kernels wait for partner programs: they run only where a cooperative
    launch guarantees that all programs are resident (or fails the launch); elsewhere, and
    under the interpreter, two passes without waiting."""
    from hdgsa_rmsnorm import _triton_common as common

    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(common, "sm_count", lambda device: 132)
    monkeypatch.setattr(common, "interpreter_enabled", lambda: False)
    monkeypatch.setattr(common, "cooperative_launch_supported", lambda: True)
    assert common.use_one_pass_split(cuda, 32, 2)
    assert not common.use_one_pass_split(cuda, 265, 2)  # more programs than can be resident
    assert not common.use_one_pass_split(torch.device("cpu"), 32, 2)
    monkeypatch.setattr(common, "cooperative_launch_supported", lambda: False)
    assert not common.use_one_pass_split(cuda, 32, 2)
    monkeypatch.setattr(common, "cooperative_launch_supported", lambda: True)
    monkeypatch.setattr(common, "interpreter_enabled", lambda: True)
    assert not common.use_one_pass_split(cuda, 32, 2)


def test_unit_stride_copies_only_when_needed():
    from hdgsa_rmsnorm._triton_common import unit_stride

    packed = torch.randn(8)
    assert unit_stride(packed) is packed
    single = torch.randn(1).expand(1)
    assert unit_stride(single) is single
    strided = torch.randn(16)[::2]
    copied = unit_stride(strided)
    assert copied.stride() == (1,)
    assert torch.equal(copied, strided)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", runnable_backends(torch.device("cuda")))
@pytest.mark.parametrize("hidden", [300, 70000])
def test_no_host_sync(backend, hidden):
    """Forward and backward issue no synchronizing CUDA call."""
    x, w, r = _inputs((8, hidden), torch.bfloat16, "cuda")
    dy = make_tensor(8, hidden, dtype=torch.bfloat16, device="cuda", seed=5)

    def step():
        y, h = rms_norm(x, w, 1e-6, r, prenorm=True, backend=backend)
        return torch.autograd.grad((y, h), (x, w, r), (dy, dy))

    step()  # compiles the kernels (which may sync) outside the checked region
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode(previous)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("hidden", [300, 70000])
def test_tensors_on_another_device_than_the_current_one(hidden):
    """Tensors on cuda:1 while cuda:0 is current: the kernels run on the tensors' device."""
    with torch.cuda.device(0):
        check_against_float64((5, hidden), torch.bfloat16, "cuda:1", "triton", prenorm=True)


def test_torch_compile_dynamic_fullgraph_torch_backend():
    # eps is checked with comparisons: math.isfinite cannot be traced with dynamic=True
    x, weight = make_tensor(4, 8, seed=901), make_tensor(8, seed=902)
    compiled = torch.compile(
        lambda x, w, eps: rms_norm(x, w, eps, backend="torch"),
        dynamic=True,
        fullgraph=True,
        backend="aot_eager",
    )
    assert torch.equal(compiled(x, weight, 1e-6), rms_norm(x, weight, 1e-6, backend="torch"))
