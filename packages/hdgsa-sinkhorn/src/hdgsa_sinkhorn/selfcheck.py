"""``self_check(device)``: what ``hdgsa-kernels check`` runs for Sinkhorn-Knopp.

Small inputs (seconds under the Triton interpreter), every backend that can run on ``device``,
the output and the gradient against the float64 reference.
"""

from __future__ import annotations

import torch

from hdgsa_core import runnable_backends
from hdgsa_core.registry import CheckResult, compare_outputs
from hdgsa_core.testing import DEFAULT_TOLERANCE, make_tensor

from .api import TRITON_MAX_N, sinkhorn_knopp
from .reference import sinkhorn_knopp_reference

__all__ = ["self_check"]

OP = "sinkhorn_knopp"

# (leading shape, n, num_iters, dtype): mHC's n = 4 and 20 iterations, odd sizes, low precision.
_CASES = [
    ((2, 3), 4, 20, torch.float32),
    ((5,), 1, 3, torch.float32),
    ((4,), 5, 7, torch.float32),
    ((2,), 8, 20, torch.float32),
    ((3,), 4, 20, torch.bfloat16),
    ((3,), 3, 10, torch.float16),
]


def _output_and_grad(logits, grad_output, num_iters, backend):
    leaf = logits.detach().clone().requires_grad_(True)
    if backend is None:
        out = sinkhorn_knopp_reference(leaf, num_iters)
    else:
        out = sinkhorn_knopp(leaf, num_iters, backend=backend)
    (grad,) = torch.autograd.grad(out, leaf, grad_output.to(out.dtype))
    return out.detach(), grad


def self_check(device: torch.device) -> list[CheckResult]:
    """Compare ``P`` and ``d logits`` of every runnable backend against float64, per case."""
    device = torch.device(device)
    results: list[CheckResult] = []
    for backend in runnable_backends(device):
        for seed, (lead, n, num_iters, dtype) in enumerate(_CASES):
            if backend == "triton" and n > TRITON_MAX_N:
                continue
            shape = (*lead, n, n)
            logits = make_tensor(*shape, dtype=dtype, device=device, seed=seed, scale=2.0)
            grad_output = make_tensor(*shape, dtype=dtype, device=device, seed=100 + seed)
            out, grad = _output_and_grad(logits, grad_output, num_iters, backend)
            out64, grad64 = _output_and_grad(logits.double(), grad_output.double(), num_iters, None)
            case = f"{list(shape)} iters={num_iters} {str(dtype).removeprefix('torch.')}"
            results += compare_outputs(
                OP,
                backend,
                case,
                {"P": out, "d logits": grad},
                {"P": out64, "d logits": grad64},
                DEFAULT_TOLERANCE[dtype],
            )
    return results
