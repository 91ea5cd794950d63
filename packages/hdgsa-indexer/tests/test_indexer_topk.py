"""indexer_topk: selection against torch.topk / a stable sort of gated_indexer's scores."""

from __future__ import annotations

import inspect

import pytest
import torch

from hdgsa_core import HAS_CUDA, runnable_backends
from hdgsa_core.testing import make_tensor, must_not_run, strided_rows
from hdgsa_indexer import gated_indexer, indexer_topk
from hdgsa_indexer.reference import (
    DEFAULT_WORKSPACE_BYTES,
    chunk_sizes,
    gated_indexer_reference,
    indexer_topk_reference,
)

DEVICES = [torch.device("cpu")] + ([torch.device("cuda")] if HAS_CUDA else [])
DEVICE_BACKENDS = [
    pytest.param(device, backend, id=f"{device.type}-{backend}")
    for device in DEVICES
    for backend in runnable_backends(device)
]


def make_inputs(B, Tq, Tkv, H, d, dtype=torch.float32, device="cpu", seed=0):
    q = make_tensor(B, Tq, H, d, dtype=dtype, device=device, seed=seed)
    k = make_tensor(B, Tkv, d, dtype=dtype, device=device, seed=seed + 1)
    w = make_tensor(B, Tq, H, dtype=dtype, device=device, seed=seed + 2)
    bias = make_tensor(H, dtype=dtype, device=device, seed=seed + 3, scale=0.5)
    return q, k, w, bias


def valid_counts(Tq, Tkv, causal, q_offset):
    return [min(max(t + q_offset + 1, 0), Tkv) if causal else Tkv for t in range(Tq)]


def oracle(scores, topk, sink_size, causal, q_offset):
    """Stable-sort selection per row (Python loops; small shapes only): sinks first in key
    order, then descending score with ties to the lower index, then -1 / -inf."""
    B, Tq, Tkv = scores.shape
    indices = torch.full((B, Tq, topk), -1, dtype=torch.int64)
    values = torch.full((B, Tq, topk), float("-inf"), dtype=torch.float64)
    scores = scores.detach().double().cpu()
    for b in range(B):
        for t, count in enumerate(valid_counts(Tq, Tkv, causal, q_offset)):
            sinks = list(range(min(sink_size, count)))
            rest = sorted(range(len(sinks), count), key=lambda s, row=scores[b, t]: (-row[s].item(), s))
            chosen = (sinks + rest)[:topk]
            indices[b, t, : len(chosen)] = torch.tensor(chosen, dtype=torch.int64)
            values[b, t, : len(chosen)] = scores[b, t, chosen]
    return indices, values


def assert_topk_of(indices, values, reference, topk, sink_size, causal, q_offset, atol=1e-5):
    """``(indices, values)`` is a valid top-k of ``reference`` (float32 scores from another
    computation, so near-ties may order differently): right padding, sinks first, each value
    the reference score of its index, and the values torch.topk gives."""
    B, Tq, Tkv = reference.shape
    assert indices.dtype == torch.int32
    assert values.dtype == torch.float32
    assert indices.shape == values.shape == (B, Tq, topk)
    indices, values, reference = indices.cpu().long(), values.cpu(), reference.cpu().float()
    for b in range(B):
        for t, count in enumerate(valid_counts(Tq, Tkv, causal, q_offset)):
            where = f"row b={b} t={t} (valid keys {count})"
            n = min(topk, count)
            sinks = min(sink_size, count)
            assert (indices[b, t, n:] == -1).all(), where
            assert torch.isneginf(values[b, t, n:]).all(), where
            chosen = indices[b, t, :n]
            assert chosen[:sinks].tolist() == list(range(sinks)), where
            assert len(set(chosen.tolist())) == n, where
            assert ((chosen >= 0) & (chosen < count)).all(), where
            torch.testing.assert_close(values[b, t, :n], reference[b, t, chosen], rtol=0, atol=atol)
            rest_values = values[b, t, sinks:n]
            # Exactly non-increasing, and ties ordered by key index.
            assert (rest_values[:-1] >= rest_values[1:]).all(), where
            rest = chosen[sinks:]
            tied = rest_values[:-1] == rest_values[1:]
            assert (rest[:-1][tied] < rest[1:][tied]).all(), where
            expected = torch.topk(reference[b, t, sinks:count], n - sinks).values
            torch.testing.assert_close(rest_values, expected, rtol=0, atol=atol)


# (B, Tq, Tkv, H, d, causal, q_offset, topk, sink_size)
CASES = [
    pytest.param(1, 1, 1, 1, 1, True, 0, 1, 0, id="T1"),
    pytest.param(2, 23, 23, 3, 10, True, 0, 5, 0, id="causal-k5"),
    pytest.param(2, 23, 23, 3, 10, False, 0, 5, 0, id="noncausal-k5"),
    pytest.param(1, 19, 19, 4, 12, True, 0, 8, 2, id="causal-sink2"),
    pytest.param(1, 19, 19, 4, 12, False, 0, 8, 8, id="noncausal-sink-eq-topk"),
    pytest.param(2, 4, 29, 2, 16, True, 25, 7, 1, id="decode-Tq4-offset25"),
    pytest.param(1, 1, 37, 4, 8, True, 36, 6, 0, id="decode-Tq1"),
    pytest.param(1, 13, 13, 2, 6, True, 0, 13, 0, id="topk-eq-T"),
    pytest.param(2, 9, 6, 3, 5, False, 0, 11, 3, id="topk-gt-Tkv"),
    pytest.param(1, 11, 11, 2, 7, True, 0, 20, 4, id="topk-gt-T-causal-sinks"),
    pytest.param(1, 8, 5, 2, 4, True, -3, 3, 1, id="negative-offset"),
]
CASE_ARGS = ("B", "Tq", "Tkv", "H", "d", "causal", "q_offset", "topk", "sink_size")


@pytest.mark.parametrize(("device", "backend"), DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize(CASE_ARGS, CASES)
def test_matches_topk_of_gated_indexer(
    device, backend, dtype, B, Tq, Tkv, H, d, causal, q_offset, topk, sink_size
):
    inputs = make_inputs(B, Tq, Tkv, H, d, dtype, device)
    scale = d**-0.5
    indices, values = indexer_topk(
        *inputs, topk, scale, causal, q_offset=q_offset, sink_size=sink_size, backend=backend
    )
    reference = gated_indexer(*inputs, scale, causal, q_offset=q_offset, backend=backend)
    assert_topk_of(indices, values, reference, topk, sink_size, causal, q_offset)
    if sink_size == 0 and topk <= Tkv and not causal:
        # Every row has >= topk valid keys: compare with torch.topk directly.
        expected = torch.topk(reference, topk, dim=-1)
        torch.testing.assert_close(values, expected.values, rtol=0, atol=1e-5)


@pytest.mark.parametrize(("device", "backend"), DEVICE_BACKENDS)
@pytest.mark.parametrize(CASE_ARGS, CASES)
def test_stats_against_float64(device, backend, B, Tq, Tkv, H, d, causal, q_offset, topk, sink_size):
    inputs = make_inputs(B, Tq, Tkv, H, d, torch.float32, device, seed=3)
    scale = d**-0.5
    indices, values, mean, var = indexer_topk(
        *inputs,
        topk,
        scale,
        causal,
        q_offset=q_offset,
        sink_size=sink_size,
        return_stats=True,
        backend=backend,
    )
    assert mean.dtype == var.dtype == torch.float32
    assert mean.shape == var.shape == (B, Tq)
    scores64 = gated_indexer_reference(*(t.double() for t in inputs), scale, causal, q_offset).cpu()
    expected_mean = torch.zeros(B, Tq, dtype=torch.float64)
    expected_var = torch.zeros(B, Tq, dtype=torch.float64)
    for t, count in enumerate(valid_counts(Tq, Tkv, causal, q_offset)):
        if count:
            row = scores64[:, t, :count]
            expected_mean[:, t] = row.mean(-1)
            expected_var[:, t] = row.var(-1, correction=0)
    torch.testing.assert_close(mean.cpu().double(), expected_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(var.cpu().double(), expected_var, rtol=1e-4, atol=1e-7)
    # Same selection as without stats.
    plain = indexer_topk(
        *inputs, topk, scale, causal, q_offset=q_offset, sink_size=sink_size, backend=backend
    )
    assert torch.equal(plain[0], indices)
    assert torch.equal(plain[1], values)


def tied_inputs(B, Tq, Tkv, H, d, device, seed=0):
    """Scores that are exact multiples of 1/4 with many ties: q, k in {0, 1} and scale 100 make
    every head logit 0 or >= 100 (sigmoid exactly 0.5 or 1, even in float64); gates w in {0, 100}."""
    generator = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 2, (B, Tq, H, d), generator=generator).float().to(device)
    k = torch.randint(0, 2, (B, Tkv, d), generator=generator).float().to(device)
    w = 100.0 * torch.randint(0, 2, (B, Tq, H), generator=generator).float().to(device)
    bias = torch.zeros(H, device=device)
    return q, k, w, bias


@pytest.mark.parametrize(("device", "backend"), DEVICE_BACKENDS)
@pytest.mark.parametrize(
    ("causal", "q_offset", "topk", "sink_size"),
    [(True, 0, 6, 0), (False, 0, 6, 0), (True, 0, 9, 2), (True, 20, 12, 1), (False, 0, 40, 3)],
    ids=["causal", "noncausal", "causal-sink2", "decode-sink1", "topk-gt-Tkv"],
)
def test_ties_go_to_the_lower_index(device, backend, causal, q_offset, topk, sink_size):
    B, Tq, Tkv, H, d = 2, 17, 37 if q_offset else 17, 3, 2
    inputs = tied_inputs(B, Tq, Tkv, H, d, device)
    reference = gated_indexer(*inputs, 100.0, causal, q_offset=q_offset, backend=backend)
    assert reference[torch.isfinite(reference)].unique().numel() <= 10  # quarters in [0.75, 3]: many ties
    expected_indices, expected_values = oracle(reference, topk, sink_size, causal, q_offset)
    reference64 = gated_indexer_reference(*(t.double() for t in inputs), 100.0, causal, q_offset)
    assert torch.equal(reference64, reference.double())  # the ties are exact, not rounding
    for query_chunk in (None, 1, 4):
        indices, values = indexer_topk_reference(
            *inputs, topk, 100.0, causal, q_offset, sink_size, query_chunk=query_chunk
        )
        assert torch.equal(indices.cpu().long(), expected_indices), query_chunk
        assert torch.equal(values.cpu().double(), expected_values), query_chunk
    indices, values = indexer_topk(
        *inputs, topk, 100.0, causal, q_offset=q_offset, sink_size=sink_size, backend=backend
    )
    assert torch.equal(indices.cpu().long(), expected_indices)
    assert torch.equal(values.cpu().double(), expected_values)


@pytest.mark.parametrize(("device", "backend"), DEVICE_BACKENDS)
def test_all_equal_scores_select_the_first_keys(device, backend):
    # q = 0 and bias = 0: every head logit is 0, sigmoid exactly 0.5, one score per row.
    q, bias = torch.zeros(1, 5, 2, 4, device=device), torch.zeros(2, device=device)
    k, w = make_inputs(1, 5, 9, 2, 4, device=device)[1:3]
    indices, values = indexer_topk(q, k, w, bias, 4, causal=False, backend=backend)
    assert indices.tolist() == [[[0, 1, 2, 3]] * 5]
    assert (values == values[..., :1]).all()


@pytest.mark.parametrize(
    ("query_chunk", "workspace_bytes"),
    [(1, None), (3, None), (7, None), (None, 1), (None, 4000)],
    ids=["chunk1", "chunk3", "chunk7", "one-row-workspace", "small-workspace"],
)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_chunking_does_not_change_the_selection(query_chunk, workspace_bytes, causal):
    B, Tq, Tkv, H, d = 3, 16, 21, 2, 8
    inputs = make_inputs(B, Tq, Tkv, H, d, seed=7)
    options = dict(topk=6, scale=0.4, causal=causal, q_offset=5, sink_size=1, return_stats=True)
    chunked = indexer_topk_reference(
        *inputs,
        **options,
        workspace_bytes=workspace_bytes or DEFAULT_WORKSPACE_BYTES,
        query_chunk=query_chunk,
    )
    whole = indexer_topk_reference(*inputs, **options, query_chunk=Tq)
    reference = gated_indexer(*inputs, 0.4, causal, q_offset=5)
    assert_topk_of(chunked[0], chunked[1], reference, 6, 1, causal, 5)
    torch.testing.assert_close(chunked[1], whole[1], rtol=0, atol=1e-6)
    torch.testing.assert_close(chunked[2], whole[2], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(chunked[3], whole[3], rtol=1e-5, atol=1e-7)


def test_chunk_sizes_respect_the_workspace():
    per_row = 1000 * (4 * 4 + 32)
    assert chunk_sizes(2, 1000, 4, workspace_bytes=per_row * 10) == (2, 5)
    assert chunk_sizes(8, 1000, 4, workspace_bytes=per_row * 3) == (3, 1)
    assert chunk_sizes(8, 1000, 4, workspace_bytes=1) == (1, 1)
    batch_chunk, query_chunk = chunk_sizes(1, 8192, 4)
    assert batch_chunk * query_chunk * 8192 * (4 * 4 + 32) <= DEFAULT_WORKSPACE_BYTES
    assert query_chunk >= 512  # large enough to keep a GPU busy


@pytest.mark.parametrize(("device", "backend"), DEVICE_BACKENDS)
def test_queries_without_valid_keys(device, backend):
    # q_offset=-3: queries 0..2 see no key; Tkv=0: no query does.
    inputs = make_inputs(1, 6, 4, 2, 3, device=device)
    indices, values, mean, var = indexer_topk(
        *inputs, 3, q_offset=-3, sink_size=1, return_stats=True, backend=backend
    )
    assert (indices[0, :3] == -1).all()
    assert torch.isneginf(values[0, :3]).all()
    assert (mean[0, :3] == 0).all()
    assert (var[0, :3] == 0).all()
    assert indices[0, 3].tolist() == [0, -1, -1]
    assert var[0, 3] == 0  # one valid key
    empty_keys = make_inputs(2, 3, 0, 2, 3, device=device)
    indices, values, mean, var = indexer_topk(*empty_keys, 2, return_stats=True, backend=backend)
    assert indices.shape == (2, 3, 2)
    assert (indices == -1).all()
    assert torch.isneginf(values).all()
    assert (mean == 0).all()
    assert (var == 0).all()


@pytest.mark.parametrize(("device", "backend"), DEVICE_BACKENDS)
@pytest.mark.parametrize(("B", "Tq"), [(0, 3), (2, 0)], ids=["B0", "Tq0"])
def test_empty_batch_or_queries(device, backend, B, Tq):
    outputs = indexer_topk(*make_inputs(B, Tq, 5, 2, 3, device=device), 4, return_stats=True, backend=backend)
    assert [tuple(t.shape) for t in outputs] == [(B, Tq, 4), (B, Tq, 4), (B, Tq), (B, Tq)]
    assert [t.dtype for t in outputs] == [torch.int32, torch.float32, torch.float32, torch.float32]


@pytest.mark.parametrize(("device", "backend"), DEVICE_BACKENDS)
def test_non_contiguous_inputs(device, backend):
    q, k, w, bias = make_inputs(2, 14, 14, 3, 9, device=device)
    views = (
        q.transpose(1, 2).contiguous().transpose(1, 2),
        strided_rows(k),
        w.transpose(1, 2).contiguous().transpose(1, 2),
        torch.stack([bias, bias], dim=-1)[:, 1],
    )
    assert not any(t.is_contiguous() for t in views)
    got = indexer_topk(*views, 5, 0.3, sink_size=1, return_stats=True, backend=backend)
    expected = indexer_topk(q, k, w, bias, 5, 0.3, sink_size=1, return_stats=True, backend=backend)
    assert torch.equal(got[0], expected[0])
    for actual, wanted in zip(got[1:], expected[1:], strict=True):
        torch.testing.assert_close(actual, wanted, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("device", "backend"), DEVICE_BACKENDS)
def test_deterministic_pure_and_not_differentiable(device, backend):
    inputs = [t.requires_grad_() for t in make_inputs(2, 21, 21, 4, 16, torch.bfloat16, device)]
    before = [t.detach().clone() for t in inputs]
    first = indexer_topk(*inputs, 7, 0.25, sink_size=2, return_stats=True, backend=backend)
    second = indexer_topk(*inputs, 7, 0.25, sink_size=2, return_stats=True, backend=backend)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
        assert not a.requires_grad
    for original, tensor in zip(before, inputs, strict=True):
        assert torch.equal(original, tensor)


def test_torch_compile_fullgraph():
    inputs = make_inputs(1, 12, 12, 2, 8)
    compiled = torch.compile(
        lambda q, k, w, b: indexer_topk(q, k, w, b, 4, 0.5, sink_size=1, return_stats=True),
        backend="aot_eager",
        fullgraph=True,
    )
    got = compiled(*inputs)
    expected = indexer_topk(*inputs, 4, 0.5, sink_size=1, return_stats=True)
    for actual, wanted in zip(got, expected, strict=True):
        torch.testing.assert_close(actual, wanted)


def test_backend_choice(monkeypatch):
    inputs = make_inputs(1, 4, 4, 2, 8)
    backends = runnable_backends(torch.device("cpu"))
    expected = {name: indexer_topk(*inputs, 2, backend=name) for name in backends}
    auto = "triton" if "triton" in expected else "torch"
    assert all(torch.equal(a, b) for a, b in zip(indexer_topk(*inputs, 2), expected[auto], strict=True))
    with pytest.raises(ValueError, match="backend"):
        indexer_topk(*inputs, 2, backend="fla")
    if "triton" not in expected:
        with pytest.raises(RuntimeError, match="cannot run here"):
            indexer_topk(*inputs, 2, backend="triton")
    monkeypatch.setenv("HDGSA_BACKEND", "torch")
    assert all(torch.equal(a, b) for a, b in zip(indexer_topk(*inputs, 2), expected["torch"], strict=True))


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"topk": 0}, ValueError, r"topk must be >= 1, got 0"),
        ({"topk": -2}, ValueError, r"topk must be >= 1"),
        ({"topk": 2.0}, TypeError, r"topk must be an int"),
        ({"topk": True}, TypeError, r"topk must be an int"),
        ({"topk": 3, "sink_size": -1}, ValueError, r"sink_size must be in \[0, topk=3\], got -1"),
        ({"topk": 3, "sink_size": 4}, ValueError, r"sink_size must be in \[0, topk=3\], got 4"),
        ({"topk": 3, "sink_size": 1.0}, TypeError, r"sink_size must be an int"),
        ({"topk": 3, "return_stats": 1}, TypeError, r"return_stats must be a bool"),
        ({"topk": 3, "q_offset": None}, TypeError, r"q_offset must be an int"),
        ({"topk": 3, "scale": None}, TypeError, r"scale must be a real number"),
    ],
    ids=[
        "topk0", "topk-negative", "topk-float", "topk-bool", "sink-negative", "sink-gt-topk",
        "sink-float", "stats-int", "offset-none", "scale-none",
    ],
)  # fmt: skip
def test_bad_options(kwargs, error, pattern, monkeypatch):
    monkeypatch.setattr("hdgsa_indexer.api.indexer_topk_reference", must_not_run)
    with pytest.raises(error, match=pattern):
        indexer_topk(*make_inputs(1, 3, 3, 2, 4), **kwargs)


@pytest.mark.parametrize(
    ("change", "error", "pattern"),
    [
        (lambda q, k, w, b: (q[:, :, 0], k, w, b), ValueError, r"q: expected shape \[B, Tq, H, d\]"),
        (lambda q, k, w, b: (q, k[..., :2], w, b), ValueError, r"k: expected shape .*got shape \[2, 6, 2\]"),
        (lambda q, k, w, b: (q, k, w[:, :, :1], b), ValueError, r"w: expected shape .*got shape \[2, 5, 1\]"),
        (lambda q, k, w, b: (q, k, w, b[:1]), ValueError, r"bias: expected shape .*got shape \[1\]"),
        (lambda q, k, w, b: (q.to(torch.int64), k, w, b), TypeError, r"q: dtype int64"),
        (lambda q, k, w, b: (q, k, w, b.to("meta")), ValueError, r"one device"),
    ],
    ids=["q-rank", "k-dim", "w-heads", "bias-heads", "q-int", "device"],
)
def test_bad_inputs(change, error, pattern, monkeypatch):
    monkeypatch.setattr("hdgsa_indexer.api.indexer_topk_reference", must_not_run)
    inputs = change(*make_inputs(2, 5, 6, 3, 4))
    with pytest.raises(error, match=pattern):
        indexer_topk(*inputs, 2)


@pytest.mark.skipif(not HAS_CUDA, reason="measures CUDA memory")
def test_never_builds_the_score_matrix_on_cuda():
    B, T, H, d, topk = 1, 4096, 2, 16, 64
    q, k, w, bias = make_inputs(B, T, T, H, d, device="cuda")
    matrix_bytes = B * T * T * 4
    workspace = matrix_bytes // 8
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    indexer_topk_reference(q, k, w, bias, topk, workspace_bytes=workspace, return_stats=True)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - start
    assert extra < matrix_bytes // 2, (extra, matrix_bytes)


def test_signature():
    kinds = inspect.Parameter
    expected = [
        ("q", kinds.POSITIONAL_OR_KEYWORD, kinds.empty),
        ("k", kinds.POSITIONAL_OR_KEYWORD, kinds.empty),
        ("w", kinds.POSITIONAL_OR_KEYWORD, kinds.empty),
        ("bias", kinds.POSITIONAL_OR_KEYWORD, kinds.empty),
        ("topk", kinds.POSITIONAL_OR_KEYWORD, kinds.empty),
        ("scale", kinds.POSITIONAL_OR_KEYWORD, 1.0),
        ("causal", kinds.POSITIONAL_OR_KEYWORD, True),
        ("q_offset", kinds.KEYWORD_ONLY, 0),
        ("sink_size", kinds.KEYWORD_ONLY, 0),
        ("return_stats", kinds.KEYWORD_ONLY, False),
        ("backend", kinds.KEYWORD_ONLY, "auto"),
    ]
    parameters = inspect.signature(indexer_topk).parameters.values()
    assert [(p.name, p.kind, p.default) for p in parameters] == expected


@pytest.mark.parametrize(("device", "backend"), DEVICE_BACKENDS)
def test_autocast_does_not_change_the_selection(device, backend):
    # Under torch.autocast the scores must still be float32 math: same selection, same bits.
    inputs = make_inputs(2, 15, 15, 3, 16, device=device, seed=5)
    options = dict(topk=6, scale=0.25, sink_size=1, return_stats=True, backend=backend)
    expected = indexer_topk(*inputs, **options)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        got = indexer_topk(*inputs, **options)
    for actual, wanted in zip(got, expected, strict=True):
        assert actual.dtype == wanted.dtype
        assert torch.equal(actual, wanted)


@pytest.mark.skipif(not HAS_CUDA, reason="host syncs are a CUDA matter")
def test_no_host_sync_on_cuda():
    inputs = make_inputs(2, 33, 40, 4, 16, torch.bfloat16, "cuda")
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")  # any host sync raises
    try:
        indexer_topk(*inputs, 8, 0.25, q_offset=7, sink_size=2, return_stats=True)
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def _exact_topk_of(scores, topk, sink_size, causal, q_offset):
    """torch.topk over the float32 scores with the documented order, via distinct int64 keys."""
    from hdgsa_indexer.reference import _select_topk, valid_key_counts

    _, Tq, Tkv = scores.shape
    counts = valid_key_counts(Tq, Tkv, causal, q_offset, scores.device)
    return _select_topk(scores, topk, sink_size, counts)


TRITON_DEVICES = [d for d in DEVICES if "triton" in runnable_backends(d)]


# The fused kernel's paths: one program per query block ("block": threshold counts, then the
# collection; "block-nocount": no counts, so the buffers overflow and compact as the threshold
# rises; "block-fine": always the fine count) and the split passes ("split": 64-key chunks;
# "split-chunks": one query block per workspace chunk).
MODES = {
    "block": {"split": False},
    "block-nocount": {"split": False, "count": False},
    "block-fine": {"split": False, "fine_limit": 0},
    "split": {"split": True, "key_chunk": 64},
    "split-chunks": {"split": True, "key_chunk": 128, "workspace_bytes": 1},
}
# On a GPU every mode compiles its kernels for every shape: there, the default and the split
# path (the default's compaction fallback runs on the inputs that defeat the thresholds).
GPU_MODES = ("block", "split")


def _mode_cases(device_modes):
    return [
        pytest.param(device, mode, id=f"{device.type}-{mode}")
        for device in TRITON_DEVICES
        for mode in device_modes(device)
    ]


TRITON_MODES = _mode_cases(lambda device: GPU_MODES if device.type == "cuda" else list(MODES))


def _fused_topk(q, k, w, bias, topk, scale, causal, q_offset, sink_size, mode, **options):
    from hdgsa_indexer._triton_topk import indexer_topk_fwd

    options = {**MODES[mode], **options}
    return indexer_topk_fwd(q, k, w, bias, topk, scale, causal, q_offset, sink_size, True, **options)


@pytest.mark.parametrize(("device", "mode"), TRITON_MODES)
@pytest.mark.parametrize(
    ("B", "Tq", "Tkv", "H", "d", "causal", "q_offset", "topk", "sink_size", "dtype"),
    [
        pytest.param(2, 70, 70, 3, 16, True, 0, 5, 0, torch.float32, id="causal"),
        pytest.param(1, 37, 150, 4, 32, True, 113, 9, 2, torch.bfloat16, id="decode-offset-sinks"),
        pytest.param(1, 40, 200, 2, 16, False, 0, 3, 1, torch.float16, id="noncausal"),
        pytest.param(1, 130, 130, 2, 16, True, 0, 70, 2, torch.float32, id="k70"),
        pytest.param(1, 9, 6, 2, 5, False, 0, 11, 3, torch.float32, id="topk-gt-Tkv"),
        pytest.param(1, 8, 5, 2, 4, True, -3, 3, 1, torch.float32, id="negative-offset"),
    ],
)
def test_triton_topk_is_exactly_torch_topk_of_its_scores(
    device, mode, B, Tq, Tkv, H, d, causal, q_offset, topk, sink_size, dtype
):
    # Every path of the fused kernel against torch.topk over the dense Triton scores (the same
    # score code): bitwise the same indices and scores, ties to the lower index.
    from hdgsa_indexer._triton_fwd import gated_indexer_fwd
    from hdgsa_indexer.reference import _row_stats, valid_key_counts

    q, k, w, bias = make_inputs(B, Tq, Tkv, H, d, dtype, device, seed=13)
    got = _fused_topk(q, k, w, bias, topk, 0.3, causal, q_offset, sink_size, mode)
    scores = gated_indexer_fwd(q, k, w, bias, 0.3, causal, q_offset)
    indices, values = _exact_topk_of(scores, topk, sink_size, causal, q_offset)
    assert torch.equal(got[0], indices)
    assert torch.equal(got[1], values)
    mean, var = _row_stats(scores.double(), valid_key_counts(Tq, Tkv, causal, q_offset, device))
    torch.testing.assert_close(got[2], mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[3], var, rtol=1e-4, atol=1e-6)
    if device.type == "cpu" and mode in ("block-nocount", "split"):  # the GPU's sorts: rows and network
        again = _fused_topk(q, k, w, bias, topk, 0.3, causal, q_offset, sink_size, mode, sort_rows=8)
        assert all(torch.equal(a, b) for a, b in zip(got, again, strict=True))


def _hard_inputs(device, kind):
    """Inputs whose scores defeat the score thresholds: ``"equal"``, every score of a row the
    same (q = 0); ``"ties"``, exact quarters with many ties; ``"low"``, the selected scores far
    below ``sum_h sigmoid(w_h) / 16`` (a large negative bias), where the coarse bins are empty."""
    B, Tq, Tkv, H, d = 2, 40, 200, 2, 8
    if kind == "ties":
        return tied_inputs(B, Tq, Tkv, H, d, device, seed=3), 100.0
    q, k, w, bias = make_inputs(B, Tq, Tkv, H, d, device=device, seed=17)
    if kind == "equal":
        q[0] = 0.0  # batch 0: one score per row; batch 1: random
    else:
        bias = torch.full_like(bias, -9.0)
    return (q, k, w, bias), 0.5


@pytest.mark.parametrize(
    ("device", "mode"),
    _mode_cases(lambda device: [m for m in (*GPU_MODES, "block") if device.type == "cpu" or m in GPU_MODES]),
)
@pytest.mark.parametrize(
    ("kind", "causal", "q_offset"), [("equal", False, 0), ("ties", True, 160), ("low", True, 160)]
)
def test_triton_topk_is_exact_when_thresholds_cannot_separate(device, mode, kind, causal, q_offset):
    # More keys than a row's buffer holds pass any score threshold: the buffers compact (block
    # paths) or the query blocks go to the exact fallback (split); still exactly the top-k.
    from hdgsa_indexer._triton_fwd import gated_indexer_fwd

    (q, k, w, bias), scale = _hard_inputs(device, kind)
    got = _fused_topk(q, k, w, bias, 5, scale, causal, q_offset, 1, mode)
    scores = gated_indexer_fwd(q, k, w, bias, scale, causal, q_offset)
    indices, values = _exact_topk_of(scores, 5, 1, causal, q_offset)
    assert torch.equal(got[0], indices)
    assert torch.equal(got[1], values)
    if kind == "equal":
        assert got[0][0].tolist() == [list(range(5))] * q.shape[1]


def _fill(q, k, w, bias, topk, scale, causal, mode):
    fill = torch.zeros(q.shape[0], q.shape[1], dtype=torch.int32, device=q.device)
    if MODES[mode]["split"]:
        fill = torch.zeros(1, dtype=torch.int32, device=q.device)
    _fused_topk(q, k, w, bias, topk, scale, causal, 0, 0, mode, fill=fill)
    return fill


@pytest.mark.parametrize("device", TRITON_DEVICES, ids=lambda d: d.type)
def test_triton_topk_thresholds_bound_the_candidates(device):
    # The diagnostics say which path ran: with the threshold counts, random scores leave each
    # row about topk + a fine bin of candidates and nothing compacts or falls back; without
    # them the buffers compact; with equal scores the split path hands blocks to the fallback.
    q, k, w, bias = make_inputs(1, 128, 400, 2, 8, device=device, seed=5)
    fill = _fill(q, k, w, bias, 8, 0.5, False, "block")
    assert (fill >> 16).max() == 0  # no compaction
    assert ((fill & 0xFFFF) >= 8).all()
    assert (fill & 0xFFFF).float().mean() < 40  # of 400 keys; the buffer holds 128
    fill = _fill(q, k, w, bias, 8, 0.5, False, "block-fine")
    assert (fill & 0xFFFF).max() <= 24
    assert ((_fill(q, k, w, bias, 8, 0.5, False, "block-nocount") >> 16) > 0).all()
    assert _fill(q, k, w, bias, 8, 0.5, False, "split").item() == 0
    (q, k, w, bias), scale = _hard_inputs(device, "equal")
    assert _fill(q, k, w, bias, 5, scale, False, "split").item() == 1  # batch 0's block
    (q, k, w, bias), scale = _hard_inputs(device, "low")
    fill = _fill(q, k, w, bias, 5, scale, False, "block")
    assert (fill >> 16).max() == 0  # the octave bins below S / 16 found a threshold


@pytest.mark.parametrize(("device", "mode"), TRITON_MODES)
def test_triton_topk_bitwise_repeat(device, mode):
    q, k, w, bias = make_inputs(2, 45, 45, 4, 16, torch.bfloat16, device, seed=21)
    runs = [
        _fused_topk(q, k, w, bias, 12, 0.25, True, 0, 1, mode)
        for _ in range(3 if device.type == "cpu" else 10)
    ]
    for run in runs[1:]:
        for a, b in zip(runs[0], run, strict=True):
            assert torch.equal(a, b)
    public = indexer_topk(q, k, w, bias, 12, 0.25, sink_size=1, return_stats=True, backend="triton")
    assert torch.equal(public[0], runs[0][0])
    assert torch.equal(public[1], runs[0][1])


@pytest.mark.parametrize("device", TRITON_DEVICES, ids=lambda d: d.type)
def test_opcheck(device):
    import hdgsa_indexer._triton  # noqa: F401  (registers the custom ops)

    q, k, w, bias = make_inputs(1, 6, 9, 2, 8, device=device)
    torch.library.opcheck(torch.ops.hdgsa.indexer_topk.default, (q, k, w, bias, 4, 0.5, True, 1, 1, True))


@pytest.mark.skipif(not HAS_CUDA, reason="measures CUDA memory")
def test_fused_topk_memory_is_outputs_plus_bounded_workspace_on_cuda():
    B, T, H, d, topk = 1, 8192, 4, 64, 512
    q, k, w, bias = make_inputs(B, T, T, H, d, torch.bfloat16, "cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    indexer_topk(q, k, w, bias, topk, d**-0.5, return_stats=True, backend="triton")
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - start
    outputs = B * T * topk * 8 + B * T * 8
    assert extra <= outputs + DEFAULT_WORKSPACE_BYTES, extra
    assert extra < 4 * B * T * T // 2  # far from the [B, T, T] float32 scores


@pytest.mark.skipif(not HAS_CUDA, reason="T = 131,072 needs a GPU")
@pytest.mark.parametrize("mode", ["block", "split"])
def test_triton_topk_at_t131072_on_cuda_is_exact_against_chunked_scores(mode):
    # The long-context case the kernel exists for (the [T, T] scores would be 64 GiB): three
    # 64-query chunks (first, middle, last) against torch.topk of their dense Triton scores,
    # bitwise; and bitwise the same on a second call.
    from hdgsa_indexer._triton_fwd import gated_indexer_fwd

    B, T, H, d, topk, sink_size = 1, 131072, 4, 64, 2048, 16
    q, k, w, bias = make_inputs(B, T, T, H, d, torch.bfloat16, "cuda", seed=21)
    scale = d**-0.5
    got = _fused_topk(q, k, w, bias, topk, scale, True, 0, sink_size, mode)
    for start in (0, T // 2, T - 64):
        rows = slice(start, start + 64)
        scores = gated_indexer_fwd(q[:, rows], k, w[:, rows], bias, scale, True, start)
        indices, values = _exact_topk_of(scores, topk, sink_size, True, start)
        assert torch.equal(got[0][:, rows], indices), start
        assert torch.equal(got[1][:, rows], values), start
    again = _fused_topk(q, k, w, bias, topk, scale, True, 0, sink_size, mode)
    assert all(torch.equal(a, b) for a, b in zip(got, again, strict=True))


@pytest.mark.parametrize("device", TRITON_DEVICES, ids=lambda d: d.type)
def test_split_path_refuses_triton_that_does_not_broadcast_atomics(device, monkeypatch):
    # Compiled Triton before 3.5 gives an atomic's result to one thread of a row only; the
    # split path places keys by it, so it must refuse (the interpreter runs atomics per element).
    from hdgsa_indexer import _triton_topk

    monkeypatch.setattr(_triton_topk, "TRITON_VERSION", "3.4.0")
    monkeypatch.setattr(_triton_topk, "interpreter_enabled", lambda: False)
    monkeypatch.setattr(_triton_topk, "_indexer_topk_pass_kernel", must_not_run)
    q, k, w, bias = make_inputs(1, 70, 70, 2, 16, device=device)
    with pytest.raises(RuntimeError, match=r"split path needs Triton >= 3\.5 \(installed: 3\.4\.0\)"):
        _fused_topk(q, k, w, bias, 5, 0.5, True, 0, 0, "split")


@pytest.mark.parametrize("device", TRITON_DEVICES, ids=lambda d: d.type)
def test_triton_topk_limit_is_a_clear_error(device, monkeypatch):
    from hdgsa_indexer import _triton_topk

    monkeypatch.setattr(_triton_topk, "MAX_KEEP", 64)
    q, k, w, bias = make_inputs(1, 3, 100, 2, 8, device=device)
    with pytest.raises(RuntimeError, match="backend='torch'"):
        indexer_topk(q, k, w, bias, 65, backend="triton")
    # topk past Tkv needs no more than Tkv candidates: still runs
    indices, _ = indexer_topk(q[:, :, :, :], k[:, :60], w, bias, 500, causal=False, backend="triton")
    assert indices.shape == (1, 3, 500)
    assert (indices[..., 60:] == -1).all()


@pytest.mark.parametrize("device", TRITON_DEVICES, ids=lambda d: d.type)
def test_triton_topk_limit_is_what_fits_an_h100(device, monkeypatch):
    # 8,192 candidates a row sort in 128 KiB of shared memory; 16,384 would need 256 KiB (an
    # H100 has 227): the larger sizes are refused before any kernel compiles.
    from hdgsa_indexer import _triton_topk

    monkeypatch.setattr(_triton_topk, "_indexer_topk_fwd_kernel", must_not_run)
    q, k, w, bias = make_inputs(1, 2, 8200, 1, 4, device=device)
    with pytest.raises(RuntimeError, match="at most 8192 candidates"):
        indexer_topk(q, k, w, bias, 8193, backend="triton")
