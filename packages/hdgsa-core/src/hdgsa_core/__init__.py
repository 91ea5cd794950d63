"""hdgsa-core: capability flags, backend choice, argument checks and shared helpers for the
hdgsa kernel packages."""

from .autocast import autocast_disabled
from .backend import BACKEND_ENV_VAR, resolve_backend, runnable_backends, triton_unavailable_reason
from .capabilities import (
    FLA_VERSION,
    HAS_CUDA,
    HAS_FLA,
    HAS_TRITON,
    NUMPY_VERSION,
    TRITON_VERSION,
    capabilities,
    interpreter_enabled,
    parse_version,
)
from .checks import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_bool,
    check_dtype,
    check_index_range,
    check_int,
    check_ndim,
    check_real,
    check_same_device,
    check_same_dtype,
    check_shape,
    check_tensor,
)

__version__ = "0.1.0"

__all__ = [
    "BACKEND_ENV_VAR",
    "FLA_VERSION",
    "FLOAT_DTYPES",
    "HAS_CUDA",
    "HAS_FLA",
    "HAS_TRITON",
    "INDEX_DTYPES",
    "NUMPY_VERSION",
    "TRITON_VERSION",
    "__version__",
    "autocast_disabled",
    "capabilities",
    "check_bool",
    "check_dtype",
    "check_index_range",
    "check_int",
    "check_ndim",
    "check_real",
    "check_same_device",
    "check_same_dtype",
    "check_shape",
    "check_tensor",
    "interpreter_enabled",
    "parse_version",
    "resolve_backend",
    "runnable_backends",
    "triton_unavailable_reason",
]
