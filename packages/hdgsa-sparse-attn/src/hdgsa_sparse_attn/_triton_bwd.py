"""Sparse attention backward kernels.

With ``p = exp(s - lse)`` recomputed from the saved ``lse`` and
``delta[t, h] = sum(dout * out) - dlse`` (precomputed per row in float32 by
``_sparse_attention_bwd_preprocess_kernel``, packed with ``lse`` in one ``[B, Hq, T, 2]``
tensor)::

    dp_j = <dout, v_j>      ds_j = p_j * (dp_j - delta)
    dq   = scale * sum_j ds_j k_j
    dk_j += scale * ds_j q  dv_j += p_j dout     (scatters into the selected rows)

- ``_sparse_attention_bwd_dq_kernel``: the forward's programs (one per query and head
  program, the same gather or tensor-core paths) compute ``dq``. With ``ATOMIC`` they also add
  their ``dk``/``dv`` contributions into float32 buffers with atomics: the fast path, whose
  float sums depend on the order in which programs run.
- The key-major path (always under ``torch.are_deterministic_algorithms_enabled()``, and the
  fast path for per-head lists) has no float atomics: ``_triton_bwd_dkv`` builds the inverse
  index and runs one program per key row and KV head, which sums its slots' contributions in
  a fixed order. The gradients are bitwise the same run after run.
- ``_sparse_attention_bwd_dq_row_kernel``: ``dq`` for query heads with their own lists (the
  forward's 1-D row kernel); ``_sparse_attention_bwd_dq_kernel``: the group kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hdgsa_core.capabilities import interpreter_enabled
from hdgsa_core.triton_utils import cdiv, next_power_of_2, on_input_device

from ._triton_bwd_dkv import sparse_attention_bwd_dkv
from ._triton_fwd import (
    _ROW_CONFIGS,
    LOG2E,
    _scores,
    _slot_rows,
    _weighted_rows,
    block_dim,
    head_stride,
    launch,
    mask_view,
    per_head_kernel,
    precision_of,
    slot_layout,
    unit_last,
)

__all__ = ["fast_path_for", "sparse_attention_bwd"]

_DQ_CONFIGS = [
    triton.Config({"BLOCK_K": 32}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_K": 64}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_K": 64}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_K": 32}, num_warps=8, num_stages=3),
]


@triton.jit
def _outer(b_a, b_b, USE_DOT: tl.constexpr, PRECISION: tl.constexpr, DOT_FP32: tl.constexpr):
    """``[BH, BK]^T x [BH, DX] -> [BK, DX]`` float32 (``b_a`` float32)."""
    if USE_DOT:
        b_at = tl.trans(b_a).to(b_b.dtype)
        if DOT_FP32:
            b_at = b_at.to(tl.float32)
            b_b = b_b.to(tl.float32)
        b_o = tl.dot(b_at, b_b, input_precision=PRECISION)
    else:
        b_o = tl.sum(b_a, 0)[:, None] * b_b.to(tl.float32)
    return b_o


@triton.jit(do_not_specialize=["T", "TKV", "NUM_SLOTS"])
def _sparse_attention_bwd_dq_kernel(
    Q,
    K,
    V,
    INDEX,
    MASK,
    DO,
    STATS,
    DQ,
    DK_ACC,
    DV_ACC,
    stride_qb,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_ib,
    stride_ih,
    stride_it,
    stride_ik,
    stride_mb,
    stride_mh,
    stride_mt,
    stride_mk,
    stride_dob,
    stride_dot,
    stride_doh,
    stride_dqb,
    stride_dqt,
    stride_dqh,
    stride_ab,
    stride_at,
    stride_ah,
    stride_cb,
    stride_ct,
    stride_ch,
    T,
    TKV,
    NUM_SLOTS,
    HQ,
    scale,
    qk_scale,
    GROUP: tl.constexpr,
    HEADS: tl.constexpr,
    INDEX_DIV: tl.constexpr,
    D: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_H: tl.constexpr,
    HAS_MASK: tl.constexpr,
    ATOMIC: tl.constexpr,
    PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr,
    Q_DTYPE: tl.constexpr,
    USE_DOT: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    i_t = tl.program_id(0).to(tl.int64)
    i_hp = tl.program_id(1).to(tl.int64)
    i_b = tl.program_id(2).to(tl.int64)
    if HEADS == 1:
        i_h0 = i_hp
        i_hkv = i_hp // GROUP
    else:
        i_hkv = i_hp
        i_h0 = i_hp * GROUP
    i_ih = i_h0 // INDEX_DIV

    o_h = tl.arange(0, BLOCK_H)
    o_d = tl.arange(0, BLOCK_D)
    o_dv = tl.arange(0, BLOCK_DV)
    m_h = o_h < HEADS
    m_d = o_d < D
    m_dv = o_dv < DV
    m_hd = m_h[:, None] & m_d[None, :]

    b_q = tl.load(
        Q + i_b * stride_qb + i_t * stride_qt + (i_h0 + o_h)[:, None] * stride_qh + o_d[None, :],
        mask=m_hd,
        other=0.0,
    )
    b_do = tl.load(
        DO + i_b * stride_dob + i_t * stride_dot + (i_h0 + o_h)[:, None] * stride_doh + o_dv[None, :],
        mask=m_h[:, None] & m_dv[None, :],
        other=0.0,
    )
    p_stats = STATS + ((i_b * HQ + i_h0 + o_h) * T + i_t) * 2
    # lse2 is +inf for an empty row (and a padding head reads +inf): p = exp2(s - inf) = 0.
    b_lse2 = tl.load(p_stats, mask=m_h, other=float("inf"))
    b_delta = tl.load(p_stats + 1, mask=m_h, other=0.0)

    p_k = K + i_b * stride_kb + i_hkv * stride_kh
    p_v = V + i_b * stride_vb + i_hkv * stride_vh
    p_index = INDEX + i_b * stride_ib + i_ih * stride_ih + i_t * stride_it
    p_mask = MASK + i_b * stride_mb + i_ih * stride_mh + i_t * stride_mt
    p_dk = DK_ACC + i_b * stride_ab + i_hkv * stride_ah
    p_dv = DV_ACC + i_b * stride_cb + i_hkv * stride_ch

    if USE_DOT:
        b_dq = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    else:  # per-slot terms, summed after the loop
        b_dq = tl.zeros([BLOCK_K, BLOCK_D], tl.float32)
    for start in range(0, NUM_SLOTS, BLOCK_K):
        o_k = start + tl.arange(0, BLOCK_K)
        b_row, m_valid = _slot_rows(p_index, p_mask, o_k, NUM_SLOTS, TKV, stride_ik, stride_mk, HAS_MASK)
        m_kd = m_valid[:, None] & m_d[None, :]
        m_kdv = m_valid[:, None] & m_dv[None, :]
        b_k = tl.load(p_k + b_row[:, None] * stride_kt + o_d[None, :], mask=m_kd, other=0.0)
        b_v = tl.load(p_v + b_row[:, None] * stride_vt + o_dv[None, :], mask=m_kdv, other=0.0)
        b_s = _scores(b_q, b_k, USE_DOT, PRECISION, DOT_FP32) * qk_scale
        b_p = tl.where(m_valid[None, :], tl.exp2(b_s - b_lse2[:, None]), 0.0)
        b_dp = _scores(b_do, b_v, USE_DOT, PRECISION, DOT_FP32)
        b_ds = b_p * (b_dp - b_delta[:, None])
        b_dq += _weighted_rows(b_ds, b_k, USE_DOT, PRECISION, DOT_FP32)
        if ATOMIC:
            b_dv_part = _outer(b_p, b_do, USE_DOT, PRECISION, DOT_FP32)
            b_dk_part = _outer(b_ds, b_q, USE_DOT, PRECISION, DOT_FP32) * scale
            tl.atomic_add(
                p_dv + b_row[:, None] * stride_ct + o_dv[None, :], b_dv_part, mask=m_kdv, sem="relaxed"
            )
            tl.atomic_add(
                p_dk + b_row[:, None] * stride_at + o_d[None, :], b_dk_part, mask=m_kd, sem="relaxed"
            )

    if not USE_DOT:
        b_dq = tl.sum(b_dq, 0)[None, :]
    p_dq = DQ + i_b * stride_dqb + i_t * stride_dqt + (i_h0 + o_h)[:, None] * stride_dqh + o_d[None, :]
    tl.store(p_dq, (b_dq * scale).to(DQ.dtype.element_ty), mask=m_hd)


@triton.jit(do_not_specialize=["T", "TKV", "NUM_SLOTS"])
def _sparse_attention_bwd_dq_row_kernel(
    Q,
    K,
    V,
    INDEX,
    MASK,
    DO,
    STATS,
    DQ,
    DK_ACC,
    DV_ACC,
    stride_qb,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_ib,
    stride_ih,
    stride_it,
    stride_ik,
    stride_mb,
    stride_mh,
    stride_mt,
    stride_mk,
    stride_dob,
    stride_dot,
    stride_doh,
    stride_dqb,
    stride_dqt,
    stride_dqh,
    stride_ab,
    stride_at,
    stride_ah,
    stride_cb,
    stride_ct,
    stride_ch,
    T,
    TKV,
    NUM_SLOTS,
    HQ,
    scale,
    qk_scale,
    GROUP: tl.constexpr,
    INDEX_DIV: tl.constexpr,
    D: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    HAS_MASK: tl.constexpr,
    ATOMIC: tl.constexpr,
    Q_DTYPE: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``dq`` of one query head with its own list (the forward's row kernel, 1-D)."""
    i_t = tl.program_id(0).to(tl.int64)
    i_h = tl.program_id(1).to(tl.int64)
    i_b = tl.program_id(2).to(tl.int64)
    i_hkv = i_h // GROUP
    i_ih = i_h // INDEX_DIV
    o_d = tl.arange(0, BLOCK_D)
    o_dv = tl.arange(0, BLOCK_DV)
    m_d = o_d < D
    m_dv = o_dv < DV
    o_k = tl.arange(0, BLOCK_K)

    b_q = tl.load(Q + i_b * stride_qb + i_t * stride_qt + i_h * stride_qh + o_d, mask=m_d, other=0.0).to(
        tl.float32
    )
    b_do = tl.load(DO + i_b * stride_dob + i_t * stride_dot + i_h * stride_doh + o_dv, mask=m_dv, other=0.0)
    b_do = b_do.to(tl.float32)
    p_stats = STATS + ((i_b * HQ + i_h) * T + i_t) * 2
    b_lse2 = tl.load(p_stats)  # +inf for an empty row: p = exp2(s - inf) = 0
    b_delta = tl.load(p_stats + 1)
    b_qs = b_q * qk_scale
    p_k = K + i_b * stride_kb + i_hkv * stride_kh
    p_v = V + i_b * stride_vb + i_hkv * stride_vh
    p_index = INDEX + i_b * stride_ib + i_ih * stride_ih + i_t * stride_it
    p_mask = MASK + i_b * stride_mb + i_ih * stride_mh + i_t * stride_mt
    p_dk = DK_ACC + i_b * stride_ab + i_hkv * stride_ah
    p_dv = DV_ACC + i_b * stride_cb + i_hkv * stride_ch

    b_dq = tl.zeros([BLOCK_D], tl.float32)
    b_row, m_valid = _slot_rows(p_index, p_mask, o_k, NUM_SLOTS, TKV, stride_ik, stride_mk, HAS_MASK)
    for start in range(0, NUM_SLOTS, BLOCK_K):
        m_kd = m_valid[:, None] & m_d[None, :]
        m_kdv = m_valid[:, None] & m_dv[None, :]
        b_k = tl.load(p_k + b_row[:, None] * stride_kt + o_d[None, :], mask=m_kd, other=0.0).to(tl.float32)
        b_v = tl.load(p_v + b_row[:, None] * stride_vt + o_dv[None, :], mask=m_kdv, other=0.0).to(tl.float32)
        b_row_next, m_valid_next = _slot_rows(
            p_index, p_mask, start + BLOCK_K + o_k, NUM_SLOTS, TKV, stride_ik, stride_mk, HAS_MASK
        )
        b_p = tl.where(m_valid, tl.exp2(tl.sum(b_k * b_qs[None, :], 1) - b_lse2), 0.0)
        b_ds = b_p * (tl.sum(b_v * b_do[None, :], 1) - b_delta)
        b_dq += tl.sum(b_ds[:, None] * b_k, 0)
        if ATOMIC:
            tl.atomic_add(
                p_dv + b_row[:, None] * stride_ct + o_dv[None, :],
                b_p[:, None] * b_do[None, :],
                mask=m_kdv,
                sem="relaxed",
            )
            tl.atomic_add(
                p_dk + b_row[:, None] * stride_at + o_d[None, :],
                (b_ds * scale)[:, None] * b_q[None, :],
                mask=m_kd,
                sem="relaxed",
            )
        b_row = b_row_next
        m_valid = m_valid_next

    p_dq = DQ + i_b * stride_dqb + i_t * stride_dqt + i_h * stride_dqh + o_d
    tl.store(p_dq, (b_dq * scale).to(DQ.dtype.element_ty), mask=m_d)


@triton.jit(do_not_specialize=["T"])
def _sparse_attention_bwd_preprocess_kernel(
    DO,
    OUT,
    LSE,
    DLSE,
    STATS,
    stride_dob,
    stride_dot,
    stride_doh,
    stride_ob,
    stride_ot,
    stride_oh,
    stride_lb,
    stride_lh,
    stride_lt,
    stride_gb,
    stride_gh,
    stride_gt,
    T,
    HQ,
    DV: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    HAS_DLSE: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """``STATS[b, h, t] = (lse * log2(e), delta)`` float32, ``delta = <dout, out> - dlse``;
    an empty row (``lse = -inf``) gets ``+inf``, so that ``p = exp2(s - lse2) = 0``."""
    i_tb = tl.program_id(0).to(tl.int64)
    i_h = tl.program_id(1).to(tl.int64)
    i_b = tl.program_id(2).to(tl.int64)
    o_t = i_tb * BLOCK_T + tl.arange(0, BLOCK_T)
    o_dv = tl.arange(0, BLOCK_DV)
    m_t = o_t < T
    m_tdv = m_t[:, None] & (o_dv < DV)[None, :]
    b_do = tl.load(
        DO + i_b * stride_dob + o_t[:, None] * stride_dot + i_h * stride_doh + o_dv[None, :],
        mask=m_tdv,
        other=0.0,
    )
    b_o = tl.load(
        OUT + i_b * stride_ob + o_t[:, None] * stride_ot + i_h * stride_oh + o_dv[None, :],
        mask=m_tdv,
        other=0.0,
    )
    b_delta = tl.sum(b_do.to(tl.float32) * b_o.to(tl.float32), 1)
    if HAS_DLSE:
        b_delta -= tl.load(
            DLSE + i_b * stride_gb + i_h * stride_gh + o_t * stride_gt, mask=m_t, other=0.0
        ).to(tl.float32)
    b_lse = tl.load(LSE + i_b * stride_lb + i_h * stride_lh + o_t * stride_lt, mask=m_t, other=0.0)
    b_lse2 = tl.where(b_lse == float("-inf"), float("inf"), b_lse * 1.4426950408889634)
    p_stats = STATS + ((i_b * HQ + i_h) * T + o_t) * 2
    tl.store(p_stats, b_lse2, mask=m_t)
    tl.store(p_stats + 1, b_delta, mask=m_t)


def _row_stats(grad_out: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, grad_lse: torch.Tensor | None):
    """``[B, Hq, T, 2]`` float32: per row ``lse`` in the log2 domain (``+inf`` when empty) and
    ``delta = sum(dout * out) - dlse``, packed so that a gathered row costs one load."""
    batch, seq_len, num_q_heads, value_dim = grad_out.shape
    stats = torch.empty(batch, num_q_heads, seq_len, 2, dtype=torch.float32, device=grad_out.device)
    dlse = lse if grad_lse is None else grad_lse  # a placeholder without grad_lse
    block_dv = block_dim(value_dim)
    block_t = max(1, min(64, 4096 // block_dv))
    _sparse_attention_bwd_preprocess_kernel[(cdiv(seq_len, block_t), num_q_heads, batch)](
        DO=grad_out,
        OUT=out,
        LSE=lse,
        DLSE=dlse,
        STATS=stats,
        stride_dob=grad_out.stride(0),
        stride_dot=grad_out.stride(1),
        stride_doh=grad_out.stride(2),
        stride_ob=out.stride(0),
        stride_ot=out.stride(1),
        stride_oh=out.stride(2),
        stride_lb=lse.stride(0),
        stride_lh=lse.stride(1),
        stride_lt=lse.stride(2),
        stride_gb=dlse.stride(0),
        stride_gh=dlse.stride(1),
        stride_gt=dlse.stride(2),
        T=seq_len,
        HQ=num_q_heads,
        DV=value_dim,
        BLOCK_DV=block_dv,
        HAS_DLSE=grad_lse is not None,
        BLOCK_T=block_t,
        num_warps=4,
    )
    return stats


_sparse_attention_bwd_dq_tuned = triton.autotune(
    configs=_DQ_CONFIGS,
    key=["HEADS", "D", "DV", "HAS_MASK", "ATOMIC", "USE_DOT", "Q_DTYPE"],
    reset_to_zero=["DK_ACC", "DV_ACC"],
)(_sparse_attention_bwd_dq_kernel)
_sparse_attention_bwd_dq_row_tuned = triton.autotune(
    configs=_ROW_CONFIGS,
    key=["D", "DV", "HAS_MASK", "ATOMIC", "Q_DTYPE"],
    reset_to_zero=["DK_ACC", "DV_ACC"],
)(_sparse_attention_bwd_dq_row_kernel)


def fast_path_for(num_index_heads: int, num_q_heads: int, num_kv_heads: int) -> str:
    """The non-deterministic backward's dk/dv path: the key-major kernel for per-head lists
    (a float atomic per element of every selected row costs more than sorting the slots),
    float atomics from the dq kernel when a KV group shares its lists (one atomic row per
    group and slot, G query heads' terms summed before it)."""
    per_head = (num_index_heads == num_q_heads and num_q_heads > num_kv_heads) or num_q_heads == num_kv_heads
    return "key_major" if per_head else "scatter"


@on_input_device
def sparse_attention_bwd(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    mask: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
    grad_lse: torch.Tensor | None,
    scale: float,
    deterministic: bool,
    fast_path: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` in the inputs' dtype; ``indices``/``mask`` 4-D, ``lse`` ``[B, Hq, T]``.

    ``deterministic``: dk/dv by the key-major kernel over the inverse index (no float
    atomics). Otherwise ``fast_path``: ``"scatter"`` (float atomics from the dq kernel),
    ``"key_major"`` (the deterministic path) or None (:func:`fast_path_for`).
    """
    if deterministic:
        path = "key_major"
    else:
        path = fast_path or fast_path_for(indices.shape[1], q.shape[2], k.shape[2])
    batch, seq_len, num_q_heads, head_dim = q.shape
    num_keys, value_dim = k.shape[1], v.shape[3]
    q, k, v, grad_out = unit_last(q), unit_last(k), unit_last(v), unit_last(grad_out)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if batch * seq_len * num_q_heads == 0 or indices.shape[3] == 0 or num_keys == 0:
        return dq.zero_(), torch.zeros(k.shape, dtype=k.dtype, device=k.device), torch.zeros_like(v)
    stats = _row_stats(grad_out, unit_last(out), lse, grad_lse)
    layout = slot_layout(q, k, indices)
    mask_arg = mask_view(indices, mask)
    common = {
        "T": seq_len,
        "TKV": num_keys,
        "NUM_SLOTS": indices.shape[3],
        "HQ": num_q_heads,
        "scale": scale,
        "qk_scale": scale * LOG2E,
        "GROUP": layout.group,
        "HEADS": layout.heads,
        "D": head_dim,
        "DV": value_dim,
        "BLOCK_D": block_dim(head_dim),
        "BLOCK_DV": block_dim(value_dim),
        "Q_DTYPE": str(q.dtype),
    }
    scatter = path == "scatter"
    if not scatter:  # no float32 buffers: placeholders the kernel does not touch
        dk_acc = dv_acc = torch.zeros(1, 1, 1, 1, dtype=torch.float32, device=q.device)
    else:
        dk_acc = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
        dv_acc = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
    grid = (seq_len, layout.head_programs, batch)
    work = batch * seq_len * layout.head_programs * indices.shape[3]
    arguments = {
        "Q": q,
        "K": k,
        "V": v,
        "INDEX": indices,
        "MASK": mask_arg,
        "DO": grad_out,
        "STATS": stats,
        "DQ": dq,
        "DK_ACC": dk_acc,
        "DV_ACC": dv_acc,
        "stride_qb": q.stride(0),
        "stride_qt": q.stride(1),
        "stride_qh": q.stride(2),
        "stride_kb": k.stride(0),
        "stride_kt": k.stride(1),
        "stride_kh": k.stride(2),
        "stride_vb": v.stride(0),
        "stride_vt": v.stride(1),
        "stride_vh": v.stride(2),
        "stride_ib": indices.stride(0),
        "stride_ih": head_stride(indices),
        "stride_it": indices.stride(2),
        "stride_ik": indices.stride(3),
        "stride_mb": mask_arg.stride(0),
        "stride_mh": head_stride(mask_arg),
        "stride_mt": mask_arg.stride(2),
        "stride_mk": mask_arg.stride(3),
        "stride_dob": grad_out.stride(0),
        "stride_dot": grad_out.stride(1),
        "stride_doh": grad_out.stride(2),
        "stride_dqb": dq.stride(0),
        "stride_dqt": dq.stride(1),
        "stride_dqh": dq.stride(2),
        "stride_ab": dk_acc.stride(0),
        "stride_at": dk_acc.stride(1),
        "stride_ah": dk_acc.stride(2),
        "stride_cb": dv_acc.stride(0),
        "stride_ct": dv_acc.stride(1),
        "stride_ch": dv_acc.stride(2),
        "INDEX_DIV": layout.index_div,
        "HAS_MASK": mask is not None,
        "ATOMIC": scatter,
        **{name: common[name] for name in common if name != "HEADS"},
    }
    kernel = per_head_kernel(layout)
    if kernel == "row":
        launch(
            _sparse_attention_bwd_dq_row_kernel,
            _sparse_attention_bwd_dq_row_tuned,
            _ROW_CONFIGS,
            grid,
            work,
            **arguments,
        )
    else:
        use_dot = kernel != "tile"
        launch(
            _sparse_attention_bwd_dq_kernel,
            _sparse_attention_bwd_dq_tuned,
            _DQ_CONFIGS,
            grid,
            work,
            HEADS=layout.heads,
            BLOCK_H=max(16, next_power_of_2(layout.heads)) if use_dot else 1,
            PRECISION=precision_of(q.dtype),
            DOT_FP32=interpreter_enabled(),
            USE_DOT=use_dot,
            **arguments,
        )
    if scatter:
        return dq, dk_acc.to(k.dtype), dv_acc.to(v.dtype)

    per_head_lists = indices.shape[1] == num_q_heads and layout.group > 1
    heads = 1 if per_head_lists else layout.group
    dk, dv = sparse_attention_bwd_dkv(q, k, v, grad_out, stats, indices, mask, scale, heads, per_head_lists)
    return dq, dk, dv
