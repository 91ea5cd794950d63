"""sparse_attention against float64 references: values, lse and the gradients of q, k, v."""

from __future__ import annotations

import contextlib
import inspect
import math

import pytest
import torch

from hdgsa_core import runnable_backends
from hdgsa_core.testing import DEFAULT_TOLERANCE, assert_close, make_tensor, must_not_run, strided_rows
from hdgsa_sparse_attn import sparse_attention
from hdgsa_sparse_attn.reference import (
    WORKSPACE_BYTES,
    query_chunk_size,
    sparse_attention_dense,
    sparse_attention_torch,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
CASES = [(device, backend) for device in DEVICES for backend in runnable_backends(torch.device(device))]
CASE_IDS = [f"{device}-{backend}" for device, backend in CASES]
TRITON_DEVICES = [device for device, backend in CASES if backend == "triton"]
# The Triton backward's dk/dv paths: float atomics from the dq kernel ("scatter"), the
# key-major kernel over an atomic counting sort ("key_major"), and the deterministic one.
BACKWARD_PATHS = ["scatter", "key_major", "deterministic"]


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool):
    """``torch.use_deterministic_algorithms(enabled)`` inside, the previous setting after."""
    was_enabled = torch.are_deterministic_algorithms_enabled()
    was_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(enabled)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was_enabled, warn_only=was_warn_only)


def backward_path(path: str, monkeypatch: pytest.MonkeyPatch) -> contextlib.AbstractContextManager:
    """Make the Triton backward take ``path``: the deterministic mode, or a forced fast path."""
    if path != "deterministic":
        monkeypatch.setattr("hdgsa_sparse_attn._triton_bwd.fast_path_for", lambda *_: path)
    return deterministic_algorithms(path == "deterministic")


def index_shape(layout: str, batch: int, seq_len: int, topk: int, hq: int, hkv: int) -> tuple[int, ...]:
    heads = {"per_query": hq, "per_kv": hkv, "shared": 1}
    if layout == "shared3d":
        return (batch, seq_len, topk)
    return (batch, heads[layout], seq_len, topk)


def make_indices(shape: tuple[int, ...], num_keys: int, seed: int, dtype=torch.int64, low: int = -2):
    """Random indices in [low, num_keys): negatives (masked) and repeats included."""
    generator = torch.Generator().manual_seed(seed)
    indices = torch.randint(low, num_keys, shape, generator=generator)
    if shape[-1] >= 2 and num_keys > 0:
        indices[..., 0] = indices[..., 0].clamp(min=0)
        indices[..., 1] = indices[..., 0]  # a repeated index on every row
    return indices.to(dtype)


def make_mask(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mask = torch.rand(shape, generator=generator) > 0.3
    mask[..., 0, :] = False  # query 0 attends to nothing
    return mask


def check_against_dense(q, k, v, indices, mask=None, scale=None, *, backend="torch", tol=None, grad_lse=True):
    """Run the op and its float64 dense reference; compare out, lse and the grads of q, k, v."""
    dtype = q.dtype
    tol = DEFAULT_TOLERANCE[dtype] if tol is None else tol
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out, lse = sparse_attention(q, k, v, indices, mask, scale, return_lse=True, backend=backend)
    assert out.dtype == dtype
    assert out.shape == (*q.shape[:3], v.shape[-1])
    assert lse.dtype == torch.float32
    assert lse.shape == (q.shape[0], q.shape[2], q.shape[1])

    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out64, lse64 = sparse_attention_dense(q64, k64, v64, indices, mask, scale)
    assert_close("out", out, out64, tol)
    assert_close("lse", lse, lse64, tol)

    grad_out = make_tensor(*out.shape, dtype=dtype, device=out.device, seed=99)
    # The lse enters the loss too (through its finite entries), so its gradient is checked.
    lse_weight = 0.5 if grad_lse else 0.0
    finite = torch.isfinite(lse64)
    loss = (out.float() * grad_out.float()).sum() + lse_weight * lse[finite].sum()
    loss64 = (out64 * grad_out.double()).sum() + lse_weight * lse64[finite].sum()
    grads = torch.autograd.grad(loss, (q, k, v))
    grads64 = torch.autograd.grad(loss64, (q64, k64, v64))
    for name, grad, grad64 in zip(("dq", "dk", "dv"), grads, grads64, strict=True):
        assert grad.dtype == dtype
        assert torch.isfinite(grad).all(), f"{name} has non-finite values"
        assert_close(name, grad, grad64, tol)
    return out, lse


@pytest.mark.parametrize(("device", "backend"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("layout", ["per_query", "per_kv", "shared", "shared3d"])
@pytest.mark.parametrize(("hq", "hkv"), [(3, 3), (4, 2), (4, 1)], ids=["group1", "group2", "group4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_layouts_and_groups(device, backend, layout, hq, hkv, dtype):
    batch, seq_len, num_keys, topk, dim, dim_v = 2, 5, 11, 6, 60, 24
    q = make_tensor(batch, seq_len, hq, dim, dtype=dtype, device=device, seed=1)
    k = make_tensor(batch, num_keys, hkv, dim, dtype=dtype, device=device, seed=2)
    v = make_tensor(batch, num_keys, hkv, dim_v, dtype=dtype, device=device, seed=3)
    shape = index_shape(layout, batch, seq_len, topk, hq, hkv)
    indices = make_indices(shape, num_keys, seed=4).to(device)
    mask = make_mask(shape, seed=5).to(device)
    out, lse = check_against_dense(q, k, v, indices, mask, backend=backend)
    # Query 0 is fully masked: zero output, -inf lse.
    assert (out[:, 0] == 0).all()
    assert torch.isneginf(lse[:, :, 0]).all()


@pytest.mark.parametrize(("device", "backend"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize(
    "dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"]
)
def test_without_mask(device, backend, dtype):
    q = make_tensor(1, 7, 4, 32, dtype=dtype, device=device, seed=11)
    k = make_tensor(1, 9, 2, 32, dtype=dtype, device=device, seed=12)
    v = make_tensor(1, 9, 2, 32, dtype=dtype, device=device, seed=13)
    indices = make_indices((1, 4, 7, 5), 9, seed=14).to(device)
    check_against_dense(q, k, v, indices, backend=backend)


def test_literal_formula():
    """A per-row loop straight from the formula in docs/api.md (independent of both vectorized versions)."""
    batch, seq_len, hq, hkv, num_keys, topk, dim, dim_v = 2, 3, 4, 2, 6, 5, 8, 3
    q = make_tensor(batch, seq_len, hq, dim, seed=21)
    k = make_tensor(batch, num_keys, hkv, dim, seed=22)
    v = make_tensor(batch, num_keys, hkv, dim_v, seed=23)
    indices = make_indices((batch, hq, seq_len, topk), num_keys, seed=24)
    mask = make_mask(indices.shape, seed=25)
    scale = 0.3
    out, lse = sparse_attention(q, k, v, indices, mask, scale, return_lse=True)
    group = hq // hkv
    for b in range(batch):
        for t in range(seq_len):
            for h in range(hq):
                slots = [int(i) for i, m in zip(indices[b, h, t], mask[b, h, t], strict=True) if i >= 0 and m]
                if not slots:
                    assert (out[b, t, h] == 0).all()
                    assert lse[b, h, t] == -math.inf
                    continue
                keys = k[b, slots, h // group].double()
                scores = scale * keys @ q[b, t, h].double()
                probs = torch.softmax(scores, 0)
                expected = probs @ v[b, slots, h // group].double()
                assert_close("out row", out[b, t, h], expected, 1e-5)
                assert_close("lse row", lse[b, h, t], torch.logsumexp(scores, 0), 1e-6)


def test_repeated_index_counts_twice():
    q = make_tensor(1, 1, 1, 4, seed=31)
    k = make_tensor(1, 2, 1, 4, seed=32)
    v = make_tensor(1, 2, 1, 2, seed=33)
    out_twice = sparse_attention(q, k, v, torch.tensor([[[0, 0, 1]]]))
    scores = (k[0, :, 0] @ q[0, 0, 0]) * 4**-0.5
    weights = torch.stack([2 * scores[0].exp(), scores[1].exp()])
    expected = (weights / weights.sum()) @ v[0, :, 0]
    assert_close("out", out_twice[0, 0, 0], expected, 1e-6)


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 100])
def test_chunked_gather_matches_dense(chunk_size):
    q = make_tensor(2, 7, 4, 12, dtype=torch.float64, seed=41, requires_grad=True)
    k = make_tensor(2, 10, 2, 12, dtype=torch.float64, seed=42, requires_grad=True)
    v = make_tensor(2, 10, 2, 5, dtype=torch.float64, seed=43, requires_grad=True)
    indices = make_indices((2, 4, 7, 6), 10, seed=44)
    mask = make_mask(indices.shape, seed=45)
    out, lse = sparse_attention_torch(q, k, v, indices, mask, chunk_size=chunk_size)
    out64, lse64 = sparse_attention_dense(q, k, v, indices, mask)
    assert_close("out", out, out64, 1e-12)
    assert_close("lse", lse, lse64, 1e-12)
    grad_out = make_tensor(*out.shape, dtype=torch.float64, seed=46)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    grads64 = torch.autograd.grad(out64, (q, k, v), grad_out)
    for name, grad, grad64 in zip(("dq", "dk", "dv"), grads, grads64, strict=True):
        assert_close(name, grad, grad64, 1e-12)


def test_chunk_size_fits_workspace():
    # The benchmark shape: B1 T8192 H16 D128 k512, per query head.
    chunk = query_chunk_size(1, 16, 16, 16, 512, 128, 128)
    gathered_per_query = 16 * 512 * (128 + 128) * 4
    assert chunk >= 1
    assert chunk * gathered_per_query <= WORKSPACE_BYTES
    assert query_chunk_size(1, 16, 16, 16, 512, 128, 128, workspace_bytes=1) == 1
    # Shared lists gather each row once per KV head, not per query head: bigger chunks.
    assert query_chunk_size(1, 16, 2, 2, 512, 128, 128) >= 4 * chunk


@pytest.mark.parametrize(("device", "backend"), CASES, ids=CASE_IDS)
def test_fully_masked_rows_no_nan(device, backend):
    q = make_tensor(1, 3, 2, 8, device=device, seed=51, requires_grad=True)
    k = make_tensor(1, 4, 1, 8, device=device, seed=52, requires_grad=True)
    v = make_tensor(1, 4, 1, 8, device=device, seed=53, requires_grad=True)
    indices = torch.tensor([[[0, 1], [-1, -7], [2, 3]]], device=device)  # row 1: all negative
    mask = torch.tensor([[[False, False], [True, True], [True, False]]], device=device)  # row 0 masked
    out, lse = sparse_attention(q, k, v, indices, mask, return_lse=True, backend=backend)
    assert (out[:, :2] == 0).all()
    assert torch.isneginf(lse[:, :, :2]).all()
    assert torch.isfinite(lse[:, :, 2]).all()
    # Gradients through out and the lse of every row (including -inf entries) stay finite.
    grads = torch.autograd.grad(out.sum() + lse[torch.isfinite(lse)].sum(), (q, k, v))
    assert all(torch.isfinite(g).all() for g in grads)
    assert (grads[0][:, :2] == 0).all()


@pytest.mark.parametrize(("device", "backend"), CASES, ids=CASE_IDS)
def test_zero_slots(device, backend):
    """K = 0: every row is empty: zeros and -inf, zero gradients (no error)."""
    q = make_tensor(2, 3, 4, 8, device=device, seed=61, requires_grad=True)
    k = make_tensor(2, 5, 2, 8, device=device, seed=62, requires_grad=True)
    v = make_tensor(2, 5, 2, 6, device=device, seed=63, requires_grad=True)
    indices = torch.zeros(2, 4, 3, 0, dtype=torch.int32, device=device)
    out, lse = sparse_attention(q, k, v, indices, return_lse=True, backend=backend)
    assert out.shape == (2, 3, 4, 6)
    assert (out == 0).all()
    assert torch.isneginf(lse).all()
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert all((g == 0).all() for g in grads)


@pytest.mark.parametrize(("device", "backend"), CASES, ids=CASE_IDS)
def test_empty_inputs(device, backend):
    # No queries.
    q = make_tensor(1, 0, 2, 8, device=device, requires_grad=True)
    k = make_tensor(1, 4, 1, 8, device=device)
    v = make_tensor(1, 4, 1, 8, device=device)
    out, lse = sparse_attention(
        q, k, v, torch.zeros(1, 0, 3, dtype=torch.long, device=device), return_lse=True, backend=backend
    )
    assert out.shape == (1, 0, 2, 8)
    assert lse.shape == (1, 2, 0)
    # No keys: only negative indices are valid, every row is empty.
    q = make_tensor(1, 2, 2, 8, device=device, requires_grad=True)
    k = make_tensor(1, 0, 1, 8, device=device, requires_grad=True)
    v = make_tensor(1, 0, 1, 8, device=device, requires_grad=True)
    indices = torch.full((1, 2, 2, 3), -1, device=device)
    out, lse = sparse_attention(q, k, v, indices, return_lse=True, backend=backend)
    assert (out == 0).all()
    assert torch.isneginf(lse).all()
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert grads[1].shape == k.shape
    assert (grads[0] == 0).all()


@pytest.mark.parametrize(("device", "backend"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("layout", ["per_query", "per_kv", "shared3d"])
def test_single_query(device, backend, layout):
    q = make_tensor(3, 1, 4, 16, device=device, seed=71)
    k = make_tensor(3, 6, 2, 16, device=device, seed=72)
    v = make_tensor(3, 6, 2, 16, device=device, seed=73)
    indices = make_indices(index_shape(layout, 3, 1, 4, 4, 2), 6, seed=74).to(device)
    check_against_dense(q, k, v, indices, backend=backend)


@pytest.mark.parametrize(("device", "backend"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_non_contiguous_inputs(device, backend, dtype):
    batch, seq_len, hq, hkv, num_keys, topk, dim = 2, 6, 4, 2, 9, 5, 20
    # q as a [B, H, T, D] buffer seen through a transpose; k with padded rows; v a slice.
    q = make_tensor(batch, hq, seq_len, dim, dtype=dtype, device=device, seed=81).transpose(1, 2)
    k = strided_rows(make_tensor(batch, num_keys, hkv, dim, dtype=dtype, device=device, seed=82))
    v = make_tensor(batch, num_keys, hkv, 2 * dim, dtype=dtype, device=device, seed=83)[..., ::2]
    indices = make_indices((batch, seq_len, hq, topk), num_keys, seed=84).to(device).transpose(1, 2)
    mask = (
        make_mask((batch, hq, seq_len, topk), seed=85)
        .to(device)
        .transpose(-1, -2)
        .contiguous()
        .transpose(-1, -2)
    )
    assert not (q.is_contiguous())
    assert not (k.is_contiguous())
    assert not (v.is_contiguous())
    assert not (indices.is_contiguous())
    check_against_dense(q, k, v, indices, mask, backend=backend)


@pytest.mark.parametrize(("device", "backend"), CASES, ids=CASE_IDS)
def test_index_dtypes_agree(device, backend):
    q = make_tensor(1, 5, 2, 8, device=device, seed=91)
    k = make_tensor(1, 7, 2, 8, device=device, seed=92)
    v = make_tensor(1, 7, 2, 8, device=device, seed=93)
    indices = make_indices((1, 2, 5, 4), 7, seed=94).to(device)
    out64 = sparse_attention(q, k, v, indices, backend=backend)
    out32 = sparse_attention(q, k, v, indices.int(), backend=backend)
    assert torch.equal(out64, out32)


@pytest.mark.parametrize(("device", "backend"), CASES, ids=CASE_IDS)
def test_negative_index_is_masked(device, backend):
    q = make_tensor(1, 4, 2, 8, device=device, seed=101)
    k = make_tensor(1, 6, 1, 8, device=device, seed=102)
    v = make_tensor(1, 6, 1, 8, device=device, seed=103)
    indices = make_indices((1, 4, 5), 6, seed=104, low=0).to(device)
    mask = make_mask(indices.shape, seed=105).to(device)
    with_mask = sparse_attention(q, k, v, indices, mask, backend=backend)
    with_negatives = sparse_attention(q, k, v, torch.where(mask, indices, -3), backend=backend)
    torch.testing.assert_close(with_mask, with_negatives, rtol=0, atol=0)


@pytest.mark.parametrize(("device", "backend"), CASES, ids=CASE_IDS)
def test_validate(device, backend):
    q = make_tensor(1, 3, 2, 8, device=device, seed=111)
    k = make_tensor(1, 5, 2, 8, device=device, seed=112)
    v = make_tensor(1, 5, 2, 8, device=device, seed=113)
    indices = torch.tensor([[[0, 1], [2, 5], [4, 3]]], device=device)
    with pytest.raises(ValueError, match="indices"):
        sparse_attention(q, k, v, indices, backend=backend)
    # Unchecked, an index >= Tkv is a masked slot (never read).
    unchecked = sparse_attention(q, k, v, indices, validate=False, backend=backend)
    masked = sparse_attention(q, k, v, torch.where(indices < 5, indices, -1), backend=backend)
    torch.testing.assert_close(unchecked, masked, rtol=0, atol=0)


@pytest.mark.parametrize(("device", "backend"), CASES, ids=CASE_IDS)
def test_scale_and_determinism(device, backend):
    q = make_tensor(2, 6, 4, 16, device=device, seed=121)
    k = make_tensor(2, 8, 4, 16, device=device, seed=122)
    v = make_tensor(2, 8, 4, 16, device=device, seed=123)
    indices = make_indices((2, 6, 5), 8, seed=124).to(device)
    saved = [t.clone() for t in (q, k, v, indices)]
    check_against_dense(q, k, v, indices, None, 0.7, backend=backend)
    first = sparse_attention(q, k, v, indices, scale=0.7, backend=backend)
    second = sparse_attention(q, k, v, indices, scale=0.7, backend=backend)
    assert torch.equal(first, second)
    assert all(torch.equal(a, b) for a, b in zip((q, k, v, indices), saved, strict=True))  # inputs untouched


def test_return_types():
    q, k, v = make_tensor(1, 2, 1, 4), make_tensor(1, 3, 1, 4), make_tensor(1, 3, 1, 4)
    indices = torch.tensor([[[0, 1], [1, 2]]])
    out = sparse_attention(q, k, v, indices)
    assert isinstance(out, torch.Tensor)
    out2, lse = sparse_attention(q, k, v, indices, return_lse=True)
    assert torch.equal(out, out2)
    assert lse.shape == (1, 1, 2)
    assert lse.dtype == torch.float32


# ---------------------------------------------------------------- bad inputs (docs/api.md)


def _inputs(dtype=torch.float32):
    q = make_tensor(2, 5, 4, 8, dtype=dtype)
    k = make_tensor(2, 7, 2, 8, dtype=dtype)
    v = make_tensor(2, 7, 2, 6, dtype=dtype)
    indices = make_indices((2, 4, 5, 3), 7, seed=1)
    return q, k, v, indices


def _bad_cases():
    q, k, v, idx = _inputs()
    mask = torch.ones(idx.shape, dtype=torch.bool)
    value = ValueError
    return {
        "q_rank": (value, "q", (q[0], k, v, idx, None)),
        "k_rank": (value, "k", (q, k[0], v, idx, None)),
        "v_rank": (value, "v", (q, k, v[..., None], idx, None)),
        "indices_rank": (value, "indices", (q, k, v, idx[..., None], None)),
        "k_batch": (value, "k", (q, k[:1], v, idx, None)),
        "v_batch": (value, "v", (q, k, v[:1], idx, None)),
        "k_dim": (value, "k", (q, k[..., :7], v, idx, None)),
        "v_keys": (value, "v", (q, k, v[:, :6], idx, None)),
        "v_heads": (value, "v", (q, k, v[:, :, :1], idx, None)),
        "gqa_not_multiple": (value, "Hkv", (q[:, :, :3], k, v, idx[:, :3], None)),
        "index_heads": (value, "indices", (q, k, v, idx[:, :3], None)),
        "index_batch": (value, "indices", (q, k, v, idx[:1], None)),
        "index_time": (value, "indices", (q, k, v, idx[:, :, :4], None)),
        "index_time_3d": (value, "indices", (q, k, v, idx[:, 0, :4], None)),
        "mask_shape": (value, "mask", (q, k, v, idx, mask[..., :2])),
        "mask_shape_3d_vs_4d": (value, "mask", (q, k, v, idx, mask[:, 0])),
        "mask_dtype": (TypeError, "mask", (q, k, v, idx, mask.float())),
        "index_dtype_float": (TypeError, "indices", (q, k, v, idx.float(), None)),
        "index_dtype_int16": (TypeError, "indices", (q, k, v, idx.short(), None)),
        "q_dtype_float64": (TypeError, "q", (q.double(), k.double(), v.double(), idx, None)),
        "q_dtype_int": (TypeError, "q", (q.long(), k.long(), v.long(), idx, None)),
        "k_dtype_mismatch": (TypeError, "k", (q, k.half(), v, idx, None)),
        "v_dtype_mismatch": (TypeError, "v", (q, k, v.bfloat16(), idx, None)),
        "q_not_tensor": (TypeError, "q", (q.tolist(), k, v, idx, None)),
        "mask_not_tensor": (TypeError, "mask", (q, k, v, idx, mask.tolist())),
        "index_device": (value, "device", (q, k, v, idx.to("meta"), None)),
        "k_device": (value, "device", (q, k.to("meta"), v, idx, None)),
        "mask_device": (value, "device", (q, k, v, idx, mask.to("meta"))),
        "index_out_of_range": (value, "indices", (q, k, v, idx + 7, None)),
    }


@pytest.mark.parametrize("name", list(_bad_cases()))
def test_bad_inputs(name, monkeypatch):
    monkeypatch.setattr("hdgsa_sparse_attn.api.sparse_attention_torch", must_not_run)
    if TRITON_DEVICES:
        monkeypatch.setattr("hdgsa_sparse_attn._triton.sparse_attention_fwd", must_not_run)
    error, message, args = _bad_cases()[name]
    with pytest.raises(error, match=message):
        sparse_attention(*args)


def test_bad_scale_and_backend(monkeypatch):
    monkeypatch.setattr("hdgsa_sparse_attn.api.sparse_attention_torch", must_not_run)
    q, k, v, idx = _inputs()
    with pytest.raises(TypeError, match="scale"):
        sparse_attention(q, k, v, idx, scale="0.1")
    with pytest.raises(TypeError, match="scale"):
        sparse_attention(q, k, v, idx, scale=torch.tensor(0.1))
    with pytest.raises(ValueError, match="backend"):
        sparse_attention(q, k, v, idx, backend="cuda")
    with pytest.raises(TypeError, match="return_lse must be a bool, got int"):
        sparse_attention(q, k, v, idx, return_lse=1)
    with pytest.raises(TypeError, match="validate must be a bool, got NoneType"):
        sparse_attention(q, k, v, idx + 7, validate=None)  # None must not skip the check silently


def test_triton_backend_where_it_cannot_run(monkeypatch):
    q, k, v, idx = _inputs()
    monkeypatch.setattr("hdgsa_core.backend.interpreter_enabled", lambda: False)
    reason = "TRITON_INTERPRET|Triton is not installed"
    with pytest.raises(RuntimeError, match=reason):
        sparse_attention(q, k, v, idx, backend="triton")
    monkeypatch.setenv("HDGSA_BACKEND", "triton")
    with pytest.raises(RuntimeError, match=reason):
        sparse_attention(q, k, v, idx)
    monkeypatch.setenv("HDGSA_BACKEND", "torch")
    sparse_attention(q, k, v, idx)


def test_backend_environment(monkeypatch):
    q, k, v, idx = _inputs()
    expected = sparse_attention(q, k, v, idx, backend="torch")
    monkeypatch.setenv("HDGSA_BACKEND", "triton")  # overrides only backend="auto"
    assert torch.equal(sparse_attention(q, k, v, idx, backend="torch"), expected)
    monkeypatch.setenv("HDGSA_BACKEND", "")  # empty: no override
    torch.testing.assert_close(sparse_attention(q, k, v, idx), expected)
    monkeypatch.setenv("HDGSA_BACKEND", "bogus")
    with pytest.raises(ValueError, match="HDGSA_BACKEND"):
        sparse_attention(q, k, v, idx)


@pytest.mark.parametrize("validate", [False, True])
def test_torch_compile_fullgraph(validate):
    q = make_tensor(1, 6, 4, 8, seed=131, requires_grad=True)
    k = make_tensor(1, 6, 2, 8, seed=132, requires_grad=True)
    v = make_tensor(1, 6, 2, 8, seed=133, requires_grad=True)
    indices = make_indices((1, 2, 6, 4), 6, seed=134)
    mask = make_mask(indices.shape, seed=135)

    def attend(q, k, v, indices, mask=None):
        return sparse_attention(q, k, v, indices, mask, return_lse=True, validate=validate)

    compiled = torch.compile(attend, fullgraph=True, backend="aot_eager")
    out, lse = compiled(q, k, v, indices)
    expected_out, expected_lse = attend(q, k, v, indices)
    torch.testing.assert_close(compiled(q, k, v, indices, mask), attend(q, k, v, indices, mask))
    torch.testing.assert_close(out, expected_out)
    torch.testing.assert_close(lse, expected_lse)
    out.sum().backward()
    assert q.grad is not None
    assert torch.isfinite(q.grad).all()
    if validate:  # the range check is a device-side assertion when compiled
        with pytest.raises(RuntimeError, match="out of range"):
            compiled(q, k, v, indices + 6)


def test_signature():
    kinds = inspect.Parameter
    expected = [
        ("q", kinds.POSITIONAL_OR_KEYWORD, kinds.empty),
        ("k", kinds.POSITIONAL_OR_KEYWORD, kinds.empty),
        ("v", kinds.POSITIONAL_OR_KEYWORD, kinds.empty),
        ("indices", kinds.POSITIONAL_OR_KEYWORD, kinds.empty),
        ("mask", kinds.POSITIONAL_OR_KEYWORD, None),
        ("scale", kinds.POSITIONAL_OR_KEYWORD, None),
        ("return_lse", kinds.KEYWORD_ONLY, False),
        ("validate", kinds.KEYWORD_ONLY, True),
        ("backend", kinds.KEYWORD_ONLY, "auto"),
    ]
    parameters = inspect.signature(sparse_attention).parameters.values()
    assert [(p.name, p.kind, p.default) for p in parameters] == expected


def test_default_scale_is_the_query_dim():
    # D = 12 for q and k, Dv = 5: the default scale is D ** -0.5, not Dv ** -0.5.
    q = make_tensor(1, 4, 2, 12, seed=141)
    k = make_tensor(1, 6, 1, 12, seed=142)
    v = make_tensor(1, 6, 1, 5, seed=143)
    indices = make_indices((1, 4, 3), 6, seed=144, low=0)
    default = sparse_attention(q, k, v, indices, return_lse=True)
    explicit = sparse_attention(q, k, v, indices, scale=12**-0.5, return_lse=True)
    for got, wanted in zip(default, explicit, strict=True):
        assert torch.equal(got, wanted)


@pytest.mark.parametrize(("device", "backend"), CASES, ids=CASE_IDS)
def test_lse_of_empty_rows_passes_no_nan(device, backend):
    # The loss takes every lse entry, the -inf ones of empty rows included.
    q = make_tensor(1, 4, 2, 8, device=device, seed=151, requires_grad=True)
    k = make_tensor(1, 5, 2, 8, device=device, seed=152, requires_grad=True)
    v = make_tensor(1, 5, 2, 8, device=device, seed=153, requires_grad=True)
    indices = make_indices((1, 2, 4, 3), 5, seed=154, low=0).to(device)
    indices[:, :, 1] = -1  # query 1: no valid slot
    out, lse = sparse_attention(q, k, v, indices, return_lse=True, backend=backend)
    assert torch.isneginf(lse[:, :, 1]).all()
    grads = torch.autograd.grad(out.sum() + lse.sum(), (q, k, v))
    assert all(torch.isfinite(grad).all() for grad in grads)
    assert (grads[0][:, 1] == 0).all()


@pytest.mark.parametrize(("device", "backend"), CASES, ids=CASE_IDS)
def test_inputs_are_not_modified(device, backend):
    q = make_tensor(2, 5, 4, 8, device=device, seed=161, requires_grad=True)
    k = make_tensor(2, 7, 2, 8, device=device, seed=162, requires_grad=True)
    v = make_tensor(2, 7, 2, 6, device=device, seed=163, requires_grad=True)
    indices = make_indices((2, 2, 5, 4), 7, seed=164).int().to(device)
    mask = make_mask(indices.shape, seed=165).to(device)
    saved = [t.detach().clone() for t in (q, k, v, indices, mask)]
    out, lse = sparse_attention(q, k, v, indices, mask, return_lse=True, backend=backend)
    (out.sum() + lse[torch.isfinite(lse)].sum()).backward()
    assert all(torch.equal(a, b) for a, b in zip((q, k, v, indices, mask), saved, strict=True))


@pytest.mark.parametrize(("device", "backend"), CASES, ids=CASE_IDS)
def test_autocast_keeps_float32_math(device, backend):
    # Under torch.autocast the op still computes in float32 (docs/api.md) and returns q.dtype:
    # bitwise the result outside the autocast region; gradients to float32 rounding (dk and
    # dv accumulate, which need not be bitwise outside deterministic mode). bf16 math would
    # be off by about 1e-2.
    q = make_tensor(1, 6, 4, 16, device=device, seed=171, requires_grad=True)
    k = make_tensor(1, 9, 2, 16, device=device, seed=172, requires_grad=True)
    v = make_tensor(1, 9, 2, 8, device=device, seed=173, requires_grad=True)
    indices = make_indices((1, 2, 6, 5), 9, seed=174).to(device)
    grad_out = make_tensor(1, 6, 4, 8, device=device, seed=175)
    expected = sparse_attention(q, k, v, indices, return_lse=True, backend=backend)
    expected_grads = torch.autograd.grad(expected[0], (q, k, v), grad_out)
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        got = sparse_attention(q, k, v, indices, return_lse=True, backend=backend)
    for actual, wanted in zip(got, expected, strict=True):
        assert actual.dtype == wanted.dtype == torch.float32
        assert torch.equal(actual, wanted)
    for grad, wanted in zip(torch.autograd.grad(got[0], (q, k, v), grad_out), expected_grads, strict=True):
        torch.testing.assert_close(grad, wanted, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("device", "backend"), CASES, ids=CASE_IDS)
def test_backward_is_deterministic_in_deterministic_mode(device, backend):
    # Many slots hit the same keys, so dk / dv accumulate from many places.
    q = make_tensor(2, 16, 4, 8, dtype=torch.bfloat16, device=device, seed=181, requires_grad=True)
    k = make_tensor(2, 5, 2, 8, dtype=torch.bfloat16, device=device, seed=182, requires_grad=True)
    v = make_tensor(2, 5, 2, 8, dtype=torch.bfloat16, device=device, seed=183, requires_grad=True)
    indices = make_indices((2, 4, 16, 6), 5, seed=184).to(device)
    grad_out = make_tensor(2, 16, 4, 8, dtype=torch.bfloat16, device=device, seed=185)
    was_enabled = torch.are_deterministic_algorithms_enabled()
    was_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        runs = [
            torch.autograd.grad(sparse_attention(q, k, v, indices, backend=backend), (q, k, v), grad_out)
            for _ in range(2)
        ]
    finally:
        torch.use_deterministic_algorithms(was_enabled, warn_only=was_warn_only)
    for first, second in zip(*runs, strict=True):
        assert torch.equal(first, second)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host syncs are a CUDA matter")
@pytest.mark.parametrize("layout", ["per_query", "per_kv", "shared3d"])
def test_no_host_sync_without_validate(layout):
    q = make_tensor(2, 9, 4, 16, dtype=torch.bfloat16, device="cuda", seed=191)
    k = make_tensor(2, 11, 2, 16, dtype=torch.bfloat16, device="cuda", seed=192)
    v = make_tensor(2, 11, 2, 16, dtype=torch.bfloat16, device="cuda", seed=193)
    indices = make_indices(index_shape(layout, 2, 9, 5, 4, 2), 11, seed=194).to("cuda")
    mask = make_mask(indices.shape, seed=195).to("cuda")
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")  # any host sync raises
    try:
        sparse_attention(q, k, v, indices, mask, return_lse=True, validate=False)
    finally:
        torch.cuda.set_sync_debug_mode(previous)


# ---------------------------------------------------------------- the Triton kernels' paths


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("path", BACKWARD_PATHS)
@pytest.mark.parametrize("layout", ["per_query", "per_kv", "shared", "shared3d"])
@pytest.mark.parametrize(("hq", "hkv"), [(2, 2), (4, 2), (4, 1)], ids=["group1", "group2", "group4"])
def test_triton_backward_paths(device, path, layout, hq, hkv, monkeypatch):
    # T != Tkv, odd K, empty rows (query 0), negative and repeated indices, hot keys (Tkv small).
    batch, seq_len, num_keys, topk, dim, dim_v = 2, 4, 7, 9, 32, 64
    q = make_tensor(batch, seq_len, hq, dim, dtype=torch.bfloat16, device=device, seed=201)
    k = make_tensor(batch, num_keys, hkv, dim, dtype=torch.bfloat16, device=device, seed=202)
    v = make_tensor(batch, num_keys, hkv, dim_v, dtype=torch.bfloat16, device=device, seed=203)
    shape = index_shape(layout, batch, seq_len, topk, hq, hkv)
    indices = make_indices(shape, num_keys, seed=204, dtype=torch.int32).to(device)
    mask = make_mask(shape, seed=205).to(device)
    with backward_path(path, monkeypatch):
        check_against_dense(q, k, v, indices, mask, backend="triton")


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("path", BACKWARD_PATHS)
@pytest.mark.parametrize(("dim", "dim_v"), [(32, 32), (64, 32), (128, 128), (256, 64), (20, 12)])
@pytest.mark.parametrize("layout", ["per_query", "per_kv"])
def test_triton_head_dims(device, path, dim, dim_v, layout, monkeypatch):
    q = make_tensor(1, 3, 4, dim, device=device, seed=211)
    k = make_tensor(1, 10, 2, dim, device=device, seed=212)
    v = make_tensor(1, 10, 2, dim_v, device=device, seed=213)
    indices = make_indices(index_shape(layout, 1, 3, 37, 4, 2), 10, seed=214).to(device)
    with backward_path(path, monkeypatch):
        check_against_dense(q, k, v, indices, backend="triton")


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("layout", ["per_query", "per_kv", "shared3d"])
def test_triton_deterministic_backward_is_bitwise_repeatable(device, layout):
    # Every slot reads one of 3 keys: dk / dv rows sum many contributions.
    q = make_tensor(2, 12, 4, 32, dtype=torch.bfloat16, device=device, seed=221, requires_grad=True)
    k = make_tensor(2, 3, 2, 32, dtype=torch.bfloat16, device=device, seed=222, requires_grad=True)
    v = make_tensor(2, 3, 2, 32, dtype=torch.bfloat16, device=device, seed=223, requires_grad=True)
    indices = make_indices(index_shape(layout, 2, 12, 19, 4, 2), 3, seed=224).to(device)
    grad_out = make_tensor(2, 12, 4, 32, dtype=torch.bfloat16, device=device, seed=225)
    with deterministic_algorithms(True):
        runs = [
            torch.autograd.grad(sparse_attention(q, k, v, indices, backend="triton"), (q, k, v), grad_out)
            for _ in range(3)
        ]
    fast = torch.autograd.grad(sparse_attention(q, k, v, indices, backend="triton"), (q, k, v), grad_out)
    for grads in runs[1:]:
        for first, again in zip(runs[0], grads, strict=True):
            assert torch.equal(first, again)
    for deterministic, atomic in zip(runs[0], fast, strict=True):  # the same math either way
        torch.testing.assert_close(deterministic, atomic, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_triton_forward_is_bitwise_repeatable_and_index_dtype_free(device):
    q = make_tensor(1, 9, 4, 32, dtype=torch.bfloat16, device=device, seed=231)
    k = make_tensor(1, 9, 1, 32, dtype=torch.bfloat16, device=device, seed=232)
    v = make_tensor(1, 9, 1, 32, dtype=torch.bfloat16, device=device, seed=233)
    indices = make_indices((1, 1, 9, 70), 9, seed=234).to(device)
    first = sparse_attention(q, k, v, indices, return_lse=True, backend="triton")
    again = sparse_attention(q, k, v, indices.int(), return_lse=True, backend="triton")
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_triton_custom_op_opcheck(device):
    from hdgsa_sparse_attn import _triton  # noqa: F401  (registers the ops)

    q = make_tensor(1, 3, 4, 16, device=device, seed=241, requires_grad=True)
    k = make_tensor(1, 5, 2, 16, device=device, seed=242, requires_grad=True)
    v = make_tensor(1, 5, 2, 8, device=device, seed=243, requires_grad=True)
    indices = make_indices((1, 2, 3, 4), 5, seed=244).to(device)
    mask = make_mask(indices.shape, seed=245).to(device)
    torch.library.opcheck(torch.ops.hdgsa.sparse_attention_fwd.default, (q, k, v, indices, mask, 0.25))
    grad_out = make_tensor(1, 3, 4, 8, device=device, seed=246)
    out, lse = torch.ops.hdgsa.sparse_attention_fwd(q, k, v, indices, mask, 0.25)
    q, k, v, out, lse = (t.detach() for t in (q, k, v, out, lse))  # the backward op has no autograd
    args = (grad_out, q, k, v, indices, mask, out, lse, None, 0.25, True)
    torch.library.opcheck(torch.ops.hdgsa.sparse_attention_bwd.default, args)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("kernel", ["row", "tile", "dot16"])
@pytest.mark.parametrize("path", ["scatter", "deterministic"])
def test_triton_per_head_kernels(device, kernel, path, monkeypatch):
    # Each kernel a query head with its own list can take, with an odd K over several steps.
    monkeypatch.setattr("hdgsa_sparse_attn._triton_fwd.PER_HEAD_KERNEL", kernel)
    q = make_tensor(2, 4, 4, 32, dtype=torch.bfloat16, device=device, seed=251)
    k = make_tensor(2, 13, 2, 32, dtype=torch.bfloat16, device=device, seed=252)
    v = make_tensor(2, 13, 2, 48, dtype=torch.bfloat16, device=device, seed=253)
    indices = make_indices((2, 4, 4, 71), 13, seed=254).to(device)
    mask = make_mask(indices.shape, seed=255).to(device)
    with backward_path(path, monkeypatch):
        check_against_dense(q, k, v, indices, mask, backend="triton")


def test_block_tiles_fit_shared_memory():
    """The block kernels' shared-memory estimate rules their path out where the tiles cannot
    fit: the backward at 128 rows and D = Dv = 256 (measured on an H100: 303,104 B needed,
    232,448 B there), float32 operands at D = 128; bf16 at D = 128 fits. Host arithmetic only:
    runs wherever Triton imports (no GPU, no interpreter)."""
    pytest.importorskip("triton")
    from hdgsa_sparse_attn._block_plan import SMEM_LIMIT_DEFAULT, BlockTiles, block_smem_bytes

    assert block_smem_bytes(128, 256, 256, 2, backward=True) >= 303_104 > SMEM_LIMIT_DEFAULT
    assert block_smem_bytes(128, 256, 256, 2, backward=False) <= SMEM_LIMIT_DEFAULT
    assert block_smem_bytes(128, 128, 128, 2, backward=True) <= SMEM_LIMIT_DEFAULT
    wide = BlockTiles(head_dim=256, value_dim=256, element_size=2)
    assert not wide.fit(16, 16, needs_grad=True)  # the model's shape: Hq = Hkv = 16, D 256
    assert wide.fit(16, 16, needs_grad=False)
    assert not BlockTiles(256, 256, 2).fit(16, 2, needs_grad=True)  # G = 8: 16 x 8 rows
    assert BlockTiles(128, 128, 2).fit(16, 2, needs_grad=True)
    assert BlockTiles(128, 128, 2).fit(16, 16, needs_grad=True)
    assert not BlockTiles(128, 128, 4).fit(16, 2, needs_grad=False)  # float32 operands
    assert BlockTiles(128, 128, 2, smem_limit=300_000).fit(16, 2, needs_grad=True)
    assert not BlockTiles(128, 128, 2, smem_limit=160_000).fit(16, 2, needs_grad=True)  # e.g. A100
