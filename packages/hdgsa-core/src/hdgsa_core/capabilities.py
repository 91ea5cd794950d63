"""What this machine can run: computed once, cheaply, at import.

Nothing here imports Triton or fla (both are slow to import and may be broken);
presence is read from the import system and versions from package metadata.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import re

import torch

__all__ = [
    "FLA_MIN_VERSION",
    "FLA_VERSION",
    "HAS_CUDA",
    "HAS_FLA",
    "HAS_TRITON",
    "NUMPY_VERSION",
    "TRITON_VERSION",
    "capabilities",
    "fla_unusable_reason",
    "interpreter_enabled",
    "parse_version",
]

FLA_MIN_VERSION = (0, 6)


def parse_version(text: str | None) -> tuple[int, ...]:
    """Leading numeric release parts of a version string: "3.7.1+git" -> (3, 7, 1); None -> ()."""
    if not text:
        return ()
    match = re.match(r"(\d+(?:\.\d+)*)", text)
    return tuple(int(part) for part in match.group(1).split(".")) if match else ()


def _distribution_version(*names: str) -> str | None:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _module_present(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


TRITON_VERSION: str | None = (
    _distribution_version("triton", "pytorch-triton") if _module_present("triton") else None
)
HAS_TRITON: bool = TRITON_VERSION is not None
FLA_VERSION: str | None = _distribution_version("fla-core", "flash-linear-attention")
HAS_FLA: bool = HAS_TRITON and _module_present("fla") and parse_version(FLA_VERSION) >= FLA_MIN_VERSION
HAS_CUDA: bool = torch.cuda.is_available()
# Triton's interpreter (TRITON_INTERPRET=1) runs kernels on numpy arrays; compiled kernels do not need it.
NUMPY_VERSION: str | None = _distribution_version("numpy") if _module_present("numpy") else None


def interpreter_enabled() -> bool:
    """True when ``TRITON_INTERPRET=1``: Triton kernels then run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def fla_unusable_reason() -> str | None:
    """Why ``HAS_FLA`` is False although fla-core is installed, or None (fla usable, or simply
    not installed). Read from the same facts as ``HAS_FLA``; nothing is imported."""
    if HAS_FLA or FLA_VERSION is None:
        return None
    if not HAS_TRITON:
        return f"fla-core {FLA_VERSION} is installed but Triton is not (fla's kernels are Triton kernels)"
    if not _module_present("fla"):
        return f"fla-core {FLA_VERSION} is installed but its module `fla` cannot be found"
    wanted = ".".join(map(str, FLA_MIN_VERSION))
    return f"fla-core {FLA_VERSION} is older than {wanted} (pip install -U 'fla-core>={wanted}')"


def capabilities() -> dict[str, object]:
    """Versions, flags and devices, as a plain dict (what ``hdgsa-kernels info`` prints)."""
    devices = (
        [torch.cuda.get_device_name(index) for index in range(torch.cuda.device_count())] if HAS_CUDA else []
    )
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": TRITON_VERSION,
        "fla-core": FLA_VERSION,
        "numpy": NUMPY_VERSION,
        "cuda_runtime": torch.version.cuda,
        "HAS_TRITON": HAS_TRITON,
        "HAS_FLA": HAS_FLA,
        "HAS_CUDA": HAS_CUDA,
        "cuda_devices": devices,
        "triton_interpreter": interpreter_enabled(),
        "HDGSA_BACKEND": os.environ.get("HDGSA_BACKEND"),
    }
