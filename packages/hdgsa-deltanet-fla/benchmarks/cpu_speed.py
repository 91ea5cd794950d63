"""The torch backend on CPU against per-step loops, at B1 T1024 H4 K=V=64, float32 (issue 5).

    python packages/hdgsa-deltanet-fla/benchmarks/cpu_speed.py [threads ...]

Rows: gated_delta_rule(backend="torch") forward (and forward + backward of every input), the
per-step Python loops (this package's float32 reference and fla's naive_recurrent_gated_delta_rule,
when fla-core is installed) and fla's naive_chunk_gated_delta_rule (a Python loop over chunks).
Each row is timed in several interleaved rounds; median and min of all calls are printed.
"""

from __future__ import annotations

import sys
import time
import warnings

import torch
import torch.nn.functional as F

from hdgsa_deltanet_fla import gated_delta_rule
from hdgsa_deltanet_fla.reference import recurrent_gated_delta_rule_reference


def _rows(q, k, v, alpha, beta):
    g = alpha.log()
    scale = q.shape[-1] ** -0.5
    leaves = [t.clone().requires_grad_() for t in (q, k, v, alpha, beta)]

    def forward_backward():
        o = gated_delta_rule(*leaves, backend="torch")
        return torch.autograd.grad(o.sum(), leaves)

    rows = [
        (
            "chunked torch backend, forward",
            lambda: gated_delta_rule(q, k, v, alpha, beta, backend="torch"),
            10,
        ),
        ("chunked torch backend, forward + backward", forward_backward, 4),
        (
            "per-step loop: recurrent reference (fp32)",
            lambda: recurrent_gated_delta_rule_reference(
                q, k, v, g, beta, scale, compute_dtype=torch.float32
            ),
            2,
        ),
    ]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from fla.ops.gated_delta_rule.naive import (
                naive_chunk_gated_delta_rule,
                naive_recurrent_gated_delta_rule,
            )
    except Exception:  # fla-core missing or broken: its rows are left out
        return rows
    rows.append(
        (
            "per-step loop: fla naive_recurrent",
            lambda: naive_recurrent_gated_delta_rule(q, k, v, beta, g, scale),
            2,
        )
    )
    rows.append(
        (
            "chunk loop: fla naive_chunk",
            lambda: naive_chunk_gated_delta_rule(q, k, v, g, beta, scale=scale),
            4,
        )
    )
    return rows


def issue_inputs() -> tuple[torch.Tensor, ...]:
    """``(q, k, v, alpha, beta)`` at issue 5's CPU shape, B1 T1024 H4 K=V=64 float32 (seeded)."""
    torch.manual_seed(0)
    B, T, H, K, V = 1, 1024, 4, 64, 64
    q = torch.randn(B, T, H, K)
    k = F.normalize(torch.randn(B, T, H, K), dim=-1)
    v = torch.randn(B, T, H, V)
    alpha = torch.rand(B, T, H) * 0.5 + 0.5
    beta = torch.rand(B, T, H)
    return q, k, v, alpha, beta


def main(threads: list[int]) -> None:
    q, k, v, alpha, beta = issue_inputs()
    for count in threads:
        torch.set_num_threads(count)
        rows = _rows(q, k, v, alpha, beta)
        samples: dict[str, list[float]] = {name: [] for name, _, _ in rows}
        for _name, fn, _ in rows:
            fn()  # warm-up
        for _ in range(3):
            for name, fn, calls in rows:
                for _ in range(calls):
                    start = time.perf_counter()
                    fn()
                    samples[name].append(1e3 * (time.perf_counter() - start))
        print(f"B1 T1024 H4 K64 V64 float32, {count} thread(s): median ms (min)")
        base = sorted(samples[rows[0][0]])[len(samples[rows[0][0]]) // 2]
        for name, values in samples.items():
            values.sort()
            median = values[len(values) // 2]
            print(f"  {name:44s} {median:8.2f} ({values[0]:7.2f})  {median / base:6.1f}x the chunked forward")


if __name__ == "__main__":
    main([int(arg) for arg in sys.argv[1:]] or [torch.get_num_threads()])
