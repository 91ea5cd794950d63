"""Every indexer function gives the same result inside any autocast region as outside it
(both half dtypes, inputs of the other half dtype too), on every backend that runs here."""

from __future__ import annotations

import pytest
import torch

from hdgsa_core import runnable_backends
from hdgsa_core.testing import make_tensor
from hdgsa_indexer import gated_indexer, indexer_scores_at, indexer_topk

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
CASES = [(device, backend) for device in DEVICES for backend in runnable_backends(torch.device(device))]


def _all_outputs(q, k, w, bias, indices, backend):
    offset = k.shape[1] - q.shape[1]
    scores = gated_indexer(q, k, w, bias, 0.2, True, q_offset=offset, backend=backend)
    selection = indexer_topk(
        q, k, w, bias, 4, 0.2, True, q_offset=offset, sink_size=1, return_stats=True, backend=backend
    )
    at = indexer_scores_at(q, k, w, bias, indices, 0.2, backend=backend)
    return [scores, *selection, at]


@pytest.mark.parametrize(("device", "backend"), CASES)
@pytest.mark.parametrize(
    ("dtype", "autocast_dtype"),
    [(torch.float16, torch.bfloat16), (torch.bfloat16, torch.float16), (torch.float32, torch.bfloat16)],
    ids=["fp16-in-bf16", "bf16-in-fp16", "fp32-in-bf16"],
)
def test_autocast_changes_nothing(device, backend, dtype, autocast_dtype):
    batch, num_queries, num_keys, heads, dim = 2, 9, 13, 3, 24
    q = make_tensor(batch, num_queries, heads, dim, dtype=dtype, device=device, seed=1)
    k = make_tensor(batch, num_keys, dim, dtype=dtype, device=device, seed=2)
    w = make_tensor(batch, num_queries, heads, dtype=dtype, device=device, seed=3)
    bias = make_tensor(heads, device=device, seed=4)
    generator = torch.Generator().manual_seed(5)
    indices = torch.randint(-1, num_keys, (batch, num_queries, 5), generator=generator).to(device)
    expected = _all_outputs(q, k, w, bias, indices, backend)
    with torch.autocast(torch.device(device).type, dtype=autocast_dtype):
        inside = _all_outputs(q, k, w, bias, indices, backend)
    names = ["scores", "indices", "top scores", "mean", "var", "scores_at"]
    for name, got, want in zip(names, inside, expected, strict=True):
        assert got.dtype == want.dtype, name
        assert torch.equal(got, want), name
