"""Public functions: :func:`gated_indexer` (scores) and :func:`indexer_topk` (fused selection)."""

from __future__ import annotations

import torch

from hdgsa_core import (
    check_bool,
    check_dtype,
    check_int,
    check_ndim,
    check_real,
    check_same_device,
    check_shape,
    check_tensor,
    resolve_backend,
)

from .reference import gated_indexer_reference, indexer_topk_reference

__all__ = ["TRITON_IMPLEMENTED", "gated_indexer", "indexer_topk"]

# No Triton kernel yet (issue 2): backend="triton" raises "not implemented yet", auto picks torch.
TRITON_IMPLEMENTED = False


def _check_inputs(
    op: str,
    q: torch.Tensor,
    k: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor,
    scale: float,
    causal: bool,
    q_offset: int,
) -> torch.device:
    """Raise SPEC section 2's errors for the arguments shared by both ops; return the device."""
    for name, tensor in (("q", q), ("k", k), ("w", w), ("bias", bias)):
        check_tensor(name, tensor)
    check_ndim("q", q, 4, "[B, Tq, H, d]")
    check_ndim("k", k, 3, "[B, Tkv, d]")
    check_ndim("w", w, 3, "[B, Tq, H]")
    check_ndim("bias", bias, 1, "[H]")
    for name, tensor in (("q", q), ("k", k), ("w", w), ("bias", bias)):
        check_dtype(name, tensor)
    batch, num_queries, heads, dim = q.shape
    check_shape("k", k, (batch, None, dim), "[B, Tkv, d]")
    check_shape("w", w, (batch, num_queries, heads), "[B, Tq, H]")
    check_shape("bias", bias, (heads,), "[H]")
    device = check_same_device(q=q, k=k, w=w, bias=bias)
    check_real(f"{op}: scale", scale)
    check_bool(f"{op}: causal", causal)
    check_int(f"{op}: q_offset", q_offset)
    return device


def gated_indexer(
    q: torch.Tensor,
    k: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor,
    scale: float = 1.0,
    causal: bool = True,
    *,
    q_offset: int = 0,
    backend: str = "auto",
) -> torch.Tensor:
    """Gated lightning indexer scores of every query against every key.

    ``score[b, t, s] = sum_h sigmoid(w[b, t, h]) * sigmoid(scale * <q[b, t, h], k[b, s]> + bias[h])``

    One key vector per position is shared by all ``H`` indexer heads; each head's vote is
    gated by ``sigmoid(w)``. With ``causal``, keys ``s > t + q_offset`` score ``-inf``.
    Computed in float32 whatever the input dtype.

    Args:
        q: queries ``[B, Tq, H, d]``, any strides.
        k: keys ``[B, Tkv, d]``, shared by the heads.
        w: head gate logits ``[B, Tq, H]``.
        bias: per-head bias ``[H]``.
        scale: multiplies the dot products (default 1.0).
        causal: mask keys after each query's position (default True).
        q_offset: position of query 0 among the keys, for decoding or chunked prefill
            (``Tkv - Tq`` when the queries are the last ``Tq`` positions). Any integer; a
            negative offset leaves the first queries with no valid key (a row of ``-inf``).
            Ignored when ``causal`` is False.
        backend: ``"auto"``, ``"triton"`` or ``"torch"`` (SPEC section 2). There is no Triton
            kernel yet: ``"triton"`` raises ``RuntimeError`` and ``"auto"`` runs PyTorch.

    Returns:
        Scores ``[B, Tq, Tkv]``, float32, ``-inf`` at masked keys. Differentiable with respect
        to ``q``, ``k``, ``w`` and ``bias`` (float32, float16 and bfloat16 may be mixed; each
        gradient has its input's dtype). Masked entries pass zero gradient, never NaN.

    Raises:
        ValueError: a wrong rank or a size that disagrees (the message names the argument,
            the expected and the actual shape); tensors on different devices; unknown backend.
        TypeError: a dtype other than float32, float16 or bfloat16; a non-numeric ``scale``,
            non-bool ``causal`` or non-integer ``q_offset``.
        RuntimeError: the requested backend cannot run here.

    Example:
        >>> q = torch.randn(1, 6, 4, 16)
        >>> k = torch.randn(1, 6, 16)
        >>> w, bias = torch.randn(1, 6, 4), torch.zeros(4)
        >>> gated_indexer(q, k, w, bias, scale=16**-0.5).shape
        torch.Size([1, 6, 6])
    """
    device = _check_inputs("gated_indexer", q, k, w, bias, scale, causal, q_offset)
    resolve_backend(backend, device, op="gated_indexer", implemented=TRITON_IMPLEMENTED)
    # Only the torch backend exists; resolve_backend has raised for anything else.
    return gated_indexer_reference(q, k, w, bias, float(scale), causal, int(q_offset))


def indexer_topk(
    q: torch.Tensor,
    k: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor,
    topk: int,
    scale: float = 1.0,
    causal: bool = True,
    *,
    q_offset: int = 0,
    sink_size: int = 0,
    return_stats: bool = False,
    backend: str = "auto",
) -> tuple[torch.Tensor, ...]:
    """The ``topk`` best keys of each query by gated indexer score, without the score matrix.

    Scores are :func:`gated_indexer`'s. For each query, among its valid keys (all keys, or
    with ``causal`` keys ``s <= t + q_offset``):

    - the first ``sink_size`` valid keys (attention sinks) are always selected and come first,
      in key order;
    - the remaining slots hold the other valid keys by descending score, ties going to the
      lower key index (deterministic: the selection is a total order);
    - slots past the number of valid keys hold index ``-1`` and score ``-inf``.

    Without sinks this is ``torch.topk`` over :func:`gated_indexer`'s scores (up to ties, which
    ``torch.topk`` leaves unspecified). The queries are processed in chunks: the
    ``[B, Tq, Tkv]`` matrix is never built; extra memory is the outputs plus a workspace of
    about 256 MiB (``reference.DEFAULT_WORKSPACE_BYTES``; at least one query row,
    ``Tkv * (4 * H + 32)`` bytes).

    Args:
        q: queries ``[B, Tq, H, d]``, any strides.
        k: keys ``[B, Tkv, d]``.
        w: head gate logits ``[B, Tq, H]``.
        bias: per-head bias ``[H]``.
        topk: keys kept per query, >= 1; may exceed ``Tkv`` (the extra slots are empty).
        scale: multiplies the dot products (default 1.0).
        causal: only keys ``s <= t + q_offset`` are valid (default True).
        q_offset: position of query 0 among the keys (``Tkv - Tq`` when decoding); any
            integer; ignored when ``causal`` is False.
        sink_size: number of leading keys always kept, 0 <= sink_size <= topk (default 0).
        return_stats: also return the mean and variance of each query's valid scores.
        backend: ``"auto"``, ``"triton"`` or ``"torch"``. There is no Triton kernel yet:
            ``"triton"`` raises ``RuntimeError`` and ``"auto"`` runs PyTorch.

    Returns:
        ``(indices, scores)``: int32 and float32 ``[B, Tq, topk]``. With ``return_stats``,
        ``(indices, scores, mean, var)``: float32 ``[B, Tq]`` mean and population variance
        (divided by the count) over all valid keys of the query (not only the selected ones),
        for adaptive top-k; 0 and 0 for a query with no valid key. Nothing requires grad.

    Raises:
        ValueError: as :func:`gated_indexer`; ``topk < 1``; ``sink_size < 0`` or
            ``sink_size > topk``.
        TypeError: as :func:`gated_indexer`; ``topk`` or ``sink_size`` not an int.
        RuntimeError: the requested backend cannot run here.

    Example:
        >>> q, k = torch.randn(1, 8, 4, 16), torch.randn(1, 8, 16)
        >>> w, bias = torch.randn(1, 8, 4), torch.zeros(4)
        >>> indices, scores = indexer_topk(q, k, w, bias, topk=3, sink_size=1)
        >>> indices[0, 0].tolist(), indices[0, 5, 0].item()
        ([0, -1, -1], 0)
    """
    device = _check_inputs("indexer_topk", q, k, w, bias, scale, causal, q_offset)
    check_int("indexer_topk: topk", topk)
    if topk < 1:
        raise ValueError(f"indexer_topk: topk must be >= 1, got {topk}")
    check_int("indexer_topk: sink_size", sink_size)
    if not 0 <= sink_size <= topk:
        raise ValueError(f"indexer_topk: sink_size must be in [0, topk={topk}], got {sink_size}")
    check_bool("indexer_topk: return_stats", return_stats)
    resolve_backend(backend, device, op="indexer_topk", implemented=TRITON_IMPLEMENTED)
    return indexer_topk_reference(
        q,
        k,
        w,
        bias,
        int(topk),
        float(scale),
        causal,
        int(q_offset),
        int(sink_size),
        return_stats,
    )
