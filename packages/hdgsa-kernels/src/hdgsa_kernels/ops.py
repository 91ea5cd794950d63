"""The op packages the command line knows, by the short name users type."""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["OP_PACKAGES", "import_op_module", "resolve_op_names"]

# short name -> import name of the op package
OP_PACKAGES: dict[str, str] = {
    "rmsnorm": "hdgsa_rmsnorm",
    "sinkhorn": "hdgsa_sinkhorn",
    "indexer": "hdgsa_indexer",
    "sparse-attn": "hdgsa_sparse_attn",
    "deltanet": "hdgsa_deltanet_fla",
}
_ALIASES = {
    "sparse": "sparse-attn",
    "sparse_attn": "sparse-attn",
    "deltanet-fla": "deltanet",
    "rms_norm": "rmsnorm",
}


def resolve_op_names(names: list[str] | None) -> list[str]:
    """Short op names in registry order; all of them when ``names`` is empty.

    Raises:
        ValueError: an unknown name (the message lists the known ones).
    """
    if not names:
        return list(OP_PACKAGES)
    chosen = []
    for name in names:
        key = _ALIASES.get(name, name)
        if key not in OP_PACKAGES:
            raise ValueError(f"unknown op {name!r}; expected one of {', '.join(OP_PACKAGES)}")
        if key not in chosen:
            chosen.append(key)
    return [name for name in OP_PACKAGES if name in chosen]


def import_op_module(op: str, submodule: str) -> ModuleType:
    """``import_op_module("rmsnorm", "bench")`` -> the module ``hdgsa_rmsnorm.bench``."""
    return importlib.import_module(f"{OP_PACKAGES[op]}.{submodule}")
