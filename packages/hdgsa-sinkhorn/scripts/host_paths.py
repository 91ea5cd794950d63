"""Host time of each layer of a Sinkhorn call on a GPU (dev script, not shipped).

    python3 packages/hdgsa-sinkhorn/scripts/host_paths.py

At n = 4, 65,536 matrices, 20 iterations: the launchers alone, the public function, and the
forward + backward through autograd, each as do_bench median and host microseconds per call
(back-to-back calls, no sync; the GPU keeps up, so this is the host's own time).
"""

from __future__ import annotations

import time

import torch
from triton.testing import do_bench

from hdgsa_sinkhorn import sinkhorn_knopp
from hdgsa_sinkhorn._triton import SinkhornKnoppFunction, sinkhorn_knopp_bwd, sinkhorn_knopp_fwd


def host_us(fn, calls: int = 300) -> float:
    fn()
    torch.cuda.synchronize()
    begin = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - begin
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def main() -> None:
    logits = torch.randn(16, 4096, 4, 4, device="cuda")
    leaf = logits.clone().requires_grad_()
    grad = torch.randn_like(logits)
    leaf_cpu, grad_cpu = leaf.detach().cpu().requires_grad_(), grad.cpu()
    rows = {
        "fwd launcher": lambda: sinkhorn_knopp_fwd(logits, 20, 1e-8),
        "bwd launcher": lambda: sinkhorn_knopp_bwd(logits, grad, 20, 1e-8),
        "Function.apply, no grad": lambda: SinkhornKnoppFunction.apply(logits, 20, 1e-8),
        "sinkhorn_knopp, no grad": lambda: sinkhorn_knopp(logits, 20),
        "sinkhorn_knopp, leaf needs grad": lambda: sinkhorn_knopp(leaf, 20),
        "fwd + autograd.grad": lambda: torch.autograd.grad(sinkhorn_knopp(leaf, 20), leaf, grad),
        "fwd + .backward()": lambda: sinkhorn_knopp(leaf, 20).backward(grad),
        "fwd + bwd launchers, no autograd": lambda: sinkhorn_knopp_bwd(
            logits, sinkhorn_knopp_fwd(logits, 20, 1e-8), 20, 1e-8
        ),
        # The autograd engine alone, on the same tensors: one multiply and its backward.
        "x * 2 + autograd.grad (CUDA)": lambda: torch.autograd.grad(leaf * 2, leaf, grad),
        "x * 2 + autograd.grad (CPU)": lambda: torch.autograd.grad(leaf_cpu * 2, leaf_cpu, grad_cpu),
    }
    print(f"{'path':<34} {'do_bench us':>12} {'host us/call':>13}")
    for name, fn in rows.items():
        host = host_us(fn)
        bench = do_bench(fn, warmup=5, rep=30, return_mode="median") * 1e3
        print(f"{name:<34} {bench:>12.1f} {host:>13.1f}")


if __name__ == "__main__":
    main()
