"""Benchmark cases for ``hdgsa-kernels bench``: sparse attention against dense causal SDPA.

Index sets (``[B, Hi, T, k]`` int32, causal):

- ``random``: for query ``t``, ``min(t + 1, k)`` distinct uniform random keys ``<= t``, the
  rest ``-1`` (the worst case: no structure to reuse);
- ``realistic``: 16 sinks (keys 0..15), a local window of the ``k / 4`` latest keys, and the
  rest drawn from a pool of hot keys (one and a half times as many as each query picks, a few
  hundred at k = 512) shared by each block of 64 neighbouring queries;
- ``indexer``: what ``hdgsa_indexer.indexer_topk`` selects (16 sinks, 4 indexer heads, d 64)
  when keys drift slowly (a normalized random walk) and each query resembles its own key:
  the selections of a real model's indexer on inputs with local structure (needs
  hdgsa-indexer; the case is skipped without it).

Sharing modes: ``per-head`` (Hq = Hkv = 16, a list per head), ``per-KV-group`` (Hq 16, Hkv 2,
a list per KV head shared by its 8 query heads) and ``all-heads`` (Hq 16, Hkv 2, one list).

Cases: the headline shape B1 T8192 D128 k512 for every sharing mode and index set, forward and
forward+backward (the latter also in deterministic mode); the model's shape B1 T4096 H16 D256
k1024; the long-context shape B1 T32768 Hq16 Hkv2 D128 k2048 with ``indexer`` lists; a T sweep
for k in {512, 1024, 2048}: random and realistic lists shared per KV group or by all heads from
4K to 64K, random per-head lists to 32K (their backward to 16K, to keep the bench's memory and
time affordable); its T8192 k512 rows are the headline cases. Dense SDPA depends only on T and
the heads, so in the sweep it is timed once per length and head layout: in the per-head rows
and the per-KV-group random rows (the all-heads and realistic rows at the same T compare
against those). Where lists are shared, the Triton
backend picks the per-query or the query-block path per call (``sparse_attention_path``), and the
``hdgsa`` rows time what it picks, the choice and the block path's plan included: the crossover
against ``sdpa`` is read off the sweep.
Providers:

- ``hdgsa``: :func:`sparse_attention` (``backend="auto"``, ``validate=False``: no host sync);
- ``hdgsa-deterministic``: the same under ``torch.use_deterministic_algorithms(True)``
  (forward+backward cases);
- ``torch``: the eager chunked gather (:func:`reference.sparse_attention_torch`) and
  ``torch.compile``: the same loop with each chunk's math compiled (headline per-head case only:
  they take seconds);
- ``sdpa``: dense causal ``scaled_dot_product_attention`` at the same T, Hq and Hkv, the peer
  sparse attention has to beat.

Minimum bytes (``fwd``): the gathered K and V rows (``B * T * L * k * (D + Dv) * 2``, ``L``
being the index lists per position: ``Hq`` per head, ``Hkv`` when a GQA group shares one list
and reads each row once), plus the indices, ``q`` and ``out``. ``fwd+bwd`` adds one more read of
the gathered rows, of the indices, ``q``, ``out`` and ``dout``, and one write of ``dq``, ``dk``,
``dv``. FLOPs: ``2 * B * T * Hq * k * (D + Dv)`` forward (``4 * B * T * Hq * k * D`` at
``Dv = D``); forward+backward counts 3.5x that (FlashAttention's convention: the backward is
2.5 forwards, the score recomputation included).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from hdgsa_core.registry import BenchCase, ProviderUnavailable

__all__ = ["bench_cases", "causal_random_indices", "indexer_indices", "realistic_indices"]

OP = "sparse_attention"
_OP_NAMES = {OP, "sparse-attn", "sparse_attn", "sparse", "hdgsa_sparse_attn"}


@dataclass(frozen=True)
class _Shape:
    label: str
    batch: int
    seq_len: int
    q_heads: int
    kv_heads: int
    index_heads: int
    head_dim: int
    value_dim: int
    topk: int
    dtype: torch.dtype = torch.bfloat16
    index_set: str = "random"


_SHARING = {"per-head": (16, 16, 16), "per-KV-group": (16, 2, 2), "all-heads": (16, 2, 1)}


def _shape(sharing: str, seq_len: int, topk: int, index_set: str, head_dim: int = 128) -> _Shape:
    hq, hkv, hi = _SHARING[sharing]
    label = f"B1 T{seq_len} Hq{hq} Hkv{hkv} D{head_dim} k{topk} {sharing} {index_set}"
    return _Shape(label, 1, seq_len, hq, hkv, hi, head_dim, head_dim, topk, index_set=index_set)


HEADLINE = tuple(
    _shape(sharing, 8192, 512, index_set) for index_set in ("random", "realistic") for sharing in _SHARING
)
MODEL = (_shape("per-head", 4096, 1024, "random", head_dim=256),)
LONG = tuple(_shape(sharing, 32768, 2048, "indexer") for sharing in ("per-KV-group", "all-heads"))
SWEEP_LENGTHS = (4096, 8192, 16384, 32768, 65536)
SWEEP_TOPK = (512, 1024, 2048)
# Per-head lists hold Hq lists per position: past these lengths their indices and the
# backward's inverse index (tens of GB at 64K, k = 2048) do not fit the bench's budget.
PER_HEAD_MAX_T = {"fwd": 32768, "fwd+bwd": 16384}
# The shared-list sweep rows that also time dense SDPA (the others have the same T and heads).
SDPA_SWEEP_ROWS = ("per-KV-group", "random")
SWEEP_INDEX_SETS = {
    "per-head": ("random",),
    "per-KV-group": ("random", "realistic"),
    "all-heads": ("random", "realistic"),
}


def causal_random_indices(
    batch: int,
    index_heads: int,
    seq_len: int,
    topk: int,
    *,
    device: torch.device | str = "cuda",
    seed: int = 0,
    rows_per_step: int = 256,
) -> torch.Tensor:
    """``[B, Hi, T, k]`` int32: per row ``t``, ``min(t + 1, k)`` distinct random keys ``<= t``
    (in random order), then ``-1``. Built ``rows_per_step`` queries at a time (``[.., rows, T]``
    random scores, top-k) so the memory stays ``O(rows * T)``."""
    generator = torch.Generator(device=device).manual_seed(seed)
    keys = torch.arange(seq_len, device=device)
    rows = []
    for start in range(0, seq_len, rows_per_step):
        stop = min(start + rows_per_step, seq_len)
        scores = torch.rand(batch, index_heads, stop - start, seq_len, generator=generator, device=device)
        future = keys[None, :] > torch.arange(start, stop, device=device)[:, None]
        scores = scores.masked_fill(future, -1.0)  # never chosen before a past key
        values, chosen = scores.topk(min(topk, seq_len), dim=-1)
        chosen = torch.where(values >= 0, chosen, -1)
        if topk > seq_len:
            chosen = torch.nn.functional.pad(chosen, (0, topk - seq_len), value=-1)
        rows.append(chosen.to(torch.int32))
    return torch.cat(rows, dim=2)


def realistic_indices(
    batch: int,
    index_heads: int,
    seq_len: int,
    topk: int,
    *,
    device: torch.device | str = "cuda",
    seed: int = 0,
    sinks: int = 16,
    block: int = 64,
) -> torch.Tensor:
    """``[B, Hi, T, k]`` int32 with the structure of real selections: per query ``t >= k``,
    the ``sinks`` first keys, a window of the ``k // 4`` latest keys ``<= t``, and
    ``k - k // 4 - sinks`` distinct keys drawn from a pool of hot keys (1.5x as many, all
    older than the window) shared by the block of ``block`` neighbouring queries. Queries
    ``t < k`` list every key ``<= t`` and pad with ``-1``. All keys of a row are distinct."""
    generator = torch.Generator(device=device).manual_seed(seed)
    window = topk // 4
    hot = topk - window - sinks
    if hot <= 0:
        return causal_random_indices(batch, index_heads, seq_len, topk, device=device, seed=seed)
    out = torch.empty(batch, index_heads, seq_len, topk, dtype=torch.int32, device=device)
    keys = torch.arange(topk, device=device)
    early = min(seq_len, topk)
    rows = torch.arange(early, device=device)[:, None]
    out[:, :, :early] = torch.where(keys[None, :] <= rows, keys[None, :], -1).to(torch.int32)
    sink_keys = torch.arange(sinks, device=device, dtype=torch.int32)
    for start in range(topk, seq_len, block):
        stop = min(start + block, seq_len)
        t = torch.arange(start, stop, device=device, dtype=torch.int32)
        local = t[:, None] - window + 1 + torch.arange(window, device=device, dtype=torch.int32)[None, :]
        available = start - window - sinks + 1  # keys sinks .. start - window: older than every window
        pool_size = min(available, hot + hot // 2)
        pool_scores = torch.rand(batch, index_heads, available, generator=generator, device=device)
        pool = pool_scores.topk(pool_size, dim=-1).indices + sinks  # [B, Hi, P]
        picks = torch.rand(batch, index_heads, stop - start, pool_size, generator=generator, device=device)
        chosen = (
            pool[:, :, None, :].expand(-1, -1, stop - start, -1).gather(-1, picks.topk(hot, dim=-1).indices)
        )
        out[:, :, start:stop] = torch.cat(
            [
                sink_keys.expand(batch, index_heads, stop - start, sinks),
                local.expand(batch, index_heads, stop - start, window),
                chosen.to(torch.int32),
            ],
            dim=-1,
        )
    return out


def indexer_indices(
    batch: int,
    index_heads: int,
    seq_len: int,
    topk: int,
    *,
    device: torch.device | str = "cuda",
    seed: int = 0,
    sinks: int = 16,
    heads: int = 4,
    dim: int = 64,
) -> torch.Tensor:
    """``[B, Hi, T, k]`` int32: ``hdgsa_indexer.indexer_topk``'s causal selection (``sinks``
    sinks) for inputs with local structure, one independent draw per list: keys are a
    normalized random walk (neighbouring keys alike), each query head is its position's key
    plus noise, so nearby keys score high and older ones by their drift."""
    try:
        from hdgsa_indexer import indexer_topk
    except ImportError as error:
        raise ProviderUnavailable("the indexer index set needs hdgsa-indexer") from error
    generator = torch.Generator(device=device).manual_seed(seed)

    def randn(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=generator, device=device)

    lists = []
    for _ in range(index_heads):
        walk = (randn(batch, seq_len, dim) * 0.05).cumsum(1) + randn(batch, 1, dim)
        keys = torch.nn.functional.normalize(walk, dim=-1) * dim**0.5
        queries = keys[:, :, None, :] + randn(batch, seq_len, heads, dim)
        gates, bias = randn(batch, seq_len, heads), torch.zeros(heads, device=device)
        chosen, _ = indexer_topk(
            queries.bfloat16(), keys.bfloat16(), gates, bias, topk, dim**-0.5, True, sink_size=sinks
        )
        lists.append(chosen)
    return torch.stack(lists, dim=1)


_INDEX_SETS = {"random": causal_random_indices, "realistic": realistic_indices, "indexer": indexer_indices}


@functools.lru_cache(maxsize=1)
def _cached_indices(shape: _Shape, device: torch.device) -> torch.Tensor:
    """The index set of ``shape``, kept while the providers of one case run (one at a time)."""
    make = _INDEX_SETS[shape.index_set]
    return make(shape.batch, shape.index_heads, shape.seq_len, shape.topk, device=device)


def _inputs(shape: _Shape, requires_grad: bool, device: torch.device):
    generator = torch.Generator(device=device).manual_seed(0)

    def randn(*size: int) -> torch.Tensor:
        tensor = torch.randn(*size, generator=generator, device=device, dtype=shape.dtype)
        return tensor.requires_grad_(requires_grad)

    q = randn(shape.batch, shape.seq_len, shape.q_heads, shape.head_dim)
    k = randn(shape.batch, shape.seq_len, shape.kv_heads, shape.head_dim)
    v = randn(shape.batch, shape.seq_len, shape.kv_heads, shape.value_dim)
    return q, k, v, _cached_indices(shape, device)


def _timed(
    shape: _Shape, backward: bool, device: torch.device, attend: Callable[..., torch.Tensor]
) -> Callable[[], object]:
    """Inputs on ``device`` and the callable to time: ``attend(q, k, v, indices)``, and with
    ``backward`` its gradients (``torch.autograd.grad``: nothing accumulates in ``.grad``)."""
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ProviderUnavailable("needs a CUDA GPU")
    q, k, v, indices = _inputs(shape, backward, device)
    if not backward:
        return lambda: attend(q, k, v, indices)
    grad_out = torch.randn(
        *q.shape[:3],
        v.shape[-1],
        device=q.device,
        dtype=q.dtype,
        generator=torch.Generator(device=q.device).manual_seed(1),
    )

    def forward_backward() -> object:
        out = attend(q, k, v, indices)
        return torch.autograd.grad(out, (q, k, v), grad_out)

    return forward_backward


def _hdgsa(shape: _Shape, backward: bool, device: torch.device) -> Callable[[], object]:
    from .api import sparse_attention

    return _timed(shape, backward, device, lambda q, k, v, i: sparse_attention(q, k, v, i, validate=False))


@contextlib.contextmanager
def _deterministic_algorithms() -> Iterable[None]:
    was_enabled = torch.are_deterministic_algorithms_enabled()
    was_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was_enabled, warn_only=was_warn_only)


def _hdgsa_deterministic(shape: _Shape, backward: bool, device: torch.device) -> Callable[[], object]:
    fn = _hdgsa(shape, backward, device)

    def deterministic() -> object:
        with _deterministic_algorithms():
            return fn()

    return deterministic


def _torch_eager(shape: _Shape, backward: bool, device: torch.device) -> Callable[[], object]:
    from .reference import sparse_attention_torch

    return _timed(shape, backward, device, lambda q, k, v, i: sparse_attention_torch(q, k, v, i)[0])


def _torch_compile(shape: _Shape, backward: bool, device: torch.device) -> Callable[[], object]:
    # Compiling the whole chunk loop would unroll a few hundred chunks into one graph; each
    # chunk's math is compiled instead (two graphs: full chunks and the last, shorter one).
    from .reference import attend_chunk, sparse_attention_torch

    compiled_chunk = torch.compile(attend_chunk, dynamic=False)
    fn = _timed(
        shape,
        backward,
        device,
        lambda q, k, v, i: sparse_attention_torch(q, k, v, i, chunk_fn=compiled_chunk)[0],
    )
    try:
        fn()  # compile now, so that a failure reads as "unavailable", not as a crash
        if device.type == "cuda":
            torch.cuda.synchronize()
    except Exception as error:
        raise ProviderUnavailable(
            f"torch.compile of the reference failed: {type(error).__name__}: {error}"[:200]
        ) from error
    return fn


def _sdpa(shape: _Shape, backward: bool, device: torch.device) -> Callable[[], object]:
    import torch.nn.functional as F

    # Only GQA needs the keyword (torch >= 2.5); MHA calls work on any version.
    options = {"enable_gqa": True} if shape.q_heads != shape.kv_heads else {}

    def dense_causal(q, k, v, _indices):
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, T, D] views
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, **options).transpose(1, 2)

    fn = _timed(shape, backward, device, dense_causal)
    try:
        fn()
    except TypeError as error:  # torch < 2.5: no enable_gqa
        raise ProviderUnavailable(f"scaled_dot_product_attention: {error}") from error
    return fn


def _cost(shape: _Shape, backward: bool) -> tuple[float, float]:
    """(minimum bytes, FLOPs) of one call; see the module docstring."""
    s = shape
    size = torch.finfo(s.dtype).bits // 8
    # Rows read per slot: one per query head with per-head lists, else one per KV head.
    rows = s.q_heads if s.index_heads == s.q_heads else s.kv_heads
    gathered = s.batch * s.seq_len * rows * s.topk * (s.head_dim + s.value_dim) * size
    index_bytes = s.batch * s.index_heads * s.seq_len * s.topk * 4
    q_bytes = s.batch * s.seq_len * s.q_heads * s.head_dim * size
    out_bytes = s.batch * s.seq_len * s.q_heads * s.value_dim * size
    kv_bytes = s.batch * s.seq_len * s.kv_heads * (s.head_dim + s.value_dim) * size
    flops = 2.0 * s.batch * s.seq_len * s.q_heads * s.topk * (s.head_dim + s.value_dim)
    forward = gathered + index_bytes + q_bytes + out_bytes
    if not backward:
        return float(forward), flops
    backward_bytes = gathered + index_bytes + q_bytes + 2 * out_bytes + q_bytes + kv_bytes
    return float(forward + backward_bytes), 3.5 * flops


def _case(shape: _Shape, backward: bool, providers: tuple[str, ...], tags: tuple[str, ...]) -> BenchCase:
    cuda = torch.device("cuda")
    makers = {
        "hdgsa": _hdgsa,
        "hdgsa-deterministic": _hdgsa_deterministic,
        "torch": _torch_eager,
        "torch.compile": _torch_compile,
        "sdpa": _sdpa,
    }
    mode = "fwd+bwd" if backward else "fwd"
    num_bytes, flops = _cost(shape, backward)
    return BenchCase(
        op=OP,
        name=f"{shape.label} {mode}",
        providers={name: functools.partial(makers[name], shape, backward, cuda) for name in providers},
        bytes=num_bytes,
        flops=flops,
        tags=(mode, *tags),
    )


def bench_cases(ops_filter: Iterable[str] | None = None) -> list[BenchCase]:
    """The CUDA benchmark cases (nothing is allocated until a provider's setup runs)."""
    if ops_filter is not None and not _OP_NAMES.intersection(ops_filter):
        return []
    cases = []
    for shape in HEADLINE + MODEL + LONG:
        sharing = shape.label.split()[-2]
        peers = ("torch", "torch.compile") if shape == HEADLINE[0] else ()
        cases.append(_case(shape, False, ("hdgsa", *peers, "sdpa"), (sharing, shape.index_set)))
        backward_providers = ("hdgsa", "hdgsa-deterministic", *peers, "sdpa")
        cases.append(_case(shape, True, backward_providers, (sharing, shape.index_set)))
    for sharing, index_sets in SWEEP_INDEX_SETS.items():
        for index_set in index_sets:
            for topk in SWEEP_TOPK:
                for seq_len in SWEEP_LENGTHS:
                    shape = _shape(sharing, seq_len, topk, index_set)
                    if shape in HEADLINE:  # timed above, with more providers
                        continue
                    for backward in (False, True):
                        mode = "fwd+bwd" if backward else "fwd"
                        if sharing == "per-head" and seq_len > PER_HEAD_MAX_T[mode]:
                            continue
                        tags = (sharing, index_set, "sweep")
                        # SDPA depends only on T and the heads: once per length and head layout
                        times_sdpa = sharing == "per-head" or (sharing, index_set) == SDPA_SWEEP_ROWS
                        providers = ("hdgsa", "sdpa") if times_sdpa else ("hdgsa",)
                        cases.append(_case(shape, backward, providers, tags))
    return cases
