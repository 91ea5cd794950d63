"""sparse_attention inside ``torch.autocast`` regions of either half dtype (also the other one than
the inputs', and with a sequence that spans several query chunks of the torch backend), and GQA
gradients summed over a head group in half precision: the same results as outside the region,
computed in float32."""

from __future__ import annotations

import pytest
import torch

import hdgsa_sparse_attn.reference as reference
from hdgsa_core import runnable_backends
from hdgsa_core.testing import make_tensor
from hdgsa_sparse_attn import sparse_attention

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
CASES = [
    pytest.param(device, backend, id=f"{device}-{backend}")
    for device in DEVICES
    for backend in runnable_backends(torch.device(device), implemented=False)
]
HALF_DTYPES = [torch.float16, torch.bfloat16]


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _run(q, k, v, indices, grad_out, backend, autocast_dtype=None, backward_inside=False):
    """``(out, lse, dq, dk, dv)``; the forward inside an autocast region of ``autocast_dtype``
    (None: no region), the backward outside it (as PyTorch recommends) or, with
    ``backward_inside``, inside it too."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    enabled = autocast_dtype is not None
    with torch.autocast(q.device.type, dtype=autocast_dtype or torch.bfloat16, enabled=enabled):
        out, lse = sparse_attention(*leaves, indices, return_lse=True, backend=backend)
        if backward_inside:
            grads = torch.autograd.grad(out, leaves, grad_out)
    if not backward_inside:
        grads = torch.autograd.grad(out, leaves, grad_out)
    return (out.detach(), lse.detach(), *grads)


def _assert_same(got, expected, device, what):
    for name, actual, wanted in zip(("out", "lse", "dq", "dk", "dv"), got, expected, strict=True):
        assert actual.dtype == wanted.dtype, name
        if name in ("out", "lse", "dq"):
            assert torch.equal(actual, wanted), f"{name} changed under {what}"
        else:  # dk and dv accumulate in an order that varies from run to run (threads, atomics)
            eps = torch.finfo(wanted.dtype).eps
            scale = wanted.abs().max().item()
            torch.testing.assert_close(
                actual, wanted, rtol=2 * eps, atol=2 * eps * scale, msg=f"{name}, {what}"
            )


@pytest.mark.parametrize(("device", "backend"), CASES)
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=_name)
def test_other_half_dtype_over_several_query_chunks(device, backend, dtype):
    """fp16 inputs in a bf16 region (and bf16 in fp16), T spanning two query chunks: the chunks
    used to be joined by torch.cat outside the autocast-free region, which raised
    ``Unexpected floating ScalarType in at::autocast::prioritize``."""
    batch, seq_len, heads, dim, num_keys, topk = 1, 16, 8, 64, 16, 4096
    assert reference.query_chunk_size(batch, heads, heads, heads, topk, dim, dim) < seq_len
    q = make_tensor(batch, seq_len, heads, dim, dtype=dtype, device=device, seed=1)
    k = make_tensor(batch, num_keys, heads, dim, dtype=dtype, device=device, seed=2)
    v = make_tensor(batch, num_keys, heads, dim, dtype=dtype, device=device, seed=3)
    generator = torch.Generator().manual_seed(4)
    indices = torch.randint(0, num_keys, (batch, heads, seq_len, topk), generator=generator).to(device)
    grad_out = make_tensor(batch, seq_len, heads, dim, dtype=dtype, device=device, seed=5)
    other = torch.bfloat16 if dtype == torch.float16 else torch.float16
    expected = _run(q, k, v, indices, grad_out, backend)
    _assert_same(_run(q, k, v, indices, grad_out, backend, other), expected, device, f"autocast({other})")


@pytest.mark.parametrize(("device", "backend"), CASES)
@pytest.mark.parametrize("dtype", [torch.float32, *HALF_DTYPES], ids=_name)
@pytest.mark.parametrize("autocast_dtype", HALF_DTYPES, ids=_name)
@pytest.mark.parametrize("layout", ["per_query", "per_kv", "shared3d"])
@pytest.mark.parametrize("backward_inside", [False, True], ids=["backward-outside", "backward-inside"])
def test_autocast_changes_nothing(
    device, backend, dtype, autocast_dtype, layout, backward_inside, monkeypatch
):
    """Every input dtype in a region of each half dtype, GQA and every index layout, with
    chunks of 3 queries (several chunks, recomputed in the backward): the same results, also
    when the backward runs inside the region (its matmuls run with autocast off too)."""
    monkeypatch.setattr(reference, "query_chunk_size", lambda *args, **kwargs: 3)
    batch, seq_len, hq, hkv, dim, dim_v, num_keys, topk = 2, 11, 4, 2, 16, 8, 13, 5
    q = make_tensor(batch, seq_len, hq, dim, dtype=dtype, device=device, seed=6)
    k = make_tensor(batch, num_keys, hkv, dim, dtype=dtype, device=device, seed=7)
    v = make_tensor(batch, num_keys, hkv, dim_v, dtype=dtype, device=device, seed=8)
    shape = {
        "per_query": (batch, hq, seq_len, topk),
        "per_kv": (batch, hkv, seq_len, topk),
        "shared3d": (batch, seq_len, topk),
    }[layout]
    generator = torch.Generator().manual_seed(9)
    indices = torch.randint(-2, num_keys, shape, generator=generator).to(device)
    grad_out = make_tensor(batch, seq_len, hq, dim_v, dtype=dtype, device=device, seed=10)
    expected = _run(q, k, v, indices, grad_out, backend)
    got = _run(q, k, v, indices, grad_out, backend, autocast_dtype, backward_inside)
    _assert_same(got, expected, device, f"autocast({autocast_dtype})")


@pytest.mark.parametrize(("device", "backend"), CASES)
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=_name)
def test_head_group_gradient_sums_in_float32(device, backend, dtype):
    """GQA: four query heads read one KV head, so dv sums their contributions; in float16 the
    partial sum 40000 + 40000 overflows where the total 40000 + 40000 - 40000 - 39000 = 1000
    fits. (One slot per query: p = 1, so dv[0] is the sum of the output gradients.)"""
    q = make_tensor(1, 1, 4, 8, dtype=dtype, device=device, seed=11, requires_grad=True)
    k = make_tensor(1, 3, 1, 8, dtype=dtype, device=device, seed=12, requires_grad=True)
    v = make_tensor(1, 3, 1, 2, dtype=dtype, device=device, seed=13, requires_grad=True)
    indices = torch.zeros(1, 1, 1, 1, dtype=torch.int64, device=device)
    out = sparse_attention(q, k, v, indices, backend=backend)
    column = torch.tensor([40000.0, 40000.0, -40000.0, -39000.0], device=device)
    grad_out = torch.stack([column, -column], dim=-1).view(1, 1, 4, 2).to(dtype)
    (dv,) = torch.autograd.grad(out, (v,), grad_out)
    total = grad_out.double().sum(2)[0, 0]  # the rounded values' exact sum (about +-1000)
    assert torch.equal(dv[0, 0, 0], total.to(dtype))
    assert torch.equal(dv[0, 1:], torch.zeros_like(dv[0, 1:]))
