"""Public functions: :func:`gated_indexer` (scores), :func:`indexer_topk` (selection) and
:func:`indexer_scores_at` (scores at chosen keys, for training at long context)."""

from __future__ import annotations

import torch

from hdgsa_core import (
    INDEX_DTYPES,
    check_bool,
    check_dtype,
    check_index_range,
    check_int,
    check_ndim,
    check_real,
    check_same_device,
    check_shape,
    check_tensor,
    resolve_backend,
)
from hdgsa_core.custom_ops import is_compiling

from .reference import gated_indexer_reference, indexer_scores_at_reference, indexer_topk_reference

__all__ = ["gated_indexer", "indexer_scores_at", "indexer_topk"]


def _check_arguments(
    op: str,
    q: torch.Tensor,
    k: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor,
    scale: float,
    causal: bool,
    q_offset: int,
) -> torch.device:
    """Raise the documented errors for the arguments every op shares; return the device."""
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
    Computed in float32 whatever the input dtype. On the Triton backend, bfloat16 / float16
    inputs on a GPU get their key gates from the ``tanh.approx.f32`` instruction
    (``sigmoid(z) = 0.5 + 0.5 tanh(z / 2)``): a relative error of about 1e-6 on the scores
    (measured on an H100), for a quarter of the forward's time.

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
        backend: ``"auto"`` (Triton on CUDA tensors, or on the CPU under
            ``TRITON_INTERPRET=1``, when Triton is installed; else PyTorch), ``"triton"`` or
            ``"torch"``. ``HDGSA_BACKEND=torch|triton`` overrides ``"auto"``.

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
    device = _check_arguments("gated_indexer", q, k, w, bias, scale, causal, q_offset)
    if resolve_backend(backend, device, op="gated_indexer") == "triton":
        from ._triton import gated_indexer_triton  # Triton is imported only when its backend runs

        return gated_indexer_triton(q, k, w, bias, float(scale), causal, int(q_offset))
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
    ``torch.topk`` leaves unspecified). The ``[B, Tq, Tkv]`` matrix is never built; extra
    memory is the outputs plus a workspace of at most about 256 MiB
    (``reference.DEFAULT_WORKSPACE_BYTES``). PyTorch backend: query chunks scored and reduced
    one after another (at least one query row, ``Tkv * (4 * H + 32)`` bytes). Triton backend:
    one fused kernel, scores tile by tile into per-query candidate buffers; it supports
    ``min(topk, Tkv)`` up to 8,192 and raises ``RuntimeError`` beyond.

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
        backend: ``"auto"``, ``"triton"`` or ``"torch"``, as :func:`gated_indexer`. Both
            select over their own float32 scores: Triton's are :func:`gated_indexer`'s with
            ``backend="triton"`` bitwise (the same kernel).

    Returns:
        ``(indices, scores)``: int32 and float32 ``[B, Tq, topk]``. With ``return_stats``,
        ``(indices, scores, mean, var)``: float32 ``[B, Tq]`` mean and population variance
        (divided by the count) over all valid keys of the query (not only the selected ones),
        for adaptive top-k; 0 and 0 for a query with no valid key. Nothing requires grad.

    Raises:
        ValueError: as :func:`gated_indexer`; ``topk < 1``; ``sink_size < 0`` or
            ``sink_size > topk``.
        TypeError: as :func:`gated_indexer`; ``topk`` or ``sink_size`` not an int.
        RuntimeError: the requested backend cannot run here; on the Triton backend,
            ``min(topk, Tkv)`` above 8,192.

    Example:
        >>> q, k = torch.randn(1, 8, 4, 16), torch.randn(1, 8, 16)
        >>> w, bias = torch.randn(1, 8, 4), torch.zeros(4)
        >>> indices, scores = indexer_topk(q, k, w, bias, topk=3, sink_size=1)
        >>> indices[0, 0].tolist(), indices[0, 5, 0].item()
        ([0, -1, -1], 0)
    """
    device = _check_arguments("indexer_topk", q, k, w, bias, scale, causal, q_offset)
    check_int("indexer_topk: topk", topk)
    if topk < 1:
        raise ValueError(f"indexer_topk: topk must be >= 1, got {topk}")
    check_int("indexer_topk: sink_size", sink_size)
    if not 0 <= sink_size <= topk:
        raise ValueError(f"indexer_topk: sink_size must be in [0, topk={topk}], got {sink_size}")
    check_bool("indexer_topk: return_stats", return_stats)
    args = (int(topk), float(scale), causal, int(q_offset), int(sink_size), return_stats)
    if resolve_backend(backend, device, op="indexer_topk") == "triton":
        from ._triton import indexer_topk_triton

        return indexer_topk_triton(q, k, w, bias, *args)
    return indexer_topk_reference(q, k, w, bias, *args)


def indexer_scores_at(
    q: torch.Tensor,
    k: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor,
    indices: torch.Tensor,
    scale: float = 1.0,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Gated indexer scores at chosen keys: ``out[b, t, j] = score[b, t, indices[b, t, j]]``.

    ``score`` is :func:`gated_indexer`'s (without its causal rule: the caller chose the keys);
    a negative index gives ``-inf`` and passes no gradient. Memory is O(B * Tq * K): this is
    how the indexer is trained at long context (a loss on the selected keys, e.g. from
    :func:`indexer_topk`), where the dense scores and their gradient do not fit.

    Args:
        q: queries ``[B, Tq, H, d]``, any strides.
        k: keys ``[B, Tkv, d]``.
        w: head gate logits ``[B, Tq, H]``.
        bias: per-head bias ``[H]``.
        indices: key positions ``[B, Tq, K]``, int32 or int64; negative = empty slot.
            A repeated index gives the same score twice (and twice the gradient).
        scale: multiplies the dot products (default 1.0).
        backend: ``"auto"``, ``"triton"`` or ``"torch"``, as :func:`gated_indexer`.

    Returns:
        Scores ``[B, Tq, K]``, float32. Differentiable with respect to ``q``, ``k``, ``w`` and
        ``bias`` (gradients in the inputs' dtypes). On the Triton backend the ``k`` gradient
        is a scatter over the slots: float atomics, or, when
        ``torch.are_deterministic_algorithms_enabled()``, a bitwise reproducible key-major
        pass (a stable sort of the ``B * Tq * K`` slots by key first).

    Raises:
        ValueError: as :func:`gated_indexer`; ``indices`` not ``[B, Tq, K]``; an index
            ``>= Tkv``. Checking the range reads one value back to the host (a sync); under
            ``torch.compile`` it is a device-side assertion instead (``RuntimeError``,
            asynchronous on CUDA; no graph break).
        TypeError: as :func:`gated_indexer`; ``indices`` not int32 or int64.
        RuntimeError: the requested backend cannot run here.

    Example:
        >>> q, k = torch.randn(1, 8, 4, 16), torch.randn(1, 8, 16)
        >>> w, bias = torch.randn(1, 8, 4), torch.zeros(4)
        >>> indices, _ = indexer_topk(q, k, w, bias, topk=3)
        >>> indexer_scores_at(q, k, w, bias, indices).shape
        torch.Size([1, 8, 3])
    """
    device = _check_arguments("indexer_scores_at", q, k, w, bias, scale, False, 0)
    check_tensor("indices", indices)
    check_ndim("indices", indices, 3, "[B, Tq, K]")
    check_dtype("indices", indices, INDEX_DTYPES)
    check_shape("indices", indices, (q.shape[0], q.shape[1], None), "[B, Tq, K]")
    device = check_same_device(q=q, indices=indices)
    if not is_compiling():
        check_index_range("indices", indices, k.shape[1])
    elif indices.numel() > 0:  # no host read inside a graph: a device-side assertion instead
        torch._assert_async(
            indices.max() < k.shape[1],
            f"indices: an index is out of range; indices must be < Tkv = {k.shape[1]}",
        )
    if resolve_backend(backend, device, op="indexer_scores_at") == "triton":
        from ._triton import indexer_scores_at_triton

        return indexer_scores_at_triton(q, k, w, bias, indices, float(scale))
    return indexer_scores_at_reference(q, k, w, bias, indices, float(scale))
