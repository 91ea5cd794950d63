"""Benchmark cases for ``hdgsa-kernels bench sinkhorn`` (CUDA only; nothing allocated when listing).

Shapes: n = 4, 20 iterations, float32, at 1,024 / 16,384 / 65,536 (mHC's B=16, T=4096) /
262,144 / 1,048,576 matrices, plus n = 8 and n = 16 at 65,536; ``fwd`` and ``fwd+bwd`` each.
Minimum bytes: forward reads the logits and writes P (``2 * n * n * 4`` per matrix); forward +
backward also reads dP and writes d logits (``4 * n * n * 4``).

Providers:
- ``hdgsa``: :func:`sinkhorn_knopp` with ``backend="auto"`` (Triton on CUDA), eager path.
- ``hdgsa-direct``: our forward and backward launchers called directly, no autograd (as the
  ``liger`` row calls Liger's kernels); what an eager step costs without the autograd engine's
  per-call host time.
- ``torch``: the PyTorch reference, eager. ``torch.compile``: the reference compiled (Inductor,
  default dynamic-shape policy).
- ``fla``: ``fla.ops.utils.sinkhorn.sinkhorn(logits, num_iters)`` from fla-core (Triton, one
  program of 4 warps per matrix, log domain, columns first, no eps; ``n <= 8``). Same job, not
  bitwise the same math.
- ``liger``: Liger-Kernel's mHC coefficient kernels, the cheapest entry points that run Sinkhorn:
  ``mhc_split_sinkhorn_fwd`` (one 1-warp program per matrix; it also computes the pre/post
  sigmoid gates from the same ``[M, n*n + 2n]`` mix rows, and starts with a row softmax + eps) and
  for the backward ``mhc_sinkhorn_bwd`` fed by the forward's saved iteration history
  (``return_hist=True``, as Liger's autograd Function does when gradients are needed).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from hdgsa_core.registry import BenchCase, ProviderUnavailable

__all__ = ["SHAPES", "bench_cases"]

OP = "sinkhorn_knopp"
_OP_NAMES = {OP, "sinkhorn", "sinkhorn-knopp", "hdgsa_sinkhorn", "hdgsa-sinkhorn"}
NUM_ITERS = 20

# (number of matrices, n); leading dims [16, matrices / 16] like mHC's [B, T].
SHAPES: list[tuple[int, int]] = [
    (1_024, 4),
    (16_384, 4),
    (65_536, 4),
    (262_144, 4),
    (1_048_576, 4),
    (65_536, 8),
    (65_536, 16),
]

Setup = Callable[[], Callable[[], object]]


def _logits(count: int, n: int, requires_grad: bool) -> torch.Tensor:
    generator = torch.Generator(device="cuda").manual_seed(count + n)
    logits = torch.randn(16, count // 16, n, n, device="cuda", generator=generator)
    return logits.requires_grad_(requires_grad)


def _timed(
    forward: Callable[[torch.Tensor], torch.Tensor], count: int, n: int, backward: bool
) -> Callable[[], object]:
    """A zero-argument callable running ``forward`` (and its backward via autograd.grad, so no
    ``.grad`` accumulates), called once here so compilation stays out of the timing."""
    logits = _logits(count, n, backward)
    if backward:
        grad_output = torch.randn_like(logits)

        def run() -> object:
            return torch.autograd.grad(forward(logits), logits, grad_output)
    else:

        def run() -> object:
            return forward(logits)

    run()
    return run


def _hdgsa(count: int, n: int, backward: bool) -> Callable[[], object]:
    from .api import sinkhorn_knopp

    return _timed(lambda x: sinkhorn_knopp(x, NUM_ITERS), count, n, backward)


def _hdgsa_launchers(count: int, n: int, backward: bool) -> Callable[[], object]:
    """Our forward and backward launchers called directly, without autograd: how the Liger row
    calls its kernels, so the two compare like for like."""
    from ._triton import sinkhorn_knopp_bwd, sinkhorn_knopp_fwd

    logits = _logits(count, n, False)
    if backward:
        grad_output = torch.randn_like(logits)

        def run() -> object:
            sinkhorn_knopp_fwd(logits, NUM_ITERS, 1e-8)
            return sinkhorn_knopp_bwd(logits, grad_output, NUM_ITERS, 1e-8)
    else:

        def run() -> object:
            return sinkhorn_knopp_fwd(logits, NUM_ITERS, 1e-8)

    run()
    return run


def _torch_eager(count: int, n: int, backward: bool) -> Callable[[], object]:
    from .reference import sinkhorn_knopp_reference

    return _timed(lambda x: sinkhorn_knopp_reference(x, NUM_ITERS), count, n, backward)


def _torch_compile(count: int, n: int, backward: bool) -> Callable[[], object]:
    from .reference import sinkhorn_knopp_reference

    # Default dynamic-shape policy: the first shape compiles static, the next ones share one
    # dynamic-shape graph (so a sweep of shapes does not hit the recompile limit).
    compiled = torch.compile(sinkhorn_knopp_reference)
    return _timed(lambda x: compiled(x, NUM_ITERS), count, n, backward)


def _fla(count: int, n: int, backward: bool) -> Callable[[], object]:
    try:
        from fla.ops.utils.sinkhorn import sinkhorn
    except Exception as error:  # fla missing or broken here
        raise ProviderUnavailable(f"fla-core not importable: {error}") from error
    if n > 8:
        raise ProviderUnavailable("fla's sinkhorn takes n <= 8")
    return _timed(lambda x: sinkhorn(x, num_iters=NUM_ITERS), count, n, backward)


def _liger(count: int, n: int, backward: bool) -> Callable[[], object]:
    try:
        from liger_kernel.ops.mhc import mhc_sinkhorn_bwd, mhc_split_sinkhorn_fwd
    except Exception as error:  # Liger missing or broken here
        raise ProviderUnavailable(f"liger_kernel.ops.mhc not importable: {error}") from error
    width = n * n + 2 * n
    generator = torch.Generator(device="cuda").manual_seed(count + n)
    mix = torch.randn(count, width, device="cuda", generator=generator)
    bias = torch.randn(width, device="cuda", generator=generator) * 0.1
    alpha_pre, alpha_post, alpha_res = (torch.ones((), device="cuda") for _ in range(3))
    options = dict(tmax=NUM_ITERS, pre_eps=0.0, sinkhorn_eps=1e-8, post_mult=2.0)
    if not backward:

        def run() -> object:
            return mhc_split_sinkhorn_fwd(mix, bias, alpha_pre, alpha_post, alpha_res, **options)
    else:
        grad_res = torch.randn(count, n, n, device="cuda", generator=generator)

        def run() -> object:
            *_, hist = mhc_split_sinkhorn_fwd(
                mix, bias, alpha_pre, alpha_post, alpha_res, return_hist=True, **options
            )
            return mhc_sinkhorn_bwd(
                mix, bias, alpha_res, grad_res, tmax=NUM_ITERS, sinkhorn_eps=1e-8, hist=hist
            )

    run()
    return run


def bench_cases(ops_filter: Iterable[str] | None = None) -> list[BenchCase]:
    """The Sinkhorn-Knopp cases; empty when ``ops_filter`` names none of this op's names."""
    if ops_filter is not None and not _OP_NAMES.intersection(ops_filter):
        return []
    cases = []
    for count, n in SHAPES:
        for mode, backward in (("fwd", False), ("fwd+bwd", True)):
            providers: dict[str, Setup] = {
                "hdgsa": lambda c=count, m=n, b=backward: _hdgsa(c, m, b),
                "hdgsa-direct": lambda c=count, m=n, b=backward: _hdgsa_launchers(c, m, b),
                "torch": lambda c=count, m=n, b=backward: _torch_eager(c, m, b),
                "torch.compile": lambda c=count, m=n, b=backward: _torch_compile(c, m, b),
                "fla": lambda c=count, m=n, b=backward: _fla(c, m, b),
                "liger": lambda c=count, m=n, b=backward: _liger(c, m, b),
            }
            passes = 4 if backward else 2
            cases.append(
                BenchCase(
                    op=OP,
                    name=f"{mode} n={n} M={count} iters={NUM_ITERS} fp32",
                    providers=providers,
                    bytes=float(passes * n * n * 4 * count),
                    tags=(mode, f"n={n}"),
                )
            )
    return cases
