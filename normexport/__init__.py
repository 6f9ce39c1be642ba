"""normexport: ship a regression network together with its normalization.

The public API::

    import normexport as nx
    in_sc = nx.MinMaxScaler().fit(X, columns=["a", "b", "c"])
    out_sc = nx.MinMaxScaler().fit(Y, columns=["u", "v"])
    nx.export(net, in_sc, out_sc, "model_dir")
    report = nx.verify("model_dir", X)

``verify`` and ``bake`` are the core (numpy, onnx, onnxruntime); ``export`` and
``train`` are the MXNet adapter (``pip install "normexport[mxnet]"``). Everything is
imported on first use, so ``import normexport`` loads neither MXNet nor onnx.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from normexport.errors import (
    DataError,
    FormatError,
    GraphError,
    MissingExtraError,
    NormexportError,
    VerificationError,
)

if TYPE_CHECKING:
    from normexport.scaling import AffineScaler, MinMaxScaler, StandardScaler

__version__ = "0.1.0"

__all__ = [
    "AffineScaler",
    "DataError",
    "FormatError",
    "GraphError",
    "MinMaxScaler",
    "MissingExtraError",
    "NormexportError",
    "StandardScaler",
    "VerificationError",
    "__version__",
    "bake",
    "export",
    "partition_predictor",
    "train",
    "verify",
]

# The functions live in modules whose names differ from theirs: a submodule called
# `train` would replace the function `normexport.train` the moment it is imported.
_LAZY = {
    "AffineScaler": "normexport.scaling",
    "MinMaxScaler": "normexport.scaling",
    "StandardScaler": "normexport.scaling",
    "verify": "normexport.verification",
    "bake": "normexport.baking",
    "partition_predictor": "normexport.partition",
}
_ADAPTER = {"export": "exporting", "train": "training"}  # in normexport.mx


def __getattr__(name: str) -> Any:
    # Lazy so that `import normexport` loads nothing heavy (not even numpy): the CLI can
    # take over Ctrl-C before any import, and `normexport --help` never loads MXNet.
    import importlib

    if name in _ADAPTER:
        from normexport.mx import require

        return getattr(require(_ADAPTER[name]), name)
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'normexport' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
