"""The fla backend: when it can run, and the call into ``fla.ops.gated_delta_rule``.

fla is imported only here and only when the fla path is considered for CUDA tensors
(``import fla`` imports Triton and probes the GPU: slow, and it may be broken).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
import sys
from collections.abc import Callable

import torch

from hdgsa_core import FLA_VERSION, HAS_FLA, HAS_TRITON, TRITON_VERSION, parse_version

__all__ = [
    "FLA_MAX_HEAD_DIM_K",
    "fla_backward_refusal",
    "fla_unavailable_reason",
    "fused_entry_points",
    "run_fla",
]

# fla's chunked kernels keep a [K, BV] state tile per program and assert K <= 256.
FLA_MAX_HEAD_DIM_K = 256

_FLA_MODULE = "fla.ops.gated_delta_rule"


def _import_fla_error() -> str | None:
    """None when ``fla.ops.gated_delta_rule`` imports, else why not. A module that imported
    once is a ``sys.modules`` lookup; a broken install is retried (and fails) each call."""
    if _FLA_MODULE in sys.modules:
        return None
    try:
        importlib.import_module(_FLA_MODULE)
    except Exception as error:
        return f"`import {_FLA_MODULE}` failed: {type(error).__name__}: {error}"
    return None


def fla_backward_refusal() -> str | None:
    """Why fla's gated delta rule backward refuses to run here, or None when it runs.

    fla-core 0.6 raises in the backward (``chunk_bwd_dqkwg``) on Hopper GPUs with
    Triton >= 3.4.0 and < 3.7.1, where those Triton versions miscompiled the kernel and gave
    wrong gradients (fla issue #640), unless fla routes that kernel to TileLang (``tilelang``
    installed, an ``nvcc`` found, ``FLA_TILELANG`` not ``0``). This mirrors fla's own
    condition with fla's own flags, so it can be known before the forward runs. Call only
    once ``fla.ops.gated_delta_rule`` imported.
    """
    fla_utils = importlib.import_module("fla.utils")
    hopper = bool(getattr(fla_utils, "IS_NVIDIA_HOPPER", False))
    triton_from_3_4 = bool(getattr(fla_utils, "TRITON_ABOVE_3_4_0", False))
    triton_from_3_7_1 = bool(getattr(fla_utils, "TRITON_ABOVE_3_7_1", True))
    if not (hopper and triton_from_3_4 and not triton_from_3_7_1):
        return None
    if _tilelang_takes_the_backward():
        return None
    return (
        f"fla-core {FLA_VERSION} refuses the gated delta rule backward on Hopper GPUs with "
        f"Triton >= 3.4.0 and < 3.7.1 (installed: Triton {TRITON_VERSION}), where it computed wrong "
        "gradients (fla issue #640). Install Triton >= 3.7.1 (with a PyTorch built for it), or "
        "`pip install tilelang` with a CUDA toolkit (nvcc) so fla runs that kernel in TileLang; "
        "or run the forward only (torch.no_grad(), or inputs that do not require grad), "
        "or use backend='torch'"
    )


def _tilelang_takes_the_backward() -> bool:
    """True when fla 0.6 would send the refused kernel to its TileLang backend instead."""
    if os.environ.get("FLA_DISABLE_BACKEND_DISPATCH") == "1":
        return False
    try:
        from fla.ops.common.backends.tilelang import CommonTileLangBackend
    except Exception:
        return False
    try:
        return bool(CommonTileLangBackend.is_available() and CommonTileLangBackend().is_enabled())
    except Exception:
        return False


def fla_unavailable_reason(device: torch.device, *, head_dim_k: int, needs_backward: bool) -> str | None:
    """Why ``backend="fla"`` cannot run this call, or None when it can.

    Covers: fla-core missing or older than 0.6, Triton missing, tensors not on CUDA, fla failing
    to import, ``K`` over fla's limit, and, only when a backward will be needed, fla's refusal
    of the backward on Hopper with Triton >= 3.4, < 3.7.1 (:func:`fla_backward_refusal`).
    """
    if not HAS_TRITON:
        return (
            "Triton is not installed (fla's kernels are Triton kernels: "
            "pip install 'hdgsa-deltanet-fla[triton]')"
        )
    if not HAS_FLA:
        if FLA_VERSION is None:
            return "fla-core is not installed (pip install 'fla-core>=0.6')"
        return (
            f"fla-core {FLA_VERSION} is too old or not importable; need fla-core >= 0.6 "
            "(pip install -U 'fla-core>=0.6')"
        )
    if device.type != "cuda":
        return (
            f"the tensors are on {device.type}; fla's kernels run on CUDA tensors only "
            "(backend='torch' runs anywhere)"
        )
    import_error = _import_fla_error()
    if import_error is not None:
        return import_error
    if head_dim_k > FLA_MAX_HEAD_DIM_K:
        return f"fla's chunked kernels support K <= {FLA_MAX_HEAD_DIM_K}, got K = {head_dim_k}"
    if needs_backward:
        return fla_backward_refusal()
    return None


def run_fla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``fla.ops.gated_delta_rule.chunk_gated_delta_rule`` on the canonical layout."""
    fla_gdr = importlib.import_module(_FLA_MODULE)
    return fla_gdr.chunk_gated_delta_rule(
        q, k, v, g, beta, scale=scale, initial_state=initial_state, output_final_state=output_final_state
    )


# The fla-core minor version whose chunk_gated_delta_rule_fwd / _bwd the fused node calls, and the
# parameters it passes them (by name).
_FUSED_FLA_MINOR = (0, 6)
_FUSED_FORWARD_PARAMETERS = ("q", "k", "v", "g", "beta", "scale", "initial_state", "output_final_state")
_FUSED_BACKWARD_PARAMETERS = ("q", "k", "v", "g", "beta", "A", "scale", "initial_state", "do", "dht")


@functools.cache
def _fla_chunk_functions() -> tuple[Callable, Callable] | None:
    """fla's ``chunk_gated_delta_rule_fwd`` and ``_bwd`` where they are what the fused node
    expects (fla-core 0.6.x, parameters by those names), else None. Call only once
    ``fla.ops.gated_delta_rule`` imported. Cached: the installed fla does not change in a process."""
    if parse_version(FLA_VERSION)[:2] != _FUSED_FLA_MINOR:
        return None
    try:
        chunk = importlib.import_module(f"{_FLA_MODULE}.chunk")
        forward, backward = chunk.chunk_gated_delta_rule_fwd, chunk.chunk_gated_delta_rule_bwd
        forward_parameters = inspect.signature(forward).parameters
        backward_parameters = inspect.signature(backward).parameters
    except (ImportError, AttributeError, TypeError, ValueError):
        return None
    if not (
        all(name in forward_parameters for name in _FUSED_FORWARD_PARAMETERS)
        and all(name in backward_parameters for name in _FUSED_BACKWARD_PARAMETERS)
    ):
        return None
    return forward, backward


def _whole_op_backend_active() -> bool:
    """Whether fla would offer the whole op to another backend (FlashQLA, when installed and
    enabled), which its public function dispatches to and the fused node would skip. Read per
    call: the backends' switches are environment variables. Such a backend may still turn a call
    down (FlashQLA takes K = V = 128 only), where fla runs its Triton path; that case takes the
    public function too (same result, more host time). Unknown registry: True."""
    backends = sys.modules.get("fla.backends")
    if getattr(backends, "_DISPATCH_DISABLED", False):  # FLA_DISABLE_BACKEND_DISPATCH=1
        return False
    registries = getattr(backends, "_operation_registries", None)
    if not isinstance(registries, dict):
        return True
    registry = registries.get("gated_delta_rule")
    if registry is None:
        return False
    try:
        return registry.get_active() is not None
    except Exception:
        return True


def fused_entry_points() -> tuple[Callable, Callable] | None:
    """fla's chunked forward and backward for :class:`._fla_fused.FusedGatedDeltaRule`, or None
    when the fla path must call fla's public ``chunk_gated_delta_rule`` instead: another fla-core
    minor version than 0.6 (the two functions are fla internals), or a whole-op backend that fla
    would dispatch to. Call only once ``fla.ops.gated_delta_rule`` imported (the fla path has)."""
    functions = _fla_chunk_functions()
    if functions is None or _whole_op_backend_active():
        return None
    return functions
