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
