"""The query-block plan of sparse attention: per block of ``BQ`` consecutive queries and index
list, the sorted union of the keys its queries select, and each query's multiplicity per union key.

For lists shared by a KV group or by all heads (``indices`` ``[B, Hi, T, K]``, ``Hi`` in
``{1, Hkv}``), the block path attends a block of queries (times the ``G`` query heads of a KV
head) to the union of their lists: each union key's K/V row is gathered once per block and the
``BQ * G`` rows x union tile scores run on the tensor cores; a per-(query, union key) count keeps
the slot semantics exactly (a key selected twice counts twice; count 0 = not selected).

Built in four integer passes, no host loop over blocks and no float atomics:

1. ``_block_plan_mark_kernel``: each valid slot (``0 <= index < Tkv``, mask set) sets bit
   ``index`` of its block's key bitmap (``atomic_or``) and adds to the block's valid-slot count;
2. torch: popcount of every bitmap word, prefix sums: ``word_base`` (the union position of each
   word's first key), the union sizes ``U_b`` and their maximum ``U`` (one host sync: the
   widths of the plan's tensors);
3. ``_block_plan_union_kernel``: the union lists (keys in increasing order, ``-1`` padding);
4. ``_block_plan_count_kernel``: each valid slot adds 1 to the count of (its query, its key's
   union position) (integer ``atomic_add`` on packed 16-bit counters: the sums do not depend on
   the order, so the plan is bitwise the same every run).

:func:`choose_path` decides between the block path and the per-query path from pass 1-2 run on
a sample of the blocks (see its docstring for the rule); :func:`plan_and_choose` also returns the
plan when the block path is chosen. The plan holds ``B * Hi * ceil(T / BQ) * BQ * ceil(U / 2) * 4``
bytes of counts (300 MB at T 32K, K 2K, two lists, U 2290) plus bitmaps and unions (~70 MB there).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from hdgsa_core.triton_utils import cdiv, next_power_of_2, on_input_device

__all__ = [
    "BLOCK_ROWS",
    "EXPANSION_THRESHOLD_FORWARD",
    "EXPANSION_THRESHOLD_TRAINING",
    "BlockPlan",
    "BlockTiles",
    "block_q_for",
    "block_smem_bytes",
    "block_tile_config",
    "build_block_plan",
    "choose_path",
    "plan_and_choose",
]

# Rows of the block path's tensor-core tiles: BQ * G query rows per program.
BLOCK_ROWS = 128
# The block path is chosen when a block's union holds at most this many keys per slot of one of
# its queries (``sum_b U_b * BQ / sum_b valid_b``), forward only / with a backward; see
# :func:`choose_path` (set from H100 timings).
EXPANSION_THRESHOLD_FORWARD = 1.25
EXPANSION_THRESHOLD_TRAINING = 4.0
# choose_path measures the statistic on about this many blocks per call (evenly spaced in each
# list, over all lists; per-head lists at T 8K hold 1024 blocks of 128 queries: a quarter).
SAMPLED_BLOCKS = 256

# Below this many slots per list (T * K) the per-query path runs without the statistic: its
# pass and two host syncs cost about 0.2-0.4 ms, a large share of a small call (the per-query
# forward at T 8K, K 512, Hkv 2 takes 0.6 ms on an H100), and long context is the block path's
# case. T 8K with K 512 is exactly 2**22.
MIN_SLOTS_FOR_BLOCK = 2**22


def block_q_for(num_q_heads: int, num_kv_heads: int) -> int:
    """Queries per block: ``BLOCK_ROWS // G`` (at least 1), so that a program's ``BQ * G`` rows
    fill a 128-row tensor-core tile."""
    return max(1, BLOCK_ROWS // (num_q_heads // num_kv_heads))


def block_rows(block_q: int, group: int) -> int:
    """Tensor-core rows of a block program: its ``BQ * G`` query rows, padded."""
    return max(16, next_power_of_2(block_q * group))


def block_tile_config(head_dim: int, value_dim: int, backward: bool) -> dict:
    """``BLOCK_N`` (union keys per step), warps and stages of the block kernels on a GPU."""
    wide = max(head_dim, value_dim) > 128
    if backward:
        return {"BLOCK_N": 32 if wide else 64, "num_warps": 8, "num_stages": 1 if wide else 2}
    return {"BLOCK_N": 64 if wide else 128, "num_warps": 8, "num_stages": 2}


# Shared memory one block-path program may use where the device does not say (an H100's 227 KB).
SMEM_LIMIT_DEFAULT = 232448


def block_smem_bytes(rows: int, head_dim: int, value_dim: int, element_size: int, backward: bool) -> int:
    """An upper estimate of the shared memory of a block kernel's program: its tensor-core
    operands. Forward: the ``[rows, D]`` query tile, ``stages`` K and V tiles of ``BLOCK_N``
    keys, the ``[rows, BLOCK_N]`` probabilities. Backward: the query and ``dout`` tiles in two
    layouts (``dq = ds k`` and ``dk = ds^T q``, ``dv = p^T dout``), the K/V tiles, ``p`` and
    ``ds``. (Measured: 303,104 B for the backward at 128 rows, D = Dv = 256, bf16; this gives
    311,296.)"""
    config = block_tile_config(head_dim, value_dim, backward)
    block_n, stages = config["BLOCK_N"], max(1, config["num_stages"])
    width = max(16, next_power_of_2(head_dim)) + max(16, next_power_of_2(value_dim))
    if backward:
        return element_size * (2 * rows * width + stages * block_n * width + 2 * rows * block_n)
    return element_size * (
        rows * max(16, next_power_of_2(head_dim)) + stages * block_n * width + rows * block_n
    )


@dataclass(frozen=True)
class BlockTiles:
    """What the block kernels' tiles need to fit: head dims, element size, the device's limit."""

    head_dim: int
    value_dim: int
    element_size: int
    smem_limit: int = SMEM_LIMIT_DEFAULT

    @classmethod
    def of(cls, q: torch.Tensor, v: torch.Tensor) -> BlockTiles:
        """From the inputs: dims, dtype, and the shared memory of ``q``'s CUDA device."""
        limit = SMEM_LIMIT_DEFAULT
        if q.device.type == "cuda":
            props = torch.cuda.get_device_properties(q.device)
            limit = int(getattr(props, "shared_memory_per_block_optin", 0) or SMEM_LIMIT_DEFAULT)
        return cls(q.shape[3], v.shape[3], q.element_size(), limit)

    def fit(self, num_q_heads: int, num_kv_heads: int, needs_grad: bool) -> bool:
        """Whether the forward (and with ``needs_grad`` the backward) tiles fit."""
        rows = block_rows(block_q_for(num_q_heads, num_kv_heads), num_q_heads // num_kv_heads)
        passes = (False, True) if needs_grad else (False,)
        return all(
            block_smem_bytes(rows, self.head_dim, self.value_dim, self.element_size, backward)
            <= self.smem_limit
            for backward in passes
        )


@dataclass
class BlockPlan:
    """The union lists and multiplicities of one call (all tensors on the inputs' device).

    - ``union``: ``[B, Hi, NB, U]`` int32, block ``n``'s union keys in increasing order, ``-1``
      after the first ``union_size[b, i, n]``;
    - ``union_size``: ``[B, Hi, NB]`` int32; ``valid_slots``: ``[B, Hi, NB]`` int32;
    - ``counts``: ``[B, Hi, NB * BQ, UC]`` int16 (int32 when ``K >= 2**15``), the number of
      valid slots of query ``n * BQ + i`` that name union key ``u`` (``UC >= U``, padding 0);
    - ``bits``: ``[B, Hi, NB, W]`` int32 key bitmaps (``W = ceil(Tkv / 32)``), ``word_base``:
      ``[B, Hi, NB, W]`` int32 union position of each word's first key (for key-major passes).
    """

    block_q: int
    num_blocks: int
    max_union: int
    union: torch.Tensor
    union_size: torch.Tensor
    valid_slots: torch.Tensor
    counts: torch.Tensor
    bits: torch.Tensor
    word_base: torch.Tensor

    def expansion(self) -> float:
        """Union keys per query slot: ``sum U_b * BQ / sum valid_b`` (host sync)."""
        return _expansion(self.union_size, self.valid_slots, self.block_q)


def _expansion(union_size: torch.Tensor, valid_slots: torch.Tensor, block_q: int) -> float:
    valid = int(valid_slots.sum())
    if valid == 0:
        return float("inf")
    return int(union_size.sum()) * block_q / valid


@triton.jit
def _popcount(x):
    """Set bits of each element of the uint32 tensor ``x``."""
    x = x - ((x >> 1) & 0x55555555)
    x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F
    return (x * 0x01010101) >> 24


@triton.jit
def _block_slots(
    INDEX,
    MASK,
    i_row,
    o_k,
    T,
    TKV,
    NUM_SLOTS,
    HI,
    s_ib,
    s_ih,
    s_it,
    s_ik,
    s_mb,
    s_mh,
    s_mt,
    s_mk,
    HAS_MASK: tl.constexpr,
):
    """``(b, list, t, key int32 (0 where invalid), valid)`` of slots ``o_k`` of flat row ``i_row``."""
    i_t = i_row % T
    i_ih = (i_row // T) % HI
    i_b = i_row // (T * HI)
    m_k = o_k < NUM_SLOTS
    b_key = tl.load(INDEX + i_b * s_ib + i_ih * s_ih + i_t * s_it + o_k * s_ik, mask=m_k, other=-1)
    m_valid = m_k & (b_key >= 0) & (b_key < TKV)
    if HAS_MASK:
        b_m = tl.load(MASK + i_b * s_mb + i_ih * s_mh + i_t * s_mt + o_k * s_mk, mask=m_k, other=0)
        m_valid = m_valid & (b_m != 0)
    return i_b, i_ih, i_t, tl.where(m_valid, b_key, 0).to(tl.int32), m_valid


@triton.jit(do_not_specialize=["T", "TKV", "NUM_SLOTS", "HI", "NB", "W"])
def _block_plan_mark_kernel(
    INDEX,
    MASK,
    BITS,
    VALID,
    s_ib,
    s_ih,
    s_it,
    s_ik,
    s_mb,
    s_mh,
    s_mt,
    s_mk,
    T,
    TKV,
    NUM_SLOTS,
    HI,
    NB,
    W,
    BLOCK_Q: tl.constexpr,
    HAS_MASK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    i_row = tl.program_id(0).to(tl.int64)
    o_k = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    i_b, i_ih, i_t, b_key, m_valid = _block_slots(
        INDEX,
        MASK,
        i_row,
        o_k,
        T,
        TKV,
        NUM_SLOTS,
        HI,
        s_ib,
        s_ih,
        s_it,
        s_ik,
        s_mb,
        s_mh,
        s_mt,
        s_mk,
        HAS_MASK,
    )
    i_list = (i_b * HI + i_ih) * NB + i_t // BLOCK_Q
    b_bit = (tl.full([BLOCK], 1, tl.uint32) << (b_key & 31).to(tl.uint32)).to(tl.int32, bitcast=True)
    p_word = BITS + i_list * W + (b_key >> 5)
    # The block's other queries mostly set the same bits: skip the atomic (which serialises on
    # its word) when a plain read already shows the bit (a stale read only costs the atomic).
    m_new = m_valid & ((tl.load(p_word, mask=m_valid, other=0) & b_bit) == 0)
    tl.atomic_or(p_word, b_bit, mask=m_new, sem="relaxed")
    tl.atomic_add(VALID + i_list, tl.sum(m_valid.to(tl.int32), 0), sem="relaxed")


@triton.jit(do_not_specialize=["W", "UMAX"])
def _block_plan_union_kernel(BITS, WORD_BASE, UNION, W, UMAX, BLOCK_W: tl.constexpr):
    i_list = tl.program_id(0).to(tl.int64)
    o_w = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    m_w = o_w < W
    b_word = tl.load(BITS + i_list * W + o_w, mask=m_w, other=0).to(tl.uint32, bitcast=True)
    b_base = tl.load(WORD_BASE + i_list * W + o_w, mask=m_w, other=0)
    o_bit = tl.arange(0, 32).to(tl.uint32)
    m_set = ((b_word[:, None] >> o_bit[None, :]) & 1) != 0
    b_below = b_word[:, None] & ((tl.full([1, 32], 1, tl.uint32) << o_bit[None, :]) - 1)
    b_pos = b_base[:, None] + _popcount(b_below).to(tl.int32)
    b_key = o_w[:, None] * 32 + o_bit[None, :].to(tl.int32)
    tl.store(UNION + i_list * UMAX + b_pos, b_key, mask=m_set & m_w[:, None])


@triton.jit(do_not_specialize=["T", "TKV", "NUM_SLOTS", "HI", "NB", "W", "CW"])
def _block_plan_count_kernel(
    INDEX,
    MASK,
    BITS,
    WORD_BASE,
    COUNTS,
    s_ib,
    s_ih,
    s_it,
    s_ik,
    s_mb,
    s_mh,
    s_mt,
    s_mk,
    T,
    TKV,
    NUM_SLOTS,
    HI,
    NB,
    W,
    CW,
    BLOCK_Q: tl.constexpr,
    PER_WORD: tl.constexpr,
    HAS_MASK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """``COUNTS`` ``[B, Hi, NB * BQ, CW]`` int32 words, each packing ``PER_WORD`` counters."""
    i_row = tl.program_id(0).to(tl.int64)
    o_k = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    i_b, i_ih, i_t, b_key, m_valid = _block_slots(
        INDEX,
        MASK,
        i_row,
        o_k,
        T,
        TKV,
        NUM_SLOTS,
        HI,
        s_ib,
        s_ih,
        s_it,
        s_ik,
        s_mb,
        s_mh,
        s_mt,
        s_mk,
        HAS_MASK,
    )
    i_list = (i_b * HI + i_ih) * NB + i_t // BLOCK_Q
    o_word = i_list * W + (b_key >> 5)
    b_word = tl.load(BITS + o_word, mask=m_valid, other=0).to(tl.uint32, bitcast=True)
    b_below = b_word & ((tl.full([BLOCK], 1, tl.uint32) << (b_key & 31).to(tl.uint32)) - 1)
    b_pos = tl.load(WORD_BASE + o_word, mask=m_valid, other=0) + _popcount(b_below).to(tl.int32)
    # the padded query rows of the last block exist in COUNTS: row (b, list, t) is t's own row
    i_qrow = (i_b * HI + i_ih) * NB * BLOCK_Q + i_t
    b_inc = tl.full([BLOCK], 1, tl.int32) << ((b_pos % PER_WORD) * (32 // PER_WORD))
    tl.atomic_add(COUNTS + i_qrow * CW + b_pos // PER_WORD, b_inc, mask=m_valid, sem="relaxed")


def _popcount_words(words: torch.Tensor) -> torch.Tensor:
    """Set bits per int32 word (torch, int32)."""
    x = words.to(torch.int64) & 0xFFFFFFFF
    x = x - ((x >> 1) & 0x55555555)
    x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F
    return (((x * 0x01010101) & 0xFFFFFFFF) >> 24).to(torch.int32)


def _slot_args(indices: torch.Tensor, mask_arg: torch.Tensor) -> dict:
    def strides(t: torch.Tensor, p: str) -> dict:
        head = 0 if t.shape[1] == 1 else t.stride(1)
        return {f"s_{p}b": t.stride(0), f"s_{p}h": head, f"s_{p}t": t.stride(2), f"s_{p}k": t.stride(3)}

    return {**strides(indices, "i"), **strides(mask_arg, "m")}


def _mark(indices: torch.Tensor, mask: torch.Tensor | None, num_keys: int, block_q: int):
    """Passes 1-2: ``(bits, word_base, union_size, valid_slots)`` as ``[B, Hi, NB, ...]``."""
    batch, num_lists, seq_len, num_slots = indices.shape
    num_blocks = cdiv(seq_len, block_q)
    num_words = max(1, cdiv(num_keys, 32))
    device = indices.device
    bits = torch.zeros(batch, num_lists, num_blocks, num_words, dtype=torch.int32, device=device)
    valid = torch.zeros(batch, num_lists, num_blocks, dtype=torch.int32, device=device)
    mask_arg = indices if mask is None else mask.view(torch.uint8)
    block = min(1024, max(16, next_power_of_2(num_slots)))
    if indices.numel() > 0:
        _block_plan_mark_kernel[(batch * num_lists * seq_len, cdiv(num_slots, block))](
            INDEX=indices,
            MASK=mask_arg,
            BITS=bits,
            VALID=valid,
            **_slot_args(indices, mask_arg),
            T=seq_len,
            TKV=num_keys,
            NUM_SLOTS=num_slots,
            HI=num_lists,
            NB=num_blocks,
            W=num_words,
            BLOCK_Q=block_q,
            HAS_MASK=mask is not None,
            BLOCK=block,
            num_warps=4,
        )
    popcount = _popcount_words(bits)
    ends = torch.cumsum(popcount, -1, dtype=torch.int32)
    return bits, ends - popcount, ends[..., -1].contiguous(), valid


@on_input_device
def build_block_plan(
    indices: torch.Tensor,
    mask: torch.Tensor | None,
    num_keys: int,
    block_q: int,
    _marked: tuple | None = None,
) -> BlockPlan:
    """The plan of ``indices``/``mask`` ``[B, Hi, T, K]`` over ``num_keys`` keys, blocks of
    ``block_q`` queries. One host sync (the largest union size)."""
    batch, num_lists, seq_len, num_slots = indices.shape
    num_blocks = cdiv(seq_len, block_q)
    bits, word_base, union_size, valid = _marked or _mark(indices, mask, num_keys, block_q)
    num_words = bits.shape[-1]
    max_union = int(union_size.max()) if union_size.numel() else 0
    width = max(1, max_union)
    union = torch.full((batch, num_lists, num_blocks, width), -1, dtype=torch.int32, device=indices.device)
    block_w = 32
    if max_union > 0:
        _block_plan_union_kernel[(batch * num_lists * num_blocks, cdiv(num_words, block_w))](
            BITS=bits, WORD_BASE=word_base, UNION=union, W=num_words, UMAX=width, BLOCK_W=block_w, num_warps=4
        )
    per_word = 2 if num_slots < 2**15 else 1
    count_words = cdiv(width, per_word)
    counts32 = torch.zeros(
        batch, num_lists, num_blocks * block_q, count_words, dtype=torch.int32, device=indices.device
    )
    if max_union > 0:
        mask_arg = indices if mask is None else mask.view(torch.uint8)
        block = min(1024, max(16, next_power_of_2(num_slots)))
        _block_plan_count_kernel[(batch * num_lists * seq_len, cdiv(num_slots, block))](
            INDEX=indices,
            MASK=mask_arg,
            BITS=bits,
            WORD_BASE=word_base,
            COUNTS=counts32,
            **_slot_args(indices, mask_arg),
            T=seq_len,
            TKV=num_keys,
            NUM_SLOTS=num_slots,
            HI=num_lists,
            NB=num_blocks,
            W=num_words,
            CW=count_words,
            BLOCK_Q=block_q,
            PER_WORD=per_word,
            HAS_MASK=mask is not None,
            BLOCK=block,
            num_warps=4,
        )
    counts = counts32.view(torch.int16) if per_word == 2 else counts32
    return BlockPlan(
        block_q=block_q,
        num_blocks=num_blocks,
        max_union=max_union,
        union=union,
        union_size=union_size,
        valid_slots=valid,
        counts=counts,
        bits=bits,
        word_base=word_base,
    )


def _structural_path(
    indices: torch.Tensor, num_kv_heads: int, num_q_heads: int, tiles: BlockTiles | None, needs_grad: bool
) -> str | None:
    """ "per-query" when the layout or the tiles rule the block path out; None when the index
    sets decide."""
    num_lists = 1 if indices.dim() == 3 else indices.shape[1]
    group = num_q_heads // num_kv_heads
    if num_lists not in (1, num_kv_heads) or (num_lists == num_q_heads and group > 1):
        return "per-query"  # one list per query head: no shared tile
    if indices.numel() == 0 or indices.shape[-2] * indices.shape[-1] < MIN_SLOTS_FOR_BLOCK:
        return "per-query"
    if tiles is not None and not tiles.fit(num_q_heads, num_kv_heads, needs_grad):
        return "per-query"  # e.g. 128 rows at D = 256: the backward's tiles exceed shared memory
    return None


def _threshold(threshold: float | None, needs_grad: bool) -> float:
    if threshold is not None:
        return threshold
    return EXPANSION_THRESHOLD_TRAINING if needs_grad else EXPANSION_THRESHOLD_FORWARD


@torch.no_grad()
def sampled_expansion(
    indices: torch.Tensor, mask: torch.Tensor | None, num_keys: int, block_q: int
) -> tuple[float, tuple | None]:
    """``(e, marked)``: the expansion statistic on about :data:`SAMPLED_BLOCKS` evenly spaced
    blocks, and the full mark pass when every block was measured (else None)."""
    num_blocks = cdiv(indices.shape[2], block_q)
    # every list's blocks 0, stride, 2 stride, ...: about SAMPLED_BLOCKS in all (B * Hi lists),
    # and at least two per list
    lists = indices.shape[0] * indices.shape[1]
    stride = max(1, min(num_blocks // 2, lists * num_blocks // SAMPLED_BLOCKS))
    if stride == 1:
        marked = _mark(indices, mask, num_keys, block_q)
        return _expansion(marked[2], marked[3], block_q), marked
    sample = _mark(*_sampled_rows(indices, mask, block_q, stride), num_keys, block_q)
    return _expansion(sample[2], sample[3], block_q), None


@torch.no_grad()
def plan_and_choose(
    indices: torch.Tensor,
    mask: torch.Tensor | None,
    num_keys: int,
    num_kv_heads: int,
    num_q_heads: int,
    *,
    needs_grad: bool = False,
    block_q: int | None = None,
    threshold: float | None = None,
    tiles: BlockTiles | None = None,
) -> tuple[str, BlockPlan | None]:
    """``(path, plan)``: :func:`choose_path`'s answer and, for ``"block"``, the plan (built once;
    the statistic's pass is reused when it covered every block). ``indices``/``mask`` 3-D or 4-D."""
    if indices.dim() == 3:
        indices = indices.unsqueeze(1)
        mask = None if mask is None else mask.unsqueeze(1)
    if _structural_path(indices, num_kv_heads, num_q_heads, tiles, needs_grad) is not None:
        return "per-query", None
    block_q = block_q or block_q_for(num_q_heads, num_kv_heads)
    expansion, marked = sampled_expansion(indices, mask, num_keys, block_q)
    if expansion > _threshold(threshold, needs_grad):
        return "per-query", None
    return "block", build_block_plan(indices, mask, num_keys, block_q, _marked=marked)


def _sampled_rows(
    indices: torch.Tensor, mask: torch.Tensor | None, block_q: int, stride: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The query rows of blocks ``0, stride, 2 stride, ...`` (full blocks only)."""
    batch, num_lists, seq_len, num_slots = indices.shape
    full = seq_len // block_q

    def pick(t: torch.Tensor) -> torch.Tensor:
        blocks = t[:, :, : full * block_q].unflatten(2, (full, block_q))[:, :, ::stride]
        return blocks.reshape(batch, num_lists, -1, num_slots)

    return pick(indices), None if mask is None else pick(mask)


def choose_path(
    indices: torch.Tensor,
    mask: torch.Tensor | None,
    num_kv_heads: int,
    num_q_heads: int,
    num_keys: int,
    *,
    needs_grad: bool = False,
    block_q: int | None = None,
    threshold: float | None = None,
    tiles: BlockTiles | None = None,
) -> str:
    """``"block"`` or ``"per-query"``: which Triton path computes this call.

    The rule: lists shared by a KV group or all heads (``Hi`` in ``{1, Hkv}``; never per-head
    lists with ``G > 1``), block tiles that fit the device's shared memory (``tiles``: head
    dims, element size, limit; :func:`block_smem_bytes` of the forward, and of the backward
    with ``needs_grad``: e.g. not 128 rows at ``D = 256``), and a small *expansion* ``e = sum_b U_b * BQ / sum_b valid_b``, where
    ``U_b`` is the size of block ``b``'s key union and ``valid_b`` its number of valid slots:
    ``e`` is how many keys each query row of the block path visits per key it selected.
    Block when ``e <= 1.25`` for a forward only (``needs_grad=False``) and ``e <= 4`` when a
    backward follows (``threshold`` overrides both).

    Why: the per-query path reads each selected K/V row per query (gather-bound, about ``G``
    FLOPs per byte); the block path reads each union row once per block and does ``BQ * G``
    rows of tensor-core work on it, plus its plan (two integer passes over all slots). Its cost
    grows with ``e``. Measured on an H100 (Hq 16, Hkv 2, D 128, bf16, plan included): at T 8K,
    K 1K the forward breaks even near ``e = 1.1`` (block 1.27 ms at e 1.03, 1.98 ms at e 1.73;
    per-query 1.3-1.4 ms), forward + backward near ``e = 6`` (block 3.1 ms at e 1.03, 5.7 ms at
    e 3.28; per-query 9-11 ms, its backward scatters per slot). Windows, sinks and hot keys
    shared by neighbouring queries give ``e`` near 1; uniform random keys give ``e`` near
    ``BQ``. The statistic is measured on about :data:`SAMPLED_BLOCKS` evenly spaced blocks (one
    integer pass over their slots, two host syncs: 0.4 ms at T 32K, K 2K).
    """
    if indices.dim() == 3:
        indices = indices.unsqueeze(1)
        mask = None if mask is None else mask.unsqueeze(1)
    structural = _structural_path(indices, num_kv_heads, num_q_heads, tiles, needs_grad)
    if structural is not None:
        return structural
    block_q = block_q or block_q_for(num_q_heads, num_kv_heads)
    expansion, _ = sampled_expansion(indices, mask, num_keys, block_q)
    return "block" if expansion <= _threshold(threshold, needs_grad) else "per-query"
