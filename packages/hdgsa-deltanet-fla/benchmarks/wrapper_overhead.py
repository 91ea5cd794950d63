"""Host (CPU) time the fla path adds around fla, measured without a GPU (issue 5).

    python packages/hdgsa-deltanet-fla/benchmarks/wrapper_overhead.py [calls]

At B4 T4096 H16 D128 bf16 fla's forward is host-bound (about 530 us of CPU per call for
520 us of GPU work), so every microsecond of Python the wrapper adds shows in eager timings.
This script measures that Python on CPU tensors: fla's entry point (``_fla.run_fla``) is
replaced by a stub returning correctly shaped tensors, the device check
(``api.fla_unavailable_reason``) runs as it would for CUDA tensors (fla-core must import), and the two Triton kernels'
launchers by no-ops (a Triton launch needs a GPU; on the GPU the wrapper's launches go through
``hdgsa_core.launch.CachedLauncher``, whose cost is measured there). Then
``gated_delta_rule(..., backend="fla")`` is timed against calling the stub directly on the
same views with a precomputed ``g``: the difference is the wrapper's own host time (argument
checks, backend resolution, layout views, the log-decay and D-skip launchers' Python and
output allocations, autograd bookkeeping when inputs require grad).

The patches live in this script only; the package is untouched. This is a host-side CPU
measurement, not a GPU timing.
"""

from __future__ import annotations

import sys
import time

import torch

import hdgsa_deltanet_fla.api as api
from hdgsa_deltanet_fla import _fla, _triton, gated_delta_rule


def _stub_fla(q, k, v, g, beta, scale, initial_state, output_final_state):
    """fla's result shapes, with no work: o like v in q's dtype, the state in float32."""
    o = torch.empty(v.shape, dtype=q.dtype)
    state = torch.empty(v.shape[0], v.shape[2], q.shape[3], v.shape[3]) if output_final_state else None
    return o, state


class _NoLaunch:
    """Stands for a Triton kernel (``kernel[grid](...)``) or a CachedLauncher (``launcher(grid, ...)``)."""

    def __getitem__(self, grid):
        return self

    def __call__(self, *args, **kwargs):
        return None


def _patch() -> None:
    # The device check runs for real, as for CUDA tensors (fla-core must import here).
    check_for_cuda = _fla.fla_unavailable_reason
    cuda = torch.device("cuda")
    api.fla_unavailable_reason = lambda device, **kwargs: check_for_cuda(cuda, **kwargs)
    _fla.run_fla = _stub_fla
    for name in ("_log_decay_fwd", "_log_decay_bwd", "_d_skip_fwd", "_d_skip_bwd"):
        for attribute in (name, name + "_kernel"):
            if hasattr(_triton, attribute):
                setattr(_triton, attribute, _NoLaunch())


def _per_call_us(fn, calls: int, rounds: int = 7) -> float:
    """Median over rounds of (time of ``calls`` calls) / calls, in microseconds."""
    for _ in range(50):
        fn()
    results = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        results.append(1e6 * (time.perf_counter() - start) / calls)
    results.sort()
    return results[len(results) // 2]


def _rows(shape: tuple[int, int, int, int], grad: bool, calls: int) -> list[tuple[str, float, float]]:
    batch, seq_len, heads, head_dim = shape
    dtype = torch.bfloat16
    # Shapes only matter for allocations (the stub and no-op launches read nothing).
    q, k, v = (
        torch.empty(batch, seq_len, heads, head_dim, dtype=dtype).requires_grad_(grad) for _ in range(3)
    )
    alpha = (torch.rand(batch, seq_len, heads, dtype=dtype) * 0.5 + 0.5).requires_grad_(grad)
    beta = torch.rand(batch, seq_len, heads, dtype=dtype).requires_grad_(grad)
    D = torch.rand(heads, dtype=dtype).requires_grad_(grad)
    g = alpha.detach().float().log()
    scale = head_dim**-0.5
    qp, kp, vp = (t.flatten(2) for t in (q, k, v))
    mode = "inputs require grad" if grad else "no grad"
    direct = _per_call_us(lambda: _stub_fla(q, k, v, g, beta, scale, None, False), calls)
    cases = (
        ("unpacked, no D", lambda: gated_delta_rule(q, k, v, alpha, beta, backend="fla")),
        ("unpacked, D", lambda: gated_delta_rule(q, k, v, alpha, beta, D, backend="fla")),
        ("packed, no D", lambda: gated_delta_rule(qp, kp, vp, alpha, beta, num_heads=heads, backend="fla")),
        ("packed, D", lambda: gated_delta_rule(qp, kp, vp, alpha, beta, D, num_heads=heads, backend="fla")),
    )
    return [(f"{name}, {mode}", _per_call_us(fn, calls), direct) for name, fn in cases]


def main(calls: int) -> None:
    _patch()
    torch.manual_seed(0)
    print(
        f"Host-side CPU time per call, bf16 ({torch.get_num_threads()} threads, {calls} calls x 7 "
        "rounds, median round); fla stubbed, Triton launches no-ops. Not GPU timings."
    )
    # B4 T4096 is the shape (CPU allocations of its outputs cost a few us more than
    # CUDA's caching allocator); B4 T64 shows the Python alone.
    for shape in ((4, 4096, 16, 128), (4, 64, 16, 128)):
        print(f"B{shape[0]} T{shape[1]} H{shape[2]} D{shape[3]}")
        print(f"  {'case':36s} {'wrapper us':>10s} {'direct us':>10s} {'added us':>9s}")
        for grad in (False, True):
            for name, wrapper_us, direct_us in _rows(shape, grad, calls):
                print(f"  {name:36s} {wrapper_us:10.1f} {direct_us:10.1f} {wrapper_us - direct_us:9.1f}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2000)
