"""Plain PyTorch gated delta rule: the chunked ``torch`` backend and the per-step reference.

Both take the canonical layout (fla's): ``q``, ``k`` ``[B, T, H, K]``, ``v`` ``[B, T, HV, V]``,
the log-decay ``g`` and ``beta`` ``[B, T, HV]``, ``initial_state`` ``[B, HV, K, V]``, with
``HV`` a multiple of ``H`` (GVA: value head ``h`` reads query/key head ``h // (HV // H)``).
Per value head, with state ``S`` ``[K, V]``::

    S_t = exp(g_t) * S_{t-1} + k_t (beta_t * (v_t - exp(g_t) * S_{t-1}^T k_t))^T
    o_t = scale * S_t^T q_t

:func:`chunk_gated_delta_rule_torch` is the backend (fast, differentiable through autograd);
:func:`recurrent_gated_delta_rule_reference` is the same recurrence one step at a time, the
slow and obviously right version the tests hold everything to (in float64).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.autograd import forward_ad

__all__ = ["ALPHA_MIN", "CHUNK_SIZE", "chunk_gated_delta_rule_torch", "recurrent_gated_delta_rule_reference"]

# 32, not fla's 64: on CPU (B1 T1024 H4 K=V=64, 2 threads) the intra-chunk work grows with the
# chunk and the state loop with the number of chunks; 32 measured fastest (median ms, interleaved:
# 16: 2.82, 32: 2.68, 64: 3.23).
CHUNK_SIZE = 32
# alpha is clamped to at least this before the log (docs/api.md): g >= log(1e-6) ~ -13.8.
ALPHA_MIN = 1e-6


def _expand_qk_heads(x: torch.Tensor, num_v_heads: int) -> torch.Tensor:
    """``[B, T, H, K]`` -> ``[B, T, HV, K]``, value head ``h`` taking query/key head ``h // (HV // H)``."""
    group = num_v_heads // x.shape[2]
    return x if group == 1 else x.repeat_interleave(group, dim=2)


# Chunk-local log-decay differences are clamped to at least this before exp (see below).
_LOG_DECAY_FLOOR = -80.0

# Diagonal blocks up to this size are inverted in one batch of full-size products (see
# _unit_lower_inverse); larger ones split in two.
_INVERSE_BLOCK = 16
# ... starting from diagonal blocks of this size, inverted by a power product.
_INVERSE_LEAF = 4


def _writes_into_buffers(*tensors: torch.Tensor | None) -> bool:
    """Whether the chunked forward may write its results into preallocated buffers (``out=``).

    Only where autograd records nothing (grad mode off, or no input requires a gradient):
    ``out=`` is not differentiable. Not inside forward-mode AD or a functorch transform
    (``jvp``, ``jacfwd``, ``vmap``): ``out=`` ops have no forward derivative or batching rule,
    and dual or batched tensors do not require grad. And not under ``torch.compile``, which
    plans its own buffers (and whose functionalization of ``out=`` on strided inputs gets the
    result's strides wrong in torch 2.13).
    """
    if torch.compiler.is_compiling():
        return False
    if torch._C._are_functorch_transforms_active() or forward_ad._current_level >= 0:
        return False
    return not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors))


def _intra_chunk_decay(g_cum: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``M_ij = exp(G_i - G_j)`` below the diagonal of each chunk, 1 on and above it, from ``G`` ``[..., C]``.

    M is read only on and below the diagonal (A and the scores are cut to their triangles after
    the product), so above it it is set finite. The difference is zeroed on and above the
    diagonal *before* exp: above it ``G_i - G_j > 0`` can be hundreds (alpha near 0), and on it
    ``G_i - G_i = 0`` is a constant (as a difference its gradient would be two O(1) terms
    cancelling, which swamps the tiny true gradient of a tiny alpha in float32). Log-decays under
    -80 are clamped: exp(-80) ~ 2e-35 is below float32 resolution of every sum it enters, and
    keeps exp off its slow path (underflow to denormals / 0 is several times slower on CPU).
    """
    difference = torch.sub(g_cum.unsqueeze(-1), g_cum.unsqueeze(-2), out=out)
    return difference.tril_(-1).clamp_min_(_LOG_DECAY_FLOOR).exp_()


def _merge_masks(n: int, device: torch.device) -> list[torch.Tensor]:
    """Boolean ``[n, n]`` masks for :func:`_small_unit_lower_inverse` (``n`` a power of two, at
    least ``2 * _INVERSE_LEAF``): the diagonal blocks of ``_INVERSE_LEAF``, then for each block
    size ``s = _INVERSE_LEAF, 2 s, ... < n`` the blocks that join pairs of ``s``-blocks within
    their ``2 s``-block. Positions ``i, j`` are in one block of ``s`` (a power of two) exactly
    when ``i ^ j < s``."""
    index = torch.arange(n, device=device)
    differ = index[:, None] ^ index[None, :]
    masks = [differ < _INVERSE_LEAF]
    size = _INVERSE_LEAF
    while size < n:
        masks.append((differ >= size) & (differ < 2 * size))
        size *= 2
    return masks


def _small_unit_lower_inverse(a: torch.Tensor) -> torch.Tensor:
    """``(I + a)^{-1}`` for strictly lower-triangular ``a`` ``[B, n, n]``, ``n`` a power of two
    up to ``_INVERSE_BLOCK``: the inverse of the diagonal blocks of 4 (``D``, ``a`` masked to
    them) is ``(I - D)(I + D^2)``, exact for a nilpotent ``D`` of order 4; then pairs of inverted
    blocks merge, block sizes 4 -> 8 -> 16: with ``T`` the block-diagonal inverse so far and
    ``C`` the part of ``a`` joining each pair, ``T <- T - T (C T)`` (``(I + T C)^{-1} = I - T C``,
    as ``(T C)^2 = 0``), which is ``[[T11, 0], [-T22 C21 T11, T22]]`` blockwise."""
    n = a.shape[-1]
    eye = torch.eye(n, dtype=a.dtype, device=a.device)
    if n <= 2:  # a^2 = 0: (I + a)^{-1} = I - a
        return eye - a
    if n == _INVERSE_LEAF:
        return torch.baddbmm(eye - a, eye - a, torch.bmm(a, a))
    masks = _merge_masks(n, a.device)
    diagonal = a * masks[0]
    inverse = eye - diagonal
    inverse = torch.baddbmm(inverse, inverse, torch.bmm(diagonal, diagonal))
    for mask in masks[1:]:
        inverse = torch.baddbmm(inverse, inverse, torch.bmm(a * mask, inverse), alpha=-1.0)
    return inverse


def _unit_lower_inverse(a: torch.Tensor) -> torch.Tensor:
    """``(I + a)^{-1}`` for strictly lower-triangular ``a`` ``[..., n, n]``, by batched matmuls.

    Blocked triangular inversion: blocks larger than ``_INVERSE_BLOCK`` split as
    ``[[L11, 0], [L21, L22]]^{-1} = [[T11, 0], [-T22 L21 T11, T22]]`` (both diagonal blocks
    inverted in one batched call), smaller ones by :func:`_small_unit_lower_inverse` (padded to a
    power of two with zeros, which invert to the identity). Every product is of bounded
    matrices: blocks of the inverse of ``I + A`` (the delta rule's, within 1 for normalized keys
    and ``beta <= 1``) and of ``A``. A power series ``(I - a)(I + a^2)(I + a^4)(I + a^8)`` over
    blocks of 16 (what this replaced) takes as many products and no masks (80 us less at
    ``[128, 32, 32]`` on one CPU thread, 1-2% of the forward at T = 1024), but its powers grow
    like binomial coefficients, ~3e3 for (near-)parallel keys and ``beta`` near 1, which cost
    float32 four digits. On CPU this is faster than ``torch.linalg.solve_triangular`` on many
    small matrices, and plain matmuls for autograd.
    """
    n = a.shape[-1]
    if n <= _INVERSE_BLOCK:
        shape = a.shape
        size = 1 << max(n - 1, 0).bit_length()  # the next power of two
        a = a.reshape(-1, n, n)
        if size != n:
            a = F.pad(a, (0, size - n, 0, size - n))
        inverse = _small_unit_lower_inverse(a)
        if size != n:
            inverse = inverse[:, :n, :n]
        return inverse.reshape(shape)
    half = n // 2
    if 2 * half == n:
        diagonal = _unit_lower_inverse(torch.stack([a[..., :half, :half], a[..., half:, half:]]))
        t11, t22 = diagonal[0], diagonal[1]
    else:
        t11, t22 = _unit_lower_inverse(a[..., :half, :half]), _unit_lower_inverse(a[..., half:, half:])
    t21 = -(t22 @ (a[..., half:, :half] @ t11))
    return torch.cat([F.pad(t11, (0, n - half)), torch.cat([t21, t22], dim=-1)], dim=-2)


def chunk_gated_delta_rule_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None = None,
    *,
    chunk_size: int = CHUNK_SIZE,
    compute_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The gated delta rule in chunked WY (UT-transform) form, in plain PyTorch.

    Within a chunk of ``C`` steps (positions ``i, j``) starting from state ``S_0``, with
    ``G_i = sum_{s <= i} g_s`` (the chunk-local cumulative log-decay):

    - ``A_ij = beta_i <k_i, k_j> exp(G_i - G_j)`` for ``j < i`` (strictly lower), and
      ``T = (I + A)^{-1}`` (unit lower-triangular; inverted with batched matmuls);
    - the chunk's new values are ``U' = T R`` with ``R = beta * (V - exp(G) * K S_0)``
      (the WY form: ``U' = T (beta V) - T (beta exp(G) K) S_0``);
    - ``S_C = exp(G_C) S_0 + (exp(G_C - G) * K)^T U' = exp(G_C) S_0 + P R`` with
      ``P = (exp(G_C - G) * K)^T T``;
    - ``O = scale * ((exp(G) * Q) S_0 + (Q K^T * M) U') = scale * ((exp(G) * Q) S_0 + Z R)``
      with ``M_ij = exp(G_i - G_j)`` for ``j <= i``, else 0, and ``Z = (Q K^T * M) T``.

    Everything that does not depend on the carried state (``A``, ``T``, ``P``, ``Z``) is
    computed for all chunks at once as batched matrix products. The loop over chunks carries
    only the state: per chunk one product for ``R`` (``K S_0``) and one for the new state
    (``P R``); ``T`` enters through ``P`` and ``Z`` rather than through ``U' = T R``, so the
    loop has no third product. Where autograd records the call, the outputs are formed after
    the loop, for all chunks, in two batched products. Where it does not, the loop's first
    product also gives the output's state term: ``[-scale exp(G) Q ; beta exp(G) K] S_0``, one
    ``[2C, K]`` product subtracted from ``[0 ; beta V]``, is ``[scale exp(G) Q S_0 ; R]``; no
    input state is kept, and ``scale Z R`` is one batched product after the loop; ``[Q ; K]``
    is copied once into one buffer, whose product with ``K^T`` gives ``Q K^T`` and ``K K^T``
    together and which is then scaled in place into that left operand; all buffers share one
    allocation. The two forms agree to float32 rounding. Decays enter only as differences of
    cumulative log-decays inside a chunk (``G_i - G_j`` with ``j <= i``, and ``G_C - G_i``), all
    ``<= 0``, masked before ``exp``: nothing overflows however close to 0 the decay gets. ``T``
    is padded at the end to a multiple of ``chunk_size`` with ``k = v = q = beta = g = 0`` (no
    update, no decay).

    Args:
        q: queries ``[B, T, H, K]``.
        k: keys ``[B, T, H, K]``.
        v: values ``[B, T, HV, V]``, ``HV`` a multiple of ``H``.
        g: log-decay ``[B, T, HV]`` (``log(alpha)``).
        beta: ``[B, T, HV]``.
        scale: multiplies the output (usually ``K ** -0.5``).
        initial_state: ``[B, HV, K, V]`` or None (zeros).
        chunk_size: steps per chunk (32: fastest on CPU, see ``CHUNK_SIZE``).
        compute_dtype: the dtype everything is computed in (inputs are cast to it).

    Returns:
        ``(o, S_T)``: ``o`` ``[B, T, HV, V]`` and the final state ``[B, HV, K, V]``, both in
        ``compute_dtype``.
    """
    batch, seq_len, _, head_dim_k = q.shape
    num_v_heads, head_dim_v = v.shape[2], v.shape[3]
    if seq_len == 0:  # no step (gated_delta_rule answers empty inputs before calling this)
        o = v.new_zeros(batch, 0, num_v_heads, head_dim_v, dtype=compute_dtype)
        if initial_state is None:
            return o, v.new_zeros(batch, num_v_heads, head_dim_k, head_dim_v, dtype=compute_dtype)
        return o, initial_state.to(compute_dtype, copy=True)
    # Where autograd records nothing, the forward works in place in preallocated buffers (see
    # _chunked_forward_in_buffers).
    buffered = _writes_into_buffers(q, k, v, g, beta, initial_state)
    if not buffered:
        # Cast before repeating to the value heads: the repeat's backward sums each head
        # group's gradients, which in float16 / bfloat16 could overflow (or lose digits) where
        # the float32 sum is fine. (The buffered path records no gradient: it repeats first and
        # casts as it copies.)
        q, k = q.to(compute_dtype), k.to(compute_dtype)
    q = _expand_qk_heads(q, num_v_heads)
    k = _expand_qk_heads(k, num_v_heads)

    chunk = min(chunk_size, seq_len)
    num_chunks = -(-seq_len // chunk)
    pad = num_chunks * chunk - seq_len
    bh = batch * num_v_heads

    def chunked(x: torch.Tensor) -> torch.Tensor:
        # [B, T, HV, ...] -> [N, B, HV, C, ...]: chunk-major, so that each chunk's operands and
        # buffers in the loop are contiguous (a product into a strided out= slice takes twice as
        # long). A view where it can be (no padding), in x's dtype.
        if pad:
            x = F.pad(x, (0, 0) * (x.dim() - 2) + (0, pad))
        return x.unflatten(1, (num_chunks, chunk)).permute(1, 0, 3, 2, *range(4, x.dim() + 1))

    def to_chunks(x: torch.Tensor) -> torch.Tensor:
        # [N, B * HV, C, ...], contiguous: one copy here, so that no later elementwise result
        # inherits a strided layout and no product copies its operands again.
        return chunked(x.to(compute_dtype)).reshape(num_chunks, bh, chunk, *x.shape[3:]).contiguous()

    beta_c = to_chunks(beta).unsqueeze(-1)  # [N, BH, C, 1]
    g_c = to_chunks(g)
    g_cum = g_c.cumsum(-1)  # G_i, chunk-local, [N, BH, C]
    # exp(G_C - G_i) = exp(sum_{s > i} g_s): a shifted reverse cumsum, not a difference (the
    # last row's decay is exactly 1, with no gradient).
    g_after = F.pad(g_c.flip(-1).cumsum(-1).flip(-1)[..., 1:], (0, 1))

    if initial_state is None:
        state = q.new_zeros(bh, head_dim_k, head_dim_v, dtype=compute_dtype)
    elif buffered:  # a copy of its own: the loop updates it in place
        state = torch.empty(bh, head_dim_k, head_dim_v, dtype=compute_dtype, device=q.device)
        state.view(initial_state.shape).copy_(initial_state)
    else:
        state = initial_state.to(compute_dtype).reshape(bh, head_dim_k, head_dim_v)
    if buffered:
        # q and k are cast as they are copied into the workspace (no cast copy first); v is cast
        # before, as beta's product writes it into a compute-dtype buffer.
        o = _chunked_forward_in_buffers(
            chunked(q),
            chunked(k),
            chunked(v.to(compute_dtype)),
            beta_c,
            g_cum,
            g_after,
            state,
            scale,
            seq_len,
        )
        return o, state.reshape(batch, num_v_heads, head_dim_k, head_dim_v)

    q_c, k_c = to_chunks(q), to_chunks(k)
    k_t = k_c.transpose(-1, -2)
    decay_ij = _intra_chunk_decay(g_cum)
    k_beta = k_c * beta_c
    a_strict = (k_beta @ k_t).mul_(decay_ij).tril_(-1)  # diagonal out too
    t_inv = _unit_lower_inverse(a_strict)  # (I + A)^{-1}
    g_exp = g_cum.exp().unsqueeze(-1)
    scores_t = (q_c @ k_t).mul_(decay_ij).tril_() @ t_inv  # Z = (Q K^T * M) T
    keys_t = (k_c * g_after.exp().unsqueeze(-1)).transpose(-1, -2) @ t_inv  # P, [N, BH, K, C]
    decay_per_chunk = g_cum[..., -1:].exp().unsqueeze(-1).unbind(0)  # exp(G_C), [BH, 1, 1] each
    # The only sequential part: the loop over chunks, carrying the state (per-chunk operands are
    # unbound once, not indexed in the loop). Autograd keeps every chunk's input state and
    # residual; the output's state term is then one batched product after the loop (its
    # backward too, which costs less than a product per chunk). ``state * decay`` is a fresh
    # tensor autograd does not keep, so the update is accumulated into it in place (no copy of
    # the state per chunk).
    updates_per_chunk = keys_t.unbind(0)
    values_per_chunk = (to_chunks(v) * beta_c).unbind(0)
    keys_per_chunk = (k_beta * g_exp).unbind(0)
    states_in, residuals = [], []
    for n in range(num_chunks):
        residual = torch.baddbmm(values_per_chunk[n], keys_per_chunk[n], state, alpha=-1.0)  # R
        states_in.append(state)
        residuals.append(residual)
        state = (state * decay_per_chunk[n]).baddbmm_(updates_per_chunk[n], residual)
    # O = scale * ((exp(G) Q) S_in + Z R), all chunks in two batched products (the second
    # accumulated in place into the first's fresh result). Not baddbmm_'s beta = alpha =
    # scale: its backward then scales all three gradients (forward + backward +25% measured).
    o = torch.bmm(scores_t.flatten(0, 1), torch.stack(residuals).flatten(0, 1))
    o = o.baddbmm_((q_c * g_exp).flatten(0, 1), torch.stack(states_in).flatten(0, 1)).mul_(scale)
    # [N, B, HV, C, V] -> [B, T, HV, V]: one copy (contiguous unless T was padded and B > 1, where
    # the slice below leaves a gap between batches).
    o = o.view(num_chunks, batch, num_v_heads, chunk, head_dim_v).permute(1, 0, 3, 2, 4)
    o = o.reshape(batch, num_chunks * chunk, num_v_heads, head_dim_v)[:, :seq_len]
    return o, state.reshape(batch, num_v_heads, head_dim_k, head_dim_v)


def _chunked_forward_in_buffers(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta_c: torch.Tensor,
    g_cum: torch.Tensor,
    g_after: torch.Tensor,
    state: torch.Tensor,
    scale: float,
    seq_len: int,
) -> torch.Tensor:
    """The chunked forward where autograd records nothing, in preallocated buffers (``out=``).

    ``q``, ``k``, ``v``: ``[N, B, HV, C, K or V]`` (strided views; ``v`` in the compute dtype,
    ``q`` and ``k`` in any float dtype, cast as they are copied); ``beta_c`` ``[N, BH, C, 1]``,
    ``g_cum`` and ``g_after`` ``[N, BH, C]`` as in the caller; ``state`` ``[BH, K, V]`` is updated
    in place to the final state. Returns ``o`` ``[B, T, HV, V]`` (contiguous; ``T = seq_len``,
    the steps before the padding).
    """
    num_chunks, batch, num_v_heads, chunk, head_dim_k = q.shape
    head_dim_v = v.shape[-1]
    bh = batch * num_v_heads
    shapes = {
        "qk": (num_chunks, bh, 2 * chunk, head_dim_k),
        "gram": (num_chunks, bh, 2 * chunk, chunk),
        "square": (num_chunks, bh, chunk, chunk),
        "keys_t": (num_chunks, bh, head_dim_k, chunk),
        "acc": (num_chunks, bh, 2 * chunk, head_dim_v),
        "o": (num_chunks * bh, chunk, head_dim_v),
    }
    # The output first, then one workspace carved into the buffers: glibc's malloc trims its heap
    # once the free space on top reaches twice the largest block it has ever unmapped. With a
    # separate buffer per part (2 MB at most) that was less than this call's ~10 MB, so the heap
    # was often trimmed after a call and the next one faulted its pages back in (~350-2000 minor
    # faults, +20% time, at B1 T1024 H4 K=V=64); one block larger than the rest of the call's
    # memory puts the threshold above what the call frees.
    out = torch.empty(batch, seq_len, num_v_heads, head_dim_v, dtype=state.dtype, device=state.device)
    sizes = [math.prod(shape) for shape in shapes.values()]
    workspace = torch.empty(sum(sizes), dtype=state.dtype, device=state.device)
    qk, gram, square, keys_t, acc, o = (
        part.view(shape) for part, shape in zip(workspace.split(sizes), shapes.values(), strict=True)
    )

    # [Q ; K] per chunk in one buffer: one product gives Q K^T and K K^T together, and the buffer
    # is scaled in place into the loop's left operand below.
    qk_heads = qk.view(num_chunks, batch, num_v_heads, 2 * chunk, head_dim_k)
    qk_heads[:, :, :, :chunk].copy_(q)
    qk_heads[:, :, :, chunk:].copy_(k)
    k_t = qk[:, :, chunk:].transpose(-1, -2).flatten(0, 1)  # K^T, [N * BH, K, C]
    torch.bmm(qk.flatten(0, 1), k_t, out=gram.flatten(0, 1))
    scores, a_strict = gram[:, :, :chunk], gram[:, :, chunk:]
    decay_ij = _intra_chunk_decay(g_cum, out=square)
    scores.mul_(decay_ij).tril_()  # Q K^T * M
    a_strict.mul_(decay_ij.mul_(beta_c)).tril_(-1)  # A: beta scales M's rows, not K (a [C, C] product)
    t_inv = _unit_lower_inverse(a_strict).flatten(0, 1)  # (I + A)^{-1}
    scores_t = torch.bmm(scores.flatten(0, 1), t_inv, out=square.flatten(0, 1))  # Z; M is dead
    # P = K^T (exp(G_C - G) * T): the decay scales T's rows (T is dead after this), not K's.
    torch.bmm(k_t, t_inv.mul_(g_after.exp().flatten(0, 1).unsqueeze(-1)), out=keys_t.flatten(0, 1))

    # [-scale exp(G) Q ; beta exp(G) K] ([2C, K]) times S_in, subtracted in place from
    # [0 ; beta V], gives [scale exp(G) Q S_in ; R], the output's state term and the residual
    # at once: each chunk needs one product with its input state, and no input state is kept.
    g_exp = g_cum.exp().unsqueeze(-1)
    lhs = qk.mul_(torch.cat([g_exp * -scale, g_exp * beta_c], dim=2))
    acc[:, :, :chunk].zero_()
    torch.mul(
        v,
        beta_c.view(num_chunks, batch, num_v_heads, chunk, 1),
        out=acc.view(num_chunks, batch, num_v_heads, 2 * chunk, head_dim_v)[:, :, :, chunk:],
    )
    # The only sequential part: the loop over chunks, carrying the state (per-chunk operands
    # are unbound once, not indexed in the loop).
    lhs_per_chunk, acc_per_chunk = lhs.unbind(0), acc.unbind(0)
    residuals_per_chunk = acc[:, :, chunk:].unbind(0)
    updates_per_chunk = keys_t.unbind(0)
    decay_per_chunk = g_cum[..., -1:].exp().unsqueeze(-1).unbind(0)  # exp(G_C), [BH, 1, 1] each
    for n in range(num_chunks):
        acc_per_chunk[n].baddbmm_(lhs_per_chunk[n], state, alpha=-1.0)
        state.mul_(decay_per_chunk[n]).baddbmm_(updates_per_chunk[n], residuals_per_chunk[n])
    # O = scale exp(G) Q S_in + scale Z R, the second term for all chunks in one product (into a
    # buffer of its own: a product into acc's strided top half runs one matrix at a time); then
    # one copy into [B, T, HV, V], the padding left out (the full chunks, then the last one's
    # first steps).
    torch.baddbmm(
        acc[:, :, :chunk].flatten(0, 1), scores_t, acc[:, :, chunk:].flatten(0, 1), alpha=scale, out=o
    )
    o_steps = o.view(num_chunks, batch, num_v_heads, chunk, head_dim_v).permute(1, 0, 3, 2, 4)
    full_chunks = seq_len // chunk
    if full_chunks:
        out[:, : full_chunks * chunk].view(batch, full_chunks, chunk, num_v_heads, head_dim_v).copy_(
            o_steps[:, :full_chunks]
        )
    if seq_len > full_chunks * chunk:
        out[:, full_chunks * chunk :].copy_(o_steps[:, full_chunks, : seq_len - full_chunks * chunk])
    return out


def recurrent_gated_delta_rule_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None = None,
    *,
    compute_dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The gated delta rule one step at a time (a Python loop over ``T``): the test reference.

    Same arguments and layout as :func:`chunk_gated_delta_rule_torch`; per step, per value head::

        S = exp(g_t) * S
        S = S + k_t (beta_t * (v_t - S^T k_t))^T
        o_t = scale * S^T q_t

    Slow (``T`` iterations); use it only to check the fast paths, in float64.

    Returns:
        ``(o, S_T)`` in ``compute_dtype``: ``[B, T, HV, V]`` and ``[B, HV, K, V]``.
    """
    batch, seq_len = q.shape[:2]
    num_v_heads, head_dim_v = v.shape[2], v.shape[3]
    head_dim_k = q.shape[3]
    q = _expand_qk_heads(q.to(compute_dtype), num_v_heads)  # cast first: see the chunked form
    k = _expand_qk_heads(k.to(compute_dtype), num_v_heads)
    v, g, beta = v.to(compute_dtype), g.to(compute_dtype), beta.to(compute_dtype)
    if initial_state is None:
        state = q.new_zeros(batch, num_v_heads, head_dim_k, head_dim_v)
    else:
        state = initial_state.to(compute_dtype)
    outputs = []
    for t in range(seq_len):
        k_t = k[:, t]  # [B, HV, K]
        state = state * g[:, t].exp()[..., None, None]
        prediction = torch.einsum("bhkv,bhk->bhv", state, k_t)
        update = beta[:, t, :, None] * (v[:, t] - prediction)
        state = state + k_t[..., :, None] * update[..., None, :]
        outputs.append(scale * torch.einsum("bhkv,bhk->bhv", state, q[:, t]))
    o = torch.stack(outputs, dim=1) if outputs else v.new_zeros(batch, 0, num_v_heads, head_dim_v)
    return o, state
