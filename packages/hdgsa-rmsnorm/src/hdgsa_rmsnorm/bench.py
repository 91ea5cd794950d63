"""Benchmark cases of ``rms_norm`` for ``hdgsa-kernels bench`` (CUDA only; nothing is allocated
when the cases are listed).

Shapes (bf16): ``[32768 x 4096]``, ``[16384 x 8192]``, ``[65536 x 2048]``,
``[4096 x 65536]``, ``[1024 x 262144]``, each as
- ``fwd residual+prenorm``: reads x, residual, writes y, h: 8 bytes per element;
- ``fwd+bwd residual+prenorm``: the forward, then a backward that reads dy, dh, h and writes dx
  (also the residual's gradient): 16 bytes per element;
- ``fwd plain``: no residual: reads x, writes y: 4 bytes per element, against
  ``torch.nn.functional.rms_norm``.
Peers: eager PyTorch (our reference), ``torch.compile`` of it, Liger-Kernel, fla, quack (each
skipped with the reason when it is missing or refuses the shape).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence

import torch

from hdgsa_core.registry import BenchCase, ProviderUnavailable

from .api import rms_norm
from .reference import rms_norm_reference

__all__ = ["SHAPES", "bench_cases"]

SHAPES: tuple[tuple[int, int], ...] = (
    (32768, 4096),
    (16384, 8192),
    (65536, 2048),
    (4096, 65536),
    (1024, 262144),
)
EPS = 1e-6
DTYPE = torch.bfloat16

Fn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], object]


def _inputs(rows: int, hidden: int, *, residual: bool, grad: bool):
    if not torch.cuda.is_available():
        raise ProviderUnavailable("needs a CUDA GPU")
    device = torch.device("cuda")
    generator = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(rows, hidden, device=device, dtype=DTYPE, generator=generator).requires_grad_(grad)
    r = (
        torch.randn(rows, hidden, device=device, dtype=DTYPE, generator=generator).requires_grad_(grad)
        if residual
        else None
    )
    w = (1 + 0.1 * torch.randn(hidden, device=device, dtype=DTYPE, generator=generator)).requires_grad_(grad)
    return x, w, r


def _provider(
    fn_factory: Callable[[], Fn], rows: int, hidden: int, mode: str
) -> Callable[[], Callable[[], object]]:
    """Setup for one provider: inputs on the GPU, one checked call (a peer that refuses the
    shape becomes ProviderUnavailable), then the callable to time."""

    def setup() -> Callable[[], object]:
        fn = fn_factory()
        with_residual = mode != "fwd plain"
        backward = mode.startswith("fwd+bwd")
        x, w, r = _inputs(rows, hidden, residual=with_residual, grad=backward)
        try:
            with torch.no_grad() if not backward else torch.enable_grad():
                outputs = fn(x, w, r)
        except ProviderUnavailable:
            raise
        except (RuntimeError, AssertionError, ValueError) as refusal:
            raise ProviderUnavailable(
                f"refuses [{rows}x{hidden}]: {str(refusal).splitlines()[0][:100]}"
            ) from refusal
        if not backward:

            def run_forward() -> object:
                with torch.no_grad():
                    return fn(x, w, r)

            return run_forward
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        upstream = [torch.randn_like(o) for o in outputs]
        inputs = [t for t in (x, w, r) if t is not None]
        del outputs

        def run_forward_backward() -> object:
            outs = fn(x, w, r)
            outs = outs if isinstance(outs, tuple) else (outs,)
            # autograd.grad: no .grad accumulates between repeats
            return torch.autograd.grad(outs, inputs, upstream)

        return run_forward_backward

    return setup


# ----------------------------------------------------------------------------- providers


def _ours() -> Fn:
    return lambda x, w, r: rms_norm(x, w, EPS, r, prenorm=r is not None, backend="auto")


def _eager() -> Fn:
    return lambda x, w, r: rms_norm_reference(x, w, EPS, r, r is not None)


def _compiled() -> Fn:
    compiled = torch.compile(rms_norm_reference)
    return lambda x, w, r: compiled(x, w, EPS, r, r is not None)


def _torch_functional() -> Fn:
    def fn(x, w, r):
        if r is not None:
            raise ProviderUnavailable("torch.nn.functional.rms_norm has no residual")
        return torch.nn.functional.rms_norm(x, (x.shape[-1],), w, EPS)

    return fn


def _liger() -> Fn:
    if importlib.util.find_spec("liger_kernel") is None:
        raise ProviderUnavailable("liger_kernel not installed")
    from liger_kernel.ops.fused_add_rms_norm import LigerFusedAddRMSNormFunction
    from liger_kernel.ops.rms_norm import LigerRMSNormFunction

    def fn(x, w, r):
        if r is None:
            return LigerRMSNormFunction.apply(x, w, EPS, 0.0, "llama", False)
        return LigerFusedAddRMSNormFunction.apply(x, r, w, EPS, 0.0, "llama", False)

    return fn


def _fla() -> Fn:
    if importlib.util.find_spec("fla") is None:
        raise ProviderUnavailable("fla-core not installed")
    from fla.modules.layernorm import rms_norm as fla_rms_norm

    def fn(x, w, r):
        if r is None:
            return fla_rms_norm(x, w, None, eps=EPS)
        return fla_rms_norm(x, w, None, residual=r, eps=EPS, prenorm=True, residual_in_fp32=False)

    return fn


def _quack() -> Fn:
    if importlib.util.find_spec("quack") is None:
        raise ProviderUnavailable("quack not installed")
    try:
        from quack.rmsnorm import rmsnorm as quack_rmsnorm
    except ImportError as error:
        raise ProviderUnavailable(f"quack has no rmsnorm: {error}") from error

    def fn(x, w, r):
        try:
            if r is None:
                return quack_rmsnorm(x, w, eps=EPS)
            return quack_rmsnorm(x, w, residual=r, eps=EPS, prenorm=True)
        except TypeError as error:
            raise ProviderUnavailable(f"quack rmsnorm API not recognized: {error}") from error

    return fn


_PEERS: dict[str, Callable[[], Fn]] = {
    "torch": _eager,
    "torch.compile": _compiled,
    "liger": _liger,
    "fla": _fla,
    "quack": _quack,
}

MODES = ("fwd residual+prenorm", "fwd+bwd residual+prenorm", "fwd plain")
_BYTES_PER_ELEMENT = {"fwd residual+prenorm": 8, "fwd+bwd residual+prenorm": 16, "fwd plain": 4}


def bench_cases(ops_filter: Sequence[str] | None = None) -> list[BenchCase]:
    """The RMSNorm cases: every shape in every mode. ``ops_filter``: keep only cases whose name
    contains one of these strings (None: all)."""
    cases = []
    for mode in MODES:
        for rows, hidden in SHAPES:
            name = f"{mode} {rows}x{hidden} bf16"
            if ops_filter and not any(part in name for part in ops_filter):
                continue
            peers = dict(_PEERS)
            if mode == "fwd plain":
                peers = {"torch.nn.functional.rms_norm": _torch_functional, **peers}
            providers = {"hdgsa": _provider(_ours, rows, hidden, mode)}
            providers.update(
                {peer: _provider(factory, rows, hidden, mode) for peer, factory in peers.items()}
            )
            cases.append(
                BenchCase(
                    op="rmsnorm",
                    name=name,
                    providers=providers,
                    bytes=_BYTES_PER_ELEMENT[mode] * rows * hidden * DTYPE.itemsize / 2,
                    tags=(mode.split()[0], "bf16"),
                )
            )
    return cases
