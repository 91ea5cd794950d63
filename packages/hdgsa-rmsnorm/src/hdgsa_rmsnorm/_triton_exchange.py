"""How the programs of a split row share their partial sums (forward and backward split kernels).

The launcher allocates ``EXCHANGE`` with :func:`new_exchange`: int64 zeros
``[rows, NUM_CHUNKS + 1]``, per row one word per chunk and a counter. A program publishes its
partial sum as its word (the float's bits with a "published" flag above them, one relaxed atomic
exchange), then counts itself in (a relaxed atomic add). A waiting program polls the counter (one
scalar atomic per poll), then reads the row's words and sums the values in one fixed order, so
every program of a row gets the same total, deterministically. No fences: the partial sums are
the only data exchanged, and a release fence would make the program wait for all its loads and
stores in flight (the next row's prefetch) before publishing. Without one a word may become
visible after the count; the flags catch that (the reader polls the words until every flag is
set). Polling the words themselves instead of the counter measured 12% slower in the backward at
262,144 columns (32 chunks, H100), likely because the word vector is replicated over the
program's threads: one load per thread per word per poll.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["new_exchange", "publish_partial", "row_total"]

_PUBLISHED = tl.constexpr(1 << 32)  # the flag bit above a partial sum's 32 bits
_LOW_BITS = tl.constexpr((1 << 32) - 1)


def new_exchange(rows: int, n_chunks: int, device: torch.device) -> torch.Tensor:
    """The exchange buffer of a split-row launch: no word published, every counter at 0."""
    return torch.zeros((rows, n_chunks + 1), dtype=torch.int64, device=device)


@triton.jit
def publish_partial(EXCHANGE, i_row, i_g, NUM_CHUNKS, value):
    """Publish ``value`` (a float32 scalar) as chunk ``i_g``'s partial sum of row ``i_row``."""
    p_row = EXCHANGE + tl.cast(i_row, tl.int64) * (NUM_CHUNKS + 1)
    word = (value.to(tl.int32, bitcast=True).to(tl.int64) & _LOW_BITS) | _PUBLISHED
    tl.atomic_xchg(p_row + i_g, word, sem="relaxed")
    tl.atomic_add(p_row + NUM_CHUNKS, 1, sem="relaxed")


@triton.jit
def row_total(EXCHANGE, i_row, o_g, m_g, NUM_CHUNKS, n_spins, MAX_SPINS: tl.constexpr, WAIT: tl.constexpr):
    """Sum of row ``i_row``'s ``NUM_CHUNKS`` partial sums, in a fixed order: ``(total, complete,
    n_spins)``. With ``WAIT``, spins until all are published or this program's spin budget
    (``MAX_SPINS`` over all its rows) runs out; ``complete`` is false then."""
    p_row = EXCHANGE + tl.cast(i_row, tl.int64) * (NUM_CHUNKS + 1)
    if WAIT:
        n_done = tl.atomic_add(p_row + NUM_CHUNKS, 0, sem="relaxed")
        while (n_done < NUM_CHUNKS) & (n_spins < MAX_SPINS):
            n_done = tl.atomic_add(p_row + NUM_CHUNKS, 0, sem="relaxed")
            n_spins += 1
    b_words = tl.load(p_row + o_g, mask=m_g, other=_PUBLISHED, volatile=True)
    if WAIT:
        while (tl.min(b_words >> 32, axis=0) == 0) & (n_spins < MAX_SPINS):
            b_words = tl.load(p_row + o_g, mask=m_g, other=_PUBLISHED, volatile=True)
            n_spins += 1
    complete = tl.min(b_words >> 32, axis=0) != 0
    b_values = (b_words & _LOW_BITS).to(tl.int32).to(tl.float32, bitcast=True)
    return tl.sum(b_values, axis=0), complete, n_spins
