import json
import subprocess
import sys
import time

import pytest
import torch

from hdgsa_core.registry import BenchCase, CheckResult, ProviderUnavailable
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
from hdgsa_kernels.results import device_slug


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


# ----------------------------------------------------------------------------- runner on CPU
# A stub case timed on the CPU (device="cpu", a fixed timer): what the options do to the
# report, the baselines and the exit status, without a GPU.


def _stub_case(op: str = "stub_op", peer_ms: float = 2.0) -> BenchCase:
    x = torch.randn(64, 64)

    def ours():
        return lambda: x @ x

    def peer():
        return lambda: (x @ x).relu()

    def missing():
        raise ProviderUnavailable("stub peer not installed")

    return BenchCase(
        op=op,
        name="square 64",
        providers={"hdgsa": ours, "hdgsa-direct": ours, "peer": peer, "absent": missing},
        bytes=3 * 64 * 64 * 4,
        flops=2 * 64**3,
    )


def _timer(times: dict[str, float]):
    """A timer returning fixed ms per provider, in the order the runner times them."""
    queue = list(times.values())
    return lambda fn: queue.pop(0)


def _run(tmp_path, times, **options):
    return run_benchmarks(
        [],
        cases=[_stub_case()],
        device="cpu",
        timer=_timer(times),
        output_dir=tmp_path / "runs",
        readings_dir=tmp_path / "readings",
        command="hdgsa-kernels bench stub",
        **options,
    )


def test_save_baseline_writes_one_file_per_op_and_device(tmp_path, capsys):
    assert _run(tmp_path, {"hdgsa": 1.0, "hdgsa-direct": 0.5, "peer": 2.0}, save_baseline=tmp_path) == 0
    (path,) = tmp_path.glob("stub_op-cpu-*.json")
    record = json.loads(path.read_text())
    assert record["device"].startswith("CPU ")
    assert path.name == f"stub_op-{device_slug(record['device'])}.json"
    assert record["command"] == "hdgsa-kernels bench stub"
    assert {row["provider"]: row["ms"] for row in record["results"]} == {
        "hdgsa": 1.0,
        "hdgsa-direct": 0.5,
        "peer": 2.0,
        "absent": None,
    }
    # a second run replaces the baseline, it does not add a file
    assert _run(tmp_path, {"hdgsa": 1.5, "hdgsa-direct": 0.5, "peer": 2.0}, save_baseline=tmp_path) == 0
    assert [p.name for p in tmp_path.glob("*.json")] == [path.name]
    assert json.loads(path.read_text())["results"][0]["ms"] == 1.5
    assert "baseline:" in capsys.readouterr().out


def _baseline(tmp_path, rows: dict[str, float | None], op: str = "stub_op"):
    path = tmp_path / "baseline.json"
    results = [
        {"op": op, "case": "square 64", "provider": name, "ms": ms, "ours": name == "hdgsa"}
        for name, ms in rows.items()
    ]
    path.write_text(json.dumps({"results": results}))  # no device: no note about another card
    return path


_BASELINE_MS = {"hdgsa": 1.0, "hdgsa-direct": 0.5, "peer": 2.0}


@pytest.mark.parametrize(
    ("changed", "threshold", "status", "expected"),
    [
        (
            {"hdgsa": 1.2},
            5.0,
            1,
            "REGRESSION (ours, slower): stub_op | square 64 | hdgsa: 1.0000 -> 1.2000 ms (+20.0%)",
        ),
        ({"hdgsa-direct": 0.6}, 5.0, 1, "REGRESSION (ours, slower): stub_op | square 64 | hdgsa-direct"),
        ({"peer": 3.0}, 5.0, 0, "slower peer (not a failure): stub_op | square 64 | peer"),
        ({"hdgsa": 0.5}, 5.0, 0, "faster: stub_op | square 64 | hdgsa: 1.0000 -> 0.5000 ms (-50.0%)"),
        ({"hdgsa": 1.04}, 5.0, 0, "0 regression(s), 0 slower peer row(s), 0 faster"),
        ({"hdgsa": 1.04}, 2.0, 1, "1 regression(s)"),
    ],
)
def test_compare_flags_regressions_of_ours_only(tmp_path, capsys, changed, threshold, status, expected):
    """Ours (and variants named hdgsa-...) slower beyond the threshold fail the run; a slower peer
    and a faster row are listed; within the threshold nothing is flagged."""
    baseline = _baseline(tmp_path, _BASELINE_MS)
    times = {**_BASELINE_MS, **changed}
    assert _run(tmp_path, times, compare=[baseline], compare_threshold=threshold) == status
    assert expected in capsys.readouterr().out


def test_compare_reports_missing_and_new_rows(tmp_path, capsys):
    baseline = _baseline(tmp_path, {"hdgsa": 1.0, "absent": 3.0, "gone": 4.0})
    assert _run(tmp_path, _BASELINE_MS, compare=[baseline]) == 0
    out = capsys.readouterr().out
    assert "missing: stub_op | square 64 | absent: 3.0000 ms in the baseline, not timed now" in out
    assert "(skipped: stub peer not installed)" in out
    assert "missing: stub_op | square 64 | gone" in out
    assert "new: stub_op | square 64 | peer" in out
    # rows of ops this run did not time are not "missing"
    other = _baseline(tmp_path, {"hdgsa": 1.0}, op="other_op")
    assert _run(tmp_path, {"hdgsa": 1.0, "hdgsa-direct": 0.5, "peer": 2.0}, compare=[other]) == 0
    assert "0 rows, threshold 5%\n0 regression(s), 0 slower peer row(s), 0 faster, 0 missing, 0 new" in (
        capsys.readouterr().out
    )


def test_compare_cli_from_saved_records_without_a_gpu(tmp_path, capsys):
    assert (
        _run(tmp_path, {"hdgsa": 1.0, "hdgsa-direct": 0.5, "peer": 2.0}, save_baseline=tmp_path / "old") == 0
    )
    assert (
        _run(tmp_path, {"hdgsa": 1.5, "hdgsa-direct": 0.5, "peer": 2.0}, save_baseline=tmp_path / "new") == 0
    )
    capsys.readouterr()
    (old,) = (tmp_path / "old").glob("*.json")
    (new,) = (tmp_path / "new").glob("*.json")
    cases = [_stub_case()]
    assert bench.render_records([], [new], compare=[old], cases=cases) == 1
    assert (
        "REGRESSION (ours, slower): stub_op | square 64 | hdgsa: 1.0000 -> 1.5000 ms"
        in capsys.readouterr().out
    )
    assert bench.render_records([], [old], compare=[new], cases=cases) == 0


def test_markdown_page_has_the_header_and_one_table_per_op(tmp_path, capsys):
    readings = tmp_path / "readings"
    readings.mkdir()
    (readings / "stub_op.md").write_text("The stub is bound by nothing.\n")
    (readings / "intro.md").write_text("Intro paragraph.\n")
    cases = [_stub_case(), _stub_case("second_op")]
    status = run_benchmarks(
        [],
        cases=cases,
        device="cpu",
        timer=lambda fn: 1.0,
        output_dir=None,
        readings_dir=readings,
        markdown=True,
        command="hdgsa-kernels bench stub --markdown",
    )
    captured = capsys.readouterr()
    page = captured.out
    assert status == 0
    assert page.startswith("# Benchmarks\n")
    for field in ("- device: CPU ", "- versions: torch " + torch.__version__, "- commit: `", "- date: "):
        assert field in page, field
    assert "- command: `hdgsa-kernels bench stub --markdown`" in page
    assert page.count("\n## ") == 2
    assert "\n## stub_op\n" in page
    assert "\n## second_op\n" in page
    assert page.count("| case | % roof | hdgsa | hdgsa-direct | peer | absent |") == 2
    assert "| square 64 | - | **1** | 1 1.00x | 1 1.00x | - |" in page
    assert "Not timed: absent: skipped: stub peer not installed." in page
    assert "The stub is bound by nothing." in page.split("## second_op")[0]
    assert "Intro paragraph." in page.split("## stub_op")[0]
    assert "[1/8]" in captured.err  # progress lines go to stderr: stdout is the page only
    assert "[1/8]" not in page


def test_markdown_from_saved_records_keeps_the_readings_and_names_each_run(tmp_path, capsys):
    readings = tmp_path / "readings"
    readings.mkdir()
    (readings / "second_op.md").write_text("Regenerated with the next run.\n")
    assert _run(tmp_path, {"hdgsa": 1.0, "hdgsa-direct": 0.5, "peer": 2.0}, save_baseline=tmp_path) == 0
    capsys.readouterr()
    cases = [_stub_case(), _stub_case("second_op")]
    status = bench.render_records(
        [],
        list(tmp_path.glob("stub_op-*.json")),
        markdown=True,
        readings_dir=readings,
        rendered_by="hdgsa-kernels bench --markdown --from-json x.json",
        cases=cases,
    )
    page = capsys.readouterr().out
    assert status == 0
    assert "- command: `hdgsa-kernels bench stub`" in page  # the command that measured the figures
    assert "Rendered from the saved records with `hdgsa-kernels bench --markdown --from-json x.json`" in page
    assert "| square 64 | - | **1** | 0.5 0.50x | 2 2.00x | - |" in page
    second = page.split("## second_op")[1]
    assert "No figures in this run." in second
    assert "Regenerated with the next run." in second


def test_host_time_and_profile_run_on_a_stub_case(tmp_path, capsys):
    status = _run(tmp_path, {"hdgsa": 1.0, "hdgsa-direct": 0.5, "peer": 2.0}, host_time=True, profile=3)
    out = capsys.readouterr().out
    assert status == 0
    record = json.loads(next((tmp_path / "runs").glob("bench-*.json")).read_text())
    ours = next(row for row in record["results"] if row["provider"] == "hdgsa")
    assert 0 < ours["host_ms"] < 1000
    assert 1 <= len(ours["top_kernels"]) <= 3
    names = [name for name, _ in ours["top_kernels"]]
    assert any("mm" in name for name in names), names  # the CPU profile of x @ x
    assert "host ms" in out
    assert "top kernels, ms per call" in out


def test_host_ms_measures_the_call_not_what_follows():
    slept = []

    def call():
        slept.append(time.sleep(0.002))

    assert 1.5 < bench.host_ms(call, calls=5, device="cpu") < 100
    assert len(slept) == 5
    slept.clear()  # a slow call stops at the time budget, after at least min_calls calls
    assert 1.5 < bench.host_ms(call, calls=1000, device="cpu", budget_ms=1.0, min_calls=3) < 100
    assert len(slept) == 3


def test_bench_help_is_plain_words(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    text = capsys.readouterr().out
    assert "``" not in text
    for option in ("--warmup-ms", "--rep-ms", "--host-time", "--profile", "--markdown", "--compare"):
        assert option in text
    parser_help = cli.build_parser().format_help()
    assert "``" not in parser_help


def test_bench_options_parse():
    args = cli.build_parser().parse_args(
        ["bench", "rmsnorm", "--host-time", "--profile", "--markdown", "--compare", "a.json", "b.json"]
    )
    assert (args.host_time, args.profile, args.markdown, args.compare) == (
        True,
        5,
        True,
        ["a.json", "b.json"],
    )
    assert cli.build_parser().parse_args(["bench", "--profile", "8"]).profile == 8
    assert cli.build_parser().parse_args(["bench"]).compare_threshold == 5.0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_check_cuda_without_gpu_is_one_line(capsys):
    assert cli.main(["check", "sinkhorn", "--device", "cuda"]) == 1
    captured = capsys.readouterr()
    assert captured.err.strip() == "hdgsa-kernels check: --device cuda needs a CUDA GPU (none found)"
    assert "Traceback" not in captured.out + captured.err


def test_info_warns_on_a_bogus_backend(monkeypatch, capsys):
    monkeypatch.setenv("HDGSA_BACKEND", "cuda-please")
    assert cli.main(["info"]) == 0
    err = capsys.readouterr().err
    assert "HDGSA_BACKEND='cuda-please' is not a backend name" in err
    monkeypatch.setenv("HDGSA_BACKEND", "torch")
    assert cli.main(["info"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_info_says_why_fla_is_unusable(monkeypatch, capsys):
    caps = sys.modules["hdgsa_core.capabilities"]  # the module (the package exports a function of that name)

    monkeypatch.setattr(caps, "HAS_FLA", False)
    monkeypatch.setattr(caps, "FLA_VERSION", "0.5.0")
    monkeypatch.setattr(caps, "HAS_TRITON", True)
    monkeypatch.setattr(caps, "_module_present", lambda name: True)
    assert cli.main(["info"]) == 0
    assert "HAS_FLA is False: fla-core 0.5.0 is older than 0.6" in capsys.readouterr().out
    monkeypatch.setattr(caps, "HAS_TRITON", False)
    assert (
        caps.fla_unusable_reason()
        == "fla-core 0.5.0 is installed but Triton is not (fla's kernels are Triton kernels)"
    )
    monkeypatch.setattr(caps, "FLA_VERSION", None)
    assert caps.fla_unusable_reason() is None  # not installed: nothing to explain


def test_compare_notes_a_baseline_from_another_card(tmp_path, capsys):
    baseline = _baseline(tmp_path, _BASELINE_MS)
    record = json.loads(baseline.read_text())
    baseline.write_text(json.dumps({**record, "device": "NVIDIA H100 80GB HBM3"}))
    assert _run(tmp_path, _BASELINE_MS, compare=[baseline]) == 0
    assert "was measured on NVIDIA H100 80GB HBM3, this run on CPU " in capsys.readouterr().out


def test_bench_on_cpu_says_when_an_op_has_no_cpu_case(tmp_path, capsys):
    assert cli.main(["bench", "rmsnorm", "--device", "cpu", "--output-dir", str(tmp_path)]) == 1
    assert "no benchmark case of rmsnorm runs on cpu" in capsys.readouterr().err
