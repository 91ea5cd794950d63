"""bench.py lists its cases without touching a GPU; on CUDA every provider runs; self_check passes."""

from __future__ import annotations

import pytest
import torch

from hdgsa_core import HAS_CUDA, runnable_backends
from hdgsa_core.registry import ProviderUnavailable
from hdgsa_indexer import bench
from hdgsa_indexer.selfcheck import self_check

DEVICES = [torch.device("cpu")] + ([torch.device("cuda")] if HAS_CUDA else [])


def test_cases_follow_the_anchors():
    cases = bench.bench_cases()
    names = [(case.op, case.name) for case in cases]
    for shape in ("B1 T8192 H4 d64", "B1 T16384 H4 d128", "B2 T4096 H8 d64"):
        assert ("gated_indexer", f"{shape} bf16 causal fwd") in names
        assert ("gated_indexer", f"{shape} bf16 causal fwd+bwd") in names
    assert ("indexer_topk", "B1 T8192 H4 d64 bf16 causal k512 fwd") in names
    assert ("indexer_topk", "B2 T4096 H8 d64 bf16 causal k512 fwd") in names
    for k in (512, 2048):
        for t in (4096, 8192, 16384, 32768, 65536, 131072):
            assert ("indexer_topk", f"B1 T{t} H4 d64 bf16 causal k{k} fwd") in names
    assert ("indexer_scores_at", "B1 T131072 H4 d64 K2048 bf16 fwd+bwd") in names
    assert len(names) == len(set(names))
    for case in cases:
        assert {"hdgsa", "torch"} <= set(case.providers)
        assert case.op == "indexer_scores_at" or "torch.compile" in case.providers
        assert case.bytes > 0
        assert case.flops > 0
        assert case.tags[0] in case.name
    first = cases[0]
    # The [B, T, T] float32 write dominates the scores' forward bytes.
    assert first.bytes >= 4 * 8192 * 8192


@pytest.mark.parametrize(
    ("ops_filter", "ops"),
    [
        (None, {"gated_indexer", "indexer_topk", "indexer_scores_at"}),
        (["indexer"], {"gated_indexer", "indexer_topk", "indexer_scores_at"}),
        (["gated_indexer"], {"gated_indexer"}),
        (["indexer_topk"], {"indexer_topk"}),
        (["indexer_scores_at"], {"indexer_scores_at"}),
        (["rmsnorm"], set()),
    ],
)
def test_ops_filter(ops_filter, ops):
    assert {case.op for case in bench.bench_cases(ops_filter)} == ops


@pytest.mark.skipif(not HAS_CUDA, reason="benchmark providers allocate on CUDA")
def test_every_provider_runs_on_cuda():
    small = bench._Shape("B1 T256 H2 d32 bf16 causal", 1, 256, 2, 32, topk=16)
    cases = bench.bench_cases(shapes=[small], sweep=[small], scores_at_shapes=[("small", 1, 256, 2, 32, 16)])
    for case in cases:
        for name, setup in case.providers.items():
            result = setup()()
            torch.cuda.synchronize()
            assert result is not None, (case.name, name)


@pytest.mark.skipif(not HAS_CUDA, reason="reads the free CUDA memory")
def test_peers_that_cannot_fit_are_skipped_as_out_of_memory():
    huge = bench._Shape("B1 T1048576 H4 d64 bf16 causal", 1, 2**20, 4, 64)
    case = next(
        c for c in bench.bench_cases(["indexer_topk"], shapes=[huge], sweep=[]) if c.op == "indexer_topk"
    )
    with pytest.raises(ProviderUnavailable, match="out of memory"):
        case.providers["torch.compile"]()


@pytest.mark.parametrize("device", DEVICES, ids=lambda d: d.type)
def test_self_check_passes(device):
    results = self_check(device)
    failed = [result for result in results if not result.passed]
    assert results
    assert not failed, failed
    assert {result.op for result in results} == {"gated_indexer", "indexer_topk", "indexer_scores_at"}
    assert {result.backend for result in results} == set(runnable_backends(device))
