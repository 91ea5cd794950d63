"""``gated_delta_rule``: argument checks, layouts, alpha -> log-decay, D skip, backend choice."""

from __future__ import annotations

import functools
import types
import warnings

import torch

from hdgsa_core import (
    FLOAT_DTYPES,
    autocast_disabled,
    check_bool,
    check_dtype,
    check_int,
    check_ndim,
    check_real,
    check_same_device,
    check_same_dtype,
    check_shape,
    resolve_backend,
)
from hdgsa_core.custom_ops import is_compiling

from . import _fla
from ._fla import fla_unavailable_reason
from .reference import ALPHA_MIN, chunk_gated_delta_rule_torch

__all__ = ["ALPHA_MIN", "gated_delta_rule", "gated_delta_rule_backends"]

_OP = "gated_delta_rule"
_FLOAT_DTYPE_SET = frozenset(FLOAT_DTYPES)


def _per_step(
    name: str, x: torch.Tensor, batch: int, seq_len: int, heads: int, note: str = ""
) -> torch.Tensor:
    """``[B, T, HV]`` or ``[B, T, HV, 1]`` -> a ``[B, T, HV]`` view (``note`` says where HV is from)."""
    check_ndim(name, x, (3, 4), f"[B, T, HV] or [B, T, HV, 1]{note}")
    if x.dim() == 4:
        check_shape(name, x, (batch, seq_len, heads, 1), f"[B, T, HV, 1]{note}")
        return x.squeeze(-1)
    check_shape(name, x, (batch, seq_len, heads), f"[B, T, HV]{note}")
    return x


def _positive(name: str, size: int, what: str) -> None:
    if size <= 0:
        raise ValueError(f"{name}: {what} must be positive, got {size}")


def _check_arguments(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    alpha: torch.Tensor,
    beta: torch.Tensor,
    D: torch.Tensor | None,
    num_heads: int | None,
    scale: float | None,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    compute_dtype: torch.dtype | None,
    backend: str,
) -> tuple:
    """Every argument check of :func:`gated_delta_rule`, before anything runs.

    Returns ``(device, packed, B, T, K, q4, k4, v4, alpha3, beta3, scale)``: the tensors'
    device, whether the inputs came packed, the batch and sequence sizes, the key head
    dimension, ``q``/``k``/``v`` as ``[B, T, H(V), K(V)]`` views, ``alpha``/``beta`` as
    ``[B, T, HV]`` views and the resolved output scale (a plain tuple: this runs on every call).
    """
    # Every check below is a cheap test first; the hdgsa_core checker (which raises with the
    # documented message) runs only when that test fails. fla's forward at B4 T4096 H16 D128 is
    # host-bound, so each microsecond of Python here shows in eager timings.
    if not (
        type(q) is torch.Tensor
        and type(k) is torch.Tensor
        and type(v) is torch.Tensor
        and type(alpha) is torch.Tensor
        and type(beta) is torch.Tensor
        and q.dtype in _FLOAT_DTYPE_SET
        and k.dtype in _FLOAT_DTYPE_SET
        and v.dtype in _FLOAT_DTYPE_SET
        and alpha.dtype in _FLOAT_DTYPE_SET
        and beta.dtype in _FLOAT_DTYPE_SET
    ):
        for name, tensor in (("q", q), ("k", k), ("v", v), ("alpha", alpha), ("beta", beta)):
            check_dtype(name, tensor)
    if D is not None and (type(D) is not torch.Tensor or D.dtype not in _FLOAT_DTYPE_SET):
        check_dtype("D", D)
    if initial_state is not None and (
        type(initial_state) is not torch.Tensor or initial_state.dtype not in _FLOAT_DTYPE_SET
    ):
        check_dtype("initial_state", initial_state)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        check_same_dtype("q", q, k=k, v=v)
    if compute_dtype is not None and compute_dtype not in FLOAT_DTYPES:
        raise TypeError(f"compute_dtype: expected None or one of {FLOAT_DTYPES}, got {compute_dtype!r}")
    if num_heads is not None:
        check_int("num_heads", num_heads)
        num_heads = int(num_heads)
    if scale is not None:
        check_real("scale", scale)
    if output_final_state is not False and output_final_state is not True:
        check_bool("output_final_state", output_final_state)
    if backend == "triton":
        raise ValueError(
            f"{_OP}: backend must be one of ('auto', 'fla', 'torch'), got 'triton': this op's "
            "accelerated backend is fla's Triton kernels, named backend='fla' "
            "(HDGSA_BACKEND=triton selects it too)"
        )
    device = q.device
    if (
        k.device != device
        or v.device != device
        or alpha.device != device
        or beta.device != device
        or (D is not None and D.device != device)
        or (initial_state is not None and initial_state.device != device)
    ):
        device = check_same_device(q=q, k=k, v=v, alpha=alpha, beta=beta, D=D, initial_state=initial_state)

    q_dims = q.dim()
    if q_dims != 4 and q_dims != 3:
        check_ndim("q", q, (3, 4), "[B, T, H, K] or [B, T, H*K] (with num_heads)")
    packed = q_dims == 3
    batch, seq_len = q.shape[:2]
    if packed:
        if num_heads is None:
            raise ValueError(f"num_heads: required with packed q of shape {list(q.shape)} ([B, T, H*K])")
        _positive("num_heads", num_heads, "the number of heads")
        if q.shape[2] % num_heads:
            raise ValueError(f"q: last dimension {q.shape[2]} is not divisible by num_heads={num_heads}")
        heads, head_dim_k = num_heads, q.shape[2] // num_heads
        if k.shape != q.shape:
            check_shape("k", k, tuple(q.shape), "[B, T, H*K]")
        if v.dim() != 3:
            check_ndim("v", v, 3, "[B, T, HV*V] (packed, like q)")
        if v.shape[0] != batch or v.shape[1] != seq_len:
            check_shape("v", v, (batch, seq_len, None), "[B, T, HV*V]")
        # The number of value heads HV is alpha's third dimension (HV = H but for GVA).
        if alpha.dim() != 3 and alpha.dim() != 4:
            check_ndim("alpha", alpha, (3, 4), "[B, T, HV] or [B, T, HV, 1]")
        v_heads = alpha.shape[2]
        _positive("alpha", v_heads, "the number of value heads (alpha.shape[2])")
        if v_heads == heads and v.shape[2] % v_heads:
            raise ValueError(
                f"v: last dimension {v.shape[2]} is not divisible by the number of value heads "
                f"HV={v_heads} (alpha.shape[2])"
            )
        if v.shape[2] % v_heads or v_heads % heads:
            raise ValueError(
                f"alpha: expected shape [B, T, HV] = [{batch}, {seq_len}, HV] with HV (the number of "
                f"value heads: num_heads={heads}, or a multiple of it for GVA) dividing v's last "
                f"dimension {v.shape[2]}, got shape {list(alpha.shape)}"
            )
        head_dim_v = v.shape[2] // v_heads
        # Splitting one dimension is always a view (unflatten does the same, with more Python).
        q4 = q.view(batch, seq_len, heads, head_dim_k)
        k4 = k.view(batch, seq_len, heads, head_dim_k)
        v4 = v.view(batch, seq_len, v_heads, head_dim_v)
    else:
        heads, head_dim_k = q.shape[2], q.shape[3]
        if num_heads is not None and num_heads != heads:
            raise ValueError(
                f"num_heads: {num_heads} does not match q's head dimension {heads} ([B, T, H, K])"
            )
        if k.shape != q.shape:
            check_shape("k", k, tuple(q.shape), "[B, T, H, K]")
        if v.dim() != 4:
            check_ndim("v", v, 4, "[B, T, HV, V] (unpacked, like q)")
        if v.shape[0] != batch or v.shape[1] != seq_len:
            check_shape("v", v, (batch, seq_len, None, None), "[B, T, HV, V]")
        v_heads, head_dim_v = v.shape[2], v.shape[3]
        q4, k4, v4 = q, k, v
    if heads <= 0 or head_dim_k <= 0 or v_heads <= 0 or head_dim_v <= 0:
        _positive("q", heads, "the number of heads H")
        _positive("q", head_dim_k, "the head dimension K")
        _positive("v", v_heads, "the number of value heads HV")
        _positive("v", head_dim_v, "the head dimension V")
    if v_heads % heads:
        raise ValueError(
            f"v: the number of value heads HV={v_heads} must be a multiple of the number of "
            f"query/key heads H={heads} (GVA)"
        )
    per_step_shape = (batch, seq_len, v_heads)
    # In the packed layout HV and V come from alpha: say so where a mismatch may be alpha's fault.
    note = " (HV = alpha.shape[2], V = v.shape[2] // HV)" if packed else ""
    alpha3 = alpha if alpha.shape == per_step_shape else _per_step("alpha", alpha, batch, seq_len, v_heads)
    beta3 = beta if beta.shape == per_step_shape else _per_step("beta", beta, batch, seq_len, v_heads, note)
    if D is not None and D.shape != (v_heads,):
        check_shape("D", D, (v_heads,), f"[HV]{note}")
    if initial_state is not None and initial_state.shape != (batch, v_heads, head_dim_k, head_dim_v):
        check_shape(
            "initial_state", initial_state, (batch, v_heads, head_dim_k, head_dim_v), f"[B, HV, K, V]{note}"
        )
    scale = head_dim_k**-0.5 if scale is None else float(scale)
    return device, packed, batch, seq_len, head_dim_k, q4, k4, v4, alpha3, beta3, scale


def gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    alpha: torch.Tensor,
    beta: torch.Tensor,
    D: torch.Tensor | None = None,
    num_heads: int | None = None,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    compute_dtype: torch.dtype | None = None,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    r"""The gated delta rule (Gated DeltaNet), on fla's chunked kernels or in chunked PyTorch.

    Per batch element and value head, with state ``S`` ``[K, V]`` (zeros or ``initial_state``),
    ``g_t = log(clamp(alpha_t, min=1e-6))``::

        S_t = alpha_t * S_{t-1} + k_t (beta_t * (v_t - (alpha_t * S_{t-1})^T k_t))^T
        o_t = scale * S_t^T q_t  (+ D[h] * v_t when D is given)

    Layouts (``H`` query/key heads, ``HV`` value heads, ``HV`` a multiple of ``H``):

    - unpacked: ``q``, ``k`` ``[B, T, H, K]``, ``v`` ``[B, T, HV, V]``; ``o`` ``[B, T, HV, V]``.
    - packed: ``q``, ``k`` ``[B, T, H*K]``, ``v`` ``[B, T, HV*V]`` with ``num_heads=H``; ``HV``
      is read from ``alpha``'s third dimension; ``o`` comes back packed, ``[B, T, HV*V]``. The
      heads are split with views (no copy).

    GVA (grouped value attention, as fla): with ``HV > H``, value head ``h`` uses query/key head
    ``h // (HV // H)``; ``alpha``, ``beta``, ``D`` and the state are per value head. ``HV == H``
    is the plain case.

    Args:
        q: queries ``[B, T, H, K]``, or ``[B, T, H*K]`` with ``num_heads``. float32, float16 or
            bfloat16; any strides.
        k: keys, the shape and dtype of ``q``. (fla does not normalise them: do it before, as
            Gated DeltaNet layers do, for a stable recurrence.)
        v: values ``[B, T, HV, V]`` or ``[B, T, HV*V]``, ``q``'s dtype.
        alpha: per-step decay in (0, 1], ``[B, T, HV]`` or ``[B, T, HV, 1]``, float32, float16
            or bfloat16 (need not be ``q``'s dtype: e.g. float32 gates with bf16 ``q``). Clamped
            to at least 1e-6 before the log (0 is allowed; the clamped entries get no gradient);
            values are not checked (no host sync).
        beta: per-step write strength ``[B, T, HV]`` or ``[B, T, HV, 1]``, any of the three
            float dtypes, like ``alpha``.
        D: optional skip weight ``[HV]``, any of the three float dtypes: adds ``D[h] * v_t`` to
            the output. None: no skip.
        num_heads: ``H`` for the packed layout (required there); with unpacked inputs it may be
            given and must equal ``q.shape[2]``.
        scale: output scale (a real number); None means ``K ** -0.5``.
        initial_state: ``[B, HV, K, V]`` state before step 1, any of the three float dtypes
            (read in float32); None means zeros.
        output_final_state: also return the state after the last step.
        compute_dtype: None runs fla in the inputs' dtype (no copies); e.g. ``torch.float32``
            casts ``q``, ``k``, ``v``, ``beta`` before fla (as the seed wrapper always did). The
            torch backend computes in float32 whatever this says (it never goes below it), so
            there ``None`` and ``torch.float32`` give bitwise the same result.
        backend: ``"auto"``, ``"fla"`` or ``"torch"`` (``"triton"`` is not a name here: a
            ``ValueError`` pointing to ``"fla"``). ``auto`` takes fla when it can run this call
            (fla-core >= 0.6 importable, CUDA tensors, ``K <= 256``, and, if a backward will be
            needed, fla's backward not refused here: see the README), else torch (with a
            ``UserWarning`` saying why when the tensors are on CUDA). ``HDGSA_BACKEND=torch``,
            ``fla`` or ``triton`` (= ``fla``) overrides ``auto``.

    The torch backend runs with autocast turned off (float32 inside, as outside an autocast
    region); fla's kernels ignore autocast. Outputs keep ``q.dtype`` either way.

    Returns:
        ``o`` in ``q.dtype`` (``[B, T, HV, V]``, or ``[B, T, HV*V]`` when packed); with
        ``output_final_state``, ``(o, S_T)``, ``S_T`` ``[B, HV, K, V]`` float32. Gradients flow
        to ``q``, ``k``, ``v``, ``alpha``, ``beta``, ``D`` and ``initial_state``.

    Raises:
        ValueError: a wrong rank or shape (the message names the argument, the expected and
            the actual shape), ``num_heads`` missing or not dividing ``q``'s last dimension,
            ``HV`` not a multiple of ``H``, tensors on different devices, an unknown backend
            name (argument or ``HDGSA_BACKEND``). All checked before anything runs, empty
            inputs included.
        TypeError: a non-tensor or an unsupported dtype (float64, integers), ``k``/``v`` not
            in ``q``'s dtype, a bad ``compute_dtype``, ``num_heads`` not an int, ``scale`` not
            a real number, ``output_final_state`` not a bool.
        RuntimeError: ``backend="fla"`` cannot run this call (the message says why and what to
            install); this includes a backward fla 0.6 refuses on Hopper with Triton
            >= 3.4, < 3.7.1.

    Example:
        >>> import torch
        >>> from hdgsa_deltanet_fla import gated_delta_rule
        >>> B, T, H, K = 2, 100, 4, 32
        >>> q = torch.randn(B, T, H * K)
        >>> k = torch.nn.functional.normalize(torch.randn(B, T, H, K), dim=-1).flatten(2)
        >>> v = torch.randn(B, T, H * K)
        >>> alpha, beta = torch.rand(B, T, H), torch.rand(B, T, H)
        >>> o, state = gated_delta_rule(q, k, v, alpha, beta, torch.ones(H), num_heads=H,
        ...                             output_final_state=True, backend="torch")
        >>> o.shape, state.shape
        (torch.Size([2, 100, 128]), torch.Size([2, 4, 32, 32]))
    """
    (device, packed, batch, seq_len, head_dim_k, q4, k4, v4, alpha3, beta3, scale) = _check_arguments(
        q, k, v, alpha, beta, D, num_heads, scale, initial_state, output_final_state, compute_dtype, backend
    )

    needs_backward = torch.is_grad_enabled() and (
        q.requires_grad
        or k.requires_grad
        or v.requires_grad
        or alpha.requires_grad
        or beta.requires_grad
        or (D is not None and D.requires_grad)
        or (initial_state is not None and initial_state.requires_grad)
    )
    fla_reasons: list[str | None] = []

    def unavailable_reason(dev: torch.device) -> str | None:
        reason = fla_unavailable_reason(dev, head_dim_k=head_dim_k, needs_backward=needs_backward)
        fla_reasons.append(reason)
        return reason

    chosen = resolve_backend(
        backend, device, op=_OP, accelerated="fla", unavailable_reason=unavailable_reason
    )
    fla_reason = fla_reasons[-1] if fla_reasons else None
    if batch == 0 or seq_len == 0:
        # After the backend choice: a backend that cannot run raises even for empty inputs.
        return _empty_result(
            (q, k, v4, alpha, beta, D), q.dtype, initial_state, head_dim_k, packed, output_final_state
        )
    if chosen == "fla":
        o, final_state = _run_fla_path(
            q4,
            k4,
            v4,
            alpha3,
            beta3,
            D,
            scale,
            initial_state,
            output_final_state,
            compute_dtype,
            needs_backward,
        )
    else:
        if backend == "auto" and device.type == "cuda" and fla_reason is not None:
            warnings.warn(
                f"{_OP}: backend='auto' runs the (slower) PyTorch backend because fla cannot run this "
                f"call: {fla_reason}",
                stacklevel=2,
            )
        o, final_state = _run_torch_path(q4, k4, v4, alpha3, beta3, D, scale, initial_state, q.dtype)
    if packed:
        o = o.flatten(-2)
    return (o, final_state) if output_final_state else o


def gated_delta_rule_backends(
    device: torch.device | str, *, needs_backward: bool = True, head_dim_k: int = 64
) -> list[str]:
    """The backends ``gated_delta_rule`` can run on ``device`` here, ``"torch"`` first.

    Args:
        device: where the tensors would live (a ``torch.device`` or a string like ``"cuda"``).
        needs_backward: True leaves fla out where it would refuse the backward (self-checks and
            tests compare gradients); False asks about the forward only.
        head_dim_k: the key head dimension ``K`` (fla runs ``K <= 256`` only).

    Returns:
        ``["torch"]`` or ``["torch", "fla"]``.

    Example:
        >>> from hdgsa_deltanet_fla import gated_delta_rule_backends
        >>> gated_delta_rule_backends("cpu")
        ['torch']
    """
    device = torch.device(device)
    backends = ["torch"]
    if fla_unavailable_reason(device, head_dim_k=head_dim_k, needs_backward=needs_backward) is None:
        backends.append("fla")
    return backends


def _empty_result(
    inputs: tuple[torch.Tensor | None, ...],
    dtype: torch.dtype,
    initial_state: torch.Tensor | None,
    head_dim_k: int,
    packed: bool,
    output_final_state: bool,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """B = 0 or T = 0: no step runs. ``o`` is empty and the final state is the initial one.

    ``inputs`` is ``(q, k, v4, alpha, beta, D)``, ``v4`` ``[B, T, HV, V]``. ``o`` is built from
    all of them (and ``initial_state``) times zero, so every input stays in the autograd graph
    and gets a zero gradient of its shape (``D`` and the state are not empty), as with any op.
    """
    v4 = inputs[2]
    batch, _, v_heads, head_dim_v = v4.shape
    o = v4.to(dtype) * 0
    for tensor in (*inputs, initial_state):
        if tensor is not None and tensor is not v4:
            # Adding a 0-dim value to an empty tensor leaves it empty (a NaN or inf input
            # cannot show up in o); its gradient is the sum of nothing, 0.
            o = o + (tensor.sum() * 0).to(dtype)
    if packed:
        o = o.flatten(-2)
    if not output_final_state:
        return o
    if initial_state is not None:
        final_state = initial_state.to(torch.float32, copy=True)
    else:
        final_state = torch.zeros(
            batch, v_heads, head_dim_k, head_dim_v, dtype=torch.float32, device=v4.device
        )
    return o, final_state


@functools.cache
def _triton_module() -> types.ModuleType:
    """``._triton``, imported on the first fla call (it imports Triton); then a cached lookup."""
    from . import _triton

    return _triton


@functools.cache
def _fused_module() -> types.ModuleType:
    """``._fla_fused``, imported on the first fla call that can use it; then a cached lookup."""
    from . import _fla_fused

    return _fla_fused


def _run_fla_path(
    q4: torch.Tensor,
    k4: torch.Tensor,
    v4: torch.Tensor,
    alpha3: torch.Tensor,
    beta3: torch.Tensor,
    D: torch.Tensor | None,
    scale: float,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    compute_dtype: torch.dtype | None,
    needs_backward: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    out_dtype = q4.dtype
    q_in, k_in, v_in, beta_in = q4, k4, v4, beta3
    if compute_dtype is not None and compute_dtype != q4.dtype:
        q_in, k_in, v_in = q4.to(compute_dtype), k4.to(compute_dtype), v4.to(compute_dtype)
    if compute_dtype is not None and compute_dtype != beta3.dtype:
        beta_in = beta3.to(compute_dtype)
    # With compute_dtype casting v, the D skip reads the caller's v (as on the public path).
    v_skip = None if D is None or v_in is v4 else v4
    fused = _run_fla_fused(
        (q_in, k_in, v_in, alpha3, beta_in, D, v_skip, initial_state, scale, output_final_state, out_dtype),
        needs_backward,
    )
    if fused is not None:
        return fused
    return _run_fla_public(
        q_in, k_in, v_in, alpha3, beta_in, D, v4, scale, initial_state, output_final_state, out_dtype
    )


def _run_fla_fused(args: tuple, needs_backward: bool) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """The fla path as one autograd node (:mod:`._fla_fused`), ``args`` as its ``apply`` takes
    them after fla's two functions; None where it cannot be (:func:`_fla.fused_entry_points`).

    Under ``torch.compile`` the node is the custom op ``hdgsa::gated_delta_rule_fla_fwd``, which
    Dynamo traces without a graph break; where the fused path cannot run, the eager call below
    (excluded from tracing, so a graph break) calls fla's public function."""
    if is_compiling() and _fused_path_available():
        from ._fla_fused import gated_delta_rule_fla_op

        return gated_delta_rule_fla_op(*args)
    return _run_fla_fused_eager(args, needs_backward)


@torch.compiler.assume_constant_result  # read once while tracing; the installed fla does not change
def _fused_path_available() -> bool:
    return _fla.fused_entry_points() is not None


@torch.compiler.disable  # as fla's public function: Dynamo does not trace into fla (nor this choice)
def _run_fla_fused_eager(
    args: tuple, needs_backward: bool
) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    fused = _fla.fused_entry_points()
    if fused is None:
        return None
    _fla_fused = _fused_module()
    if needs_backward:
        return _fla_fused.FusedGatedDeltaRule.apply(*fused, *args)
    # Nothing to record: the Function's own host time is skipped too.
    o, final_state, _ = _fla_fused.fused_forward(fused[0], *args)
    return o, final_state


def _run_fla_public(
    q_in: torch.Tensor,
    k_in: torch.Tensor,
    v_in: torch.Tensor,
    alpha3: torch.Tensor,
    beta_in: torch.Tensor,
    D: torch.Tensor | None,
    v4: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The fla path through fla's public ``chunk_gated_delta_rule``, with our log-decay and D-skip
    kernels as autograd nodes of their own around it (see :func:`_fla.fused_entry_points`)."""
    _triton = _triton_module()
    # Without autograd the launchers are called directly: the autograd.Function costs CPU
    # time, and at B4 T4096 H16 D128 fla's forward is close to launch-bound.
    grad = torch.is_grad_enabled()
    if grad and alpha3.requires_grad:
        g = _triton.log_decay(alpha3)  # one pass: float32 log(clamp(alpha, 1e-6))
    else:
        g = _triton.log_decay_fwd(alpha3)
    o, final_state = _fla.run_fla(q_in, k_in, v_in, g, beta_in, scale, initial_state, output_final_state)
    if D is not None:
        # One pass, and the cast back to q's dtype comes with it.
        if grad and (o.requires_grad or v4.requires_grad or D.requires_grad):
            o = _triton.d_skip(o, v4, D, out_dtype)
        else:
            o = _triton.d_skip_fwd(o, v4, D, out_dtype)
    elif o.dtype != out_dtype:
        o = o.to(out_dtype)
    if final_state is not None and final_state.dtype != torch.float32:
        final_state = final_state.float()
    return o, final_state


def _run_torch_path(
    q4: torch.Tensor,
    k4: torch.Tensor,
    v4: torch.Tensor,
    alpha3: torch.Tensor,
    beta3: torch.Tensor,
    D: torch.Tensor | None,
    scale: float,
    initial_state: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    compute = torch.float32
    # float32 inside (docs/api.md). An autocast region around the caller would otherwise run the
    # chunked matmuls in bf16/fp16 (a 1e-2 error on the output, worse in the state).
    with autocast_disabled(q4.device):
        g = alpha3.to(compute).clamp(min=ALPHA_MIN).log()
        o, final_state = chunk_gated_delta_rule_torch(
            q4, k4, v4, g, beta3, scale, initial_state, compute_dtype=compute
        )
        if D is not None:
            o = torch.addcmul(o, D.to(compute).unsqueeze(-1), v4.to(compute))
    # One copy into a contiguous [B, T, HV, V] in the output dtype (``to`` alone skips the
    # copy, and keeps the chunked layout's strides, when the dtype already matches).
    if o.dtype == out_dtype:
        return o.contiguous(), final_state
    return o.to(out_dtype, memory_format=torch.contiguous_format), final_state
