"""gated_indexer: scores and gradients against a float64 einsum of the score formula."""

from __future__ import annotations

import inspect

import pytest
import torch

from hdgsa_core import HAS_CUDA, runnable_backends
from hdgsa_core.testing import assert_matches_reference, grads_of, make_tensor, must_not_run, strided_rows
from hdgsa_indexer import gated_indexer

DEVICES = [torch.device("cpu")] + ([torch.device("cuda")] if HAS_CUDA else [])
DEVICE_BACKENDS = [
    pytest.param(device, backend, id=f"{device.type}-{backend}")
    for device in DEVICES
    for backend in runnable_backends(device)
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def naive_scores(q, k, w, bias, scale, causal, q_offset):
    """The formula written out with einsum (float64 in, float64 out)."""
    logits = torch.einsum("bthd,bsd->bths", q, k) * scale + bias[:, None]
    scores = (torch.sigmoid(w)[..., None] * torch.sigmoid(logits)).sum(2)
    if causal:
        t = torch.arange(q.shape[1], device=q.device)[:, None]
        s = torch.arange(k.shape[1], device=k.device)[None, :]
        scores = scores.masked_fill(s > t + q_offset, float("-inf"))
    return scores


def make_inputs(B, Tq, Tkv, H, d, dtype, device, seed=0, requires_grad=False):
    q = make_tensor(B, Tq, H, d, dtype=dtype, device=device, seed=seed, requires_grad=requires_grad)
    k = make_tensor(B, Tkv, d, dtype=dtype, device=device, seed=seed + 1, requires_grad=requires_grad)
    w = make_tensor(B, Tq, H, dtype=dtype, device=device, seed=seed + 2, requires_grad=requires_grad)
    bias = make_tensor(H, dtype=dtype, device=device, seed=seed + 3, scale=0.5, requires_grad=requires_grad)
    return q, k, w, bias


def as64(*tensors):
    return [t.detach().double().requires_grad_(t.requires_grad) for t in tensors]


# (B, Tq, Tkv, H, d, causal, q_offset)
SHAPES = [
    pytest.param(1, 1, 1, 1, 1, True, 0, id="T1"),
    pytest.param(2, 17, 17, 3, 60, True, 0, id="B2-T17-H3-d60-causal"),
    pytest.param(1, 33, 33, 4, 16, False, 0, id="T33-noncausal"),
    pytest.param(2, 5, 21, 2, 8, True, 16, id="decode-Tq5-Tkv21-offset16"),
    pytest.param(1, 1, 13, 4, 32, True, 12, id="decode-Tq1"),
    pytest.param(1, 9, 4, 2, 8, True, -3, id="negative-offset"),
    pytest.param(3, 7, 11, 5, 7, False, 5, id="noncausal-offset-ignored"),
    # 87 (query, head) rows: the second row block starts inside query 21; several key splits.
    pytest.param(1, 29, 40, 3, 16, True, 11, id="H3-rows-cross-queries"),
    # Tkv a multiple of the 64-key tile (unmasked vector loads and stores along the keys).
    pytest.param(1, 70, 128, 2, 32, True, 58, id="Tkv128-whole-tiles"),
]


@pytest.mark.parametrize(("device", "backend"), DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize(("B", "Tq", "Tkv", "H", "d", "causal", "q_offset"), SHAPES)
def test_forward_and_gradients(device, backend, dtype, B, Tq, Tkv, H, d, causal, q_offset):
    scale = d**-0.5
    inputs = make_inputs(B, Tq, Tkv, H, d, dtype, device, requires_grad=True)
    out = gated_indexer(*inputs, scale, causal, q_offset=q_offset, backend=backend)
    assert out.dtype == torch.float32
    assert out.shape == (B, Tq, Tkv)

    inputs64 = as64(*inputs)
    expected = naive_scores(*inputs64, scale, causal, q_offset)
    assert_matches_reference("scores", out, expected)

    grad_out = make_tensor(B, Tq, Tkv, device=device, seed=9)
    grads = grads_of(out, inputs, grad_out)
    grads64 = grads_of(expected, inputs64, grad_out.double())
    for name, grad, grad64, tensor in zip(("dq", "dk", "dw", "dbias"), grads, grads64, inputs, strict=True):
        assert grad.dtype == tensor.dtype
        assert torch.isfinite(grad).all(), name
        assert_matches_reference(name, grad, grad64)


@pytest.mark.parametrize(("device", "backend"), DEVICE_BACKENDS)
def test_mask_is_exact_and_gradients_stay_finite(device, backend):
    # Query 0 with q_offset=-2 has no valid key at all: its row is -inf and passes no NaN back.
    B, Tq, Tkv, H, d = 1, 6, 5, 2, 4
    inputs = make_inputs(B, Tq, Tkv, H, d, torch.float32, device, requires_grad=True)
    out = gated_indexer(*inputs, 0.5, True, q_offset=-2, backend=backend)
    t = torch.arange(Tq, device=device)[:, None]
    s = torch.arange(Tkv, device=device)[None, :]
    masked = (s > t - 2).expand(B, Tq, Tkv)
    assert torch.isneginf(out[masked]).all()
    assert torch.isfinite(out[~masked]).all()
    out.sum().backward()  # grad 1 on every entry, the -inf ones included
    for tensor in inputs:
        assert torch.isfinite(tensor.grad).all()
    # Keys no query can see get exactly zero gradient.
    assert (inputs[1].grad[:, 4] == 0).all()


@pytest.mark.parametrize(("device", "backend"), DEVICE_BACKENDS)
def test_non_contiguous_inputs(device, backend):
    B, Tq, Tkv, H, d = 2, 11, 11, 3, 12
    q, k, w, bias = make_inputs(B, Tq, Tkv, H, d, torch.float32, device)
    q_view = q.transpose(1, 2).contiguous().transpose(1, 2)  # [B, Tq, H, d] with H outermost
    k_view = strided_rows(k)
    w_view = w.transpose(1, 2).contiguous().transpose(1, 2)
    bias_view = torch.stack([bias, torch.full_like(bias, float("nan"))], dim=-1)[:, 0]
    assert not q_view.is_contiguous()
    assert not k_view.is_contiguous()
    assert not w_view.is_contiguous()
    assert not bias_view.is_contiguous()
    views = [t.requires_grad_() for t in (q_view, k_view, w_view, bias_view)]
    out = gated_indexer(*views, 0.3, backend=backend)
    inputs64 = as64(q, k, w, bias)
    for t in inputs64:
        t.requires_grad_()
    expected = naive_scores(*inputs64, 0.3, True, 0)
    assert_matches_reference("scores", out, expected)
    grad_out = make_tensor(B, Tq, Tkv, device=device, seed=4)
    for name, grad, grad64 in zip(
        ("dq", "dk", "dw", "dbias"),
        grads_of(out, views, grad_out),
        grads_of(expected, inputs64, grad_out.double()),
        strict=True,
    ):
        assert_matches_reference(name, grad, grad64)


@pytest.mark.parametrize(("device", "backend"), DEVICE_BACKENDS)
def test_mixed_input_dtypes(device, backend):
    # bf16 activations with float32 gate parameters, as a model keeps them.
    q, k, w, _ = make_inputs(1, 7, 7, 2, 8, torch.bfloat16, device)
    bias = make_tensor(2, device=device, seed=5)
    out = gated_indexer(q, k, w, bias, backend=backend)
    expected = naive_scores(*as64(q, k, w, bias), 1.0, True, 0)
    assert_matches_reference("scores", out, expected, tol=1e-4)


@pytest.mark.parametrize(("device", "backend"), DEVICE_BACKENDS)
@pytest.mark.parametrize(
    ("B", "Tq", "Tkv", "H", "d"),
    [(0, 3, 3, 2, 4), (2, 0, 3, 2, 4), (2, 3, 0, 2, 4), (1, 3, 3, 0, 4), (1, 3, 3, 2, 0)],
    ids=["B0", "Tq0", "Tkv0", "H0", "d0"],
)
def test_empty_sizes(device, backend, B, Tq, Tkv, H, d):
    inputs = make_inputs(B, Tq, Tkv, H, d, torch.float32, device)
    out = gated_indexer(*inputs, causal=False, backend=backend)
    assert out.shape == (B, Tq, Tkv)
    assert out.dtype == torch.float32
    expected = naive_scores(*as64(*inputs), 1.0, False, 0)
    torch.testing.assert_close(out.double(), expected)


@pytest.mark.parametrize(("device", "backend"), DEVICE_BACKENDS)
def test_deterministic_and_pure(device, backend):
    inputs = make_inputs(2, 19, 19, 4, 24, torch.bfloat16, device)
    before = [t.clone() for t in inputs]
    first = gated_indexer(*inputs, 0.2, backend=backend)
    second = gated_indexer(*inputs, 0.2, backend=backend)
    assert torch.equal(first, second)
    for original, tensor in zip(before, inputs, strict=True):
        assert torch.equal(original, tensor)


def test_backend_choice(monkeypatch):
    inputs = make_inputs(1, 4, 4, 2, 8, torch.float32, "cpu")
    expected = {name: gated_indexer(*inputs, backend=name) for name in runnable_backends(torch.device("cpu"))}
    auto = "triton" if "triton" in expected else "torch"
    assert torch.equal(gated_indexer(*inputs), expected[auto])
    with pytest.raises(ValueError, match="backend"):
        gated_indexer(*inputs, backend="cuda")
    if "triton" not in expected:  # no interpreter: Triton cannot run on CPU tensors
        with pytest.raises(RuntimeError, match="cannot run here"):
            gated_indexer(*inputs, backend="triton")
        monkeypatch.setenv("HDGSA_BACKEND", "triton")
        with pytest.raises(RuntimeError, match="cannot run here"):
            gated_indexer(*inputs)
    else:
        monkeypatch.setenv("HDGSA_BACKEND", "triton")
        assert torch.equal(gated_indexer(*inputs), expected["triton"])
    monkeypatch.setenv("HDGSA_BACKEND", "torch")
    assert torch.equal(gated_indexer(*inputs), expected["torch"])
    monkeypatch.setenv("HDGSA_BACKEND", "bogus")
    with pytest.raises(ValueError, match="HDGSA_BACKEND"):
        gated_indexer(*inputs)


def test_torch_compile_fullgraph():
    inputs = make_inputs(1, 9, 9, 2, 8, torch.float32, "cpu", requires_grad=True)
    compiled = torch.compile(
        lambda q, k, w, b: gated_indexer(q, k, w, b, 0.5, True, q_offset=1),
        backend="aot_eager",
        fullgraph=True,
    )
    out = compiled(*inputs)
    expected = gated_indexer(*inputs, 0.5, True, q_offset=1)
    torch.testing.assert_close(out, expected)
    grad_out = torch.randn_like(out)
    for grad, grad_expected in zip(
        grads_of(out, inputs, grad_out), grads_of(expected, inputs, grad_out), strict=True
    ):
        torch.testing.assert_close(grad, grad_expected)


def _good():
    return make_inputs(2, 5, 7, 3, 4, torch.float32, "cpu")


@pytest.mark.parametrize(
    ("change", "error", "pattern"),
    [
        (
            lambda q, k, w, b: (q[0], k, w, b),
            ValueError,
            r"q: expected shape \[B, Tq, H, d\], got shape \[5, 3, 4\]",
        ),
        (lambda q, k, w, b: (q, k[0], w, b), ValueError, r"k: expected shape \[B, Tkv, d\]"),
        (lambda q, k, w, b: (q, k, w[..., None], b), ValueError, r"w: expected shape \[B, Tq, H\]"),
        (lambda q, k, w, b: (q, k, w, b[None]), ValueError, r"bias: expected shape \[H\]"),
        (
            lambda q, k, w, b: (q, k[:1], w, b),
            ValueError,
            r"k: expected shape .*\[2, \*, 4\], got shape \[1, 7, 4\]",
        ),
        (lambda q, k, w, b: (q, k[..., :3], w, b), ValueError, r"k: expected shape .*got shape \[2, 7, 3\]"),
        (
            lambda q, k, w, b: (q, k, w[:, :4], b),
            ValueError,
            r"w: expected shape .*\[2, 5, 3\], got shape \[2, 4, 3\]",
        ),
        (lambda q, k, w, b: (q, k, w[..., :2], b), ValueError, r"w: expected shape"),
        (lambda q, k, w, b: (q, k, w, b[:2]), ValueError, r"bias: expected shape .*\[3\], got shape \[2\]"),
        (lambda q, k, w, b: (q.double(), k, w, b), TypeError, r"q: dtype float64"),
        (lambda q, k, w, b: (q, k.to(torch.int32), w, b), TypeError, r"k: dtype int32"),
        (lambda q, k, w, b: (q, k, w.half().to(torch.int64), b), TypeError, r"w: dtype int64"),
        (lambda q, k, w, b: (q, k, w, b.to(torch.float64)), TypeError, r"bias: dtype float64"),
        (lambda q, k, w, b: (q, k.to("meta"), w, b), ValueError, r"one device"),
        (lambda q, k, w, b: (q.numpy(), k, w, b), TypeError, r"q: expected a torch.Tensor"),
    ],
    ids=[
        "q-rank",
        "k-rank",
        "w-rank",
        "bias-rank",
        "k-batch",
        "k-dim",
        "w-time",
        "w-heads",
        "bias-heads",
        "q-float64",
        "k-int",
        "w-int",
        "bias-float64",
        "device",
        "q-not-tensor",
    ],
)
def test_bad_inputs(change, error, pattern, monkeypatch):
    monkeypatch.setattr("hdgsa_indexer.api.gated_indexer_reference", must_not_run)
    with pytest.raises(error, match=pattern):
        gated_indexer(*change(*_good()))


def test_bad_options(monkeypatch):
    monkeypatch.setattr("hdgsa_indexer.api.gated_indexer_reference", must_not_run)
    q, k, w, b = _good()
    with pytest.raises(TypeError, match="scale"):
        gated_indexer(q, k, w, b, scale="1")
    with pytest.raises(TypeError, match="causal"):
        gated_indexer(q, k, w, b, causal=1)
    with pytest.raises(TypeError, match="q_offset"):
        gated_indexer(q, k, w, b, q_offset=1.5)


@pytest.mark.skipif(not HAS_CUDA, reason="needs two devices")
def test_cuda_cpu_mix_is_rejected():
    q, k, w, b = _good()
    with pytest.raises(ValueError, match="one device"):
        gated_indexer(q.cuda(), k, w, b)


def test_signature():
    kinds = inspect.Parameter
    expected = [
        ("q", kinds.POSITIONAL_OR_KEYWORD, kinds.empty),
        ("k", kinds.POSITIONAL_OR_KEYWORD, kinds.empty),
        ("w", kinds.POSITIONAL_OR_KEYWORD, kinds.empty),
        ("bias", kinds.POSITIONAL_OR_KEYWORD, kinds.empty),
        ("scale", kinds.POSITIONAL_OR_KEYWORD, 1.0),
        ("causal", kinds.POSITIONAL_OR_KEYWORD, True),
        ("q_offset", kinds.KEYWORD_ONLY, 0),
        ("backend", kinds.KEYWORD_ONLY, "auto"),
    ]
    parameters = inspect.signature(gated_indexer).parameters.values()
    assert [(p.name, p.kind, p.default) for p in parameters] == expected


@pytest.mark.parametrize(("device", "backend"), DEVICE_BACKENDS)
def test_autocast_keeps_float32(device, backend):
    # A model trained under torch.autocast calls the op there: scores stay float32 math and
    # float32 output, bitwise what they are outside the autocast region.
    inputs = make_inputs(2, 9, 11, 3, 16, torch.float32, device, requires_grad=True)
    grad_out = make_tensor(2, 9, 11, device=device, seed=6)
    expected = gated_indexer(*inputs, 0.25, q_offset=2, backend=backend)
    expected_grads = grads_of(expected, inputs, grad_out)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        out = gated_indexer(*inputs, 0.25, q_offset=2, backend=backend)
    assert out.dtype == torch.float32
    assert torch.equal(out, expected)
    for grad, grad_expected in zip(grads_of(out, inputs, grad_out), expected_grads, strict=True):
        assert torch.equal(grad, grad_expected)


def test_explicit_backend_wins_over_the_environment(monkeypatch):
    inputs = make_inputs(1, 4, 4, 2, 8, torch.float32, "cpu")
    expected = gated_indexer(*inputs, backend="torch")
    monkeypatch.setenv("HDGSA_BACKEND", "triton")  # overrides only backend="auto"
    assert torch.equal(gated_indexer(*inputs, backend="torch"), expected)
    monkeypatch.setenv("HDGSA_BACKEND", "")  # empty: no override
    torch.testing.assert_close(gated_indexer(*inputs), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("device", "backend"), DEVICE_BACKENDS)
@pytest.mark.parametrize("mode", ["deterministic", "default"])
def test_backward_is_deterministic(device, backend, mode):
    # The backward has no atomics: bitwise the same gradients in either mode. 100 keys and
    # 2 * 57 * 3 rows: several key blocks and several row splits of the k gradient.
    inputs = make_inputs(2, 57, 100, 3, 8, torch.bfloat16, device, requires_grad=True)
    grad_out = make_tensor(2, 57, 100, device=device, seed=7)
    was_enabled = torch.are_deterministic_algorithms_enabled()
    was_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(mode == "deterministic", warn_only=True)
    try:
        runs = [
            grads_of(gated_indexer(*inputs, 0.3, q_offset=43, backend=backend), inputs, grad_out)
            for _ in range(2)
        ]
    finally:
        torch.use_deterministic_algorithms(was_enabled, warn_only=was_warn_only)
    for first, second in zip(*runs, strict=True):
        assert torch.equal(first, second)


@pytest.mark.skipif(not HAS_CUDA, reason="host syncs are a CUDA matter")
def test_no_host_sync_on_cuda():
    inputs = make_inputs(2, 33, 33, 4, 16, torch.bfloat16, "cuda", requires_grad=True)
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")  # any host sync raises
    try:
        gated_indexer(*inputs, 0.25, q_offset=3)
    finally:
        torch.cuda.set_sync_debug_mode(previous)


# Head counts and head dims of the model's indexer, subsampled: (H, d, dtype).
HEAD_SHAPES = [
    pytest.param(1, 16, torch.float32, id="H1-d16-fp32"),
    pytest.param(4, 32, torch.bfloat16, id="H4-d32-bf16"),
    pytest.param(8, 64, torch.float16, id="H8-d64-fp16"),
    pytest.param(16, 128, torch.float32, id="H16-d128-fp32"),
    pytest.param(4, 64, torch.float32, id="H4-d64-fp32"),
]


@pytest.mark.parametrize(("device", "backend"), DEVICE_BACKENDS)
@pytest.mark.parametrize(("H", "d", "dtype"), HEAD_SHAPES)
def test_head_counts_and_dims(device, backend, H, d, dtype):
    # Tq < Tkv with q_offset, sizes that cross tile edges (64) on both axes.
    B, Tq, Tkv, q_offset = 1, 67, 83, 16
    scale = d**-0.5
    inputs = make_inputs(B, Tq, Tkv, H, d, dtype, device, seed=11, requires_grad=True)
    out = gated_indexer(*inputs, scale, True, q_offset=q_offset, backend=backend)
    inputs64 = as64(*inputs)
    expected = naive_scores(*inputs64, scale, True, q_offset)
    error = assert_matches_reference("scores", out, expected)
    if dtype == torch.float32 and backend == "triton":
        assert error <= 1e-5  # float32 inputs keep float32 accuracy
    grad_out = make_tensor(B, Tq, Tkv, device=device, seed=12)
    for name, grad, grad64 in zip(
        ("dq", "dk", "dw", "dbias"),
        grads_of(out, inputs, grad_out),
        grads_of(expected, inputs64, grad_out.double()),
        strict=True,
    ):
        assert_matches_reference(name, grad, grad64)


@pytest.mark.parametrize(
    "device", [d for d in DEVICES if "triton" in runnable_backends(d)], ids=lambda d: d.type
)
def test_opcheck(device):
    import hdgsa_indexer._triton  # noqa: F401  (registers the custom ops)

    q, k, w, bias = make_inputs(1, 5, 7, 2, 8, torch.float32, device, requires_grad=True)
    torch.library.opcheck(torch.ops.hdgsa.gated_indexer_fwd.default, (q, k, w, bias, 0.5, True, 1))
    dscore = make_tensor(1, 5, 7, device=device, seed=5)
    args = (dscore, q.detach(), k.detach(), w.detach(), bias.detach(), 0.5, True, 1)
    torch.library.opcheck(torch.ops.hdgsa.gated_indexer_bwd.default, args)
