import importlib.util
import math
from pathlib import Path

import pytest
import torch

from hdgsa_core.testing import (
    assert_close,
    assert_matches_reference,
    make_tensor,
    poisoned_empty,
    rel_error,
    strict_kernel_launches,
    strided_rows,
)


def test_rel_error_measures_and_catches_nan():
    ref = make_tensor(64, seed=1, dtype=torch.float64)
    assert rel_error(ref, ref) == 0.0
    assert math.isclose(rel_error(ref * 1.01, ref), 0.01, rel_tol=1e-6)
    bad = ref.clone()
    bad[3] = float("nan")
    assert rel_error(bad, ref) == float("inf")
    masked = ref.clone()
    masked[0] = float("-inf")
    assert rel_error(masked, masked) == 0.0


def test_assert_close_reports_location():
    ref = make_tensor(4, 5, seed=2)
    wrong = ref.clone()
    wrong[2, 3] += 100.0
    with pytest.raises(AssertionError, match=r"at \[2, 3\]"):
        assert_close("y", wrong, ref, 1e-3)


def test_assert_matches_reference_uses_lowp_error_but_caps_it():
    ref = make_tensor(1000, seed=3, dtype=torch.float64)
    lowp = ref.to(torch.bfloat16)
    assert_matches_reference("y", lowp, ref, lowp)
    with pytest.raises(AssertionError):
        assert_matches_reference("y", (ref * 1.5).to(torch.bfloat16), ref, (ref * 1.5).to(torch.bfloat16))


def test_make_tensor_is_seeded_and_not_zero():
    a = make_tensor(3, 7, seed=5)
    assert torch.equal(a, make_tensor(3, 7, seed=5))
    assert not torch.equal(a, make_tensor(3, 7, seed=6))
    assert a.abs().min() > 0


def test_strided_rows_keeps_values_and_changes_strides():
    a = make_tensor(4, 6, seed=7)
    view = strided_rows(a, pad=3)
    assert torch.equal(view, a)
    assert view.stride() == (9, 1)
    assert not view.is_contiguous()


def test_poisoned_empty_fills_nan_and_restores():
    factory = torch.empty
    with poisoned_empty():
        assert torch.isnan(torch.empty(8)).all()
        assert (torch.empty_like(torch.ones(3, dtype=torch.int32)) == torch.iinfo(torch.int32).max).all()
    assert torch.empty is factory


def test_assert_self_check_passes():
    from hdgsa_core.registry import CheckResult
    from hdgsa_core.testing import assert_self_check_passes

    def self_check(device):
        return [
            CheckResult("op", "torch", "case", "y", 0.0, 1e-4),
            CheckResult("op", "triton", "case", "y", 0.5, 1e-4),
        ]

    with pytest.raises(AssertionError, match="self_check failed"):
        assert_self_check_passes(self_check, "cpu", {"y"})
    with pytest.raises(AssertionError, match="expected"):
        assert_self_check_passes(lambda device: self_check(device)[:1], "cpu", {"y", "dx"})
    assert_self_check_passes(lambda device: self_check(device)[:1], "cpu", {"y"})


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton's interpreter")
def test_strict_kernel_launches_rejects_a_keyword_the_kernel_does_not_take(monkeypatch):
    # The interpreter drops an unknown launch keyword; a GPU launch raises KeyError on it.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    import triton
    from _copy_kernel import copy_kernel  # a plain Triton function in its own file (imports Triton)

    kernel = triton.jit(copy_kernel)
    x, y = torch.randn(5), torch.full((5,), float("nan"))
    with strict_kernel_launches():
        kernel[(1,)](x=x, y=y, n=5, BLOCK=8, num_warps=1)  # a launch option is fine
        assert torch.equal(x, y)
        with pytest.raises(
            TypeError, match=r"copy_kernel launched with keywords it does not take: \['stride'\]"
        ):
            kernel[(1,)](x=x, y=y, n=5, BLOCK=8, stride=1)
