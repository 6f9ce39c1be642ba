"""The MXNet runtime in verification: the raw-in/raw-out model, loaded for inference."""

from __future__ import annotations

import warnings
from pathlib import Path

import mxnet as mx

from normexport.modeldir import MODEL_PREFIX, params_file, symbol_file
from normexport.mx.checkpoint import load_checkpoint
from normexport.runtimes import Runtime


def mxnet_runtime(directory: Path, dtype: str) -> Runtime:
    """The raw-in/raw-out MXNet model, loaded for inference only.

    Both files go through :func:`normexport.mx.checkpoint.load_checkpoint` (validated in
    Python; MXNet's C++ loaders can abort the process on hostile files). Not
    ``SymbolBlock.imports``: it also allocates gradient buffers as large as the weights.
    """
    symbol, arg_params, aux_params = load_checkpoint(
        symbol_file(directory, MODEL_PREFIX), params_file(directory, MODEL_PREFIX)
    )
    values = {**arg_params, **aux_params}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        block = mx.gluon.SymbolBlock(symbol, [mx.sym.var("data")])
        for name, param in block.collect_params().items():
            param.grad_req = "null"
            # Parameter._load_init is what ParameterDict.load calls per parameter (MXNet 1.9).
            param._load_init(values.pop(name), [mx.cpu()], cast_dtype=True, dtype_source="saved")
    return lambda X: block(mx.nd.array(X, dtype=dtype)).asnumpy()
