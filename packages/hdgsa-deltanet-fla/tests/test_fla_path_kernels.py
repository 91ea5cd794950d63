"""The two Triton kernels of the fla path (alpha -> log-decay, D skip) against PyTorch in float64.

They run on CUDA, or on CPU under TRITON_INTERPRET=1; the fla call between them needs CUDA and is
tested in test_gated_delta_rule.py.
"""

from __future__ import annotations

import pytest
import torch

from hdgsa_core import triton_unavailable_reason
from hdgsa_core.testing import assert_close, make_tensor
from hdgsa_deltanet_fla.reference import ALPHA_MIN

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
RUNNABLE = [device for device in DEVICES if triton_unavailable_reason(torch.device(device)) is None]
if not RUNNABLE:
    pytest.skip(
        f"Triton cannot run here: {triton_unavailable_reason(torch.device('cpu'))}", allow_module_level=True
    )


@pytest.mark.parametrize("device", RUNNABLE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_log_decay(device, dtype):
    from hdgsa_deltanet_fla import _triton

    # A strided view (alpha sliced out of a wider projection), values across the clamp.
    wide = torch.sigmoid(make_tensor(3, 37, 10, seed=1, scale=4.0, dtype=torch.float64))
    wide[0, :5] = 1e-9
    wide[1, :3] = 1.0
    wide[2, 0, 0] = ALPHA_MIN
    alpha = wide.to(device=device, dtype=dtype)[..., 1:6].requires_grad_()
    assert not alpha.is_contiguous()
    g = _triton.log_decay(alpha)
    assert g.dtype == torch.float32
    assert g.shape == alpha.shape
    assert g.is_contiguous()
    alpha64 = alpha.detach().double().requires_grad_()
    g64 = alpha64.clamp(min=ALPHA_MIN).log()
    assert_close("g", g, g64, 1e-6)
    dg = make_tensor(*g.shape, seed=2, device=device)
    (dalpha,) = torch.autograd.grad(g, alpha, dg)
    (dalpha64,) = torch.autograd.grad(g64, alpha64, dg.double())
    assert dalpha.dtype == dtype
    assert_close("dalpha", dalpha, dalpha64, 1e-6 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("device", RUNNABLE)
@pytest.mark.parametrize(
    ("o_dtype", "v_dtype", "out_dtype"),
    [
        (torch.float32, torch.float32, torch.float32),
        (torch.bfloat16, torch.bfloat16, torch.bfloat16),
        (torch.float32, torch.bfloat16, torch.bfloat16),  # compute_dtype=float32: fused cast back
    ],
    ids=["fp32", "bf16", "fp32-to-bf16"],
)
@pytest.mark.parametrize("head_dim_v", [1, 20, 64])
def test_d_skip(device, o_dtype, v_dtype, out_dtype, head_dim_v):
    from hdgsa_deltanet_fla import _triton

    batch, seq_len, heads = 2, 45, 3
    o = make_tensor(batch, seq_len, heads, head_dim_v, seed=3, device=device, dtype=o_dtype).requires_grad_()
    # v as a strided view: rows of a wider buffer (the packed layout's split heads look alike).
    v_wide = make_tensor(batch, seq_len, heads, head_dim_v + 3, seed=4, device=device, dtype=v_dtype)
    v = v_wide[..., :head_dim_v].requires_grad_()
    D = make_tensor(heads, seed=5, device=device).requires_grad_()
    y = _triton.d_skip(o, v, D, out_dtype)
    assert y.dtype == out_dtype
    assert y.is_contiguous()
    o64, v64, D64 = (t.detach().double().requires_grad_() for t in (o, v, D))
    y64 = o64 + D64[:, None] * v64
    tol = 1e-6 if out_dtype == torch.float32 else 1e-2
    assert_close("y", y, y64, tol)
    dy = make_tensor(*y.shape, seed=6, device=device, dtype=out_dtype)
    grads = torch.autograd.grad(y, (o, v, D), dy)
    grads64 = torch.autograd.grad(y64, (o64, v64, D64), dy.double())
    for name, grad, grad64, leaf in zip(("do", "dv", "dD"), grads, grads64, (o, v, D), strict=True):
        assert grad.dtype == leaf.dtype, name
        assert grad.shape == leaf.shape, name
        assert_close(name, grad, grad64, 1e-5 if grad.dtype == torch.float32 else 1e-2)
    # Deterministic: dD is a fixed-order sum of per-block partials.
    again = torch.autograd.grad(_triton.d_skip(o, v, D, out_dtype), (D,), dy)[0]
    assert torch.equal(again, grads[2])
