"""The two small Triton kernels the fla path adds around ``chunk_gated_delta_rule``.

- ``log_decay``: ``g = log(clamp(alpha, min=1e-6))`` in float32, reading ``alpha`` in place
  (any strides, any float dtype): one pass over ``[B, T, HV]`` instead of cast + clamp + log.
  Backward: ``dalpha = dg / alpha`` where ``alpha >= 1e-6`` (as ``torch.clamp``), else 0.
- ``d_skip``: ``y = o + D[h] * v`` in float32, written in the output dtype: one pass, and the
  cast back from ``compute_dtype`` comes free. Backward: ``dv = D[h] * dy`` (optionally added
  to fla's ``dv`` in the same pass) and ``dD`` as per-block partial sums added up in a fixed
  order (deterministic, no atomics).

Every launch goes through ``hdgsa_core.launch.CachedLauncher`` (all kernel parameters by name):
after the first launch of a key it skips Triton's per-launch argument binding, tens of
microseconds of host time that show at B4 T4096 H16 D128, where fla itself is host-bound.

Importing this module imports Triton: only the fla path (which needs Triton anyway) does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hdgsa_core.launch import CachedLauncher
from hdgsa_core.triton_utils import cdiv, device_guard, next_power_of_2

from .reference import ALPHA_MIN

__all__ = ["ALPHA_MIN", "d_skip", "log_decay"]


# Elements per program of the elementwise decay kernel: [B, T, HV] is small (0.26 M elements
# at B4 T4096 H16), so one size that keeps every SM busy is enough.
_DECAY_BLOCK = 1024
# Rows of one head per program in the D-skip kernels: 32 rows x V (<= 256) columns.
_SKIP_BLOCK_T = 32


@triton.jit
def _log_decay_fwd_kernel(
    alpha, g, stride_b, stride_t, stride_h, T, HV, N, ALPHA_FLOOR: tl.constexpr, BLOCK: tl.constexpr
):
    i_block = tl.program_id(0)
    o_elem = i_block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m_elem = o_elem < N
    o_h = o_elem % HV
    o_bt = o_elem // HV
    o_src = (o_bt // T) * stride_b + (o_bt % T) * stride_t + o_h * stride_h
    b_alpha = tl.load(alpha + o_src, mask=m_elem, other=1.0).to(tl.float32)
    # where(), not maximum(): a NaN alpha stays NaN, as torch.clamp leaves it.
    b_alpha = tl.where(b_alpha < ALPHA_FLOOR, ALPHA_FLOOR, b_alpha)
    tl.store(g + o_elem, tl.log(b_alpha), mask=m_elem)


_log_decay_fwd = CachedLauncher(_log_decay_fwd_kernel)


@triton.jit
def _log_decay_bwd_kernel(
    alpha, dg, dalpha, stride_b, stride_t, stride_h, T, HV, N, ALPHA_FLOOR: tl.constexpr, BLOCK: tl.constexpr
):
    i_block = tl.program_id(0)
    o_elem = i_block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m_elem = o_elem < N
    o_h = o_elem % HV
    o_bt = o_elem // HV
    o_src = (o_bt // T) * stride_b + (o_bt % T) * stride_t + o_h * stride_h
    b_alpha = tl.load(alpha + o_src, mask=m_elem, other=1.0).to(tl.float32)
    b_dg = tl.load(dg + o_elem, mask=m_elem, other=0.0).to(tl.float32)
    b_dalpha = tl.where(b_alpha >= ALPHA_FLOOR, b_dg / b_alpha, 0.0)
    tl.store(dalpha + o_elem, b_dalpha.to(dalpha.dtype.element_ty), mask=m_elem)


_log_decay_bwd = CachedLauncher(_log_decay_bwd_kernel)


def log_decay_fwd(alpha: torch.Tensor) -> torch.Tensor:
    """``log(clamp(alpha, min=1e-6))`` as a new contiguous float32 ``[B, T, HV]``."""
    batch, seq_len, heads = alpha.shape
    stride_b, stride_t, stride_h = alpha.stride()
    g = torch.empty(batch, seq_len, heads, dtype=torch.float32, device=alpha.device)
    numel = g.numel()
    if numel:
        with device_guard(alpha.device):
            _log_decay_fwd(
                (cdiv(numel, _DECAY_BLOCK),),
                alpha=alpha,
                g=g,
                stride_b=stride_b,
                stride_t=stride_t,
                stride_h=stride_h,
                T=seq_len,
                HV=heads,
                N=numel,
                ALPHA_FLOOR=ALPHA_MIN,
                BLOCK=_DECAY_BLOCK,
            )
    return g


def log_decay_bwd(alpha: torch.Tensor, dg: torch.Tensor) -> torch.Tensor:
    """``dalpha`` (contiguous, ``alpha.dtype``) from ``dg``."""
    batch, seq_len, heads = alpha.shape
    stride_b, stride_t, stride_h = alpha.stride()
    dg = dg if dg.is_contiguous() else dg.contiguous()
    dalpha = torch.empty(batch, seq_len, heads, dtype=alpha.dtype, device=alpha.device)
    numel = dalpha.numel()
    if numel:
        with device_guard(alpha.device):
            _log_decay_bwd(
                (cdiv(numel, _DECAY_BLOCK),),
                alpha=alpha,
                dg=dg,
                dalpha=dalpha,
                stride_b=stride_b,
                stride_t=stride_t,
                stride_h=stride_h,
                T=seq_len,
                HV=heads,
                N=numel,
                ALPHA_FLOOR=ALPHA_MIN,
                BLOCK=_DECAY_BLOCK,
            )
    return dalpha


class LogDecayFunction(torch.autograd.Function):
    """``g = log(clamp(alpha, min=1e-6))``, float32, with its gradient."""

    @staticmethod
    def forward(ctx, alpha: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(alpha)
        return log_decay_fwd(alpha)

    @staticmethod
    def backward(ctx, dg: torch.Tensor) -> torch.Tensor:
        (alpha,) = ctx.saved_tensors
        return log_decay_bwd(alpha, dg)


def log_decay(alpha: torch.Tensor) -> torch.Tensor:
    """``log(clamp(alpha, min=1e-6))`` in float32 for ``alpha`` ``[B, T, HV]`` (any strides)."""
    return LogDecayFunction.apply(alpha)


@triton.jit
def _d_skip_fwd_kernel(
    o,
    v,
    D,
    y,
    stride_o_b,
    stride_o_t,
    stride_o_h,
    stride_v_b,
    stride_v_t,
    stride_v_h,
    T,
    BT,
    HV,
    V,
    BLOCK_T: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    i_row_block, i_h = tl.program_id(0), tl.program_id(1)
    o_bt = i_row_block.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    o_v = tl.arange(0, BLOCK_V)
    m_tile = (o_bt < BT)[:, None] & (o_v < V)[None, :]
    o_b, o_t = o_bt // T, o_bt % T
    p_o = o + (o_b * stride_o_b + o_t * stride_o_t + i_h * stride_o_h)[:, None] + o_v[None, :]
    p_v = v + (o_b * stride_v_b + o_t * stride_v_t + i_h * stride_v_h)[:, None] + o_v[None, :]
    b_d = tl.load(D + i_h).to(tl.float32)
    b_o = tl.load(p_o, mask=m_tile, other=0.0).to(tl.float32)
    b_v = tl.load(p_v, mask=m_tile, other=0.0).to(tl.float32)
    p_y = y + (o_bt * HV + i_h)[:, None] * V + o_v[None, :]
    tl.store(p_y, (b_o + b_d * b_v).to(y.dtype.element_ty), mask=m_tile)


_d_skip_fwd = CachedLauncher(_d_skip_fwd_kernel)


@triton.jit
def _d_skip_bwd_kernel(
    dy,
    v,
    D,
    dv,
    dD_partial,
    stride_dy_b,
    stride_dy_t,
    stride_dy_h,
    stride_v_b,
    stride_v_t,
    stride_v_h,
    T,
    BT,
    HV,
    V,
    ACCUMULATE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    i_row_block, i_h = tl.program_id(0), tl.program_id(1)
    o_bt = i_row_block.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    o_v = tl.arange(0, BLOCK_V)
    m_tile = (o_bt < BT)[:, None] & (o_v < V)[None, :]
    o_b, o_t = o_bt // T, o_bt % T
    p_dy = dy + (o_b * stride_dy_b + o_t * stride_dy_t + i_h * stride_dy_h)[:, None] + o_v[None, :]
    p_v = v + (o_b * stride_v_b + o_t * stride_v_t + i_h * stride_v_h)[:, None] + o_v[None, :]
    b_d = tl.load(D + i_h).to(tl.float32)
    b_dy = tl.load(p_dy, mask=m_tile, other=0.0).to(tl.float32)
    b_v = tl.load(p_v, mask=m_tile, other=0.0).to(tl.float32)
    p_dv = dv + (o_bt * HV + i_h)[:, None] * V + o_v[None, :]
    b_dv = b_d * b_dy
    if ACCUMULATE:  # dv holds another gradient of v (fla's): add in float32, round once
        b_dv += tl.load(p_dv, mask=m_tile, other=0.0).to(tl.float32)
    tl.store(p_dv, b_dv.to(dv.dtype.element_ty), mask=m_tile)
    tl.store(dD_partial + i_row_block * HV + i_h, tl.sum(b_dy * b_v))


_d_skip_bwd = CachedLauncher(_d_skip_bwd_kernel)


def _unit_last_stride(x: torch.Tensor) -> torch.Tensor:
    # The kernels read rows with unit stride; anything else is copied once.
    return x if x.stride(-1) == 1 else x.contiguous()


def d_skip_fwd(o: torch.Tensor, v: torch.Tensor, D: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """``o + D[h] * v`` for ``o``, ``v`` ``[B, T, HV, V]``, as a new contiguous ``out_dtype`` tensor."""
    o, v = _unit_last_stride(o), _unit_last_stride(v)
    stride_o, stride_v = o.stride(), v.stride()
    batch, seq_len, heads, head_dim_v = v.shape
    y = torch.empty(batch, seq_len, heads, head_dim_v, dtype=out_dtype, device=v.device)
    rows = batch * seq_len
    if y.numel():
        with device_guard(v.device):
            _d_skip_fwd(
                (cdiv(rows, _SKIP_BLOCK_T), heads),
                o=o,
                v=v,
                D=D,
                y=y,
                stride_o_b=stride_o[0],
                stride_o_t=stride_o[1],
                stride_o_h=stride_o[2],
                stride_v_b=stride_v[0],
                stride_v_t=stride_v[1],
                stride_v_h=stride_v[2],
                T=seq_len,
                BT=rows,
                HV=heads,
                V=head_dim_v,
                BLOCK_T=_SKIP_BLOCK_T,
                BLOCK_V=next_power_of_2(head_dim_v),
            )
    return y


def d_skip_bwd(
    dy: torch.Tensor, v: torch.Tensor, D: torch.Tensor, dv_base: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dv, dD)`` of ``y = o + D[h] * v``: ``D[h] * dy`` in ``v.dtype`` and ``sum(dy * v)`` per head.

    ``dv_base``: another gradient of ``v`` (contiguous, ``v.dtype``), added to ``D[h] * dy`` in
    float32 and overwritten with the sum, which is returned as ``dv``.
    """
    dy, v = _unit_last_stride(dy), _unit_last_stride(v)
    stride_dy, stride_v = dy.stride(), v.stride()
    batch, seq_len, heads, head_dim_v = v.shape
    rows = batch * seq_len
    num_row_blocks = cdiv(rows, _SKIP_BLOCK_T)
    accumulate = dv_base is not None
    if accumulate:
        dv = dv_base if dv_base.is_contiguous() else dv_base.contiguous()
    else:
        dv = torch.empty(batch, seq_len, heads, head_dim_v, dtype=v.dtype, device=v.device)
    dD_partial = torch.empty(num_row_blocks, heads, dtype=torch.float32, device=v.device)
    if dv.numel():
        with device_guard(v.device):
            _d_skip_bwd(
                (num_row_blocks, heads),
                dy=dy,
                v=v,
                D=D,
                dv=dv,
                dD_partial=dD_partial,
                stride_dy_b=stride_dy[0],
                stride_dy_t=stride_dy[1],
                stride_dy_h=stride_dy[2],
                stride_v_b=stride_v[0],
                stride_v_t=stride_v[1],
                stride_v_h=stride_v[2],
                T=seq_len,
                BT=rows,
                HV=heads,
                V=head_dim_v,
                ACCUMULATE=accumulate,
                BLOCK_T=_SKIP_BLOCK_T,
                BLOCK_V=next_power_of_2(head_dim_v),
            )
    dD = dD_partial.sum(0) if dv.numel() else torch.zeros(heads, dtype=torch.float32, device=v.device)
    return dv, dD.to(D.dtype)


class DSkipFunction(torch.autograd.Function):
    """``y = o + D[h] * v`` (float32 math, ``out_dtype`` result) with its gradients."""

    @staticmethod
    def forward(
        ctx, o: torch.Tensor, v: torch.Tensor, D: torch.Tensor, out_dtype: torch.dtype
    ) -> torch.Tensor:
        ctx.o_dtype = o.dtype
        ctx.save_for_backward(v, D)
        return d_skip_fwd(o, v, D, out_dtype)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        v, D = ctx.saved_tensors
        need_o, need_v, need_D = ctx.needs_input_grad[:3]
        dv = dD = None
        if need_v or need_D:
            dv, dD = d_skip_bwd(dy, v, D)
        do = dy.to(ctx.o_dtype) if need_o else None
        return do, (dv if need_v else None), (dD if need_D else None), None


def d_skip(o: torch.Tensor, v: torch.Tensor, D: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """``o + D[h] * v`` for ``o``, ``v`` ``[B, T, HV, V]`` and ``D`` ``[HV]``, in ``out_dtype``."""
    return DSkipFunction.apply(o, v, D, out_dtype)
