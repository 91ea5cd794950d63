"""Benchmark cases for ``hdgsa-kernels bench``: sparse attention over causal random indices.

Shapes from ANCHORS ("Sparse attention over selected indices", bf16): B1 T8192 Hq16 D128 k512
with a list per query head (Hkv = 16), and with a list per KV head shared by its GQA group
(Hkv = 2, groups of 8). Each in ``fwd`` and ``fwd+bwd``. Providers:

- ``hdgsa``: :func:`sparse_attention` (``backend="auto"``, ``validate=False``: no host sync);
- ``torch``: the eager chunked gather (:func:`reference.sparse_attention_torch`);
- ``torch.compile``: the same loop with each chunk's math compiled;
- ``sdpa``: dense causal ``scaled_dot_product_attention`` at the same T (and GQA), the peer
  sparse attention has to beat.

Indices are drawn causally: for query ``t``, ``min(t + 1, k)`` distinct random keys ``<= t`` in
random order, the rest of the row padded with ``-1``.

Minimum bytes (``fwd``): the gathered K and V rows (``B * T * L * k * (D + Dv) * 2``, ``L``
being the index lists per position: ``Hq`` per head, ``Hkv`` when a GQA group shares one list
and reads each row once), plus the indices, ``q`` and ``out``. ``fwd+bwd`` adds one more read of
the gathered rows, of the indices, ``q``, ``out`` and ``dout``, and one write of ``dq``, ``dk``,
``dv``. FLOPs: ``2 * B * T * Hq * k * (D + Dv)`` forward (``4 * B * T * Hq * k * D`` at
``Dv = D``); forward+backward counts 3.5x that (FlashAttention's convention: the backward is
2.5 forwards, the score recomputation included).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from hdgsa_core.registry import BenchCase, ProviderUnavailable

__all__ = ["bench_cases", "causal_random_indices"]

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


SHAPES = (
    _Shape("B1 T8192 H16 D128 k512 per-head", 1, 8192, 16, 16, 16, 128, 128, 512),
    _Shape("B1 T8192 Hq16 Hkv2 D128 k512 shared per GQA group", 1, 8192, 16, 2, 2, 128, 128, 512),
)


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


def _inputs(shape: _Shape, requires_grad: bool, device: torch.device):
    generator = torch.Generator(device=device).manual_seed(0)

    def randn(*size: int) -> torch.Tensor:
        tensor = torch.randn(*size, generator=generator, device=device, dtype=shape.dtype)
        return tensor.requires_grad_(requires_grad)

    q = randn(shape.batch, shape.seq_len, shape.q_heads, shape.head_dim)
    k = randn(shape.batch, shape.seq_len, shape.kv_heads, shape.head_dim)
    v = randn(shape.batch, shape.seq_len, shape.kv_heads, shape.value_dim)
    indices = causal_random_indices(shape.batch, shape.index_heads, shape.seq_len, shape.topk, device=device)
    return q, k, v, indices


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


def bench_cases(ops_filter: Iterable[str] | None = None) -> list[BenchCase]:
    """The CUDA benchmark cases (nothing is allocated until a provider's setup runs)."""
    if ops_filter is not None and not _OP_NAMES.intersection(ops_filter):
        return []
    cuda = torch.device("cuda")
    cases = []
    for shape in SHAPES:
        for mode, backward in (("fwd", False), ("fwd+bwd", True)):
            providers: dict[str, Callable[[], Callable[[], object]]] = {
                "hdgsa": lambda s=shape, b=backward: _hdgsa(s, b, cuda),
                "torch": lambda s=shape, b=backward: _torch_eager(s, b, cuda),
                "torch.compile": lambda s=shape, b=backward: _torch_compile(s, b, cuda),
                "sdpa": lambda s=shape, b=backward: _sdpa(s, b, cuda),
            }
            num_bytes, flops = _cost(shape, backward)
            cases.append(
                BenchCase(
                    op=OP,
                    name=f"{shape.label} {mode}",
                    providers=providers,
                    bytes=num_bytes,
                    flops=flops,
                    tags=(mode, "per-head" if shape.index_heads == shape.q_heads else "shared-gqa"),
                )
            )
    return cases
