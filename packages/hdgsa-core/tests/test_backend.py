import pytest
import torch

import hdgsa_core
from hdgsa_core import BACKEND_ENV_VAR, resolve_backend, runnable_backends

CPU = torch.device("cpu")


def _reason_never(device: torch.device) -> None:
    return None


def _reason_always(device: torch.device) -> str:
    return "no accelerator in this test"


def test_unknown_backend_is_value_error():
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("cuda", CPU, op="some_op")


def test_unknown_env_override_is_value_error(monkeypatch):
    monkeypatch.setenv(BACKEND_ENV_VAR, "fast")
    with pytest.raises(ValueError, match=BACKEND_ENV_VAR):
        resolve_backend("auto", CPU, op="some_op")


def test_auto_picks_accelerated_only_when_it_can_run(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV_VAR, raising=False)
    assert resolve_backend("auto", CPU, op="o", unavailable_reason=_reason_never) == "triton"
    assert resolve_backend("auto", CPU, op="o", unavailable_reason=_reason_always) == "torch"
    assert (
        resolve_backend("auto", CPU, op="o", implemented=False, unavailable_reason=_reason_never) == "torch"
    )


def test_env_override_beats_auto(monkeypatch):
    monkeypatch.setenv(BACKEND_ENV_VAR, "torch")
    assert resolve_backend("auto", CPU, op="o", unavailable_reason=_reason_never) == "torch"
    monkeypatch.setenv(BACKEND_ENV_VAR, "triton")
    assert resolve_backend("auto", CPU, op="o", accelerated="fla", unavailable_reason=_reason_never) == "fla"
    with pytest.raises(RuntimeError, match="no accelerator in this test"):
        resolve_backend("auto", CPU, op="o", unavailable_reason=_reason_always)


def test_explicit_backend_that_cannot_run_raises(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV_VAR, raising=False)
    with pytest.raises(RuntimeError, match="not implemented yet"):
        resolve_backend("triton", CPU, op="o", implemented=False, unavailable_reason=_reason_never)
    with pytest.raises(RuntimeError, match="o: backend='triton' cannot run here: no accelerator"):
        resolve_backend("triton", CPU, op="o", unavailable_reason=_reason_always)
    assert resolve_backend("torch", CPU, op="o", unavailable_reason=_reason_never) == "torch"


def test_fla_name_replaces_triton():
    with pytest.raises(ValueError):
        resolve_backend("triton", CPU, op="o", accelerated="fla")
    assert resolve_backend("fla", CPU, op="o", accelerated="fla", unavailable_reason=_reason_never) == "fla"


def test_triton_on_cpu_follows_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    reason = hdgsa_core.triton_unavailable_reason(CPU)
    assert reason is not None
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    can_run = hdgsa_core.HAS_TRITON and hdgsa_core.NUMPY_VERSION is not None
    expected = None if can_run else hdgsa_core.triton_unavailable_reason(CPU)
    assert hdgsa_core.triton_unavailable_reason(CPU) == expected


def test_interpreter_without_numpy_is_a_reason(monkeypatch):
    """Triton's interpreter runs kernels on numpy arrays: ``auto`` must not pick it without numpy."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(hdgsa_core.backend, "HAS_TRITON", True)
    monkeypatch.setattr(hdgsa_core.backend, "NUMPY_VERSION", None)
    reason = hdgsa_core.triton_unavailable_reason(CPU)
    assert reason is not None
    assert "needs numpy" in reason
    monkeypatch.delenv(BACKEND_ENV_VAR, raising=False)
    assert resolve_backend("auto", CPU, op="o") == "torch"
    with pytest.raises(RuntimeError, match="needs numpy"):
        resolve_backend("triton", CPU, op="o")
    monkeypatch.setattr(hdgsa_core.backend, "NUMPY_VERSION", "2.0.0")
    assert hdgsa_core.triton_unavailable_reason(CPU) is None


def test_runnable_backends_lists_torch_first():
    assert runnable_backends(CPU, unavailable_reason=_reason_never) == ["torch", "triton"]
    assert runnable_backends(CPU, unavailable_reason=_reason_always) == ["torch"]
    assert runnable_backends(CPU, implemented=False, unavailable_reason=_reason_never) == ["torch"]


def test_capabilities_reports_flags():
    caps = hdgsa_core.capabilities()
    assert caps["HAS_TRITON"] is hdgsa_core.HAS_TRITON
    assert caps["HAS_FLA"] is hdgsa_core.HAS_FLA
    assert caps["torch"] == torch.__version__
    assert caps["numpy"] == hdgsa_core.NUMPY_VERSION
    assert isinstance(caps["cuda_devices"], list)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("3.7.1", (3, 7, 1)),
        ("0.6.0.dev1+g12", (0, 6, 0)),
        ("2.11.0+cu130", (2, 11, 0)),
        (None, ()),
        ("abc", ()),
    ],
)
def test_parse_version(text, expected):
    assert hdgsa_core.parse_version(text) == expected
