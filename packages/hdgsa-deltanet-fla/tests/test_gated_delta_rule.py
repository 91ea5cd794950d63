"""gated_delta_rule against the float64 per-step reference: outputs, final state and every gradient
(q, k, v, alpha, beta, D, initial_state), both layouts, GVA, alpha edge cases, odd T, bad inputs;
and the fla backend against the torch backend where fla can run (CUDA)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

import hdgsa_deltanet_fla.api as api
import hdgsa_deltanet_fla.reference as reference
from hdgsa_core.testing import DEFAULT_TOLERANCE, assert_close, make_tensor, strided_rows
from hdgsa_deltanet_fla import _fla, gated_delta_rule, gated_delta_rule_backends
from hdgsa_deltanet_fla.reference import (
    ALPHA_MIN,
    chunk_gated_delta_rule_torch,
    recurrent_gated_delta_rule_reference,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
NAMES = ("q", "k", "v", "alpha", "beta", "D", "initial_state")


@dataclass
class Inputs:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    alpha: torch.Tensor
    beta: torch.Tensor
    D: torch.Tensor | None
    initial_state: torch.Tensor | None

    def tensors(self) -> list[torch.Tensor | None]:
        return [self.q, self.k, self.v, self.alpha, self.beta, self.D, self.initial_state]


def make_inputs(
    batch: int,
    seq_len: int,
    heads: int,
    head_dim_k: int,
    head_dim_v: int,
    *,
    v_heads: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    alpha_mode: str = "random",
    with_D: bool = True,
    with_state: bool = True,
    seed: int = 0,
) -> Inputs:
    """Seeded inputs in the unpacked layout: l2-normalised keys (a stable recurrence, as in
    Gated DeltaNet layers), alpha in (0, 1], beta in (0, 1)."""
    v_heads = heads if v_heads is None else v_heads
    q = make_tensor(batch, seq_len, heads, head_dim_k, seed=seed, dtype=torch.float64)
    k = F.normalize(
        make_tensor(batch, seq_len, heads, head_dim_k, seed=seed + 1, dtype=torch.float64), dim=-1
    )
    v = make_tensor(batch, seq_len, v_heads, head_dim_v, seed=seed + 2, dtype=torch.float64)
    logits = make_tensor(batch, seq_len, v_heads, seed=seed + 3, dtype=torch.float64)
    if alpha_mode == "random":
        alpha = torch.sigmoid(2.0 + logits)  # mostly 0.7 - 0.99
    elif alpha_mode == "one":
        alpha = torch.ones_like(logits)
    elif alpha_mode == "tiny":
        # Around and below the 1e-6 clamp: the clamped ones get no gradient.
        alpha = torch.where(logits > 0, torch.full_like(logits, 1e-9), 1e-5 * torch.sigmoid(logits) + 2e-6)
    elif alpha_mode == "mixed":
        alpha = torch.sigmoid(3.0 * logits)
        alpha[..., ::3] = 1.0
        alpha[:, ::5] = 1e-7
    else:
        raise AssertionError(alpha_mode)
    beta = torch.sigmoid(make_tensor(batch, seq_len, v_heads, seed=seed + 4, dtype=torch.float64))
    D = make_tensor(v_heads, seed=seed + 5, dtype=torch.float64) if with_D else None
    state = make_tensor(batch, v_heads, head_dim_k, head_dim_v, seed=seed + 6, scale=0.5, dtype=torch.float64)
    state = state if with_state else None
    convert = lambda t: None if t is None else t.to(device=device, dtype=dtype)
    return Inputs(
        convert(q), convert(k), convert(v), convert(alpha), convert(beta), convert(D), convert(state)
    )


def reference64(inputs: Inputs, scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor, list]:
    """Float64 per-step reference of the whole op (alpha -> clamp -> log, D skip) on the same
    (possibly low-precision) input values; returns (o, S_T, leaf tensors)."""
    leaves = [None if t is None else t.detach().double().requires_grad_() for t in inputs.tensors()]
    q, k, v, alpha, beta, D, state = leaves
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    g = alpha.clamp(min=ALPHA_MIN).log()
    o, final_state = recurrent_gated_delta_rule_reference(q, k, v, g, beta, scale, state)
    if D is not None:
        o = o + D[:, None] * v
    return o, final_state, leaves


def check_op(
    inputs: Inputs,
    *,
    backend: str,
    layout: str = "unpacked",
    tol: float | None = None,
    grad_tol: float | None = None,
    scale: float | None = None,
    compute_dtype: torch.dtype | None = None,
) -> None:
    """Run the op (values, final state, all gradients) and compare with the float64 reference."""
    dtype = inputs.q.dtype
    tol = DEFAULT_TOLERANCE[dtype] if tol is None else tol
    grad_tol = tol if grad_tol is None else grad_tol
    leaves = [None if t is None else t.detach().requires_grad_() for t in inputs.tensors()]
    q, k, v, alpha, beta, D, state = leaves
    heads, v_heads = q.shape[2], v.shape[2]
    if layout == "packed":
        o, final_state = gated_delta_rule(
            q.flatten(2), k.flatten(2), v.flatten(2), alpha, beta, D, heads,
            scale=scale, initial_state=state, output_final_state=True,
            compute_dtype=compute_dtype, backend=backend,
        )  # fmt: skip
        assert o.shape == (*v.shape[:2], v_heads * v.shape[3])
        o = o.unflatten(-1, (v_heads, v.shape[3]))
    else:
        o, final_state = gated_delta_rule(
            q, k, v, alpha, beta, D,
            scale=scale, initial_state=state, output_final_state=True,
            compute_dtype=compute_dtype, backend=backend,
        )  # fmt: skip
    assert o.dtype == dtype
    assert final_state.dtype == torch.float32
    assert o.shape == v.shape
    assert final_state.shape == (q.shape[0], v_heads, q.shape[3], v.shape[3])

    o64, final64, leaves64 = reference64(inputs, scale)
    assert_close("o", o, o64, tol)
    assert_close("S_T", final_state, final64, tol)

    grad_o = make_tensor(*o.shape, seed=11, dtype=dtype, device=o.device)
    grad_state = make_tensor(*final_state.shape, seed=12, device=o.device)
    present = [i for i, t in enumerate(leaves) if t is not None]
    grads = torch.autograd.grad(
        (o.float() * grad_o.float()).sum() + (final_state * grad_state).sum(), [leaves[i] for i in present]
    )
    grads64 = torch.autograd.grad(
        (o64 * grad_o.double()).sum() + (final64 * grad_state.double()).sum(), [leaves64[i] for i in present]
    )
    for i, grad, grad64 in zip(present, grads, grads64, strict=True):
        assert grad.dtype == leaves[i].dtype, NAMES[i]
        assert grad.shape == leaves[i].shape, NAMES[i]
        assert_close(f"d{NAMES[i]}", grad, grad64, grad_tol)


# ---------------------------------------------------------------------------------------------
# The torch backend (CPU, and CUDA when present) against float64.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seq_len", [1, 63, 64, 65, 130])
def test_torch_backend_odd_lengths(device, seq_len):
    check_op(make_inputs(2, seq_len, 2, 16, 12, device=device, seed=seq_len), backend="torch")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["unpacked", "packed"])
@pytest.mark.parametrize("with_D", [True, False], ids=["D", "noD"])
@pytest.mark.parametrize("with_state", [True, False], ids=["h0", "noh0"])
def test_torch_backend_layouts(device, layout, with_D, with_state):
    inputs = make_inputs(1, 70, 3, 8, 10, device=device, with_D=with_D, with_state=with_state, seed=3)
    check_op(inputs, backend="torch", layout=layout)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["unpacked", "packed"])
def test_torch_backend_gva(device, layout):
    # 2 query/key heads, 6 value heads: value head h reads q/k head h // 3.
    check_op(make_inputs(2, 67, 2, 8, 5, v_heads=6, device=device, seed=5), backend="torch", layout=layout)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("alpha_mode", ["one", "tiny", "mixed"])
def test_torch_backend_alpha_edges(device, alpha_mode):
    inputs = make_inputs(2, 130, 2, 16, 8, device=device, alpha_mode=alpha_mode, seed=7)
    check_op(inputs, backend="torch")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_torch_backend_low_precision(device, dtype):
    check_op(make_inputs(1, 65, 2, 16, 16, dtype=dtype, device=device, seed=9), backend="torch")


@pytest.mark.parametrize("device", DEVICES)
def test_torch_backend_scale_and_strided_inputs(device):
    inputs = make_inputs(2, 33, 2, 12, 6, device=device, seed=13)
    # Rows of q/k/v that are not packed, alpha/beta sliced out of wider projections.
    inputs.q, inputs.k, inputs.v = (strided_rows(t, pad=3) for t in (inputs.q, inputs.k, inputs.v))
    wide = torch.cat([inputs.alpha, inputs.beta, inputs.alpha], dim=-1)
    inputs.alpha, inputs.beta = wide[..., :2], wide[..., 2:4]
    assert not inputs.alpha.is_contiguous()
    check_op(inputs, backend="torch", scale=0.3)


@pytest.mark.parametrize("device", DEVICES)
def test_alpha_and_beta_with_trailing_one(device):
    inputs = make_inputs(1, 20, 2, 8, 8, device=device, seed=17)
    expected = gated_delta_rule(*inputs.tensors()[:6], initial_state=inputs.initial_state, backend="torch")
    actual = gated_delta_rule(
        inputs.q, inputs.k, inputs.v, inputs.alpha[..., None], inputs.beta[..., None], inputs.D,
        initial_state=inputs.initial_state, backend="torch",
    )  # fmt: skip
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_chunked_form_matches_per_step_in_float64():
    """The chunked algorithm itself, in float64: equal to the per-step loop to rounding."""
    inputs = make_inputs(2, 150, 2, 8, 6, v_heads=4, dtype=torch.float64, alpha_mode="mixed", seed=21)
    q, k, v, alpha, beta, _, state = (None if t is None else t.requires_grad_() for t in inputs.tensors())
    g = lambda: alpha.clamp(min=ALPHA_MIN).log()
    o, s = chunk_gated_delta_rule_torch(q, k, v, g(), beta, 0.4, state, compute_dtype=torch.float64)
    o_ref, s_ref = recurrent_gated_delta_rule_reference(q, k, v, g(), beta, 0.4, state)
    assert_close("o", o, o_ref, 1e-12)
    assert_close("S_T", s, s_ref, 1e-12)
    leaves = [q, k, v, alpha, beta, state]
    grads = torch.autograd.grad(o.sum() + s.square().sum(), leaves)
    grads_ref = torch.autograd.grad(o_ref.sum() + s_ref.square().sum(), leaves)
    for name, grad, grad_ref in zip(("q", "k", "v", "alpha", "beta", "S0"), grads, grads_ref, strict=True):
        assert_close(f"d{name}", grad, grad_ref, 1e-11)


@pytest.mark.parametrize("alpha_mode", ["random", "one", "tiny", "mixed"])
@pytest.mark.parametrize("seq_len", [1, 45, 150])
def test_buffered_chunked_form_matches_per_step_in_float64(alpha_mode, seq_len):
    """The forward without autograd (its own loop, in preallocated buffers) in float64: equal
    to the per-step loop to rounding, with padding, GVA, B > 1 and an initial state, which it
    must leave alone."""
    inputs = make_inputs(2, seq_len, 2, 8, 6, v_heads=4, dtype=torch.float64, alpha_mode=alpha_mode, seed=23)
    q, k, v, alpha, beta, _, state = inputs.tensors()
    g = alpha.clamp(min=ALPHA_MIN).log()
    state_before = state.clone()
    o, s = chunk_gated_delta_rule_torch(q, k, v, g, beta, 0.4, state, compute_dtype=torch.float64)
    o_ref, s_ref = recurrent_gated_delta_rule_reference(q, k, v, g, beta, 0.4, state)
    assert_close("o", o, o_ref, 1e-12)
    assert_close("S_T", s, s_ref, 1e-12)
    assert torch.equal(state, state_before)
    assert s.data_ptr() != state.data_ptr()


@pytest.mark.parametrize("record", [False, True])
def test_chunked_form_with_no_steps(record):
    """T = 0 called directly (the API answers empty inputs itself): an empty output and the
    initial state as the final state, a copy of it, on both paths."""
    inputs = make_inputs(2, 0, 2, 8, 6, v_heads=4, seed=29)
    q, k, v, alpha, beta, _, state = (t.requires_grad_(record) for t in inputs.tensors() if t is not None)
    o, s = chunk_gated_delta_rule_torch(q, k, v, alpha.clamp(min=ALPHA_MIN).log(), beta, 0.4, state)
    assert o.shape == (2, 0, 4, 6)
    assert torch.equal(s, state)
    assert s.data_ptr() != state.data_ptr()
    o0, s0 = chunk_gated_delta_rule_torch(q, k, v, alpha.clamp(min=ALPHA_MIN).log(), beta, 0.4)
    assert o0.shape == (2, 0, 4, 6)
    assert torch.equal(s0, torch.zeros(2, 4, 8, 6))


def _spy_on_buffer_choice(monkeypatch) -> list[bool]:
    """Record what chunk_gated_delta_rule_torch decides (buffers or autograd's path) per call."""
    choices: list[bool] = []
    decide = reference._writes_into_buffers

    def spy(*tensors):
        choices.append(decide(*tensors))
        return choices[-1]

    monkeypatch.setattr(reference, "_writes_into_buffers", spy)
    return choices


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seq_len", [1, 64, 70])
def test_buffered_forward_equals_the_autograd_forward(device, seq_len, monkeypatch):
    """Where autograd records nothing the chunked forward writes into preallocated buffers
    (out=, poisoned with NaN here) and forms the output's state term inside its loop; it must
    give the values of the path autograd records to float32 rounding (padding, GVA, batch > 1
    and an initial state included) and leave its inputs alone."""
    choices = _spy_on_buffer_choice(monkeypatch)
    inputs = make_inputs(2, seq_len, 2, 16, 8, v_heads=4, device=device, seed=41)
    q, k, v, alpha, beta, _, state = inputs.tensors()
    args = [q, k, v, alpha.clamp(min=ALPHA_MIN).log(), beta, state]
    saved = [t.clone() for t in args]
    o, final_state = chunk_gated_delta_rule_torch(*args[:5], 0.3, args[5])
    leaves = [t.clone().requires_grad_() for t in args]
    o_recorded, final_recorded = chunk_gated_delta_rule_torch(*leaves[:5], 0.3, leaves[5])
    assert choices == [True, False]
    assert o_recorded.requires_grad
    assert not o.requires_grad
    assert torch.isfinite(o).all()
    torch.testing.assert_close(o, o_recorded.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(final_state, final_recorded.detach(), rtol=1e-5, atol=1e-5)
    assert all(torch.equal(t, t_saved) for t, t_saved in zip(args, saved, strict=True))


def test_buffers_only_where_autograd_records_nothing(monkeypatch):
    plain, leaf = torch.zeros(2), torch.zeros(2, requires_grad=True)
    assert reference._writes_into_buffers(plain, None, plain)
    assert not reference._writes_into_buffers(plain, leaf, None)
    with torch.no_grad():
        assert reference._writes_into_buffers(plain, leaf)
    with torch.inference_mode():
        assert reference._writes_into_buffers(leaf)
    # Through the op: plain tensors (a forward-only call, as an inference step makes it)
    # and no_grad take the buffers; inputs that need a gradient do not.
    choices = _spy_on_buffer_choice(monkeypatch)
    inputs = make_inputs(1, 40, 2, 8, 8, seed=43)
    tensors = inputs.tensors()[:5]
    expected = gated_delta_rule(*tensors, backend="torch")
    with torch.no_grad():
        gated_delta_rule(*(t.clone().requires_grad_() for t in tensors), backend="torch")
    recorded = gated_delta_rule(*(t.clone().requires_grad_() for t in tensors), backend="torch")
    assert choices == [True, True, False]
    torch.testing.assert_close(recorded.detach(), expected, rtol=1e-5, atol=1e-5)


def test_forward_mode_ad_and_vmap_through_the_torch_backend():
    """jvp, jacfwd and vmap take the recording path (out= ops have no forward derivative or
    batching rule; dual and batched tensors do not require grad), and agree with reverse mode
    and with plain calls."""
    inputs = make_inputs(1, 20, 1, 4, 4, seed=47)
    q, k, v, alpha, beta = inputs.tensors()[:5]

    def op(q_: torch.Tensor) -> torch.Tensor:
        return gated_delta_rule(q_, k, v, alpha, beta, backend="torch")

    jacobian = torch.func.jacrev(op)(q)  # reverse mode: the recording path
    tangent = make_tensor(*q.shape, seed=48)
    out, out_tangent = torch.func.jvp(op, (q,), (tangent,))
    torch.testing.assert_close(out, op(q))
    expected_tangent = (jacobian.reshape(out.numel(), q.numel()) @ tangent.flatten()).view_as(out)
    torch.testing.assert_close(out_tangent, expected_tangent, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.func.jacfwd(op)(q), jacobian, rtol=1e-4, atol=1e-5)
    batched = torch.stack([q, 2 * q])
    torch.testing.assert_close(torch.func.vmap(op)(batched), torch.stack([op(q), op(2 * q)]))


@pytest.mark.parametrize("device", DEVICES)
def test_no_overflow_when_alpha_underflows(device):
    """alpha at the clamp for a whole chunk: cumulative log-decay near -880, never exp(+880)."""
    inputs = make_inputs(1, 128, 1, 8, 8, device=device, seed=23)
    inputs.alpha = torch.full_like(inputs.alpha, 1e-30)
    check_op(inputs, backend="torch")


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic_pure_and_empty(device):
    inputs = make_inputs(2, 40, 2, 8, 8, device=device, seed=29)
    before = [t.clone() for t in inputs.tensors()]
    first = gated_delta_rule(*inputs.tensors()[:6], initial_state=inputs.initial_state, backend="torch")
    second = gated_delta_rule(*inputs.tensors()[:6], initial_state=inputs.initial_state, backend="torch")
    assert torch.equal(first, second)
    for t, saved in zip(inputs.tensors(), before, strict=True):
        assert torch.equal(t, saved)  # inputs untouched
    assert first.is_contiguous()

    empty = make_inputs(2, 0, 2, 8, 4, device=device)
    o, state = gated_delta_rule(
        *empty.tensors()[:6], initial_state=empty.initial_state, output_final_state=True
    )
    assert o.shape == (2, 0, 2, 4)
    assert torch.equal(state, empty.initial_state)
    o = gated_delta_rule(*(t.flatten(2) for t in empty.tensors()[:3]), empty.alpha, empty.beta, num_heads=2)
    assert o.shape == (2, 0, 8)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["unpacked", "packed"])
def test_empty_inputs_give_zero_gradients(device, layout):
    """Every input stays in the graph when no step runs: zero gradients of its shape (D and the
    state are not empty), the final state is the initial one (gradient passed straight through)."""
    for batch, seq_len in ((2, 0), (0, 3)):
        inputs = make_inputs(batch, seq_len, 2, 8, 4, device=device, seed=2)
        leaves = [t.detach().requires_grad_() for t in inputs.tensors()]
        args = list(leaves[:6])
        if layout == "packed":
            args[:3] = [t.flatten(2) for t in args[:3]]
        o, state = gated_delta_rule(
            *args, 2, initial_state=leaves[6], output_final_state=True, backend="torch"
        )
        expected_o = (batch, seq_len, 8) if layout == "packed" else (batch, seq_len, 2, 4)
        assert o.shape == expected_o
        assert state.dtype == torch.float32
        assert torch.equal(state, inputs.initial_state)
        grad_state = torch.randn_like(state)
        grads = torch.autograd.grad((o.sum(), (state * grad_state).sum()), leaves)
        for name, grad, leaf in zip(NAMES, grads, leaves, strict=True):
            assert grad.shape == leaf.shape, name
            expected = grad_state if name == "initial_state" else torch.zeros_like(leaf)
            assert torch.equal(grad, expected), name


@pytest.mark.parametrize("device", DEVICES)
def test_torch_backend_ignores_autocast(device):
    """Inside autocast (bf16) the torch backend still computes in float32: the same output, final
    state and gradients, bit for bit, as outside it, for float32 inputs. (The backward is taken
    outside the region, as PyTorch recommends: autograd runs a backward called inside it under
    the region's autocast state.)"""
    inputs = make_inputs(1, 70, 2, 8, 6, device=device, seed=41)
    leaves = [t.detach().requires_grad_() for t in inputs.tensors()]

    def forward():
        return gated_delta_rule(
            *leaves[:6], initial_state=leaves[6], output_final_state=True, backend="torch"
        )

    def with_grads(o, state):
        return (o, state, *torch.autograd.grad(o.square().sum() + state.sum(), leaves))

    expected = with_grads(*forward())
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        outputs = forward()
    actual = with_grads(*outputs)
    for name, got, want in zip(("o", "S_T", *NAMES), actual, expected, strict=True):
        assert got.dtype == want.dtype == torch.float32, name
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("device", DEVICES)
def test_compute_dtype_on_the_torch_backend(device):
    """The torch backend is float32 inside whatever compute_dtype says: None, float32 and bf16 give
    bitwise the same bf16 output (float32 state) for bf16 inputs."""
    inputs = make_inputs(1, 40, 2, 8, 8, dtype=torch.bfloat16, device=device, seed=43)
    rest = dict(initial_state=inputs.initial_state, output_final_state=True, backend="torch")
    results = [
        gated_delta_rule(*inputs.tensors()[:6], compute_dtype=compute_dtype, **rest)
        for compute_dtype in (None, torch.float32, torch.bfloat16)
    ]
    for o, state in results:
        assert o.dtype == torch.bfloat16
        assert state.dtype == torch.float32
        assert torch.equal(o, results[0][0])
        assert torch.equal(state, results[0][1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["unpacked", "packed"])
def test_mixed_dtypes(device, layout):
    """bf16 q, k, v with float32 alpha, beta, D and initial_state (gates kept in float32, as
    models often do): o in bf16, each gradient in its input's dtype, all against float64."""
    inputs = make_inputs(1, 65, 2, 8, 8, device=device, seed=47)
    inputs.q, inputs.k, inputs.v = (t.to(torch.bfloat16) for t in (inputs.q, inputs.k, inputs.v))
    check_op(inputs, backend="torch", layout=layout)


@pytest.mark.parametrize("device", DEVICES)
def test_packed_layout_round_trip(device):
    """Packed inputs that are slices of one wider projection (strided views) give exactly the
    unpacked result, flattened; the packed output is contiguous and [B, T, HV*V]."""
    batch, seq_len, heads, head_dim_k, head_dim_v = 2, 37, 3, 8, 6
    proj = make_tensor(batch, seq_len, heads * (2 * head_dim_k + head_dim_v) + 5, seed=53, device=device)
    q, k = proj[..., : heads * head_dim_k], proj[..., heads * head_dim_k : 2 * heads * head_dim_k]
    v = proj[..., 2 * heads * head_dim_k : 2 * heads * head_dim_k + heads * head_dim_v]
    k = F.normalize(k.unflatten(-1, (heads, head_dim_k)), dim=-1).flatten(2)
    assert not q.is_contiguous()
    assert not v.is_contiguous()
    inputs = make_inputs(batch, seq_len, heads, head_dim_k, head_dim_v, device=device, seed=53)
    rest = dict(initial_state=inputs.initial_state, output_final_state=True, backend="torch")
    o_packed, s_packed = gated_delta_rule(q, k, v, inputs.alpha, inputs.beta, inputs.D, heads, **rest)
    o, s = gated_delta_rule(
        q.unflatten(-1, (heads, head_dim_k)), k.unflatten(-1, (heads, head_dim_k)),
        v.unflatten(-1, (heads, head_dim_v)), inputs.alpha, inputs.beta, inputs.D, **rest,
    )  # fmt: skip
    assert o_packed.shape == (batch, seq_len, heads * head_dim_v)
    assert o_packed.is_contiguous()
    assert torch.equal(o_packed, o.flatten(2))
    assert torch.equal(s_packed, s)


@pytest.mark.parametrize("device", DEVICES)
def test_alpha_zero_is_clamped(device):
    """alpha = 0 is alpha = 1e-6 (the documented clamp), with no gradient through the clamped
    entries; alpha = 1 (no decay) is a plain value."""
    inputs = make_inputs(1, 20, 2, 8, 8, device=device, seed=59)
    zeros = inputs.alpha.clone()
    zeros[:, ::3] = 0.0
    zeros[:, 1::3] = 1.0
    floor = torch.where(zeros == 0, torch.full_like(zeros, ALPHA_MIN), zeros)
    alpha = zeros.requires_grad_()
    floor.requires_grad_()  # the same (recording) path as alpha's call, for a bitwise comparison
    rest = dict(initial_state=inputs.initial_state, backend="torch")
    o = gated_delta_rule(inputs.q, inputs.k, inputs.v, alpha, inputs.beta, inputs.D, **rest)
    o_floor = gated_delta_rule(inputs.q, inputs.k, inputs.v, floor, inputs.beta, inputs.D, **rest)
    assert torch.isfinite(o).all()
    assert torch.equal(o, o_floor)
    (dalpha,) = torch.autograd.grad(o.sum(), alpha)
    assert torch.isfinite(dalpha).all()
    assert torch.equal(dalpha[:, ::3], torch.zeros_like(dalpha[:, ::3]))
    assert dalpha[:, 1::3].abs().sum() > 0


def test_integer_like_arguments():
    """num_heads may be any integer (numpy's too); scale any real number."""
    np = pytest.importorskip("numpy")
    inputs = make_inputs(1, 9, 2, 4, 4, seed=61)
    packed = [t.flatten(2) for t in inputs.tensors()[:3]]
    expected = gated_delta_rule(*packed, inputs.alpha, inputs.beta, num_heads=2, scale=0.5, backend="torch")
    actual = gated_delta_rule(
        *packed, inputs.alpha, inputs.beta, num_heads=np.int64(2), scale=np.float32(0.5), backend="torch"
    )
    assert torch.equal(actual, expected)
    default = gated_delta_rule(*packed, inputs.alpha, inputs.beta, num_heads=2, backend="torch")
    explicit = gated_delta_rule(
        *packed, inputs.alpha, inputs.beta, num_heads=2, scale=4**-0.5, backend="torch"
    )
    assert torch.equal(default, explicit)  # scale defaults to K ** -0.5


def test_auto_on_cpu_runs_torch_without_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        expected = _call(backend="torch")
        assert torch.equal(_call(backend="auto"), expected)
    assert gated_delta_rule_backends("cpu") == ["torch"]


# ---------------------------------------------------------------------------------------------
# Bad inputs (docs/api.md, "Errors").
# ---------------------------------------------------------------------------------------------


def _good() -> dict:
    inputs = make_inputs(2, 5, 2, 4, 3, seed=31)
    return dict(
        q=inputs.q, k=inputs.k, v=inputs.v, alpha=inputs.alpha, beta=inputs.beta, D=inputs.D,
        initial_state=inputs.initial_state,
    )  # fmt: skip


def _call(**overrides):
    args = _good()
    args.update(overrides)
    num_heads = args.pop("num_heads", None)
    backend = args.pop("backend", "torch")
    extra = {key: args.pop(key) for key in ("compute_dtype", "scale", "output_final_state") if key in args}
    return gated_delta_rule(
        args["q"], args["k"], args["v"], args["alpha"], args["beta"], args["D"], num_heads,
        initial_state=args["initial_state"], backend=backend, **extra,
    )  # fmt: skip


def _packed(**overrides) -> dict:
    """Packed q, k [2, 5, 8] with num_heads=2 (K = 4), and the given overrides."""
    return dict(q=torch.randn(2, 5, 8), k=torch.randn(2, 5, 8), num_heads=2) | overrides


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (dict(q=torch.randn(2, 5)), "q: expected shape"),
        (dict(q=torch.randn(2, 5, 2, 4, 1)), "q: expected shape"),
        (dict(k=torch.randn(2, 5, 2, 5)), "k: expected shape"),
        (dict(v=torch.randn(2, 6, 2, 3)), "v: expected shape"),
        (dict(v=torch.randn(2, 5, 6)), "v: expected shape"),
        (dict(v=torch.randn(2, 5, 3, 3)), "multiple of the number of query/key heads"),
        (dict(alpha=torch.rand(2, 5, 3)), "alpha: expected shape"),
        (dict(alpha=torch.rand(2, 5, 2, 2)), "alpha: expected shape"),
        (dict(alpha=torch.rand(2, 5)), "alpha: expected shape"),
        (dict(beta=torch.rand(5, 2)), "beta: expected shape"),
        (dict(beta=torch.rand(2, 4, 2)), "beta: expected shape"),
        (dict(D=torch.randn(3)), "D: expected shape"),
        (dict(D=torch.randn(2, 1)), "D: expected shape"),
        (dict(initial_state=torch.randn(2, 2, 3, 4)), "initial_state: expected shape"),
        (dict(num_heads=3), "num_heads: 3 does not match"),
        (dict(q=torch.randn(2, 5, 8), k=torch.randn(2, 5, 8), v=torch.randn(2, 5, 6)), "num_heads: required"),
        (_packed(v=torch.randn(2, 5, 6), num_heads=3), "not divisible by num_heads"),
        (_packed(v=torch.randn(2, 5, 7)), "v: last dimension 7 is not divisible"),
        (_packed(v=torch.randn(2, 5, 2, 3)), "v: expected"),
        (
            _packed(v=torch.randn(2, 5, 6), alpha=torch.rand(2, 5, 3)),
            r"alpha: expected shape \[B, T, HV\].*got shape \[2, 5, 3\]",
        ),
        (
            _packed(v=torch.randn(2, 5, 6), alpha=torch.rand(2, 5, 4)),
            r"alpha: expected shape \[B, T, HV\].*got shape \[2, 5, 4\]",
        ),
        (
            # Packed: HV = alpha.shape[2] = 6 (GVA, V = 1) is a valid reading; beta disagrees.
            _packed(v=torch.randn(2, 5, 6), alpha=torch.rand(2, 5, 6), D=None, initial_state=None),
            r"beta: expected shape \[B, T, HV\] \(HV = alpha.shape\[2\].*got shape \[2, 5, 2\]",
        ),
        (dict(num_heads=0, q=torch.randn(2, 5, 8)), "num_heads"),
        (dict(backend="triton_please"), "backend must be one of"),
    ],
    ids=lambda value: None if isinstance(value, str) else "-".join(f"{k}" for k in value),
)
def test_bad_shapes_raise_value_error(overrides, match):
    with pytest.raises(ValueError, match=match):
        _call(**overrides)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (dict(q=torch.randn(2, 5, 2, 4, dtype=torch.float64)), "q: dtype float64"),
        (dict(alpha=torch.ones(2, 5, 2, dtype=torch.int32)), "alpha: dtype int32"),
        (dict(k=torch.randn(2, 5, 2, 4).half()), "k: dtype float16 differs from q.s float32"),
        (dict(D=torch.ones(2, dtype=torch.int64)), "D: dtype int64"),
        (dict(compute_dtype=torch.float64), "compute_dtype"),
        (dict(num_heads=2.0), "num_heads must be an int"),
        (dict(num_heads=True), "num_heads must be an int"),
        (dict(q=[1.0]), "q: expected a torch.Tensor"),
        (dict(D=[1.0, 2.0]), "D: expected a torch.Tensor"),
        (dict(initial_state=torch.zeros(2, 2, 4, 3, dtype=torch.float64)), "initial_state: dtype float64"),
        (dict(beta=torch.ones(2, 5, 2, dtype=torch.bool)), "beta: dtype bool"),
        (dict(scale="0.5"), "scale must be a real number"),
        (dict(scale=torch.tensor(0.5)), "scale must be a real number"),
        (dict(output_final_state=1), "output_final_state must be a bool"),
    ],
)
def test_bad_types_raise_type_error(overrides, match):
    with pytest.raises(TypeError, match=match):
        _call(**overrides)


def test_triton_is_not_a_backend_name_here():
    # "fla" instead of "triton" for this op; the message points to it.
    with pytest.raises(ValueError, match=r"got 'triton'.*backend='fla'"):
        _call(backend="triton")


@pytest.mark.parametrize(
    ("backend", "error"), [("nope", ValueError), ("triton", ValueError), ("fla", RuntimeError)]
)
@pytest.mark.parametrize("layout", ["unpacked", "packed"])
def test_empty_inputs_still_check_the_backend(backend, error, layout):
    """B = 0 or T = 0 returns early, but only once the backend is known to be valid and runnable."""
    empty = make_inputs(2, 0, 2, 8, 4, seed=1)
    args = list(empty.tensors()[:6])
    if layout == "packed":
        args[:3] = [t.flatten(2) for t in args[:3]]
    with pytest.raises(error):
        gated_delta_rule(*args, 2, backend=backend)


def test_tensors_on_different_devices_raise():
    with pytest.raises(ValueError, match="one device"):
        _call(D=torch.ones(2, device="meta"))


def test_fla_backend_refused_on_cpu_says_why():
    with pytest.raises(RuntimeError, match=r"backend='fla' cannot run here: .*(CUDA|not installed|Triton)"):
        _call(backend="fla")


def test_environment_override(monkeypatch):
    for name in ("fla", "triton"):  # "triton" selects fla, so one setting serves every op
        monkeypatch.setenv("HDGSA_BACKEND", name)
        with pytest.raises(RuntimeError, match="backend='fla' cannot run here"):
            _call(backend="auto")
        assert _call(backend="torch").shape == (2, 5, 2, 3)  # only auto is overridden
    monkeypatch.setenv("HDGSA_BACKEND", "torch")
    assert _call(backend="auto").shape == (2, 5, 2, 3)
    monkeypatch.setenv("HDGSA_BACKEND", "cuda")
    with pytest.raises(ValueError, match="HDGSA_BACKEND"):
        _call(backend="auto")


# ---------------------------------------------------------------------------------------------
# Backend policy (the Hopper + Triton 3.4 - 3.7.1 backward refusal), with fla's answer faked.
# ---------------------------------------------------------------------------------------------

REFUSAL = "fla-core 0.6.0 refuses the gated delta rule backward on Hopper ... install Triton >= 3.7.1"


def _fake_refusing_fla(calls: list):
    def fake(device, *, head_dim_k, needs_backward):
        calls.append(needs_backward)
        return REFUSAL if needs_backward else None

    return fake


def test_backward_refusal_policy(monkeypatch):
    calls: list = []
    monkeypatch.setattr(api, "fla_unavailable_reason", _fake_refusing_fla(calls))
    ran_fla: list = []
    monkeypatch.setattr(api, "_run_fla_path", lambda *args: ran_fla.append(True) or (args[2] * 0, None))
    inputs = _good()
    # Forward only (nothing requires grad): fla runs.
    _call(backend="fla")
    assert ran_fla
    assert calls == [False]
    # A backward will be needed: backend="fla" raises with fla's reason, auto takes torch.
    leaf = inputs["q"].clone().requires_grad_()
    with pytest.raises(RuntimeError, match=r"install Triton >= 3\.7\.1"):
        _call(q=leaf, backend="fla")
    ran_fla.clear()
    out = _call(q=leaf, backend="auto")
    assert not ran_fla
    assert out.requires_grad
    # Under no_grad a backward cannot be needed, even with leaves that require grad.
    with torch.no_grad():
        _call(q=leaf, backend="fla")
    assert ran_fla
    assert calls[-1] is False


def test_runnable_backends_listing():
    assert gated_delta_rule_backends(torch.device("cpu")) == ["torch"]


# ---------------------------------------------------------------------------------------------
# fla against float64 and against the torch backend (CUDA with fla only). Tolerances follow fla's
# own tests/ops/test_gated_delta.py (fp16: o, S_T 0.005; dq, dk, dv, dh0 0.008; dbeta, dg 0.02),
# doubled for bf16 (3 fewer mantissa bits in fla's bf16 intermediates).
# ---------------------------------------------------------------------------------------------

_CUDA = torch.device("cuda")
FLA_FWD_REASON = (
    _fla.fla_unavailable_reason(_CUDA, head_dim_k=64, needs_backward=False)
    if torch.cuda.is_available()
    else "no CUDA device"
)
FLA_BWD_REASON = (
    _fla.fla_unavailable_reason(_CUDA, head_dim_k=64, needs_backward=True)
    if torch.cuda.is_available()
    else "no CUDA device"
)
needs_fla = pytest.mark.skipif(FLA_FWD_REASON is not None, reason=f"fla cannot run: {FLA_FWD_REASON}")
needs_fla_backward = pytest.mark.skipif(
    FLA_BWD_REASON is not None, reason=f"fla's backward cannot run: {FLA_BWD_REASON}"
)
FLA_TOL = {torch.float16: (0.005, 0.008, 0.02), torch.bfloat16: (0.01, 0.016, 0.04)}


@pytest.fixture(params=["fused", "public"])
def fla_call(request, monkeypatch):
    """Which way the fla path goes: one fused node around fla's internals (the default on
    fla-core 0.6) or fla's public function. Returns the calls that took the fused node: a test
    asserts it is non-empty exactly for "fused"."""
    fused_calls: list[bool] = []
    if request.param == "public":
        monkeypatch.setattr(_fla, "fused_entry_points", lambda: None)
    elif _fla.fused_entry_points() is None:
        pytest.skip(f"fla-core {_fla.FLA_VERSION}: the fused node runs on fla-core 0.6 only")
    run_fused = api._run_fla_fused

    def spy(*args, **kwargs):
        result = run_fused(*args, **kwargs)
        if result is not None:  # None: the fused node was not taken
            fused_calls.append(True)
        return result

    monkeypatch.setattr(api, "_run_fla_fused", spy)
    return request.param, fused_calls


def assert_took(fla_call) -> None:
    path, fused_calls = fla_call
    assert bool(fused_calls) == (path == "fused"), (path, len(fused_calls))


def _fla_case(dtype: torch.dtype, seq_len: int, v_heads: int, alpha_mode: str = "random") -> Inputs:
    return make_inputs(
        2,
        seq_len,
        2,
        64,
        64,
        v_heads=v_heads,
        dtype=dtype,
        device="cuda",
        alpha_mode=alpha_mode,
        seed=seq_len,
    )


# fla autotunes its kernels per (H, HV, K, V, dtype): the cases share K = V = 64 and H = 2 and
# cover three such combinations (bf16, bf16 GVA, fp16), with T and the layout varied inside them.
FLA_FORWARD_CASES = [
    (torch.bfloat16, 1, 2, "packed"),
    (torch.bfloat16, 63, 2, "unpacked"),
    (torch.bfloat16, 130, 4, "unpacked"),
    (torch.bfloat16, 300, 4, "packed"),
    (torch.bfloat16, 300, 2, "packed"),
    (torch.float16, 65, 2, "unpacked"),
    (torch.float16, 300, 2, "packed"),
]


@needs_fla
@pytest.mark.parametrize(
    ("dtype", "seq_len", "v_heads", "layout"),
    FLA_FORWARD_CASES,
    ids=[f"{str(c[0])[6:]}-T{c[1]}-HV{c[2]}-{c[3]}" for c in FLA_FORWARD_CASES],
)
def test_fla_forward_matches_reference_and_torch(dtype, seq_len, v_heads, layout, fla_call):
    inputs = _fla_case(dtype, seq_len, v_heads)
    fwd_tol = FLA_TOL[dtype][0]
    args = [t for t in inputs.tensors()[:6]]
    num_heads = None
    if layout == "packed":
        args[:3] = [t.flatten(2) for t in args[:3]]
        num_heads = 2
    with torch.no_grad():
        o_fla, s_fla = gated_delta_rule(
            *args, num_heads, initial_state=inputs.initial_state, output_final_state=True, backend="fla"
        )
        o_torch, s_torch = gated_delta_rule(
            *args, num_heads, initial_state=inputs.initial_state, output_final_state=True, backend="torch"
        )
    o64, s64, _ = reference64(inputs)
    if layout == "packed":
        o64 = o64.flatten(2)
    assert o_fla.dtype == dtype
    assert o_fla.shape == o64.shape
    assert_close("o (fla vs float64)", o_fla, o64, fwd_tol)
    assert_close("S_T (fla vs float64)", s_fla, s64, fwd_tol)
    assert_close("o (fla vs torch)", o_fla, o_torch, 2 * fwd_tol)
    assert_close("S_T (fla vs torch)", s_fla, s_torch, 2 * fwd_tol)
    assert_took(fla_call)


@needs_fla
@pytest.mark.parametrize("alpha_mode", ["one", "tiny", "mixed"])
def test_fla_forward_alpha_edges_and_compute_dtype(alpha_mode, fla_call):
    inputs = _fla_case(torch.bfloat16, 130, 2, alpha_mode)
    o64, s64, _ = reference64(inputs)
    with torch.no_grad():
        for compute_dtype in (None, torch.float32):
            o, s = gated_delta_rule(
                *inputs.tensors()[:6], initial_state=inputs.initial_state, output_final_state=True,
                compute_dtype=compute_dtype, backend="fla",
            )  # fmt: skip
            tol = FLA_TOL[torch.bfloat16][0] if compute_dtype is None else 5e-3
            assert o.dtype == torch.bfloat16
            assert_close(f"o (compute_dtype={compute_dtype})", o, o64, tol)
            assert_close(f"S_T (compute_dtype={compute_dtype})", s, s64, tol)
    assert_took(fla_call)


@needs_fla
@needs_fla_backward
@pytest.mark.parametrize(("dtype", "v_heads"), [(torch.bfloat16, 2), (torch.bfloat16, 4), (torch.float16, 2)])
def test_fla_backward_matches_reference(dtype, v_heads, fla_call):
    fwd_tol, grad_tol, gate_tol = FLA_TOL[dtype]
    # The gate gradients (alpha, beta, D) get fla's looser tolerance for dbeta / dg.
    check_op(_fla_case(dtype, 130, v_heads), backend="fla", tol=fwd_tol, grad_tol=max(grad_tol, gate_tol))
    assert_took(fla_call)


@needs_fla
@needs_fla_backward
@pytest.mark.parametrize("loss", ["sum", "transposed-state"])
def test_fla_backward_with_expanded_or_transposed_cotangents(loss, fla_call):
    # S_T.sum() sends an expanded (all strides 0) gradient, a reader of S_T.mT a transposed one:
    # fla's kernels read them densely, so the wrapper must hand them over contiguous.
    inputs = _fla_case(torch.bfloat16, 70, 2)
    leaves = [t.detach().requires_grad_() for t in inputs.tensors()]
    o, final_state = gated_delta_rule(
        *leaves[:6], initial_state=leaves[6], output_final_state=True, backend="fla"
    )
    o64, final64, leaves64 = reference64(inputs)
    weight = make_tensor(*final_state.shape[:2], 64, 64, seed=14, device="cuda")
    if loss == "sum":
        objective = lambda out, final: out.sum() + final.sum()
    else:
        objective = lambda out, final: out.sum() + (final.mT * weight.to(final.dtype)).sum()
    grads = torch.autograd.grad(objective(o.float(), final_state), leaves)
    grads64 = torch.autograd.grad(objective(o64, final64), leaves64)
    _, grad_tol, gate_tol = FLA_TOL[torch.bfloat16]
    for name, grad, grad64 in zip(NAMES, grads, grads64, strict=True):
        assert_close(f"d{name}", grad, grad64, max(grad_tol, gate_tol))
    assert_took(fla_call)


@needs_fla
@needs_fla_backward
@pytest.mark.parametrize("layout", ["unpacked", "packed"])
def test_fla_backward_compute_dtype_partial_grads_and_no_state(layout, fla_call):
    # float32 compute for bf16 inputs, no D and no initial state, only some inputs requiring
    # grad, and a final state that is returned but gets no gradient.
    inputs = _fla_case(torch.bfloat16, 70, 2)
    q, k, v, alpha, beta, _, _ = inputs.tensors()
    q, alpha = q.detach().requires_grad_(), alpha.detach().requires_grad_()
    num_heads = None
    args = [q, k, v]
    if layout == "packed":
        args, num_heads = [t.flatten(2) for t in args], 2
    o, _ = gated_delta_rule(
        *args,
        alpha,
        beta,
        None,
        num_heads,
        output_final_state=True,
        compute_dtype=torch.float32,
        backend="fla",
    )
    grad_o = make_tensor(*o.shape, seed=13, dtype=o.dtype, device=o.device)
    dq, dalpha = torch.autograd.grad(o, (q, alpha), grad_o)
    inputs64 = Inputs(q, k, v, alpha, beta, None, None)
    o64, _, leaves64 = reference64(inputs64)
    if layout == "packed":
        o64 = o64.flatten(2)
    dq64, dalpha64 = torch.autograd.grad(o64, (leaves64[0], leaves64[3]), grad_o.double())
    assert_close("o", o, o64, 5e-3)
    assert_close("dq", dq, dq64, 1e-2)
    assert_close("dalpha", dalpha, dalpha64, 2e-2)
    assert dq.dtype == torch.bfloat16
    assert dalpha.dtype == torch.bfloat16
    assert_took(fla_call)


@needs_fla
@pytest.mark.skipif(FLA_BWD_REASON is None, reason="fla's backward runs here: nothing to refuse")
def test_fla_backward_refusal_is_detected_up_front():
    inputs = _fla_case(torch.bfloat16, 64, 2)
    leaves = [t.detach().requires_grad_() for t in inputs.tensors()[:6]]
    with pytest.raises(RuntimeError, match=r"3\.7\.1"):
        gated_delta_rule(*leaves, backend="fla")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        o = gated_delta_rule(*leaves, backend="auto")  # routed to torch, with a warning
    assert any("PyTorch backend" in str(w.message) for w in caught)
    o.float().sum().backward()
    assert all(t.grad is not None for t in leaves)
    with torch.no_grad():
        gated_delta_rule(*leaves, backend="fla")  # the forward alone runs on fla


def test_torch_backend_traces_under_torch_compile():
    """The torch backend (and auto's choice on CPU) traces in one graph: no graph breaks."""
    inputs = make_inputs(1, 70, 2, 8, 8, seed=37)
    args = inputs.tensors()[:6]
    expected = gated_delta_rule(*args, backend="torch")
    compiled = torch.compile(lambda *xs: gated_delta_rule(*xs), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(*args), expected)


def test_fused_fla_node_only_on_fla_0_6_without_a_whole_op_backend(monkeypatch):
    # CPU: which fla internals the fused node may call (no kernel runs).
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import fla.backends
            from fla.ops.gated_delta_rule import chunk
    except Exception as error:  # fla-core not installed or not importable here
        pytest.skip(f"fla.ops.gated_delta_rule does not import: {error}")
    monkeypatch.setattr(_fla, "_fla_chunk_functions", _fla._fla_chunk_functions.__wrapped__)
    if _fla.FLA_VERSION.startswith("0.6."):
        assert _fla.fused_entry_points() == (
            chunk.chunk_gated_delta_rule_fwd,
            chunk.chunk_gated_delta_rule_bwd,
        )
    for version in ("0.5.9", "0.7.0", "1.6.0"):
        monkeypatch.setattr(_fla, "FLA_VERSION", version)
        assert _fla.fused_entry_points() is None, version
    monkeypatch.setattr(_fla, "FLA_VERSION", "0.6.0")
    assert _fla.fused_entry_points() is not None
    # A whole-op backend fla would dispatch to (FlashQLA installed and enabled): the public path.
    registry = fla.backends._operation_registries["gated_delta_rule"]
    monkeypatch.setattr(registry, "get_active", lambda: object())
    assert _fla.fused_entry_points() is None
    # Internals renamed: the public path.
    monkeypatch.undo()
    monkeypatch.setattr(_fla, "_fla_chunk_functions", _fla._fla_chunk_functions.__wrapped__)
    monkeypatch.setattr(
        chunk, "chunk_gated_delta_rule_bwd", lambda q, k, v, g, beta, A, scale, h0, do, dht: None
    )
    assert _fla.fused_entry_points() is None
