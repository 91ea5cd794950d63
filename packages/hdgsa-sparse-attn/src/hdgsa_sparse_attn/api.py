"""Public sparse attention: argument checks and backend choice."""

from __future__ import annotations

import torch

from hdgsa_core import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_bool,
    check_dtype,
    check_index_range,
    check_ndim,
    check_real,
    check_same_device,
    check_same_dtype,
    check_shape,
    check_tensor,
    resolve_backend,
)
from hdgsa_core.custom_ops import is_compiling

from .reference import normalize_indices, sparse_attention_torch

__all__ = ["sparse_attention", "sparse_attention_path"]


def _check_arguments(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float | None,
    return_lse: bool,
    validate: bool,
) -> torch.device:
    """Raise the documented errors; returns the tensors' device. No host sync."""
    for name, tensor in (("q", q), ("k", k), ("v", v), ("indices", indices)):
        check_tensor(name, tensor)
    if mask is not None:
        check_tensor("mask", mask)
    check_ndim("q", q, 4, "[B, T, Hq, D]")
    check_ndim("k", k, 4, "[B, Tkv, Hkv, D]")
    check_ndim("v", v, 4, "[B, Tkv, Hkv, Dv]")
    check_ndim("indices", indices, (3, 4), "[B, Hi, T, K] or [B, T, K]")

    check_dtype("q", q, FLOAT_DTYPES)
    check_same_dtype("q", q, k=k, v=v)
    check_dtype("indices", indices, INDEX_DTYPES)
    if mask is not None:
        check_dtype("mask", mask, (torch.bool,))
    if scale is not None:
        check_real("scale", scale)
    check_bool("return_lse", return_lse)
    check_bool("validate", validate)

    device = check_same_device(q=q, k=k, v=v, indices=indices, mask=mask)

    batch, seq_len, num_q_heads, head_dim = q.shape
    num_keys, num_kv_heads = k.shape[1], k.shape[2]
    if head_dim < 1:
        raise ValueError(f"q: head dim D must be >= 1, got shape {list(q.shape)}")
    if num_kv_heads < 1 or num_q_heads < 1 or num_q_heads % num_kv_heads != 0:
        raise ValueError(
            f"q, k: the query heads Hq must be a positive multiple of the KV heads Hkv (GQA), "
            f"got Hq={num_q_heads} (q shape {list(q.shape)}) and Hkv={num_kv_heads} "
            f"(k shape {list(k.shape)})"
        )
    check_shape("k", k, (batch, None, num_kv_heads, head_dim), "[B, Tkv, Hkv, D]")
    check_shape("v", v, (batch, num_keys, num_kv_heads, None), "[B, Tkv, Hkv, Dv]")
    if indices.dim() == 4:
        num_index_heads = indices.shape[1]
        if num_index_heads not in (1, num_kv_heads, num_q_heads):
            raise ValueError(
                f"indices: expected shape [B, Hi, T, K] with Hi in {{1, Hkv={num_kv_heads}, "
                f"Hq={num_q_heads}}}, got shape {list(indices.shape)}"
            )
        check_shape("indices", indices, (batch, None, seq_len, None), "[B, Hi, T, K]")
    else:
        check_shape("indices", indices, (batch, seq_len, None), "[B, T, K]")
    if mask is not None and mask.shape != indices.shape:
        raise ValueError(
            f"mask: expected the shape of indices {list(indices.shape)}, got shape {list(mask.shape)}"
        )
    return device


def _check_indices_in_range(indices: torch.Tensor, num_keys: int) -> None:
    """ValueError if an index is ``>= num_keys``: reads the largest index back (a host sync).

    Under ``torch.compile`` a host read would break the graph, so the check becomes a
    device-side assertion there (``RuntimeError``; asynchronous on CUDA).
    """
    if not is_compiling():
        check_index_range("indices", indices, num_keys)
    elif indices.numel() > 0:
        torch._assert_async(
            indices.max() < num_keys,
            f"indices: an index is out of range; indices must be < Tkv = {num_keys}",
        )


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    *,
    return_lse: bool = False,
    validate: bool = True,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of each query over the keys its index list selects (Gated Sparse Attention).

    For batch ``b``, query ``t`` and head ``h``, with KV head ``h_kv = h // (Hq // Hkv)`` and
    the list ``idx = indices[b, h_i, t]`` (``h_i`` = ``h``, ``h_kv`` or 0 by the layout), over
    the valid slots ``j`` (``idx_j >= 0`` and ``mask[..., j]``)::

        s_j        = scale * <q[b, t, h], k[b, idx_j, h_kv]>
        out[b,t,h] = sum_j softmax(s)_j * v[b, idx_j, h_kv]
        lse[b,h,t] = log(sum_j exp(s_j))

    Slots count as given: an index listed twice gets twice the weight. A row with no valid
    slot (all masked, all negative, or ``K = 0``) gives ``out = 0`` and ``lse = -inf``, and
    zero gradients, never NaN. Math runs in float32.

    Args:
        q: queries ``[B, T, Hq, D]``, float32, float16 or bfloat16; any strides.
        k: keys ``[B, Tkv, Hkv, D]``, the dtype of ``q``; ``Hq % Hkv == 0`` (GQA).
        v: values ``[B, Tkv, Hkv, Dv]``, the dtype of ``q`` (``Dv`` may differ from ``D``).
        indices: key positions, int32 or int64: ``[B, Hi, T, K]`` with ``Hi = Hq`` (a list
            per query head), ``Hi = Hkv`` (per KV head, shared by its query group) or
            ``Hi = 1`` (shared by all heads); or ``[B, T, K]`` (shared). A negative index is
            a masked slot.
        mask: bool, the shape of ``indices``; True = attend. None: every slot with
            ``index >= 0`` attends.
        scale: score scale; None means ``D ** -0.5``.
        return_lse: also return the log-sum-exp of the scores.
        validate: check that every index is ``< Tkv`` (``ValueError`` otherwise). The check
            reads the largest index back to the host: a device sync. Under
            ``torch.compile`` it is a device-side assertion instead (``RuntimeError``,
            no graph break). ``validate=False`` skips it; an index ``>= Tkv`` is then
            treated as a masked slot (never read).
        backend: ``"auto"`` (Triton on CUDA tensors, or on CPU under ``TRITON_INTERPRET=1``,
            when Triton is installed; else PyTorch; ``HDGSA_BACKEND`` overrides),
            ``"triton"`` (the fused kernels; RuntimeError where they cannot run) or
            ``"torch"`` (chunked gather, bounded memory, see the README). The Triton backward
            is bitwise deterministic when ``torch.are_deterministic_algorithms_enabled()``
            (a key-major pass instead of float atomics).

    Returns:
        ``out`` ``[B, T, Hq, Dv]`` in ``q.dtype``; with ``return_lse``, ``(out, lse)`` with
        ``lse`` ``[B, Hq, T]`` float32. Differentiable with respect to ``q``, ``k`` and ``v``
        (and through ``lse``); ``indices`` and ``mask`` are not.

    Raises:
        ValueError: a wrong rank or shape (named, expected and actual), ``Hq`` not a multiple
            of ``Hkv``, ``Hi`` not in {1, Hkv, Hq}, tensors on different devices, an index
            ``>= Tkv`` (with ``validate``), an unknown backend name.
        TypeError: a non-tensor argument, a dtype outside float32/float16/bfloat16, ``q``,
            ``k``, ``v`` of different dtypes, ``indices`` not int32/int64, ``mask`` not bool,
            ``scale`` not a real number, ``return_lse`` or ``validate`` not a bool.
        RuntimeError: the requested backend cannot run here.

    Example:
        >>> B, T, Hq, Hkv, D, K = 1, 16, 4, 2, 32, 8
        >>> q = torch.randn(B, T, Hq, D); k = torch.randn(B, T, Hkv, D); v = torch.randn(B, T, Hkv, D)
        >>> indices = torch.randint(0, T, (B, Hkv, T, K))  # one list per KV head
        >>> sparse_attention(q, k, v, indices).shape
        torch.Size([1, 16, 4, 32])
    """
    device = _check_arguments(q, k, v, indices, mask, scale, return_lse, validate)
    chosen = resolve_backend(backend, device, op="sparse_attention")
    if validate:
        _check_indices_in_range(indices, k.shape[1])
    if chosen == "triton":
        from ._triton import sparse_attention_triton  # imports Triton: only when it runs

        scale = q.shape[3] ** -0.5 if scale is None else float(scale)
        out, lse = sparse_attention_triton(q, k, v, *normalize_indices(indices, mask), scale)
    else:
        out, lse = sparse_attention_torch(q, k, v, indices, mask, None if scale is None else float(scale))
    if return_lse:
        return out, lse.float()
    return out


def sparse_attention_path(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    needs_grad: bool = False,
    backend: str = "auto",
) -> str:
    """Which implementation :func:`sparse_attention` runs for these arguments, for inspection.

    Returns ``"torch"`` (the PyTorch backend), ``"per-query"`` (the Triton kernels that gather
    each query's own list) or ``"block"`` (the Triton query-block path: a block of consecutive
    queries over the union of their lists, on the tensor cores). The rule, applied per call:

    - per-query under ``torch.compile``, for lists per query head with GQA (``Hi = Hq > Hkv``),
      when ``T * K < 2**22`` (the statistic below would cost a large share of the call), and
      when the block kernels' tiles would not fit the device's shared memory (their
      ``BQ * G``-row tiles at the head dims and dtype: e.g. the backward at ``D = 256``);
    - otherwise block when the *expansion* ``e = sum_b U_b * BQ / sum_b valid_b`` is small:
      ``U_b`` the size of block ``b``'s key union, ``BQ`` its queries (``128 // G``),
      ``valid_b`` its valid slots; so ``e`` is how many keys a query row of the block path
      visits per key it selected (near 1 for windows, sinks and keys shared by neighbouring
      queries, near ``BQ`` for uniform random lists). Block when ``e <= 1.25`` for a forward
      only and ``e <= 4`` when a backward follows (``needs_grad``): the break-even points
      measured on an H100 were about 1.1 and 6. ``e`` is measured on about 256 evenly spaced
      blocks, which syncs with the host.

    Args: as :func:`sparse_attention`; ``needs_grad``: whether a backward will follow (what
    ``sparse_attention`` reads from ``q``, ``k``, ``v`` requiring grad under grad mode).

    Raises: as :func:`sparse_attention`.
    """
    device = _check_arguments(q, k, v, indices, mask, None, False, True)
    check_bool("needs_grad", needs_grad)
    if resolve_backend(backend, device, op="sparse_attention") == "torch":
        return "torch"
    from ._block_plan import BlockTiles, choose_path  # imports Triton: only when it runs

    if is_compiling():
        return "per-query"
    tiles = BlockTiles.of(q, v)
    return choose_path(indices, mask, k.shape[2], q.shape[2], k.shape[1], needs_grad=needs_grad, tiles=tiles)
