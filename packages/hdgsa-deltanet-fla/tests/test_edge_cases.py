"""Edge cases of the torch backend of :func:`hdgsa_deltanet_fla.gated_delta_rule` found by
differential testing against float64: ill-conditioned chunks ((near-)parallel keys with beta near
1, where the chunk's triangular inverse must stay accurate), gradients summed over a head group
(HV > H) in half precision, sizes that are not a power of two, and autocast regions of either
half dtype."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hdgsa_core.testing import DEFAULT_TOLERANCE, assert_close, make_tensor
from hdgsa_deltanet_fla import gated_delta_rule
from hdgsa_deltanet_fla.reference import (
    ALPHA_MIN,
    _unit_lower_inverse,
    chunk_gated_delta_rule_torch,
    recurrent_gated_delta_rule_reference,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
HALF_DTYPES = (torch.float16, torch.bfloat16)
NAMES = ("q", "k", "v", "alpha", "beta")


def _max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``max |actual - expected| / max |expected|`` in float64."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    return ((actual - expected).abs().max() / expected.abs().max().clamp(min=1e-30)).item()


def _parallel_key_inputs(
    seq_len, head_dim_k, head_dim_v, *, heads=1, v_heads=1, noise=0.0, device="cpu", seed=0
):
    """Every key (nearly) the same unit vector, beta 0.99, alpha 1: ``I + A`` of each chunk is
    as far from the identity as the delta rule gets, while its inverse stays bounded by 1."""
    torch.manual_seed(seed)
    direction = F.normalize(torch.randn(head_dim_k, dtype=torch.float64), dim=0)
    k = direction.expand(1, seq_len, heads, head_dim_k) + noise * torch.randn(1, seq_len, heads, head_dim_k)
    k = F.normalize(k, dim=-1)
    q = torch.randn(1, seq_len, heads, head_dim_k, dtype=torch.float64)
    v = torch.randn(1, seq_len, v_heads, head_dim_v, dtype=torch.float64)
    alpha = torch.ones(1, seq_len, v_heads, dtype=torch.float64)
    beta = torch.full((1, seq_len, v_heads), 0.99, dtype=torch.float64)
    return [t.to(device=device, dtype=torch.float32) for t in (q, k, v, alpha, beta)]


def _run(inputs, grad_output=None, *, reference=False):
    """``o`` (and the gradients of ``sum(o * grad_output)``) of the torch backend, or of the
    float64 per-step recurrence with ``reference``."""
    leaves = [t.detach().clone().requires_grad_(grad_output is not None) for t in inputs]
    if reference:
        q, k, v, alpha, beta = (t.double() for t in leaves)
        scale = q.shape[-1] ** -0.5
        o, _ = recurrent_gated_delta_rule_reference(q, k, v, alpha.clamp(min=ALPHA_MIN).log(), beta, scale)
    else:
        o = gated_delta_rule(*leaves, backend="torch")
    if grad_output is None:
        return o.detach(), None
    grads = torch.autograd.grad(o, leaves, grad_output.to(o.dtype))
    return o.detach(), grads


def _recurrent_float32_grads(inputs, grad_output):
    """Gradients through the per-step recurrence in float32: the accuracy float32 can give."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    q, k, v, alpha, beta = leaves
    o, _ = recurrent_gated_delta_rule_reference(
        q, k, v, alpha.clamp(min=ALPHA_MIN).log(), beta, q.shape[-1] ** -0.5, compute_dtype=torch.float32
    )
    return torch.autograd.grad(o, leaves, grad_output)


def _check_grads(inputs, grads, grads64, grad_output, floor):
    """Each gradient within ``floor`` (of its max) of float64, or 3x the per-step float32
    recurrence's error. alpha's gradient is a small difference of large terms (1e-5 of its max
    even step by step), which the chunked form sums within a chunk (reverse cumulative sums of
    the log-decay's gradient): 20x for it (the power-product inverse was 400x)."""
    grads32 = _recurrent_float32_grads(inputs, grad_output)
    for name, grad, grad64, grad32 in zip(NAMES, grads, grads64, grads32, strict=True):
        allowed = max(floor, (20 if name == "alpha" else 3) * _max_error(grad32, grad64))
        assert _max_error(grad, grad64) <= allowed, name


@pytest.mark.parametrize("device", DEVICES)
def test_parallel_keys_beta_near_one_keeps_float32_accuracy(device):
    """T = 32, K = 4, every key the same unit vector, beta = 0.99, alpha = 1: the chunk's
    ``(I + A)^{-1}`` as a power product ``(I - A)(I + A^2)(I + A^4)(I + A^8)`` had intermediate
    powers of ~3e3 and an output error of 6.6e-5 (no grad) / 1.9e-4 (grad mode) of max|o|; a
    float32 per-step recurrence gives 1.5e-7."""
    inputs = _parallel_key_inputs(32, 4, 8, device=device)
    expected, _ = _run(inputs, reference=True)
    with torch.no_grad():
        o_no_grad, _ = _run(inputs)
    assert _max_error(o_no_grad, expected) < 2e-6
    grad_output = make_tensor(*expected.shape, device=device, seed=1)
    o, grads = _run(inputs, grad_output)
    _, grads64 = _run(inputs, grad_output.double(), reference=True)
    assert _max_error(o, expected) < 2e-6
    _check_grads(inputs, grads, grads64, grad_output, 2e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("seq_len", "head_dim_k", "head_dim_v", "noise"),
    [(32, 4, 8, 1e-3), (64, 16, 16, 0.0), (45, 5, 3, 1e-2), (100, 4, 7, 0.0), (7, 3, 5, 0.0), (1, 4, 4, 0.0)],
)
@pytest.mark.parametrize("v_heads", [1, 3])
def test_ill_conditioned_chunks(device, seq_len, head_dim_k, head_dim_v, noise, v_heads):
    """(Near-)parallel keys at chunk sizes that are not a power of two (T < 32 is one short
    chunk, T = 45 and 100 a padded last one), with value heads sharing a key head."""
    inputs = _parallel_key_inputs(
        seq_len, head_dim_k, head_dim_v, v_heads=v_heads, noise=noise, device=device
    )
    grad_output = make_tensor(1, seq_len, v_heads, head_dim_v, device=device, seed=2)
    expected, grads64 = _run(inputs, grad_output.double(), reference=True)
    with torch.no_grad():
        o_no_grad, _ = _run(inputs)
    o, grads = _run(inputs, grad_output)
    assert _max_error(o_no_grad, expected) < 5e-6
    assert _max_error(o, expected) < 5e-6
    _check_grads(inputs, grads, grads64, grad_output, 5e-6)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 8, 13, 16, 31, 32, 64])
def test_unit_lower_inverse_is_accurate(n):
    """The chunk inverse against float64, on random and on the worst (parallel keys, beta
    near 1) strictly lower-triangular matrices, in one batch; also its gradient."""
    torch.manual_seed(n)
    random = 0.3 * torch.randn(3, n, n, dtype=torch.float64).tril(-1)
    parallel = torch.full((n, n), 0.99, dtype=torch.float64).tril(-1).expand(2, n, n)
    a = torch.cat([random, parallel]).unflatten(0, (5, 1))  # leading dims are kept
    exact = torch.linalg.inv(torch.eye(n, dtype=torch.float64) + a)
    inverse = _unit_lower_inverse(a.float())
    assert inverse.shape == a.shape
    assert _max_error(inverse, exact) < 1e-6
    leaf = a.clone().requires_grad_(True)
    upstream = torch.randn_like(exact)
    (grad,) = torch.autograd.grad(_unit_lower_inverse(leaf), leaf, upstream)
    (grad_exact,) = torch.autograd.grad(
        torch.linalg.inv(torch.eye(n, dtype=torch.float64) + leaf), leaf, upstream
    )
    assert torch.allclose(grad.tril(-1), grad_exact.tril(-1), atol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_head_group_gradient_sums_in_float32(device, dtype):
    """HV = 2 value heads share one q/k head: the gradients of q and k are sums over the group,
    which must be taken in float32 (a float16 partial sum 300 * 300 = 90000 overflowed to inf
    where the total 300 * 300 - 400 * 100 = 50000 fits)."""
    q = torch.ones(1, 1, 1, 1, dtype=dtype, device=device, requires_grad=True)
    k = torch.ones(1, 1, 1, 1, dtype=dtype, device=device, requires_grad=True)
    v = torch.tensor([300.0, -400.0], dtype=dtype, device=device).view(1, 1, 2, 1).requires_grad_(True)
    alpha = torch.ones(1, 1, 2, dtype=dtype, device=device)
    beta = torch.ones(1, 1, 2, dtype=dtype, device=device)
    o = gated_delta_rule(q, k, v, alpha, beta, backend="torch")
    grad_output = torch.tensor([300.0, 100.0], dtype=dtype, device=device).view(1, 1, 2, 1)
    dq, dk = torch.autograd.grad(o, (q, k), grad_output)
    expected = torch.tensor(50000.0).to(dtype).item()
    assert dq.item() == expected
    # k enters twice (the update and the prediction, which is 0 from a zero state): the same sum.
    assert dk.item() == expected


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_head_group_gradients_against_float64(device, dtype):
    """Random GVA inputs (H = 2, HV = 6) in half precision with large values: every gradient
    within its dtype's tolerance of float64."""
    q = make_tensor(1, 40, 2, 8, seed=3, dtype=torch.float64)
    k = F.normalize(make_tensor(1, 40, 2, 8, seed=4, dtype=torch.float64), dim=-1)
    v = make_tensor(1, 40, 6, 5, seed=5, dtype=torch.float64, scale=200.0)
    alpha = torch.sigmoid(make_tensor(1, 40, 6, seed=6, dtype=torch.float64) + 2.0)
    beta = torch.sigmoid(make_tensor(1, 40, 6, seed=7, dtype=torch.float64))
    inputs = [t.to(device=device, dtype=dtype) for t in (q, k, v, alpha, beta)]
    grad_output = make_tensor(1, 40, 6, 5, seed=8, dtype=dtype, device=device, scale=200.0)
    _, grads = _run(inputs, grad_output)
    _, grads64 = _run(inputs, grad_output.double(), reference=True)
    for name, grad, grad64 in zip(NAMES, grads, grads64, strict=True):
        assert grad.dtype == dtype
        assert_close(name, grad, grad64, DEFAULT_TOLERANCE[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, *HALF_DTYPES], ids=str)
@pytest.mark.parametrize("autocast_dtype", HALF_DTYPES, ids=str)
def test_autocast_changes_nothing(device, dtype, autocast_dtype):
    """Called inside an autocast region of either half dtype (also the other one than the
    inputs'), the output, the final state and every gradient are bitwise those of a call
    outside it. The backward runs outside the region, as PyTorch recommends: a backward run
    inside it has autocast cast the matmuls of the torch backend's backward too."""
    q = make_tensor(1, 37, 2, 6, seed=9, dtype=dtype, device=device)
    k = F.normalize(make_tensor(1, 37, 2, 6, seed=10, device=device), dim=-1).to(dtype)
    v = make_tensor(1, 37, 4, 5, seed=11, dtype=dtype, device=device)
    alpha = torch.sigmoid(make_tensor(1, 37, 4, seed=12, device=device) + 2.0).to(dtype)
    beta = torch.sigmoid(make_tensor(1, 37, 4, seed=13, device=device)).to(dtype)
    D = make_tensor(4, seed=14, dtype=dtype, device=device)
    state = make_tensor(1, 4, 6, 5, seed=15, device=device)
    grad_output = make_tensor(1, 37, 4, 5, seed=16, dtype=dtype, device=device)

    def run(autocast):
        leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v, alpha, beta, D, state)]
        with torch.autocast(device, dtype=autocast_dtype, enabled=autocast):
            o, final = gated_delta_rule(
                *leaves[:5], leaves[5], initial_state=leaves[6], output_final_state=True, backend="torch"
            )
            with torch.no_grad():
                o_no_grad = gated_delta_rule(*leaves[:5], leaves[5], initial_state=leaves[6], backend="torch")
        grads = torch.autograd.grad((o, final), leaves, (grad_output, torch.ones_like(final)))
        return (o, final, o_no_grad, *grads)

    outside, inside = run(False), run(True)
    for index, (a, b) in enumerate(zip(outside, inside, strict=True)):
        assert a.dtype == b.dtype, index
        assert torch.equal(a.detach(), b.detach()), f"output {index} changed under autocast({autocast_dtype})"


def test_chunked_form_matches_per_step_in_float64_on_ill_conditioned_chunks():
    """The chunked form itself (both of its paths) in float64 equals the recurrence to 1e-12."""
    q, k, v, alpha, beta = (t.double() for t in _parallel_key_inputs(70, 4, 6, v_heads=2))
    g = alpha.log()
    expected, state64 = recurrent_gated_delta_rule_reference(q, k, v, g, beta, 0.5)
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            o, state = chunk_gated_delta_rule_torch(
                q.requires_grad_(grad), k, v, g, beta, 0.5, compute_dtype=torch.float64
            )
        assert _max_error(o, expected) < 1e-12
        assert _max_error(state, state64) < 1e-12
