"""indexer_scores_at: scores at chosen keys and their gradients, against float64 and against
gated_indexer's scores gathered at the same keys."""

from __future__ import annotations

import inspect

import pytest
import torch

from hdgsa_core import HAS_CUDA, HAS_TRITON, runnable_backends
from hdgsa_core.testing import assert_matches_reference, grads_of, make_tensor, must_not_run, strided_rows
from hdgsa_indexer import gated_indexer, indexer_scores_at, indexer_topk

DEVICES = [torch.device("cpu")] + ([torch.device("cuda")] if HAS_CUDA else [])
DEVICE_BACKENDS = [
    pytest.param(device, backend, id=f"{device.type}-{backend}")
    for device in DEVICES
    for backend in runnable_backends(device)
]


def make_inputs(B, Tq, Tkv, H, d, dtype, device, seed=0, requires_grad=False):
    q = make_tensor(B, Tq, H, d, dtype=dtype, device=device, seed=seed, requires_grad=requires_grad)
    k = make_tensor(B, Tkv, d, dtype=dtype, device=device, seed=seed + 1, requires_grad=requires_grad)
    w = make_tensor(B, Tq, H, dtype=dtype, device=device, seed=seed + 2, requires_grad=requires_grad)
    bias = make_tensor(H, dtype=dtype, device=device, seed=seed + 3, scale=0.5, requires_grad=requires_grad)
    return q, k, w, bias


def make_indices(B, Tq, Tkv, K, device, seed=0, dtype=torch.int64, empty=True):
    """Random keys, repeats allowed; about one slot in five empty (-1) when ``empty``."""
    generator = torch.Generator().manual_seed(seed)
    low = -max(1, Tkv // 4) if empty else 0
    indices = torch.randint(low, Tkv, (B, Tq, K), generator=generator).clamp(min=-1)
    return indices.to(device=device, dtype=dtype)


def as64(*tensors):
    return [t.detach().double().requires_grad_(t.requires_grad) for t in tensors]


def naive_scores_at(q, k, w, bias, indices, scale):
    """The formula with einsum over every key, then a gather (float64 in, float64 out)."""
    logits = torch.einsum("bthd,bsd->bths", q, k) * scale + bias[:, None]
    dense = (torch.sigmoid(w)[..., None] * torch.sigmoid(logits)).sum(2)
    picked = torch.gather(dense, -1, indices.long().clamp(min=0))
    return picked.masked_fill(indices < 0, float("-inf"))


# (B, Tq, Tkv, H, d, K)
SHAPES = [
    pytest.param(1, 1, 1, 1, 1, 1, id="T1"),
    pytest.param(2, 9, 23, 3, 20, 7, id="B2-Tq9-Tkv23-H3-d20-K7"),
    pytest.param(1, 5, 70, 4, 16, 70, id="K-eq-Tkv"),
    pytest.param(1, 3, 10, 2, 32, 90, id="K-gt-Tkv-repeats"),
    pytest.param(1, 4, 33, 8, 64, 13, id="H8-d64"),
    pytest.param(1, 2, 17, 16, 128, 5, id="H16-d128"),
    pytest.param(2, 3, 12, 1, 60, 65, id="H1-d60-K65"),
]


@pytest.mark.parametrize(("device", "backend"), DEVICE_BACKENDS)
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"]
)
@pytest.mark.parametrize(("B", "Tq", "Tkv", "H", "d", "K"), SHAPES)
def test_forward_and_gradients(device, backend, dtype, B, Tq, Tkv, H, d, K):
    scale = d**-0.5
    inputs = make_inputs(B, Tq, Tkv, H, d, dtype, device, requires_grad=True)
    indices = make_indices(B, Tq, Tkv, K, device)
    out = indexer_scores_at(*inputs, indices, scale, backend=backend)
    assert out.dtype == torch.float32
    assert out.shape == (B, Tq, K)
    inputs64 = as64(*inputs)
    expected = naive_scores_at(*inputs64, indices, scale)
    assert_matches_reference("scores", out, expected)
    assert torch.isneginf(out[indices < 0]).all()

    grad_out = make_tensor(B, Tq, K, device=device, seed=9)
    grads = grads_of(out, inputs, grad_out)
    grads64 = grads_of(expected, inputs64, grad_out.double().masked_fill(indices < 0, 0.0))
    for name, grad, grad64, tensor in zip(("dq", "dk", "dw", "dbias"), grads, grads64, inputs, strict=True):
        assert grad.dtype == tensor.dtype
        assert torch.isfinite(grad).all(), name
        assert_matches_reference(name, grad, grad64)


@pytest.mark.parametrize(("device", "backend"), DEVICE_BACKENDS)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_equals_gated_indexer_gathered(device, backend, causal):
    # The keys indexer_topk picks, scored again: the same values and the same gradients as
    # the dense scores gathered at those keys.
    B, Tq, Tkv, H, d, topk = 2, 21, 30, 4, 16, 6
    inputs = make_inputs(B, Tq, Tkv, H, d, torch.float32, device, seed=3, requires_grad=True)
    q_offset = Tkv - Tq
    indices, _ = indexer_topk(*inputs, topk, 0.25, causal, q_offset=q_offset, sink_size=1, backend=backend)
    dense = gated_indexer(*inputs, 0.25, causal, q_offset=q_offset, backend=backend)
    gathered = torch.gather(dense, -1, indices.long().clamp(min=0)).masked_fill(indices < 0, float("-inf"))
    out = indexer_scores_at(*inputs, indices, 0.25, backend=backend)
    torch.testing.assert_close(out, gathered, rtol=1e-5, atol=1e-6)
    grad_out = make_tensor(B, Tq, topk, device=device, seed=4)
    for grad, expected in zip(
        grads_of(out, inputs, grad_out),
        grads_of(gathered, inputs, grad_out.masked_fill(indices < 0, 0.0)),
        strict=True,
    ):
        torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("device", "backend"), DEVICE_BACKENDS)
def test_empty_slots_pass_no_gradient(device, backend):
    inputs = make_inputs(1, 4, 9, 2, 8, torch.float32, device, requires_grad=True)
    indices = torch.full((1, 4, 5), -1, dtype=torch.int32, device=device)
    indices[0, 1, 2] = 3
    out = indexer_scores_at(*inputs, indices, backend=backend)
    assert torch.isneginf(out[indices < 0]).all()
    assert torch.isfinite(out[0, 1, 2])
    out.sum().backward()  # gradient 1 everywhere, -inf slots included
    q, k, w, _ = inputs
    assert torch.isfinite(k.grad).all()
    assert (k.grad[0, torch.arange(9, device=device) != 3] == 0).all()
    assert (q.grad[0, [0, 2, 3]] == 0).all()
    assert (w.grad[0, [0, 2, 3]] == 0).all()
    assert (q.grad[0, 1] != 0).any()


@pytest.mark.parametrize(("device", "backend"), DEVICE_BACKENDS)
def test_non_contiguous_inputs(device, backend):
    B, Tq, Tkv, H, d, K = 2, 7, 15, 3, 12, 9
    q, k, w, bias = make_inputs(B, Tq, Tkv, H, d, torch.float32, device)
    indices = make_indices(B, Tq, Tkv, K, device, dtype=torch.int32)
    views = [
        q.transpose(1, 2).contiguous().transpose(1, 2),
        strided_rows(k),
        w.transpose(1, 2).contiguous().transpose(1, 2),
        torch.stack([bias, torch.full_like(bias, float("nan"))], dim=-1)[:, 0],
    ]
    index_view = strided_rows(indices)
    assert not any(t.is_contiguous() for t in [*views, index_view])
    views = [t.requires_grad_() for t in views]
    out = indexer_scores_at(*views, index_view, 0.3, backend=backend)
    inputs64 = [t.requires_grad_() for t in as64(q, k, w, bias)]
    expected = naive_scores_at(*inputs64, indices, 0.3)
    assert_matches_reference("scores", out, expected)
    grad_out = make_tensor(B, Tq, K, device=device, seed=4)
    for name, grad, grad64 in zip(
        ("dq", "dk", "dw", "dbias"),
        grads_of(out, views, grad_out),
        grads_of(expected, inputs64, grad_out.double().masked_fill(indices < 0, 0.0)),
        strict=True,
    ):
        assert_matches_reference(name, grad, grad64)


@pytest.mark.parametrize(("device", "backend"), DEVICE_BACKENDS)
def test_deterministic_mode_is_bitwise_reproducible(device, backend):
    inputs = make_inputs(2, 11, 19, 3, 16, torch.bfloat16, device, requires_grad=True)
    indices = make_indices(2, 11, 19, 40, device)  # many repeats: a key gets many slots
    grad_out = make_tensor(2, 11, 40, device=device, seed=7)
    was_enabled = torch.are_deterministic_algorithms_enabled()
    was_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        runs = [
            grads_of(indexer_scores_at(*inputs, indices, backend=backend), inputs, grad_out) for _ in range(3)
        ]
    finally:
        torch.use_deterministic_algorithms(was_enabled, warn_only=was_warn_only)
    for grads in runs[1:]:
        for first, again in zip(runs[0], grads, strict=True):
            assert torch.equal(first, again)
    # The default (atomic) k gradient agrees with the deterministic one up to rounding.
    default = grads_of(indexer_scores_at(*inputs, indices, backend=backend), inputs, grad_out)
    torch.testing.assert_close(default[1].float(), runs[0][1].float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize(("device", "backend"), DEVICE_BACKENDS)
@pytest.mark.parametrize(("B", "Tq", "K"), [(0, 3, 2), (2, 0, 2), (2, 3, 0)], ids=["B0", "Tq0", "K0"])
def test_empty_sizes(device, backend, B, Tq, K):
    inputs = make_inputs(B, Tq, 5, 2, 4, torch.float32, device, requires_grad=True)
    indices = torch.zeros(B, Tq, K, dtype=torch.int64, device=device)
    out = indexer_scores_at(*inputs, indices, backend=backend)
    assert out.shape == (B, Tq, K)
    grads = grads_of(out, inputs, torch.ones_like(out))
    for grad, tensor in zip(grads, inputs, strict=True):
        assert grad is None or (grad.shape == tensor.shape and (grad == 0).all())


@pytest.mark.parametrize(("device", "backend"), DEVICE_BACKENDS)
def test_autocast_keeps_float32(device, backend):
    inputs = make_inputs(1, 6, 14, 3, 16, torch.float32, device, requires_grad=True)
    indices = make_indices(1, 6, 14, 8, device)
    expected = indexer_scores_at(*inputs, indices, 0.25, backend=backend)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        out = indexer_scores_at(*inputs, indices, 0.25, backend=backend)
    assert out.dtype == torch.float32
    assert torch.equal(out, expected)


def test_torch_compile_fullgraph():
    inputs = make_inputs(1, 6, 10, 2, 8, torch.float32, "cpu", requires_grad=True)
    indices = make_indices(1, 6, 10, 4, "cpu")
    compiled = torch.compile(
        lambda q, k, w, b, i: indexer_scores_at(q, k, w, b, i, 0.5), backend="aot_eager", fullgraph=True
    )
    out = compiled(*inputs, indices)
    expected = indexer_scores_at(*inputs, indices, 0.5)
    torch.testing.assert_close(out, expected)
    grad_out = torch.randn_like(out)
    for grad, grad_expected in zip(
        grads_of(out, inputs, grad_out), grads_of(expected, inputs, grad_out), strict=True
    ):
        torch.testing.assert_close(grad, grad_expected)


@pytest.mark.parametrize(
    "device", [d for d in DEVICES if "triton" in runnable_backends(d)], ids=lambda d: d.type
)
def test_opcheck(device):
    import hdgsa_indexer._triton  # noqa: F401  (registers the custom ops)

    q, k, w, bias = make_inputs(1, 3, 7, 2, 8, torch.float32, device, requires_grad=True)
    indices = make_indices(1, 3, 7, 4, device)
    torch.library.opcheck(torch.ops.hdgsa.indexer_scores_at_fwd.default, (q, k, w, bias, indices, 0.5))
    dout = make_tensor(1, 3, 4, device=device, seed=5)
    args = (dout, q.detach(), k.detach(), w.detach(), bias.detach(), indices, 0.5, True)
    torch.library.opcheck(torch.ops.hdgsa.indexer_scores_at_bwd.default, args)


def _good():
    q, k, w, b = make_inputs(2, 5, 7, 3, 4, torch.float32, "cpu")
    return q, k, w, b, make_indices(2, 5, 7, 3, "cpu")


@pytest.mark.parametrize(
    ("change", "error", "pattern"),
    [
        (lambda q, k, w, b, i: (q, k, w, b, i[0]), ValueError, r"indices: expected shape \[B, Tq, K\]"),
        (
            lambda q, k, w, b, i: (q, k, w, b, i[:1]),
            ValueError,
            r"indices: expected shape .*got shape \[1, 5, 3\]",
        ),
        (lambda q, k, w, b, i: (q, k, w, b, i[:, :4]), ValueError, r"indices: expected shape"),
        (lambda q, k, w, b, i: (q, k, w, b, i.float()), TypeError, r"indices: dtype float32"),
        (lambda q, k, w, b, i: (q, k, w, b, i.numpy()), TypeError, r"indices: expected a torch.Tensor"),
        (lambda q, k, w, b, i: (q, k, w, b, i + 7), ValueError, r"indices: index \d+ is out of range.*< 7"),
        (lambda q, k, w, b, i: (q, k, w, b, i.to("meta")), ValueError, r"one device"),
        (lambda q, k, w, b, i: (q[0], k, w, b, i), ValueError, r"q: expected shape \[B, Tq, H, d\]"),
        (lambda q, k, w, b, i: (q, k, w, b.double(), i), TypeError, r"bias: dtype float64"),
    ],
    ids=[
        "rank",
        "batch",
        "queries",
        "float-indices",
        "not-tensor",
        "out-of-range",
        "device",
        "q-rank",
        "bias-f64",
    ],
)
def test_bad_inputs(change, error, pattern, monkeypatch):
    monkeypatch.setattr("hdgsa_indexer.api.indexer_scores_at_reference", must_not_run)
    if HAS_TRITON:  # without Triton the Triton path cannot even be imported
        monkeypatch.setattr("hdgsa_indexer._triton.indexer_scores_at_fwd", must_not_run)
    with pytest.raises(error, match=pattern):
        indexer_scores_at(*change(*_good()))


def test_bad_options():
    q, k, w, b, i = _good()
    with pytest.raises(TypeError, match="scale"):
        indexer_scores_at(q, k, w, b, i, scale="1")
    with pytest.raises(ValueError, match="backend"):
        indexer_scores_at(q, k, w, b, i, backend="fla")


def test_signature():
    kinds = inspect.Parameter
    expected = [
        ("q", kinds.POSITIONAL_OR_KEYWORD, kinds.empty),
        ("k", kinds.POSITIONAL_OR_KEYWORD, kinds.empty),
        ("w", kinds.POSITIONAL_OR_KEYWORD, kinds.empty),
        ("bias", kinds.POSITIONAL_OR_KEYWORD, kinds.empty),
        ("indices", kinds.POSITIONAL_OR_KEYWORD, kinds.empty),
        ("scale", kinds.POSITIONAL_OR_KEYWORD, 1.0),
        ("backend", kinds.KEYWORD_ONLY, "auto"),
    ]
    parameters = inspect.signature(indexer_scores_at).parameters.values()
    assert [(p.name, p.kind, p.default) for p in parameters] == expected


@pytest.mark.skipif(not HAS_CUDA, reason="measures CUDA memory")
def test_memory_is_linear_in_the_slots_on_cuda():
    B, T, H, d, K = 1, 8192, 4, 64, 64
    inputs = make_inputs(B, T, T, H, d, torch.bfloat16, "cuda", requires_grad=True)
    indices = make_indices(B, T, T, K, "cuda", empty=False)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    out = indexer_scores_at(*inputs, indices, d**-0.5)
    grads_of(out, inputs, torch.ones_like(out))
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - start
    assert extra < 4 * T * T // 8, extra  # far below the [T, T] float32 matrix
