"""Minor page faults and time per call of repeated torch-backend forwards on CPU.

    python packages/hdgsa-deltanet-fla/benchmarks/cpu_faults.py [calls]

B1 T1024 H4 K=V=64 float32, 2 threads, the forward without autograd called back to back (after
20 warm-up calls): glibc may trim the heap after a call and the next one faults its pages back
in. Run it in several fresh processes (e.g. ``PYTHONHASHSEED=0..11``): the heap's history, and so
the faulting, differs from process to process.
"""

from __future__ import annotations

import resource
import statistics
import sys
import time

import torch
from cpu_speed import issue_inputs

from hdgsa_deltanet_fla import gated_delta_rule


def main(calls: int) -> None:
    torch.set_num_threads(2)
    q, k, v, alpha, beta = issue_inputs()
    for _ in range(20):
        gated_delta_rule(q, k, v, alpha, beta, backend="torch")
    faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        gated_delta_rule(q, k, v, alpha, beta, backend="torch")
        times.append(1e3 * (time.perf_counter() - start))
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before) / calls
    print(f"faults/call {faults:.1f}  median ms {statistics.median(times):.3f}  min ms {min(times):.3f}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 100)
