"""Host time per call of the fla path, ours against fla called directly (issue 5's wall target).

    python packages/hdgsa-deltanet-fla/benchmarks/host_overhead.py [--rounds 15] [--calls 50]

At a tiny shape (B1 T64 H2 D64 bf16) the GPU work of a call is a few microseconds per kernel,
so ``calls`` calls back to back, then a sync, take the host's time: the Python and launches a
training step pays whatever the shape. Providers as in ``fwd_bwd_overhead.py`` (``hdgsa``,
``hdgsa-public``, ``fla`` with ``g`` precomputed, ``fla+log``), forward and forward + backward,
with and without ``D``, taking turns in a rotating order for ``rounds`` rounds; prints the median
microseconds per call and ours minus each peer.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from fwd_bwd_overhead import _through_fla_public, _wall_ms

from hdgsa_deltanet_fla.bench import _fla_direct, _hdgsa, _Shape, _Variant

_SHAPE = _Shape("B1 T64 H2 D64 bf16", 1, 64, 2, 64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=50)
    args = parser.parse_args()
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}; {_SHAPE.label}")
    print(
        f"{'variant':22s} {'ours us':>9s} {'public':>9s} {'fla':>9s} {'fla+log':>9s}  ours - fla, - fla+log, - public"
    )
    for backward in (False, True):
        for with_D in (False, True):
            variant = _Variant(packed=False, with_D=with_D, backward=backward)
            runs = {
                "hdgsa": _hdgsa(_SHAPE, variant, "fla"),
                "hdgsa-public": _through_fla_public(_hdgsa(_SHAPE, variant, "fla")),
                "fla": _fla_direct(_SHAPE, variant),
                "fla+log": _fla_direct(_SHAPE, variant, log_in_step=True),
            }
            names = list(runs)
            for fn in runs.values():
                for _ in range(3):
                    fn()
            walls: dict[str, list[float]] = {name: [] for name in names}
            for round_index in range(args.rounds):
                shift = round_index % len(names)
                for name in names[shift:] + names[:shift]:
                    walls[name].append(1e3 * _wall_ms(runs[name], args.calls))
            us = {name: statistics.median(values) for name, values in walls.items()}
            print(
                f"{variant.label:22s} "
                + " ".join(f"{us[name]:9.1f}" for name in names)
                + f"  {us['hdgsa'] - us['fla']:+7.1f} {us['hdgsa'] - us['fla+log']:+7.1f}"
                f" {us['hdgsa'] - us['hdgsa-public']:+7.1f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
