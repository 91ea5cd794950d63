"""Plain PyTorch gated indexer: the ``backend="torch"`` implementation (like fla's ``naive.py``).

Scores (``[B, Tq, Tkv]``), for query ``t``, key ``s``::

    score[b, t, s] = sum_h sigmoid(w[b, t, h]) * sigmoid(scale * <q[b, t, h], k[b, s]> + bias[h])

and, with ``causal``, ``score[b, t, s] = -inf`` for ``s > t + q_offset``.

:func:`gated_indexer_reference` builds the whole matrix and is differentiable through
autograd. :func:`indexer_topk_reference` never builds it: it walks the queries in chunks,
scores one chunk against the keys it can see, selects that chunk's top-k and moves on, so
its extra memory is the ``[B, Tq, topk]`` outputs plus one chunk's bounded workspace.

Both compute in float32 (float64 when given float64, which the tests use as the reference)
and share :func:`_chunk_scores`, so the two paths do the same arithmetic. Both turn autocast
off: under ``torch.autocast`` the matmuls would otherwise run in bfloat16 / float16 and the
scores come back in that dtype instead of float32.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from hdgsa_core import autocast_disabled

# (q_rows, k_rows, w_rows, bias, scale, causal, q_offset) -> masked float32 scores [B, C, S].
ChunkScores = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float, bool, int], torch.Tensor
]

__all__ = [
    "DEFAULT_WORKSPACE_BYTES",
    "chunk_sizes",
    "gated_indexer_reference",
    "indexer_scores_at_reference",
    "indexer_topk_reference",
    "valid_key_counts",
]

# Workspace that one query chunk of indexer_topk may use. 256 MiB keeps the chunks large enough
# for the matmul and torch.topk to run at speed on a GPU (about 680 queries per chunk at Tkv = 8,192,
# H = 4) while staying small next to the [B, Tq, Tkv] matrix it replaces (1 GiB at T = 16,384).
DEFAULT_WORKSPACE_BYTES = 256 * 2**20

# Workspace bytes per (batch, query, key) triple in one chunk, besides 4 per head for the head
# logits: the float32 score row (4), its int64 sort key and the temporaries that build it (16),
# torch.topk's scratch (about 12). An estimate: the budget bounds the chunk, not each byte.
_BYTES_PER_KEY = 32
_BYTES_PER_HEAD_KEY = 4

_INT32_LOW_MASK = 0xFFFFFFFF
_INT32_MAGNITUDE_BITS = 0x7FFFFFFF
_INT64_MAX = 2**63 - 1


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float32 for float32/float16/bfloat16 inputs, float64 if any input is float64."""
    dtype = torch.float32
    for tensor in tensors:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def valid_key_counts(
    num_queries: int, num_keys: int, causal: bool, q_offset: int, device: torch.device
) -> torch.Tensor:
    """Number of keys each query may see, int64 ``[Tq]``.

    The valid keys of query ``t`` are always the prefix ``0 .. n[t] - 1``:
    ``n[t] = clamp(t + q_offset + 1, 0, Tkv)`` with ``causal``, else ``Tkv``.
    """
    positions = torch.arange(num_queries, device=device, dtype=torch.int64)
    if not causal:
        return torch.full_like(positions, num_keys)
    return (positions + (q_offset + 1)).clamp_(0, num_keys)


def _chunk_scores(
    q_rows: torch.Tensor,
    k_compute: torch.Tensor,
    w_rows: torch.Tensor,
    bias_compute: torch.Tensor,
    scale: float,
    compute_dtype: torch.dtype,
) -> torch.Tensor:
    """Unmasked scores of some queries against some keys, ``[B, C, S]`` in ``compute_dtype``.

    ``q_rows`` ``[B, C, H, d]``, ``k_compute`` ``[B, S, d]`` (already in ``compute_dtype``),
    ``w_rows`` ``[B, C, H]``, ``bias_compute`` ``[H]``. Differentiable; out of place, so the
    same code serves the autograd path and the no-grad top-k path. Autocast is off inside, so
    the matmuls run in ``compute_dtype`` even in a caller's ``torch.autocast`` region.
    """
    batch, rows, heads, dim = q_rows.shape
    num_keys = k_compute.shape[1]
    with autocast_disabled(q_rows.device):
        # One matmul for all heads: [B, C*H, d] @ [B, d, S]. reshape copies only if q's layout needs it.
        q_flat = q_rows.to(compute_dtype).reshape(batch, rows * heads, dim)
        logits = torch.matmul(q_flat, k_compute.transpose(1, 2)).view(batch, rows, heads, num_keys)
        if torch.is_grad_enabled():
            key_gates = torch.sigmoid(logits * scale + bias_compute[:, None])
        else:
            # The top-k path: one [B, C, H, S] buffer instead of three (same arithmetic).
            key_gates = logits.mul_(scale).add_(bias_compute[:, None]).sigmoid_()
        head_gates = torch.sigmoid(w_rows.to(compute_dtype))
        # Sum over heads as a batched [1, H] @ [H, S] product.
        return torch.matmul(head_gates.unsqueeze(-2), key_gates).squeeze(-2)


def gated_indexer_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor,
    scale: float = 1.0,
    causal: bool = True,
    q_offset: int = 0,
) -> torch.Tensor:
    """Gated indexer scores ``[B, Tq, Tkv]`` (float32; float64 for float64 inputs).

    ``score[b, t, s] = sum_h sigmoid(w[b, t, h]) * sigmoid(scale * <q[b, t, h], k[b, s]> + bias[h])``;
    with ``causal``, keys ``s > t + q_offset`` get ``-inf``. The mask is applied after the
    scores are computed (``masked_fill``), so masked entries pass zero gradient and no NaN.

    Args:
        q: ``[B, Tq, H, d]``. k: ``[B, Tkv, d]``. w: ``[B, Tq, H]``. bias: ``[H]``.
        scale: multiplies the dot products. causal: mask keys after ``t + q_offset``.
        q_offset: position of query 0 among the keys (``Tkv - Tq`` when decoding).
    """
    compute_dtype = _compute_dtype(q, k, w, bias)
    scores = _chunk_scores(q, k.to(compute_dtype), w, bias.to(compute_dtype), scale, compute_dtype)
    if causal:
        num_queries, num_keys = q.shape[1], k.shape[1]
        counts = valid_key_counts(num_queries, num_keys, causal, q_offset, q.device)
        keys = torch.arange(num_keys, device=q.device)
        scores = scores.masked_fill(keys[None, :] >= counts[:, None], float("-inf"))
    return scores


def chunk_sizes(
    batch: int, num_keys: int, heads: int, workspace_bytes: int = DEFAULT_WORKSPACE_BYTES
) -> tuple[int, int]:
    """``(batches, queries)`` per chunk so one chunk's workspace fits ``workspace_bytes``.

    One query of one batch element needs about ``Tkv * (4 * H + 32)`` bytes of workspace: the
    head logits, the score row, its sort key and ``torch.topk``'s scratch. A chunk takes every
    batch element and as many queries as fit; if one query over all batch elements does not
    fit, it takes one query of as many batch elements as fit. Never less than one query of one
    batch element, so the workspace is at most ``max(workspace_bytes, Tkv * (4 * H + 32))``.
    """
    per_row = max(1, num_keys * (_BYTES_PER_HEAD_KEY * heads + _BYTES_PER_KEY))
    rows = max(1, workspace_bytes // per_row)
    if rows >= batch:
        return batch, max(1, rows // max(batch, 1))
    return rows, 1


def _float_sort_key(values: torch.Tensor) -> torch.Tensor:
    """int64 whose order is the order of the float32 ``values`` (-inf lowest, +inf highest)."""
    # -0.0 + 0.0 = +0.0, so the two zeros get one key and tie like the floats do.
    bits = (values.to(torch.float32) + 0.0).view(torch.int32)
    # Negative floats: larger magnitude means smaller value, so flip their magnitude bits
    # (bits >> 31 is all ones for negatives, zero otherwise).
    bits ^= (bits >> 31) & _INT32_MAGNITUDE_BITS
    return bits.to(torch.int64)


def _select_topk(
    scores: torch.Tensor, topk: int, sink_size: int, counts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of masked score rows with the tie rule and sinks; ``[B, C, topk]`` int32/float32.

    ``scores`` ``[B, C, S]`` (invalid keys already ``-inf``), ``counts`` ``[C]`` valid keys per
    row (a prefix). Each key gets a distinct int64 sort key: the score's order in the high 32
    bits, the reversed key index in the low 32 bits (so ties go to the lower index); sinks get
    the largest keys, in key order. All keys are distinct, so ``torch.topk``'s result is
    unique and deterministic.
    """
    batch, rows, num_keys = scores.shape
    keys = torch.arange(num_keys, device=scores.device, dtype=torch.int64)
    sort_key = _float_sort_key(scores)
    sort_key <<= 32
    sort_key |= _INT32_LOW_MASK - keys
    if sink_size > 0:
        # Sinks are the leading keys: above every score, in key order.
        sort_key[..., :sink_size] = _INT64_MAX - keys[:sink_size]
    taken = min(topk, num_keys)
    best = torch.topk(sort_key, taken, dim=-1, largest=True, sorted=True).values
    indices = _INT32_LOW_MASK - (best & _INT32_LOW_MASK)
    selected = torch.gather(scores, -1, indices).to(torch.float32)
    # Slots past the number of valid keys: index -1, score -inf.
    slot = torch.arange(taken, device=scores.device)
    empty = slot[None, :] >= counts[:, None]
    indices = indices.masked_fill(empty, -1).to(torch.int32)
    selected = selected.masked_fill(empty, float("-inf"))
    if taken < topk:
        pad = (batch, rows, topk - taken)
        indices = torch.cat([indices, indices.new_full(pad, -1)], dim=-1)
        selected = torch.cat([selected, selected.new_full(pad, float("-inf"))], dim=-1)
    return indices, selected


def _row_stats(scores: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and population variance of the valid scores of each row (two passes); 0 and 0 for
    a row with no valid key."""
    num_keys = scores.shape[-1]
    valid = torch.arange(num_keys, device=scores.device)[None, :] < counts[:, None]
    denominator = counts.clamp(min=1).to(scores.dtype)
    mean = torch.where(valid, scores, 0.0).sum(-1) / denominator
    centered = torch.where(valid, scores - mean[..., None], 0.0)
    var = centered.square().sum(-1) / denominator
    return mean.to(torch.float32), var.to(torch.float32)


@torch.no_grad()
def indexer_topk_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor,
    topk: int,
    scale: float = 1.0,
    causal: bool = True,
    q_offset: int = 0,
    sink_size: int = 0,
    return_stats: bool = False,
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
    query_chunk: int | None = None,
) -> tuple[torch.Tensor, ...]:
    """Chunked top-k of the gated indexer scores, never building ``[B, Tq, Tkv]``.

    For each chunk of queries: score it against the keys the chunk can see (with ``causal``,
    keys ``0 .. last query + q_offset``), mask, select (:func:`_select_topk`), and, with
    ``return_stats``, take each row's mean and population variance over its valid keys.

    Args:
        q, k, w, bias, topk, scale, causal, q_offset, sink_size, return_stats: as
            :func:`hdgsa_indexer.indexer_topk`.
        workspace_bytes: the chunk's workspace budget (:func:`chunk_sizes`).
        query_chunk: queries per chunk (all batch elements at once); overrides
            ``workspace_bytes`` (tests use it to cross chunk boundaries on small inputs).

    Returns:
        ``(indices, scores)`` int32 / float32 ``[B, Tq, topk]``, plus ``(mean, var)``
        float32 ``[B, Tq]`` with ``return_stats``.
    """
    batch, num_queries, heads, _ = q.shape
    num_keys = k.shape[1]
    device = q.device
    # Outputs start as "no valid key" (index -1, score -inf, stats 0): rows or chunks that see
    # no key are then already right. torch.full rather than torch.empty also keeps the tests'
    # NaN-poisoned torch.empty out of torch.compile's traces.
    indices = torch.full((batch, num_queries, topk), -1, dtype=torch.int32, device=device)
    scores = torch.full((batch, num_queries, topk), float("-inf"), dtype=torch.float32, device=device)
    outputs: tuple[torch.Tensor, ...] = (indices, scores)
    if return_stats:
        mean = torch.zeros(batch, num_queries, dtype=torch.float32, device=device)
        var = torch.zeros(batch, num_queries, dtype=torch.float32, device=device)
        outputs = (indices, scores, mean, var)
    if batch == 0 or num_queries == 0 or num_keys == 0:
        return outputs

    compute_dtype = _compute_dtype(q, k, w, bias)
    bias_compute = bias.to(compute_dtype)
    counts = valid_key_counts(num_queries, num_keys, causal, q_offset, device)
    batch_chunk, chunk = chunk_sizes(batch, num_keys, heads, workspace_bytes)
    if query_chunk is not None:
        batch_chunk, chunk = batch, query_chunk
    for batch_start in range(0, batch, batch_chunk):
        b = slice(batch_start, min(batch_start + batch_chunk, batch))
        # Casting k costs [b, Tkv, d] floats, the size of an input: not a [Tq, Tkv] quantity.
        k_compute = k[b].to(compute_dtype)
        # Empty inputs still go through once, so the (empty) output has its autograd graph.
        for start in range(0, num_queries, chunk) or [0]:
            stop = min(start + chunk, num_queries)
            t = slice(start, stop)
            chunk_counts = counts[t]
            # Keys after the chunk's last valid key are -inf for all its rows: skip them.
            visible = min(num_keys, max(0, stop + q_offset)) if causal else num_keys
            if visible == 0:
                continue
            chunk_scores = _chunk_scores(
                q[b, t], k_compute[:, :visible], w[b, t], bias_compute, scale, compute_dtype
            )
            if causal:
                keys = torch.arange(visible, device=device)
                chunk_scores.masked_fill_(keys[None, :] >= chunk_counts[:, None], float("-inf"))
            indices[b, t], scores[b, t] = _select_topk(chunk_scores, topk, sink_size, chunk_counts)
            if return_stats:
                mean[b, t], var[b, t] = _row_stats(chunk_scores, chunk_counts)
    return outputs


# Workspace of one query chunk of indexer_scores_at: the gathered keys and the head logits.
def _scores_at_chunk(batch: int, num_slots: int, heads: int, dim: int, workspace_bytes: int) -> int:
    per_query = max(1, batch * num_slots * (dim + 3 * heads + 4) * 4)
    return max(1, workspace_bytes // per_query)


def indexer_scores_at_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor,
    indices: torch.Tensor,
    scale: float = 1.0,
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
) -> torch.Tensor:
    """Gated indexer scores at chosen keys, ``[B, Tq, K]`` (float32; float64 for float64 inputs).

    ``out[b, t, j] = score[b, t, indices[b, t, j]]`` for ``indices[b, t, j] >= 0``, ``-inf``
    for negative slots (which pass zero gradient). Indices are assumed ``< Tkv`` (the public
    function checks). Walks the queries in chunks whose gathered keys ``[B, C, K, d]`` and
    head logits ``[B, C, H, K]`` fit ``workspace_bytes``; differentiable through autograd
    (autograd keeps each chunk's gathered keys and gates for the backward).
    """
    batch, num_queries, heads, dim = q.shape
    num_slots = indices.shape[-1]
    compute_dtype = _compute_dtype(q, k, w, bias)
    chunk = _scores_at_chunk(batch, num_slots, heads, dim, workspace_bytes)
    bias_compute = bias.to(compute_dtype)
    k_compute = k.to(compute_dtype)
    batch_index = torch.arange(batch, device=q.device)[:, None, None]
    pieces = []
    with autocast_disabled(q.device):
        # Empty inputs still go through once, so the (empty) output has its autograd graph.
        for start in range(0, num_queries, chunk) or [0]:
            t = slice(start, min(start + chunk, num_queries))
            slots = indices[:, t].long()
            empty = slots < 0
            keys = k_compute[batch_index, slots.clamp(min=0)]  # [B, C, K, d]
            q_rows = q[:, t].to(compute_dtype)  # [B, C, H, d]
            logits = torch.matmul(q_rows, keys.transpose(-1, -2))  # [B, C, H, K]
            key_gates = torch.sigmoid(logits * scale + bias_compute[:, None])
            head_gates = torch.sigmoid(w[:, t].to(compute_dtype))
            scores = torch.matmul(head_gates.unsqueeze(-2), key_gates).squeeze(-2)
            pieces.append(scores.masked_fill(empty, float("-inf")))
    return torch.cat(pieces, dim=1) if len(pieces) > 1 else pieces[0]
