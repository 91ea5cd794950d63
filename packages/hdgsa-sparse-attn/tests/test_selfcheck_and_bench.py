"""The two interfaces the command line calls: self_check (check) and bench_cases (bench)."""

from __future__ import annotations

import pytest
import torch

from hdgsa_sparse_attn.bench import (
    _hdgsa,
    _hdgsa_deterministic,
    _sdpa,
    _Shape,
    _torch_eager,
    bench_cases,
    causal_random_indices,
    indexer_indices,
    realistic_indices,
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
    names = [case.name for case in cases]
    assert len(names) == len(set(names))
    for case in cases:
        assert case.op == "sparse_attention"
        assert "hdgsa" in case.providers
        assert "sweep" in case.tags or "sdpa" in case.providers
        assert ("hdgsa-deterministic" in case.providers) == (
            case.tags[0] == "fwd+bwd" and "sweep" not in case.tags
        )
        assert case.bytes > 0
        assert case.flops > 0
        assert case.tags[0] in case.name
    per_head_fwd = cases[0]
    assert per_head_fwd.name == "B1 T8192 Hq16 Hkv16 D128 k512 per-head random fwd"
    assert set(per_head_fwd.providers) == {"hdgsa", "torch", "torch.compile", "sdpa"}
    # Gathered K+V at B1 T8192 H16 D128 k512 in bf16 dominate the bytes; 4 * B*T*H*k*D FLOPs.
    assert per_head_fwd.bytes >= 8192 * 16 * 512 * 256 * 2
    assert per_head_fwd.flops == 4 * 8192 * 16 * 512 * 128
    for sharing in ("per-head", "per-KV-group", "all-heads"):
        for index_set in ("random", "realistic"):
            assert (
                f"B1 T8192 Hq16 Hkv{16 if sharing == 'per-head' else 2} D128 k512 {sharing} {index_set} fwd+bwd"
                in names
            )
    assert "B1 T4096 Hq16 Hkv16 D256 k1024 per-head random fwd" in names
    for sharing in ("per-KV-group", "all-heads"):
        assert f"B1 T32768 Hq16 Hkv2 D128 k2048 {sharing} indexer fwd+bwd" in names
    sweep = [case for case in cases if "sweep" in case.tags]
    lengths = {"T4096", "T8192", "T16384", "T32768", "T65536"}
    assert {case.name.split()[1] for case in sweep} == lengths
    assert {case.name.split()[5] for case in sweep} == {"k512", "k1024", "k2048"}
    # The crossover table's rows: both index sets for shared lists, up to T = 65,536.
    for sharing in ("per-KV-group", "all-heads"):
        for index_set in ("random", "realistic"):
            rows = {case.name.split()[1] for case in sweep if f"{sharing} {index_set}" in case.name}
            # T8192 k512 is a headline case (more providers), not a sweep row
            assert rows == lengths
    # Dense SDPA is timed once per length and head layout in the sweep.
    for case in sweep:
        times_sdpa = "per-head" in case.name or "per-KV-group random" in case.name
        assert ("sdpa" in case.providers) == times_sdpa, case.name
    assert bench_cases(["rmsnorm"]) == []
    assert len(bench_cases(["sparse-attn"])) == len(cases)


def test_realistic_indices():
    indices = realistic_indices(2, 3, 150, 40, device="cpu", seed=5, sinks=4, block=16)
    assert indices.shape == (2, 3, 150, 40)
    assert indices.dtype == torch.int32
    for rows in indices.reshape(-1, 150, 40).unbind(0):
        for t, slots in enumerate(rows.tolist()):
            valid = [s for s in slots if s >= 0]
            assert len(valid) == min(t + 1, 40)
            assert len(set(valid)) == len(valid)
            assert all(s <= t for s in valid)
            if t >= 40:
                assert slots[:4] == [0, 1, 2, 3]  # sinks
                assert slots[4:14] == list(range(t - 9, t + 1))  # the window of k // 4 keys
    # Neighbouring queries (one block) draw from one shared pool of hot keys.
    block = indices[0, 0, 56:72, 14:]  # the block of queries 56..71 (blocks start at k = 40)
    assert len(set(block.flatten().tolist())) <= 26 + 13  # a pool of 1.5 x 26 hot keys


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
    providers = (_hdgsa, _hdgsa_deterministic, _torch_eager, _sdpa)
    results = [provider(shape, backward, cpu)() for provider in providers]
    if not backward:
        torch.testing.assert_close(results[0], results[1])
        torch.testing.assert_close(results[0], results[2])
    else:
        assert all(len(grads) == 3 for grads in results)
        assert not torch.are_deterministic_algorithms_enabled()  # restored after the call


def test_indexer_indices():
    """The indexer's own causal selection: sinks first, distinct valid keys <= t, -1 padding,
    and local structure (most selected keys lie near the query)."""
    indices = indexer_indices(1, 2, 96, 12, device="cpu", seed=2, sinks=2, heads=2, dim=16)
    assert indices.shape == (1, 2, 96, 12)
    assert indices.dtype == torch.int32
    near = total = 0
    for rows in indices.reshape(-1, 96, 12).unbind(0):
        for t, slots in enumerate(rows.tolist()):
            valid = [s for s in slots if s >= 0]
            assert len(valid) == min(t + 1, 12)
            assert len(set(valid)) == len(valid)
            assert all(s <= t for s in valid)
            assert slots[: min(2, t + 1)] == list(range(min(2, t + 1)))  # sinks first
            if t >= 48:
                near += sum(t - s < 24 for s in valid[2:])
                total += len(valid) - 2
    assert near > 0.6 * total, (near, total)
