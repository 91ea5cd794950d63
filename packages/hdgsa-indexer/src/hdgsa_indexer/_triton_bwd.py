"""Triton backward kernels of the gated indexer.

With ``sigma = sigmoid(z)``, ``z = scale * <q[t, h], k[s]> + bias[h]``, ``g = sigmoid(w[t, h])`` and
the incoming score gradient ``G[t, s]`` (zero where the score is masked):
``dz = G * g * sigma * (1 - sigma)``, ``dq[t, h] = scale * sum_s dz k[s]``,
``dk[s] = scale * sum_{t, h} dz q[t, h]``, ``dw[t, h] = g (1 - g) sum_s G sigma``,
``dbias[h] = sum_{t, s} dz``. The logits are recomputed tile by tile: no ``[B, H, Tq, Tkv]``
tensor; for 16-bit inputs on a GPU ``sigma`` and ``sigma (1 - sigma)`` come from one
``tanh.approx`` of ``z / 2``. Dense scores: the tiles' rows are (query, head) pairs
``r = t * H + h``, so a score-gradient tile is read once for all heads; a query-major pass
(``dq``, ``dw``, per-row ``dbias`` terms) and a key-major pass (``dk``, split over the rows into
float32 partials): every sum has one fixed order, so the backward is bitwise deterministic (no
atomics). Scores at chosen keys: one program per query; ``dk`` is a scatter, by float atomics,
or deterministically by a key-major pass over the slots sorted by key.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hdgsa_core.launch import CachedLauncher
from hdgsa_core.triton_utils import cdiv, next_power_of_2, on_input_device

from ._triton_fwd import _gather_rows, _head_dot, _stream, _tanh_approx, dot_options, input_strides

__all__ = ["gated_indexer_bwd", "indexer_scores_at_bwd"]

# Dense scores: tiles of 64 (query, head) rows x 64 keys, 4 warps.
_BLOCK_R, _BLOCK_N, _NUM_WARPS, _NUM_STAGES = 64, 64, 4, 3
# The key-major pass splits the rows so that about this many programs run (each split writes a
# float32 partial of dk, summed in a fixed order): with one program per key block, the causal
# triangle leaves the first key blocks with all the work. (H100, B1 T8192 H4 d64 fwd+bwd:
# 0.584 ms with 1024, 0.601 ms with 512; 64-row x 64-key tiles, 4 warps and 3 stages were the
# best of the configurations tried.)
_DK_PROGRAMS = 1024
# indexer_scores_at: 128 slots a step, as the forward (27.1 ms against 28.6 ms for 64 on an
# H100; 8 warps were slower), the forward's eviction hints; the key-major pass under
# deterministic algorithms takes 32 slots of a key a step.
_BLOCK_K = 128
_HINTS = True
_AT_NUM_WARPS = 4
_BLOCK_E = 32


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _gate_terms(b_dot, scale, b_bias, FAST_TANH: tl.constexpr):
    """``(sigmoid(z), sigmoid'(z))`` of ``z = scale * dot + bias``; with ``FAST_TANH`` from one
    ``tanh.approx`` of ``z / 2``."""
    if FAST_TANH:
        b_th = _tanh_approx(b_dot * (0.5 * scale) + 0.5 * b_bias)
        return 0.5 + 0.5 * b_th, 0.25 - 0.25 * (b_th * b_th)
    b_sig = _sigmoid(b_dot * scale + b_bias)
    return b_sig, b_sig * (1.0 - b_sig)


@triton.jit
def _cast_for_dot(b_x, DOT_FP32: tl.constexpr, DTYPE: tl.constexpr):
    if DOT_FP32:
        return b_x
    return b_x.to(DTYPE)


@triton.jit
def _dot_nn(b_a, b_b, DOT_FP32: tl.constexpr):
    if DOT_FP32:
        return tl.dot(b_a, b_b.to(tl.float32), input_precision="ieee")
    return tl.dot(b_a, b_b)


@triton.jit
def _row_queries(q, i_b64, o_r, m_r, o_d, m_d, stride_qb, stride_qt, stride_qh, H: tl.constexpr):
    """A block of flat rows ``r = t * H + h``: ``(t, q[t, h])``."""
    o_t = o_r // H
    p_q = q + i_b64 * stride_qb + o_t.to(tl.int64)[:, None] * stride_qt + (o_r % H)[:, None] * stride_qh
    return o_t, tl.load(p_q + o_d[None, :], mask=m_r[:, None] & m_d[None, :], other=0.0)


@triton.jit(do_not_specialize=["Tq", "Tkv", "q_offset"])
def _gated_indexer_bwd_dq_kernel(
    q,
    k,
    w,
    bias,
    dscore,
    dq,
    dw,
    gates,
    dbias_rows,
    stride_qb,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_wb,
    stride_wt,
    stride_wh,
    stride_bias,
    stride_gb,
    stride_gt,
    stride_dqb,
    stride_dqt,
    stride_dqh,
    stride_dwb,
    stride_dwt,
    Tq,
    Tkv,
    q_offset,
    scale,
    H: tl.constexpr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    DOT_FP32: tl.constexpr,
    FAST_TANH: tl.constexpr,
    EVEN_N: tl.constexpr,
):
    """Query-major: a block of ``BLOCK_R`` flat (query, head) rows against every key it sees;
    each score-gradient tile is read from memory once for all heads. Writes ``dq``, ``dw``,
    the per-row ``dbias`` terms and the head gates (float32, for the key-major pass)."""
    i_r, i_b = tl.program_id(0), tl.program_id(1)
    if CAUSAL:  # the longest programs (last queries) first
        i_r = tl.num_programs(0) - 1 - i_r
    i_b64 = i_b.to(tl.int64)
    o_r = i_r * BLOCK_R + tl.arange(0, BLOCK_R)
    o_d = tl.arange(0, BLOCK_D)
    m_r, m_d = o_r < Tq * H, o_d < D
    o_t, b_q = _row_queries(q, i_b64, o_r, m_r, o_d, m_d, stride_qb, stride_qt, stride_qh, H)
    o_t64, o_h = o_t.to(tl.int64), o_r % H
    b_w = tl.load(w + i_b64 * stride_wb + o_t64 * stride_wt + o_h * stride_wh, mask=m_r, other=0.0)
    b_gate = _sigmoid(b_w.to(tl.float32))
    b_bias = tl.load(bias + o_h * stride_bias, mask=m_r, other=0.0).to(tl.float32)
    p_g = dscore + i_b64 * stride_gb + o_t64[:, None] * stride_gt
    b_dq = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    b_dw = tl.zeros([BLOCK_R], dtype=tl.float32)
    b_db = tl.zeros([BLOCK_R], dtype=tl.float32)
    n_end = Tkv
    t_first = (i_r * BLOCK_R) // H
    if CAUSAL:
        t_last = (tl.minimum(i_r * BLOCK_R + BLOCK_R, Tq * H) - 1) // H
        n_end = tl.minimum(Tkv, tl.maximum(t_last + 1 + q_offset, 0))
    for n0 in range(0, n_end, BLOCK_N):
        o_n = n0 + tl.arange(0, BLOCK_N)
        m_n = o_n < Tkv
        p_k = k + i_b64 * stride_kb + o_n.to(tl.int64)[:, None] * stride_kt + o_d[None, :]
        b_k = tl.load(p_k, mask=m_n[:, None] & m_d[None, :], other=0.0)
        # Bounds only in the load mask (with EVEN_N constant along the keys: vector loads),
        # the causal mask after it.
        m_load = m_r[:, None] if EVEN_N else m_r[:, None] & m_n[None, :]
        b_g = tl.load(p_g + o_n[None, :], mask=m_load, other=0.0)
        if CAUSAL and n0 + BLOCK_N - 1 > t_first + q_offset:  # a tile across the diagonal
            b_g = tl.where(o_n[None, :] <= o_t[:, None] + q_offset, b_g, 0.0)
        b_sig, b_dsig = _gate_terms(_head_dot(b_q, b_k, DOT_FP32), scale, b_bias[:, None], FAST_TANH)
        b_dw += tl.sum(b_g * b_sig, 1)
        # The head gate multiplies every term of a row: applied once, at the end.
        b_dz = b_g * b_dsig
        b_db += tl.sum(b_dz, 1)
        b_dq += _dot_nn(_cast_for_dot(b_dz, DOT_FP32, b_k.dtype), b_k, DOT_FP32)
    p_dq = dq + i_b64 * stride_dqb + o_t64[:, None] * stride_dqt + o_h[:, None] * stride_dqh + o_d[None, :]
    tl.store(
        p_dq, (b_dq * (scale * b_gate)[:, None]).to(dq.dtype.element_ty), mask=m_r[:, None] & m_d[None, :]
    )
    p_dw = dw + i_b64 * stride_dwb + o_t64 * stride_dwt + o_h
    tl.store(p_dw, (b_gate * (1.0 - b_gate) * b_dw).to(dw.dtype.element_ty), mask=m_r)
    # One term per (batch, row), summed on the host in a fixed order.
    tl.store(dbias_rows + i_b64 * Tq * H + o_r, b_gate * b_db, mask=m_r)
    tl.store(gates + i_b64 * Tq * H + o_r, b_gate, mask=m_r)


@triton.jit(do_not_specialize=["Tq", "Tkv", "q_offset", "ROWS_PER_SPLIT"])
def _gated_indexer_bwd_dk_kernel(
    q,
    k,
    gates,
    bias,
    dscore,
    dk,
    stride_qb,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_bias,
    stride_gb,
    stride_gt,
    stride_dks,
    stride_dkb,
    stride_dkt,
    Tq,
    Tkv,
    q_offset,
    scale,
    ROWS_PER_SPLIT,
    H: tl.constexpr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    DOT_FP32: tl.constexpr,
    FAST_TANH: tl.constexpr,
    EVEN_N: tl.constexpr,
):
    """Key-major: a key block against the flat rows of one split (``ROWS_PER_SPLIT``, a
    multiple of ``BLOCK_R``), in row order; writes its ``dk`` (a partial when there are
    several splits). The head gates come from the query-major pass (no sigmoid per tile)."""
    i_n, i_s, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b64 = i_b.to(tl.int64)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    o_d = tl.arange(0, BLOCK_D)
    m_n, m_d = o_n < Tkv, o_d < D
    o_n64 = o_n.to(tl.int64)
    p_k = k + i_b64 * stride_kb + o_n64[:, None] * stride_kt + o_d[None, :]
    b_k = tl.load(p_k, mask=m_n[:, None] & m_d[None, :], other=0.0)
    b_dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    r_start = i_s * ROWS_PER_SPLIT
    r_end = tl.minimum(r_start + ROWS_PER_SPLIT, Tq * H)
    if CAUSAL:
        # The first row whose query sees this block's first key, rounded down to a block start.
        r_first = tl.minimum(tl.maximum(i_n * BLOCK_N - q_offset, 0), Tq) * H
        r_start = tl.maximum(r_start, (r_first // BLOCK_R) * BLOCK_R)
    # Every block starts at a multiple of BLOCK_R: when H divides it, the rows' heads (and
    # biases) are the same in every block.
    b_bias = tl.load(bias + (tl.arange(0, BLOCK_R) % H) * stride_bias).to(tl.float32)
    for r0 in range(r_start, r_end, BLOCK_R):
        o_r = r0 + tl.arange(0, BLOCK_R)
        m_r = o_r < r_end
        o_t, b_q = _row_queries(q, i_b64, o_r, m_r, o_d, m_d, stride_qb, stride_qt, stride_qh, H)
        b_gate = tl.load(gates + i_b64 * Tq * H + o_r, mask=m_r, other=0.0)
        if BLOCK_R % H != 0:
            b_bias = tl.load(bias + (o_r % H) * stride_bias).to(tl.float32)
        # The score gradient, transposed: [keys, rows]; the causal mask after the load.
        p_g = dscore + i_b64 * stride_gb + o_t.to(tl.int64)[None, :] * stride_gt + o_n[:, None]
        m_load = m_r[None, :] if EVEN_N else m_n[:, None] & m_r[None, :]
        b_g = tl.load(p_g, mask=m_load, other=0.0)
        if CAUSAL and i_n * BLOCK_N + BLOCK_N - 1 > r0 // H + q_offset:  # a tile across the diagonal
            b_g = tl.where(o_n[:, None] <= o_t[None, :] + q_offset, b_g, 0.0)
        _, b_dsig = _gate_terms(_head_dot(b_k, b_q, DOT_FP32), scale, b_bias[None, :], FAST_TANH)
        b_dz = b_g * b_gate[None, :] * b_dsig
        b_dk += _dot_nn(_cast_for_dot(b_dz, DOT_FP32, b_q.dtype), b_q, DOT_FP32)
    p_dk = (
        dk + i_s.to(tl.int64) * stride_dks + i_b64 * stride_dkb + o_n64[:, None] * stride_dkt + o_d[None, :]
    )
    tl.store(p_dk, (b_dk * scale).to(dk.dtype.element_ty), mask=m_n[:, None] & m_d[None, :])


_dq_launcher = CachedLauncher(_gated_indexer_bwd_dq_kernel)
_dk_launcher = CachedLauncher(_gated_indexer_bwd_dk_kernel)


@on_input_device
def gated_indexer_bwd(
    dscore: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor,
    scale: float,
    causal: bool,
    q_offset: int,
    fast: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dw, dbias)`` in the inputs' dtypes from the score gradient ``[B, Tq, Tkv]``.

    Two passes, each reading the score gradient once: query-major (``dq``, ``dw``, ``dbias``)
    and key-major (``dk``); no atomics, so bitwise reproducible."""
    batch, num_queries, heads, dim = q.shape
    num_keys = k.shape[1]
    if batch * num_queries * num_keys * heads * dim == 0:
        # Nothing to reduce, or empty dot products (then dz still reaches w and bias).
        if batch * num_queries * num_keys * heads == 0:
            return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(w), torch.zeros_like(bias)
        from .reference import gated_indexer_reference

        with torch.enable_grad():
            leaves = [t.detach().float().requires_grad_() for t in (q, k, w, bias)]
            out = gated_indexer_reference(*leaves, scale, causal, q_offset)
            grads = torch.autograd.grad(out, leaves, dscore.masked_fill(torch.isinf(out), 0.0))
        return tuple(g.to(t.dtype) for g, t in zip(grads, (q, k, w, bias), strict=True))
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    dscore = dscore if dscore.stride(-1) == 1 else dscore.contiguous()
    num_rows = num_queries * heads
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dw = torch.empty(w.shape, dtype=w.dtype, device=w.device)
    gates = torch.empty(batch, num_rows, dtype=torch.float32, device=q.device)
    dbias_rows = torch.empty(batch, num_rows, dtype=torch.float32, device=q.device)
    dot_fp32, fast_tanh = dot_options(q, k, fast)
    common = dict(
        q=q,
        k=k,
        bias=bias,
        dscore=dscore,
        stride_qb=q.stride(0),
        stride_qt=q.stride(1),
        stride_qh=q.stride(2),
        stride_kb=k.stride(0),
        stride_kt=k.stride(1),
        stride_bias=bias.stride(0),
        stride_gb=dscore.stride(0),
        stride_gt=dscore.stride(1),
        Tq=num_queries,
        Tkv=num_keys,
        q_offset=q_offset,
        scale=float(scale),
        H=heads,
        D=dim,
        BLOCK_D=max(16, next_power_of_2(dim)),
        BLOCK_R=_BLOCK_R,
        BLOCK_N=_BLOCK_N,
        CAUSAL=causal,
        DOT_FP32=dot_fp32,
        FAST_TANH=fast_tanh,
        EVEN_N=num_keys % _BLOCK_N == 0,
        num_warps=_NUM_WARPS,
        num_stages=_NUM_STAGES,
    )
    _dq_launcher(
        (cdiv(num_rows, _BLOCK_R), batch),
        w=w,
        dq=dq,
        dw=dw,
        gates=gates,
        dbias_rows=dbias_rows,
        stride_wb=w.stride(0),
        stride_wt=w.stride(1),
        stride_wh=w.stride(2),
        stride_dqb=dq.stride(0),
        stride_dqt=dq.stride(1),
        stride_dqh=dq.stride(2),
        stride_dwb=dw.stride(0),
        stride_dwt=dw.stride(1),
        **common,
    )
    num_n, num_r = cdiv(num_keys, _BLOCK_N), cdiv(num_rows, _BLOCK_R)
    splits = min(num_r, cdiv(_DK_PROGRAMS, num_n * batch))
    rows_per_split = cdiv(num_r, splits) * _BLOCK_R
    splits = cdiv(num_rows, rows_per_split)
    if splits == 1:
        dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    else:  # float32 partials, summed below in split order
        dk = torch.empty(splits, batch, num_keys, dim, dtype=torch.float32, device=k.device)
    _dk_launcher(
        (num_n, splits, batch),
        gates=gates,
        dk=dk,
        stride_dks=dk.stride(0) if splits > 1 else 0,
        stride_dkb=dk.stride(-3),
        stride_dkt=dk.stride(-2),
        ROWS_PER_SPLIT=rows_per_split,
        **common,
    )
    if splits > 1:
        dk = dk.sum(0).to(k.dtype)
    dbias = dbias_rows.view(batch * num_queries, heads).sum(0).to(bias.dtype)
    return dq, dk, dw, dbias


# ----------------------------------------------------------------------------- scores at keys


@triton.jit(do_not_specialize=["Tq", "Tkv", "K"])
def _indexer_scores_at_bwd_kernel(
    q,
    k,
    w,
    bias,
    indices,
    dout,
    dq,
    dw,
    dbias_part,
    dk32,
    stride_qb,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_wb,
    stride_wt,
    stride_wh,
    stride_bias,
    stride_ib,
    stride_it,
    Tq,
    Tkv,
    K,
    scale,
    H: tl.constexpr,
    D: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_FP32: tl.constexpr,
    FAST_TANH: tl.constexpr,
    ATOMIC_DK: tl.constexpr,
    HINTS: tl.constexpr,
):
    """One query per program: ``dq``, ``dw``, a ``dbias`` partial; with ``ATOMIC_DK`` also
    adds its keys' gradient into the float32 ``dk32`` (``[B, Tkv, d]``, contiguous)."""
    i_t, i_b = tl.program_id(0), tl.program_id(1).to(tl.int64)
    o_h = tl.arange(0, BLOCK_H)
    o_d = tl.arange(0, BLOCK_D)
    m_h, m_d = o_h < H, o_d < D
    m_hd = m_h[:, None] & m_d[None, :]
    p_q = q + i_b * stride_qb + i_t * stride_qt + o_h[:, None] * stride_qh + o_d[None, :]
    b_q = tl.load(p_q, mask=m_hd, other=0.0)
    b_w = tl.load(w + i_b * stride_wb + i_t * stride_wt + o_h * stride_wh, mask=m_h, other=0.0)
    b_gate = tl.where(m_h, _sigmoid(b_w.to(tl.float32)), 0.0)
    b_bias = tl.load(bias + o_h * stride_bias, mask=m_h, other=0.0).to(tl.float32)
    b_dq = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    b_dw = tl.zeros([BLOCK_H], dtype=tl.float32)
    b_db = tl.zeros([BLOCK_H], dtype=tl.float32)
    row = (i_b * Tq + i_t) * K
    p_i = indices + i_b * stride_ib + i_t * stride_it
    for j0 in range(0, K, BLOCK_K):
        o_j = j0 + tl.arange(0, BLOCK_K)
        m_j = o_j < K
        b_idx = _stream(p_i + o_j, m_j, -1, HINTS).to(tl.int64)
        m_valid = b_idx >= 0
        p_k = k + i_b * stride_kb + tl.maximum(b_idx, 0)[:, None] * stride_kt + o_d[None, :]
        b_k = _gather_rows(p_k, m_valid[:, None] & m_d[None, :], HINTS)
        b_do = _stream(dout + row + o_j, m_valid, 0.0, HINTS)
        b_sig, b_dsig = _gate_terms(_head_dot(b_q, b_k, DOT_FP32), scale, b_bias[:, None], FAST_TANH)
        b_dw += tl.sum(b_do[None, :] * b_sig, 1)
        b_dz = b_do[None, :] * b_gate[:, None] * b_dsig
        b_db += tl.sum(b_dz, 1)
        b_dq += _dot_nn(_cast_for_dot(b_dz, DOT_FP32, b_k.dtype), b_k, DOT_FP32)
        if ATOMIC_DK:
            b_dzt = _cast_for_dot(tl.trans(b_dz), DOT_FP32, b_q.dtype)
            b_contrib = _dot_nn(b_dzt, b_q, DOT_FP32) * scale
            p_dk = dk32 + (i_b * Tkv + tl.maximum(b_idx, 0))[:, None] * D + o_d[None, :]
            tl.atomic_add(p_dk, b_contrib, mask=m_valid[:, None] & m_d[None, :], sem="relaxed")
    p_dq = dq + ((i_b * Tq + i_t) * H + o_h[:, None]) * D + o_d[None, :]
    tl.store(p_dq, (b_dq * scale).to(dq.dtype.element_ty), mask=m_hd)
    tl.store(
        dw + (i_b * Tq + i_t) * H + o_h, (b_gate * (1.0 - b_gate) * b_dw).to(dw.dtype.element_ty), mask=m_h
    )
    tl.store(dbias_part + (i_b * Tq + i_t) * H + o_h, b_db, mask=m_h)


@triton.jit(do_not_specialize=["Tq", "Tkv", "K"])
def _indexer_scores_at_bwd_dk_kernel(
    q,
    k,
    w,
    bias,
    dout,
    order,
    starts,
    dk,
    stride_qb,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_wb,
    stride_wt,
    stride_wh,
    stride_bias,
    Tq,
    Tkv,
    K,
    scale,
    H: tl.constexpr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    """One key per program: sums the gradient of every slot that selected it, in slot order
    (``order``: slot ids sorted by ``(batch, key)``, stable; ``starts``: segment bounds)."""
    i_s, i_b = tl.program_id(0), tl.program_id(1).to(tl.int64)
    key = i_b * Tkv + i_s
    start = tl.load(starts + key)
    end = tl.load(starts + key + 1)
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    b_k = tl.load(k + i_b * stride_kb + i_s * stride_kt + o_d, mask=m_d, other=0.0).to(tl.float32)
    b_dk = tl.zeros([BLOCK_D], dtype=tl.float32)
    for e0 in range(start, end, BLOCK_E):
        o_e = e0 + tl.arange(0, BLOCK_E)
        m_e = o_e < end
        b_slot = tl.load(order + o_e, mask=m_e, other=0).to(tl.int64)
        b_t = b_slot // K - i_b * Tq
        b_do = tl.load(dout + b_slot, mask=m_e, other=0.0)
        b_acc = tl.zeros([BLOCK_E, BLOCK_D], dtype=tl.float32)
        for h in range(H):
            p_q = q + i_b * stride_qb + b_t[:, None] * stride_qt + h * stride_qh + o_d[None, :]
            b_q = tl.load(p_q, mask=m_e[:, None] & m_d[None, :], other=0.0).to(tl.float32)
            b_w = tl.load(w + i_b * stride_wb + b_t * stride_wt + h * stride_wh, mask=m_e, other=0.0)
            b_gate = _sigmoid(b_w.to(tl.float32))
            b_z = tl.sum(b_q * b_k[None, :], 1) * scale + tl.load(bias + h * stride_bias).to(tl.float32)
            b_sig = _sigmoid(b_z)
            b_dz = b_do * b_gate * b_sig * (1.0 - b_sig)
            b_acc += b_dz[:, None] * b_q
        b_dk += tl.sum(b_acc, 0)
    tl.store(dk + key * D + o_d, (b_dk * scale).to(dk.dtype.element_ty), mask=m_d)


_at_bwd_launcher = CachedLauncher(_indexer_scores_at_bwd_kernel)
_at_dk_launcher = CachedLauncher(_indexer_scores_at_bwd_dk_kernel)


@on_input_device
def indexer_scores_at_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor,
    indices: torch.Tensor,
    scale: float,
    deterministic: bool,
    fast: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dw, dbias)`` from the gradient of the scores at ``indices`` ``[B, Tq, K]``.

    ``dk`` by float atomics, or with ``deterministic`` by a key-major pass over the slots
    sorted by key (a stable sort of ``B * Tq * K`` keys: slower, bitwise reproducible)."""
    batch, num_queries, heads, dim = q.shape
    num_keys, num_slots = k.shape[1], indices.shape[-1]
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dw = torch.empty(w.shape, dtype=w.dtype, device=w.device)
    if batch * num_queries * heads * dim * num_slots * num_keys == 0:
        from .reference import indexer_scores_at_reference

        with torch.enable_grad():
            leaves = [t.detach().float().requires_grad_() for t in (q, k, w, bias)]
            out = indexer_scores_at_reference(*leaves, indices, scale)
            grads = torch.autograd.grad(out, leaves, dout.masked_fill(indices < 0, 0.0), allow_unused=True)
        return tuple(
            (torch.zeros_like(t) if g is None else g.to(t.dtype))
            for g, t in zip(grads, (q, k, w, bias), strict=True)
        )
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    indices = indices if indices.stride(-1) == 1 else indices.contiguous()
    dout = dout.contiguous()
    dot_fp32, fast_tanh = dot_options(q, k, fast)
    dbias_part = torch.empty(batch, num_queries, heads, dtype=torch.float32, device=q.device)
    dk32 = torch.zeros(k.shape, dtype=torch.float32, device=k.device) if not deterministic else dq
    strides = input_strides(q, k, w, bias)
    block_d = max(16, next_power_of_2(dim))
    _at_bwd_launcher(
        (num_queries, batch),
        q=q,
        k=k,
        w=w,
        bias=bias,
        indices=indices,
        dout=dout,
        dq=dq,
        dw=dw,
        dbias_part=dbias_part,
        dk32=dk32,
        stride_ib=indices.stride(0),
        stride_it=indices.stride(1),
        Tq=num_queries,
        Tkv=num_keys,
        K=num_slots,
        scale=float(scale),
        H=heads,
        D=dim,
        BLOCK_H=max(16, next_power_of_2(heads)),
        BLOCK_D=block_d,
        BLOCK_K=_BLOCK_K,
        DOT_FP32=dot_fp32,
        FAST_TANH=fast_tanh,
        ATOMIC_DK=not deterministic,
        HINTS=_HINTS,
        **strides,
        num_warps=_AT_NUM_WARPS,
    )
    dbias = dbias_part.sum((0, 1)).to(bias.dtype)
    if not deterministic:
        return dq, dk32.to(k.dtype), dw, dbias
    # Key-major: slot ids sorted by (batch, key); an empty slot sorts past every key.
    flat = indices.reshape(batch, -1).long()
    flat = torch.where(
        flat >= 0, flat + torch.arange(batch, device=q.device)[:, None] * num_keys, batch * num_keys
    )
    sorted_keys, order = torch.sort(flat.reshape(-1), stable=True)
    starts = torch.searchsorted(sorted_keys, torch.arange(batch * num_keys + 1, device=q.device))
    dk = torch.empty(batch, num_keys, dim, dtype=k.dtype, device=k.device)
    _at_dk_launcher(
        (num_keys, batch),
        q=q,
        k=k,
        w=w,
        bias=bias,
        dout=dout,
        order=order,
        starts=starts,
        dk=dk,
        Tq=num_queries,
        Tkv=num_keys,
        K=num_slots,
        scale=float(scale),
        H=heads,
        D=dim,
        BLOCK_D=block_d,
        BLOCK_E=_BLOCK_E,
        **strides,
        num_warps=4,
    )
    return dq, dk, dw, dbias
