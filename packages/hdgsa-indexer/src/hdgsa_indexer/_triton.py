"""The Triton backend of the gated indexer: autograd and ``torch.library`` glue around the
launchers of ``_triton_fwd`` / ``_triton_bwd``.

Two doors to the same launchers (as in the other packages):
- eager: the ``autograd.Function`` classes call them directly (no dispatcher overhead);
- under ``torch.compile``: the custom ops ``hdgsa::gated_indexer_fwd`` / ``_bwd``,
  ``hdgsa::indexer_scores_at_fwd`` / ``_bwd`` (fake implementations, ``register_autograd``)
  and ``hdgsa::indexer_topk`` (not differentiable), so ``fullgraph=True`` traces through.

``indexer_topk`` is one fused kernel (``_triton_topk``): the scores exist only tile by tile.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.autograd.function import once_differentiable

from hdgsa_core.custom_ops import is_compiling, op_name

from ._triton_bwd import gated_indexer_bwd, indexer_scores_at_bwd
from ._triton_fwd import gated_indexer_fwd, indexer_scores_at_fwd
from ._triton_topk import indexer_topk_fwd

__all__ = ["gated_indexer_triton", "indexer_scores_at_triton", "indexer_topk_triton"]


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


# ----------------------------------------------------------------------------- dense scores


class _GatedIndexerFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, w, bias, scale, causal, q_offset):
        out = gated_indexer_fwd(q, k, w, bias, scale, causal, q_offset)
        ctx.save_for_backward(q, k, w, bias)
        ctx.options = (scale, causal, q_offset)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dscore):
        q, k, w, bias = ctx.saved_tensors
        grads = gated_indexer_bwd(dscore, q, k, w, bias, *ctx.options)
        return (*grads, None, None, None)


@torch.library.custom_op(op_name("gated_indexer_fwd"), mutates_args=())
def _gated_indexer_fwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor,
    scale: float,
    causal: bool,
    q_offset: int,
) -> torch.Tensor:
    return gated_indexer_fwd(q, k, w, bias, scale, causal, q_offset)


@_gated_indexer_fwd_op.register_fake
def _(q, k, w, bias, scale, causal, q_offset):
    return q.new_empty((q.shape[0], q.shape[1], k.shape[1]), dtype=torch.float32)


@torch.library.custom_op(op_name("gated_indexer_bwd"), mutates_args=())
def _gated_indexer_bwd_op(
    dscore: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor,
    scale: float,
    causal: bool,
    q_offset: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return gated_indexer_bwd(dscore, q, k, w, bias, scale, causal, q_offset)


@_gated_indexer_bwd_op.register_fake
def _(dscore, q, k, w, bias, scale, causal, q_offset):
    return q.new_empty(q.shape), k.new_empty(k.shape), w.new_empty(w.shape), bias.new_empty(bias.shape)


def _gated_setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    q, k, w, bias, scale, causal, q_offset = inputs
    ctx.save_for_backward(q, k, w, bias)
    ctx.options = (scale, causal, q_offset)


def _gated_backward(ctx: Any, dscore: torch.Tensor):
    q, k, w, bias = ctx.saved_tensors
    grads = torch.ops.hdgsa.gated_indexer_bwd(dscore, q, k, w, bias, *ctx.options)
    return (*grads, None, None, None)


torch.library.register_autograd(
    op_name("gated_indexer_fwd"), _gated_backward, setup_context=_gated_setup_context
)


def gated_indexer_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor,
    scale: float,
    causal: bool,
    q_offset: int,
) -> torch.Tensor:
    """Dense scores on the Triton backend (arguments already checked)."""
    if is_compiling():
        return torch.ops.hdgsa.gated_indexer_fwd(q, k, w, bias, scale, causal, q_offset)
    if not _needs_grad(q, k, w, bias):
        return gated_indexer_fwd(q, k, w, bias, scale, causal, q_offset)
    return _GatedIndexerFunction.apply(q, k, w, bias, scale, causal, q_offset)


# ----------------------------------------------------------------------------- scores at keys


def _deterministic() -> bool:
    return torch.are_deterministic_algorithms_enabled()


class _ScoresAtFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, w, bias, indices, scale):
        out = indexer_scores_at_fwd(q, k, w, bias, indices, scale)
        ctx.save_for_backward(q, k, w, bias, indices)
        ctx.scale = scale
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        q, k, w, bias, indices = ctx.saved_tensors
        grads = indexer_scores_at_bwd(dout, q, k, w, bias, indices, ctx.scale, _deterministic())
        return (*grads, None, None)


@torch.library.custom_op(op_name("indexer_scores_at_fwd"), mutates_args=())
def _scores_at_fwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor,
    indices: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    return indexer_scores_at_fwd(q, k, w, bias, indices, scale)


@_scores_at_fwd_op.register_fake
def _(q, k, w, bias, indices, scale):
    return q.new_empty(indices.shape, dtype=torch.float32)


@torch.library.custom_op(op_name("indexer_scores_at_bwd"), mutates_args=())
def _scores_at_bwd_op(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor,
    indices: torch.Tensor,
    scale: float,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return indexer_scores_at_bwd(dout, q, k, w, bias, indices, scale, deterministic)


@_scores_at_bwd_op.register_fake
def _(dout, q, k, w, bias, indices, scale, deterministic):
    return q.new_empty(q.shape), k.new_empty(k.shape), w.new_empty(w.shape), bias.new_empty(bias.shape)


def _scores_at_setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    q, k, w, bias, indices, scale = inputs
    ctx.save_for_backward(q, k, w, bias, indices)
    ctx.scale = scale


def _scores_at_backward(ctx: Any, dout: torch.Tensor):
    q, k, w, bias, indices = ctx.saved_tensors
    grads = torch.ops.hdgsa.indexer_scores_at_bwd(dout, q, k, w, bias, indices, ctx.scale, _deterministic())
    return (*grads, None, None)


torch.library.register_autograd(
    op_name("indexer_scores_at_fwd"), _scores_at_backward, setup_context=_scores_at_setup_context
)


def indexer_scores_at_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor,
    indices: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Scores at the given keys on the Triton backend (arguments already checked)."""
    if is_compiling():
        return torch.ops.hdgsa.indexer_scores_at_fwd(q, k, w, bias, indices, scale)
    if not _needs_grad(q, k, w, bias):
        return indexer_scores_at_fwd(q, k, w, bias, indices, scale)
    return _ScoresAtFunction.apply(q, k, w, bias, indices, scale)


# ----------------------------------------------------------------------------- top-k


def _topk(q, k, w, bias, topk, scale, causal, q_offset, sink_size, return_stats):
    return indexer_topk_fwd(q, k, w, bias, topk, scale, causal, q_offset, sink_size, return_stats)


@torch.library.custom_op(op_name("indexer_topk"), mutates_args=())
def _topk_op(
    q: torch.Tensor,
    k: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor,
    topk: int,
    scale: float,
    causal: bool,
    q_offset: int,
    sink_size: int,
    return_stats: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _topk(q, k, w, bias, topk, scale, causal, q_offset, sink_size, return_stats)


@_topk_op.register_fake
def _(q, k, w, bias, topk, scale, causal, q_offset, sink_size, return_stats):
    batch, num_queries = q.shape[0], q.shape[1]
    return (
        q.new_empty((batch, num_queries, topk), dtype=torch.int32),
        q.new_empty((batch, num_queries, topk), dtype=torch.float32),
        q.new_empty((batch, num_queries), dtype=torch.float32),
        q.new_empty((batch, num_queries), dtype=torch.float32),
    )


def indexer_topk_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor,
    topk: int,
    scale: float,
    causal: bool,
    q_offset: int,
    sink_size: int,
    return_stats: bool,
) -> tuple[torch.Tensor, ...]:
    """Top-k on the Triton backend (arguments already checked)."""
    if is_compiling():
        outputs = torch.ops.hdgsa.indexer_topk(
            q, k, w, bias, topk, scale, causal, q_offset, sink_size, return_stats
        )
    else:
        outputs = indexer_topk_fwd(q, k, w, bias, topk, scale, causal, q_offset, sink_size, return_stats)
    return tuple(outputs) if return_stats else (outputs[0], outputs[1])
