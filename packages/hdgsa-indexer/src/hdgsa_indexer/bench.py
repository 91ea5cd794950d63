"""Benchmark cases for ``hdgsa-kernels bench``: the gated indexer's scores, top-k and scores at keys.

All bf16 inputs, causal, ``scale = d ** -0.5``. Cases:

- ``gated_indexer`` ``fwd`` and ``fwd+bwd`` (gradients of ``q``, ``k``, ``w``, ``bias`` by
  ``torch.autograd.grad``, so nothing accumulates in ``.grad``) at B1 T8192 H4 d64,
  B1 T16384 H4 d128 and B2 T4096 H8 d64; providers ``hdgsa`` (:func:`gated_indexer`,
  ``backend="auto"``), ``torch`` (the eager reference, :func:`reference.gated_indexer_reference`),
  ``torch.compile`` (the same, compiled).
- ``indexer_topk`` with ``topk = 512`` at B1 T8192 H4 d64 and B2 T4096 H8 d64, and a sweep
  over T = 4K .. 128K (B1 H4 d64) with ``topk`` in {512, 2048}; providers ``hdgsa``
  (:func:`indexer_topk`, auto: the fused kernel), ``hdgsa-split`` (the fused kernel's opt-in
  split path, to choose the default from), ``torch`` (eager reference scores +
  ``torch.topk``, which builds ``[B, T, T]``), ``torch.compile`` (the same, compiled),
  ``torch-chunked`` (:func:`indexer_topk` with ``backend="torch"``, query chunks in a 256 MiB
  workspace). A peer whose ``[B, T, T]`` float32 scores would not fit the free GPU memory is
  skipped as "out of memory" (the runner lists it) rather than allocated; the chunked PyTorch
  path is skipped past T = 32K (seconds per call).
- ``indexer_scores_at`` ``fwd+bwd`` at B1 T131072 H4 d64 K2048 (random causal keys); providers
  ``hdgsa`` and ``torch`` (the chunked PyTorch backend, whose autograd keeps the gathered keys:
  ``B * T * K * d`` floats, skipped where that does not fit).

Minimum bytes: scores ``fwd`` writes the ``[B, T, T]`` float32 matrix and reads the inputs;
``fwd+bwd`` also reads the score gradient where it is not masked (``B * T * (T + 1) / 2``
floats), reads the inputs again and writes their gradients. ``indexer_topk`` reads the inputs
and writes ``[B, T, topk]`` int32 indices and float32 scores. ``indexer_scores_at`` reads the
inputs, the indices and the output gradient, writes the scores and the input gradients. FLOPs:
``2 * H * d`` per unmasked (query, key) pair forward (per slot for ``indexer_scores_at``);
``fwd+bwd`` counts 3x (the ``dq`` and ``dk`` products).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from hdgsa_core.registry import BenchCase, ProviderUnavailable

from .api import gated_indexer, indexer_scores_at, indexer_topk
from .reference import gated_indexer_reference

__all__ = ["SCORES_AT_SHAPES", "SHAPES", "SWEEP_SHAPES", "bench_cases"]

_SCORES_OP = "gated_indexer"
_TOPK_OP = "indexer_topk"
_AT_OP = "indexer_scores_at"
_OPS = (_SCORES_OP, _TOPK_OP, _AT_OP)
_GROUP_NAMES = {"indexer", "hdgsa_indexer", "hdgsa-indexer"}
# The chunked PyTorch top-k takes seconds per call past this length: not worth timing.
_CHUNKED_MAX_T = 32768


@dataclass(frozen=True)
class _Shape:
    label: str
    batch: int
    seq_len: int
    heads: int
    head_dim: int
    topk: int = 512
    dtype: torch.dtype = torch.bfloat16
    scores: bool = True  # time gated_indexer at this shape (fwd, fwd+bwd)
    selection: bool = True  # time indexer_topk at this shape

    @property
    def scale(self) -> float:
        return self.head_dim**-0.5

    @property
    def unmasked_pairs(self) -> int:
        return self.batch * self.seq_len * (self.seq_len + 1) // 2

    @property
    def matrix_bytes(self) -> int:
        return 4 * self.batch * self.seq_len * self.seq_len

    @property
    def input_bytes(self) -> int:
        size = self.dtype.itemsize
        b, t, h, d = self.batch, self.seq_len, self.heads, self.head_dim
        return (b * t * h * d + b * t * d + b * t * h + h) * size


SHAPES = (
    _Shape("B1 T8192 H4 d64 bf16 causal", 1, 8192, 4, 64),
    _Shape("B1 T16384 H4 d128 bf16 causal", 1, 16384, 4, 128, selection=False),
    _Shape("B2 T4096 H8 d64 bf16 causal", 2, 4096, 8, 64),
)
SWEEP_SHAPES = tuple(
    _Shape(f"B1 T{t} H4 d64 bf16 causal", 1, t, 4, 64, topk=k, scores=False)
    for k in (512, 2048)
    for t in (4096, 8192, 16384, 32768, 65536, 131072)
    if not (k == 512 and t == 8192)  # already in SHAPES
)
# (label, B, T, H, d, K)
SCORES_AT_SHAPES = (("B1 T131072 H4 d64 K2048 bf16", 1, 131072, 4, 64, 2048),)


def _fits(num_bytes: float, what: str) -> None:
    """Skip a provider (as out of memory) whose main buffer would not fit the free memory."""
    free, _ = torch.cuda.mem_get_info()
    if num_bytes > free:
        raise ProviderUnavailable(
            f"out of memory: {what} needs {num_bytes / 2**30:.0f} GiB, {free / 2**30:.0f} free"
        )


def _inputs(shape: _Shape, requires_grad: bool) -> list[torch.Tensor]:
    device, dtype = torch.device("cuda"), shape.dtype
    b, t, h, d = shape.batch, shape.seq_len, shape.heads, shape.head_dim
    tensors = [
        torch.randn(b, t, h, d, device=device, dtype=dtype),
        torch.randn(b, t, d, device=device, dtype=dtype),
        torch.randn(b, t, h, device=device, dtype=dtype),
        0.5 * torch.randn(h, device=device, dtype=dtype),
    ]
    return [tensor.requires_grad_(requires_grad) for tensor in tensors]


def _scores_provider(
    shape: _Shape, backward: bool, scores_fn: Callable[..., torch.Tensor], dense_copies: int
) -> Callable[[], object]:
    _fits(dense_copies * shape.matrix_bytes, f"{dense_copies} [B, T, T] float32 buffers")
    inputs = _inputs(shape, backward)
    if not backward:
        return lambda: scores_fn(*inputs, shape.scale, True)
    grad_out = torch.randn(shape.batch, shape.seq_len, shape.seq_len, device="cuda")

    def forward_backward() -> object:
        scores = scores_fn(*inputs, shape.scale, True)
        return torch.autograd.grad(scores, inputs, grad_out)

    return forward_backward


def _hdgsa_scores(shape: _Shape, backward: bool) -> Callable[[], object]:
    return _scores_provider(shape, backward, gated_indexer, 2 if backward else 1)


def _eager_scores(shape: _Shape, backward: bool) -> Callable[[], object]:
    return _scores_provider(shape, backward, gated_indexer_reference, 3 * shape.heads + 2)


def _compiled_scores(shape: _Shape, backward: bool) -> Callable[[], object]:
    return _scores_provider(shape, backward, torch.compile(gated_indexer_reference), shape.heads + 2)


def _hdgsa_topk(shape: _Shape, backend: str = "auto") -> Callable[[], object]:
    if backend == "torch" and shape.seq_len > _CHUNKED_MAX_T:
        raise ProviderUnavailable(f"the chunked PyTorch path is not timed past T = {_CHUNKED_MAX_T}")
    inputs = _inputs(shape, False)
    return lambda: indexer_topk(*inputs, shape.topk, shape.scale, True, backend=backend)


def _hdgsa_topk_split(shape: _Shape) -> Callable[[], object]:
    """The fused top-k's opt-in split path (key chunks over more programs), beside the default."""
    from ._triton_topk import indexer_topk_fwd

    q, k, w, bias = _inputs(shape, False)
    return lambda: indexer_topk_fwd(q, k, w, bias, shape.topk, shape.scale, True, 0, 0, False, split=True)


def _dense_topk(q, k, w, bias, topk: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The peer: the whole ``[B, T, T]`` score matrix, then ``torch.topk``."""
    return torch.topk(gated_indexer_reference(q, k, w, bias, scale, True), topk, dim=-1)


def _eager_topk(shape: _Shape) -> Callable[[], object]:
    _fits((shape.heads + 2) * shape.matrix_bytes, "the eager [B, T, T] scores and head logits")
    inputs = _inputs(shape, False)
    return lambda: _dense_topk(*inputs, shape.topk, shape.scale)


def _compiled_topk(shape: _Shape) -> Callable[[], object]:
    _fits(2 * shape.matrix_bytes, "the [B, T, T] float32 scores")
    inputs = _inputs(shape, False)
    compiled = torch.compile(_dense_topk)
    return lambda: compiled(*inputs, shape.topk, shape.scale)


def _scores_at_provider(batch: int, seq_len: int, heads: int, dim: int, slots: int, backend: str):
    if backend == "torch":
        # autograd keeps every chunk's gathered keys and head gates (float32)
        _fits(
            4.0 * batch * seq_len * slots * (dim + 2 * heads + 4), "the gathered keys kept for the backward"
        )
    device = torch.device("cuda")
    shape = _Shape("", batch, seq_len, heads, dim)
    inputs = _inputs(shape, True)
    # Random keys of each query's causal prefix (repeats allowed).
    positions = torch.arange(seq_len, device=device)[:, None]
    draws = torch.rand(batch, seq_len, slots, device=device)
    indices = (draws * (positions + 1)).long().clamp_(max=seq_len - 1).to(torch.int32)
    grad_out = torch.randn(batch, seq_len, slots, device=device)

    def forward_backward() -> object:
        scores = indexer_scores_at(*inputs, indices, dim**-0.5, backend=backend)
        return torch.autograd.grad(scores, inputs, grad_out)

    return forward_backward


def _scores_cost(shape: _Shape, backward: bool) -> tuple[float, float]:
    flops = 2.0 * shape.unmasked_pairs * shape.heads * shape.head_dim
    forward = shape.matrix_bytes + shape.input_bytes
    if not backward:
        return float(forward), flops
    return float(forward + 4 * shape.unmasked_pairs + 2 * shape.input_bytes), 3 * flops


def _topk_cost(shape: _Shape) -> tuple[float, float]:
    output_bytes = (4 + 4) * shape.batch * shape.seq_len * shape.topk
    flops = 2.0 * shape.unmasked_pairs * shape.heads * shape.head_dim
    return float(shape.input_bytes + output_bytes), flops


def _scores_at_cost(batch: int, seq_len: int, heads: int, dim: int, slots: int) -> tuple[float, float]:
    shape = _Shape("", batch, seq_len, heads, dim)
    slot_bytes = batch * seq_len * slots * (4 + 4 + 4)  # indices, scores, their gradient
    return float(3 * shape.input_bytes + slot_bytes), 3 * 2.0 * batch * seq_len * slots * heads * dim


def _wanted(ops_filter: Iterable[str] | None) -> set[str]:
    if ops_filter is None:
        return set(_OPS)
    names = set(ops_filter)
    return set(_OPS) if names & _GROUP_NAMES else names & set(_OPS)


def _topk_case(shape: _Shape, tags: tuple[str, ...]) -> BenchCase:
    num_bytes, flops = _topk_cost(shape)
    return BenchCase(
        op=_TOPK_OP,
        name=f"{shape.label} k{shape.topk} fwd",
        providers={
            "hdgsa": lambda s=shape: _hdgsa_topk(s),
            "hdgsa-split": lambda s=shape: _hdgsa_topk_split(s),
            "torch": lambda s=shape: _eager_topk(s),
            "torch.compile": lambda s=shape: _compiled_topk(s),
            "torch-chunked": lambda s=shape: _hdgsa_topk(s, backend="torch"),
        },
        bytes=num_bytes,
        flops=flops,
        tags=tags,
    )


def bench_cases(
    ops_filter: Iterable[str] | None = None,
    shapes: Iterable[_Shape] = SHAPES,
    sweep: Iterable[_Shape] = SWEEP_SHAPES,
    scores_at_shapes: Iterable[tuple] = SCORES_AT_SHAPES,
) -> list[BenchCase]:
    """The CUDA benchmark cases (nothing is allocated until a provider's setup runs).

    ``ops_filter``: names to keep; ``"gated_indexer"``, ``"indexer_topk"`` or
    ``"indexer_scores_at"`` select one op, ``"indexer"`` all three; None keeps everything.
    ``shapes``, ``sweep``, ``scores_at_shapes``: the default shapes (tests pass small ones).
    """
    wanted = _wanted(ops_filter)
    cases = []
    for shape in shapes:
        if _SCORES_OP in wanted and shape.scores:
            for mode, backward in (("fwd", False), ("fwd+bwd", True)):
                num_bytes, flops = _scores_cost(shape, backward)
                cases.append(
                    BenchCase(
                        op=_SCORES_OP,
                        name=f"{shape.label} {mode}",
                        providers={
                            "hdgsa": lambda s=shape, b=backward: _hdgsa_scores(s, b),
                            "torch": lambda s=shape, b=backward: _eager_scores(s, b),
                            "torch.compile": lambda s=shape, b=backward: _compiled_scores(s, b),
                        },
                        bytes=num_bytes,
                        flops=flops,
                        tags=(mode, "scores"),
                    )
                )
        if _TOPK_OP in wanted and shape.selection:
            cases.append(_topk_case(shape, ("fwd", "topk")))
    if _TOPK_OP in wanted:
        cases += [_topk_case(shape, ("fwd", "topk", "sweep")) for shape in sweep]
    if _AT_OP in wanted:
        for label, *dims in scores_at_shapes:
            num_bytes, flops = _scores_at_cost(*dims)
            cases.append(
                BenchCase(
                    op=_AT_OP,
                    name=f"{label} fwd+bwd",
                    providers={
                        "hdgsa": lambda d=tuple(dims): _scores_at_provider(*d, "auto"),
                        "torch": lambda d=tuple(dims): _scores_at_provider(*d, "torch"),
                    },
                    bytes=num_bytes,
                    flops=flops,
                    tags=("fwd+bwd", "scores_at"),
                )
            )
    return cases
