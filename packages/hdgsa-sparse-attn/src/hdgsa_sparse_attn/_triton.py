"""The Triton backend of :func:`hdgsa_sparse_attn.sparse_attention`: autograd and
``torch.library`` glue around the launchers of ``_triton_fwd`` / ``_triton_bwd``.

Two doors to the same launchers:
- eager: ``_SparseAttentionFunction`` (an ``autograd.Function``) calls them directly, so an
  eager call pays no dispatcher overhead;
- under ``torch.compile``: the custom ops ``hdgsa::sparse_attention_fwd`` /
  ``hdgsa::sparse_attention_bwd`` (with fake implementations and ``register_autograd``), so
  ``fullgraph=True`` traces through.
The backward takes the deterministic path when ``torch.are_deterministic_algorithms_enabled()``
(read when the backward runs; under ``torch.compile``, when it is traced).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.autograd.function import once_differentiable

from hdgsa_core.custom_ops import is_compiling, op_name

from ._triton_bwd import sparse_attention_bwd
from ._triton_fwd import sparse_attention_fwd

__all__ = ["sparse_attention_triton"]


def _save(ctx: Any, q, k, v, indices, mask, out, lse, scale: float) -> None:
    ctx.save_for_backward(q, k, v, indices, mask, out, lse)
    ctx.scale = scale


def _backward(ctx: Any, grad_out: torch.Tensor | None, grad_lse: torch.Tensor | None, bwd: Any):
    q, k, v, indices, mask, out, lse = ctx.saved_tensors
    if grad_out is None and grad_lse is None:
        return None, None, None
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    return bwd(
        grad_out,
        q,
        k,
        v,
        indices,
        mask,
        out,
        lse,
        grad_lse,
        ctx.scale,
        torch.are_deterministic_algorithms_enabled(),
    )


class _SparseAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, indices, mask, scale):
        out, lse = sparse_attention_fwd(q, k, v, indices, mask, scale)
        ctx.set_materialize_grads(False)
        _save(ctx, q, k, v, indices, mask, out, lse, scale)
        return out, lse

    @staticmethod
    @once_differentiable  # the backward kernels have no gradient: a double backward raises
    def backward(ctx, grad_out, grad_lse):
        dq, dk, dv = _backward(ctx, grad_out, grad_lse, sparse_attention_bwd)
        return dq, dk, dv, None, None, None


# ----------------------------------------------------------------------------- custom ops


@torch.library.custom_op(op_name("sparse_attention_fwd"), mutates_args=())
def _sparse_attention_fwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)``; ``indices``/``mask`` ``[B, Hi, T, K]``."""
    return sparse_attention_fwd(q, k, v, indices, mask, scale)


@_sparse_attention_fwd_op.register_fake
def _(q, k, v, indices, mask, scale):
    batch, seq_len, num_q_heads, _ = q.shape
    out = q.new_empty(batch, seq_len, num_q_heads, v.shape[3])
    lse = q.new_empty(batch, num_q_heads, seq_len, dtype=torch.float32)
    return out, lse


@torch.library.custom_op(op_name("sparse_attention_bwd"), mutates_args=())
def _sparse_attention_bwd_op(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    mask: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
    grad_lse: torch.Tensor | None,
    scale: float,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)``."""
    return sparse_attention_bwd(grad_out, q, k, v, indices, mask, out, lse, grad_lse, scale, deterministic)


@_sparse_attention_bwd_op.register_fake
def _(grad_out, q, k, v, indices, mask, out, lse, grad_lse, scale, deterministic):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _bwd_via_op(grad_out, q, k, v, indices, mask, out, lse, grad_lse, scale, deterministic):
    return torch.ops.hdgsa.sparse_attention_bwd(
        grad_out, q, k, v, indices, mask, out, lse, grad_lse, scale, deterministic
    )


def _fwd_op_setup_context(ctx, inputs, output):
    q, k, v, indices, mask, scale = inputs
    out, lse = output
    _save(ctx, q, k, v, indices, mask, out, lse, scale)


def _fwd_op_backward(ctx, grad_out, grad_lse):
    dq, dk, dv = _backward(ctx, grad_out, grad_lse, _bwd_via_op)
    return dq, dk, dv, None, None, None


torch.library.register_autograd(
    op_name("sparse_attention_fwd"), _fwd_op_backward, setup_context=_fwd_op_setup_context
)


# ----------------------------------------------------------------------------- entry point


def sparse_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` by the Triton kernels (arguments checked by :func:`sparse_attention`;
    ``indices``/``mask`` already ``[B, Hi, T, K]``)."""
    if is_compiling():  # the block path's plan syncs with the host: per-query under compile
        return torch.ops.hdgsa.sparse_attention_fwd(q, k, v, indices, mask, scale)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    path, plan = choose_triton_path(q, k, v, indices, mask, needs_grad)
    if path == "block":
        from ._triton_block import sparse_attention_block

        return sparse_attention_block(q, k, v, indices, mask, scale, plan=plan)
    if needs_grad:
        return _SparseAttentionFunction.apply(q, k, v, indices, mask, scale)
    return sparse_attention_fwd(q, k, v, indices, mask, scale)


def choose_triton_path(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    mask: torch.Tensor | None,
    needs_grad: bool,
) -> tuple[str, Any]:
    """``("block", plan)`` or ``("per-query", None)`` for ``indices``/``mask`` ``[B, Hi, T, K]``
    (the rule: :func:`hdgsa_sparse_attn._block_plan.choose_path`)."""
    from ._block_plan import BlockTiles, plan_and_choose

    return plan_and_choose(
        indices, mask, k.shape[1], k.shape[2], q.shape[2], needs_grad=needs_grad, tiles=BlockTiles.of(q, v)
    )
