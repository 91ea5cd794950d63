import pytest
import torch

from hdgsa_core.triton_utils import autotune_configs, device_guard, next_power_of_2, on_input_device


def test_autotune_configs_keeps_one_under_the_interpreter(monkeypatch):
    configs = ["small", "medium", "large"]
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert autotune_configs(configs) == ["small"]
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert autotune_configs(configs) == configs


@pytest.mark.parametrize(("n", "expected"), [(0, 1), (1, 1), (2, 2), (3, 4), (64, 64), (65, 128)])
def test_next_power_of_2(n, expected):
    assert next_power_of_2(n) == expected


def test_device_guard_is_a_no_op_off_cuda():
    with device_guard(torch.device("cpu")):
        pass

    @on_input_device
    def launcher(tensor, scale):
        return tensor * scale

    assert torch.equal(launcher(torch.ones(2), 3.0), torch.full((2,), 3.0))
