import subprocess
import sys

import pytest
import torch

from hdgsa_core.registry import BenchCase, CheckResult
from hdgsa_kernels import bench, cli
from hdgsa_kernels.bench import (
    Ceilings,
    Measurement,
    _add_speedups,
    format_results,
    graph_ms,
    kernel_ms,
    run_benchmarks,
    summarize,
)
from hdgsa_kernels.ops import resolve_op_names


def test_info_prints_versions_and_flags(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "hdgsa-rmsnorm" in out
    assert "HAS_TRITON" in out
    assert torch.__version__ in out


def test_module_entry_point_runs():
    result = subprocess.run(
        [sys.executable, "-m", "hdgsa_kernels", "info"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "HAS_FLA" in result.stdout


def test_check_sinkhorn_passes_on_cpu(capsys):
    assert cli.main(["check", "sinkhorn", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "sinkhorn" in out
    assert " 0 failed" in out


def test_check_exits_non_zero_on_a_mismatch(monkeypatch, capsys):
    failing = [CheckResult("rmsnorm", "torch", "tiny", "y", 1.0, 1e-5)]
    monkeypatch.setattr(
        cli,
        "import_op_module",
        lambda op, sub: type("M", (), {"self_check": staticmethod(lambda device: failing)}),
    )
    assert cli.main(["check", "rmsnorm", "--device", "cpu"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_check_counts_a_crash_as_failure(monkeypatch, capsys):
    def crash(device):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(
        cli, "import_op_module", lambda op, sub: type("M", (), {"self_check": staticmethod(crash)})
    )
    assert cli.main(["check", "rmsnorm", "--device", "cpu"]) == 1
    assert "kernel exploded" in capsys.readouterr().out


def test_unknown_op_is_a_usage_error(capsys):
    assert cli.main(["check", "flashattention"]) == 2
    assert "unknown op" in capsys.readouterr().err


def test_op_names_and_aliases():
    assert resolve_op_names([]) == ["rmsnorm", "sinkhorn", "indexer", "sparse-attn", "deltanet"]
    assert resolve_op_names(["deltanet", "sparse", "rmsnorm"]) == ["rmsnorm", "sparse-attn", "deltanet"]


def test_roofline_and_speedups():
    case = BenchCase(op="rmsnorm", name="fwd", providers={}, bytes=3e9, flops=None)
    ceilings = Ceilings(copy_gbps=3000.0, matmul_tflops=800.0)
    ours = Measurement("rmsnorm", "fwd", "hdgsa", ms=1.25, ours=True)
    peer = Measurement("rmsnorm", "fwd", "liger", ms=2.5)
    missing = Measurement("rmsnorm", "fwd", "quack", note="skipped: not installed")
    for m in (ours, peer, missing):
        summarize(case, m, ceilings)
    _add_speedups(case, [ours, peer, missing])
    assert ours.gbps == pytest.approx(2400.0)
    assert ours.roofline_pct == pytest.approx(80.0)
    assert peer.speedup == pytest.approx(2.0)
    assert ours.speedup == pytest.approx(2.0)
    table = format_results([ours, peer, missing])
    assert "skipped: not installed" in table
    assert "2400" in table
    assert "GPU ms" not in table  # no --gpu-time: no column


def _cells(table: str, provider: str) -> list[str]:
    row = next(line for line in table.splitlines() if f"| {provider} " in line)
    return [cell.strip() for cell in row.split("|")]


def test_gpu_time_column():
    ours = Measurement("rmsnorm", "fwd", "hdgsa", ms=1.25, gpu_ms=0.8125, gpu_source="graph", ours=True)
    uncapturable = Measurement("rmsnorm", "fwd", "liger", ms=2.5, gpu_ms=1.75, gpu_source="kernels")
    untimed = Measurement("rmsnorm", "fwd", "torch", ms=3.5)
    table = format_results([ours, uncapturable, untimed])
    header = next(line for line in table.splitlines() if line.startswith("case"))
    assert [cell.strip() for cell in header.split("|")][2:4] == ["ms", "GPU ms"]
    assert _cells(table, "hdgsa")[2:4] == ["1.2500", "0.8125"]
    assert _cells(table, "liger")[2:4] == ["2.5000", "1.7500k"]  # k: the kernels' sum
    assert _cells(table, "torch")[2:4] == ["3.5000", "-"]


def test_gpu_ms_falls_back_to_the_kernel_sum(monkeypatch):
    """A call graph_ms cannot capture gets kernel_ms's time, marked as such; neither: nothing."""
    monkeypatch.setattr(bench, "graph_ms", lambda fn: 0.5)
    monkeypatch.setattr(bench, "kernel_ms", lambda fn: 0.75)
    assert bench.gpu_ms(lambda: None) == (0.5, "graph")
    monkeypatch.setattr(bench, "graph_ms", lambda fn: None)
    assert bench.gpu_ms(lambda: None) == (0.75, "kernels")
    monkeypatch.setattr(bench, "kernel_ms", lambda fn: None)
    assert bench.gpu_ms(lambda: None) == (None, "")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_graph_ms_times_a_capturable_call_and_refuses_a_host_sync():
    x = torch.randn(1 << 20, device="cuda")
    out = torch.empty_like(x)
    ms = graph_ms(lambda: torch.mul(x, 2.0, out=out))
    assert ms is not None
    assert 0 < ms < 100
    assert torch.equal(out, x * 2.0)
    stream = torch.cuda.current_stream()
    assert graph_ms(lambda: x.sum().item()) is None  # a host read cannot be captured
    assert torch.cuda.current_stream() == stream  # the failed capture gave the stream back
    torch.mul(x, 3.0, out=out)  # the GPU is usable after the refused capture
    torch.cuda.synchronize()
    assert torch.equal(out, x * 3.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the profiler's CUDA times need a GPU")
def test_kernel_ms_sums_the_kernels_of_an_uncapturable_call():
    x = torch.randn(1 << 20, device="cuda")
    out = torch.empty_like(x)
    one = kernel_ms(lambda: torch.mul(x, 2.0, out=out))
    two = kernel_ms(lambda: (torch.mul(x, 2.0, out=out), torch.mul(out, 3.0, out=out), out.sum().item()))
    assert one is not None
    assert two is not None
    assert 0 < one < two < 100  # the second call runs the first's kernel and two more
    assert torch.equal(out, x * 6.0)
    assert kernel_ms(lambda: None) is None  # no kernel, no time


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_graph_ms_failed_capture_leaves_the_random_generator_usable():
    """A call that draws random numbers and breaks the capture itself (it syncs only while
    capturing, so the warm-up passes) returns None, and random ops work afterwards, from the
    generator's state before graph_ms was called."""

    def breaks_capture() -> None:
        torch.randn(64, device="cuda")
        if torch.cuda.is_current_stream_capturing():
            torch.cuda.synchronize()

    torch.cuda.manual_seed(5)
    expected = torch.randn(8, device="cuda")
    torch.cuda.manual_seed(5)
    assert graph_ms(breaks_capture) is None
    assert torch.equal(torch.randn(8, device="cuda"), expected)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_bench_without_gpu_says_so(capsys):
    assert run_benchmarks(["rmsnorm"]) == 1
    assert "needs a CUDA GPU" in capsys.readouterr().err
