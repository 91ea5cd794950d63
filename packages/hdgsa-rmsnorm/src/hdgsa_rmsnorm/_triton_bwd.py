"""RMSNorm backward kernels.

With ``n = h * rstd`` and ``g = dy * w`` (``g = dy`` without a weight)::

    dh_total = rstd * (g - n * mean(g * n)) + dh      (dh: gradient into the prenorm output h)
    dx = dresidual = dh_total
    dw = sum over rows of dy * n

One pass over the bytes: read ``dy``, ``h`` (the saved ``x + residual``, or ``x``), ``dh`` when
prenorm's ``h`` has a gradient; write ``dx`` once (it is also the residual's gradient; a second
tensor is written only when the residual's dtype differs from ``x``'s). ``rstd`` comes from the
forward (4 bytes a row). ``dw`` is reduced deterministically: each program of a persistent grid
accumulates its rows into its own float32 row of ``DW_PARTIAL``, and a second small kernel sums
those rows in a fixed order.

- ``_rms_norm_bwd_kernel``: rows of up to ``BWD_MAX_FUSED_N``, persistent programs over tiles of
  ``BLOCK_M`` rows, the next tile's loads issued before the current tile's math.
- ``_rms_norm_bwd_split_kernel``: longer rows over ``NUM_CHUNKS`` programs each, exchanging the
  per-row partial sums of ``g * n`` as the forward split kernel does (``PHASE`` 0 / 1 + 2).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hdgsa_core.launch import CachedLauncher
from hdgsa_core.triton_utils import cdiv, next_power_of_2, on_input_device

from ._triton_common import (
    BWD_MAX_FUSED_N,
    BWD_SPLIT_BLOCK_N,
    BWD_SPLIT_NUM_WARPS,
    BWD_SPLIT_PROGRAMS_PER_SM,
    MAX_SPINS,
    RowLayout,
    bwd_row_tile,
    resident_launch_options,
    row_layout,
    sm_count,
    split_launch_options,
    unit_stride,
    use_one_pass_split,
)
from ._triton_exchange import new_exchange, publish_partial, row_total
from ._triton_fwd import _row_offsets

__all__ = ["rms_norm_bwd"]

# The persistent backward (rows that fit) runs 16 warps per SM (see bwd_row_tile); a register
# cap of 128 per thread makes them all resident (a persistent program that is not resident
# would run after the others, as a second wave).
# Columns per program of the dw reduction, and partial rows summed per step (many programs,
# few dependent steps: the reduction reads a few MB and is latency-bound).
_REDUCE_BLOCK_N = 64
_REDUCE_BLOCK_P = 64


@triton.jit
def _load_rows(P, o_rows, o_n, mask, inner, stride_outer, stride_inner):
    o_start = _row_offsets(o_rows, inner, stride_outer, stride_inner)
    return tl.load(P + o_start[:, None] + o_n[None, :], mask=mask, other=0.0)


@triton.jit(do_not_specialize=["M", "dy_inner", "dh_inner", "h_inner", "h2_inner"])
def _rms_norm_bwd_kernel(
    DY,
    DH,
    H,
    H2,
    W,
    RSTD,
    DX,
    DRES,
    DW_PARTIAL,
    M,
    N,
    dy_inner,
    dy_stride_outer,
    dy_stride_inner,
    dh_inner,
    dh_stride_outer,
    dh_stride_inner,
    h_inner,
    h_stride_outer,
    h_stride_inner,
    h2_inner,
    h2_stride_outer,
    h2_stride_inner,
    HAS_DH: tl.constexpr,
    HAS_H2: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_DRES: tl.constexpr,
    NEED_DW: tl.constexpr,
    PREFETCH: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    i_p = tl.program_id(0)
    n_p = tl.num_programs(0)
    o_n = tl.arange(0, BLOCK_N)
    m_n = o_n < N
    o_tile = tl.arange(0, BLOCK_M)
    if HAS_WEIGHT:
        b_w = tl.load(W + o_n, mask=m_n, other=0.0).to(tl.float32)
    b_dw = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)

    n_tiles = tl.cdiv(M, BLOCK_M)
    # raw (input-dtype) blocks of the tile being worked on; with PREFETCH the next tile's are
    # loaded before this tile's math so that their latency overlaps it
    if PREFETCH:
        o_m = i_p * BLOCK_M + o_tile
        m_mn = (o_m < M)[:, None] & m_n[None, :]
        r_dy = _load_rows(DY, o_m, o_n, m_mn, dy_inner, dy_stride_outer, dy_stride_inner)
        r_h = _load_rows(H, o_m, o_n, m_mn, h_inner, h_stride_outer, h_stride_inner)
        if HAS_H2:
            r_h2 = _load_rows(H2, o_m, o_n, m_mn, h2_inner, h2_stride_outer, h2_stride_inner)
        r_rstd = tl.load(RSTD + o_m, mask=o_m < M, other=0.0)
        if HAS_DH:
            r_dh = _load_rows(DH, o_m, o_n, m_mn, dh_inner, dh_stride_outer, dh_stride_inner)
    for i_t in range(i_p, n_tiles, n_p):
        o_m = i_t * BLOCK_M + o_tile
        m_m = o_m < M
        m_mn = m_m[:, None] & m_n[None, :]
        if not PREFETCH:
            r_dy = _load_rows(DY, o_m, o_n, m_mn, dy_inner, dy_stride_outer, dy_stride_inner)
            r_h = _load_rows(H, o_m, o_n, m_mn, h_inner, h_stride_outer, h_stride_inner)
            if HAS_H2:
                r_h2 = _load_rows(H2, o_m, o_n, m_mn, h2_inner, h2_stride_outer, h2_stride_inner)
            r_rstd = tl.load(RSTD + o_m, mask=m_m, other=0.0)
            if HAS_DH:
                r_dh = _load_rows(DH, o_m, o_n, m_mn, dh_inner, dh_stride_outer, dh_stride_inner)
        b_dy = r_dy.to(tl.float32)
        b_h = r_h.to(tl.float32)
        if HAS_H2:
            b_h += r_h2.to(tl.float32)
        b_rstd = r_rstd
        if HAS_DH:
            b_dh = r_dh.to(tl.float32)
        if PREFETCH:
            o_next = o_m + n_p * BLOCK_M
            m_next = (o_next < M)[:, None] & m_n[None, :]
            r_dy = _load_rows(DY, o_next, o_n, m_next, dy_inner, dy_stride_outer, dy_stride_inner)
            r_h = _load_rows(H, o_next, o_n, m_next, h_inner, h_stride_outer, h_stride_inner)
            if HAS_H2:
                r_h2 = _load_rows(H2, o_next, o_n, m_next, h2_inner, h2_stride_outer, h2_stride_inner)
            r_rstd = tl.load(RSTD + o_next, mask=o_next < M, other=0.0)
            if HAS_DH:
                r_dh = _load_rows(DH, o_next, o_n, m_next, dh_inner, dh_stride_outer, dh_stride_inner)

        b_n = b_h * b_rstd[:, None]
        if HAS_WEIGHT:
            b_g = b_dy * b_w[None, :]
        else:
            b_g = b_dy
        b_c = tl.sum(b_g * b_n, axis=1) / N
        b_dx = (b_g - b_n * b_c[:, None]) * b_rstd[:, None]
        if HAS_DH:
            b_dx += b_dh
        o_out = o_m.to(tl.int64)[:, None] * N + o_n[None, :]
        tl.store(DX + o_out, b_dx.to(DX.dtype.element_ty), mask=m_mn)
        if HAS_DRES:
            tl.store(DRES + o_out, b_dx.to(DRES.dtype.element_ty), mask=m_mn)
        if NEED_DW:
            b_dw += b_dy * b_n
    if NEED_DW:
        tl.store(DW_PARTIAL + tl.cast(i_p, tl.int64) * N + o_n, tl.sum(b_dw, axis=0), mask=m_n)


@triton.jit(do_not_specialize=["M", "dy_inner", "dh_inner", "h_inner", "h2_inner"])
def _rms_norm_bwd_split_kernel(
    DY,
    DH,
    H,
    H2,
    W,
    RSTD,
    DX,
    DRES,
    DW_PARTIAL,
    EXCHANGE,
    M,
    N,
    dy_inner,
    dy_stride_outer,
    dy_stride_inner,
    dh_inner,
    dh_stride_outer,
    dh_stride_inner,
    h_inner,
    h_stride_outer,
    h_stride_inner,
    h2_inner,
    h2_stride_outer,
    h2_stride_inner,
    NUM_CHUNKS,
    HAS_DH: tl.constexpr,
    HAS_H2: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_DRES: tl.constexpr,
    NEED_DW: tl.constexpr,
    PHASE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_G: tl.constexpr,
    MAX_SPINS: tl.constexpr,
):
    i_p = tl.program_id(0)
    i_g = i_p % NUM_CHUNKS
    i_s = i_p // NUM_CHUNKS
    n_s = tl.num_programs(0) // NUM_CHUNKS
    o_n = i_g * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < N
    o_g = tl.arange(0, BLOCK_G)
    m_g = o_g < NUM_CHUNKS
    if HAS_WEIGHT:
        b_w = tl.load(W + o_n, mask=m_n, other=0.0).to(tl.float32)
    b_dw = tl.zeros([BLOCK_N], dtype=tl.float32)

    # one pass (PHASE 0): the next row's chunks are loaded before this row waits for its partner
    # programs, so the wait overlaps memory traffic
    if PHASE == 0:
        m_next = m_n & (i_s < M)
        r_dy = tl.load(
            DY + _row_offsets(i_s, dy_inner, dy_stride_outer, dy_stride_inner) + o_n, mask=m_next, other=0.0
        )
        r_h = tl.load(
            H + _row_offsets(i_s, h_inner, h_stride_outer, h_stride_inner) + o_n, mask=m_next, other=0.0
        )
        if HAS_H2:
            r_h2 = tl.load(
                H2 + _row_offsets(i_s, h2_inner, h2_stride_outer, h2_stride_inner) + o_n,
                mask=m_next,
                other=0.0,
            )
        if HAS_DH:
            r_dh = tl.load(
                DH + _row_offsets(i_s, dh_inner, dh_stride_outer, dh_stride_inner) + o_n,
                mask=m_next,
                other=0.0,
            )
        r_rstd = tl.load(RSTD + i_s, mask=i_s < M, other=0.0)
    n_spins = 0  # spin budget of this program, over all its rows
    for i_row in range(i_s, M, n_s):
        if PHASE == 0:
            b_dy = r_dy.to(tl.float32)
            b_h = r_h.to(tl.float32)
            if HAS_H2:
                b_h += r_h2.to(tl.float32)
            if HAS_DH:
                b_dh = r_dh.to(tl.float32)
            b_rstd = r_rstd
            i_next = i_row + n_s
            m_next = m_n & (i_next < M)
            r_dy = tl.load(
                DY + _row_offsets(i_next, dy_inner, dy_stride_outer, dy_stride_inner) + o_n,
                mask=m_next,
                other=0.0,
            )
            r_h = tl.load(
                H + _row_offsets(i_next, h_inner, h_stride_outer, h_stride_inner) + o_n,
                mask=m_next,
                other=0.0,
            )
            if HAS_H2:
                o_h2 = _row_offsets(i_next, h2_inner, h2_stride_outer, h2_stride_inner)
                r_h2 = tl.load(H2 + o_h2 + o_n, mask=m_next, other=0.0)
            if HAS_DH:
                o_dh = _row_offsets(i_next, dh_inner, dh_stride_outer, dh_stride_inner)
                r_dh = tl.load(DH + o_dh + o_n, mask=m_next, other=0.0)
            r_rstd = tl.load(RSTD + i_next, mask=i_next < M, other=0.0)
        else:
            o_dy = _row_offsets(i_row, dy_inner, dy_stride_outer, dy_stride_inner)
            o_h = _row_offsets(i_row, h_inner, h_stride_outer, h_stride_inner)
            b_dy = tl.load(DY + o_dy + o_n, mask=m_n, other=0.0).to(tl.float32)
            b_h = tl.load(H + o_h + o_n, mask=m_n, other=0.0).to(tl.float32)
            if HAS_H2:
                o_h2 = _row_offsets(i_row, h2_inner, h2_stride_outer, h2_stride_inner)
                b_h += tl.load(H2 + o_h2 + o_n, mask=m_n, other=0.0).to(tl.float32)
            b_rstd = tl.load(RSTD + i_row)
        b_n = b_h * b_rstd
        if HAS_WEIGHT:
            b_g = b_dy * b_w
        else:
            b_g = b_dy
        if PHASE != 2:
            publish_partial(EXCHANGE, i_row, i_g, NUM_CHUNKS, tl.sum(b_g * b_n, axis=0))
        if PHASE != 1:
            if HAS_DH and PHASE == 2:
                o_dh = _row_offsets(i_row, dh_inner, dh_stride_outer, dh_stride_inner)
                b_dh = tl.load(DH + o_dh + o_n, mask=m_n, other=0.0).to(tl.float32)
            # one pass: wait for the row's other chunks; a row whose partial sums never all
            # arrived gives NaN, not a hang
            b_total, complete, n_spins = row_total(
                EXCHANGE, i_row, o_g, m_g, NUM_CHUNKS, n_spins, MAX_SPINS, PHASE == 0
            )
            b_c = tl.where(complete, b_total / N, float("nan"))
            b_dx = (b_g - b_n * b_c) * b_rstd
            if HAS_DH:
                b_dx += b_dh
            o_out = tl.cast(i_row, tl.int64) * N + o_n
            tl.store(DX + o_out, b_dx.to(DX.dtype.element_ty), mask=m_n)
            if HAS_DRES:
                tl.store(DRES + o_out, b_dx.to(DRES.dtype.element_ty), mask=m_n)
            if NEED_DW:
                b_dw += b_dy * b_n
    if NEED_DW and PHASE != 1:
        tl.store(DW_PARTIAL + tl.cast(i_s, tl.int64) * N + o_n, b_dw, mask=m_n)


@triton.jit
def _rms_norm_dw_reduce_kernel(
    DW_PARTIAL,
    DW,
    P,
    N,
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """dw[n] = sum over p of DW_PARTIAL[p, n], always in the same order."""
    o_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < N
    b_acc = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        o_p = p0 + tl.arange(0, BLOCK_P)
        m_pn = (o_p < P)[:, None] & m_n[None, :]
        b_acc += tl.load(DW_PARTIAL + o_p.to(tl.int64)[:, None] * N + o_n[None, :], mask=m_pn, other=0.0)
    tl.store(DW + o_n, tl.sum(b_acc, axis=0).to(DW.dtype.element_ty), mask=m_n)


# Launched without Triton's per-launch argument binding (tens of us of host time per launch).
_launch_bwd_kernel = CachedLauncher(_rms_norm_bwd_kernel)
_launch_bwd_split_kernel = CachedLauncher(_rms_norm_bwd_split_kernel)
_launch_dw_reduce_kernel = CachedLauncher(_rms_norm_dw_reduce_kernel)


def _reduce_dw(dw_partial: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    n_partials, hidden = dw_partial.shape
    dw = torch.empty_like(weight)
    _launch_dw_reduce_kernel(
        (cdiv(hidden, _REDUCE_BLOCK_N),),
        DW_PARTIAL=dw_partial,
        DW=dw,
        P=n_partials,
        N=hidden,
        BLOCK_P=_REDUCE_BLOCK_P,
        BLOCK_N=_REDUCE_BLOCK_N,
        num_warps=4,
    )
    return dw


@on_input_device
def rms_norm_bwd(
    dy: torch.Tensor,
    dh: torch.Tensor | None,
    h: RowLayout,
    h2: RowLayout | None,
    rstd: torch.Tensor,
    weight: torch.Tensor | None,
    x_dtype: torch.dtype,
    residual_dtype: torch.dtype | None,
    need_dw: bool,
    *,
    config: dict[str, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Launch the backward. ``h`` is the saved prenorm output ``x + residual`` (or ``x``), with
    its layout; or, with ``h2``, ``h = x + residual`` is recomputed in float32 from ``x`` (``h``)
    and ``residual`` (``h2``): as many bytes as writing and reading back a rounded ``h``, and exact.

    Returns ``(dx, dw, dresidual)``: ``dx`` in ``x_dtype`` (also the residual's gradient when
    ``residual_dtype`` is None or equal); ``dw`` when ``need_dw`` (``weight``'s dtype);
    ``dresidual`` only when the residual's dtype differs from ``x``'s.

    ``config`` overrides the tile choice (benchmark sweeps only): ``block_m``, ``num_warps``,
    ``programs_per_sm``, ``prefetch``, ``max_fused_n``, ``split_*`` as in the forward.
    """
    config = config or {}
    shape = h.tensor.shape
    hidden = shape[-1]
    rows = h.tensor.numel() // hidden if hidden else 0
    device = h.tensor.device
    dx = torch.empty(shape, dtype=x_dtype, device=device)
    separate_dres = residual_dtype is not None and residual_dtype != x_dtype
    dres = torch.empty(shape, dtype=residual_dtype, device=device) if separate_dres else None
    need_dw = need_dw and weight is not None
    if weight is not None:
        weight = unit_stride(weight)
    if dx.numel() == 0:
        dw = torch.zeros_like(weight) if need_dw else None
        return dx, dw, dres

    dy_rows = row_layout(dy)
    dh_rows = row_layout(dh) if dh is not None else dy_rows
    h2_rows = h2 if h2 is not None else h
    common = dict(
        DY=dy_rows.tensor,
        DH=dh_rows.tensor,
        H=h.tensor,
        H2=h2_rows.tensor,
        W=weight if weight is not None else rstd,
        RSTD=rstd,
        DX=dx,
        DRES=dres if dres is not None else dx,
        M=rows,
        N=hidden,
        **dy_rows.kernel_args("dy"),
        **dh_rows.kernel_args("dh"),
        **h.kernel_args("h"),
        **h2_rows.kernel_args("h2"),
        HAS_DH=dh is not None,
        HAS_H2=h2 is not None,
        HAS_WEIGHT=weight is not None,
        HAS_DRES=separate_dres,
        NEED_DW=need_dw,
    )
    if hidden <= config.get("max_fused_n", BWD_MAX_FUSED_N):
        tile = bwd_row_tile(hidden, rows)
        block_m = config.get("block_m", tile.block_m)
        num_warps = config.get("num_warps", tile.num_warps)
        programs_per_sm = config.get("programs_per_sm", tile.programs_per_sm)
        n_programs = max(1, min(cdiv(rows, block_m), sm_count(device) * programs_per_sm))
        dw_partial = torch.empty((n_programs, hidden), dtype=torch.float32, device=device) if need_dw else dx
        _launch_bwd_kernel(
            (n_programs,),
            **common,
            DW_PARTIAL=dw_partial,
            PREFETCH=bool(config.get("prefetch", tile.prefetch)),
            BLOCK_M=block_m,
            BLOCK_N=tile.block_n,
            num_warps=num_warps,
            **resident_launch_options(device, num_warps, programs_per_sm),
        )
        return dx, (_reduce_dw(dw_partial, weight) if need_dw else None), dres

    block_n = config.get("split_block_n", BWD_SPLIT_BLOCK_N)
    num_warps = config.get("split_num_warps", BWD_SPLIT_NUM_WARPS)
    programs_per_sm = config.get("split_programs_per_sm", BWD_SPLIT_PROGRAMS_PER_SM)
    n_chunks = cdiv(hidden, block_n)
    one_pass = config.get("one_pass", True) and use_one_pass_split(device, n_chunks, programs_per_sm)
    if one_pass:
        n_slots = max(1, min(rows, sm_count(device) * programs_per_sm // n_chunks))
    else:
        n_slots = max(1, min(rows, 4 * sm_count(device) // n_chunks))
    exchange = new_exchange(rows, n_chunks, device)
    dw_partial = torch.empty((n_slots, hidden), dtype=torch.float32, device=device) if need_dw else dx
    split = dict(
        common,
        DW_PARTIAL=dw_partial,
        EXCHANGE=exchange,
        NUM_CHUNKS=n_chunks,
        BLOCK_N=block_n,
        BLOCK_G=next_power_of_2(n_chunks),
        MAX_SPINS=MAX_SPINS,
    )
    if one_pass:
        _launch_bwd_split_kernel(
            (n_slots * n_chunks,),
            **split,
            PHASE=0,
            num_warps=num_warps,
            **split_launch_options(device, num_warps, programs_per_sm),
        )
    else:
        for phase in (1, 2):
            _launch_bwd_split_kernel((n_slots * n_chunks,), **split, PHASE=phase, num_warps=num_warps)
    return dx, (_reduce_dw(dw_partial, weight) if need_dw else None), dres
