"""Benchmark cases for ``hdgsa-kernels bench``: the gated delta rule against fla called directly.

The target shapes: B4 T4096 H16 K=V=128 and B1 T16384 H16 K=V=128, bf16. Cases,
each in the unpacked ``[B, T, H, K]`` and packed ``[B, T, H*K]`` layouts, with and without ``D``:

- ``fwd``: providers ``hdgsa`` (:func:`gated_delta_rule`, ``backend="fla"``: alpha in, the
  log-decay and the D skip done by the wrapper), ``fla`` (``chunk_gated_delta_rule`` called
  directly on the same views with a precomputed ``g``, plus, with ``D``, the skip a user would
  write: ``torch.addcmul(o, D[:, None], v)``), ``fla+log`` (the same with ``g`` computed from
  alpha in the step, as a user holding alpha must), and, in the unpacked layout only, ``torch``
  (:func:`gated_delta_rule` with ``backend="torch"``: the chunked PyTorch backend on the GPU,
  for the record). The wrapper's overhead is ``hdgsa / fla - 1`` (target <= 3%).
- ``fwd+bwd``: the same providers with ``torch.autograd.grad`` of every input (nothing
  accumulates in ``.grad``). Where fla 0.6 refuses the backward (Hopper, Triton >= 3.4 and
  < 3.7.1) ``hdgsa`` and ``fla`` raise :class:`ProviderUnavailable` with fla's reason.

On the CPU (``hdgsa-kernels bench deltanet --device cpu``): B1 T1024 H4 K=V=64 float32, the
torch backend's forward (``hdgsa``) against per-step loops: this package's float32 recurrent
reference (``loop``) and, when fla-core imports, fla's ``naive_recurrent_gated_delta_rule``
(``fla-naive-recurrent``) and its chunk loop ``naive_chunk_gated_delta_rule``
(``fla-naive-chunk``); ``ours x`` on a loop's row is the speed-up (target >= 20x). And the
torch backend's forward + backward of every input, on its own.

No ``torch.compile`` provider: compiling the torch backend unrolls its loop over the ``T / 64``
chunks (64 to 256 iterations here), which takes longer than the whole run.

Minimum bytes: read ``q``, ``k``, ``v``, ``alpha``, ``beta`` and write ``o`` (``fwd``); the
backward reads them and ``do`` again and writes every gradient. FLOPs: the chunked algorithm's
matrix products, ``B * HV * T * (6 K V + 2 C (2 K + V) + C (K + V))`` with ``C = 64`` forward (an
estimate of what fla's kernels do), 3x that for ``fwd+bwd``.

What the wrapper costs shows in three columns of the runner: ``hdgsa-kernels bench deltanet
--gpu-time --host-time``: GPU time (the wrapper's own kernels against ``fla``'s ``addcmul``),
host time per call (its Python and launches against fla's), and the do_bench median (whichever
of the two bounds the step on that machine).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hdgsa_core.registry import BenchCase, ProviderUnavailable

from ._fla import fla_unavailable_reason
from .api import gated_delta_rule
from .reference import recurrent_gated_delta_rule_reference

__all__ = ["SHAPES", "bench_cases"]

_OP = "gated_delta_rule"
_OP_NAMES = {_OP, "deltanet", "deltanet-fla", "hdgsa_deltanet_fla", "hdgsa-deltanet-fla"}
_CHUNK = 64


@dataclass(frozen=True)
class _Shape:
    label: str
    batch: int
    seq_len: int
    heads: int
    head_dim: int
    dtype: torch.dtype = torch.bfloat16

    @property
    def tokens_heads(self) -> int:
        return self.batch * self.seq_len * self.heads


SHAPES = (
    _Shape("B4 T4096 H16 D128 bf16", 4, 4096, 16, 128),
    _Shape("B1 T16384 H16 D128 bf16", 1, 16384, 16, 128),
)
CPU_SHAPES = (_Shape("B1 T1024 H4 D64 fp32 CPU", 1, 1024, 4, 64, torch.float32),)


@dataclass(frozen=True)
class _Variant:
    packed: bool
    with_D: bool
    backward: bool

    @property
    def label(self) -> str:
        layout = "packed" if self.packed else "unpacked"
        skip = "D" if self.with_D else "noD"
        return f"{layout} {skip} {'fwd+bwd' if self.backward else 'fwd'}"


def _inputs(shape: _Shape, variant: _Variant) -> dict[str, torch.Tensor]:
    """Fresh random inputs on CUDA in the variant's layout (random, never zeros)."""
    if not torch.cuda.is_available():
        raise ProviderUnavailable("CUDA is not available on this machine")
    device, dtype = torch.device("cuda"), shape.dtype
    b, t, h, d = shape.batch, shape.seq_len, shape.heads, shape.head_dim
    q = torch.randn(b, t, h, d, device=device, dtype=dtype)
    k = F.normalize(torch.randn(b, t, h, d, device=device, dtype=torch.float32), dim=-1).to(dtype)
    v = torch.randn(b, t, h, d, device=device, dtype=dtype)
    alpha = torch.sigmoid(2.0 + torch.randn(b, t, h, device=device, dtype=torch.float32)).to(dtype)
    beta = torch.sigmoid(torch.randn(b, t, h, device=device, dtype=torch.float32)).to(dtype)
    inputs = {"q": q, "k": k, "v": v, "alpha": alpha, "beta": beta}
    if variant.with_D:
        inputs["D"] = torch.randn(h, device=device, dtype=torch.float32)
    if variant.packed:
        inputs.update(q=q.flatten(2), k=k.flatten(2), v=v.flatten(2))
    for tensor in inputs.values():
        tensor.requires_grad_(variant.backward)
    return inputs


def _timed(
    forward: Callable[[], torch.Tensor], inputs: dict[str, torch.Tensor], backward: bool
) -> Callable[[], object]:
    if not backward:
        return forward
    leaves = list(inputs.values())
    first = forward()
    grad_out = torch.randn_like(first)
    del first

    def forward_backward() -> object:
        return torch.autograd.grad(forward(), leaves, grad_out)

    return forward_backward


def _hdgsa(shape: _Shape, variant: _Variant, backend: str) -> Callable[[], object]:
    if backend == "fla":
        reason = fla_unavailable_reason(
            torch.device("cuda"), head_dim_k=shape.head_dim, needs_backward=variant.backward
        )
        if reason is not None:
            raise ProviderUnavailable(reason)
    inputs = _inputs(shape, variant)
    num_heads = shape.heads if variant.packed else None
    forward = lambda: gated_delta_rule(
        inputs["q"], inputs["k"], inputs["v"], inputs["alpha"], inputs["beta"], inputs.get("D"), num_heads,
        backend=backend,
    )  # fmt: skip
    return _timed(forward, inputs, variant.backward)


def _fla_direct(shape: _Shape, variant: _Variant, log_in_step: bool = False) -> Callable[[], object]:
    """fla's ``chunk_gated_delta_rule`` as a user would call it: views for the packed layout and
    the D skip in PyTorch (``torch.addcmul``), all inside the step. ``g``: precomputed outside the
    timing from the same alpha (a model that produces log-decays directly), or, with
    ``log_in_step``, ``log(clamp(alpha, 1e-6))`` in float32 inside the step (a model that
    produces alpha, as this package's API takes: the same work as the wrapper's log-decay)."""
    reason = fla_unavailable_reason(
        torch.device("cuda"), head_dim_k=shape.head_dim, needs_backward=variant.backward
    )
    if reason is not None:
        raise ProviderUnavailable(reason)
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    inputs = _inputs(shape, variant)
    b, t, h, d = shape.batch, shape.seq_len, shape.heads, shape.head_dim
    alpha, beta, D = inputs["alpha"], inputs["beta"], inputs.get("D")
    leaves = dict(inputs)
    if not log_in_step:
        g_leaf = alpha.detach().float().clamp(min=1e-6).log().requires_grad_(variant.backward)
        del leaves["alpha"]
        leaves["g"] = g_leaf

    def forward() -> torch.Tensor:
        # Views and casts inside the step: made outside, their autograd nodes would belong to the
        # stream they were made on, and the step could not be captured in a CUDA graph.
        q, k, v = (inputs[name].view(b, t, h, d) for name in ("q", "k", "v"))
        g = alpha.float().clamp(min=1e-6).log() if log_in_step else g_leaf
        o, _ = chunk_gated_delta_rule(q, k, v, g, beta, scale=d**-0.5)
        if D is not None:
            o = torch.addcmul(o, D.to(shape.dtype)[:, None], v)
        return o.flatten(2) if variant.packed else o

    return _timed(forward, leaves, variant.backward)


def _cpu_inputs(shape: _Shape, backward: bool) -> dict[str, torch.Tensor]:
    """Seeded CPU inputs: alpha in (0.5, 1), l2-normalised keys."""
    generator = torch.Generator().manual_seed(0)
    b, t, h, d = shape.batch, shape.seq_len, shape.heads, shape.head_dim

    def randn(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=generator, dtype=shape.dtype)

    inputs = {
        "q": randn(b, t, h, d),
        "k": F.normalize(randn(b, t, h, d), dim=-1),
        "v": randn(b, t, h, d),
        "alpha": 0.5 + 0.5 * torch.rand(b, t, h, generator=generator, dtype=shape.dtype),
        "beta": torch.rand(b, t, h, generator=generator, dtype=shape.dtype),
    }
    for tensor in inputs.values():
        tensor.requires_grad_(backward)
    return inputs


def _cpu_torch_backend(shape: _Shape, backward: bool) -> Callable[[], object]:
    inputs = _cpu_inputs(shape, backward)
    return _timed(lambda: gated_delta_rule(*inputs.values(), backend="torch"), inputs, backward)


def _cpu_loop(shape: _Shape, which: str) -> Callable[[], object]:
    """A per-step (or per-chunk) Python loop on the same inputs, forward only."""
    q, k, v, alpha, beta = _cpu_inputs(shape, False).values()
    g, scale = alpha.log(), shape.head_dim**-0.5
    if which == "loop":
        return lambda: recurrent_gated_delta_rule_reference(
            q, k, v, g, beta, scale, compute_dtype=torch.float32
        )
    try:
        from fla.ops.gated_delta_rule import naive
    except Exception as error:  # fla missing or broken here
        raise ProviderUnavailable(f"fla-core not importable: {type(error).__name__}: {error}") from error
    if which == "fla-naive-recurrent":
        return lambda: naive.naive_recurrent_gated_delta_rule(q, k, v, beta, g, scale)
    return lambda: naive.naive_chunk_gated_delta_rule(q, k, v, g, beta, scale=scale)


def _cost(shape: _Shape, backward: bool) -> tuple[float, float]:
    d, size = shape.head_dim, shape.dtype.itemsize
    per_token_head = (4 * d + 2) * size  # q, k, v, o + alpha, beta
    num_bytes = float(shape.tokens_heads * per_token_head)
    flops = float(shape.tokens_heads * (6 * d * d + 2 * _CHUNK * 3 * d + _CHUNK * 2 * d))
    if backward:
        return 2.5 * num_bytes, 3 * flops
    return num_bytes, flops


def bench_cases(
    ops_filter: Iterable[str] | None = None,
    shapes: Iterable[_Shape] = SHAPES,
    cpu_shapes: Iterable[_Shape] = CPU_SHAPES,
) -> list[BenchCase]:
    """The CUDA benchmark cases, then the CPU ones (nothing is allocated until a provider's
    setup runs).

    ``ops_filter``: names to keep (``"gated_delta_rule"``, ``"deltanet"``); None keeps all.
    ``shapes`` / ``cpu_shapes``: the target shapes by default (tests pass small ones).
    """
    if ops_filter is not None and not set(ops_filter) & _OP_NAMES:
        return []
    cases = []
    for shape in shapes:
        for backward in (False, True):
            for packed in (False, True):
                for with_D in (False, True):
                    variant = _Variant(packed, with_D, backward)
                    providers: dict[str, Callable[[], Callable[[], object]]] = {
                        "hdgsa": lambda s=shape, v=variant: _hdgsa(s, v, "fla"),
                        "fla": lambda s=shape, v=variant: _fla_direct(s, v),
                        "fla+log": lambda s=shape, v=variant: _fla_direct(s, v, log_in_step=True),
                    }
                    if not packed:
                        providers["torch"] = lambda s=shape, v=variant: _hdgsa(s, v, "torch")
                    num_bytes, flops = _cost(shape, backward)
                    mode = "fwd+bwd" if backward else "fwd"
                    cases.append(
                        BenchCase(
                            op=_OP,
                            name=f"{shape.label} {variant.label}",
                            providers=providers,
                            bytes=num_bytes,
                            flops=flops,
                            tags=(mode, "packed" if packed else "unpacked", "D" if with_D else "noD"),
                        )
                    )
    for shape in cpu_shapes:
        forward_bytes, forward_flops = _cost(shape, False)
        loops = {
            name: lambda s=shape, n=name: _cpu_loop(s, n)
            for name in ("loop", "fla-naive-recurrent", "fla-naive-chunk")
        }
        cases.append(
            BenchCase(
                op=_OP,
                name=f"{shape.label} fwd",
                providers={"hdgsa": lambda s=shape: _cpu_torch_backend(s, False), **loops},
                bytes=forward_bytes,
                flops=forward_flops,
                tags=("fwd", "cpu"),
                devices=("cpu",),
            )
        )
        backward_bytes, backward_flops = _cost(shape, True)
        cases.append(
            BenchCase(
                op=_OP,
                name=f"{shape.label} fwd+bwd",
                providers={"hdgsa": lambda s=shape: _cpu_torch_backend(s, True)},
                bytes=backward_bytes,
                flops=backward_flops,
                tags=("fwd+bwd", "cpu"),
                devices=("cpu",),
            )
        )
    return cases
