"""The command line's two entry points: self_check passes here, bench_cases lists without allocating."""

from __future__ import annotations

import pytest
import torch

from hdgsa_core.registry import BenchCase
from hdgsa_core.testing import assert_self_check_passes
from hdgsa_rmsnorm.bench import bench_cases
from hdgsa_rmsnorm.selfcheck import self_check

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_self_check_passes(device):
    assert_self_check_passes(self_check, device, {"y", "h", "dx", "dweight", "dresidual"})


def test_bench_cases_listing():
    cases = bench_cases()
    assert cases
    assert all(isinstance(case, BenchCase) and case.op == "rmsnorm" for case in cases)
    assert all("hdgsa" in case.providers for case in cases)
    assert all(case.bytes and case.bytes > 0 for case in cases)
