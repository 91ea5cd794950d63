import pytest
import torch

from hdgsa_core import (
    check_dtype,
    check_index_range,
    check_ndim,
    check_same_device,
    check_same_dtype,
    check_shape,
    check_tensor,
)


def test_check_shape_names_argument_expected_and_actual():
    x = torch.ones(2, 3, 4)
    check_shape("x", x, (2, None, 4))
    with pytest.raises(
        ValueError, match=r"x: expected shape \[B, T, N\] = \[2, \*, 5\], got shape \[2, 3, 4\]"
    ):
        check_shape("x", x, (2, None, 5), "[B, T, N]")
    with pytest.raises(ValueError, match="got shape"):
        check_shape("x", x, (2, 3))


def test_check_ndim():
    check_ndim("q", torch.ones(1, 2, 3, 4), 4, "[B, T, H, D]")
    check_ndim("q", torch.ones(1, 2, 3), (3, 4), "[B, T, H, D]")
    with pytest.raises(ValueError, match=r"q: expected shape \[B, T, H, D\], got shape \[1, 2\]"):
        check_ndim("q", torch.ones(1, 2), 4, "[B, T, H, D]")


def test_check_dtype_is_type_error():
    check_dtype("x", torch.ones(2, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="x: dtype float64 is not supported"):
        check_dtype("x", torch.ones(2, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"expected a torch\.Tensor"):
        check_tensor("x", [1.0])


def test_check_same_device():
    a = torch.ones(1)
    assert check_same_device(a=a, b=None, c=torch.ones(2)) == a.device
    with pytest.raises(ValueError, match="one device"):
        check_same_device(a=a, b=torch.ones(1, device="meta"))


def test_check_index_range():
    check_index_range("indices", torch.tensor([0, 4, -1]), 5)
    check_index_range("indices", torch.empty(0, dtype=torch.int64), 5)
    with pytest.raises(ValueError, match="indices: index 5 is out of range"):
        check_index_range("indices", torch.tensor([0, 5]), 5)


def test_scalar_checks():
    from hdgsa_core import check_bool, check_int, check_real

    check_int("topk", 3)
    check_real("scale", 0.5)
    check_real("scale", 2)
    check_bool("causal", True)
    with pytest.raises(TypeError, match="topk must be an int, got float"):
        check_int("topk", 3.0)
    with pytest.raises(TypeError, match="must be an int, got bool"):
        check_int("topk", True)
    with pytest.raises(TypeError, match="scale must be a real number, got str"):
        check_real("scale", "1")
    with pytest.raises(TypeError, match="causal must be a bool, got int"):
        check_bool("causal", 1)


def test_autocast_disabled_keeps_float32():
    from hdgsa_core import autocast_disabled

    a = torch.randn(4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (a @ a).dtype == torch.bfloat16
        with autocast_disabled(a.device):
            assert (a @ a).dtype == torch.float32


def test_check_same_dtype_names_the_odd_one():
    q, k = torch.ones(2), torch.ones(2)
    check_same_dtype("q", q, k=k, v=torch.ones(3))
    with pytest.raises(
        TypeError, match=r"v: dtype float16 differs from q's float32; q, k, v must share one dtype"
    ):
        check_same_dtype("q", q, k=k, v=torch.ones(2, dtype=torch.float16))
