"""The query-block path of the Triton backend: a block of ``BQ`` consecutive queries times the
``G`` query heads of a KV head attends to the union of the block's index lists (see
``_block_plan``), on the tensor cores.

One program per ``(query block, KV head, batch)``; its ``BQ * G`` rows (row ``r`` = query
``r // G``, head ``r % G`` of the group) are the rows of ``tl.dot``. The union is read in tiles
of ``BLOCK_N`` keys: each key's K/V row is gathered once per block. The score of (row, key) is
weighted by the query's multiplicity ``c`` of that key (``p = c * exp(s - m)``; ``c = 0``: not
selected, the score is excluded), which is exactly the per-slot softmax (a key selected twice
counts twice). Online softmax in float32 in the log2 domain; a row with no valid slot gives
``out = 0``, ``lse = -inf``.

Backward (``p`` recomputed from ``lse``, ``delta = sum(dout * out) - dlse``): ``dq`` is
accumulated in the program's loop; the ``dk``/``dv`` rows of a union tile
(``dS^T Q``, ``P^T dO``) go

- fast path: into float32 ``dk``/``dv`` buffers with float atomics;
- deterministic path (``torch.are_deterministic_algorithms_enabled()``): to a workspace row
  per (block, union position), written once; ``_block_dkv_reduce_kernel`` then sums each key's
  rows over the blocks whose union holds it, in increasing block order (the plan's bitmaps are
  the inverse map), so the gradients are bitwise the same every run. The blocks run in chunks
  whose workspace stays under :data:`WORKSPACE_BYTES`.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from hdgsa_core.capabilities import interpreter_enabled
from hdgsa_core.triton_utils import on_input_device

from ._block_plan import BlockPlan, _popcount, block_q_for, block_rows, block_tile_config, build_block_plan
from ._triton_fwd import LOG2E, block_dim, precision_of, unit_last

__all__ = [
    "WORKSPACE_BYTES",
    "sparse_attention_block",
    "sparse_attention_block_bwd",
    "sparse_attention_block_fwd",
]

# Float32 (block, union position) dk/dv rows of the deterministic backward, per chunk of blocks.
WORKSPACE_BYTES = 512 * 2**20


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, DOT_FP32: tl.constexpr):
    """``a @ b`` float32 (``DOT_FP32``: float32 operands, for the CPU interpreter)."""
    if DOT_FP32:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _block_rows(i_blk, i_hkv, T, GROUP: tl.constexpr, BLOCK_Q: tl.constexpr, ROWS: tl.constexpr):
    """``(query t, head h, query-in-block i, valid)`` of the program's rows."""
    o_r = tl.arange(0, ROWS)
    o_i = o_r // GROUP
    b_t = i_blk * BLOCK_Q + o_i
    m_r = (o_r < BLOCK_Q * GROUP) & (b_t < T)
    return b_t, i_hkv * GROUP + o_r % GROUP, o_i, m_r


@triton.jit(do_not_specialize=["T", "NB", "UMAX", "UC"])
def _sparse_attention_block_fwd_kernel(
    Q,
    K,
    V,
    UNION,
    USIZE,
    COUNTS,
    OUT,
    LSE,
    stride_qb,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_ob,
    stride_ot,
    stride_oh,
    T,
    NB,
    UMAX,
    UC,
    HQ,
    HI,
    qk_scale,
    GROUP: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    ROWS: tl.constexpr,
    D: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr,
    Q_DTYPE: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    i_blk = tl.program_id(0).to(tl.int64)
    i_hkv = tl.program_id(1).to(tl.int64)
    i_b = tl.program_id(2).to(tl.int64)
    i_list = (i_b * HI + i_hkv % HI) * NB + i_blk
    b_t, b_h, o_i, m_r = _block_rows(i_blk, i_hkv, T, GROUP, BLOCK_Q, ROWS)
    o_d = tl.arange(0, BLOCK_D)
    o_dv = tl.arange(0, BLOCK_DV)
    m_d = o_d < D
    m_dv = o_dv < DV

    b_q = tl.load(
        Q + i_b * stride_qb + b_t[:, None] * stride_qt + b_h[:, None] * stride_qh + o_d[None, :],
        mask=m_r[:, None] & m_d[None, :],
        other=0.0,
    )
    p_k = K + i_b * stride_kb + i_hkv * stride_kh
    p_v = V + i_b * stride_vb + i_hkv * stride_vh
    p_union = UNION + i_list * UMAX
    p_cnt = COUNTS + (i_list * BLOCK_Q + o_i) * UC
    i_size = tl.load(USIZE + i_list)

    b_m = tl.full([ROWS], float("-inf"), tl.float32)
    b_l = tl.zeros([ROWS], tl.float32)
    b_acc = tl.zeros([ROWS, BLOCK_DV], tl.float32)
    for start in range(0, i_size, BLOCK_N):
        o_n = start + tl.arange(0, BLOCK_N)
        m_n = o_n < i_size
        b_key = tl.load(p_union + o_n, mask=m_n, other=0).to(tl.int64)
        b_k = tl.load(
            p_k + b_key[:, None] * stride_kt + o_d[None, :], mask=m_n[:, None] & m_d[None, :], other=0.0
        )
        b_c = tl.load(p_cnt[:, None] + o_n[None, :], mask=m_r[:, None] & m_n[None, :], other=0).to(tl.float32)
        b_s = _dot(b_q, tl.trans(b_k), PRECISION, DOT_FP32) * qk_scale
        b_s = tl.where(b_c > 0, b_s, float("-inf"))
        b_m_new = tl.maximum(b_m, tl.max(b_s, 1))
        b_shift = tl.where(b_m_new == float("-inf"), 0.0, b_m_new)
        b_alpha = tl.exp2(b_m - b_shift)
        b_p = tl.exp2(b_s - b_shift[:, None]) * b_c
        b_l = b_l * b_alpha + tl.sum(b_p, 1)
        b_v = tl.load(
            p_v + b_key[:, None] * stride_vt + o_dv[None, :], mask=m_n[:, None] & m_dv[None, :], other=0.0
        )
        b_acc = b_acc * b_alpha[:, None] + _dot(b_p.to(b_v.dtype), b_v, PRECISION, DOT_FP32)
        b_m = b_m_new

    m_nonempty = b_l > 0
    b_out = b_acc / tl.where(m_nonempty, b_l, 1.0)[:, None]
    b_lse = tl.where(
        m_nonempty, (b_m + tl.log2(tl.where(m_nonempty, b_l, 1.0))) * 0.6931471805599453, float("-inf")
    )
    p_out = OUT + i_b * stride_ob + b_t[:, None] * stride_ot + b_h[:, None] * stride_oh + o_dv[None, :]
    tl.store(p_out, b_out.to(OUT.dtype.element_ty), mask=m_r[:, None] & m_dv[None, :])
    tl.store(LSE + (i_b * HQ + b_h) * T + b_t, b_lse, mask=m_r)


@triton.jit(do_not_specialize=["T", "NB", "UMAX", "UC", "BLK0"])
def _sparse_attention_block_bwd_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    UNION,
    USIZE,
    COUNTS,
    DQ,
    DK_ACC,
    DV_ACC,
    WS_K,
    WS_V,
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
    NB,
    UMAX,
    UC,
    HQ,
    HI,
    HKV,
    BLK0,
    scale,
    qk_scale,
    GROUP: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    ROWS: tl.constexpr,
    D: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    ATOMIC: tl.constexpr,
    PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr,
    Q_DTYPE: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """dq of the program's rows; dk/dv of each union tile by atomics (``ATOMIC``) or into the
    workspace rows ``WS_*[(b * HKV + hkv) * chunk + blk - BLK0, u]``."""
    i_c = tl.program_id(0).to(tl.int64)
    i_blk = BLK0 + i_c
    i_hkv = tl.program_id(1).to(tl.int64)
    i_b = tl.program_id(2).to(tl.int64)
    i_list = (i_b * HI + i_hkv % HI) * NB + i_blk
    b_t, b_h, o_i, m_r = _block_rows(i_blk, i_hkv, T, GROUP, BLOCK_Q, ROWS)
    o_d = tl.arange(0, BLOCK_D)
    o_dv = tl.arange(0, BLOCK_DV)
    m_d = o_d < D
    m_dv = o_dv < DV

    b_q = tl.load(
        Q + i_b * stride_qb + b_t[:, None] * stride_qt + b_h[:, None] * stride_qh + o_d[None, :],
        mask=m_r[:, None] & m_d[None, :],
        other=0.0,
    )
    b_do = tl.load(
        DO + i_b * stride_dob + b_t[:, None] * stride_dot + b_h[:, None] * stride_doh + o_dv[None, :],
        mask=m_r[:, None] & m_dv[None, :],
        other=0.0,
    )
    o_row = (i_b * HQ + b_h) * T + b_t
    b_lse = tl.load(LSE + o_row, mask=m_r, other=float("inf"))
    b_lse2 = tl.where(b_lse == float("-inf"), float("inf"), b_lse * 1.4426950408889634)
    b_delta = tl.load(DELTA + o_row, mask=m_r, other=0.0)

    p_k = K + i_b * stride_kb + i_hkv * stride_kh
    p_v = V + i_b * stride_vb + i_hkv * stride_vh
    p_union = UNION + i_list * UMAX
    p_cnt = COUNTS + (i_list * BLOCK_Q + o_i) * UC
    i_size = tl.load(USIZE + i_list)
    i_ws = ((i_b * HKV + i_hkv) * tl.num_programs(0) + i_c) * UMAX

    b_dq = tl.zeros([ROWS, BLOCK_D], tl.float32)
    for start in range(0, i_size, BLOCK_N):
        o_n = start + tl.arange(0, BLOCK_N)
        m_n = o_n < i_size
        m_nd = m_n[:, None] & m_d[None, :]
        m_ndv = m_n[:, None] & m_dv[None, :]
        b_key = tl.load(p_union + o_n, mask=m_n, other=0).to(tl.int64)
        b_k = tl.load(p_k + b_key[:, None] * stride_kt + o_d[None, :], mask=m_nd, other=0.0)
        b_v = tl.load(p_v + b_key[:, None] * stride_vt + o_dv[None, :], mask=m_ndv, other=0.0)
        b_c = tl.load(p_cnt[:, None] + o_n[None, :], mask=m_r[:, None] & m_n[None, :], other=0).to(tl.float32)
        b_s = _dot(b_q, tl.trans(b_k), PRECISION, DOT_FP32) * qk_scale
        b_p = tl.where(b_c > 0, tl.exp2(b_s - b_lse2[:, None]), 0.0) * b_c
        b_dp = _dot(b_do, tl.trans(b_v), PRECISION, DOT_FP32)
        b_ds = b_p * (b_dp - b_delta[:, None])
        b_dq += _dot(b_ds.to(b_k.dtype), b_k, PRECISION, DOT_FP32)
        b_dv_t = _dot(tl.trans(b_p.to(b_do.dtype)), b_do, PRECISION, DOT_FP32)
        b_dk_t = _dot(tl.trans(b_ds.to(b_q.dtype)), b_q, PRECISION, DOT_FP32) * scale
        if ATOMIC:
            tl.atomic_add(
                DV_ACC + i_b * stride_cb + i_hkv * stride_ch + b_key[:, None] * stride_ct + o_dv[None, :],
                b_dv_t,
                mask=m_ndv,
                sem="relaxed",
            )
            tl.atomic_add(
                DK_ACC + i_b * stride_ab + i_hkv * stride_ah + b_key[:, None] * stride_at + o_d[None, :],
                b_dk_t,
                mask=m_nd,
                sem="relaxed",
            )
        else:
            tl.store(WS_V + (i_ws + o_n[:, None]) * DV + o_dv[None, :], b_dv_t, mask=m_ndv)
            tl.store(WS_K + (i_ws + o_n[:, None]) * D + o_d[None, :], b_dk_t, mask=m_nd)

    p_dq = DQ + i_b * stride_dqb + b_t[:, None] * stride_dqt + b_h[:, None] * stride_dqh + o_d[None, :]
    tl.store(p_dq, (b_dq * scale).to(DQ.dtype.element_ty), mask=m_r[:, None] & m_d[None, :])


@triton.jit(do_not_specialize=["NB", "W", "UMAX", "BLK0", "NCH", "TKV"])
def _block_dkv_reduce_kernel(
    BITS,
    WORD_BASE,
    WS,
    ACC,
    stride_ab,
    stride_at,
    stride_ah,
    NB,
    W,
    UMAX,
    HI,
    HKV,
    BLK0,
    NCH,
    TKV,
    DX: tl.constexpr,
    BLOCK_DX: tl.constexpr,
):
    """``ACC[b, 32 w + j, hkv] +=`` the workspace rows of key ``32 w + j`` over the chunk's
    blocks ``BLK0 .. BLK0 + NCH - 1``, in increasing block order (one program owns its 32 keys:
    no atomics, a fixed order)."""
    i_w = tl.program_id(0).to(tl.int64)
    i_hkv = tl.program_id(1).to(tl.int64)
    i_b = tl.program_id(2).to(tl.int64)
    o_bit = tl.arange(0, 32)
    o_x = tl.arange(0, BLOCK_DX)
    m_x = o_x < DX
    b_lo = (tl.full([32], 1, tl.uint32) << o_bit.to(tl.uint32)) - 1
    i_list0 = (i_b * HI + i_hkv % HI) * NB
    i_ws0 = (i_b * HKV + i_hkv) * NCH
    b_acc = tl.zeros([32, BLOCK_DX], tl.float32)
    for i_c in range(NCH):
        i_list = i_list0 + BLK0 + i_c
        b_word = tl.load(BITS + i_list * W + i_w).to(tl.uint32, bitcast=True)
        if b_word != 0:
            m_set = ((b_word >> o_bit.to(tl.uint32)) & 1) != 0
            b_pos = tl.load(WORD_BASE + i_list * W + i_w) + _popcount(b_word & b_lo).to(tl.int32)
            b_rows = tl.load(
                WS + ((i_ws0 + i_c) * UMAX + b_pos[:, None]) * DX + o_x[None, :],
                mask=m_set[:, None] & m_x[None, :],
                other=0.0,
            )
            b_acc += b_rows
    o_key = i_w * 32 + o_bit
    p_acc = ACC + i_b * stride_ab + i_hkv * stride_ah + o_key[:, None] * stride_at + o_x[None, :]
    m_acc = (o_key < TKV)[:, None] & m_x[None, :]
    tl.store(p_acc, tl.load(p_acc, mask=m_acc, other=0.0) + b_acc, mask=m_acc)


def _config(head_dim: int, value_dim: int, backward: bool) -> dict:
    """``BLOCK_N``/warps/stages: the first config of each kernel (no autotuning yet);
    :func:`hdgsa_sparse_attn._block_plan.block_tile_config` on a GPU."""
    if interpreter_enabled():
        return {"BLOCK_N": 16, "num_warps": 4, "num_stages": 1}
    return block_tile_config(head_dim, value_dim, backward)


def _qkv_strides(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> dict:
    return {
        "stride_qb": q.stride(0),
        "stride_qt": q.stride(1),
        "stride_qh": q.stride(2),
        "stride_kb": k.stride(0),
        "stride_kt": k.stride(1),
        "stride_kh": k.stride(2),
        "stride_vb": v.stride(0),
        "stride_vt": v.stride(1),
        "stride_vh": v.stride(2),
    }


def _plan_args(plan: BlockPlan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> dict:
    _batch, seq_len, num_q_heads, head_dim = q.shape
    group = num_q_heads // k.shape[2]
    return {
        "UNION": plan.union,
        "USIZE": plan.union_size,
        "COUNTS": plan.counts,
        "T": seq_len,
        "NB": plan.num_blocks,
        "UMAX": plan.union.shape[-1],
        "UC": plan.counts.shape[-1],
        "HQ": num_q_heads,
        "HI": plan.union.shape[1],
        "GROUP": group,
        "BLOCK_Q": plan.block_q,
        "ROWS": block_rows(plan.block_q, group),
        "D": head_dim,
        "DV": v.shape[3],
        "BLOCK_D": block_dim(head_dim),
        "BLOCK_DV": block_dim(v.shape[3]),
        "PRECISION": precision_of(q.dtype),
        "DOT_FP32": interpreter_enabled(),
        "Q_DTYPE": str(q.dtype),
    }


@on_input_device
def sparse_attention_block_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: BlockPlan, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [B, T, Hq, Dv] in q.dtype, lse [B, Hq, T] float32)`` over ``plan``'s unions."""
    batch, seq_len, num_q_heads, _ = q.shape
    out = q.new_empty(batch, seq_len, num_q_heads, v.shape[3])
    lse = q.new_empty(batch, num_q_heads, seq_len, dtype=torch.float32)
    if out.numel() == 0:
        lse.fill_(float("-inf"))
        return out, lse
    q, k, v = unit_last(q), unit_last(k), unit_last(v)
    _sparse_attention_block_fwd_kernel[(plan.num_blocks, k.shape[2], batch)](
        Q=q,
        K=k,
        V=v,
        OUT=out,
        LSE=lse,
        **_qkv_strides(q, k, v),
        stride_ob=out.stride(0),
        stride_ot=out.stride(1),
        stride_oh=out.stride(2),
        qk_scale=scale * LOG2E,
        **_plan_args(plan, q, k, v),
        **_config(q.shape[3], v.shape[3], backward=False),
    )
    return out, lse


def deterministic_chunk(plan: BlockPlan, num_kv_heads: int, batch: int, head_dim: int, value_dim: int) -> int:
    """Blocks per chunk of the deterministic backward: its float32 workspace
    (``B * Hkv * chunk * U * (D + Dv) * 4`` bytes) stays under :data:`WORKSPACE_BYTES`."""
    row_bytes = batch * num_kv_heads * max(1, plan.union.shape[-1]) * (head_dim + value_dim) * 4
    return max(1, min(plan.num_blocks, WORKSPACE_BYTES // row_bytes))


@on_input_device
def sparse_attention_block_bwd(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: BlockPlan,
    out: torch.Tensor,
    lse: torch.Tensor,
    grad_lse: torch.Tensor | None,
    scale: float,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` in the inputs' dtype."""
    batch, seq_len, num_q_heads, head_dim = q.shape
    num_keys, num_kv_heads, value_dim = k.shape[1], k.shape[2], v.shape[3]
    q, k, v, grad_out = unit_last(q), unit_last(k), unit_last(v), unit_last(grad_out)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk_acc = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
    dv_acc = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
    if batch * seq_len * num_q_heads == 0 or num_keys == 0 or plan.max_union == 0:
        return dq.zero_(), dk_acc.to(k.dtype), dv_acc.to(v.dtype)
    delta = (grad_out.float() * out.float()).sum(-1).transpose(1, 2)  # [B, Hq, T]
    if grad_lse is not None:
        delta = delta - grad_lse.float()
    delta = delta.contiguous()
    args = {
        "Q": q,
        "K": k,
        "V": v,
        "DO": grad_out,
        "LSE": lse,
        "DELTA": delta,
        "DQ": dq,
        "DK_ACC": dk_acc,
        "DV_ACC": dv_acc,
        **_qkv_strides(q, k, v),
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
        "HKV": num_kv_heads,
        "scale": scale,
        "qk_scale": scale * LOG2E,
        **_plan_args(plan, q, k, v),
        **_config(head_dim, value_dim, backward=True),
    }
    if not deterministic:
        _sparse_attention_block_bwd_kernel[(plan.num_blocks, num_kv_heads, batch)](
            WS_K=dk_acc, WS_V=dv_acc, BLK0=0, ATOMIC=True, **args
        )
        return dq, dk_acc.to(k.dtype), dv_acc.to(v.dtype)

    chunk = deterministic_chunk(plan, num_kv_heads, batch, head_dim, value_dim)
    width = plan.union.shape[-1]
    ws_k = torch.empty(batch * num_kv_heads * chunk * width * head_dim, dtype=torch.float32, device=q.device)
    ws_v = torch.empty(batch * num_kv_heads * chunk * width * value_dim, dtype=torch.float32, device=q.device)
    num_words = plan.bits.shape[-1]
    for blk0 in range(0, plan.num_blocks, chunk):
        num = min(chunk, plan.num_blocks - blk0)
        _sparse_attention_block_bwd_kernel[(num, num_kv_heads, batch)](
            WS_K=ws_k, WS_V=ws_v, BLK0=blk0, ATOMIC=False, **args
        )
        for ws, acc, dim in ((ws_k, dk_acc, head_dim), (ws_v, dv_acc, value_dim)):
            _block_dkv_reduce_kernel[(num_words, num_kv_heads, batch)](
                BITS=plan.bits,
                WORD_BASE=plan.word_base,
                WS=ws,
                ACC=acc,
                stride_ab=acc.stride(0),
                stride_at=acc.stride(1),
                stride_ah=acc.stride(2),
                NB=plan.num_blocks,
                W=num_words,
                UMAX=width,
                HI=plan.union.shape[1],
                HKV=num_kv_heads,
                BLK0=blk0,
                NCH=num,
                TKV=num_keys,
                DX=dim,
                BLOCK_DX=block_dim(dim),
                num_warps=4,
            )
    return dq, dk_acc.to(k.dtype), dv_acc.to(v.dtype)


class _BlockSparseAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q, k, v, plan: BlockPlan, scale: float):
        out, lse = sparse_attention_block_fwd(q, k, v, plan, scale)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan = plan
        ctx.scale = scale
        return out, lse

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out, grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        if grad_out is None and grad_lse is None:
            return None, None, None, None, None
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        dq, dk, dv = sparse_attention_block_bwd(
            grad_out,
            q,
            k,
            v,
            ctx.plan,
            out,
            lse,
            grad_lse,
            ctx.scale,
            torch.are_deterministic_algorithms_enabled(),
        )
        return dq, dk, dv, None, None


def sparse_attention_block(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    plan: BlockPlan | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` by the block path (arguments checked by the caller; ``indices``/``mask``
    ``[B, Hi, T, K]`` with ``Hi`` in ``{1, Hkv}``). ``plan``: from
    :func:`hdgsa_sparse_attn._block_plan.plan_and_choose`, else built here."""
    if plan is None:
        plan = build_block_plan(indices, mask, k.shape[1], block_q_for(q.shape[2], k.shape[2]))
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return _BlockSparseAttentionFunction.apply(q, k, v, plan, scale)
    return sparse_attention_block_fwd(q, k, v, plan, scale)
