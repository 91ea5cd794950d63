"""``hdgsa-kernels check`` for sparse attention: every backend that runs here, forward and the
gradients of q, k, v, against the float64 dense reference, on small inputs."""

from __future__ import annotations

import torch

from hdgsa_core import runnable_backends
from hdgsa_core.registry import CheckResult, compare_outputs
from hdgsa_core.testing import DEFAULT_TOLERANCE, make_tensor

from .api import sparse_attention
from .reference import sparse_attention_dense

__all__ = ["self_check"]

OP = "sparse_attention"

# (case name, Hq, Hkv, index heads (None: a [B, T, K] list), dtype)
_CASES = (
    ("per-query-head GQA2 fp32", 4, 2, 4, torch.float32),
    ("per-KV-head GQA2 bf16", 4, 2, 2, torch.bfloat16),
    ("shared [B,T,K] GQA4 fp16", 4, 1, None, torch.float16),
)


def _inputs(device: torch.device, hq: int, hkv: int, index_heads: int | None, dtype: torch.dtype):
    batch, seq_len, num_keys, topk, dim, dim_v = 2, 9, 13, 6, 24, 16
    q = make_tensor(batch, seq_len, hq, dim, dtype=dtype, device=device, seed=1)
    k = make_tensor(batch, num_keys, hkv, dim, dtype=dtype, device=device, seed=2)
    v = make_tensor(batch, num_keys, hkv, dim_v, dtype=dtype, device=device, seed=3)
    shape = (batch, seq_len, topk) if index_heads is None else (batch, index_heads, seq_len, topk)
    generator = torch.Generator().manual_seed(4)
    indices = torch.randint(-2, num_keys, shape, generator=generator)
    indices[..., 1] = indices[..., 0]  # repeated slots
    mask = torch.rand(shape, generator=generator) > 0.25
    mask[..., 0, :] = False  # one query with no valid slot
    grad_out = make_tensor(batch, seq_len, hq, dim_v, dtype=dtype, device=device, seed=5)
    return q, k, v, indices.int().to(device), mask.to(device), grad_out


def self_check(device: torch.device) -> list[CheckResult]:
    """Forward (out, lse) and dq, dk, dv of every runnable backend against float64."""
    device = torch.device(device)
    results: list[CheckResult] = []
    for backend in runnable_backends(device):
        for case, hq, hkv, index_heads, dtype in _CASES:
            q, k, v, indices, mask, grad_out = _inputs(device, hq, hkv, index_heads, dtype)
            leaves = [t.detach().requires_grad_() for t in (q, k, v)]
            out, lse = sparse_attention(*leaves, indices, mask, return_lse=True, backend=backend)
            dq, dk, dv = torch.autograd.grad(out, leaves, grad_out)

            leaves64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
            out64, lse64 = sparse_attention_dense(*leaves64, indices, mask)
            dq64, dk64, dv64 = torch.autograd.grad(out64, leaves64, grad_out.double())
            results += compare_outputs(
                OP,
                backend,
                case,
                {"out": out, "lse": lse, "dq": dq, "dk": dk, "dv": dv},
                {"out": out64, "lse": lse64, "dq": dq64, "dk": dk64, "dv": dv64},
                DEFAULT_TOLERANCE[dtype],
            )
    return results
