"""The Triton backend of :func:`hdgsa_rmsnorm.rms_norm`: autograd and ``torch.library`` glue
around the launchers of ``_triton_fwd`` / ``_triton_bwd``.

Two doors to the same launchers:
- eager: ``_RMSNormFunction`` (an ``autograd.Function``) calls them directly, so an eager call
  pays no dispatcher overhead;
- under ``torch.compile``: the custom ops ``hdgsa::rms_norm_fwd`` / ``hdgsa::rms_norm_bwd``
  (with fake implementations and ``register_autograd``), so ``fullgraph=True`` traces through.
Both save the same tensors and run the same backward (``_backward``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.autograd.function import once_differentiable

from hdgsa_core.custom_ops import is_compiling, op_name

from ._triton_bwd import rms_norm_bwd
from ._triton_common import row_layout
from ._triton_fwd import rms_norm_fwd

__all__ = ["rms_norm_triton"]


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _save(
    ctx: Any,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    residual: torch.Tensor | None,
    h: torch.Tensor | None,
    rstd: torch.Tensor | None,
) -> None:
    """What the backward reads: the prenorm output ``h`` when it is the float32 ``h`` the
    forward normalized (fewest bytes), else ``x`` and ``residual``, from which the backward
    recomputes that float32 ``h`` exactly; with ``rstd`` and ``weight``. A ``h`` returned in a
    half dtype is rounded (or inf where ``x + residual`` overflows it): the gradient read from
    it would be that of another function."""
    ctx.has_residual = residual is not None
    ctx.x_dtype = x.dtype
    ctx.residual_dtype = residual.dtype if residual is not None else None
    if residual is not None and h is not None and h.dtype == torch.float32:
        ctx.save_for_backward(h, None, rstd, weight)
    else:
        ctx.save_for_backward(x, residual, rstd, weight)


def _backward(
    ctx: Any, dy: torch.Tensor | None, dh: torch.Tensor | None, need_dw: bool, bwd_op: Any
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``(dx, dweight, dresidual)``; ``dx`` and ``dresidual`` are one tensor when the dtypes
    agree (the kernel writes it once)."""
    h_source, h_second, rstd, weight = ctx.saved_tensors
    need_dw = need_dw and weight is not None
    if dy is None:  # only h was used downstream: h = x + residual passes dh straight through
        if dh is None:
            return None, None, None
        dres = dh.to(ctx.residual_dtype) if ctx.has_residual else None
        dw = torch.zeros_like(weight) if need_dw else None
        return dh.to(ctx.x_dtype), dw, dres
    residual_dtype = ctx.residual_dtype if ctx.has_residual else ctx.x_dtype
    dx, dw, dres = bwd_op(dy, dh, h_source, h_second, rstd, weight, ctx.x_dtype, residual_dtype, need_dw)
    if not ctx.has_residual:
        return dx, (dw if need_dw else None), None
    if ctx.residual_dtype == ctx.x_dtype:
        dres = dx
    return dx, (dw if need_dw else None), dres


def _h_differentiable(ctx: Any) -> bool:
    """``h = x + residual`` has a gradient only when ``x`` or ``residual`` needs one (as on
    the PyTorch backend: a weight that requires grad does not make ``h`` require it)."""
    return ctx.needs_input_grad[0] or ctx.needs_input_grad[2]


def _bwd_eager(dy, dh, h_source, h_second, rstd, weight, x_dtype, residual_dtype, need_dw):
    h2 = row_layout(h_second) if h_second is not None else None
    return rms_norm_bwd(dy, dh, row_layout(h_source), h2, rstd, weight, x_dtype, residual_dtype, need_dw)


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, residual, eps, prenorm, residual_in_fp32, needs_grad):
        y, h, rstd = rms_norm_fwd(x, weight, residual, eps, residual_in_fp32, prenorm, needs_grad)
        ctx.set_materialize_grads(False)
        if prenorm and not _h_differentiable(ctx):
            ctx.mark_non_differentiable(h)
        if needs_grad:
            _save(ctx, x, weight, residual, h, rstd)
        return (y, h) if prenorm else y

    @staticmethod
    @once_differentiable  # the backward kernels have no gradient: a double backward raises
    def backward(ctx, dy, dh=None):
        dx, dw, dres = _backward(ctx, dy, dh, ctx.needs_input_grad[1], _bwd_eager)
        return dx, dw, dres, None, None, None, None


# ----------------------------------------------------------------------------- custom ops


@torch.library.custom_op(op_name("rms_norm_fwd"), mutates_args=())
def _rms_norm_fwd_op(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    residual: torch.Tensor | None,
    eps: float,
    residual_in_fp32: bool,
    store_h: bool,
    store_rstd: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y, h, rstd)``; ``h`` / ``rstd`` are empty when not stored."""
    y, h, rstd = rms_norm_fwd(x, weight, residual, eps, residual_in_fp32, store_h, store_rstd)
    if h is None:
        h = x.new_empty(0)
    if rstd is None:
        rstd = x.new_empty(0, dtype=torch.float32)
    return y, h, rstd


@_rms_norm_fwd_op.register_fake
def _(x, weight, residual, eps, residual_in_fp32, store_h, store_rstd):
    y = x.new_empty(x.shape)
    h_dtype = torch.float32 if residual_in_fp32 else x.dtype
    h = x.new_empty(x.shape, dtype=h_dtype) if store_h else x.new_empty(0)
    rows = math.prod(x.shape[:-1])
    rstd = x.new_empty(rows, dtype=torch.float32) if store_rstd else x.new_empty(0, dtype=torch.float32)
    return y, h, rstd


@torch.library.custom_op(op_name("rms_norm_bwd"), mutates_args=())
def _rms_norm_bwd_op(
    dy: torch.Tensor,
    dh: torch.Tensor | None,
    h: torch.Tensor,
    h_second: torch.Tensor | None,
    rstd: torch.Tensor,
    weight: torch.Tensor | None,
    x_dtype: torch.dtype,
    residual_dtype: torch.dtype,
    need_dw: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx, dw, dresidual)``; ``dw`` empty unless ``need_dw``, ``dresidual`` empty unless its
    dtype differs from ``x_dtype``. ``h_second``: the residual, when ``h`` is ``x``."""
    dx, dw, dres = _bwd_eager(dy, dh, h, h_second, rstd, weight, x_dtype, residual_dtype, need_dw)
    if dw is None:
        dw = dy.new_empty(0, dtype=torch.float32)
    if dres is None:
        dres = dy.new_empty(0, dtype=x_dtype)
    return dx, dw, dres


@_rms_norm_bwd_op.register_fake
def _(dy, dh, h, h_second, rstd, weight, x_dtype, residual_dtype, need_dw):
    dx = h.new_empty(h.shape, dtype=x_dtype)
    need_dw = need_dw and weight is not None
    dw = weight.new_empty(weight.shape) if need_dw else dy.new_empty(0, dtype=torch.float32)
    separate = residual_dtype != x_dtype
    dres = h.new_empty(h.shape, dtype=residual_dtype) if separate else dy.new_empty(0, dtype=x_dtype)
    return dx, dw, dres


def _bwd_via_op(dy, dh, h_source, h_second, rstd, weight, x_dtype, residual_dtype, need_dw):
    dx, dw, dres = torch.ops.hdgsa.rms_norm_bwd(
        dy, dh, h_source, h_second, rstd, weight, x_dtype, residual_dtype, need_dw
    )
    separate = residual_dtype != x_dtype
    return dx, (dw if need_dw and weight is not None else None), (dres if separate else None)


def _fwd_op_setup_context(ctx, inputs, output):
    x, weight, residual, _eps, _residual_in_fp32, store_h, store_rstd = inputs
    _y, h, rstd = output
    ctx.mark_non_differentiable(rstd)
    if store_h and not _h_differentiable(ctx):
        ctx.mark_non_differentiable(h)
    ctx.saved = store_rstd
    if store_rstd:
        _save(ctx, x, weight, residual, h if store_h else None, rstd)


def _fwd_op_backward(ctx, dy, dh, _drstd):
    if not ctx.saved:
        return None, None, None, None, None, None, None
    if dh is not None and dh.numel() == 0:  # h was not stored: nothing flows into it
        dh = None
    dx, dw, dres = _backward(ctx, dy, dh, ctx.needs_input_grad[1], _bwd_via_op)
    return dx, dw, dres, None, None, None, None


torch.library.register_autograd(
    op_name("rms_norm_fwd"), _fwd_op_backward, setup_context=_fwd_op_setup_context
)


# ----------------------------------------------------------------------------- entry point


def rms_norm_triton(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    residual: torch.Tensor | None,
    prenorm: bool,
    residual_in_fp32: bool,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The Triton backend (arguments already checked by :func:`hdgsa_rmsnorm.rms_norm`)."""
    needs_grad = _needs_grad(x, weight, residual)
    if not is_compiling():
        if not needs_grad:  # inference: no autograd node, no rstd, h only if asked for
            y, h, _rstd = rms_norm_fwd(x, weight, residual, eps, residual_in_fp32, prenorm, False)
            return (y, h) if prenorm else y
        return _RMSNormFunction.apply(x, weight, residual, eps, prenorm, residual_in_fp32, needs_grad)
    y, h, _rstd = torch.ops.hdgsa.rms_norm_fwd(
        x, weight, residual, eps, residual_in_fp32, prenorm, needs_grad
    )
    return (y, h) if prenorm else y
