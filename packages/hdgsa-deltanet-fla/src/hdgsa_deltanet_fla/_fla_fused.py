"""The fla path as one autograd node: alpha -> log-decay, fla's chunked forward and backward, D skip.

Through fla's public ``chunk_gated_delta_rule`` a call records three autograd nodes (our
log-decay, fla's own Function, our D skip) and passes fla's per-call Python (backend dispatch,
``input_guard``'s argument walk). Where fla's forward + backward is host-bound (B4 T4096 H16
D128 on an H100) that Python is most of the wrapper's cost: about 100 us per extra node.
:class:`FusedGatedDeltaRule` calls fla's module-level ``chunk_gated_delta_rule_fwd`` /
``chunk_gated_delta_rule_bwd`` (the two functions fla's own Function calls) between our two
kernels, in one node.

Those two functions are fla internals, so :func:`hdgsa_deltanet_fla._fla.fused_entry_points`
hands them out only for the fla-core minor version this was written against, with the
parameters it passes, and only when fla would not send the whole op to another backend
(FlashQLA); otherwise ``gated_delta_rule`` calls fla's public function (the same math, more
host time). Importing this module imports Triton and fla: only the fla path does.

Under ``torch.compile`` the same steps run as the custom ops ``hdgsa::gated_delta_rule_fla_fwd``
/ ``hdgsa::gated_delta_rule_fla_bwd`` (fake and autograd registered), so that
``fullgraph=True`` traces a model through the fla path without a graph break.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.autograd.function import once_differentiable

from hdgsa_core import FLA_VERSION
from hdgsa_core.custom_ops import op_name
from hdgsa_core.triton_utils import device_guard

from . import _fla
from ._triton import d_skip_bwd, d_skip_fwd, log_decay_bwd, log_decay_fwd

__all__ = ["FusedGatedDeltaRule", "fused_forward", "gated_delta_rule_fla_op"]

# fla 0.6's chunk size: its forward returns A as [B, T, HV, 64] (the inverted intra-chunk blocks).
_FLA_CHUNK_SIZE = 64


def _contiguous(x: torch.Tensor) -> torch.Tensor:
    # fla's kernels index q, k, v, beta, the states and the incoming gradients as dense tensors,
    # ignoring strides (its public function makes every tensor argument contiguous the same way):
    # a gradient of S_T.sum() is expanded (all strides 0), one of S_T.mT is transposed.
    return x if x.is_contiguous() else x.contiguous()


def fused_forward(
    fla_forward: Callable,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    alpha: torch.Tensor,
    beta: torch.Tensor,
    D: torch.Tensor | None,
    v_skip: torch.Tensor | None,
    initial_state: torch.Tensor | None,
    scale: float,
    output_final_state: bool,
    out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor | None, tuple[torch.Tensor, ...]]:
    """``(o, S_T, saved)``: the forward, and what the backward needs (fla's chunk-local
    cumulative log-decays and its ``A``, the inverted intra-chunk blocks).

    ``v_skip``: the values the D skip reads when they are not ``v`` (the caller's ``v`` where
    ``v`` is its copy cast to ``compute_dtype``); None: ``v``.
    """
    q, k, v, beta = _contiguous(q), _contiguous(k), _contiguous(v), _contiguous(beta)
    if initial_state is not None:
        initial_state = _contiguous(initial_state)
    g = log_decay_fwd(alpha)
    with device_guard(q.device):
        g_cumsum, o, A, final_state = fla_forward(
            q=q,
            k=k,
            v=v,
            g=g,
            beta=beta,
            scale=scale,
            initial_state=initial_state,
            output_final_state=output_final_state,
        )[:4]
    if o.shape != v.shape or g_cumsum.shape != g.shape:  # fla's internals changed under us
        raise RuntimeError(
            f"fla-core {FLA_VERSION}'s chunk_gated_delta_rule_fwd returned (g, o, ...) of shapes "
            f"{tuple(g_cumsum.shape)}, {tuple(o.shape)}, expected {tuple(g.shape)}, {tuple(v.shape)}: "
            "its internals differ from those of fla-core 0.6.0, which hdgsa's fused fla path is "
            "written for. Please report it with your fla-core version; backend='torch' runs meanwhile"
        )
    if D is not None:
        # The cast to out_dtype comes with it.
        o = d_skip_fwd(o, v if v_skip is None else v_skip, D, out_dtype)
    elif o.dtype != out_dtype:
        o = o.to(out_dtype)
    if final_state is not None and final_state.dtype != torch.float32:
        final_state = final_state.float()
    return o, final_state, (q, k, v, v_skip, beta, initial_state, g_cumsum, A)


class FusedGatedDeltaRule(torch.autograd.Function):
    """``gated_delta_rule`` on fla's chunked kernels, forward and backward in one node.

    ``apply(fla_forward, fla_backward, q, k, v, alpha, beta, D, v_skip, initial_state, scale,
    output_final_state, out_dtype)`` (see :func:`fused_forward`), with the canonical layout
    (``[B, T, H, K]``, ``[B, T, HV]``), returns ``(o, S_T or None)``. Gradients for ``q``, ``k``,
    ``v``, ``alpha``, ``beta``, ``D``, ``v_skip`` and ``initial_state``.
    """

    @staticmethod
    def forward(
        ctx,
        fla_forward: Callable,
        fla_backward: Callable,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        alpha: torch.Tensor,
        beta: torch.Tensor,
        D: torch.Tensor | None,
        v_skip: torch.Tensor | None,
        initial_state: torch.Tensor | None,
        scale: float,
        output_final_state: bool,
        out_dtype: torch.dtype,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        o, final_state, saved = fused_forward(
            fla_forward, q, k, v, alpha, beta, D, v_skip, initial_state, scale, output_final_state, out_dtype
        )
        ctx.save_for_backward(alpha, D, *saved)
        ctx.fla_backward = fla_backward
        ctx.scale = scale
        ctx.dtypes = (q.dtype, beta.dtype, None if initial_state is None else initial_state.dtype)
        return o, final_state

    @staticmethod
    @once_differentiable  # as fla's: no double backward (an error if asked for, not a wrong one)
    def backward(ctx, do: torch.Tensor, dfinal_state: torch.Tensor | None):
        alpha, D, q, k, v, v_skip, beta, initial_state, g_cumsum, A = ctx.saved_tensors
        # needs_input_grad: (fla_forward, fla_backward, q, k, v, alpha, beta, D, v_skip, ...)
        needs = ctx.needs_input_grad
        grads = fused_backward(
            ctx.fla_backward, ctx.scale, (alpha, D, q, k, v, v_skip, beta, initial_state, g_cumsum, A),
            do, dfinal_state, need_dv=needs[4] or needs[7], need_dalpha=needs[5],
        )  # fmt: skip
        return (None, None, *grads, None, None, None)


def fused_backward(
    fla_backward: Callable,
    scale: float,
    saved: tuple[torch.Tensor | None, ...],
    do: torch.Tensor,
    dfinal_state: torch.Tensor | None,
    *,
    need_dv: bool,
    need_dalpha: bool,
) -> tuple[torch.Tensor | None, ...]:
    """``(dq, dk, dv, dalpha, dbeta, dD, dv_skip, dinitial_state)`` from fla's chunked backward
    and our two kernels. ``saved``: ``(alpha, D, q, k, v, v_skip, beta, initial_state, g_cumsum,
    A)`` as :func:`fused_forward` left them (q, k, v, beta and the state contiguous)."""
    alpha, D, q, k, v, v_skip, beta, initial_state, g_cumsum, A = saved
    q_dtype, beta_dtype = q.dtype, beta.dtype
    state_dtype = None if initial_state is None else initial_state.dtype
    do = _contiguous(do)
    if dfinal_state is not None:
        dfinal_state = _contiguous(dfinal_state)
    with device_guard(q.device):
        dq, dk, dv, dbeta, dg, dinitial_state = fla_backward(
            q=q,
            k=k,
            v=v,
            g=g_cumsum,
            beta=beta,
            A=A,
            scale=scale,
            initial_state=initial_state,
            do=do if do.dtype == q_dtype else do.to(q_dtype),
            dht=dfinal_state,
        )[:6]
    dD = dv_skip = None
    if D is not None and v_skip is not None:
        dv_skip, dD = d_skip_bwd(do, v_skip, D)
    elif D is not None and need_dv:
        # dv = fla's dv + D[h] * do, summed in float32 and rounded once; dD = sum(do * v).
        dv, dD = d_skip_bwd(do, v, D, dv_base=dv)
    dalpha = log_decay_bwd(alpha, dg) if need_dalpha else None
    if dinitial_state is not None and dinitial_state.dtype != state_dtype:
        dinitial_state = dinitial_state.to(state_dtype)
    return (
        dq.to(q_dtype),
        dk.to(q_dtype),
        dv.to(q_dtype),
        dalpha,
        dbeta.to(beta_dtype),
        dD,
        dv_skip,
        dinitial_state,
    )


# ----------------------------------------------------------------------------- custom ops


def _entry_points() -> tuple[Callable, Callable]:
    fused = _fla.fused_entry_points()
    if fused is None:  # gated_delta_rule checks this before taking the custom op
        raise RuntimeError(f"fla-core {FLA_VERSION}: the fused fla path needs fla-core 0.6.x")
    return fused


def _empty(like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(0)


@torch.library.custom_op(op_name("gated_delta_rule_fla_fwd"), mutates_args=())
def _fla_fwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    alpha: torch.Tensor,
    beta: torch.Tensor,
    D: torch.Tensor | None,
    v_skip: torch.Tensor | None,
    initial_state: torch.Tensor | None,
    scale: float,
    output_final_state: bool,
    out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(o, S_T or empty, g_cumsum, A)``: :func:`fused_forward`, and what its backward reads."""
    o, final_state, saved = fused_forward(
        _entry_points()[0],
        q,
        k,
        v,
        alpha,
        beta,
        D,
        v_skip,
        initial_state,
        scale,
        output_final_state,
        out_dtype,
    )
    g_cumsum, A = saved[-2:]
    return o, (final_state if final_state is not None else _empty(o).float()), g_cumsum, A


@_fla_fwd_op.register_fake
def _(q, k, v, alpha, beta, D, v_skip, initial_state, scale, output_final_state, out_dtype):
    batch, seq_len, v_heads, head_dim_v = v.shape
    o = v.new_empty(v.shape, dtype=out_dtype)
    if output_final_state:
        final_state = v.new_empty((batch, v_heads, k.shape[-1], head_dim_v), dtype=torch.float32)
    else:
        final_state = v.new_empty(0, dtype=torch.float32)
    g_cumsum = v.new_empty((batch, seq_len, v_heads), dtype=torch.float32)
    A = k.new_empty((batch, seq_len, v_heads, _FLA_CHUNK_SIZE))
    return o, final_state, g_cumsum, A


@torch.library.custom_op(op_name("gated_delta_rule_fla_bwd"), mutates_args=())
def _fla_bwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    alpha: torch.Tensor,
    beta: torch.Tensor,
    D: torch.Tensor | None,
    v_skip: torch.Tensor | None,
    initial_state: torch.Tensor | None,
    g_cumsum: torch.Tensor,
    A: torch.Tensor,
    do: torch.Tensor,
    dfinal_state: torch.Tensor | None,
    scale: float,
    need_dv: bool,
    need_dalpha: bool,
) -> list[torch.Tensor]:
    """The eight gradients of :func:`fused_backward`; an empty tensor where there is none."""
    saved = (alpha, D, _contiguous(q), _contiguous(k), _contiguous(v), v_skip, _contiguous(beta),
             None if initial_state is None else _contiguous(initial_state), g_cumsum, A)  # fmt: skip
    grads = fused_backward(
        _entry_points()[1], scale, saved, do, dfinal_state, need_dv=need_dv, need_dalpha=need_dalpha
    )
    return [_empty(do) if grad is None else grad for grad in grads]


@_fla_bwd_op.register_fake
def _(
    q, k, v, alpha, beta, D, v_skip, initial_state, g_cumsum, A, do, dfinal_state, scale, need_dv, need_dalpha
):
    def like(t: torch.Tensor | None, present: bool = True) -> torch.Tensor:
        return t.new_empty(t.shape) if t is not None and present else do.new_empty(0)

    dv_skip_present = D is not None and v_skip is not None
    return [
        like(q), like(k), like(v), like(alpha, need_dalpha), like(beta),
        like(D), like(v_skip, dv_skip_present), like(initial_state),
    ]  # fmt: skip


def _fwd_setup_context(ctx, inputs, output):
    q, k, v, alpha, beta, D, v_skip, initial_state, scale, _output_final_state, _out_dtype = inputs
    _o, _final_state, g_cumsum, A = output
    ctx.mark_non_differentiable(g_cumsum, A)
    ctx.save_for_backward(q, k, v, alpha, beta, D, v_skip, initial_state, g_cumsum, A)
    ctx.scale = scale


def _fwd_backward(ctx, do, dfinal_state, _dg_cumsum, _dA):
    q, k, v, alpha, beta, D, v_skip, initial_state, g_cumsum, A = ctx.saved_tensors
    needs = ctx.needs_input_grad  # (q, k, v, alpha, beta, D, v_skip, initial_state, ...)
    if dfinal_state is not None and dfinal_state.numel() == 0:  # no S_T was returned
        dfinal_state = None
    grads = torch.ops.hdgsa.gated_delta_rule_fla_bwd(
        q, k, v, alpha, beta, D, v_skip, initial_state, g_cumsum, A, do, dfinal_state,
        ctx.scale, needs[2] or needs[5], needs[3],
    )  # fmt: skip
    present = (True, True, True, needs[3], True, D is not None, D is not None and v_skip is not None,
               initial_state is not None)  # fmt: skip
    grads = [
        grad if keep and need else None for grad, keep, need in zip(grads, present, needs[:8], strict=True)
    ]
    return (*grads, None, None, None)


torch.library.register_autograd(
    op_name("gated_delta_rule_fla_fwd"), _fwd_backward, setup_context=_fwd_setup_context
)


def gated_delta_rule_fla_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    alpha: torch.Tensor,
    beta: torch.Tensor,
    D: torch.Tensor | None,
    v_skip: torch.Tensor | None,
    initial_state: torch.Tensor | None,
    scale: float,
    output_final_state: bool,
    out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The fused fla path through its custom op (what ``torch.compile`` traces): ``(o, S_T or None)``."""
    o, final_state, _g_cumsum, _A = torch.ops.hdgsa.gated_delta_rule_fla_fwd(
        q, k, v, alpha, beta, D, v_skip, initial_state, scale, output_final_state, out_dtype
    )
    return o, (final_state if output_final_state else None)
