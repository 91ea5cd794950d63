"""Triton forward kernels of the gated indexer: dense scores and scores at chosen keys.

Both compute, per query ``t``, key ``s`` and head ``h``, ``z = scale * <q[t, h], k[s]> + bias[h]``
with ``tl.dot`` (float32 accumulation) and add ``sigmoid(w[t, h]) * sigmoid(z)`` over the heads
in registers. The key gate ``sigmoid(z)`` is the expensive part (special-function unit, not the
matmul): by default it is ``1 / (1 + exp(-z))`` (float32-accurate); with ``FAST_TANH`` (a
constexpr, set only for bfloat16 / float16 inputs on a GPU) it is ``0.5 + 0.5 * tanh(z / 2)``
with one ``tanh.approx.f32`` instruction, the ``0.5 * sum_h sigmoid(w_h)`` part hoisted out of
the head loop.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hdgsa_core import interpreter_enabled
from hdgsa_core.launch import CachedLauncher
from hdgsa_core.triton_utils import cdiv, next_power_of_2, on_input_device

__all__ = [
    "SCORE_TILE",
    "dot_options",
    "gated_indexer_fwd",
    "indexer_scores_at_fwd",
    "input_strides",
    "score_tile",
]

# Score tiles: 64 queries x 64 keys, 4 warps. The top-k path reuses this kernel (and so these
# tiles), so its scores are bitwise the dense forward's.
SCORE_TILE = (64, 64, 4)  # BLOCK_M, BLOCK_N, num_warps
_BLOCK_M, _BLOCK_N, _NUM_WARPS = SCORE_TILE
# indexer_scores_at: one query per program, its slots 128 at a time (5.9 ms against 7.1 ms for
# 64 at B1 T131072 H4 d64 K2048 on an H100; 8 warps: 9.3 ms); L2 eviction hints (neutral there:
# random keys; they keep the gathered rows of overlapping selections).
_BLOCK_K = 128
_HINTS = True
_AT_NUM_WARPS = 4

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def dot_options(q: torch.Tensor, k: torch.Tensor, fast_ok: bool = True) -> tuple[bool, bool]:
    """``(DOT_FP32, FAST_TANH)``: multiply in float32 (IEEE) unless q and k share a 16-bit
    dtype and the kernels are compiled (the interpreter's ``tl.dot`` multiplies bfloat16's raw
    bits, and a product of two 16-bit floats is exact in float32 anyway); use ``tanh.approx``
    only for compiled 16-bit kernels (the interpreter cannot run inline assembly)."""
    low = q.dtype == k.dtype and q.dtype in _LOW_PRECISION and not interpreter_enabled()
    return (not low), (low and fast_ok)


def input_strides(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, bias: torch.Tensor) -> dict[str, int]:
    """The strides every kernel takes for ``q`` ``[B, Tq, H, d]``, ``k`` ``[B, Tkv, d]``,
    ``w`` ``[B, Tq, H]`` and ``bias`` ``[H]`` (the last dims of ``q`` and ``k`` have stride 1)."""
    return {
        "stride_qb": q.stride(0),
        "stride_qt": q.stride(1),
        "stride_qh": q.stride(2),
        "stride_kb": k.stride(0),
        "stride_kt": k.stride(1),
        "stride_wb": w.stride(0),
        "stride_wt": w.stride(1),
        "stride_wh": w.stride(2),
        "stride_bias": bias.stride(0),
    }


@triton.jit
def _tanh_approx(x):
    return tl.inline_asm_elementwise(
        "tanh.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1
    )


@triton.jit
def _head_dot(b_a, b_b, DOT_FP32: tl.constexpr):
    """``b_a @ b_b.T`` in float32 (IEEE products for float32 or mixed inputs)."""
    if DOT_FP32:
        return tl.dot(b_a.to(tl.float32), tl.trans(b_b.to(tl.float32)), input_precision="ieee")
    return tl.dot(b_a, tl.trans(b_b))


@triton.jit
def _key_gate(b_z, FAST_TANH: tl.constexpr):
    """``sigmoid(z)`` exactly enough for float32, or (FAST_TANH) ``tanh(z / 2)``."""
    if FAST_TANH:
        return _tanh_approx(0.5 * b_z)
    return 1.0 / (1.0 + tl.exp(-b_z))


@triton.jit
def score_tile(
    p_q,
    p_w,
    bias,
    b_k,
    m_m,
    m_d,
    stride_qh,
    stride_wh,
    stride_bias,
    scale,
    H: tl.constexpr,
    DOT_FP32: tl.constexpr,
    FAST_TANH: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Unmasked float32 scores of a query block (``p_q`` ``[BLOCK_M, BLOCK_D]`` pointers to
    head 0, ``p_w`` ``[BLOCK_M]``) against a key tile ``b_k`` ``[BLOCK_N, BLOCK_D]``. The one
    score computation of the backend: the dense forward and the top-k both call it with the
    same tiles, so their scores agree bitwise."""
    b_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    b_half_gates = tl.zeros([BLOCK_M], dtype=tl.float32)
    for h in range(H):
        b_q = tl.load(p_q + h * stride_qh, mask=m_m[:, None] & m_d[None, :], other=0.0)
        b_w = tl.load(p_w + h * stride_wh, mask=m_m, other=0.0).to(tl.float32)
        b_bias = tl.load(bias + h * stride_bias).to(tl.float32)
        b_gate = 1.0 / (1.0 + tl.exp(-b_w))
        b_z = _head_dot(b_q, b_k, DOT_FP32) * scale + b_bias
        if FAST_TANH:
            # sigmoid(z) = 0.5 + 0.5 tanh(z / 2): the 0.5 * gate part is added once below.
            b_acc += (0.5 * b_gate)[:, None] * _key_gate(b_z, FAST_TANH)
            b_half_gates += 0.5 * b_gate
        else:
            b_acc += b_gate[:, None] * _key_gate(b_z, FAST_TANH)
    if FAST_TANH:
        b_acc += b_half_gates[:, None]
    return b_acc


@triton.jit(do_not_specialize=["Tq", "Tkv", "q_offset"])
def _gated_indexer_fwd_kernel(
    q,
    k,
    w,
    bias,
    out,
    stride_qb,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_wb,
    stride_wt,
    stride_wh,
    stride_bias,
    stride_ob,
    stride_ot,
    Tq,
    Tkv,
    q_offset,
    scale,
    H: tl.constexpr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    DOT_FP32: tl.constexpr,
    FAST_TANH: tl.constexpr,
    EVEN_N: tl.constexpr,
):
    i_m, i_n, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    o_d = tl.arange(0, BLOCK_D)
    m_m, m_n, m_d = o_m < Tq, o_n < Tkv, o_d < D
    i_b64 = i_b.to(tl.int64)
    p_out = out + i_b64 * stride_ob + o_m.to(tl.int64)[:, None] * stride_ot + o_n[None, :]
    # With EVEN_N the store mask is constant along the keys: vector stores.
    m_out = m_m[:, None] if EVEN_N else m_m[:, None] & m_n[None, :]
    # With causal, a tile whose first key is past its last query's last key is all -inf:
    # write it without loading anything.
    skipped = False
    if CAUSAL:
        skipped = i_n * BLOCK_N > i_m * BLOCK_M + BLOCK_M - 1 + q_offset
    if skipped:
        tl.store(p_out, tl.full([BLOCK_M, BLOCK_N], float("-inf"), tl.float32), mask=m_out)
    else:
        p_k = k + i_b64 * stride_kb + o_n.to(tl.int64)[:, None] * stride_kt + o_d[None, :]
        b_k = tl.load(p_k, mask=m_n[:, None] & m_d[None, :], other=0.0)
        p_q = q + i_b64 * stride_qb + o_m.to(tl.int64)[:, None] * stride_qt + o_d[None, :]
        p_w = w + i_b64 * stride_wb + o_m.to(tl.int64) * stride_wt
        b_acc = score_tile(
            p_q,
            p_w,
            bias,
            b_k,
            m_m,
            m_d,
            stride_qh,
            stride_wh,
            stride_bias,
            scale,
            H,
            DOT_FP32,
            FAST_TANH,
            BLOCK_M,
            BLOCK_N,
        )
        # Only tiles that cross the diagonal have masked entries.
        if CAUSAL and i_n * BLOCK_N + BLOCK_N - 1 > i_m * BLOCK_M + q_offset:
            b_acc = tl.where(o_n[None, :] <= o_m[:, None] + q_offset, b_acc, float("-inf"))
        tl.store(p_out, b_acc, mask=m_out)


_fwd_launcher = CachedLauncher(_gated_indexer_fwd_kernel)


@on_input_device
def gated_indexer_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor,
    scale: float,
    causal: bool,
    q_offset: int,
    fast: bool = True,
) -> torch.Tensor:
    """Scores ``[B, Tq, Tkv]`` float32 (``-inf`` above the causal diagonal)."""
    batch, num_queries, heads, dim = q.shape
    num_keys = k.shape[1]
    out = torch.empty(batch, num_queries, num_keys, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out
    if heads == 0 or dim == 0:  # no head (0 everywhere) or empty dot products (sigmoid(bias))
        scores = (torch.sigmoid(w.float()) @ torch.sigmoid(bias.float()))[..., None].expand_as(out)
        out.copy_(scores if heads else torch.zeros_like(out))
        if causal:
            keys = torch.arange(num_keys, device=q.device)
            rows = torch.arange(num_queries, device=q.device)[:, None] + q_offset
            out.masked_fill_(keys[None, :] > rows, float("-inf"))
        return out
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    dot_fp32, fast_tanh = dot_options(q, k, fast)
    grid = (cdiv(num_queries, _BLOCK_M), cdiv(num_keys, _BLOCK_N), batch)
    _fwd_launcher(
        grid,
        q=q,
        k=k,
        w=w,
        bias=bias,
        out=out,
        **input_strides(q, k, w, bias),
        stride_ob=out.stride(0),
        stride_ot=out.stride(1),
        Tq=num_queries,
        Tkv=num_keys,
        q_offset=q_offset,
        scale=float(scale),
        H=heads,
        D=dim,
        BLOCK_D=max(16, next_power_of_2(dim)),
        BLOCK_M=_BLOCK_M,
        BLOCK_N=_BLOCK_N,
        CAUSAL=causal,
        DOT_FP32=dot_fp32,
        FAST_TANH=fast_tanh,
        EVEN_N=num_keys % _BLOCK_N == 0,
        num_warps=_NUM_WARPS,
    )
    return out


@triton.jit
def _gather_rows(p_rows, mask, HINTS: tl.constexpr):
    """Gathered key rows: kept in L2 (``evict_last``) with ``HINTS``, as every slot of every
    query reads them again."""
    if HINTS:
        return tl.load(p_rows, mask=mask, other=0.0, eviction_policy="evict_last")
    return tl.load(p_rows, mask=mask, other=0.0)


@triton.jit
def _stream(p, mask, other, HINTS: tl.constexpr):
    """A load read once (indices, score gradients): ``evict_first`` with ``HINTS``."""
    if HINTS:
        return tl.load(p, mask=mask, other=other, eviction_policy="evict_first")
    return tl.load(p, mask=mask, other=other)


@triton.jit(do_not_specialize=["Tq", "K"])
def _indexer_scores_at_fwd_kernel(
    q,
    k,
    w,
    bias,
    indices,
    out,
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
    stride_ob,
    stride_ot,
    Tq,
    K,
    scale,
    H: tl.constexpr,
    D: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_FP32: tl.constexpr,
    FAST_TANH: tl.constexpr,
    HINTS: tl.constexpr,
):
    i_t, i_b = tl.program_id(0), tl.program_id(1).to(tl.int64)
    o_h = tl.arange(0, BLOCK_H)
    o_d = tl.arange(0, BLOCK_D)
    m_h, m_d = o_h < H, o_d < D
    p_q = q + i_b * stride_qb + i_t * stride_qt + o_h[:, None] * stride_qh + o_d[None, :]
    b_q = tl.load(p_q, mask=m_h[:, None] & m_d[None, :], other=0.0)
    b_w = tl.load(w + i_b * stride_wb + i_t * stride_wt + o_h * stride_wh, mask=m_h, other=0.0)
    # Padded heads get gate 0: they add nothing.
    b_gate = tl.where(m_h, 1.0 / (1.0 + tl.exp(-b_w.to(tl.float32))), 0.0)
    if FAST_TANH:  # sum_h g_h sigmoid(z_h) = sum_h 0.5 g_h tanh(z_h / 2) + sum_h 0.5 g_h
        b_gate = 0.5 * b_gate
        b_const = tl.sum(b_gate, 0)
    b_bias = tl.load(bias + o_h * stride_bias, mask=m_h, other=0.0).to(tl.float32)
    p_i = indices + i_b * stride_ib + i_t * stride_it
    p_o = out + i_b * stride_ob + i_t * stride_ot
    for j0 in range(0, K, BLOCK_K):
        o_j = j0 + tl.arange(0, BLOCK_K)
        m_j = o_j < K
        b_idx = _stream(p_i + o_j, m_j, -1, HINTS).to(tl.int64)
        m_valid = b_idx >= 0
        p_k = k + i_b * stride_kb + tl.maximum(b_idx, 0)[:, None] * stride_kt + o_d[None, :]
        b_k = _gather_rows(p_k, m_valid[:, None] & m_d[None, :], HINTS)
        b_z = _head_dot(b_q, b_k, DOT_FP32) * scale + b_bias[:, None]
        b_s = tl.sum(b_gate[:, None] * _key_gate(b_z, FAST_TANH), 0)
        if FAST_TANH:
            b_s += b_const
        tl.store(p_o + o_j, tl.where(m_valid, b_s, float("-inf")), mask=m_j)


_at_fwd_launcher = CachedLauncher(_indexer_scores_at_fwd_kernel)


@on_input_device
def indexer_scores_at_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor,
    indices: torch.Tensor,
    scale: float,
    fast: bool = True,
) -> torch.Tensor:
    """Scores at the given keys ``[B, Tq, K]`` float32; ``-inf`` at negative slots."""
    batch, num_queries, heads, dim = q.shape
    out = torch.empty(indices.shape, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out
    if heads == 0 or dim == 0:
        value = (
            torch.sigmoid(w.float()) @ torch.sigmoid(bias.float())
            if heads
            else torch.zeros_like(w[..., 0], dtype=torch.float32)
        )
        out.copy_(value[..., None].expand_as(out).masked_fill(indices < 0, float("-inf")))
        return out
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    indices = indices if indices.stride(-1) == 1 else indices.contiguous()
    dot_fp32, fast_tanh = dot_options(q, k, fast)
    _at_fwd_launcher(
        (num_queries, batch),
        q=q,
        k=k,
        w=w,
        bias=bias,
        indices=indices,
        out=out,
        **input_strides(q, k, w, bias),
        stride_ib=indices.stride(0),
        stride_it=indices.stride(1),
        stride_ob=out.stride(0),
        stride_ot=out.stride(1),
        Tq=num_queries,
        K=indices.shape[-1],
        scale=float(scale),
        H=heads,
        D=dim,
        BLOCK_H=max(16, next_power_of_2(heads)),
        BLOCK_D=max(16, next_power_of_2(dim)),
        BLOCK_K=_BLOCK_K,
        DOT_FP32=dot_fp32,
        FAST_TANH=fast_tanh,
        HINTS=_HINTS,
        num_warps=_AT_NUM_WARPS,
    )
    return out
