"""The MXNet runtime in verification: the raw-in/raw-out model, loaded for inference."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mxnet as mx

from normexport.modeldir import MODEL_PREFIX, params_file, symbol_file
from normexport.mx.checkpoint import load_checkpoint
from normexport.runtimes import Runtime


def mxnet_runtime(directory: Path, dtype: str) -> Runtime:
    """The raw-in/raw-out MXNet model, loaded for inference only.

    Both files go through :func:`normexport.mx.checkpoint.load_checkpoint` (validated in
    Python; MXNet's C++ loaders can abort the process on hostile files). The graph runs
    as a ``CachedOp`` on the loaded arrays themselves: ``SymbolBlock.imports`` allocates
    gradient buffers as large as the weights, and a block's parameters copy each array
    they are given, so either would hold the weights twice.
    """
    symbol, arg_params, aux_params = load_checkpoint(
        symbol_file(directory, MODEL_PREFIX), params_file(directory, MODEL_PREFIX)
    )
    values = {**arg_params, **aux_params}
    names = symbol.list_inputs()
    (data,) = [n for n in names if n not in values]  # load_checkpoint leaves one free input
    op = mx.nd.CachedOp(symbol)

    def run(X: Any) -> Any:
        inputs = [mx.nd.array(X, dtype=dtype) if n == data else values[n] for n in names]
        return op(*inputs).asnumpy()

    return run
