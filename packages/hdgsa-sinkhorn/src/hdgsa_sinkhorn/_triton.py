"""Triton Sinkhorn-Knopp: kernels -> host launchers -> autograd Function and torch.library custom op.

Layout. A program takes ``BLOCK`` matrices. Each matrix is held as a tuple of its ``N`` rows, each
row a ``[BLOCK, BN]`` block (``BN = next_power_of_2(n)``, padded columns masked to 0). Triton lays a
``[BLOCK, BN]`` row block out with one 16-byte vector per thread, so for ``n <= 4`` one thread owns
whole rows, and since the ``N`` row blocks share that layout, one thread owns whole matrices: row
sums and column sums (the sum of the row blocks) never leave the thread, no shuffles, no shared
memory. For ``n = 8`` a row spans two threads (one shuffle per row sum). Logits are read once and
``P`` written once; every iteration runs in registers.

Scaling form (forward, n <= 8). ``P = diag(u) K diag(v)``: a row step is ``u_i <- u_i / (u_i (K
v)_i + eps)`` (``u_i (K v)_i`` is row i's sum), a column step likewise for ``v``, so an iteration
multiplies the matrix only inside the two matrix-vector sums, and ``P`` is formed once per block
of 4 iterations (``K <- P``, ``u = v = 1``), which bounds ``u`` and ``v`` (see ``_iterations``).
Its 8 reciprocals per iteration (n = 4) run on the MUFU unit, 16 per SM per clock on an H100, and
bound the n = 4 forward (about 45 us of the 1M-matrix forward's 64); pairing rows
(``1 / a = b / (a b)``) moves a quarter of them to the FMA pipe.

Backward. ``P_k`` is the matrix after iteration ``k``; ``Z_k = P_{k-1} / (r_k + eps)`` the matrix
after its row step, ``re_k = r_k + eps``, ``ce_k = c_k + eps`` its normalizers. With
``Q_k = dP_k * P_k`` (the gradient times the value, elementwise), one iteration backwards is::

    s = Q_k.sum(-2)                        # column step, adjoint
    W = Q_k - s[None, :] * P_k
    t = W.sum(-1)                          # row step, adjoint
    Q_{k-1} = W - t[:, None] * Z_k

and ``d logits = Q_0`` (plus the path through the max: ``-sum(Q_0)`` shared by the tied maxima).
This is exactly the gradient of the division steps (``dX = (dY - rowsum(dY * Y)) / (r + eps)``,
multiplied through by ``X``), but it never multiplies a gradient by ``1 / eps``, so entries that
underflow to 0 (logits of +-1e4) give 0 instead of ``inf * 0``. ``Z_k`` and ``P_{k-1}`` are rebuilt
from ``P_k`` by multiplying back the normalizers (``Z_k = P_k * ce_k``, ``P_{k-1} = Z_k * re_k``),
so the backward needs only the ``2 n`` normalizers of each iteration, not the matrices.

Those normalizers come from recomputing the forward inside the backward kernel. They live in
registers, in a tuple indexed by compile-time step numbers; ``2 n`` floats per iteration per
matrix (8 for n = 4, 160 for 20 iterations) fit, 2 n * 50 for n = 32 do not. So the iterations are
cut into segments of ``SEG`` (chosen on the host from n): the backward runs the segments last to
first, each time recomputing the forward from ``P_0`` up to the segment's start (a plain loop), then
the segment's ``SEG`` iterations keeping their normalizers, then the segment backwards. With one
segment (n = 4 and 20 iterations) that is one forward recompute and one backward sweep; ``S``
segments cost ``S (S - 1) / 2 * SEG`` extra forward iterations. A global-memory scratch for the
normalizers would cost more bytes than the logits themselves (160 floats against 16 per matrix).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from hdgsa_core.capabilities import interpreter_enabled
from hdgsa_core.custom_ops import is_compiling, op_name
from hdgsa_core.launch import CachedLauncher
from hdgsa_core.triton_utils import cdiv, device_guard, next_power_of_2

__all__ = ["sinkhorn_knopp_bwd", "sinkhorn_knopp_fwd", "sinkhorn_knopp_triton"]


# ---------------------------------------------------------------------------------------------
# Device helpers: a matrix is a tuple of N row blocks [BLOCK, BN] (float32). Tuples grow by
# concatenation (``t = t + (x,)``): what Triton's frontend accepts (hence the RUF005 noqa).
# ---------------------------------------------------------------------------------------------


@triton.jit
def _row_offsets(o_b, o_j, i, stride_b, stride_i, stride_j, N: tl.constexpr, CONTIGUOUS: tl.constexpr):
    # Contiguous [M, n, n] gets compile-time strides so the loads vectorize (16-byte rows for n = 4).
    if CONTIGUOUS:
        return o_b[:, None] * (N * N) + (i * N) + o_j[None, :]
    else:
        return o_b[:, None] * stride_b + i * stride_i + o_j[None, :] * stride_j


@triton.jit
def _load_rows(
    ptr, o_b, o_j, mask, stride_b, stride_i, stride_j, other, N: tl.constexpr, CONTIGUOUS: tl.constexpr
):
    rows = ()
    for i in tl.static_range(N):
        o = _row_offsets(o_b, o_j, i, stride_b, stride_i, stride_j, N, CONTIGUOUS)
        rows = rows + (tl.load(ptr + o, mask=mask, other=other).to(tl.float32),)  # noqa: RUF005
    return rows


@triton.jit
def _logit_padding(o_j, N: tl.constexpr, BN: tl.constexpr):
    # Padded columns read -inf (so exp gives 0); matrices past the end read 0, not -inf, so that
    # their unused lanes stay finite (exp(-inf - -inf) would be NaN).
    if N == BN:
        return 0.0
    else:
        return tl.where(o_j < N, 0.0, float("-inf"))[None, :]


@triton.jit
def _load_logits(
    x,
    M,
    stride_xb,
    stride_xi,
    stride_xj,
    N: tl.constexpr,
    BN: tl.constexpr,
    BLOCK: tl.constexpr,
    CONTIGUOUS: tl.constexpr,
):
    """This program's ``BLOCK`` matrices: offsets ``o_b`` (matrices) and ``o_j`` (columns), the
    mask ``m_bj`` and the logits as N row blocks [BLOCK, BN] in float32."""
    i_p = tl.program_id(0)
    o_b = i_p.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    o_j = tl.arange(0, BN)
    if N == BN:
        m_bj = (o_b < M)[:, None]
    else:
        m_bj = (o_b < M)[:, None] & (o_j < N)[None, :]
    rows = _load_rows(
        x, o_b, o_j, m_bj, stride_xb, stride_xi, stride_xj, _logit_padding(o_j, N, BN), N, CONTIGUOUS
    )
    return o_b, o_j, m_bj, rows


@triton.jit
def _store_rows(ptr, rows, o_b, o_j, mask, N: tl.constexpr):
    for i in tl.static_range(N):
        o = o_b[:, None] * (N * N) + (i * N) + o_j[None, :]
        tl.store(ptr + o, rows[i].to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _max_propagating_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _exp_minus_max(rows, N: tl.constexpr):
    """P_0 = exp(L - max(L)), and max(L) per matrix [BLOCK]. The max propagates NaN, as
    ``torch.amax`` does (``tl.max`` would skip it): a NaN logit makes its whole matrix NaN on
    both backends, also with 0 iterations."""
    b_max = tl.reduce(rows[0], 1, _max_propagating_nan)
    for i in tl.static_range(1, N):
        b_max = _max_propagating_nan(b_max, tl.reduce(rows[i], 1, _max_propagating_nan))
    probs = ()
    for i in tl.static_range(N):
        probs = probs + (tl.exp(rows[i] - b_max[:, None]),)  # noqa: RUF005
    return probs, b_max


@triton.jit
def _reciprocal(x, FAST_DIV: tl.constexpr):
    # Plain "1 / x" is div.full.f32: a range check and rescale around each MUFU.RCP, about 7
    # instructions, a tenth of an iteration. The normalizers are sums + eps in [eps, n], where
    # rcp.approx (one MUFU.RCP, 1 ulp) is exact enough. The interpreter runs no PTX: it divides.
    if FAST_DIV:
        return tl.inline_asm_elementwise(
            "rcp.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        return 1.0 / x


@triton.jit
def _column_denominators(b_sums, eps, N: tl.constexpr, BN: tl.constexpr):
    """``column sum + eps`` ([BLOCK, BN]), and 1 in the padded columns (``n`` not a power of two):
    their sum is 0, and ``1 / (0 + eps)`` is inf for ``eps = 0`` (huge for a subnormal eps), so
    dividing by it would make ``0 * inf = NaN`` there, which the next row sum takes in. With 1 the
    padded entries stay 0 and never enter a sum or a division."""
    if N == BN:
        return b_sums + eps
    else:
        return tl.where((tl.arange(0, BN) < N)[None, :], b_sums + eps, 1.0)


@triton.jit
def _iteration(rows, eps, N: tl.constexpr, BN: tl.constexpr, FAST_DIV: tl.constexpr):
    """One Sinkhorn iteration (rows, then columns); returns the new rows and both normalizers:
    ``re`` (tuple of N [BLOCK], row sum + eps) and ``ce`` ([BLOCK, BN], column sum + eps; 1 in
    padded columns)."""
    normalized = ()
    row_norms = ()
    for i in tl.static_range(N):
        b_re = tl.sum(rows[i], axis=1) + eps
        normalized = normalized + (rows[i] * _reciprocal(b_re, FAST_DIV)[:, None],)  # noqa: RUF005
        row_norms = row_norms + (b_re,)  # noqa: RUF005
    b_ce = normalized[0]
    for i in tl.static_range(1, N):
        b_ce = b_ce + normalized[i]
    b_ce = _column_denominators(b_ce, eps, N, BN)
    b_ic = _reciprocal(b_ce, FAST_DIV)
    out = ()
    for i in tl.static_range(N):
        out = out + (normalized[i] * b_ic,)  # noqa: RUF005
    return out, row_norms, b_ce


@triton.jit
def _ones_like_norms(rows, N: tl.constexpr):
    """Row factors (tuple of N [BLOCK]) and column factors ([BLOCK, BN]), all 1."""
    row_norms = ()
    for _ in tl.static_range(N):
        row_norms = row_norms + (tl.full([rows[0].shape[0]], 1.0, tl.float32),)  # noqa: RUF005
    return row_norms, tl.full(rows[0].shape, 1.0, tl.float32)


@triton.jit
def _row_reciprocals(denoms, N: tl.constexpr, FAST_DIV: tl.constexpr, PAIR_ROWS: tl.constexpr):
    """``1 / d`` for the N row denominators. With PAIR_ROWS, two rows share one reciprocal
    (``1 / a = b / (a b)``): one MUFU op and three FMA-pipe ops instead of two MUFU ops. Only for
    denominators in [eps, n + eps] with eps >= 1e-8, so that ``a b`` stays a normal float."""
    inv = ()
    if PAIR_ROWS:
        for i in tl.static_range(0, N, 2):
            b_inv_ab = _reciprocal(denoms[i] * denoms[i + 1], FAST_DIV)
            inv = inv + (b_inv_ab * denoms[i + 1], b_inv_ab * denoms[i])  # noqa: RUF005
    else:
        for i in tl.static_range(N):
            inv = inv + (_reciprocal(denoms[i], FAST_DIV),)  # noqa: RUF005
    return inv


@triton.jit
def _scaled_iteration(
    kern, u, v, eps, N: tl.constexpr, BN: tl.constexpr, FAST_DIV: tl.constexpr, PAIR_ROWS: tl.constexpr
):
    """One iteration in scaling form, ``P = diag(u) kern diag(v)``: the same row and column sums
    as :func:`_iteration` (``u_i (kern v)_i`` is row i's sum), but only u and v are updated."""
    denoms = ()
    for i in tl.static_range(N):
        denoms = denoms + (u[i] * tl.sum(kern[i] * v, axis=1) + eps,)  # noqa: RUF005
    inv = _row_reciprocals(denoms, N, FAST_DIV, PAIR_ROWS)
    new_u = ()
    for i in tl.static_range(N):
        new_u = new_u + (u[i] * inv[i],)  # noqa: RUF005
    b_c = kern[0] * new_u[0][:, None]
    for i in tl.static_range(1, N):
        b_c = b_c + kern[i] * new_u[i][:, None]
    return new_u, v * _reciprocal(_column_denominators(v * b_c, eps, N, BN), FAST_DIV)


@triton.jit
def _iterations(
    rows,
    eps,
    count,
    N: tl.constexpr,
    BN: tl.constexpr,
    FAST_DIV: tl.constexpr,
    RESTART: tl.constexpr,
    PAIR_ROWS: tl.constexpr,
):
    """``count`` iterations, nothing kept (loops, not unrolled: the trip count may be large).

    With RESTART > 1, blocks of RESTART iterations run in scaling form from the block's first
    matrix, which is then rescaled once (:func:`_scaled_iteration`: half the multiplies of
    dividing P in place each step). Within a block ``u`` grows at most ``1 / eps`` a step and
    shrinks at most ``1 / (n + eps)``; the host uses blocks only where both stay finite and
    normal (RESTART = 4 for eps in [1e-8, 1]: ``eps ** -4 <= 1e32``). The rest of ``count`` runs
    in the plain form."""
    if RESTART > 1:
        for _ in range(count // RESTART):
            u, v = _ones_like_norms(rows, N)
            for _step in tl.static_range(RESTART):
                u, v = _scaled_iteration(rows, u, v, eps, N, BN, FAST_DIV, PAIR_ROWS)
            scaled = ()
            for i in tl.static_range(N):
                scaled = scaled + (rows[i] * v * u[i][:, None],)  # noqa: RUF005
            rows = scaled
        count = count % RESTART
    for _ in range(count):
        rows, _row_norms, _col_norms = _iteration(rows, eps, N, BN, FAST_DIV)
    return rows


@triton.jit
def _iteration_adjoint(grads, probs, row_norms, b_ce, N: tl.constexpr):
    """One iteration backwards on ``Q = dP * P``: from (Q_k, P_k) to (Q_{k-1}, P_{k-1})."""
    b_s = grads[0]
    for i in tl.static_range(1, N):
        b_s = b_s + grads[i]
    new_grads = ()
    new_probs = ()
    for i in tl.static_range(N):
        b_w = grads[i] - b_s * probs[i]
        b_t = tl.sum(b_w, axis=1)
        b_z = probs[i] * b_ce
        new_grads = new_grads + (b_w - b_t[:, None] * b_z,)  # noqa: RUF005
        new_probs = new_probs + (b_z * row_norms[i][:, None],)  # noqa: RUF005
    return new_grads, new_probs


@triton.jit
def _segment_adjoint(
    probs0,
    grads,
    eps,
    start,
    last,
    SEG: tl.constexpr,
    PADDED: tl.constexpr,
    N: tl.constexpr,
    BN: tl.constexpr,
    FAST_DIV: tl.constexpr,
):
    """Iterations [start, start + SEG) backwards: recompute P_start from P_0 (a plain loop), run
    the segment forward keeping its normalizers, then take ``grads`` (Q at the segment's end, or
    dP itself when ``last``) back to Q at its start. With PADDED, ``start`` may be negative and the
    iterations before 0 are skipped (the first segment of a count that SEG does not divide)."""
    # The plain form here: the scaling form measured 1% slower in this kernel (n = 4 and 8, H100).
    probs = _iterations(probs0, eps, start, N, BN, FAST_DIV, 1, False)
    history = ()
    for step in tl.static_range(SEG):
        if PADDED:
            row_norms, b_ce = _ones_like_norms(probs, N)
            if start + step >= 0:
                probs, row_norms, b_ce = _iteration(probs, eps, N, BN, FAST_DIV)
        else:
            probs, row_norms, b_ce = _iteration(probs, eps, N, BN, FAST_DIV)
        history = history + ((row_norms, b_ce),)  # noqa: RUF005
    if last:
        # Q_K = dP * P_K, with P_K in float32 (the cast to the output dtype passes dP through).
        new_grads = ()
        for i in tl.static_range(N):
            new_grads = new_grads + (grads[i] * probs[i],)  # noqa: RUF005
        grads = new_grads
    for step in tl.static_range(SEG - 1, -1, -1):
        if PADDED:
            if start + step >= 0:
                grads, probs = _iteration_adjoint(grads, probs, history[step][0], history[step][1], N)
        else:
            grads, probs = _iteration_adjoint(grads, probs, history[step][0], history[step][1], N)
    return grads


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["M"])
def _sinkhorn_fwd_kernel(
    x,
    p,
    M,
    stride_xb,
    stride_xi,
    stride_xj,
    eps,
    N: tl.constexpr,
    BN: tl.constexpr,
    BLOCK: tl.constexpr,
    NUM_ITERS: tl.constexpr,
    X_CONTIGUOUS: tl.constexpr,
    FAST_DIV: tl.constexpr,
    RESTART: tl.constexpr,
    PAIR_ROWS: tl.constexpr,
):
    o_b, o_j, m_bj, rows = _load_logits(x, M, stride_xb, stride_xi, stride_xj, N, BN, BLOCK, X_CONTIGUOUS)
    probs, _b_max = _exp_minus_max(rows, N)
    probs = _iterations(probs, eps, NUM_ITERS, N, BN, FAST_DIV, RESTART, PAIR_ROWS)
    _store_rows(p, probs, o_b, o_j, m_bj, N)


@triton.jit(do_not_specialize=["M", "num_segs"])
def _sinkhorn_bwd_kernel(
    x,
    dp,
    dx,
    M,
    num_segs,
    stride_xb,
    stride_xi,
    stride_xj,
    stride_gb,
    stride_gi,
    stride_gj,
    eps,
    N: tl.constexpr,
    BN: tl.constexpr,
    BLOCK: tl.constexpr,
    NUM_ITERS: tl.constexpr,
    SEG: tl.constexpr,
    X_CONTIGUOUS: tl.constexpr,
    G_CONTIGUOUS: tl.constexpr,
    FAST_DIV: tl.constexpr,
):
    o_b, o_j, m_bj, logits = _load_logits(x, M, stride_xb, stride_xi, stride_xj, N, BN, BLOCK, X_CONTIGUOUS)
    probs0, b_max = _exp_minus_max(logits, N)
    grads = _load_rows(dp, o_b, o_j, m_bj, stride_gb, stride_gi, stride_gj, 0.0, N, G_CONTIGUOUS)
    if NUM_ITERS == 0:
        new_grads = ()
        for i in tl.static_range(N):
            new_grads = new_grads + (grads[i] * probs0[i],)  # noqa: RUF005
        grads = new_grads
    # Segments last to first, in a loop the compiler does not unroll: its body (one segment,
    # unrolled) is compiled once, and Triton's coalescing pass, which walks everything that
    # depends on each load and store, does not walk into it (a fully unrolled backward took
    # minutes to compile). num_segs is a runtime argument for the same reason.
    for seg in range(num_segs - 1, -1, -1):
        grads = _segment_adjoint(
            probs0,
            grads,
            eps,
            seg * SEG - (num_segs * SEG - NUM_ITERS),
            seg == num_segs - 1,
            SEG,
            NUM_ITERS % SEG != 0,
            N,
            BN,
            FAST_DIV,
        )
    # Path through the max: d max = -sum(Q_0), shared evenly by the entries equal to the max
    # (what autograd gives for amax).
    b_total = tl.sum(grads[0], axis=1)
    b_ties = tl.sum((logits[0] == b_max[:, None]).to(tl.float32), axis=1)
    for i in tl.static_range(1, N):
        b_total = b_total + tl.sum(grads[i], axis=1)
        b_ties = b_ties + tl.sum((logits[i] == b_max[:, None]).to(tl.float32), axis=1)
    b_share = b_total / b_ties
    out = ()
    for i in tl.static_range(N):
        out = out + (tl.where(logits[i] == b_max[:, None], grads[i] - b_share[:, None], grads[i]),)  # noqa: RUF005
    _store_rows(dx, out, o_b, o_j, m_bj, N)


# ---------------------------------------------------------------------------------------------
# Host launchers
# ---------------------------------------------------------------------------------------------

# Per n: (BLOCK, num_warps) of the forward and the backward, and SEG, the iterations whose
# normalizers the backward keeps in registers at once (2 n floats each per matrix, spread over
# the threads that hold the matrix). Thread-per-matrix sizes (n <= 4) want one or two matrices
# per thread; larger n spread a matrix over 2-8 threads and take fewer matrices per program.
_FWD_CONFIGS = {1: (256, 4), 2: (256, 4), 4: (128, 4), 8: (64, 4), 16: (16, 2), 32: (4, 4), 64: (2, 4)}
_BWD_CONFIGS = {1: (128, 4), 2: (128, 4), 4: (32, 1), 8: (32, 2), 16: (16, 4), 32: (4, 4), 64: (2, 4)}
_INTERPRETER = interpreter_enabled()
_FAST_DIV = not _INTERPRETER  # the interpreter runs no inline PTX
# (Under the interpreter there are no registers to save: one segment, no recompute.)
# n = 4 on an H100 (1M matrices, 20 iterations): 10 beats 20 (167.6 us against 176.5; fewer
# registers, more warps) despite recomputing 10 more iterations; 1-warp programs of 32 matrices.
# Other sizes: chosen so that ptxas (sm_90, Triton 3.6) reports no spills; not timed.
_SEG = {1: 32, 2: 32, 4: 10, 8: 10, 16: 4, 32: 2, 64: 1}


# The forward's scaling-form blocks (see _iterations): within RESTART iterations u and v stay
# within eps ** -RESTART (<= 1e32 for the default eps = 1e-8) and (n + eps) ** -RESTART; outside
# the eps range below, every iteration divides P in place. H100, 20 iterations, CUDA-graph time:
# n = 4 at 1M matrices 64.1 us against 65.7 (plain form, best tile), n = 8 at 65,536 20.7 against
# 21.6, n = 16 even (75.7 / 76.2), n = 32 slower (291 / 267 at 16,384): up to n = 8 only.
# PAIR_ROWS (see _row_reciprocals): 0.3-2 us less at 1M in every tile.
_RESTART = 4
_SCALING_MAX_N = 8
_SCALING_EPS_RANGE = (1e-8, 1.0)
_PAIR_ROWS = True


def _scaling(n: int, eps: float, restart: int | None, pair_rows: bool | None) -> tuple[int, bool]:
    """The forward's ``(RESTART, PAIR_ROWS)``; the arguments override the defaults (tuning, tests)."""
    low, high = _SCALING_EPS_RANGE
    if restart is None:
        restart = _RESTART if n <= _SCALING_MAX_N and low <= eps <= high else 1
    elif restart > 1 and not (low <= eps <= high and eps**-restart <= 1e32):
        raise ValueError(
            f"restart={restart}: the scaling form needs eps in [{low}, {high}] and "
            f"eps ** -restart <= 1e32 (u and v grow by up to 1 / eps a step), got eps={eps}"
        )
    if pair_rows is None:
        pair_rows = _PAIR_ROWS
    return restart, pair_rows and restart > 1 and n % 2 == 0


def _matrices(tensor: torch.Tensor) -> tuple[torch.Tensor, int, tuple[int, int, int], bool]:
    """``[..., n, n]`` as ``(tensor, M, (stride_b, stride_i, stride_j), packed)`` for the kernels.
    Packed tensors go as they are; others as a ``[M, n, n]`` view when the leading dims flatten
    without a copy (reshape copies only otherwise) and are read through their strides."""
    n = tensor.shape[-1]
    if tensor.is_contiguous():
        return tensor, tensor.numel() // (n * n), (n * n, n, 1), True
    batched = tensor.reshape(-1, n, n)
    stride_b, stride_i, stride_j = batched.stride()
    packed = stride_j == 1 and stride_i == n and (batched.shape[0] <= 1 or stride_b == n * n)
    return batched, batched.shape[0], (stride_b, stride_i, stride_j), packed


# Launched without Triton's per-launch argument binding (~36 us of host time on an H100 machine,
# six times the forward kernel at 65,536 matrices).
_launch_fwd_kernel = CachedLauncher(_sinkhorn_fwd_kernel)
_launch_bwd_kernel = CachedLauncher(_sinkhorn_bwd_kernel)


def sinkhorn_knopp_fwd(
    logits: torch.Tensor,
    num_iters: int,
    eps: float,
    *,
    config: tuple[int, int] | None = None,
    restart: int | None = None,
    pair_rows: bool | None = None,
) -> torch.Tensor:
    """Forward launcher: ``P`` ``[..., n, n]`` contiguous, in ``logits.dtype``. One launch.
    ``config`` = ``(BLOCK, num_warps)`` overrides the table, ``restart`` and ``pair_rows`` the
    scaling form's choices (for tuning and tests; ``restart=1`` is the plain form)."""
    n = logits.shape[-1]
    out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    x, count, (stride_b, stride_i, stride_j), packed = _matrices(logits)
    if count == 0:
        return out
    bn = next_power_of_2(n)
    block, num_warps = config or _FWD_CONFIGS[bn]
    restart, pair_rows = _scaling(n, eps, restart, pair_rows)
    with device_guard(logits.device):
        _launch_fwd_kernel(
            (cdiv(count, block),),
            x=x,
            p=out,
            M=count,
            stride_xb=stride_b,
            stride_xi=stride_i,
            stride_xj=stride_j,
            eps=eps,
            N=n,
            BN=bn,
            BLOCK=block,
            NUM_ITERS=num_iters,
            X_CONTIGUOUS=packed,
            FAST_DIV=_FAST_DIV,
            RESTART=restart,
            PAIR_ROWS=pair_rows,
            num_warps=num_warps,
        )
    return out


def sinkhorn_knopp_bwd(
    logits: torch.Tensor,
    grad_probs: torch.Tensor,
    num_iters: int,
    eps: float,
    *,
    seg: int | None = None,
    config: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Backward launcher: ``d logits`` ``[..., n, n]`` contiguous, in ``logits.dtype``. One launch
    that recomputes the forward and runs the iterations backwards. ``seg`` overrides the segment
    length (tests use it to cover several and padded segments), ``config`` = ``(BLOCK,
    num_warps)`` the table (for tuning)."""
    n = logits.shape[-1]
    out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    x, count, (stride_xb, stride_xi, stride_xj), x_packed = _matrices(logits)
    g, _, (stride_gb, stride_gi, stride_gj), g_packed = _matrices(grad_probs)
    if count == 0:
        return out
    bn = next_power_of_2(n)
    block, num_warps = config or _BWD_CONFIGS[bn]
    if seg is None:
        # Padded sizes (n = 3, 5, 6, 7, 12...) do not vectorize and hold their rows across more
        # threads: half the segment keeps them out of local memory (ptxas -v, sm_90).
        seg = num_iters if _INTERPRETER else min(_SEG[bn] if n == bn else max(1, _SEG[bn] // 2), num_iters)
    seg = max(1, min(seg, num_iters))
    with device_guard(logits.device):
        _launch_bwd_kernel(
            (cdiv(count, block),),
            x=x,
            dp=g,
            dx=out,
            M=count,
            num_segs=cdiv(num_iters, seg),
            stride_xb=stride_xb,
            stride_xi=stride_xi,
            stride_xj=stride_xj,
            stride_gb=stride_gb,
            stride_gi=stride_gi,
            stride_gj=stride_gj,
            eps=eps,
            N=n,
            BN=bn,
            BLOCK=block,
            NUM_ITERS=num_iters,
            SEG=seg,
            X_CONTIGUOUS=x_packed,
            G_CONTIGUOUS=g_packed,
            FAST_DIV=_FAST_DIV,
            num_warps=num_warps,
        )
    return out


# ---------------------------------------------------------------------------------------------
# Autograd: an autograd.Function for eager calls (no dispatcher on the hot path) and a
# torch.library custom op for torch.compile(fullgraph=True).
# ---------------------------------------------------------------------------------------------


class SinkhornKnoppFunction(torch.autograd.Function):
    """Eager autograd for the Triton kernels; the same kernels, so bitwise the same results, as
    the custom op ``hdgsa::sinkhorn_knopp_fwd`` that compiled graphs call."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, num_iters: int, eps: float) -> torch.Tensor:
        probs = sinkhorn_knopp_fwd(logits, num_iters, eps)
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(logits)
        ctx.num_iters = num_iters
        ctx.eps = eps
        return probs

    @staticmethod
    @once_differentiable  # the backward kernel has no gradient: double backward raises, not zeros
    def backward(ctx, grad_probs: torch.Tensor):
        (logits,) = ctx.saved_tensors
        return sinkhorn_knopp_bwd(logits, grad_probs, ctx.num_iters, ctx.eps), None, None


@torch.library.custom_op(op_name("sinkhorn_knopp_fwd"), mutates_args=())
def _sinkhorn_knopp_fwd_op(logits: torch.Tensor, num_iters: int, eps: float) -> torch.Tensor:
    """``hdgsa::sinkhorn_knopp_fwd``: :func:`sinkhorn_knopp_fwd` for compiled graphs."""
    return sinkhorn_knopp_fwd(logits, num_iters, eps)


@_sinkhorn_knopp_fwd_op.register_fake
def _(logits: torch.Tensor, num_iters: int, eps: float) -> torch.Tensor:
    # The launcher always returns a new contiguous tensor: so does the fake.
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


@torch.library.custom_op(op_name("sinkhorn_knopp_bwd"), mutates_args=())
def _sinkhorn_knopp_bwd_op(
    logits: torch.Tensor, grad_probs: torch.Tensor, num_iters: int, eps: float
) -> torch.Tensor:
    """``hdgsa::sinkhorn_knopp_bwd``: :func:`sinkhorn_knopp_bwd`, the custom op's backward. It has no
    autograd formula of its own: a second derivative through it raises."""
    return sinkhorn_knopp_bwd(logits, grad_probs, num_iters, eps)


@_sinkhorn_knopp_bwd_op.register_fake
def _(logits: torch.Tensor, grad_probs: torch.Tensor, num_iters: int, eps: float) -> torch.Tensor:
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


def _setup_context(ctx, inputs, output) -> None:
    """What ``hdgsa::sinkhorn_knopp_fwd``'s backward needs: the logits (P is recomputed)."""
    logits, num_iters, eps = inputs
    ctx.save_for_backward(logits)
    ctx.num_iters = num_iters
    ctx.eps = eps


def _backward(ctx, grad_probs: torch.Tensor):
    """``hdgsa::sinkhorn_knopp_fwd``'s backward: d logits; num_iters and eps get none."""
    (logits,) = ctx.saved_tensors
    return _sinkhorn_knopp_bwd_op(logits, grad_probs, ctx.num_iters, ctx.eps), None, None


_sinkhorn_knopp_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def sinkhorn_knopp_triton(logits: torch.Tensor, num_iters: int, eps: float) -> torch.Tensor:
    """The Triton backend of :func:`hdgsa_sinkhorn.sinkhorn_knopp` (arguments already checked)."""
    if is_compiling():
        return _sinkhorn_knopp_fwd_op(logits, num_iters, eps)
    return SinkhornKnoppFunction.apply(logits, num_iters, eps)
