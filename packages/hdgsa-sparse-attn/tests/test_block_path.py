"""The query-block path of the Triton backend against the float64 reference: the plan, the
forward (out, lse), both backward paths, bitwise determinism, and the path choice."""

from __future__ import annotations

import contextlib

import pytest
import torch

from hdgsa_core import runnable_backends
from hdgsa_core.testing import DEFAULT_TOLERANCE, assert_close, make_tensor
from hdgsa_sparse_attn.reference import sparse_attention_torch

DEVICES = [
    d
    for d in ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if "triton" in runnable_backends(torch.device(d))
]
pytestmark = pytest.mark.skipif(not DEVICES, reason="the Triton backend cannot run here")


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool):
    was_enabled = torch.are_deterministic_algorithms_enabled()
    was_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(enabled)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was_enabled, warn_only=was_warn_only)


def realistic_indices(
    batch: int,
    num_lists: int,
    seq_len: int,
    topk: int,
    *,
    window: int | None = None,
    sinks: int = 16,
    segment: int = 256,
    extra_hot: int = 256,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Causal index lists ``[B, Hi, T, K]`` with the structure of real top-k selections: a local
    window of ``K // 4`` keys ending at the query, ``sinks`` first keys, and the rest drawn (without
    repeats) from a pool of hot keys shared by the ``segment`` neighbouring queries (pool size:
    the remaining slots plus ``extra_hot``; keys before the segment's window). Keys after the
    query are ``-1`` (masked); early queries also repeat keys (counted twice)."""
    window = topk // 4 if window is None else window
    sinks = min(sinks, topk - window)
    rest = topk - window - sinks
    gen = torch.Generator(device=device).manual_seed(seed)
    t = torch.arange(seq_len, device=device)
    parts = [t[:, None] - torch.arange(window, device=device)[None, :]]
    parts.append(torch.arange(sinks, device=device)[None, :].expand(seq_len, sinks))
    base = torch.cat(parts, 1).expand(batch, num_lists, seq_len, window + sinks)
    if rest > 0:
        num_segments = -(-seq_len // segment)
        pool_size = rest + extra_hot
        starts = torch.arange(num_segments, device=device) * segment
        span = (starts - window).clamp(min=1).to(torch.float64)
        pool = (
            torch.rand(
                batch, num_lists, num_segments, pool_size, generator=gen, device=device, dtype=torch.float64
            )
            * span[:, None]
        ).long()
        pick = torch.rand(batch, num_lists, seq_len, pool_size, generator=gen, device=device).argsort(-1)[
            ..., :rest
        ]
        seg_of = (t // segment)[None, None, :, None].expand(batch, num_lists, seq_len, 1)
        pool_rows = torch.gather(pool, 2, seg_of.expand(batch, num_lists, seq_len, pool_size))
        hot = torch.gather(pool_rows, 3, pick)
        base = torch.cat([base, hot], -1)
    return torch.where(base <= t[None, None, :, None], base, -1).contiguous()


def random_indices(shape, num_keys: int, seed: int, low: int = -2) -> torch.Tensor:
    """Uniform random indices in [low, num_keys) with a repeated index on every row."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(low, num_keys, shape, generator=gen)
    if shape[-1] >= 2:
        idx[..., 0] = idx[..., 0].clamp(min=0)
        idx[..., 1] = idx[..., 0]
    return idx


def reference(q, k, v, indices, mask, scale):
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out, lse = sparse_attention_torch(q64, k64, v64, indices, mask, scale)
    return q64, k64, v64, out, lse


def run_block(q, k, v, indices, mask, scale, block_q):
    from hdgsa_sparse_attn._block_plan import build_block_plan
    from hdgsa_sparse_attn._triton_block import sparse_attention_block

    idx4 = indices.unsqueeze(1) if indices.dim() == 3 else indices
    mask4 = None if mask is None else (mask.unsqueeze(1) if mask.dim() == 3 else mask)
    plan = build_block_plan(idx4, mask4, k.shape[1], block_q)
    return sparse_attention_block(q, k, v, idx4, mask4, scale, plan=plan), plan


def check(q, k, v, indices, mask, *, block_q, deterministic=False, tol=None, grad_lse=True):
    scale = q.shape[-1] ** -0.5
    tol = DEFAULT_TOLERANCE[q.dtype] if tol is None else tol
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    (out, lse), _ = run_block(q, k, v, indices, mask, scale, block_q)
    q64, k64, v64, out64, lse64 = reference(q, k, v, indices, mask, scale)
    assert not out.isnan().any()
    assert not lse.isnan().any()
    assert_close("out", out, out64, tol)
    finite = torch.isfinite(lse64)
    assert torch.equal(torch.isfinite(lse), finite)
    assert_close("lse", lse[finite], lse64[finite], tol)
    grad_out = make_tensor(*out.shape, seed=7, dtype=q.dtype, device=q.device)
    g_lse = make_tensor(*lse.shape, seed=8, device=q.device) if grad_lse else None
    with deterministic_algorithms(deterministic):
        loss = (out.float() * grad_out.float()).sum() + (
            (lse.nan_to_num(0.0, 0.0, 0.0) * g_lse).sum() if grad_lse else 0
        )
        grads = torch.autograd.grad(loss, (q, k, v))
    loss64 = (out64 * grad_out.double()).sum()
    if grad_lse:
        loss64 = loss64 + (torch.where(finite, lse64, 0.0) * g_lse.double()).sum()
    grads64 = torch.autograd.grad(loss64, (q64, k64, v64))
    for name, g, g64 in zip("qkv", grads, grads64, strict=True):
        assert not g.isnan().any()
        assert_close(f"d{name}", g, g64, tol)
    return grads


def inputs(batch, seq_len, num_keys, hq, hkv, dim, dim_v, dtype, device, seed=0):
    q = make_tensor(batch, seq_len, hq, dim, dtype=dtype, device=device, seed=seed)
    k = make_tensor(batch, num_keys, hkv, dim, dtype=dtype, device=device, seed=seed + 1)
    v = make_tensor(batch, num_keys, hkv, dim_v, dtype=dtype, device=device, seed=seed + 2)
    return q, k, v


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sharing", ["per_kv", "shared3d"])
@pytest.mark.parametrize("group", [2, 4])
@pytest.mark.parametrize("deterministic", [False, True])
def test_block_path_random_lists(device, sharing, group, deterministic):
    """Negative, repeated and masked slots, an empty row, T != Tkv, odd K, Dv != D."""
    batch, seq_len, num_keys, hkv, topk = 2, 11, 23, 2, 7
    hq = hkv * group
    q, k, v = inputs(batch, seq_len, num_keys, hq, hkv, 32, 64, torch.float32, device)
    shape = (batch, hkv, seq_len, topk) if sharing == "per_kv" else (batch, seq_len, topk)
    indices = random_indices(shape, num_keys, seed=3).to(device)
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(4)) > 0.25
    mask[..., 3, :] = False  # an empty row
    check(q, k, v, indices, mask.to(device), block_q=4, deterministic=deterministic)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_path_realistic_lists(device, dtype):
    """Windows, sinks and hot keys (int32, no mask), several union tiles per block."""
    batch, seq_len, hq, hkv, topk = 1, 40, 4, 2, 24
    q, k, v = inputs(batch, seq_len, seq_len, hq, hkv, 64, 32, dtype, device, seed=5)
    indices = realistic_indices(batch, hkv, seq_len, topk, sinks=2, segment=8, extra_hot=4).to(
        device, torch.int32
    )
    check(q, k, v, indices, None, block_q=8, grad_lse=False)


@pytest.mark.parametrize("device", DEVICES)
def test_block_plan(device):
    """Unions are the sorted sets of valid keys; counts are slot multiplicities."""
    from hdgsa_sparse_attn._block_plan import build_block_plan

    batch, hi, seq_len, topk, num_keys, block_q = 1, 2, 9, 6, 70, 4
    indices = random_indices((batch, hi, seq_len, topk), num_keys + 3, seed=9).to(device)  # some >= Tkv
    indices[0, 0, 0, :3] = 65
    mask = (torch.rand(indices.shape, generator=torch.Generator().manual_seed(2)) > 0.2).to(device)
    mask[0, 0, 0, :3] = True
    plan = build_block_plan(indices, mask, num_keys, block_q)
    valid = (indices >= 0) & (indices < num_keys) & mask
    for b in range(batch):
        for i in range(hi):
            for n in range(plan.num_blocks):
                rows = slice(n * block_q, min(seq_len, (n + 1) * block_q))
                keys = torch.unique(indices[b, i, rows][valid[b, i, rows]])
                size = int(plan.union_size[b, i, n])
                assert size == keys.numel()
                assert int(plan.valid_slots[b, i, n]) == int(valid[b, i, rows].sum())
                assert torch.equal(plan.union[b, i, n, :size].long().cpu(), keys.cpu())
                assert (plan.union[b, i, n, size:] == -1).all()
                for t in range(rows.start, rows.stop):
                    for u, key in enumerate(keys.tolist()):
                        expected = int(((indices[b, i, t] == key) & valid[b, i, t]).sum())
                        assert int(plan.counts[b, i, t, u]) == expected
    assert int(plan.counts[0, 0, 0, (plan.union[0, 0, 0] == 65).nonzero()[0, 0]]) >= 3


@pytest.mark.parametrize("device", DEVICES)
def test_block_backward_bitwise_deterministic(device):
    batch, seq_len, hq, hkv, topk = 1, 24, 4, 2, 12
    q, k, v = inputs(batch, seq_len, seq_len, hq, hkv, 32, 32, torch.float32, device, seed=11)
    indices = realistic_indices(batch, hkv, seq_len, topk, sinks=2, segment=8, extra_hot=3, seed=1).to(device)
    grad_out = make_tensor(batch, seq_len, hq, 32, seed=12, device=device)
    results = []
    with deterministic_algorithms(True):
        for _ in range(2):
            qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
            (out, _), _ = run_block(qq, kk, vv, indices, None, 32**-0.5, 4)
            results.append([out, *torch.autograd.grad(out, (qq, kk, vv), grad_out)])
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_choose_path(device, monkeypatch):
    """Neighbouring queries sharing keys take the block path; uniform random lists, per-head
    lists and a threshold below the statistic take the per-query path; the statistic measured
    on a sample of the blocks decides the same way."""
    from hdgsa_sparse_attn import _block_plan
    from hdgsa_sparse_attn._block_plan import choose_path, plan_and_choose

    seq_len, topk, hq, hkv, keys = 64, 64, 4, 2, 1024
    local = realistic_indices(1, hkv, seq_len, topk, window=48, sinks=4, segment=32, extra_hot=4).to(device)
    assert choose_path(local, None, hkv, hq, keys) == "per-query"  # T * K below the size gate
    monkeypatch.setattr(_block_plan, "MIN_SLOTS_FOR_BLOCK", 0)
    spread = random_indices((1, hkv, seq_len, topk), keys, seed=1, low=0).to(device)
    path, plan = plan_and_choose(local, None, keys, hkv, hq, block_q=16)
    assert path == "block"
    assert plan is not None
    e = plan.expansion()
    assert e < _block_plan.EXPANSION_THRESHOLD_FORWARD
    assert choose_path(local[:, 0], None, hkv, hq, keys, block_q=16) == "block"  # [B, T, K]
    assert choose_path(spread, None, hkv, hq, keys, block_q=16) == "per-query"
    assert choose_path(local.repeat_interleave(2, 1), None, hkv, hq, keys) == "per-query"  # per-head lists
    assert choose_path(local, None, hkv, hq, keys, block_q=16, threshold=e * 0.99) == "per-query"
    assert choose_path(local, None, hkv, hq, keys, block_q=16, threshold=e * 1.01) == "block"
    # between the two thresholds: block path with a backward to follow, per-query for inference
    mixed = torch.where(
        torch.rand(local.shape, generator=torch.Generator().manual_seed(5)).to(device) < 0.1, spread, local
    )
    mixed_plan = plan_and_choose(mixed, None, keys, hkv, hq, block_q=16, threshold=float("inf"))[1]
    assert (
        _block_plan.EXPANSION_THRESHOLD_FORWARD
        < mixed_plan.expansion()
        < _block_plan.EXPANSION_THRESHOLD_TRAINING
    )
    assert choose_path(mixed, None, hkv, hq, keys, block_q=16) == "per-query"
    assert choose_path(mixed, None, hkv, hq, keys, block_q=16, needs_grad=True) == "block"
    monkeypatch.setattr(_block_plan, "SAMPLED_BLOCKS", 2)  # blocks 0 and 2 of 4
    assert choose_path(local, None, hkv, hq, keys, block_q=16) == "block"
    assert choose_path(spread, None, hkv, hq, keys, block_q=16) == "per-query"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("seq_len", "num_keys", "hq", "hkv", "dim", "dim_v", "block_q"),
    [(1, 5, 2, 2, 32, 32, 4), (13, 9, 2, 1, 128, 256, 8), (9, 40, 8, 2, 256, 64, 2)],
)
def test_block_path_shapes(device, seq_len, num_keys, hq, hkv, dim, dim_v, block_q):
    """T = 1, G = 1 (Hq = Hkv), wide head dims, non-contiguous q."""
    q, k, v = inputs(1, seq_len, num_keys, hq, hkv, dim, dim_v, torch.float32, device, seed=21)
    q = q.transpose(1, 2).contiguous().transpose(1, 2)  # strides [T * H * D, D, T * D, 1]
    indices = random_indices((1, hkv, seq_len, 5), num_keys, seed=22).to(device)
    check(q, k, v, indices, None, block_q=block_q)
    with deterministic_algorithms(True):
        check(q, k, v, indices, None, block_q=block_q, deterministic=True, grad_lse=False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("deterministic", [False, True])
def test_sparse_attention_dispatches_to_the_chosen_path(device, deterministic, monkeypatch):
    """sparse_attention runs the path that sparse_attention_path reports: the block path for
    lists shared by neighbouring queries (bitwise its direct call's output and gradients), the
    per-query path for uniform random lists, PyTorch for backend="torch"."""
    from hdgsa_sparse_attn import _block_plan, sparse_attention, sparse_attention_path
    from hdgsa_sparse_attn._triton_block import sparse_attention_block

    monkeypatch.setattr(_block_plan, "MIN_SLOTS_FOR_BLOCK", 0)
    seq_len, topk, hq, hkv, keys = 48, 32, 4, 2, 4096  # random lists over many keys barely overlap
    q, k, v = inputs(1, seq_len, keys, hq, hkv, 32, 16, torch.float32, device, seed=7)
    local = realistic_indices(1, hkv, seq_len, topk, window=24, sinks=2, segment=16, extra_hot=2).to(device)
    spread = random_indices((1, hkv, seq_len, topk), keys, seed=3, low=0).to(device)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    assert sparse_attention_path(q, k, v, local, needs_grad=True) == "block"
    assert sparse_attention_path(q, k, v, spread, needs_grad=True) == "per-query"
    assert sparse_attention_path(q, k, v, local, backend="torch") == "torch"
    with deterministic_algorithms(deterministic):
        out, lse = sparse_attention(*leaves, local, return_lse=True)
        direct = [t.clone().requires_grad_() for t in (q, k, v)]
        out_direct, lse_direct = sparse_attention_block(*direct, local, None, 32**-0.5)
        assert torch.equal(out, out_direct)
        assert torch.equal(lse, lse_direct)
        grad_out = make_tensor(*out.shape, device=device, seed=9)
        grads = torch.autograd.grad(out, leaves, grad_out)
        grads_direct = torch.autograd.grad(out_direct, direct, grad_out)
    names = ("dq", "dk", "dv")
    for name, grad, want in zip(names, grads, grads_direct, strict=True):
        if deterministic:
            assert torch.equal(grad, want), name
        else:  # float atomics: the order of the sums may differ
            torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-6)
    *_, expected, expected_lse = reference(q, k, v, local, None, 32**-0.5)
    assert_close("out", out, expected, DEFAULT_TOLERANCE[torch.float32])
    assert_close("lse", lse, expected_lse, DEFAULT_TOLERANCE[torch.float32])


@pytest.mark.parametrize("device", DEVICES)
def test_wide_heads_with_a_backward_take_the_per_query_path(device, monkeypatch):
    """Lists that would take the block path (G = 1, any statistic) take the per-query path at
    D = Dv = 256 when a backward follows (the block backward's tiles do not fit), and the call
    computes the right gradients; D = 128 keeps the block path."""
    from hdgsa_sparse_attn import _block_plan, sparse_attention, sparse_attention_path

    monkeypatch.setattr(_block_plan, "MIN_SLOTS_FOR_BLOCK", 0)
    monkeypatch.setattr(_block_plan, "EXPANSION_THRESHOLD_FORWARD", float("inf"))  # any lists
    monkeypatch.setattr(_block_plan, "EXPANSION_THRESHOLD_TRAINING", float("inf"))
    seq_len, topk, heads, keys = 40, 24, 2, 64
    local = realistic_indices(1, heads, seq_len, topk, window=16, sinks=2, segment=8, extra_hot=2).to(device)
    wide = inputs(1, seq_len, keys, heads, heads, 256, 256, torch.bfloat16, device, seed=31)
    narrow = inputs(1, seq_len, keys, heads, heads, 128, 128, torch.bfloat16, device, seed=31)
    assert sparse_attention_path(*narrow, local, needs_grad=True) == "block"
    assert sparse_attention_path(*wide, local, needs_grad=True) == "per-query"
    assert sparse_attention_path(*wide, local, needs_grad=False) == "block"
    q, k, v = (t.detach().requires_grad_() for t in wide)
    out = sparse_attention(q, k, v, local)
    grad_out = make_tensor(*out.shape, device=device, seed=32)
    grads = torch.autograd.grad(out, (q, k, v), grad_out.to(out.dtype))
    q64, k64, v64, expected, _ = reference(q, k, v, local, None, 256**-0.5)
    want = torch.autograd.grad(expected, (q64, k64, v64), grad_out.double())
    assert_close("out", out, expected, DEFAULT_TOLERANCE[torch.bfloat16])
    for name, grad, grad64 in zip(("dq", "dk", "dv"), grads, want, strict=True):
        assert_close(name, grad, grad64, DEFAULT_TOLERANCE[torch.bfloat16])
