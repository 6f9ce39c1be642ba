"""normexport: ship a regression network together with its normalization.

The public API::

    import normexport as nx
    in_sc = nx.MinMaxScaler().fit(X, columns=["a", "b", "c"])
    out_sc = nx.MinMaxScaler().fit(Y, columns=["u", "v"])
    nx.export(net, in_sc, out_sc, "model_dir")
    report = nx.verify("model_dir", X)

Heavy dependencies (MXNet, onnx, onnxruntime) are imported on first use.
"""

from __future__ import annotations

from typing import Any

from normexport.errors import (
    DataError,
    FormatError,
    GraphError,
    NormexportError,
    VerificationError,
)
from normexport.scaling import AffineScaler, MinMaxScaler, StandardScaler

__version__ = "0.1.0"

__all__ = [
    "AffineScaler",
    "DataError",
    "FormatError",
    "GraphError",
    "MinMaxScaler",
    "NormexportError",
    "StandardScaler",
    "VerificationError",
    "__version__",
    "bake",
    "export",
    "train",
    "verify",
]

# The functions live in modules whose names differ from theirs: a submodule called
# `train` would replace the function `normexport.train` the moment it is imported.
_LAZY = {
    "export": "normexport.pipeline",
    "verify": "normexport.pipeline",
    "train": "normexport.training",
    "bake": "normexport.baking",
}


def __getattr__(name: str) -> Any:
    # Lazy so that `import normexport` (and `normexport --help`) never loads MXNet.
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'normexport' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
