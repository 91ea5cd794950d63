"""Sparse attention backward, key-major: ``dk``/``dv`` without float atomics.

The slots that select a key row are found through an inverse (key-major) index built once per
call: ``_sparse_attention_slot_bucket_kernel`` writes each slot's bucket
``(b * NL + list group) * Tkv + key`` in one pass over ``indices`` (and ``mask``),
``torch.sort(stable=True)`` orders the slots by bucket (slot order within a bucket) and
``searchsorted`` finds where each bucket starts: integer work, bitwise the same every run, no
host sync. Then ``_sparse_attention_bwd_dkv_kernel`` runs one program per key row and KV head:
it walks its bucket in that fixed order, recomputes ``p`` and ``ds`` of each slot (for every
query head that reads the list) from ``q``, ``dout`` and the per-row statistics (``lse`` in the
log2 domain and ``delta``, packed in one ``[B, Hq, T, 2]`` float32 tensor: one gathered load
per slot and head), and writes its ``dk``/``dv`` row once. Workspace: the buckets (int32) and the sorted slot ids (int64), one entry
per slot; no float buffer.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hdgsa_core.triton_utils import cdiv, next_power_of_2

from ._triton_fwd import LOG2E, _slot_rows, block_dim, head_stride, launch, mask_view

__all__ = ["key_major_order", "sparse_attention_bwd_dkv"]

# One key row per program; BLOCK_E slots (query rows of q and dout) per step.
_DKV_CONFIGS = [
    triton.Config({"BLOCK_E": 16}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_E": 32}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_E": 64}, num_warps=8, num_stages=2),
]


@triton.jit(do_not_specialize=["T", "TKV", "NUM_SLOTS", "HI", "NL"])
def _sparse_attention_bwd_dkv_kernel(
    Q,
    K,
    V,
    DO,
    STATS,
    ORDER,
    OFFSETS,
    DK_OUT,
    DV_OUT,
    stride_qb,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_dob,
    stride_dot,
    stride_doh,
    stride_dkb,
    stride_dkt,
    stride_dkh,
    stride_dvb,
    stride_dvt,
    stride_dvh,
    T,
    TKV,
    NUM_SLOTS,
    HI,
    HQ,
    NL,
    scale,
    qk_scale,
    GROUP: tl.constexpr,
    HEADS: tl.constexpr,
    PER_HEAD_LISTS: tl.constexpr,
    D: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    Q_DTYPE: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    """One key row ``s`` of one KV head: the sum over the slots that select it, in the order
    of ``ORDER`` (flat slot ids of ``[B, Hi, T, K]``, grouped by bucket ``(b, list group, s)``
    with the bucket starts in ``OFFSETS``)."""
    i_s = tl.program_id(0).to(tl.int64)
    i_hkv = tl.program_id(1).to(tl.int64)
    i_b = tl.program_id(2).to(tl.int64)
    i_bucket = (i_b * NL + i_hkv % NL) * TKV + i_s
    i_start = tl.load(OFFSETS + i_bucket)
    i_end = tl.load(OFFSETS + i_bucket + 1)

    o_d = tl.arange(0, BLOCK_D)
    o_dv = tl.arange(0, BLOCK_DV)
    m_d = o_d < D
    m_dv = o_dv < DV
    b_k = tl.load(K + i_b * stride_kb + i_s * stride_kt + i_hkv * stride_kh + o_d, mask=m_d, other=0.0)
    b_v = tl.load(V + i_b * stride_vb + i_s * stride_vt + i_hkv * stride_vh + o_dv, mask=m_dv, other=0.0)
    b_k = b_k.to(tl.float32)
    b_v = b_v.to(tl.float32)

    # Per-lane partial sums, reduced once after the loop (a fixed order: deterministic).
    b_dk = tl.zeros([BLOCK_E, BLOCK_D], tl.float32)
    b_dv = tl.zeros([BLOCK_E, BLOCK_DV], tl.float32)
    for e0 in range(i_start, i_end, BLOCK_E):
        o_e = e0 + tl.arange(0, BLOCK_E)
        m_e = o_e < i_end
        b_slot = tl.load(ORDER + o_e, mask=m_e, other=0).to(tl.int64)
        b_row = (b_slot // NUM_SLOTS).to(tl.int32)  # (b, list, t): one 64-bit division
        b_t = (b_row % T).to(tl.int64)
        b_ih = ((b_row // T) % HI).to(tl.int64)
        for g in range(HEADS):
            if PER_HEAD_LISTS:
                b_h = b_ih
            else:
                b_h = b_ih * 0 + i_hkv * GROUP + g
            b_q = tl.load(
                Q + i_b * stride_qb + b_t[:, None] * stride_qt + b_h[:, None] * stride_qh + o_d[None, :],
                mask=m_e[:, None] & m_d[None, :],
                other=0.0,
            ).to(tl.float32)
            b_do = tl.load(
                DO + i_b * stride_dob + b_t[:, None] * stride_dot + b_h[:, None] * stride_doh + o_dv[None, :],
                mask=m_e[:, None] & m_dv[None, :],
                other=0.0,
            ).to(tl.float32)
            p_stats = STATS + ((i_b * HQ + b_h) * T + b_t) * 2
            # A listed slot makes its row non-empty: its lse is finite.
            b_lse2 = tl.load(p_stats, mask=m_e, other=0.0)
            b_delta = tl.load(p_stats + 1, mask=m_e, other=0.0)
            b_s = tl.sum(b_q * b_k[None, :], 1) * qk_scale
            b_p = tl.where(m_e, tl.exp2(b_s - b_lse2), 0.0)
            b_ds = b_p * (tl.sum(b_do * b_v[None, :], 1) - b_delta)
            b_dv += b_p[:, None] * b_do
            b_dk += b_ds[:, None] * b_q
    b_dk = tl.sum(b_dk, 0)
    b_dv = tl.sum(b_dv, 0)

    tl.store(
        DK_OUT + i_b * stride_dkb + i_s * stride_dkt + i_hkv * stride_dkh + o_d,
        (b_dk * scale).to(DK_OUT.dtype.element_ty),
        mask=m_d,
    )
    tl.store(
        DV_OUT + i_b * stride_dvb + i_s * stride_dvt + i_hkv * stride_dvh + o_dv,
        b_dv.to(DV_OUT.dtype.element_ty),
        mask=m_dv,
    )


@triton.jit(do_not_specialize=["T", "TKV", "NUM_SLOTS", "HI", "NL", "SENTINEL"])
def _sparse_attention_slot_bucket_kernel(
    INDEX,
    MASK,
    BUCKET,
    stride_ib,
    stride_ih,
    stride_it,
    stride_ik,
    stride_mb,
    stride_mh,
    stride_mt,
    stride_mk,
    T,
    TKV,
    NUM_SLOTS,
    HI,
    NL,
    SENTINEL,
    LISTS_PER_GROUP: tl.constexpr,
    HAS_MASK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """``BUCKET[flat slot] = (b * NL + list group) * Tkv + key`` for a valid slot, else
    ``B * NL * Tkv`` (sorts last): one pass over ``indices`` (and ``mask``) through their strides."""
    i_row = tl.program_id(0).to(tl.int64)  # flat (b, list, t)
    i_t = i_row % T
    i_ih = (i_row // T) % HI
    i_b = i_row // (T * HI)
    o_k = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    p_index = INDEX + i_b * stride_ib + i_ih * stride_ih + i_t * stride_it
    p_mask = MASK + i_b * stride_mb + i_ih * stride_mh + i_t * stride_mt
    b_row, m_valid = _slot_rows(p_index, p_mask, o_k, NUM_SLOTS, TKV, stride_ik, stride_mk, HAS_MASK)
    b_bucket = tl.where(m_valid, (i_b * NL + i_ih // LISTS_PER_GROUP) * TKV + b_row, SENTINEL)
    tl.store(BUCKET + i_row * NUM_SLOTS + o_k, b_bucket.to(BUCKET.dtype.element_ty), mask=o_k < NUM_SLOTS)


_sparse_attention_bwd_dkv_tuned = triton.autotune(configs=_DKV_CONFIGS, key=["HEADS", "D", "DV", "Q_DTYPE"])(
    _sparse_attention_bwd_dkv_kernel
)


def key_major_order(
    indices: torch.Tensor, mask: torch.Tensor | None, num_keys: int, num_kv_heads: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The inverse index: ``(order, offsets, NL)``.

    Slot ``(b, i, t, j)`` of ``indices`` ``[B, Hi, T, K]`` (flat id in that order) reads key row
    ``indices[b, i, t, j]`` of the KV heads of its list group (``NL = Hkv`` groups, list ``i`` in
    group ``i // (Hi // Hkv)``; ``NL = 1`` when ``Hi = 1``: one list read by every KV head).
    ``order`` lists the valid slots' flat ids sorted by bucket ``(b * NL + group) * Tkv + key``,
    stably (slot order within a bucket); the slots of bucket ``u`` are
    ``order[offsets[u]:offsets[u + 1]]``. A Triton pass writes the buckets, ``torch.sort``
    (stable) orders them, ``searchsorted`` finds the bucket starts: integer work, bitwise the
    same every run, no host sync.
    """
    batch, num_lists, seq_len, num_slots = indices.shape
    num_groups = 1 if num_lists == 1 else num_kv_heads
    num_buckets = batch * num_groups * num_keys
    bucket_dtype = torch.int32 if num_buckets < 2**31 - 1 else torch.int64
    mask_arg = mask_view(indices, mask)
    bucket = torch.empty(indices.numel(), dtype=bucket_dtype, device=indices.device)
    block = min(1024, max(16, next_power_of_2(num_slots)))
    _sparse_attention_slot_bucket_kernel[(batch * num_lists * seq_len, cdiv(num_slots, block))](
        INDEX=indices,
        MASK=mask_arg,
        BUCKET=bucket,
        stride_ib=indices.stride(0),
        stride_ih=head_stride(indices),
        stride_it=indices.stride(2),
        stride_ik=indices.stride(3),
        stride_mb=mask_arg.stride(0),
        stride_mh=head_stride(mask_arg),
        stride_mt=mask_arg.stride(2),
        stride_mk=mask_arg.stride(3),
        T=seq_len,
        TKV=num_keys,
        NUM_SLOTS=num_slots,
        HI=num_lists,
        NL=num_groups,
        SENTINEL=num_buckets,
        LISTS_PER_GROUP=num_lists // num_groups,
        HAS_MASK=mask is not None,
        BLOCK=block,
        num_warps=4,
    )
    sorted_bucket, order = torch.sort(bucket, stable=True)
    # Bucket u's slots start at the first sorted bucket >= u (no bincount: it syncs on CUDA).
    bounds = torch.arange(num_buckets + 1, device=indices.device, dtype=bucket_dtype)
    offsets = torch.searchsorted(sorted_bucket, bounds)
    return order, offsets, num_groups


def sparse_attention_bwd_dkv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grad_out: torch.Tensor,
    stats: torch.Tensor,
    indices: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    heads: int,
    per_head_lists: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dk, dv)`` in the dtypes of ``k``, ``v``; ``heads`` query heads per slot (1 with
    per-head lists: the slot's own head; else the ``G`` heads of the KV head's group)."""
    batch, seq_len, num_q_heads, head_dim = q.shape
    num_keys, num_kv_heads, value_dim = k.shape[1], k.shape[2], v.shape[3]
    order, offsets, num_groups = key_major_order(indices, mask, num_keys, num_kv_heads)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    launch(
        _sparse_attention_bwd_dkv_kernel,
        _sparse_attention_bwd_dkv_tuned,
        _DKV_CONFIGS,
        (num_keys, num_kv_heads, batch),
        order.numel(),
        Q=q,
        K=k,
        V=v,
        DO=grad_out,
        STATS=stats,
        ORDER=order,
        OFFSETS=offsets,
        DK_OUT=dk,
        DV_OUT=dv,
        stride_qb=q.stride(0),
        stride_qt=q.stride(1),
        stride_qh=q.stride(2),
        stride_kb=k.stride(0),
        stride_kt=k.stride(1),
        stride_kh=k.stride(2),
        stride_vb=v.stride(0),
        stride_vt=v.stride(1),
        stride_vh=v.stride(2),
        stride_dob=grad_out.stride(0),
        stride_dot=grad_out.stride(1),
        stride_doh=grad_out.stride(2),
        stride_dkb=dk.stride(0),
        stride_dkt=dk.stride(1),
        stride_dkh=dk.stride(2),
        stride_dvb=dv.stride(0),
        stride_dvt=dv.stride(1),
        stride_dvh=dv.stride(2),
        T=seq_len,
        TKV=num_keys,
        NUM_SLOTS=indices.shape[3],
        HI=indices.shape[1],
        HQ=num_q_heads,
        NL=num_groups,
        scale=scale,
        qk_scale=scale * LOG2E,
        GROUP=num_q_heads // num_kv_heads,
        HEADS=heads,
        PER_HEAD_LISTS=per_head_lists,
        D=head_dim,
        DV=value_dim,
        BLOCK_D=block_dim(head_dim),
        BLOCK_DV=block_dim(value_dim),
        Q_DTYPE=str(q.dtype),
    )
    return dk, dv
