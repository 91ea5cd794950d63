"""The two Triton kernels of the fla path (alpha -> log-decay, D skip) against PyTorch in float64.

They run on CUDA, or on CPU under TRITON_INTERPRET=1; the fla call between them needs CUDA and is
tested in test_gated_delta_rule.py.
"""

from __future__ import annotations

import concurrent.futures

import pytest
import torch

from hdgsa_core import triton_unavailable_reason
from hdgsa_core.testing import assert_close, make_tensor
from hdgsa_deltanet_fla.reference import ALPHA_MIN

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
RUNNABLE = [device for device in DEVICES if triton_unavailable_reason(torch.device(device)) is None]
if not RUNNABLE:
    pytest.skip(
        f"Triton cannot run here: {triton_unavailable_reason(torch.device('cpu'))}", allow_module_level=True
    )


@pytest.mark.parametrize("device", RUNNABLE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_log_decay(device, dtype):
    from hdgsa_deltanet_fla import _triton

    # A strided view (alpha sliced out of a wider projection), values across the clamp.
    wide = torch.sigmoid(make_tensor(3, 37, 10, seed=1, scale=4.0, dtype=torch.float64))
    wide[0, :5] = 1e-9
    wide[1, :3] = 1.0
    wide[2, 0, 0] = ALPHA_MIN
    alpha = wide.to(device=device, dtype=dtype)[..., 1:6].requires_grad_()
    assert not alpha.is_contiguous()
    g = _triton.log_decay(alpha)
    assert g.dtype == torch.float32
    assert g.shape == alpha.shape
    assert g.is_contiguous()
    alpha64 = alpha.detach().double().requires_grad_()
    g64 = alpha64.clamp(min=ALPHA_MIN).log()
    assert_close("g", g, g64, 1e-6)
    dg = make_tensor(*g.shape, seed=2, device=device)
    (dalpha,) = torch.autograd.grad(g, alpha, dg)
    (dalpha64,) = torch.autograd.grad(g64, alpha64, dg.double())
    assert dalpha.dtype == dtype
    assert_close("dalpha", dalpha, dalpha64, 1e-6 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("device", RUNNABLE)
@pytest.mark.parametrize(
    ("o_dtype", "v_dtype", "out_dtype"),
    [
        (torch.float32, torch.float32, torch.float32),
        (torch.bfloat16, torch.bfloat16, torch.bfloat16),
        (torch.float32, torch.bfloat16, torch.bfloat16),  # compute_dtype=float32: fused cast back
    ],
    ids=["fp32", "bf16", "fp32-to-bf16"],
)
@pytest.mark.parametrize("head_dim_v", [1, 20, 64])
def test_d_skip(device, o_dtype, v_dtype, out_dtype, head_dim_v):
    from hdgsa_deltanet_fla import _triton

    batch, seq_len, heads = 2, 45, 3
    o = make_tensor(batch, seq_len, heads, head_dim_v, seed=3, device=device, dtype=o_dtype).requires_grad_()
    # v as a strided view: rows of a wider buffer (the packed layout's split heads look alike).
    v_wide = make_tensor(batch, seq_len, heads, head_dim_v + 3, seed=4, device=device, dtype=v_dtype)
    v = v_wide[..., :head_dim_v].requires_grad_()
    D = make_tensor(heads, seed=5, device=device).requires_grad_()
    y = _triton.d_skip(o, v, D, out_dtype)
    assert y.dtype == out_dtype
    assert y.is_contiguous()
    o64, v64, D64 = (t.detach().double().requires_grad_() for t in (o, v, D))
    y64 = o64 + D64[:, None] * v64
    tol = 1e-6 if out_dtype == torch.float32 else 1e-2
    assert_close("y", y, y64, tol)
    dy = make_tensor(*y.shape, seed=6, device=device, dtype=out_dtype)
    grads = torch.autograd.grad(y, (o, v, D), dy)
    grads64 = torch.autograd.grad(y64, (o64, v64, D64), dy.double())
    for name, grad, grad64, leaf in zip(("do", "dv", "dD"), grads, grads64, (o, v, D), strict=True):
        assert grad.dtype == leaf.dtype, name
        assert grad.shape == leaf.shape, name
        assert_close(name, grad, grad64, 1e-5 if grad.dtype == torch.float32 else 1e-2)
    # Deterministic: dD is a fixed-order sum of per-block partials.
    again = torch.autograd.grad(_triton.d_skip(o, v, D, out_dtype), (D,), dy)[0]
    assert torch.equal(again, grads[2])


@pytest.mark.parametrize("device", RUNNABLE)
def test_d_skip_backward_adds_into_a_given_dv(device):
    from hdgsa_deltanet_fla import _triton

    batch, seq_len, heads, head_dim_v = 2, 45, 3, 20
    dy = make_tensor(batch, seq_len, heads, head_dim_v, seed=7, device=device, dtype=torch.bfloat16)
    v = make_tensor(batch, seq_len, heads, head_dim_v, seed=8, device=device, dtype=torch.bfloat16)
    D = make_tensor(heads, seed=9, device=device)
    dv_base = make_tensor(batch, seq_len, heads, head_dim_v, seed=10, device=device, dtype=torch.bfloat16)
    expected = dv_base.double() + D.double()[:, None] * dy.double()
    dv, dD = _triton.d_skip_bwd(dy, v, D, dv_base=dv_base.clone())
    assert dv.dtype == torch.bfloat16
    assert_close("dv", dv, expected, 8e-3)
    assert_close("dD", dD, (dy.double() * v.double()).sum((0, 1, 3)), 1e-5)


# ---------------------------------------------------------------------------------------------
# The fused fla node (FusedGatedDeltaRule) with stand-ins for fla's chunked forward and backward
# built on the torch backend: checks our part of the node (alpha -> log-decay and its gradient,
# the D skip and its gradients, dtypes, the state's gradient) on CPU, without fla or a GPU.
# ---------------------------------------------------------------------------------------------


def _stand_in_fla_forward(*, q, k, v, g, beta, scale, initial_state, output_final_state):
    from hdgsa_deltanet_fla.reference import chunk_gated_delta_rule_torch

    o, final_state = chunk_gated_delta_rule_torch(q, k, v, g, beta, scale, initial_state)
    # fla returns (chunk-local cumsum of g, o in q's dtype, A, S_T or None, ...); the stand-in's
    # "cumsum" is g itself, which its backward reads back.
    return g, o.to(q.dtype), g.new_empty(0), final_state if output_final_state else None, None, None


def _stand_in_fla_backward(*, q, k, v, g, beta, A, scale, initial_state, do, dht):
    from hdgsa_deltanet_fla.reference import chunk_gated_delta_rule_torch

    assert A.numel() == 0  # the forward's A came back
    # fla's kernels read do and dht densely, ignoring strides: the node must make them contiguous.
    assert do.is_contiguous()
    assert dht is None or dht.is_contiguous()
    leaves = [t.detach().requires_grad_() for t in (q, k, v, g, beta)]
    state = None if initial_state is None else initial_state.detach().requires_grad_()
    with torch.enable_grad():  # a backward runs with grad mode off
        o, final_state = chunk_gated_delta_rule_torch(*leaves, scale, state)
        objective = (o * do.float()).sum() + (0 if dht is None else (final_state * dht).sum())
        grads = torch.autograd.grad(objective, leaves + ([] if state is None else [state]))
    dq, dk, dv, dg, dbeta = (grad.to(leaf.dtype) for grad, leaf in zip(grads[:5], leaves, strict=True))
    dinitial_state = grads[5].to(initial_state.dtype) if state is not None else None
    return dq, dk, dv, dbeta, dg, dinitial_state, None, None


# name: (q/k/v dtype, which inputs require grad, the loss, D and initial_state present,
# compute_dtype casts q, k, v before the node: the D skip then reads the caller's v, v_skip).
_FUSED_CASES = {
    "fp32": (torch.float32, "qkvabDs", "dense", True, False),
    "fp32-noD-noh0": (torch.float32, "qkvab", "dense", False, False),
    "sum-loss": (torch.float32, "qkvabDs", "sum", True, False),  # expanded (stride 0) cotangents
    "transposed-state-loss": (torch.float32, "qkvabDs", "transposed", True, False),
    "bf16-fp32-gates": (torch.bfloat16, "qkvabDs", "dense", True, False),
    "D-frozen": (torch.float32, "qkvabs", "dense", True, False),
    "v-frozen": (torch.float32, "qkabDs", "dense", True, False),
    "compute-bf16": (torch.float32, "qkvabDs", "dense", True, True),
}


@pytest.mark.parametrize("device", RUNNABLE)
@pytest.mark.parametrize("case", list(_FUSED_CASES))
def test_fused_node_around_stand_in_fla(device, case):
    from hdgsa_deltanet_fla._fla_fused import FusedGatedDeltaRule
    from hdgsa_deltanet_fla.reference import recurrent_gated_delta_rule_reference

    dtype, requires, loss, with_D_and_state, compute_bf16 = _FUSED_CASES[case]
    batch, seq_len, heads, v_heads, head_dim_k, head_dim_v = 2, 37, 1, 2, 8, 12  # GVA, odd T
    q = make_tensor(batch, seq_len, heads, head_dim_k, seed=20, device=device, dtype=dtype)
    k = torch.nn.functional.normalize(
        make_tensor(batch, seq_len, heads, head_dim_k, seed=21, device=device), dim=-1
    ).to(dtype)
    v = make_tensor(batch, seq_len, v_heads, head_dim_v, seed=22, device=device, dtype=dtype)
    alpha = torch.sigmoid(make_tensor(batch, seq_len, v_heads, seed=23, device=device) + 2)
    alpha[:, ::7] = 1e-8  # clamped: no gradient there
    beta = torch.sigmoid(make_tensor(batch, seq_len, v_heads, seed=24, device=device))
    D = state = None
    if with_D_and_state:
        D = make_tensor(v_heads, seed=25, device=device)
        state = make_tensor(batch, v_heads, head_dim_k, head_dim_v, seed=26, device=device, dtype=dtype)
    inputs = {"q": q, "k": k, "v": v, "a": alpha, "b": beta, "D": D, "s": state}
    leaves = {
        name: None if t is None else t.clone().requires_grad_(name in requires) for name, t in inputs.items()
    }
    q_in, k_in, v_in, v_skip = leaves["q"], leaves["k"], leaves["v"], None
    if compute_bf16:
        q_in, k_in, v_in = (t.to(torch.bfloat16) for t in (q_in, k_in, v_in))
        v_skip = leaves["v"]
    scale = 0.3
    o, final_state = FusedGatedDeltaRule.apply(
        _stand_in_fla_forward, _stand_in_fla_backward, q_in, k_in, v_in, leaves["a"], leaves["b"],
        leaves["D"], v_skip, leaves["s"], scale, True, dtype,
    )  # fmt: skip
    assert o.dtype == dtype
    assert final_state.dtype == torch.float32

    leaves64 = {name: None if t is None else t.double().requires_grad_() for name, t in inputs.items()}
    o64, final64 = recurrent_gated_delta_rule_reference(
        leaves64["q"], leaves64["k"], leaves64["v"], leaves64["a"].clamp(min=ALPHA_MIN).log(),
        leaves64["b"], scale, leaves64["s"],
    )  # fmt: skip
    if D is not None:
        o64 = o64 + leaves64["D"][:, None] * leaves64["v"]
    tol = 1e-5 if dtype == torch.float32 and not compute_bf16 else 2e-2
    assert_close("o", o, o64, tol)
    assert_close("S_T", final_state, final64, tol)

    if loss == "dense":
        do = make_tensor(*o.shape, seed=27, device=device, dtype=dtype)
        dfinal = make_tensor(*final_state.shape, seed=28, device=device)
        objective = lambda out, final: (out * do.to(out.dtype)).sum() + (final * dfinal.to(final.dtype)).sum()
    elif loss == "sum":
        objective = lambda out, final: out.sum() + final.sum()
    else:  # a consumer of S_T^T: its cotangent arrives transposed
        weight = make_tensor(batch, v_heads, head_dim_v, head_dim_k, seed=29, device=device)
        objective = lambda out, final: out.sum() + (final.mT * weight.to(final.dtype)).sum()
    wrt = [name for name in leaves if leaves[name] is not None and name in requires]
    grads = torch.autograd.grad(objective(o.float(), final_state), [leaves[name] for name in wrt])
    grads64 = torch.autograd.grad(objective(o64, final64), [leaves64[name] for name in wrt])
    for name, grad, grad64 in zip(wrt, grads, grads64, strict=True):
        assert grad.dtype == leaves[name].dtype, name
        assert grad.shape == leaves[name].shape, name
        assert_close(f"d{name}", grad, grad64, tol)
    if "a" in wrt:
        assert torch.all(grads[wrt.index("a")][:, ::7] == 0)  # the clamped alphas


# ---------------------------------------------------------------------------------------------
# The same node as the custom ops that torch.compile traces (hdgsa::gated_delta_rule_fla_fwd /
# _bwd), with stand-ins that return fla 0.6's A shape ([B, T, HV, 64]), as the fake does.
# ---------------------------------------------------------------------------------------------


def _stand_in_fla_forward_with_A(*, q, k, v, g, beta, scale, initial_state, output_final_state):
    g_out, o, _, final_state, *rest = _stand_in_fla_forward(
        q=q, k=k, v=v, g=g, beta=beta, scale=scale, initial_state=initial_state,
        output_final_state=output_final_state,
    )  # fmt: skip
    A = k.new_zeros(*v.shape[:3], 64)
    return (g_out, o, A, final_state, *rest)


def _stand_in_fla_backward_with_A(*, A, **kwargs):
    assert A.shape[-1] == 64
    # The stand-in differentiates the torch backend with autograd, which the dispatcher keeps off
    # inside a custom op's implementation (thread-local): run it on a thread of its own. fla's
    # real backward is plain kernels and needs none of this.
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(_stand_in_fla_backward, A=A.new_empty(0), **kwargs).result()


def _fla_op_inputs(device, with_D_and_state=True):
    batch, seq_len, heads, v_heads, head_dim_k, head_dim_v = 2, 21, 1, 2, 8, 12
    q = make_tensor(batch, seq_len, heads, head_dim_k, seed=30, device=device, requires_grad=True)
    k = torch.nn.functional.normalize(
        make_tensor(batch, seq_len, heads, head_dim_k, seed=31, device=device), dim=-1
    )
    v = make_tensor(batch, seq_len, v_heads, head_dim_v, seed=32, device=device, requires_grad=True)
    alpha = torch.sigmoid(make_tensor(batch, seq_len, v_heads, seed=33, device=device) + 2).requires_grad_()
    beta = torch.sigmoid(make_tensor(batch, seq_len, v_heads, seed=34, device=device)).requires_grad_()
    D = state = None
    if with_D_and_state:
        D = make_tensor(v_heads, seed=35, device=device, requires_grad=True)
        state = make_tensor(
            batch, v_heads, head_dim_k, head_dim_v, seed=36, device=device, requires_grad=True
        )
    return (q, k.requires_grad_(), v, alpha, beta, D, None, state, 0.3, True, torch.float32)


@pytest.fixture
def stand_in_fla(monkeypatch):
    from hdgsa_deltanet_fla import _fla

    monkeypatch.setattr(
        _fla, "fused_entry_points", lambda: (_stand_in_fla_forward_with_A, _stand_in_fla_backward_with_A)
    )


@pytest.mark.parametrize("device", RUNNABLE)
@pytest.mark.parametrize("with_D_and_state", [True, False], ids=["D-state", "plain"])
def test_fla_custom_op_matches_the_node_and_compiles_whole(device, with_D_and_state, stand_in_fla):
    from hdgsa_deltanet_fla._fla_fused import FusedGatedDeltaRule, gated_delta_rule_fla_op

    args = _fla_op_inputs(device, with_D_and_state)
    leaves = [a for a in args if isinstance(a, torch.Tensor)]
    o, final_state = FusedGatedDeltaRule.apply(
        _stand_in_fla_forward_with_A, _stand_in_fla_backward_with_A, *args
    )
    expected = torch.autograd.grad((o * o).sum() + final_state.sum(), leaves)
    compiled = torch.compile(gated_delta_rule_fla_op, fullgraph=True, backend="aot_eager")
    o_op, final_op = compiled(*args)
    assert torch.equal(o_op, o)
    assert torch.equal(final_op, final_state)
    grads = torch.autograd.grad((o_op * o_op).sum() + final_op.sum(), leaves)
    for grad, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(grad, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", RUNNABLE)
def test_fla_custom_op_opcheck(device, stand_in_fla):
    from hdgsa_deltanet_fla import _fla_fused  # noqa: F401  (registers the custom ops)

    args = _fla_op_inputs(device)
    torch.library.opcheck(
        torch.ops.hdgsa.gated_delta_rule_fla_fwd,
        args,
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )
