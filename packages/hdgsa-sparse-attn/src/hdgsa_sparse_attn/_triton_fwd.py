"""Sparse attention forward kernel: online softmax over the selected slots, with ``lse``.

One program per ``(query t, head program, batch)``, ``t`` fastest in the launch order, so the
programs that run together are neighbouring queries of the same head(s): the K/V rows their
lists repeat come from L2. A head program is

- one query head when each query head has its own list (``Hi = Hq``; also ``Hq = Hkv``):
  a gather of ``BLOCK_K`` whole K and V rows per step. By default (:data:`PER_HEAD_KERNEL`)
  the group kernel runs it with its one row padded to 16 for ``tl.dot``: the tensor cores do
  16x the needed products and still beat the CUDA-core matrix-vector versions
  (``_sparse_attention_fwd_row_kernel``, or the group kernel with ``USE_DOT = False``);
- the ``G = Hq // Hkv`` query heads of a KV head when they share its list (``Hi = Hkv`` or
  ``Hi = 1``): each selected K/V row is read once for the whole group, and the group's
  heads (padded to 16 rows) are the rows of ``tl.dot`` on the tensor cores (``USE_DOT``).

Slots are read through the strides of ``indices`` and ``mask`` (a ``[B, T, K]`` list is a
stride-0 head dimension); a slot is valid when ``0 <= index < Tkv`` and its mask is set, and an
invalid slot's rows are never read. Scores are kept in the log2 domain (``exp2``); a row with no
valid slot ends with ``l = 0`` and is written as ``out = 0``, ``lse = -inf``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hdgsa_core.capabilities import interpreter_enabled
from hdgsa_core.triton_utils import next_power_of_2, on_input_device

__all__ = ["LOG2E", "SlotLayout", "launch", "slot_layout", "sparse_attention_fwd"]

LOG2E = 1.4426950408889634

# Per-head gathers: loads in flight matter more than occupancy (each step is BLOCK_K whole
# rows of K and V); group-shared programs: BLOCK_K rows feed a [16, BLOCK_K] tensor-core tile.
# The first config is the one small inputs and the interpreter use (no autotuning).
_FWD_CONFIGS = [
    triton.Config({"BLOCK_K": 32}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_K": 64}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_K": 64}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_K": 128}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_K": 32}, num_warps=2, num_stages=3),
]


# The per-head gather kernel: more slots per step and more warps keep more rows in flight.
_ROW_CONFIGS = [
    triton.Config({"BLOCK_K": 32}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK_K": 64}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK_K": 64}, num_warps=8, num_stages=1),
    triton.Config({"BLOCK_K": 128}, num_warps=8, num_stages=1),
]


class SlotLayout:
    """How the programs map onto heads and index lists (host side)."""

    def __init__(self, num_q_heads: int, num_kv_heads: int, num_index_heads: int) -> None:
        self.group = num_q_heads // num_kv_heads
        # A list shared by a KV group (Hi = Hkv or Hi = 1, with G > 1) feeds the group's heads
        # together; otherwise every query head is a program of its own.
        self.shared = self.group > 1 and num_index_heads != num_q_heads
        self.heads = self.group if self.shared else 1
        self.head_programs = num_kv_heads if self.shared else num_q_heads
        # The list of a program whose first query head is h0 is h0 // index_div (Hi = 1: the
        # launcher passes a 0 head stride).
        per_kv = num_index_heads == num_kv_heads and num_index_heads != num_q_heads
        self.index_div = self.group if per_kv else 1


def slot_layout(q: torch.Tensor, k: torch.Tensor, indices: torch.Tensor) -> SlotLayout:
    return SlotLayout(q.shape[2], k.shape[2], indices.shape[1])


@triton.jit
def _scores(b_q, b_k, USE_DOT: tl.constexpr, PRECISION: tl.constexpr, DOT_FP32: tl.constexpr):
    """``[BH, D] x [BK, D] -> [BH, BK]`` float32: ``b_q @ b_k^T``. ``DOT_FP32``: operands go
    to ``tl.dot`` as float32 (the CPU interpreter's 16-bit ``tl.dot`` returns garbage)."""
    if USE_DOT:
        if DOT_FP32:
            b_q = b_q.to(tl.float32)
            b_k = b_k.to(tl.float32)
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION)
    else:  # one query row: a matrix-vector product on the CUDA cores
        b_s = tl.sum(b_k.to(tl.float32) * b_q.to(tl.float32), 1)[None, :]
    return b_s


@triton.jit
def _weighted_rows(b_p, b_v, USE_DOT: tl.constexpr, PRECISION: tl.constexpr, DOT_FP32: tl.constexpr):
    """``b_p @ b_v`` for ``b_p`` ``[BH, BK]`` float32 and ``b_v`` ``[BK, DV]``.

    ``USE_DOT``: the ``[BH, DV]`` product (``b_p`` rounded to the dtype of ``b_v`` first, as
    FlashAttention does). One query row: the ``[BK, DV]`` per-slot terms; the caller keeps them
    in a ``[BK, DV]`` accumulator and sums over the slots once, after its loop (no cross-warp
    reduction per step).
    """
    if USE_DOT:
        b_p = b_p.to(b_v.dtype)
        if DOT_FP32:
            b_p = b_p.to(tl.float32)
            b_v = b_v.to(tl.float32)
        b_o = tl.dot(b_p, b_v, input_precision=PRECISION)
    else:
        b_o = tl.sum(b_p, 0)[:, None] * b_v.to(tl.float32)
    return b_o


@triton.jit
def _slot_rows(
    p_index,
    p_mask,
    o_k,
    NUM_SLOTS,
    TKV,
    stride_ik,
    stride_mk,
    HAS_MASK: tl.constexpr,
):
    """The key rows of slots ``o_k`` (int64, 0 where invalid) and which slots are valid."""
    m_k = o_k < NUM_SLOTS
    b_index = tl.load(p_index + o_k * stride_ik, mask=m_k, other=-1).to(tl.int64)
    m_valid = m_k & (b_index >= 0) & (b_index < TKV)
    if HAS_MASK:
        m_valid = m_valid & (tl.load(p_mask + o_k * stride_mk, mask=m_k, other=0) != 0)
    return tl.where(m_valid, b_index, 0), m_valid


@triton.jit(do_not_specialize=["T", "TKV", "NUM_SLOTS"])
def _sparse_attention_fwd_kernel(
    Q,
    K,
    V,
    INDEX,
    MASK,
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
    stride_ib,
    stride_ih,
    stride_it,
    stride_ik,
    stride_mb,
    stride_mh,
    stride_mt,
    stride_mk,
    stride_ob,
    stride_ot,
    stride_oh,
    T,
    TKV,
    NUM_SLOTS,
    HQ,
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

    p_q = Q + i_b * stride_qb + i_t * stride_qt + (i_h0 + o_h)[:, None] * stride_qh + o_d[None, :]
    b_q = tl.load(p_q, mask=m_h[:, None] & m_d[None, :], other=0.0)
    p_k = K + i_b * stride_kb + i_hkv * stride_kh
    p_v = V + i_b * stride_vb + i_hkv * stride_vh
    p_index = INDEX + i_b * stride_ib + i_ih * stride_ih + i_t * stride_it
    p_mask = MASK + i_b * stride_mb + i_ih * stride_mh + i_t * stride_mt

    b_m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    b_l = tl.zeros([BLOCK_H], tl.float32)
    if USE_DOT:
        b_acc = tl.zeros([BLOCK_H, BLOCK_DV], tl.float32)
    else:  # per-slot terms, summed after the loop
        b_acc = tl.zeros([BLOCK_K, BLOCK_DV], tl.float32)
    for start in range(0, NUM_SLOTS, BLOCK_K):
        o_k = start + tl.arange(0, BLOCK_K)
        b_row, m_valid = _slot_rows(p_index, p_mask, o_k, NUM_SLOTS, TKV, stride_ik, stride_mk, HAS_MASK)
        b_k = tl.load(
            p_k + b_row[:, None] * stride_kt + o_d[None, :], mask=m_valid[:, None] & m_d[None, :], other=0.0
        )
        b_s = _scores(b_q, b_k, USE_DOT, PRECISION, DOT_FP32) * qk_scale
        b_s = tl.where(m_valid[None, :], b_s, float("-inf"))
        b_m_new = tl.maximum(b_m, tl.max(b_s, 1))
        # A row with no valid slot so far keeps m = -inf: shift by 0 instead (exp2(-inf) = 0).
        b_shift = tl.where(b_m_new == float("-inf"), 0.0, b_m_new)
        b_alpha = tl.exp2(b_m - b_shift)
        b_p = tl.exp2(b_s - b_shift[:, None])
        b_l = b_l * b_alpha + tl.sum(b_p, 1)
        b_v = tl.load(
            p_v + b_row[:, None] * stride_vt + o_dv[None, :], mask=m_valid[:, None] & m_dv[None, :], other=0.0
        )
        b_acc = b_acc * b_alpha[:, None] + _weighted_rows(b_p, b_v, USE_DOT, PRECISION, DOT_FP32)
        b_m = b_m_new

    if not USE_DOT:
        b_acc = tl.sum(b_acc, 0)[None, :]
    m_nonempty = b_l > 0
    b_out = b_acc / tl.where(m_nonempty, b_l, 1.0)[:, None]
    # natural-log lse: (m + log2 l) / log2(e)
    b_lse = tl.where(
        m_nonempty, (b_m + tl.log2(tl.where(m_nonempty, b_l, 1.0))) * 0.6931471805599453, float("-inf")
    )
    p_out = OUT + i_b * stride_ob + i_t * stride_ot + (i_h0 + o_h)[:, None] * stride_oh + o_dv[None, :]
    tl.store(p_out, b_out.to(OUT.dtype.element_ty), mask=m_h[:, None] & m_dv[None, :])
    tl.store(LSE + (i_b * HQ + i_h0 + o_h) * T + i_t, b_lse, mask=m_h)


@triton.jit(do_not_specialize=["T", "TKV", "NUM_SLOTS"])
def _sparse_attention_fwd_row_kernel(
    Q,
    K,
    V,
    INDEX,
    MASK,
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
    stride_ib,
    stride_ih,
    stride_it,
    stride_ik,
    stride_mb,
    stride_mh,
    stride_mt,
    stride_mk,
    stride_ob,
    stride_ot,
    stride_oh,
    T,
    TKV,
    NUM_SLOTS,
    HQ,
    qk_scale,
    GROUP: tl.constexpr,
    INDEX_DIV: tl.constexpr,
    D: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    HAS_MASK: tl.constexpr,
    Q_DTYPE: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One query head with its own list: a gather. Scores and the value sum are reductions of
    ``[BLOCK_K, D]`` tiles on the CUDA cores, kept 1-D (no padding to tensor-core rows); the K
    and V rows of a step are loaded together and the next step's slots are loaded ahead."""
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

    b_q = tl.load(Q + i_b * stride_qb + i_t * stride_qt + i_h * stride_qh + o_d, mask=m_d, other=0.0)
    b_q = b_q.to(tl.float32) * qk_scale  # scores in the log2 domain
    p_k = K + i_b * stride_kb + i_hkv * stride_kh
    p_v = V + i_b * stride_vb + i_hkv * stride_vh
    p_index = INDEX + i_b * stride_ib + i_ih * stride_ih + i_t * stride_it
    p_mask = MASK + i_b * stride_mb + i_ih * stride_mh + i_t * stride_mt

    b_m = tl.full([], float("-inf"), tl.float32)
    b_l = tl.zeros([], tl.float32)
    b_acc = tl.zeros([BLOCK_DV], tl.float32)
    b_row, m_valid = _slot_rows(p_index, p_mask, o_k, NUM_SLOTS, TKV, stride_ik, stride_mk, HAS_MASK)
    for start in range(0, NUM_SLOTS, BLOCK_K):
        b_k = tl.load(
            p_k + b_row[:, None] * stride_kt + o_d[None, :], mask=m_valid[:, None] & m_d[None, :], other=0.0
        )
        b_v = tl.load(
            p_v + b_row[:, None] * stride_vt + o_dv[None, :], mask=m_valid[:, None] & m_dv[None, :], other=0.0
        )
        b_row_next, m_valid_next = _slot_rows(
            p_index, p_mask, start + BLOCK_K + o_k, NUM_SLOTS, TKV, stride_ik, stride_mk, HAS_MASK
        )
        b_s = tl.where(m_valid, tl.sum(b_k.to(tl.float32) * b_q[None, :], 1), float("-inf"))
        b_m_new = tl.maximum(b_m, tl.max(b_s, 0))
        b_shift = tl.where(b_m_new == float("-inf"), 0.0, b_m_new)
        b_alpha = tl.exp2(b_m - b_shift)
        b_p = tl.exp2(b_s - b_shift)
        b_l = b_l * b_alpha + tl.sum(b_p, 0)
        b_acc = b_acc * b_alpha + tl.sum(b_p[:, None] * b_v.to(tl.float32), 0)
        b_m = b_m_new
        b_row = b_row_next
        m_valid = m_valid_next

    b_out = b_acc / tl.where(b_l > 0, b_l, 1.0)
    b_lse = tl.where(
        b_l > 0, (b_m + tl.log2(tl.where(b_l > 0, b_l, 1.0))) * 0.6931471805599453, float("-inf")
    )
    p_out = OUT + i_b * stride_ob + i_t * stride_ot + i_h * stride_oh + o_dv
    tl.store(p_out, b_out.to(OUT.dtype.element_ty), mask=m_dv)
    tl.store(LSE + (i_b * HQ + i_h) * T + i_t, b_lse)


_sparse_attention_fwd_tuned = triton.autotune(
    configs=_FWD_CONFIGS, key=["HEADS", "D", "DV", "HAS_MASK", "USE_DOT", "Q_DTYPE"]
)(_sparse_attention_fwd_kernel)

_sparse_attention_fwd_row_tuned = triton.autotune(
    configs=_ROW_CONFIGS, key=["D", "DV", "HAS_MASK", "Q_DTYPE"]
)(_sparse_attention_fwd_row_kernel)

# How a query head with its own list (no group to share it) runs: "dot16" (the group kernel
# on the tensor cores, its one row padded to 16), "tile" (the group kernel with one row on the
# CUDA cores, per-slot terms summed after the loop) or "row" (the 1-D gather kernel). Measured
# on an H100 at B1 T8192 H16 D128 k512 (random lists, bf16): dot16 4.8 ms, row 8.4 ms (one
# run), tile 6.0 ms (an earlier run): the products, not the gather, bound the CUDA-core
# versions.
PER_HEAD_KERNEL = "dot16"

# Below this many (program, slot) pairs a launch takes the first config instead of autotuning:
# timing five configs (and compiling each) costs more than small inputs can win back.
AUTOTUNE_MIN_WORK = 1 << 22


def launch(kernel, tuned, configs: list, grid: tuple[int, ...], work: int, **arguments) -> None:
    """``tuned[grid](...)`` for large inputs on a GPU, else ``kernel`` with ``configs[0]``."""
    if work >= AUTOTUNE_MIN_WORK and not interpreter_enabled():
        tuned[grid](**arguments)
        return
    config = configs[0]
    kernel[grid](**arguments, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)


def per_head_kernel(layout: SlotLayout) -> str:
    """``"group"`` for lists shared by a KV group, else :data:`PER_HEAD_KERNEL`."""
    return "group" if layout.shared else PER_HEAD_KERNEL


def precision_of(dtype: torch.dtype) -> str:
    """float32 inputs keep float32 products on the tensor cores (no TF32); the interpreter
    computes every ``tl.dot`` in float32."""
    return "ieee" if dtype == torch.float32 or interpreter_enabled() else "tf32"


def mask_view(indices: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The mask as uint8 (same strides, no copy), or ``indices`` as an unused placeholder."""
    return indices if mask is None else mask.view(torch.uint8)


def unit_last(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` itself when its last dim is packed, else a contiguous copy."""
    return tensor if tensor.stride(-1) == 1 or tensor.shape[-1] <= 1 else tensor.contiguous()


def head_stride(tensor: torch.Tensor) -> int:
    """Stride of the index-head dim; 0 for one list shared by all heads (any stride is legal
    for a size-1 dim, and the kernel indexes it by head)."""
    return 0 if tensor.shape[1] == 1 else tensor.stride(1)


def block_dim(size: int) -> int:
    return max(16, next_power_of_2(size))


@on_input_device
def sparse_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [B, T, Hq, Dv] in q.dtype, lse [B, Hq, T] float32)``; ``indices``/``mask`` 4-D."""
    batch, seq_len, num_q_heads, head_dim = q.shape
    num_keys, value_dim = k.shape[1], v.shape[3]
    out = q.new_empty(batch, seq_len, num_q_heads, value_dim)
    lse = q.new_empty(batch, num_q_heads, seq_len, dtype=torch.float32)
    if out.numel() == 0:
        lse.fill_(float("-inf"))
        return out, lse
    q, k, v = unit_last(q), unit_last(k), unit_last(v)
    layout = slot_layout(q, k, indices)
    mask_arg = mask_view(indices, mask)
    grid = (seq_len, layout.head_programs, batch)
    work = batch * seq_len * layout.head_programs * indices.shape[3]
    arguments = {
        "Q": q,
        "K": k,
        "V": v,
        "INDEX": indices,
        "MASK": mask_arg,
        "OUT": out,
        "LSE": lse,
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
        "stride_ob": out.stride(0),
        "stride_ot": out.stride(1),
        "stride_oh": out.stride(2),
        "T": seq_len,
        "TKV": num_keys,
        "NUM_SLOTS": indices.shape[3],
        "HQ": num_q_heads,
        "qk_scale": scale * LOG2E,
        "GROUP": layout.group,
        "INDEX_DIV": layout.index_div,
        "D": head_dim,
        "DV": value_dim,
        "BLOCK_D": block_dim(head_dim),
        "BLOCK_DV": block_dim(value_dim),
        "HAS_MASK": mask is not None,
        "Q_DTYPE": str(q.dtype),
    }
    kernel = per_head_kernel(layout)
    if kernel == "row":
        launch(
            _sparse_attention_fwd_row_kernel,
            _sparse_attention_fwd_row_tuned,
            _ROW_CONFIGS,
            grid,
            work,
            **arguments,
        )
        return out, lse
    use_dot = kernel != "tile"
    launch(
        _sparse_attention_fwd_kernel,
        _sparse_attention_fwd_tuned,
        _FWD_CONFIGS,
        grid,
        work,
        HEADS=layout.heads,
        BLOCK_H=max(16, next_power_of_2(layout.heads)) if use_dot else 1,
        PRECISION=precision_of(q.dtype),
        DOT_FP32=interpreter_enabled(),
        USE_DOT=use_dot,
        **arguments,
    )
    return out, lse
