"""The fused Triton top-k of the gated indexer: the scores exist only tile by tile.

The scores come from the dense forward's own ``score_tile`` with the same tiles, so they are
bitwise ``gated_indexer``'s. Every valid key of a row is a distinct int64 sort key
``(score bits << 32) | (0xFFFFFFFF - key)``: scores are >= 0, so their float bits order like
integers, and equal scores order by the lower key index.

Every path counts first, per query, how many keys fall in bins of float bits: 16 coarse bins
over ``[S / 16, S)``, where ``S = sum_h sigmoid(w_h)`` bounds the row's scores, then 16 fine bins
inside the bracket of the ``(topk - sinks)``-th best. The highest bin edge with enough keys above
it is the query's threshold (the counts are exact integers: no key of the top-k is below it), so
a query's candidate buffer of ``CAP = 2 * KP`` sort keys receives about ``topk`` keys and is
sorted once with ``tl.sort``; its first ``topk - sinks`` keys follow the sinks.

- Per-block path (the default): one program per 64-query block runs the counts, the collection
  (keys in order, a prefix sum gives each its slot) and the sort. When a query's buffer would
  overflow (ties, all-equal scores), it is sorted, its best ``KP`` kept and the threshold raised
  to the ``KP``-th best: exact whatever the distribution.
- Split path (``split=True``, opt-in until timed on a GPU): the count and collection passes run
  over (query block, key chunk) programs (integer atomics for the counts, an atomic slot counter
  for the buffer: its order varies, its content does not), a separate kernel sorts and merges
  the stats partials in key order; blocks with an overflowing query are recomputed by the
  per-block kernel.

Bitwise reproducible: integer counts, sorted buffer content, stats merged in key order (Chan
et al.).

Extra memory: the outputs plus at most ``DEFAULT_WORKSPACE_BYTES`` (256 MiB) of buffers and
counts: the query blocks go through in groups that fit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hdgsa_core import TRITON_VERSION, interpreter_enabled, parse_version
from hdgsa_core.triton_utils import cdiv, next_power_of_2, on_input_device

from ._triton_fwd import SCORE_TILE, dot_options, input_strides, score_tile
from .reference import DEFAULT_WORKSPACE_BYTES

__all__ = ["MAX_KEEP", "indexer_topk_fwd"]

_BLOCK_M, _BLOCK_N, _NUM_WARPS = SCORE_TILE
_LOW_MASK = tl.constexpr(0xFFFFFFFF)
# Threshold counts: 16 bins of float bits per pass. Coarse bins are 2**21 bits wide (a quarter
# of an octave: 16 of them tile [S / 16, S)); fine bins 2**17 (16 per coarse bin), or, for a row
# whose selection reaches below S / 16, one octave each (16 octaves below S / 16).
_NUM_BINS = tl.constexpr(16)
_COARSE_SHIFT = tl.constexpr(21)
_FINE_SHIFT = tl.constexpr(17)
_OCTAVE_SHIFT = tl.constexpr(23)
_COARSE_SPAN = tl.constexpr(4 << 23)  # 4 octaves of float bits
_LOW_SPAN = tl.constexpr(16 << 23)
# Rows sorted together: ROWS * CAP int64 keys in registers (4096: 32 per thread at 4 warps).
# The interpreter sorts a whole block at once (its cost is per operation, not per element).
_SORT_ELEMENTS = 4096
# Candidates kept per query (topk rounded up to a power of two): the sort of 2 * MAX_KEEP keys
# of one row happens in registers and shared memory: 64 KiB at 4096 and 128 KiB at 8192 (sm_90,
# offline compiles with Triton 3.6; 32 KiB at 8192 with 3.9); 16384, twice that, would not fit
# an H100's 227 KiB on 3.6 (its compile did not finish in 25 minutes on a 2-core CPU).
MAX_KEEP = 8192
# The split path reads tl.atomic_add's result in every thread (broadcast since Triton 3.5).
_SPLIT_MIN_TRITON = (3, 5)


@triton.jit
def _gather_rows(b_values, sel):
    """``b_values[o_g]`` for the rows of a group (``sel[i, j] = o_g[i] == j``), ``[ROWS]``."""
    return tl.sum(tl.where(sel, b_values[None, :], 0), 1)


@triton.jit
def _indicator(N_DIMS: tl.constexpr, j: tl.constexpr):
    """0 / 1 along the ``j``-th innermost axis of a ``[2] * N_DIMS`` hypercube."""
    return tl.reshape(tl.arange(0, 2), [1] * (N_DIMS - j - 1) + [2] + [1] * j)


@triton.jit
def _compare_and_swap(h, flip, i: tl.constexpr, N_DIMS: tl.constexpr):
    """Order the pairs along the ``i``-th innermost axis: min left, max right (``flip``
    reverses). By max / min reductions, which the interpreter runs in numpy."""
    b_hi = tl.max(h, N_DIMS - 1 - i, keep_dims=True)
    b_lo = tl.min(h, N_DIMS - 1 - i, keep_dims=True)
    return tl.where((flip ^ _indicator(N_DIMS, i)).to(tl.int1), b_hi, b_lo)


@triton.jit
def _sort_rows_bitonic(x, LOG_CAP: tl.constexpr, N_DIMS: tl.constexpr):
    """Descending bitonic sort of each row of ``x`` (``[ROWS, 2**LOG_CAP]``, ``2**N_DIMS``
    elements): the network of ``tl.sort``, for the interpreter (whose ``tl.sort`` runs its
    integer compare-and-swap one element at a time in Python). The result is the same: a
    sort of distinct keys (the only repeats, the -1 fill, are equal) is unique."""
    h = tl.reshape(x, [2] * N_DIMS)
    for stage in tl.static_range(1, LOG_CAP + 1):
        if stage < LOG_CAP:
            flip = _indicator(N_DIMS, stage)
        else:
            flip = 1
        for i in tl.static_range(stage):
            h = _compare_and_swap(h, flip, stage - 1 - i, N_DIMS)
    return tl.reshape(h, x.shape)


@triton.jit
def _sorted_rows(
    p_buf, o_g, b_n_g, CAP: tl.constexpr, LOG_CAP: tl.constexpr, N_DIMS: tl.constexpr, INTERPRET: tl.constexpr
):
    """The buffered keys of rows ``o_g`` (``b_n_g`` each), sorted descending, ``[ROWS, CAP]``;
    unused slots read as -1, below every key."""
    o_c = tl.arange(0, CAP)
    p_rows = p_buf + o_g[:, None] * CAP + o_c[None, :]
    b_keys = tl.load(p_rows, mask=o_c[None, :] < b_n_g[:, None], other=-1)
    if INTERPRET:
        return _sort_rows_bitonic(b_keys, LOG_CAP, N_DIMS)
    return tl.sort(b_keys, dim=1, descending=True)


@triton.jit
def _bin_counts(b_bits, m_count, b_base, b_shift, NUM_BINS: tl.constexpr):
    """Per row, how many counted keys fall in each of ``NUM_BINS`` bins of score bits
    (``[BLOCK_M, NUM_BINS]`` int32): bin ``j`` holds bits in ``[base + j << shift, base + (j + 1)
    << shift)`` (``base``, ``shift`` per row), the last bin everything above, keys below
    ``base`` none. The bins are packed
    eight to an int64 (8 bits each: a tile row has at most 64 keys), so a row costs two sums."""
    m_in = m_count & (b_bits >= b_base[:, None])
    b_bin = tl.minimum((b_bits - b_base[:, None]) >> b_shift[:, None], NUM_BINS - 1)
    b_one = tl.where(m_in, 1, 0).to(tl.int64) << ((b_bin & 7) * 8).to(tl.int64)
    b_lo = tl.sum(tl.where(b_bin < 8, b_one, 0), 1)
    b_hi = tl.sum(tl.where(b_bin >= 8, b_one, 0), 1)
    o_bin = tl.arange(0, NUM_BINS)
    b_word = tl.where(o_bin[None, :] < 8, b_lo[:, None], b_hi[:, None])
    return ((b_word >> ((o_bin & 7) * 8).to(tl.int64)[None, :]) & 255).to(tl.int32)


@triton.jit
def _best_bin(b_hist, b_need, NUM_BINS: tl.constexpr):
    """``(j, count)``: the highest bin whose keys and those above number at least ``need``
    (-1 if none), and that number."""
    o_bin = tl.arange(0, NUM_BINS)
    # keys at or above bin j: the total minus those below
    b_above = tl.sum(b_hist, 1)[:, None] - tl.cumsum(b_hist, 1) + b_hist
    b_j = tl.max(tl.where(b_above >= b_need[:, None], o_bin[None, :], -1), 1)
    b_c = tl.sum(tl.where(o_bin[None, :] == b_j[:, None], b_above, 0), 1)
    return b_j, b_c


@triton.jit
def _block_rows(
    blk,
    num_blocks_m,
    Tq,
    Tkv,
    q_offset,
    sink_size,
    TOPK: tl.constexpr,
    CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """The query block ``blk`` (heaviest causal blocks first): ``(i_b, i_m, o_m, m_m, n_valid,
    n_sink, need)``; a row's valid keys are the prefix ``0 .. n_valid - 1``, ``need`` the
    non-sink keys it keeps."""
    i_b = (blk // num_blocks_m).to(tl.int64)
    i_m = num_blocks_m - 1 - blk % num_blocks_m
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < Tq
    if CAUSAL:
        n_valid = tl.minimum(tl.maximum(o_m + q_offset + 1, 0), Tkv)
    else:
        n_valid = tl.zeros([BLOCK_M], dtype=tl.int32) + Tkv
    n_valid = tl.where(m_m, n_valid, 0)
    n_sink = tl.minimum(n_valid, sink_size)
    return i_b, i_m, o_m, m_m, n_valid, n_sink, tl.minimum(n_valid, TOPK) - n_sink


@triton.jit
def _coarse_base(p_w, stride_wh, m_m, H: tl.constexpr, BLOCK_M: tl.constexpr):
    """Float bits of ``S / 16``, ``S = sum_h sigmoid(w_h)`` (scores lie in ``[0, S)``)."""
    b_gates = tl.zeros([BLOCK_M], dtype=tl.float32)
    for h in range(H):
        b_w = tl.load(p_w + h * stride_wh, mask=m_m, other=0.0).to(tl.float32)
        b_gates += 1.0 / (1.0 + tl.exp(-b_w))
    return b_gates.to(tl.int32, bitcast=True) - _COARSE_SPAN


@triton.jit
def _row_thresholds(b_hist0, b_hist1, b_need, b_base0, n_all, fine_limit):
    """From the coarse (and fine) bin counts of rows: ``(base1, shift1, fine, tau, survivors)``:
    the fine bins' placement, whether the row counts again, the threshold (a sort key: the
    keys above it are those at or above the chosen bin edge) and how many keys pass it."""
    b_j, b_c = _best_bin(b_hist0, b_need, _NUM_BINS)
    m_edge = b_j >= 0
    b_edge = b_base0 + (b_j << _COARSE_SHIFT)
    b_fine = ~m_edge | (b_c > fine_limit)
    b_base1 = tl.where(m_edge, b_edge, b_base0 - _LOW_SPAN)
    b_shift1 = tl.where(m_edge, _FINE_SHIFT, _OCTAVE_SHIFT)
    b_tau = tl.where(m_edge, (b_edge.to(tl.int64) << 32) - 1, -1)
    b_survivors = tl.where(m_edge, b_c, n_all)
    b_j, b_c = _best_bin(b_hist1, b_need, _NUM_BINS)
    m_edge = b_fine & (b_j >= 0)
    b_edge = b_base1 + (b_j << b_shift1)
    b_tau = tl.where(m_edge, (b_edge.to(tl.int64) << 32) - 1, b_tau)
    b_survivors = tl.where(m_edge, b_c, b_survivors)
    return b_base1, b_shift1, b_fine, b_tau, b_survivors


@triton.jit
def _stats_merge(b_count, b_mean, b_m2, b_c, b_c_mean, b_c_m2):
    """Chan et al.: the count, mean and sum of squared deviations of two parts."""
    b_total = b_count + b_c
    b_delta = b_c_mean - b_mean
    b_mean += b_delta * (b_c / tl.maximum(b_total, 1.0))
    b_m2 += b_c_m2 + b_delta * b_delta * (b_count * b_c / tl.maximum(b_total, 1.0))
    return b_total, b_mean, b_m2


@triton.jit
def _stats_tile(b_s, m_valid, b_count, b_mean, b_m2):
    """Merge a tile's valid scores into each row's running count, mean and squared deviations."""
    b_c = tl.sum(m_valid.to(tl.float32), 1)
    b_tile_mean = tl.sum(tl.where(m_valid, b_s, 0.0), 1) / tl.maximum(b_c, 1.0)
    b_dev = tl.where(m_valid, b_s - b_tile_mean[:, None], 0.0)
    return _stats_merge(b_count, b_mean, b_m2, b_c, b_tile_mean, tl.sum(b_dev * b_dev, 1))


@triton.jit
def _tile_keys(b_s, o_n, m_valid, m_sink):
    """Distinct int64 sort keys ``(score bits << 32) | (0xFFFFFFFF - key)`` of a tile's
    non-sink valid keys, -1 elsewhere (below every key)."""
    b_low = o_n.to(tl.int64) ^ _LOW_MASK  # 0xFFFFFFFF - key: ties go to the lower key
    b_key = (b_s.to(tl.int32, bitcast=True).to(tl.int64) << 32) | b_low[None, :]
    return tl.where(m_valid & ~m_sink, b_key, -1)


@triton.jit
def _store_sinks(out_idx, out_score, p_out, b_s, o_n, m_sink, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Sinks skip the selection: straight to their output slots (slot = key)."""
    tl.store(out_score + p_out[:, None] + o_n[None, :], b_s, mask=m_sink)
    b_sink_idx = tl.broadcast_to(o_n[None, :], [BLOCK_M, BLOCK_N])
    tl.store(out_idx + p_out[:, None] + o_n[None, :], b_sink_idx, mask=m_sink)


@triton.jit
def _store_sorted(
    out_idx, out_score, b_sorted, p_row, m_row, b_n, b_sinks, TOPK: tl.constexpr, CAP: tl.constexpr
):
    """Write sorted candidate rows (``b_n`` keys each) after their sinks: the first
    ``TOPK - sinks`` keys; ``p_row`` the rows' first output slots."""
    o_c = tl.arange(0, CAP)
    m_out = m_row[:, None] & (o_c[None, :] < b_n[:, None]) & (o_c[None, :] < TOPK - b_sinks[:, None])
    b_index = ((b_sorted & _LOW_MASK) ^ _LOW_MASK).to(tl.int32)
    b_score = (b_sorted >> 32).to(tl.int32).to(tl.float32, bitcast=True)
    p_slot = p_row[:, None] + b_sinks[:, None] + o_c[None, :]
    tl.store(out_idx + p_slot, b_index, mask=m_out)
    tl.store(out_score + p_slot, b_score, mask=m_out)


@triton.jit
def _key_tile(
    k, p_q, p_w, bias, i_b, n0, n_valid, n_sink, m_m, o_d, m_d, stride_kb, stride_kt, stride_qh, stride_wh,
    stride_bias, scale, Tkv, H: tl.constexpr, DOT_FP32: tl.constexpr, FAST_TANH: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """The key tile at ``n0``: ``(o_n, scores, valid, sink)`` of a query block."""
    o_n = n0 + tl.arange(0, BLOCK_N)
    m_n = o_n < Tkv
    p_k = k + i_b * stride_kb + o_n.to(tl.int64)[:, None] * stride_kt + o_d[None, :]
    b_k = tl.load(p_k, mask=m_n[:, None] & m_d[None, :], other=0.0)
    b_s = score_tile(
        p_q,
        p_w,
        bias,
        b_k,
        m_m,
        m_d,
        stride_qh,
        stride_wh,
        stride_bias,
        scale,
        H,
        DOT_FP32,
        FAST_TANH,
        BLOCK_M,
        BLOCK_N,
    )
    m_valid = o_n[None, :] < n_valid[:, None]
    return o_n, b_s, m_valid, m_valid & (o_n[None, :] < n_sink[:, None])


@triton.jit(
    do_not_specialize=[
        "Tq",
        "Tkv",
        "q_offset",
        "sink_size",
        "num_blocks_m",
        "block_start",
        "key_chunk",
        "num_chunks",
        "fine_limit",
    ]
)
def _indexer_topk_pass_kernel(
    q,
    k,
    w,
    bias,
    out_idx,
    out_score,
    buf,
    hist,
    fill,
    part_stats,
    stride_qb,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_wb,
    stride_wt,
    stride_wh,
    stride_bias,
    Tq,
    Tkv,
    q_offset,
    sink_size,
    num_blocks_m,
    block_start,
    key_chunk,
    num_chunks,
    fine_limit,
    scale,
    PASS: tl.constexpr,
    TOPK: tl.constexpr,
    CAP: tl.constexpr,
    H: tl.constexpr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    DOT_FP32: tl.constexpr,
    FAST_TANH: tl.constexpr,
    STATS: tl.constexpr,
):
    """One (query block, key chunk) of a pass over a chunk of query blocks: ``PASS`` 0 counts
    keys in coarse bins, 1 in fine bins (rows still with many keys), 2 appends the keys above
    each row's threshold to its buffer (a slot per key from an atomic counter: the buffer's
    order varies, its content does not, and it is sorted afterwards). Counts are int32 atomic
    sums (exact, order-free); stats are one partial per (row, key chunk), merged in order later."""
    i_local, i_c = tl.program_id(0), tl.program_id(1)
    i_b, _, o_m, m_m, n_valid, n_sink, b_need = _block_rows(
        block_start + i_local, num_blocks_m, Tq, Tkv, q_offset, sink_size, TOPK, CAUSAL, BLOCK_M
    )
    n_end = tl.max(n_valid, 0)
    n_lo = i_c * key_chunk
    m_keep_all = tl.max((n_valid - n_sink > b_need).to(tl.int32), 0) == 0
    first = tl.where(m_keep_all, 2, 0)
    o_r = tl.arange(0, BLOCK_M)
    o_d = tl.arange(0, BLOCK_D)
    o_bin = tl.arange(0, _NUM_BINS)
    m_d = o_d < D
    o_m64 = o_m.to(tl.int64)
    o_slot = i_local * BLOCK_M + o_r  # the rows' places in the chunk's workspace
    p_q = q + i_b * stride_qb + o_m64[:, None] * stride_qt + o_d[None, :]
    p_w = w + i_b * stride_wb + o_m64 * stride_wt
    p_out = (i_b * Tq + o_m64) * TOPK
    p_hist = hist + o_slot[:, None] * _NUM_BINS + o_bin[None, :]
    b_base = _coarse_base(p_w, stride_wh, m_m, H, BLOCK_M)
    b_shift = tl.full([BLOCK_M], _COARSE_SHIFT, dtype=tl.int32)
    b_tau = tl.full([BLOCK_M], -1, dtype=tl.int64)
    n_stop = tl.minimum(n_end, n_lo + key_chunk)
    if PASS < 2:
        n_stop = tl.where(m_keep_all, n_lo, n_stop)
    if PASS > 0:
        b_hist0 = tl.load(p_hist)
        b_hist1 = tl.load(p_hist + BLOCK_M * _NUM_BINS * tl.num_programs(0))
        b_base1, b_shift1, b_fine, b_tau, b_survivors = _row_thresholds(
            b_hist0, b_hist1, b_need, b_base, n_valid - n_sink, fine_limit
        )
        if PASS == 1:
            b_base, b_shift = b_base1, b_shift1
            n_stop = tl.where(tl.max(b_fine.to(tl.int32), 0) > 0, n_stop, n_lo)
        else:
            # Rows with more survivors than their buffer holds are left to the exact fallback.
            b_tau = tl.where(b_survivors <= CAP, b_tau, 0x7FFFFFFFFFFFFFFF)
    b_hist = tl.zeros([BLOCK_M, _NUM_BINS], dtype=tl.int32)
    b_count = tl.zeros([BLOCK_M], dtype=tl.float32)
    b_mean = tl.zeros([BLOCK_M], dtype=tl.float32)
    b_m2 = tl.zeros([BLOCK_M], dtype=tl.float32)
    for n0 in range(n_lo, n_stop, BLOCK_N):
        o_n, b_s, m_valid, m_sink = _key_tile(
            k, p_q, p_w, bias, i_b, n0, n_valid, n_sink, m_m, o_d, m_d, stride_kb, stride_kt, stride_qh,
            stride_wh, stride_bias, scale, Tkv, H, DOT_FP32, FAST_TANH, BLOCK_M, BLOCK_N,
        )  # fmt: skip
        if STATS:  # noqa: SIM102  (constexpr test outside, run-time test inside)
            if first == PASS:
                b_count, b_mean, b_m2 = _stats_tile(b_s, m_valid, b_count, b_mean, b_m2)
        if PASS < 2:
            b_bits = b_s.to(tl.int32, bitcast=True)
            b_hist += _bin_counts(b_bits, m_valid & ~m_sink, b_base, b_shift, _NUM_BINS)
        else:
            _store_sinks(out_idx, out_score, p_out, b_s, o_n, m_sink, BLOCK_M, BLOCK_N)
            m_take = _tile_keys(b_s, o_n, m_valid, m_sink) > b_tau[:, None]
            b_take = tl.sum(m_take.to(tl.int32), 1)
            b_at = tl.atomic_add(fill + o_slot, b_take, mask=b_take > 0)
            b_pos = b_at[:, None] + tl.cumsum(m_take.to(tl.int32), 1) - 1
            b_key = _tile_keys(b_s, o_n, m_valid, m_sink)
            # Never past the row's buffer: a fill that disagrees with the counts sends the
            # block to the exact fallback (the sort kernel compares them).
            m_store = m_take & (b_pos < CAP)
            tl.store(buf + o_slot.to(tl.int64)[:, None] * CAP + b_pos, b_key, mask=m_store)
    if PASS < 2:  # noqa: SIM102
        if n_stop > n_lo:
            tl.atomic_add(p_hist + PASS * BLOCK_M * _NUM_BINS * tl.num_programs(0), b_hist)
    if STATS:  # noqa: SIM102
        if first == PASS:
            p_part = part_stats + (o_slot * num_chunks + i_c) * 3
            tl.store(p_part, b_count)
            tl.store(p_part + 1, b_mean)
            tl.store(p_part + 2, b_m2)


@triton.jit(
    do_not_specialize=[
        "Tq",
        "Tkv",
        "q_offset",
        "sink_size",
        "num_blocks_m",
        "block_start",
        "key_chunk",
        "num_chunks",
        "fine_limit",
    ]
)
def _indexer_topk_sort_kernel(
    w,
    out_idx,
    out_score,
    out_mean,
    out_var,
    buf,
    hist,
    fill,
    part_stats,
    flags,
    stride_wb,
    stride_wt,
    stride_wh,
    Tq,
    Tkv,
    q_offset,
    sink_size,
    num_blocks_m,
    num_local,
    block_start,
    key_chunk,
    num_chunks,
    fine_limit,
    TOPK: tl.constexpr,
    CAP: tl.constexpr,
    ROWS: tl.constexpr,
    LOG_CAP: tl.constexpr,
    N_DIMS: tl.constexpr,
    INTERPRET: tl.constexpr,
    H: tl.constexpr,
    BLOCK_M: tl.constexpr,
    CAUSAL: tl.constexpr,
    STATS: tl.constexpr,
):
    """Sort ``ROWS`` rows' buffers and write their selections (after the sinks) and stats
    (the key chunks' partial stats merged in key order). A row whose survivors overflowed its
    buffer flags its query block for the exact fallback instead."""
    i_local = tl.program_id(0) // (BLOCK_M // ROWS)
    g = tl.program_id(0) % (BLOCK_M // ROWS) * ROWS
    i_b, i_m, _, m_m, n_valid, n_sink, b_need = _block_rows(
        block_start + i_local, num_blocks_m, Tq, Tkv, q_offset, sink_size, TOPK, CAUSAL, BLOCK_M
    )
    n_end = tl.max(n_valid, 0)
    o_r = tl.arange(0, BLOCK_M)
    o_g = g + tl.arange(0, ROWS)
    sel = o_r[None, :] == o_g[:, None]
    o_bin = tl.arange(0, _NUM_BINS)
    o_slot = i_local * BLOCK_M + o_g
    m_g = _gather_rows(m_m.to(tl.int32), sel) > 0
    b_need_g = _gather_rows(b_need, sel)
    b_sinks_g = _gather_rows(n_sink, sel)
    b_all_g = _gather_rows(n_valid, sel) - b_sinks_g
    o_m64 = (i_m * BLOCK_M + o_g).to(tl.int64)
    b_base = _coarse_base(w + i_b * stride_wb + o_m64 * stride_wt, stride_wh, m_g, H, ROWS)
    p_hist = hist + o_slot[:, None] * _NUM_BINS + o_bin[None, :]
    b_hist0 = tl.load(p_hist)
    b_hist1 = tl.load(p_hist + BLOCK_M * _NUM_BINS * num_local)
    _, _, _, _, b_survivors = _row_thresholds(b_hist0, b_hist1, b_need_g, b_base, b_all_g, fine_limit)
    b_n = tl.load(fill + o_slot)
    # Rows whose survivors overflow the buffer, or whose collected count is not what the
    # counting passes found (the same scores, so never expected): the exact fallback.
    m_fallback = m_g & ((b_survivors > CAP) | (b_n != b_survivors))
    if tl.max(m_fallback.to(tl.int32), 0) > 0:
        tl.store(flags + i_local, 1)
    else:
        p_buf = buf + i_local.to(tl.int64) * (BLOCK_M * CAP)
        b_sorted = _sorted_rows(p_buf, o_g, b_n, CAP, LOG_CAP, N_DIMS, INTERPRET)
        _store_sorted(out_idx, out_score, b_sorted, (i_b * Tq + o_m64) * TOPK, m_g, b_n, b_sinks_g, TOPK, CAP)
        if STATS:
            b_count = tl.zeros([ROWS], dtype=tl.float32)
            b_mean = tl.zeros([ROWS], dtype=tl.float32)
            b_m2 = tl.zeros([ROWS], dtype=tl.float32)
            for i_c in range(tl.cdiv(n_end, key_chunk)):
                p_part = part_stats + (o_slot * num_chunks + i_c) * 3
                b_count, b_mean, b_m2 = _stats_merge(
                    b_count, b_mean, b_m2, tl.load(p_part), tl.load(p_part + 1), tl.load(p_part + 2)
                )
            tl.store(out_mean + i_b * Tq + o_m64, b_mean, mask=m_g)
            tl.store(out_var + i_b * Tq + o_m64, b_m2 / tl.maximum(b_count, 1.0), mask=m_g)


@triton.jit(
    do_not_specialize=[
        "Tq",
        "Tkv",
        "q_offset",
        "sink_size",
        "num_blocks_m",
        "num_blocks",
        "block_start",
        "flagged",
        "count",
        "fine_limit",
    ]
)
def _indexer_topk_fwd_kernel(
    q,
    k,
    w,
    bias,
    out_idx,
    out_score,
    out_mean,
    out_var,
    out_fill,
    workspace,
    flags,
    stride_qb,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_wb,
    stride_wt,
    stride_wh,
    stride_bias,
    Tq,
    Tkv,
    q_offset,
    sink_size,
    num_blocks_m,
    num_blocks,
    block_start,
    flagged,
    count,
    fine_limit,
    scale,
    TOPK: tl.constexpr,
    KP: tl.constexpr,
    CAP: tl.constexpr,
    ROWS: tl.constexpr,
    LOG_CAP: tl.constexpr,
    N_DIMS: tl.constexpr,
    INTERPRET: tl.constexpr,
    H: tl.constexpr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    DOT_FP32: tl.constexpr,
    FAST_TANH: tl.constexpr,
    STATS: tl.constexpr,
    FILL: tl.constexpr,
):
    """Blocks ``block_start + pid, + P, ...`` of ``num_blocks``, each start to end in one
    program (with ``flagged``, only the blocks whose flag is set: the split path's fallback)."""
    pid, num_programs = tl.program_id(0), tl.num_programs(0)
    p_buf = workspace + pid.to(tl.int64) * (BLOCK_M * CAP)
    o_r = tl.arange(0, BLOCK_M)
    o_d = tl.arange(0, BLOCK_D)
    o_c = tl.arange(0, CAP)
    m_d = o_d < D
    for blk in range(pid, num_blocks, num_programs):
        i_b, i_m, o_m, m_m, n_valid, n_sink, b_need = _block_rows(
            block_start + blk, num_blocks_m, Tq, Tkv, q_offset, sink_size, TOPK, CAUSAL, BLOCK_M
        )
        if flagged != 0:
            m_m = m_m & ((o_m * 0 + tl.load(flags + blk)) != 0)
            n_valid = tl.where(m_m, n_valid, 0)
            n_sink = tl.where(m_m, n_sink, 0)
            b_need = tl.where(m_m, b_need, 0)
        o_m64 = o_m.to(tl.int64)
        n_end = tl.max(n_valid, 0)
        p_q = q + i_b * stride_qb + o_m64[:, None] * stride_qt + o_d[None, :]
        p_w = w + i_b * stride_wb + o_m64 * stride_wt
        p_out = (i_b * Tq + o_m64) * TOPK
        b_base = _coarse_base(p_w, stride_wh, m_m, H, BLOCK_M)
        b_shift = tl.full([BLOCK_M], _COARSE_SHIFT, dtype=tl.int32)
        b_tau = tl.full([BLOCK_M], -1, dtype=tl.int64)
        b_n = tl.zeros([BLOCK_M], dtype=tl.int32)
        b_count = tl.zeros([BLOCK_M], dtype=tl.float32)
        b_mean = tl.zeros([BLOCK_M], dtype=tl.float32)
        b_m2 = tl.zeros([BLOCK_M], dtype=tl.float32)
        b_hist = tl.zeros([BLOCK_M, _NUM_BINS], dtype=tl.int32)
        b_compactions = tl.zeros([BLOCK_M], dtype=tl.int32)
        b_fine = b_need < 0
        # Pass 0 counts keys in coarse bins, pass 1 in fine bins inside each row's chosen
        # coarse bin; pass 2 collects the keys above the threshold they give. Blocks whose
        # rows keep all their keys only collect.
        m_keep_all = tl.max((n_valid - n_sink > b_need).to(tl.int32), 0) == 0
        first = tl.where(m_keep_all | (count == 0), 2, 0)
        tl.debug_barrier()  # the previous block's last reads of the buffer are done
        for p in range(first, 3):
            n_stop = n_end
            if p == 1:
                # Only rows whose coarse threshold leaves many keys count again.
                n_stop = tl.where(tl.max(b_fine.to(tl.int32), 0) > 0, n_end, 0)
            for n0 in range(0, n_stop, BLOCK_N):
                o_n, b_s, m_valid, m_sink = _key_tile(
                    k, p_q, p_w, bias, i_b, n0, n_valid, n_sink, m_m, o_d, m_d, stride_kb, stride_kt, stride_qh,
                    stride_wh, stride_bias, scale, Tkv, H, DOT_FP32, FAST_TANH, BLOCK_M, BLOCK_N,
                )  # fmt: skip
                if STATS:  # noqa: SIM102  (constexpr test outside, run-time test inside)
                    if p == first:
                        b_count, b_mean, b_m2 = _stats_tile(b_s, m_valid, b_count, b_mean, b_m2)
                if p < 2:
                    b_bits = b_s.to(tl.int32, bitcast=True)
                    b_hist += _bin_counts(b_bits, m_valid & ~m_sink, b_base, b_shift, _NUM_BINS)
                else:
                    _store_sinks(out_idx, out_score, p_out, b_s, o_n, m_sink, BLOCK_M, BLOCK_N)
                    b_key = _tile_keys(b_s, o_n, m_valid, m_sink)
                    m_take = b_key > b_tau[:, None]
                    b_c_take = tl.sum(m_take.to(tl.int32), 1)
                    m_over = (b_n + b_c_take) > CAP
                    if tl.max(m_over.to(tl.int32), 0) > 0:
                        tl.debug_barrier()  # earlier appends are visible to every thread
                        for g in range(0, BLOCK_M, ROWS):
                            o_g = g + tl.arange(0, ROWS)
                            sel = o_r[None, :] == o_g[:, None]
                            m_over_g = _gather_rows(m_over.to(tl.int32), sel) > 0
                            if tl.max(m_over_g.to(tl.int32), 0) > 0:
                                b_sorted = _sorted_rows(
                                    p_buf, o_g, _gather_rows(b_n, sel), CAP, LOG_CAP, N_DIMS, INTERPRET
                                )
                                p_rows = p_buf + o_g[:, None] * CAP + o_c[None, :]
                                tl.store(p_rows, b_sorted, mask=m_over_g[:, None])
                                # The KP-th best key becomes the row's threshold; KP keys stay.
                                b_tau_g = tl.sum(tl.where(o_c[None, :] == KP - 1, b_sorted, 0), 1)
                                m_row = tl.sum((sel & m_over_g[:, None]).to(tl.int32), 0) > 0
                                b_tau = tl.where(m_row, tl.sum(tl.where(sel, b_tau_g[:, None], 0), 0), b_tau)
                                b_n = tl.where(m_row, KP, b_n)
                                b_compactions += m_row.to(tl.int32)
                        tl.debug_barrier()  # the compacted rows are visible before the appends below
                        m_take = b_key > b_tau[:, None]
                        b_c_take = tl.sum(m_take.to(tl.int32), 1)
                    b_pos = b_n[:, None] + tl.cumsum(m_take.to(tl.int32), 1) - 1
                    tl.store(p_buf + o_r[:, None] * CAP + b_pos, b_key, mask=m_take)
                    b_n += b_c_take
            if p < 2:
                # The highest bin edge with at least b_need counted keys at or above it: a
                # threshold just below that edge keeps every key that can be selected.
                b_j, b_c_j = _best_bin(b_hist, b_need, _NUM_BINS)
                b_edge = b_base + (b_j << b_shift)
                m_edge = b_j >= 0
                if p == 0:
                    # Fine bins inside the chosen coarse bin, or octaves below S / 16.
                    b_fine = ~m_edge | (b_c_j > fine_limit)
                    b_base = tl.where(m_edge, b_edge, b_base - _LOW_SPAN)
                    b_shift = tl.where(m_edge, _FINE_SHIFT, _OCTAVE_SHIFT)
                else:
                    m_edge = m_edge & b_fine
                b_tau = tl.where(m_edge, (b_edge.to(tl.int64) << 32) - 1, b_tau)
                b_hist = tl.zeros([BLOCK_M, _NUM_BINS], dtype=tl.int32)
        tl.debug_barrier()
        for g in range(0, tl.where(n_end > 0, BLOCK_M, 0), ROWS):
            o_g = g + tl.arange(0, ROWS)
            sel = o_r[None, :] == o_g[:, None]
            b_sorted = _sorted_rows(p_buf, o_g, _gather_rows(b_n, sel), CAP, LOG_CAP, N_DIMS, INTERPRET)
            o_row = i_m * BLOCK_M + o_g
            _store_sorted(
                out_idx, out_score, b_sorted, (i_b * Tq + o_row.to(tl.int64)) * TOPK, o_row < Tq,
                _gather_rows(b_n, sel), _gather_rows(n_sink, sel), TOPK, CAP,
            )  # fmt: skip
        if STATS:
            tl.store(out_mean + i_b * Tq + o_m64, b_mean, mask=m_m)
            tl.store(out_var + i_b * Tq + o_m64, b_m2 / tl.maximum(b_count, 1.0), mask=m_m)
        if FILL:
            tl.store(out_fill + i_b * Tq + o_m64, b_n | (b_compactions << 16), mask=m_m)


def _launch_persistent(
    args: dict, programs: int, workspace: torch.Tensor, capacity: int, rows: int, **extra
) -> None:
    _indexer_topk_fwd_kernel[(programs,)](
        **args,
        workspace=workspace,
        ROWS=rows,
        LOG_CAP=capacity.bit_length() - 1,
        N_DIMS=(rows * capacity).bit_length() - 1,
        **extra,
    )


@on_input_device
def indexer_topk_fwd(
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
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
    sort_rows: int | None = None,
    builtin_sort: bool | None = None,
    count: bool = True,
    fine_limit: int | None = None,
    num_warps: int = _NUM_WARPS,
    fill: torch.Tensor | None = None,
    split: bool = False,
    key_chunk: int = 1024,
    sort_warps: int = 4,
) -> tuple[torch.Tensor, ...]:
    """``(indices, scores, mean, var)``; ``mean`` / ``var`` are zeros unless ``return_stats``.

    ``workspace_bytes`` bounds the candidate buffers (and so the number of programs).
    ``sort_rows`` (rows sorted together) and ``builtin_sort`` (``tl.sort`` rather than the
    interpreter-friendly network) default to what suits the device; tests set them to run
    the GPU's choices under the interpreter. ``count=False`` skips the threshold counts,
    ``fine_limit`` (default: the buffer's capacity) is the coarse count above which a row counts
    again in fine bins. ``split``: passes over (query block, key chunk) programs (``key_chunk``
    keys each) instead of one program per block. ``fill`` (diagnostics): int32 ``[B, Tq]``
    that receives each row's buffer count ``| compactions << 16`` (one program per block) or
    a one-element counter of blocks left to the fallback (``split``)."""
    batch, num_queries, heads, dim = q.shape
    num_keys = k.shape[1]
    device = q.device
    indices = torch.full((batch, num_queries, topk), -1, dtype=torch.int32, device=device)
    scores = torch.full((batch, num_queries, topk), float("-inf"), dtype=torch.float32, device=device)
    mean = torch.zeros(batch, num_queries, dtype=torch.float32, device=device)
    var = torch.zeros(batch, num_queries, dtype=torch.float32, device=device)
    if batch * num_queries * num_keys == 0:
        return indices, scores, mean, var
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    dot_fp32, fast_tanh = dot_options(q, k)
    # No row has more than Tkv valid keys: a larger topk needs no larger buffer.
    keep = next_power_of_2(max(min(topk, num_keys), _BLOCK_N))
    if keep > MAX_KEEP:
        raise RuntimeError(
            f"indexer_topk: the Triton kernel keeps at most {MAX_KEEP} candidates per query in "
            f"registers; min(topk, Tkv) = {min(topk, num_keys)} is larger: use backend='torch'"
        )
    capacity = 2 * keep
    fine_limit = capacity if fine_limit is None else fine_limit
    num_blocks_m = cdiv(num_queries, _BLOCK_M)
    num_blocks = batch * num_blocks_m
    interpret = interpreter_enabled() if builtin_sort is None else not builtin_sort
    rows = sort_rows or (
        _BLOCK_M if interpreter_enabled() else max(1, min(_BLOCK_M, _SORT_ELEMENTS // capacity))
    )
    common = dict(
        **input_strides(q, k, w, bias),
        Tq=num_queries,
        Tkv=num_keys,
        q_offset=q_offset,
        sink_size=sink_size,
        num_blocks_m=num_blocks_m,
        TOPK=topk,
        H=heads,
        BLOCK_M=_BLOCK_M,
        CAUSAL=causal,
        STATS=return_stats,
    )
    tiles = dict(
        q=q,
        k=k,
        w=w,
        bias=bias,
        out_idx=indices,
        out_score=scores,
        scale=float(scale),
        D=dim,
        BLOCK_D=max(16, next_power_of_2(dim)),
        BLOCK_N=_BLOCK_N,
        DOT_FP32=dot_fp32,
        FAST_TANH=fast_tanh,
    )
    persistent = dict(
        **common,
        **tiles,
        out_mean=mean,
        out_var=var,
        KP=keep,
        CAP=capacity,
        INTERPRET=interpret,
        count=int(count),
        fine_limit=fine_limit,
        num_warps=num_warps,
    )
    if not split:
        per_program = _BLOCK_M * capacity * 8
        programs = max(1, min(num_blocks, workspace_bytes // per_program))
        # flags: any int32 tensor (read only by the split path's fallback): the same compiled kernel.
        workspace = torch.empty(programs * _BLOCK_M * capacity, dtype=torch.int64, device=device)
        _launch_persistent(
            persistent, programs, workspace, capacity, rows, out_fill=fill, flags=indices, num_blocks=num_blocks,
            block_start=0, flagged=0, FILL=fill is not None,
        )  # fmt: skip
        return indices, scores, mean, var
    _split_topk(
        common, tiles, persistent, mean, var, fill, capacity, rows, fine_limit, interpret,
        workspace_bytes, key_chunk, sort_warps, num_warps,
    )  # fmt: skip
    return indices, scores, mean, var


def _split_topk(
    common: dict, tiles: dict, persistent: dict, mean: torch.Tensor, var: torch.Tensor,
    fill: torch.Tensor | None, capacity: int, rows: int, fine_limit: int, interpret: bool,
    workspace_bytes: int, key_chunk: int, sort_warps: int, num_warps: int,
) -> None:  # fmt: skip
    """The split passes, over chunks of query blocks whose buffers fit ``workspace_bytes``."""
    if parse_version(TRITON_VERSION) < _SPLIT_MIN_TRITON and not interpreter_enabled():
        raise RuntimeError(
            f"indexer_topk: the split path needs Triton >= 3.5 (installed: {TRITON_VERSION}): it "
            "places keys by the value an atomic add returns to every thread of a row, which earlier "
            "releases gave to one thread only (triton-lang/triton#7402); use the default path"
        )
    if key_chunk % _BLOCK_N:
        raise ValueError(f"key_chunk must be a multiple of {_BLOCK_N}, got {key_chunk}")
    device = tiles["q"].device
    num_blocks = tiles["q"].shape[0] * common["num_blocks_m"]
    num_chunks = cdiv(common["Tkv"], key_chunk)
    stats_bytes = num_chunks * 12 if common["STATS"] else 0
    per_block = _BLOCK_M * (capacity * 8 + 2 * _NUM_BINS.value * 4 + 4 + stats_bytes) + 4
    chunk_blocks = max(1, min(num_blocks, workspace_bytes // per_block))
    slots = chunk_blocks * _BLOCK_M
    buf = torch.empty(slots * capacity, dtype=torch.int64, device=device)
    counters = torch.empty(slots * (2 * _NUM_BINS.value + 1) + chunk_blocks, dtype=torch.int32, device=device)
    part_stats = torch.empty(
        slots * num_chunks * 3 if common["STATS"] else 1, dtype=torch.float32, device=device
    )
    split_args = dict(**common, part_stats=part_stats, key_chunk=key_chunk, num_chunks=num_chunks)
    # The sort kernel reads only w of the inputs.
    sort_args = {name: value for name, value in split_args.items() if not name.startswith("stride_")}
    sort_args.update(
        stride_wb=common["stride_wb"], stride_wt=common["stride_wt"], stride_wh=common["stride_wh"]
    )
    for start in range(0, num_blocks, chunk_blocks):
        count = min(chunk_blocks, num_blocks - start)
        counters.zero_()
        hist = counters[: 2 * slots * _NUM_BINS.value]
        buf_fill = counters[2 * slots * _NUM_BINS.value : -chunk_blocks]
        flags = counters[-chunk_blocks:]
        for pass_ in range(3):
            _indexer_topk_pass_kernel[(count, num_chunks)](
                **split_args, **tiles, buf=buf, hist=hist, fill=buf_fill, block_start=start, PASS=pass_,
                CAP=capacity, fine_limit=fine_limit, num_warps=num_warps,
            )  # fmt: skip
        sort_rows = rows
        _indexer_topk_sort_kernel[(count * (_BLOCK_M // sort_rows),)](
            **sort_args, w=tiles["w"], out_idx=tiles["out_idx"], out_score=tiles["out_score"], out_mean=mean,
            out_var=var, buf=buf, hist=hist, fill=buf_fill, flags=flags, num_local=count, block_start=start,
            CAP=capacity, ROWS=sort_rows, LOG_CAP=capacity.bit_length() - 1,
            N_DIMS=(sort_rows * capacity).bit_length() - 1, INTERPRET=interpret, fine_limit=fine_limit,
            num_warps=sort_warps,
        )  # fmt: skip
        # Rows whose survivors overflowed their buffer: their blocks again, one program each.
        _launch_persistent(
            persistent, count, buf, capacity, rows, out_fill=None, flags=flags, num_blocks=count,
            block_start=start, flagged=1, FILL=False,
        )  # fmt: skip
        if fill is not None:
            fill += flags[:count].sum()
