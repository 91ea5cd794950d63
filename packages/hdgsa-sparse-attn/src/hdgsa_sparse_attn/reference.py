"""Plain PyTorch sparse attention: the ``torch`` backend, differentiable through autograd.

For query ``t`` and head ``h`` (KV head ``h_kv = h // (Hq // Hkv)``), over the valid slots
``j`` of its index list (``0 <= idx_j < Tkv`` and ``mask_j``)::

    s_j      = scale * <q[t, h], k[idx_j, h_kv]>
    p_j      = exp(s_j - max_j s_j) / sum_j exp(s_j - max_j s_j)
    out[t,h] = sum_j p_j * v[idx_j, h_kv]
    lse[h,t] = log(sum_j exp(s_j))

A row with no valid slot gives ``out = 0`` and ``lse = -inf``. A repeated index is two slots.

:func:`sparse_attention_torch` gathers the selected K/V rows a chunk of queries at a time
(the chunk sized from :data:`WORKSPACE_BYTES`), computes in float32, and recomputes each
chunk in the backward (activation checkpointing), so memory stays bounded in both passes.
:func:`sparse_attention_dense` is the same math written densely (``[T, Tkv]`` scores weighted
by how many times each key was selected): an independent formulation for tests.

Neither function checks its arguments; :func:`hdgsa_sparse_attn.sparse_attention` does.
:func:`sparse_attention_torch` and :func:`attend_chunk` turn autocast off: under
``torch.autocast`` the matmuls would otherwise run in bfloat16 / float16 instead of float32, and
the chunks' outputs (in the inputs' dtype) could not be joined in a region of the other half dtype.
The matmuls' backward turns it off too (a backward called inside an autocast region runs in it).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint

from hdgsa_core import autocast_disabled

__all__ = [
    "WORKSPACE_BYTES",
    "attend_chunk",
    "normalize_indices",
    "query_chunk_size",
    "sparse_attention_dense",
    "sparse_attention_torch",
]

# Gathered K/V rows and scores of one query chunk, in bytes. 256 MiB keeps the eager gather
# near its best speed on a GPU (chunks of ~30 queries at Hq=16, K=512, D=128) while staying
# small next to any model's activations.
WORKSPACE_BYTES = 256 * 2**20


def normalize_indices(
    indices: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``[B, T, K]`` -> ``[B, 1, T, K]`` views (indices and mask); 4-D inputs pass through."""
    if indices.dim() == 3:
        indices = indices.unsqueeze(1)
        mask = None if mask is None else mask.unsqueeze(1)
    return indices, mask


def _head_split(num_index_heads: int, num_q_heads: int, num_kv_heads: int) -> tuple[int, int]:
    """``(N, Gi)``: index heads as ``[N, Gi]`` over ``[Hkv, G]`` (Gi is G or 1, N is Hkv or 1)."""
    group = num_q_heads // num_kv_heads
    if num_index_heads == num_kv_heads:  # per KV head (also Hq == Hkv per query head)
        return num_kv_heads, 1
    if num_index_heads == num_q_heads:  # per query head
        return num_kv_heads, group
    return 1, 1  # shared by all heads


def query_chunk_size(
    batch: int,
    num_q_heads: int,
    num_kv_heads: int,
    num_index_heads: int,
    topk: int,
    head_dim: int,
    value_dim: int,
    workspace_bytes: int = WORKSPACE_BYTES,
) -> int:
    """How many queries one chunk holds so that its workspace fits ``workspace_bytes``.

    Per query: the gathered K and V rows in float32 (``B * Hkv * Gi * K * (D + Dv)``, ``Gi``
    being the query heads that own an index list within a KV group: ``G`` for per-query-head
    indices, else 1), their int64 gather indices, and a few ``[B, Hq, K]`` float32 buffers
    (scores, probabilities, masks).
    """
    _, lists_per_group = _head_split(num_index_heads, num_q_heads, num_kv_heads)
    gathered = batch * num_kv_heads * lists_per_group * topk * (head_dim + value_dim + 6) * 4
    scores = 4 * batch * num_q_heads * topk * 4
    per_query = max(gathered + scores, 1)
    return max(1, workspace_bytes // per_query)


class _Float32MatMul(torch.autograd.Function):
    """``torch.matmul(a, b)`` whose backward also runs with autocast off: autograd runs a
    backward in the autocast state of the code that calls it, so a ``.backward()`` inside an
    autocast region would otherwise take the gradients' matmuls in bfloat16 / float16. Its
    backward is itself differentiable (plain matmuls)."""

    @staticmethod
    def forward(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.matmul(a, b)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        a, b = ctx.saved_tensors
        grad_a = grad_b = None
        with autocast_disabled(grad.device):
            if ctx.needs_input_grad[0]:
                grad_a = torch.matmul(grad, b.mT)
            if ctx.needs_input_grad[1]:
                grad_b = torch.matmul(a.mT, grad)
        return grad_a, grad_b


def attend_chunk(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    num_valid_keys: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One query chunk. ``q`` ``[B, Tc, Hq, D]`` and ``k``/``v`` ``[B, Tkv', Hkv, *]`` in the
    compute dtype (``Tkv' >= 1``); ``indices``/``mask`` ``[B, Hi, Tc, K]``; keys at or past
    ``num_valid_keys`` are masked. Returns ``out`` ``[B, Tc, Hq, Dv]`` and ``lse`` ``[B, Tc, Hq]``.
    Autocast is off inside: the math runs in the dtype of ``q``, ``k``, ``v``."""
    batch, chunk, num_q_heads, _ = q.shape
    num_kv_heads = k.shape[2]
    num_lists, lists_per_group = _head_split(indices.shape[1], num_q_heads, num_kv_heads)
    group = num_q_heads // num_kv_heads
    topk = indices.shape[-1]

    # [B, Hi, Tc, K] -> [B, Tc, N, Gi, K]: the list that each (KV head, query head) reads.
    # Copied to a contiguous int64 tensor (K entries per row, small next to the gathered
    # rows): every tensor derived from it then has the layout of the scores (torch.compile's
    # stride propagation relies on that), and all gather indices share one dtype.
    slots = indices.unflatten(1, (num_lists, lists_per_group)).permute(0, 3, 1, 2, 4).contiguous().long()
    valid = (slots >= 0) & (slots < num_valid_keys)
    if mask is not None:
        valid = valid & mask.unflatten(1, (num_lists, lists_per_group)).permute(0, 3, 1, 2, 4).contiguous()
    # Masked slots read row 0 (in range) and are zeroed below; no per-query-head copy of K/V.
    rows = torch.where(valid, slots, torch.zeros((), dtype=slots.dtype, device=slots.device))
    batch_ids = torch.arange(batch, device=q.device).view(batch, 1, 1, 1, 1)
    head_ids = torch.arange(num_kv_heads, device=q.device).view(1, 1, num_kv_heads, 1, 1)
    k_sel = k[batch_ids, rows, head_ids]  # [B, Tc, Hkv, Gi, K, D]
    v_sel = v[batch_ids, rows, head_ids]  # [B, Tc, Hkv, Gi, K, Dv]

    with autocast_disabled(q.device):
        # Query heads of a KV group that share one list form the rows of one small matmul.
        q_groups = q.unflatten(2, (num_kv_heads, lists_per_group, group // lists_per_group))
        scores = _Float32MatMul.apply(q_groups, k_sel.transpose(-1, -2)) * scale  # [B, Tc, Hkv, Gi, G/Gi, K]
        scores = scores.masked_fill(~valid.unsqueeze(4), -math.inf)
        if topk > 0:
            row_max = scores.detach().amax(-1, keepdim=True)
        else:
            row_max = scores.new_full((*scores.shape[:-1], 1), -math.inf)
        # The max only shifts the exponent (it cancels in out and lse): detached, and 0 for an
        # empty row so that exp(-inf - 0) = 0 instead of exp(-inf + inf) = NaN.
        row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
        weights = torch.exp(scores - row_max)
        total = weights.sum(-1, keepdim=True)
        nonempty = total > 0
        safe_total = torch.where(nonempty, total, torch.ones_like(total))
        out = _Float32MatMul.apply(weights, v_sel) / safe_total  # [B, Tc, Hkv, Gi, G/Gi, Dv]
        lse = torch.where(nonempty, row_max + torch.log(safe_total), torch.full_like(total, -math.inf))
        return out.reshape(batch, chunk, num_q_heads, v.shape[-1]), lse.reshape(batch, chunk, num_q_heads)


def sparse_attention_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    *,
    chunk_size: int | None = None,
    chunk_fn: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse attention by a chunked gather (the formula in the module docstring).

    Args:
        q: ``[B, T, Hq, D]``.
        k: ``[B, Tkv, Hkv, D]``.
        v: ``[B, Tkv, Hkv, Dv]``.
        indices: ``[B, Hi, T, K]`` (``Hi`` in {1, Hkv, Hq}) or ``[B, T, K]``, int32/int64.
            Negative or ``>= Tkv`` entries are masked slots.
        mask: bool like ``indices`` (True = attend), or None.
        scale: score scale; None means ``D ** -0.5``.
        chunk_size: queries per chunk; None sizes chunks from :data:`WORKSPACE_BYTES`.
        chunk_fn: computes one chunk; None is :func:`attend_chunk` (the benchmark passes a
            ``torch.compile``-d copy of it).

    Returns:
        ``(out, lse)``: ``[B, T, Hq, Dv]`` in ``q.dtype`` and ``[B, Hq, T]`` float32 (float64
        for float64 inputs; math runs in float32, or float64 for float64 inputs).
    """
    indices, mask = normalize_indices(indices, mask)
    batch, seq_len, num_q_heads, head_dim = q.shape
    num_keys, num_kv_heads = k.shape[1], k.shape[2]
    if scale is None:
        scale = head_dim**-0.5
    # Autocast off for the whole computation, not only each chunk's math: torch.cat of the
    # chunks' float16 outputs inside a bfloat16 region (or bfloat16 in float16) is an error.
    with autocast_disabled(q.device):
        compute_dtype = torch.promote_types(q.dtype, torch.float32)
        k_c, v_c = k.to(compute_dtype), v.to(compute_dtype)
        if num_keys == 0:
            # Every slot is masked; one zero row keeps the gather in range and the grads connected.
            k_c = torch.cat([k_c, k_c.new_zeros(batch, 1, num_kv_heads, k.shape[3])], 1)
            v_c = torch.cat([v_c, v_c.new_zeros(batch, 1, num_kv_heads, v.shape[3])], 1)
        chunk_fn = attend_chunk if chunk_fn is None else chunk_fn
        if chunk_size is None:
            chunk_size = query_chunk_size(
                batch, num_q_heads, num_kv_heads, indices.shape[1], indices.shape[-1], head_dim, v.shape[3]
            )
        # Recompute each chunk in the backward so its gathered rows are not all kept alive.
        recompute = (
            torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)) and seq_len > chunk_size
        )
        outs, lses = [], []
        for start in range(0, seq_len, chunk_size) or [0]:
            stop = start + chunk_size
            args = (
                q[:, start:stop].to(compute_dtype),
                k_c,
                v_c,
                indices[:, :, start:stop],
                None if mask is None else mask[:, :, start:stop],
                scale,
                num_keys,
            )
            if recompute:
                out, lse = checkpoint(chunk_fn, *args, use_reentrant=False)
            else:
                out, lse = chunk_fn(*args)
            outs.append(out.to(q.dtype))
            lses.append(lse)
        out = outs[0] if len(outs) == 1 else torch.cat(outs, 1)
        lse = lses[0] if len(lses) == 1 else torch.cat(lses, 1)
        return out, lse.transpose(1, 2).contiguous()


def sparse_attention_dense(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same math through dense ``[T, Tkv]`` scores, for tests (``O(T * Tkv)`` memory).

    Each key's weight is multiplied by the number of valid slots that select it, so a
    repeated index counts as often as it appears: ``p[t, s] = c[t, s] * exp(score[t, s]) /
    sum_s c[t, s] * exp(score[t, s])``. Computes in the inputs' dtype (pass float64).
    Returns ``(out [B, T, Hq, Dv], lse [B, Hq, T])``.
    """
    indices, mask = normalize_indices(indices, mask)
    batch, seq_len, num_q_heads, head_dim = q.shape
    num_keys, num_kv_heads = k.shape[1], k.shape[2]
    if scale is None:
        scale = head_dim**-0.5
    group = num_q_heads // num_kv_heads
    valid = (indices >= 0) & (indices < num_keys)
    if mask is not None:
        valid = valid & mask
    counts = torch.zeros(*indices.shape[:3], num_keys + 1, dtype=q.dtype, device=q.device)
    # Invalid slots count into the spare column num_keys, dropped after.
    column = torch.where(valid, indices, torch.full_like(indices, num_keys)).long()
    counts.scatter_add_(-1, column, valid.to(q.dtype))
    counts = counts[..., :num_keys]
    if counts.shape[1] != num_q_heads and counts.shape[1] == num_kv_heads:
        counts = counts.repeat_interleave(group, dim=1)  # a list per KV head -> its query heads
    counts = counts.expand(batch, num_q_heads, seq_len, num_keys)  # [B, Hq, T, Tkv]

    k_heads = k.repeat_interleave(group, dim=2)  # [B, Tkv, Hq, D]
    v_heads = v.repeat_interleave(group, dim=2)
    scores = scale * torch.einsum("bthd,bshd->bhts", q, k_heads)
    scores = scores.masked_fill(counts == 0, -math.inf)
    row_max = (
        scores.detach().amax(-1, keepdim=True)
        if num_keys > 0
        else scores.new_zeros(batch, num_q_heads, seq_len, 1)
    )
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = counts * torch.exp(scores - row_max)
    total = weights.sum(-1, keepdim=True)
    nonempty = total > 0
    safe_total = torch.where(nonempty, total, torch.ones_like(total))
    out = torch.einsum("bhts,bshd->bthd", weights / safe_total, v_heads)
    lse = torch.where(nonempty, row_max + torch.log(safe_total), torch.full_like(total, -math.inf))
    return out, lse.squeeze(-1)
