"""The command line's two entry points: self_check passes here, bench_cases lists without allocating."""

from __future__ import annotations

import pytest
import torch

from hdgsa_core.registry import BenchCase, ProviderUnavailable
from hdgsa_core.testing import assert_self_check_passes
from hdgsa_deltanet_fla.bench import _Shape, bench_cases
from hdgsa_deltanet_fla.selfcheck import self_check

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_self_check_passes(device):
    assert_self_check_passes(
        self_check, device, {"o", "S_T", "dq", "dk", "dv", "dalpha", "dbeta", "dD", "dinitial_state"}
    )


def test_bench_cases_listing():
    cases = [case for case in bench_cases() if "cuda" in case.devices]
    assert len(cases) == 16
    assert all(isinstance(case, BenchCase) for case in cases)
    assert {"fwd", "fwd+bwd"} == {case.tags[0] for case in cases}
    assert all(mode in case.name for case in cases for mode in case.tags[:1])
    assert all({"hdgsa", "fla", "fla+log"} <= set(case.providers) for case in cases)
    assert all(case.bytes and case.flops for case in cases)
    assert bench_cases(["rmsnorm"]) == []
    assert len(bench_cases(["deltanet"])) == 18
    cpu = [case for case in bench_cases() if case.devices == ("cpu",)]
    assert [case.tags for case in cpu] == [("fwd", "cpu"), ("fwd+bwd", "cpu")]


def test_cpu_bench_cases_run_and_agree():
    """The CPU cases at a small shape: every provider runs, and the per-step loops compute what
    the torch backend computes."""
    shape = _Shape("B1 T40 H2 D8 fp32 CPU", 1, 40, 2, 8, torch.float32)
    forward, forward_backward = bench_cases(shapes=(), cpu_shapes=(shape,))
    outputs = {}
    for name, setup in forward.providers.items():
        try:
            result = setup()()
        except ProviderUnavailable:
            continue
        outputs[name] = result[0] if isinstance(result, tuple) else result
    assert {"hdgsa", "loop"} <= set(outputs)
    for name, output in outputs.items():
        torch.testing.assert_close(output, outputs["hdgsa"], rtol=1e-4, atol=1e-4, msg=name)
    grads = forward_backward.providers["hdgsa"]()()
    assert len(grads) == 5
    assert all(torch.isfinite(grad).all() for grad in grads)
