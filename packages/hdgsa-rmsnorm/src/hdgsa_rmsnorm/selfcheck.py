"""``self_check(device)``: small RMSNorm cases on every backend that can run on ``device``,
forward and every gradient against a float64 reference (what ``hdgsa-kernels check`` runs).

Seconds under the Triton interpreter: small shapes, one split-row case.
"""

from __future__ import annotations

import torch

from hdgsa_core import runnable_backends
from hdgsa_core.registry import CheckResult, compare_outputs
from hdgsa_core.testing import DEFAULT_TOLERANCE, make_tensor

from .api import rms_norm
from .reference import rms_norm_reference

__all__ = ["self_check"]

# name, shape, dtype, weight, residual, prenorm, residual_in_fp32
_CASES = (
    ("bf16 residual prenorm [3,5,130]", (3, 5, 130), torch.bfloat16, True, True, True, False),
    ("fp32 plain [4,1000]", (4, 1000), torch.float32, False, False, False, False),
    ("fp16 weight residual [7,3]", (7, 3), torch.float16, True, True, False, False),
    ("bf16 residual_in_fp32 [2,3,64]", (2, 3, 64), torch.bfloat16, True, True, True, True),
    ("bf16 split rows [2,20000]", (2, 20000), torch.bfloat16, True, True, True, False),
)


def _run(fn, inputs, upstream):
    x, weight, residual = inputs
    outputs = fn(x, weight, residual)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    given = [
        (name, t) for name, t in zip(("dx", "dweight", "dresidual"), inputs, strict=True) if t is not None
    ]
    grads = torch.autograd.grad(
        outputs, [t for _, t in given], [u.to(o.dtype) for o, u in zip(outputs, upstream, strict=False)]
    )
    named = {name: out.detach() for name, out in zip(("y", "h"), outputs, strict=False)}
    named.update({name: grad for (name, _), grad in zip(given, grads, strict=True)})
    return named


def self_check(device: torch.device) -> list[CheckResult]:
    """Every backend of ``rms_norm`` runnable on ``device``, forward and backward, against
    float64; one :class:`CheckResult` per output and gradient."""
    device = torch.device(device)
    results: list[CheckResult] = []
    for name, shape, dtype, has_weight, has_residual, prenorm, residual_in_fp32 in _CASES:
        hidden = shape[-1]
        x = make_tensor(*shape, dtype=dtype, device=device, seed=1, requires_grad=True)
        weight = (
            make_tensor(hidden, dtype=dtype, device=device, seed=2, offset=1.0, scale=0.5, requires_grad=True)
            if has_weight
            else None
        )
        residual = (
            make_tensor(*shape, dtype=dtype, device=device, seed=3, requires_grad=True)
            if has_residual
            else None
        )
        h_dtype = torch.float32 if residual_in_fp32 else dtype
        upstream = [make_tensor(*shape, dtype=dtype, device=device, seed=4)]
        if prenorm:
            upstream.append(make_tensor(*shape, dtype=h_dtype, device=device, seed=5))
        inputs64 = tuple(
            None if t is None else t.detach().double().requires_grad_(True) for t in (x, weight, residual)
        )
        expected = _run(
            lambda a, b, c, p=prenorm, f=residual_in_fp32: rms_norm_reference(a, b, 1e-6, c, p, f),
            inputs64,
            upstream,
        )
        tol = 2 * DEFAULT_TOLERANCE[dtype]
        for backend in runnable_backends(device):
            actual = _run(
                lambda a, b, c, backend=backend, p=prenorm, f=residual_in_fp32: rms_norm(
                    a, b, 1e-6, c, prenorm=p, residual_in_fp32=f, backend=backend
                ),
                (x, weight, residual),
                upstream,
            )
            results += compare_outputs("rms_norm", backend, name, actual, expected, tol)
    return results
