"""The command line's two entry points: self_check passes here, bench_cases lists without allocating."""

from __future__ import annotations

import pytest
import torch

from hdgsa_core.registry import BenchCase
from hdgsa_core.testing import assert_self_check_passes
from hdgsa_deltanet_fla.bench import bench_cases
from hdgsa_deltanet_fla.selfcheck import self_check

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_self_check_passes(device):
    assert_self_check_passes(
        self_check, device, {"o", "S_T", "dq", "dk", "dv", "dalpha", "dbeta", "dD", "dinitial_state"}
    )


def test_bench_cases_listing():
    cases = bench_cases()
    assert len(cases) == 16
    assert all(isinstance(case, BenchCase) for case in cases)
    assert {"fwd", "fwd+bwd"} == {case.tags[0] for case in cases}
    assert all(mode in case.name for case in cases for mode in case.tags[:1])
    assert all({"hdgsa", "fla", "fla+log"} <= set(case.providers) for case in cases)
    assert all(case.bytes and case.flops for case in cases)
    assert bench_cases(["rmsnorm"]) == []
    assert len(bench_cases(["deltanet"])) == 16
