"""One GPU session for hdgsa-deltanet-fla: versions, the fla path's parts timed alone, then the
bench table (hdgsa vs fla direct, torch backend). Run after the CUDA tests; see BENCHMARKS.md.

    python packages/hdgsa-deltanet-fla/benchmarks/gpu_session.py [fwd] [fwd+bwd]
"""

from __future__ import annotations

import datetime
import sys

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


if __name__ == "__main__":
    caps = hdgsa_core.capabilities()
    print(
        f"{datetime.date.today()} {torch.cuda.get_device_name()} torch {torch.__version__} "
        f"triton {triton.__version__} fla-core {caps['fla-core']} cuda {torch.version.cuda}"
    )
    print(f"fla backward here: {_fla.fla_backward_refusal() or 'runs'}")
    parts()
    bench.main(sys.argv[1:])
