import importlib.metadata

import pytest
import torch

import hdgsa_kernels
from hdgsa_core import HAS_TRITON, interpreter_enabled
from hdgsa_core.testing import assert_close, make_tensor

SEED_NAMES = [
    "HAS_TRITON",
    "HAS_FLA",
    "triton_sparse_attention",
    "pytorch_sparse_attention",
    "triton_gated_indexer",
    "pytorch_gated_indexer",
    "triton_sinkhorn_knopp",
    "pytorch_sinkhorn_knopp",
    "triton_rmsnorm",
    "pytorch_rmsnorm",
    "TritonRMSNorm",
    "fla_gated_delta_rule",
]
UNIFIED_NAMES = [
    "rms_norm",
    "RMSNorm",
    "sinkhorn_knopp",
    "gated_indexer",
    "indexer_topk",
    "indexer_scores_at",
    "sparse_attention",
    "gated_delta_rule",
]
TRITON_RUNS_ON_CPU = HAS_TRITON and interpreter_enabled()


@pytest.mark.parametrize("name", SEED_NAMES + UNIFIED_NAMES)
def test_name_is_exported(name):
    assert name in hdgsa_kernels.__all__
    assert getattr(hdgsa_kernels, name) is not None


def test_flags_are_the_core_flags():
    import hdgsa_core

    assert hdgsa_kernels.HAS_TRITON is hdgsa_core.HAS_TRITON
    assert hdgsa_kernels.HAS_FLA is hdgsa_core.HAS_FLA


def test_pins_match_member_versions():
    requirements = importlib.metadata.requires("hdgsa-kernels") or []
    pins = {
        req.split("~=")[0].strip(): req.split("~=")[1].split(";")[0].strip()
        for req in requirements
        if "~=" in req
    }
    assert len(pins) == 6
    for member, pin in pins.items():
        assert importlib.metadata.version(member) == pin, member


def test_pytorch_rmsnorm_matches_rms_norm_and_returns_y_only():
    x, residual = make_tensor(3, 10, seed=1), make_tensor(3, 10, seed=2)
    weight = make_tensor(10, seed=3)
    y = hdgsa_kernels.pytorch_rmsnorm(x, weight, 1e-5, residual)
    assert isinstance(y, torch.Tensor)
    expected = hdgsa_kernels.rms_norm(x, weight, 1e-5, residual, backend="torch")
    assert torch.equal(y, expected)


def test_pytorch_sinkhorn_matches_sinkhorn_knopp():
    logits = make_tensor(5, 4, 4, seed=4)
    assert torch.equal(
        hdgsa_kernels.pytorch_sinkhorn_knopp(logits, 7, 1e-8),
        hdgsa_kernels.sinkhorn_knopp(logits, 7, 1e-8, backend="torch"),
    )


def test_pytorch_gated_indexer_matches_gated_indexer():
    q, k = make_tensor(1, 5, 2, 8, seed=5), make_tensor(1, 5, 8, seed=6)
    w, bias = make_tensor(1, 5, 2, seed=7), make_tensor(2, seed=8)
    expected = hdgsa_kernels.gated_indexer(q, k, w, bias, 0.5, True, backend="torch")
    assert torch.equal(hdgsa_kernels.pytorch_gated_indexer(q, k, w, bias, 0.5, True), expected)


def test_pytorch_sparse_attention_matches_sparse_attention():
    q, k, v = (
        make_tensor(1, 4, 2, 8, seed=9),
        make_tensor(1, 4, 2, 8, seed=10),
        make_tensor(1, 4, 2, 8, seed=11),
    )
    indices = (
        torch.tensor([[[0, -1], [0, 1], [1, 2], [3, 0]]]).expand(1, 4, 2).unsqueeze(1).expand(1, 2, 4, 2)
    )
    expected = hdgsa_kernels.sparse_attention(q, k, v, indices, backend="torch")
    assert torch.equal(hdgsa_kernels.pytorch_sparse_attention(q, k, v, indices), expected)


def test_fla_gated_delta_rule_takes_seed_positional_arguments():
    B, T, H, K = 1, 5, 2, 8
    q, k, v = (make_tensor(B, T, H * K, seed=s) for s in (12, 13, 14))
    k = torch.nn.functional.normalize(k.view(B, T, H, K), dim=-1).view(B, T, H * K)
    alpha = torch.sigmoid(make_tensor(B, T, H, seed=15))
    beta = torch.sigmoid(make_tensor(B, T, H, seed=16))
    D = make_tensor(H, seed=17)
    out = hdgsa_kernels.fla_gated_delta_rule(q, k, v, alpha, beta, D, H)
    expected = hdgsa_kernels.gated_delta_rule(q, k, v, alpha, beta, D, H, backend="auto")
    assert out.shape == (B, T, H * K)
    assert_close("o", out, expected, 1e-6)


def test_triton_rms_norm_module_is_an_rmsnorm():
    module = hdgsa_kernels.TritonRMSNorm(12, 1e-5)
    assert isinstance(module, hdgsa_kernels.RMSNorm)
    x = make_tensor(2, 12, seed=18)
    assert_close("y", module(x), hdgsa_kernels.rms_norm(x, module.weight, 1e-5, backend="torch"), 1e-5)


@pytest.mark.skipif(TRITON_RUNS_ON_CPU, reason="Triton runs on CPU here (TRITON_INTERPRET=1)")
def test_triton_names_raise_where_triton_cannot_run():
    with pytest.raises(RuntimeError, match="triton"):
        hdgsa_kernels.triton_sinkhorn_knopp(make_tensor(2, 4, 4, seed=19))
    with pytest.raises(RuntimeError, match="triton"):
        hdgsa_kernels.triton_rmsnorm(make_tensor(2, 8, seed=20))


@pytest.mark.skipif(not TRITON_RUNS_ON_CPU, reason="needs Triton with TRITON_INTERPRET=1")
def test_triton_names_run_the_triton_backend_on_cpu_interpreter():
    logits = make_tensor(3, 4, 4, seed=21)
    assert_close(
        "P", hdgsa_kernels.triton_sinkhorn_knopp(logits), hdgsa_kernels.pytorch_sinkhorn_knopp(logits), 1e-5
    )
    x, weight = make_tensor(3, 40, seed=22), make_tensor(40, seed=23)
    assert_close("y", hdgsa_kernels.triton_rmsnorm(x, weight), hdgsa_kernels.pytorch_rmsnorm(x, weight), 1e-5)
    q, k = make_tensor(1, 5, 2, 8, seed=24), make_tensor(1, 5, 8, seed=25)
    w, bias = make_tensor(1, 5, 2, seed=26), make_tensor(2, seed=27)
    assert_close(
        "scores",
        hdgsa_kernels.triton_gated_indexer(q, k, w, bias, 0.5, True),
        hdgsa_kernels.pytorch_gated_indexer(q, k, w, bias, 0.5, True),
        1e-5,
    )
