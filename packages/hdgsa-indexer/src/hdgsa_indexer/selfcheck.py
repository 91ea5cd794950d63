"""``hdgsa-kernels check`` for the indexer: every runnable backend against float64, on small inputs.

:func:`self_check` runs :func:`gated_indexer` (scores and the gradients of ``q``, ``k``, ``w``,
``bias``), :func:`indexer_topk` (selected scores, the float64 scores of the selected keys,
mean and variance, and the exact tie rule on inputs built to tie) and
:func:`indexer_scores_at` (scores at random keys with empty slots, and the four gradients) on
each backend of ``runnable_backends(device)``, against float64 computations of the documented
formulas (``docs/api.md``).
"""

from __future__ import annotations

import torch

from hdgsa_core import runnable_backends
from hdgsa_core.registry import CheckResult, compare_outputs
from hdgsa_core.testing import DEFAULT_TOLERANCE, make_tensor

from .api import gated_indexer, indexer_scores_at, indexer_topk
from .reference import valid_key_counts

__all__ = ["self_check"]

# name: (B, Tq, Tkv, H, d, causal, q_offset, topk, sink_size, dtype)
_CASES: dict[str, tuple] = {
    "B2 T37 H3 d20 causal fp32": (2, 37, 37, 3, 20, True, 0, 8, 0, torch.float32),
    "B1 Tq5 Tkv29 H4 d16 decode sink2 bf16": (1, 5, 29, 4, 16, True, 24, 6, 2, torch.bfloat16),
    "B1 T19 H2 d9 noncausal k>T fp16": (1, 19, 19, 2, 9, False, 0, 23, 1, torch.float16),
}


def _scores64(q, k, w, bias, scale, causal, q_offset):
    """The score formula in float64, written out independently of reference.py."""
    logits = torch.einsum("bthd,bsd->bths", q, k) * scale + bias[:, None]
    scores = (torch.sigmoid(w)[..., None] * torch.sigmoid(logits)).sum(2)
    if causal:
        t = torch.arange(q.shape[1], device=q.device)[:, None]
        s = torch.arange(k.shape[1], device=q.device)[None, :]
        scores = scores.masked_fill(s > t + q_offset, float("-inf"))
    return scores


def _topk64(scores64, topk, sink_size, counts):
    """Selection by a stable descending sort: sinks (ranked +inf, so in key order), then
    scores with ties to the lower index; slots past the valid count are -1 / -inf."""
    batch, num_queries, num_keys = scores64.shape
    rank = scores64.clone()
    rank[..., :sink_size] = float("inf")
    taken = min(topk, num_keys)
    order = torch.sort(rank, dim=-1, descending=True, stable=True).indices[..., :taken]
    values = torch.gather(scores64, -1, order)
    empty = torch.arange(taken, device=scores64.device)[None, :] >= counts[:, None]
    order = order.masked_fill(empty, -1)
    values = values.masked_fill(empty, float("-inf"))
    pad = (batch, num_queries, topk - taken)
    return (
        torch.cat([order, order.new_full(pad, -1)], -1),
        torch.cat([values, values.new_full(pad, float("-inf"))], -1),
    )


def _gather_or_neginf(scores64, indices):
    """Float64 score of each selected key; -inf for an empty slot (index -1)."""
    indices = indices.long()
    picked = torch.gather(scores64, -1, indices.clamp(min=0))
    return picked.masked_fill(indices < 0, float("-inf"))


def _inputs(B, Tq, Tkv, H, d, dtype, device, requires_grad=False):
    q = make_tensor(B, Tq, H, d, dtype=dtype, device=device, seed=1, requires_grad=requires_grad)
    k = make_tensor(B, Tkv, d, dtype=dtype, device=device, seed=2, requires_grad=requires_grad)
    w = make_tensor(B, Tq, H, dtype=dtype, device=device, seed=3, requires_grad=requires_grad)
    bias = make_tensor(H, dtype=dtype, device=device, seed=4, scale=0.5, requires_grad=requires_grad)
    return q, k, w, bias


def _check_case(device, backend, case, B, Tq, Tkv, H, d, causal, q_offset, topk, sink_size, dtype):
    scale = d**-0.5
    inputs = _inputs(B, Tq, Tkv, H, d, dtype, device, requires_grad=True)
    inputs64 = [t.detach().double().requires_grad_() for t in inputs]
    grad_out = make_tensor(B, Tq, Tkv, device=device, seed=5)

    scores = gated_indexer(*inputs, scale, causal, q_offset=q_offset, backend=backend)
    grads = torch.autograd.grad(scores, inputs, grad_out)
    scores64 = _scores64(*inputs64, scale, causal, q_offset)
    grads64 = torch.autograd.grad(scores64, inputs64, grad_out.double())
    names = ("dq", "dk", "dw", "dbias")
    grad_tol = DEFAULT_TOLERANCE[dtype]
    results = compare_outputs(
        "gated_indexer",
        backend,
        case,
        {"scores": scores},
        {"scores": scores64},
        DEFAULT_TOLERANCE[torch.float32],
    )
    results += compare_outputs(
        "gated_indexer",
        backend,
        case,
        dict(zip(names, grads, strict=True)),
        dict(zip(names, grads64, strict=True)),
        grad_tol,
    )

    indices, top, mean, var = indexer_topk(
        *inputs,
        topk,
        scale,
        causal,
        q_offset=q_offset,
        sink_size=sink_size,
        return_stats=True,
        backend=backend,
    )
    scores64 = scores64.detach()
    counts = valid_key_counts(Tq, Tkv, causal, q_offset, device)
    _, top64 = _topk64(scores64, topk, sink_size, counts)
    valid = torch.arange(Tkv, device=device)[None, :] < counts[:, None]
    denominator = counts.clamp(min=1).double()
    mean64 = torch.where(valid, scores64, 0.0).sum(-1) / denominator
    var64 = torch.where(valid, scores64 - mean64[..., None], 0.0).square().sum(-1) / denominator
    results += compare_outputs(
        "indexer_topk",
        backend,
        case,
        # "selected": the float64 scores of the keys we chose, against the best float64 scores:
        # a near-tie chosen the other way costs only the tiny gap between the two.
        {"scores": top, "selected": _gather_or_neginf(scores64, indices), "mean": mean, "var": var},
        {"scores": top64, "selected": top64, "mean": mean64, "var": var64},
        DEFAULT_TOLERANCE[torch.float32],
    )
    return results


def _check_ties(device, backend):
    """Scores that are exact quarters: q, k in {0, 1}, scale 100, gates w in {0, 100} make every
    sigmoid exactly 0.5 or 1, even in float64. Many ties, which must go to the lower key index.
    Error = share of slots that differ."""
    generator = torch.Generator().manual_seed(11)
    B, Tq, Tkv, H, d, topk, sink_size = 2, 21, 21, 3, 2, 7, 1
    q = torch.randint(0, 2, (B, Tq, H, d), generator=generator).float().to(device)
    k = torch.randint(0, 2, (B, Tkv, d), generator=generator).float().to(device)
    w = 100.0 * torch.randint(0, 2, (B, Tq, H), generator=generator).float().to(device)
    bias = torch.zeros(H, device=device)
    indices, _ = indexer_topk(q, k, w, bias, topk, 100.0, True, sink_size=sink_size, backend=backend)
    scores64 = _scores64(q.double(), k.double(), w.double(), bias.double(), 100.0, True, 0)
    expected, _ = _topk64(scores64, topk, sink_size, valid_key_counts(Tq, Tkv, True, 0, device))
    mismatch = (indices.long() != expected).double().mean()
    return [CheckResult("indexer_topk", backend, "exact ties B2 T21 sink1", "tie rule", float(mismatch), 0.0)]


def _check_scores_at(device, backend, case, B, Tq, Tkv, H, d, dtype, num_slots):
    """Scores at random keys (about one slot in five empty) and their four gradients."""
    scale = d**-0.5
    inputs = _inputs(B, Tq, Tkv, H, d, dtype, device, requires_grad=True)
    inputs64 = [t.detach().double().requires_grad_() for t in inputs]
    generator = torch.Generator().manual_seed(6)
    indices = torch.randint(-Tkv // 4, Tkv, (B, Tq, num_slots), generator=generator).clamp(min=-1).to(device)
    grad_out = make_tensor(B, Tq, num_slots, device=device, seed=7)
    out = indexer_scores_at(*inputs, indices, scale, backend=backend)
    grads = torch.autograd.grad(out, inputs, grad_out)
    dense64 = _scores64(*inputs64, scale, False, 0)
    out64 = _gather_or_neginf(dense64, indices)
    grads64 = torch.autograd.grad(out64, inputs64, grad_out.double().masked_fill(indices < 0, 0.0))
    names = ("dq", "dk", "dw", "dbias")
    results = compare_outputs(
        "indexer_scores_at",
        backend,
        case,
        {"scores": out},
        {"scores": out64},
        DEFAULT_TOLERANCE[torch.float32],
    )
    results += compare_outputs(
        "indexer_scores_at",
        backend,
        case,
        dict(zip(names, grads, strict=True)),
        dict(zip(names, grads64, strict=True)),
        DEFAULT_TOLERANCE[dtype],
    )
    return results


# name: (B, Tq, Tkv, H, d, dtype, K)
_SCORES_AT_CASES: dict[str, tuple] = {
    "B2 Tq9 Tkv40 H3 d20 K13 fp32": (2, 9, 40, 3, 20, torch.float32, 13),
    "B1 Tq6 Tkv70 H4 d16 K70 bf16": (1, 6, 70, 4, 16, torch.bfloat16, 70),
}


def self_check(device: torch.device) -> list[CheckResult]:
    """Compare every backend that runs on ``device`` with float64, forward and backward."""
    device = torch.device(device)
    results: list[CheckResult] = []
    for backend in runnable_backends(device):
        for case, shape in _CASES.items():
            results += _check_case(device, backend, case, *shape)
        results += _check_ties(device, backend)
        for case, shape in _SCORES_AT_CASES.items():
            results += _check_scores_at(device, backend, case, *shape)
    return results
