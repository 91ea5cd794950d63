"""install_dev's pip arguments: the default (what CI runs) is unchanged by --cpu's option."""

from __future__ import annotations

import install_dev


def test_default_install_uses_no_extra_index() -> None:
    args = install_dev.install_args(triton=True, constraints=True)
    assert "--extra-index-url" not in args
    assert args[:2] == ["-c", str(install_dev.CONSTRAINTS)]


def test_cpu_adds_pytorch_cpu_index_and_keeps_the_pins() -> None:
    args = install_dev.install_args(triton=True, constraints=True, cpu_index=True)
    assert args[:2] == ["--extra-index-url", "https://download.pytorch.org/whl/cpu"]
    assert ["-c", str(install_dev.CONSTRAINTS)] == args[2:4]
    assert args[4:] == install_dev.install_args(triton=True, constraints=True)[2:]
