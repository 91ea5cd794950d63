"""Benchmark cases for ``hdgsa-kernels bench``: the gated indexer, scores and top-k.

Shapes from ANCHORS ("Gated indexer", bf16 inputs, causal): B1 T8192 H4 d64 and B2 T4096 H8
d64, ``scale = d ** -0.5``. Cases:

- ``gated_indexer`` ``fwd`` and ``fwd+bwd`` (gradients of ``q``, ``k``, ``w``, ``bias`` by
  ``torch.autograd.grad``, so nothing accumulates in ``.grad``), providers:
  ``hdgsa`` (:func:`gated_indexer`, ``backend="auto"``), ``torch`` (the eager reference,
  :func:`reference.gated_indexer_reference`), ``torch.compile`` (the same, compiled).
- ``indexer_topk`` with ``topk = 512``, providers: ``hdgsa`` (:func:`indexer_topk`, auto),
  ``torch`` (eager reference scores + ``torch.topk``, which builds ``[B, T, T]``),
  ``torch.compile`` (the same, compiled: the ANCHORS peer), ``torch-chunked``
  (:func:`indexer_topk` with ``backend="torch"``: the chunked PyTorch path, which
  ``hdgsa`` is until the Triton kernel lands).

Minimum bytes: scores ``fwd`` writes the ``[B, T, T]`` float32 matrix and reads the inputs;
``fwd+bwd`` also reads the score gradient where it is not masked (``B * T * (T + 1) / 2``
floats), reads the inputs again and writes their gradients. ``indexer_topk`` reads the inputs
and writes ``[B, T, topk]`` int32 indices and float32 scores. FLOPs: ``2 * H * d`` per
unmasked (query, key) pair forward; ``fwd+bwd`` counts 3x (the ``dq`` and ``dk`` products).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from hdgsa_core.registry import BenchCase

from .api import gated_indexer, indexer_topk
from .reference import gated_indexer_reference

__all__ = ["SHAPES", "bench_cases"]

_SCORES_OP = "gated_indexer"
_TOPK_OP = "indexer_topk"
_OP_NAMES = {_SCORES_OP, _TOPK_OP, "indexer", "hdgsa_indexer", "hdgsa-indexer"}


@dataclass(frozen=True)
class _Shape:
    label: str
    batch: int
    seq_len: int
    heads: int
    head_dim: int
    topk: int = 512
    dtype: torch.dtype = torch.bfloat16

    @property
    def scale(self) -> float:
        return self.head_dim**-0.5

    @property
    def unmasked_pairs(self) -> int:
        return self.batch * self.seq_len * (self.seq_len + 1) // 2

    @property
    def input_bytes(self) -> int:
        size = self.dtype.itemsize
        b, t, h, d = self.batch, self.seq_len, self.heads, self.head_dim
        return (b * t * h * d + b * t * d + b * t * h + h) * size


SHAPES = (
    _Shape("B1 T8192 H4 d64 bf16 causal", 1, 8192, 4, 64),
    _Shape("B2 T4096 H8 d64 bf16 causal", 2, 4096, 8, 64),
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
    shape: _Shape, backward: bool, scores_fn: Callable[..., torch.Tensor]
) -> Callable[[], object]:
    inputs = _inputs(shape, backward)
    if not backward:
        return lambda: scores_fn(*inputs, shape.scale, True)
    grad_out = torch.randn(shape.batch, shape.seq_len, shape.seq_len, device="cuda")

    def forward_backward() -> object:
        scores = scores_fn(*inputs, shape.scale, True)
        return torch.autograd.grad(scores, inputs, grad_out)

    return forward_backward


def _hdgsa_scores(shape: _Shape, backward: bool) -> Callable[[], object]:
    return _scores_provider(shape, backward, gated_indexer)


def _eager_scores(shape: _Shape, backward: bool) -> Callable[[], object]:
    return _scores_provider(shape, backward, gated_indexer_reference)


def _compiled_scores(shape: _Shape, backward: bool) -> Callable[[], object]:
    return _scores_provider(shape, backward, torch.compile(gated_indexer_reference))


def _hdgsa_topk(shape: _Shape, backend: str = "auto") -> Callable[[], object]:
    inputs = _inputs(shape, False)
    return lambda: indexer_topk(*inputs, shape.topk, shape.scale, True, backend=backend)


def _dense_topk(q, k, w, bias, topk: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The peer: the whole ``[B, T, T]`` score matrix, then ``torch.topk``."""
    return torch.topk(gated_indexer_reference(q, k, w, bias, scale, True), topk, dim=-1)


def _eager_topk(shape: _Shape) -> Callable[[], object]:
    inputs = _inputs(shape, False)
    return lambda: _dense_topk(*inputs, shape.topk, shape.scale)


def _compiled_topk(shape: _Shape) -> Callable[[], object]:
    inputs = _inputs(shape, False)
    compiled = torch.compile(_dense_topk)
    return lambda: compiled(*inputs, shape.topk, shape.scale)


def _scores_cost(shape: _Shape, backward: bool) -> tuple[float, float]:
    matrix_bytes = 4 * shape.batch * shape.seq_len * shape.seq_len
    flops = 2.0 * shape.unmasked_pairs * shape.heads * shape.head_dim
    forward = matrix_bytes + shape.input_bytes
    if not backward:
        return float(forward), flops
    return float(forward + 4 * shape.unmasked_pairs + 2 * shape.input_bytes), 3 * flops


def _topk_cost(shape: _Shape) -> tuple[float, float]:
    output_bytes = (4 + 4) * shape.batch * shape.seq_len * shape.topk
    flops = 2.0 * shape.unmasked_pairs * shape.heads * shape.head_dim
    return float(shape.input_bytes + output_bytes), flops


def bench_cases(
    ops_filter: Iterable[str] | None = None, shapes: Iterable[_Shape] = SHAPES
) -> list[BenchCase]:
    """The CUDA benchmark cases (nothing is allocated until a provider's setup runs).

    ``ops_filter``: names to keep; ``"gated_indexer"`` or ``"indexer_topk"`` select one op,
    ``"indexer"`` both; None keeps everything. ``shapes``: the ANCHORS shapes by default
    (tests pass small ones).
    """
    wanted = set(ops_filter) if ops_filter is not None else _OP_NAMES
    both = bool(wanted & (_OP_NAMES - {_SCORES_OP, _TOPK_OP}))
    cases = []
    for shape in shapes:
        if both or _SCORES_OP in wanted:
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
        if both or _TOPK_OP in wanted:
            num_bytes, flops = _topk_cost(shape)
            cases.append(
                BenchCase(
                    op=_TOPK_OP,
                    name=f"{shape.label} k{shape.topk} fwd",
                    providers={
                        "hdgsa": lambda s=shape: _hdgsa_topk(s),
                        "torch": lambda s=shape: _eager_topk(s),
                        "torch.compile": lambda s=shape: _compiled_topk(s),
                        "torch-chunked": lambda s=shape: _hdgsa_topk(s, backend="torch"),
                    },
                    bytes=num_bytes,
                    flops=flops,
                    tags=("fwd", "topk"),
                )
            )
    return cases
