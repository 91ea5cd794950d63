"""``hdgsa-kernels check`` for the gated delta rule: every runnable backend against float64.

:func:`self_check` runs :func:`gated_delta_rule` on small inputs (unpacked and packed layouts,
GVA, ``D``, an initial state, odd ``T``) on each backend that can run on the device, and
compares the output, the final state and the gradients of ``q``, ``k``, ``v``, ``alpha``,
``beta``, ``D`` and ``initial_state`` with the per-step recurrence in float64
(:func:`reference.recurrent_gated_delta_rule_reference`). Where fla runs the forward but
refuses the backward (fla 0.6 on Hopper with Triton >= 3.4, < 3.7.1) its forward is checked
and the case says so.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hdgsa_core.registry import CheckResult, compare_outputs
from hdgsa_core.testing import DEFAULT_TOLERANCE, make_tensor

from ._fla import fla_unavailable_reason
from .api import gated_delta_rule
from .reference import ALPHA_MIN, recurrent_gated_delta_rule_reference

__all__ = ["self_check"]

_OP = "gated_delta_rule"
_NAMES = ("q", "k", "v", "alpha", "beta", "D", "initial_state")

# name: (B, T, H, HV, K, V, packed, dtype). K = V = 64 and two query/key heads throughout:
# fla autotunes per (H, HV, K, V, dtype), so fewer distinct shapes make `check` quicker on a GPU.
_CASES: dict[str, tuple] = {
    "B2 T70 H2 K64 V64 D h0 fp32": (2, 70, 2, 2, 64, 64, False, torch.float32),
    "B1 T65 H2 HV4 (GVA) K64 V64 packed D h0 bf16": (1, 65, 2, 4, 64, 64, True, torch.bfloat16),
    "B2 T1 H2 K64 V64 D h0 fp16": (2, 1, 2, 2, 64, 64, False, torch.float16),
}

# fla keeps some intermediates in the input dtype and uses tf32 for float32 dots: its own
# tests allow 0.005 (outputs) to 0.02 (gate gradients) in fp16.
_FLA_TOLERANCE = {torch.float32: 5e-3, torch.float16: 2e-2, torch.bfloat16: 4e-2}


def _inputs(B, T, H, HV, K, V, dtype, device) -> list[torch.Tensor]:
    q = make_tensor(B, T, H, K, seed=1, dtype=torch.float64)
    k = F.normalize(make_tensor(B, T, H, K, seed=2, dtype=torch.float64), dim=-1)
    v = make_tensor(B, T, HV, V, seed=3, dtype=torch.float64)
    alpha = torch.sigmoid(2.0 + make_tensor(B, T, HV, seed=4, dtype=torch.float64))
    beta = torch.sigmoid(make_tensor(B, T, HV, seed=5, dtype=torch.float64))
    D = make_tensor(HV, seed=6, dtype=torch.float64)
    state = make_tensor(B, HV, K, V, seed=7, scale=0.5, dtype=torch.float64)
    return [t.to(device=device, dtype=dtype) for t in (q, k, v, alpha, beta, D, state)]


def _reference64(inputs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    leaves = [t.detach().double().requires_grad_() for t in inputs]
    q, k, v, alpha, beta, D, state = leaves
    g = alpha.clamp(min=ALPHA_MIN).log()
    o, final_state = recurrent_gated_delta_rule_reference(q, k, v, g, beta, q.shape[-1] ** -0.5, state)
    return o + D[:, None] * v, final_state, leaves


def _check_case(device, backend, case, B, T, H, HV, K, V, packed, dtype, with_grads) -> list[CheckResult]:
    inputs = _inputs(B, T, H, HV, K, V, dtype, device)
    leaves = [t.detach().requires_grad_(with_grads) for t in inputs]
    q, k, v, alpha, beta, D, state = leaves
    if packed:
        o, final_state = gated_delta_rule(
            q.flatten(2), k.flatten(2), v.flatten(2), alpha, beta, D, H,
            initial_state=state, output_final_state=True, backend=backend,
        )  # fmt: skip
        o = o.unflatten(-1, (HV, V))
    else:
        o, final_state = gated_delta_rule(
            q, k, v, alpha, beta, D, initial_state=state, output_final_state=True, backend=backend
        )
    o64, final64, leaves64 = _reference64(inputs)
    tol = DEFAULT_TOLERANCE[dtype]
    if backend == "fla":
        tol = max(tol, _FLA_TOLERANCE[dtype])
    results = compare_outputs(
        _OP, backend, case, {"o": o, "S_T": final_state}, {"o": o64.detach(), "S_T": final64.detach()}, tol
    )
    if not with_grads:
        return results
    grad_o = make_tensor(*o.shape, seed=8, dtype=dtype, device=device)
    grad_state = make_tensor(*final_state.shape, seed=9, device=device)
    grads = torch.autograd.grad((o.float() * grad_o.float()).sum() + (final_state * grad_state).sum(), leaves)
    grads64 = torch.autograd.grad(
        (o64 * grad_o.double()).sum() + (final64 * grad_state.double()).sum(), leaves64
    )
    names = [f"d{name}" for name in _NAMES]
    results += compare_outputs(
        _OP, backend, case, dict(zip(names, grads, strict=True)), dict(zip(names, grads64, strict=True)), tol
    )
    return results


def self_check(device: torch.device) -> list[CheckResult]:
    """Compare every backend that runs on ``device`` with float64, forward and backward."""
    device = torch.device(device)
    results: list[CheckResult] = []
    backends = ["torch"]
    fla_backward_reason = None
    if fla_unavailable_reason(device, head_dim_k=64, needs_backward=False) is None:
        backends.append("fla")
        fla_backward_reason = fla_unavailable_reason(device, head_dim_k=64, needs_backward=True)
    for backend in backends:
        with_grads = backend == "torch" or fla_backward_reason is None
        for case, shape in _CASES.items():
            label = case if with_grads else f"{case} (forward only: fla refuses the backward here)"
            results += _check_case(device, backend, label, *shape, with_grads)
    return results
