"""One GPU session for hdgsa-deltanet-fla: versions, the fla path's parts timed alone, then the
bench table (hdgsa vs fla direct, torch backend). Run after the CUDA tests; see BENCHMARKS.md.

    python packages/hdgsa-deltanet-fla/benchmarks/gpu_session.py [fwd] [fwd+bwd]
"""

from __future__ import annotations

import datetime
import sys
import time

import torch
import triton
import triton.testing

import hdgsa_core
from hdgsa_deltanet_fla import _fla, _triton, bench


def _ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def parts() -> None:
    """The wrapper's own passes at B4 T4096 H16 V128 bf16, each alone."""
    b, t, h, d = 4, 4096, 16, 128
    alpha = torch.rand(b, t, h, device="cuda", dtype=torch.bfloat16) * 0.5 + 0.5
    o = torch.randn(b, t, h, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(o)
    D = torch.randn(h, device="cuda")
    D16 = D.to(torch.bfloat16)[:, None]
    rows = [
        ("log_decay (Triton, 1 pass)", lambda: _triton.log_decay_fwd(alpha)),
        ("torch alpha.float().clamp().log()", lambda: alpha.float().clamp(min=1e-6).log()),
        ("d_skip (Triton, fp32 D)", lambda: _triton.d_skip_fwd(o, v, D, torch.bfloat16)),
        ("torch addcmul(o, D_bf16, v)", lambda: torch.addcmul(o, D16, v)),
        ("copy o (roofline of a 2-tensor pass)", lambda: o.clone()),
    ]
    for name, fn in rows:
        print(f"  part {name:40s} {1000 * _ms(fn):8.1f} us")


def enqueue_us(fn, calls: int = 100) -> float:
    """Host time per call with nothing waiting on the GPU: what a call costs the CPU."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    host = time.perf_counter() - start
    torch.cuda.synchronize()
    return 1e6 * host / calls


def graph_ms(fn) -> float:
    """GPU time alone: the call captured in a CUDA graph and replayed (no launch overhead)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return _ms(graph.replay)


def _torch_log_decay(alpha):
    """The alternative to the Triton log-decay kernel: three PyTorch ops."""
    return alpha.to(torch.float32, copy=True).clamp_min_(1e-6).log_()


def overhead() -> None:
    """Where the wrapper's time goes at B4 T4096 H16 D128 bf16, unpacked, forward: do_bench
    median, host time per call, and GPU time alone (CUDA graph), per provider."""
    shape = bench.SHAPES[0]
    rows = []
    for with_D in (False, True):
        variant = bench._Variant(packed=False, with_D=with_D, backward=False)
        rows.append((f"fla direct {variant.label}", bench._fla_direct(shape, variant)))
        rows.append((f"hdgsa {variant.label}", bench._hdgsa(shape, variant, "fla")))
        inner_fwd = _triton.log_decay_fwd
        hdgsa_torch_g = bench._hdgsa(shape, variant, "fla")

        def with_torch_g(fn=hdgsa_torch_g, inner=inner_fwd):
            _triton.log_decay_fwd = _torch_log_decay
            try:
                return fn()
            finally:
                _triton.log_decay_fwd = inner

        rows.append((f"hdgsa, torch log-decay {variant.label}", with_torch_g))
    print(f"{'B4 T4096 H16 D128 bf16':44s} {'do_bench ms':>11s} {'host us/call':>12s} {'graph ms':>9s}")
    for name, fn in rows:
        try:
            graph = f"{graph_ms(fn):9.3f}"
        except Exception as error:  # capture may fail; say so and go on
            graph = f"failed ({type(error).__name__})"
        print(f"{name:44s} {_ms(fn):11.3f} {enqueue_us(fn):12.1f} {graph:>9s}", flush=True)
    del rows
    torch.cuda.empty_cache()


if __name__ == "__main__":
    caps = hdgsa_core.capabilities()
    print(
        f"{datetime.date.today()} {torch.cuda.get_device_name()} torch {torch.__version__} "
        f"triton {triton.__version__} fla-core {caps['fla-core']} cuda {torch.version.cuda}"
    )
    print(f"fla backward here: {_fla.fla_backward_refusal() or 'runs'}")
    parts()
    overhead()
    bench.main(sys.argv[1:])
