"""RMSNorm forward kernels: ``y = (x + residual) * rsqrt(mean((x + residual)^2) + eps) * w``.

Two kernels, both one read of ``x`` and ``residual`` and one write of ``y`` (and ``h``):
- ``_rms_norm_fwd_kernel``: rows of up to ``MAX_FUSED_N`` elements, whole rows in registers,
  ``BLOCK_M`` rows per program.
- ``_rms_norm_fwd_split_kernel``: longer rows, split over ``NUM_CHUNKS`` programs of
  ``BLOCK_N`` columns each. On a GPU (``PHASE == 0``) the programs of a row exchange their
  partial sums of squares through a small buffer (``_triton_exchange``), and each keeps its
  chunk in registers meanwhile: still one pass. In the CPU interpreter, which runs programs
  one at a time, the same kernel runs twice: ``PHASE == 1`` writes the partial sums (and ``h``),
  ``PHASE == 2`` reads them and writes ``y``.
Math in float32; ``rstd`` per row is stored (4 bytes a row) for the backward.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hdgsa_core.launch import CachedLauncher
from hdgsa_core.triton_utils import cdiv, next_power_of_2, on_input_device

from ._triton_common import (
    MAX_FUSED_N,
    MAX_SPINS,
    SPLIT_BLOCK_N,
    SPLIT_NUM_WARPS,
    SPLIT_PROGRAMS_PER_SM,
    contiguous_layout,
    row_layout,
    row_tile,
    sm_count,
    split_launch_options,
    unit_stride,
    use_one_pass_split,
)
from ._triton_exchange import new_exchange, publish_partial, row_total

__all__ = ["rms_norm_fwd"]


@triton.jit
def _row_offsets(rows, inner, stride_outer, stride_inner):
    """Element offset of each row start (int64): two-level row strides."""
    rows = tl.cast(rows, tl.int64)
    return (rows // inner) * stride_outer + (rows % inner) * stride_inner


@triton.jit(do_not_specialize=["M", "x_inner", "r_inner"])
def _rms_norm_fwd_kernel(
    X,
    RES,
    W,
    Y,
    H,
    RSTD,
    M,
    N,
    eps,
    x_inner,
    x_stride_outer,
    x_stride_inner,
    r_inner,
    r_stride_outer,
    r_stride_inner,
    HAS_RESIDUAL: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    STORE_H: tl.constexpr,
    STORE_RSTD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    i_m = tl.program_id(0)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_n = tl.arange(0, BLOCK_N)
    m_m = o_m < M
    m_n = o_n < N
    m_mn = m_m[:, None] & m_n[None, :]

    o_x = _row_offsets(o_m, x_inner, x_stride_outer, x_stride_inner)
    b_h = tl.load(X + o_x[:, None] + o_n[None, :], mask=m_mn, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        o_r = _row_offsets(o_m, r_inner, r_stride_outer, r_stride_inner)
        b_h += tl.load(RES + o_r[:, None] + o_n[None, :], mask=m_mn, other=0.0).to(tl.float32)
    b_rstd = tl.rsqrt(tl.sum(b_h * b_h, axis=1) / N + eps)
    b_y = b_h * b_rstd[:, None]
    if HAS_WEIGHT:
        b_y *= tl.load(W + o_n, mask=m_n, other=0.0).to(tl.float32)[None, :]

    # outputs are packed [M, N]
    o_out = o_m.to(tl.int64)[:, None] * N + o_n[None, :]
    tl.store(Y + o_out, b_y.to(Y.dtype.element_ty), mask=m_mn)
    if STORE_H:
        tl.store(H + o_out, b_h.to(H.dtype.element_ty), mask=m_mn)
    if STORE_RSTD:
        tl.store(RSTD + o_m, b_rstd, mask=m_m)


@triton.jit(do_not_specialize=["M", "x_inner", "r_inner"])
def _rms_norm_fwd_split_kernel(
    X,
    RES,
    W,
    Y,
    H,
    RSTD,
    EXCHANGE,
    M,
    N,
    eps,
    x_inner,
    x_stride_outer,
    x_stride_inner,
    r_inner,
    r_stride_outer,
    r_stride_inner,
    NUM_CHUNKS,
    HAS_RESIDUAL: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    STORE_H: tl.constexpr,
    STORE_RSTD: tl.constexpr,
    PHASE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_G: tl.constexpr,
    MAX_SPINS: tl.constexpr,
):
    # program i_p owns column chunk i_g of the rows of slot i_s: rows i_s, i_s + n_s, ...
    i_p = tl.program_id(0)
    i_g = i_p % NUM_CHUNKS
    i_s = i_p // NUM_CHUNKS
    n_s = tl.num_programs(0) // NUM_CHUNKS
    o_n = i_g * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < N
    o_g = tl.arange(0, BLOCK_G)
    m_g = o_g < NUM_CHUNKS
    if HAS_WEIGHT and PHASE != 1:
        b_w = tl.load(W + o_n, mask=m_n, other=0.0).to(tl.float32)

    # one pass (PHASE 0): the next row's chunk is loaded before this row waits for its partner
    # programs, so the wait overlaps memory traffic
    if PHASE == 0:
        m_next = m_n & (i_s < M)
        r_x = tl.load(
            X + _row_offsets(i_s, x_inner, x_stride_outer, x_stride_inner) + o_n, mask=m_next, other=0.0
        )
        if HAS_RESIDUAL:
            r_r = tl.load(
                RES + _row_offsets(i_s, r_inner, r_stride_outer, r_stride_inner) + o_n, mask=m_next, other=0.0
            )
    n_spins = 0  # spin budget of this program, over all its rows
    for i_row in range(i_s, M, n_s):
        if PHASE == 0:
            b_h = r_x.to(tl.float32)
            if HAS_RESIDUAL:
                b_h += r_r.to(tl.float32)
            i_next = i_row + n_s
            m_next = m_n & (i_next < M)
            r_x = tl.load(
                X + _row_offsets(i_next, x_inner, x_stride_outer, x_stride_inner) + o_n,
                mask=m_next,
                other=0.0,
            )
            if HAS_RESIDUAL:
                o_r = _row_offsets(i_next, r_inner, r_stride_outer, r_stride_inner)
                r_r = tl.load(RES + o_r + o_n, mask=m_next, other=0.0)
        else:
            b_h = tl.load(
                X + _row_offsets(i_row, x_inner, x_stride_outer, x_stride_inner) + o_n, mask=m_n, other=0.0
            ).to(tl.float32)
            if HAS_RESIDUAL:
                o_r = _row_offsets(i_row, r_inner, r_stride_outer, r_stride_inner)
                b_h += tl.load(RES + o_r + o_n, mask=m_n, other=0.0).to(tl.float32)
        o_out = tl.cast(i_row, tl.int64) * N + o_n
        if PHASE != 2:
            publish_partial(EXCHANGE, i_row, i_g, NUM_CHUNKS, tl.sum(b_h * b_h, axis=0))
            if STORE_H:
                tl.store(H + o_out, b_h.to(H.dtype.element_ty), mask=m_n)
        if PHASE != 1:
            # one pass: wait for the row's other chunks; a row whose partial sums never all
            # arrived gives NaN, not a hang
            b_total, complete, n_spins = row_total(
                EXCHANGE, i_row, o_g, m_g, NUM_CHUNKS, n_spins, MAX_SPINS, PHASE == 0
            )
            b_rstd = tl.where(complete, tl.rsqrt(b_total / N + eps), float("nan"))
            b_y = b_h * b_rstd
            if HAS_WEIGHT:
                b_y *= b_w
            tl.store(Y + o_out, b_y.to(Y.dtype.element_ty), mask=m_n)
            if STORE_RSTD:  # noqa: SIM102  (constexpr test outside, run-time test inside)
                if i_g == 0:
                    tl.store(RSTD + i_row, b_rstd)


# Launched without Triton's per-launch argument binding (tens of us of host time per launch).
_launch_fwd_kernel = CachedLauncher(_rms_norm_fwd_kernel)
_launch_fwd_split_kernel = CachedLauncher(_rms_norm_fwd_split_kernel)


@on_input_device
def rms_norm_fwd(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    residual: torch.Tensor | None,
    eps: float,
    residual_in_fp32: bool,
    store_h: bool,
    store_rstd: bool,
    *,
    config: dict[str, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Launch the forward. Returns ``(y, h, rstd)``: ``y`` like ``x``; ``h`` (``x + residual``,
    in ``x.dtype`` or float32) when ``store_h``; ``rstd`` ``[M]`` float32 when ``store_rstd``.

    ``config`` overrides the tile choice (benchmark sweeps only): ``block_m``, ``num_warps``,
    ``max_fused_n``, ``split_block_n``, ``split_num_warps``, ``split_programs_per_sm``,
    ``one_pass`` (False: the two-launch split path).
    """
    config = config or {}
    hidden = x.shape[-1]
    rows = x.numel() // hidden if hidden else 0
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    h = None
    if store_h:
        h = torch.empty(x.shape, dtype=torch.float32 if residual_in_fp32 else x.dtype, device=x.device)
    rstd = torch.empty(rows, dtype=torch.float32, device=x.device) if store_rstd else None
    if x.numel() == 0:
        return y, h, rstd

    x_rows = row_layout(x)
    r_rows = row_layout(residual) if residual is not None else x_rows
    out_rows = contiguous_layout(y)
    common = dict(
        X=x_rows.tensor,
        RES=r_rows.tensor,
        W=unit_stride(weight) if weight is not None else out_rows.tensor,
        Y=y,
        H=h if h is not None else y,
        RSTD=rstd if rstd is not None else y,
        M=rows,
        N=hidden,
        eps=eps,
        **x_rows.kernel_args("x"),
        **r_rows.kernel_args("r"),
        HAS_RESIDUAL=residual is not None,
        HAS_WEIGHT=weight is not None,
        STORE_H=store_h,
        STORE_RSTD=store_rstd,
    )
    if hidden <= config.get("max_fused_n", MAX_FUSED_N):
        tile = row_tile(hidden, rows)
        block_m = config.get("block_m", tile.block_m)
        num_warps = config.get("num_warps", tile.num_warps)
        _launch_fwd_kernel(
            (cdiv(rows, block_m),), **common, BLOCK_M=block_m, BLOCK_N=tile.block_n, num_warps=num_warps
        )
        return y, h, rstd

    block_n = config.get("split_block_n", SPLIT_BLOCK_N)
    num_warps = config.get("split_num_warps", SPLIT_NUM_WARPS)
    programs_per_sm = config.get("split_programs_per_sm", SPLIT_PROGRAMS_PER_SM)
    n_chunks = cdiv(hidden, block_n)
    exchange = new_exchange(rows, n_chunks, x.device)
    split = dict(
        common,
        EXCHANGE=exchange,
        NUM_CHUNKS=n_chunks,
        BLOCK_N=block_n,
        BLOCK_G=next_power_of_2(n_chunks),
        MAX_SPINS=MAX_SPINS,
    )
    if config.get("one_pass", True) and use_one_pass_split(x.device, n_chunks, programs_per_sm):
        n_slots = max(1, min(rows, sm_count(x.device) * programs_per_sm // n_chunks))
        _launch_fwd_split_kernel(
            (n_slots * n_chunks,),
            **split,
            PHASE=0,
            num_warps=num_warps,
            **split_launch_options(x.device, num_warps, programs_per_sm),
        )
        return y, h, rstd
    n_slots = max(1, min(rows, 4 * sm_count(x.device) // n_chunks))
    for phase in (1, 2):
        _launch_fwd_split_kernel((n_slots * n_chunks,), **split, PHASE=phase, num_warps=num_warps)
    return y, h, rstd
