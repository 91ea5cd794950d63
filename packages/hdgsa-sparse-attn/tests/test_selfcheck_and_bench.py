"""The two interfaces the command line calls: self_check (check) and bench_cases (bench)."""

from __future__ import annotations

import pytest
import torch

from hdgsa_sparse_attn.bench import (
    _hdgsa,
    _sdpa,
    _Shape,
    _torch_eager,
    bench_cases,
    causal_random_indices,
)
from hdgsa_sparse_attn.selfcheck import self_check

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_self_check_passes(device):
    results = self_check(torch.device(device))
    assert {r.output for r in results} == {"out", "lse", "dq", "dk", "dv"}
    failed = [r for r in results if not r.passed]
    assert not failed, failed


def test_bench_cases_listing():
    cases = bench_cases()
    assert len(cases) == 4
    for case in cases:
        assert case.op == "sparse_attention"
        assert set(case.providers) == {"hdgsa", "torch", "torch.compile", "sdpa"}
        assert case.bytes > 0
        assert case.flops > 0
        assert case.tags[0] in case.name
    per_head_fwd = cases[0]
    # Gathered K+V at B1 T8192 H16 D128 k512 in bf16 dominate the bytes; 4 * B*T*H*k*D FLOPs.
    assert per_head_fwd.bytes >= 8192 * 16 * 512 * 256 * 2
    assert per_head_fwd.flops == 4 * 8192 * 16 * 512 * 128
    assert bench_cases(["rmsnorm"]) == []
    assert len(bench_cases(["sparse-attn"])) == 4


def test_causal_random_indices():
    indices = causal_random_indices(2, 3, 11, 4, device="cpu", seed=3, rows_per_step=4)
    assert indices.shape == (2, 3, 11, 4)
    assert indices.dtype == torch.int32
    for row in indices.reshape(-1, 11, 4).unbind(0):
        for t, slots in enumerate(row.tolist()):
            valid = [s for s in slots if s >= 0]
            assert len(valid) == min(t + 1, 4)
            assert len(set(valid)) == len(valid)
            assert all(s <= t for s in valid)
            assert slots[len(valid) :] == [-1] * (4 - len(valid))


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
def test_bench_providers_run_on_cpu(backward):
    shape = _Shape("tiny", 1, 24, 4, 2, 2, 16, 8, 6, torch.float32)
    cpu = torch.device("cpu")
    results = [provider(shape, backward, cpu)() for provider in (_hdgsa, _torch_eager, _sdpa)]
    if not backward:
        torch.testing.assert_close(results[0], results[1])
    else:
        assert all(len(grads) == 3 for grads in results)
