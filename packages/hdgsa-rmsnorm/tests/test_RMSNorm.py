"""The RMSNorm module: parameters, extra_repr, forward == rms_norm, argument checks."""

from __future__ import annotations

import pytest
import torch

from hdgsa_core.testing import assert_matches_reference, make_tensor
from hdgsa_rmsnorm import RMSNorm, rms_norm, rms_norm_reference


def test_parameters_and_repr():
    norm = RMSNorm(48)
    assert isinstance(norm.weight, torch.nn.Parameter)
    assert norm.weight.shape == (48,)
    assert torch.equal(norm.weight.detach(), torch.ones(48))
    assert repr(norm) == "RMSNorm(48, eps=1e-06, elementwise_affine=True)"
    plain = RMSNorm(16, eps=1e-5, elementwise_affine=False)
    assert plain.weight is None
    assert list(plain.parameters()) == []
    assert "elementwise_affine=False" in repr(plain)
    typed = RMSNorm(8, dtype=torch.bfloat16, device="cpu")
    assert typed.weight.dtype == torch.bfloat16
    assert typed.weight.device.type == "cpu"


def test_forward_matches_function():
    norm = RMSNorm(40, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(make_tensor(40, seed=3, offset=1.0, scale=0.3))
    x = make_tensor(3, 5, 40, seed=1, requires_grad=True)
    residual = make_tensor(3, 5, 40, seed=2, requires_grad=True)
    y = norm(x)
    assert torch.equal(y, rms_norm(x, norm.weight, 1e-5))
    y, h = norm(x, residual, prenorm=True)
    y64, h64 = rms_norm_reference(x.double(), norm.weight.double(), 1e-5, residual.double(), True)
    assert_matches_reference("module y", y, y64)
    assert_matches_reference("module h", h, h64)
    y.sum().backward()
    assert norm.weight.grad is not None
    assert norm.weight.grad.shape == (40,)
    assert x.grad is not None
    assert residual.grad is not None


def test_bad_arguments():
    with pytest.raises(TypeError, match="hidden_size"):
        RMSNorm(8.0)
    with pytest.raises(ValueError, match="hidden_size"):
        RMSNorm(0)
    with pytest.raises(ValueError, match="eps"):
        RMSNorm(8, eps=-1e-6)
    with pytest.raises(ValueError, match="weight"):
        RMSNorm(8)(torch.randn(2, 9))


def test_bad_constructor_arguments():
    with pytest.raises(TypeError, match="hidden_size"):
        RMSNorm(True)
    with pytest.raises(TypeError, match="hidden_size"):
        RMSNorm("8")
    with pytest.raises(TypeError, match="eps"):
        RMSNorm(8, eps=None)
    with pytest.raises(ValueError, match="eps"):
        RMSNorm(8, eps=float("inf"))
    with pytest.raises(ValueError, match="eps"):
        RMSNorm(8, eps=float("nan"))
    with pytest.raises(TypeError, match="elementwise_affine"):
        RMSNorm(8, elementwise_affine="no")
    with pytest.raises(TypeError, match="dtype"):
        RMSNorm(8, dtype=torch.float64)
    with pytest.raises(TypeError, match="dtype"):
        RMSNorm(8, dtype=torch.int32)


def test_no_weight_checks_hidden_size():
    """Without a weight the module still holds x to [..., hidden_size]."""
    plain = RMSNorm(16, elementwise_affine=False)
    with pytest.raises(ValueError, match=r"x: expected shape .*16.*got shape \[2, 9\]"):
        plain(torch.randn(2, 9))
    assert plain(torch.randn(2, 16)).shape == (2, 16)
    assert plain.normalized_shape == (16,)


def test_forward_prenorm_and_residual_in_module_dtype():
    norm = RMSNorm(24, dtype=torch.bfloat16)
    x = make_tensor(3, 24, dtype=torch.bfloat16, seed=1)
    residual = make_tensor(3, 24, dtype=torch.float32, seed=2)
    y, h = norm(x, residual, prenorm=True)
    assert y.dtype == torch.bfloat16
    assert h.dtype == torch.bfloat16
    with pytest.raises(TypeError, match="prenorm"):
        norm(x, residual, prenorm="yes")


def test_state_dict_round_trip():
    norm = RMSNorm(12)
    with torch.no_grad():
        norm.weight.copy_(make_tensor(12, seed=4))
    other = RMSNorm(12)
    other.load_state_dict(norm.state_dict())
    assert torch.equal(other.weight, norm.weight)
    assert list(norm.state_dict()) == ["weight"]
