"""The command line's two entry points: self_check passes here, bench_cases lists without allocating."""

from __future__ import annotations

from hdgsa_core.testing import assert_self_check_passes


def test_bench_cases_listed_without_allocating():
    from hdgsa_sinkhorn.bench import bench_cases

    cases = bench_cases()
    assert {case.tags[0] for case in cases} == {"fwd", "fwd+bwd"}
    assert all({"hdgsa", "torch", "torch.compile", "fla", "liger"} <= set(case.providers) for case in cases)
    assert all(case.bytes and case.bytes > 0 for case in cases)
    assert bench_cases(["rmsnorm"]) == []
    assert len(bench_cases(["sinkhorn"])) == len(cases)


def test_self_check_passes_here():
    from hdgsa_sinkhorn.selfcheck import self_check

    assert_self_check_passes(self_check, "cpu", {"P", "d logits"})
