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

import torch
import torch.nn.functional as F

__all__ = ["ALPHA_MIN", "CHUNK_SIZE", "chunk_gated_delta_rule_torch", "recurrent_gated_delta_rule_reference"]

# 32, not fla's 64: on CPU (B1 T1024 H4 K=V=64, 2 threads) the intra-chunk work grows with the
# chunk and the state loop with the number of chunks; 32 measured fastest (16: 3.2 ms, 32: 2.6 ms,
# 64: 3.4 ms).
CHUNK_SIZE = 32
# alpha is clamped to at least this before the log (SPEC 3.5): g >= log(1e-6) ~ -13.8.
ALPHA_MIN = 1e-6


def _expand_qk_heads(x: torch.Tensor, num_v_heads: int) -> torch.Tensor:
    """``[B, T, H, K]`` -> ``[B, T, HV, K]``, value head ``h`` taking query/key head ``h // (HV // H)``."""
    group = num_v_heads // x.shape[2]
    return x if group == 1 else x.repeat_interleave(group, dim=2)


# Chunk-local log-decay differences are clamped to at least this before exp (see below).
_LOG_DECAY_FLOOR = -80.0

# Diagonal blocks up to this size are inverted by repeated squaring (log2(n) products);
# larger ones split in two (see _unit_lower_inverse).
_INVERSE_LEAF = 16


def _unit_lower_inverse(a: torch.Tensor) -> torch.Tensor:
    """``(I + a)^{-1}`` for strictly lower-triangular ``a`` ``[..., n, n]``, by batched matmuls.

    ``a`` is nilpotent, so ``(I + a)^{-1} = sum_j (-a)^j = (I - a)(I + a^2)(I + a^4)...`` with
    ``ceil(log2 n)`` factors; blocks larger than 16 split as
    ``[[L11, 0], [L21, L22]]^{-1} = [[T11, 0], [-T22 L21 T11, T22]]`` (both diagonal blocks
    inverted in one batched call). On CPU this is several times faster than
    ``torch.linalg.solve_triangular`` on many small matrices, and plain matmuls for autograd.
    """
    n = a.shape[-1]
    if n <= _INVERSE_LEAF:
        # 3-D so that each factor is one fused baddbmm: inverse + inverse @ a^(2^k).
        shape = a.shape
        a = a.reshape(-1, n, n)
        inverse = torch.eye(n, dtype=a.dtype, device=a.device) - a
        power, span = a, 2
        while span < n:
            power = torch.bmm(power, power)  # a^2, a^4, a^8
            inverse = torch.baddbmm(inverse, inverse, power)  # times (I + a^(2^k))
            span *= 2
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
    - ``U = T (beta * V)``, ``W = T (beta * exp(G) * K)``: the WY form of the chunk's updates;
    - ``U' = U - W S_0`` (the new values once the carried state is accounted for);
    - ``O = scale * ((exp(G) * Q) S_0 + (Q K^T * M) U')`` with ``M_ij = exp(G_i - G_j)`` for
      ``j <= i``, else 0;
    - ``S_C = exp(G_C) S_0 + (exp(G_C - G) * K)^T U'``.

    Everything that does not depend on the carried state (``A``, ``T``, ``U``, ``W``,
    ``Q K^T * M``) is computed for all chunks at once as batched matrix products; only the
    state update loops over the chunks, and the outputs are formed after the loop in one
    batched product. Decays enter only as differences of cumulative log-decays inside a
    chunk (``G_i - G_j`` with ``j <= i``, and ``G_C - G_i``), all ``<= 0``, masked before
    ``exp``: nothing overflows however close to 0 the decay gets. ``T`` is padded at the end
    to a multiple of ``chunk_size`` with ``k = v = q = beta = g = 0`` (no update, no decay).

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
    q = _expand_qk_heads(q, num_v_heads)
    k = _expand_qk_heads(k, num_v_heads)

    chunk = max(1, min(chunk_size, seq_len))
    num_chunks = -(-seq_len // chunk)
    pad = num_chunks * chunk - seq_len
    bh = batch * num_v_heads

    def to_chunks(x: torch.Tensor) -> torch.Tensor:
        # [B, T, HV, D] -> [B * HV, N, C, D] in the compute dtype: a view when no cast or pad
        # is needed (splitting T is a view of the transposed tensor).
        x = x.to(compute_dtype).transpose(1, 2)
        if pad:
            x = F.pad(x, (0, 0, 0, pad))
        return x.reshape(bh, num_chunks, chunk, x.shape[-1])

    def to_chunks_per_step(x: torch.Tensor) -> torch.Tensor:
        # [B, T, HV] -> [B * HV, N, C]
        x = x.to(compute_dtype).transpose(1, 2)
        if pad:
            x = F.pad(x, (0, pad))
        return x.reshape(bh, num_chunks, chunk)

    q_c = to_chunks(q)
    v_c = to_chunks(v)
    # k enters two products as k^T and two elementwise products: one copy to the chunked
    # layout here is cheaper than matmul copying the strided view twice.
    k_c = to_chunks(k).contiguous()
    k_t = k_c.transpose(-1, -2)
    beta_c = to_chunks_per_step(beta).unsqueeze(-1)  # [BH, N, C, 1]
    g_c = to_chunks_per_step(g)
    g_cum = g_c.cumsum(-1)  # G_i, chunk-local, [BH, N, C]

    # M_ij = exp(G_i - G_j) below the diagonal and exactly 1 on it; above it M is never read
    # (A and the scores are cut to their triangles after the product), so it is set finite
    # there. The difference is replaced *before* exp: above the diagonal G_i - G_j > 0 can be
    # hundreds (alpha near 0), and on it G_i - G_i = 0 is a constant (as a difference its
    # gradient would be two O(1) terms cancelling, which swamps the tiny true gradient of a
    # tiny alpha in float32). Log-decays under -80 are clamped there: exp(-80) ~ 2e-35 is
    # below float32 resolution of every sum it enters, and keeps exp off its slow path
    # (underflow to denormals / 0 is several times slower on CPU).
    strictly_lower = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril(-1)
    log_decay_ij = torch.where(strictly_lower, g_cum.unsqueeze(-1) - g_cum.unsqueeze(-2), 0.0)
    decay_ij = log_decay_ij.clamp_min_(_LOG_DECAY_FLOOR).exp_()

    k_beta = k_c * beta_c
    a_strict = (k_beta @ k_t).mul_(decay_ij).tril_(-1)  # diagonal out too
    t_inv = _unit_lower_inverse(a_strict)  # (I + A)^{-1}
    g_exp = g_cum.exp().unsqueeze(-1)

    u_c = t_inv @ (v_c * beta_c)
    w_c = t_inv @ (k_beta * g_exp)
    scores = (q_c @ k_t).mul_(decay_ij).tril_()  # Q K^T * M, diagonal kept
    q_decayed = q_c * g_exp
    # exp(G_C - G_i) = exp(sum_{s > i} g_s): a shifted reverse cumsum, not a difference (the
    # last row's decay is exactly 1, with no gradient).
    g_after = F.pad(g_c.flip(-1).cumsum(-1).flip(-1)[..., 1:], (0, 1))
    k_to_end_t = (k_c * g_after.exp().unsqueeze(-1)).transpose(-1, -2)  # [BH, N, K, C]
    chunk_decay = g_cum[..., -1:].exp().unsqueeze(-1)  # [BH, N, 1, 1]

    if initial_state is None:
        state = q_c.new_zeros(bh, head_dim_k, head_dim_v)
    else:
        state = initial_state.to(compute_dtype).reshape(bh, head_dim_k, head_dim_v)
    # The only sequential part: two fused products per chunk (per-chunk operands unbound
    # once, not indexed in the loop).
    values_per_chunk, corrections_per_chunk = u_c.unbind(1), w_c.unbind(1)
    keys_per_chunk, decay_per_chunk = k_to_end_t.unbind(1), chunk_decay.unbind(1)
    states_in, new_values = [], []
    for n in range(num_chunks):
        states_in.append(state)
        u_new = torch.baddbmm(values_per_chunk[n], corrections_per_chunk[n], state, alpha=-1.0)  # U - W S
        new_values.append(u_new)
        state = torch.baddbmm(state * decay_per_chunk[n], keys_per_chunk[n], u_new)

    # O = scale * ((exp(G) Q) S_in + scores U'), all chunks in two batched products.
    states_in = torch.stack(states_in, dim=1).reshape(bh * num_chunks, head_dim_k, head_dim_v)
    new_values = torch.stack(new_values, dim=1).reshape(bh * num_chunks, chunk, head_dim_v)
    o = torch.bmm(scores.reshape(bh * num_chunks, chunk, chunk), new_values)
    o = torch.baddbmm(
        o, q_decayed.reshape(bh * num_chunks, chunk, head_dim_k), states_in, beta=scale, alpha=scale
    )
    o = o.reshape(batch, num_v_heads, num_chunks * chunk, head_dim_v)[:, :, :seq_len]
    state = state.reshape(batch, num_v_heads, head_dim_k, head_dim_v)
    return o.transpose(1, 2), state


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
    q = _expand_qk_heads(q, num_v_heads).to(compute_dtype)
    k = _expand_qk_heads(k, num_v_heads).to(compute_dtype)
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
