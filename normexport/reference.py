"""The independent NumPy reference: a Dense network's forward pass from its MXNet files.

It reads ``net-symbol.json`` as JSON and ``net-0000.params`` with
:mod:`normexport.mxparams` (no MXNet), normalizes with ``scalers.json`` and
de-normalizes the output. It never sees the spliced or folded graph, so a wrong splice
or fold shows up in verification as a disagreement, not as two copies of one mistake.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from normexport import files
from normexport.errors import FormatError
from normexport.modeldir import NET_PREFIX, params_file, symbol_file
from normexport.mxparams import read_params
from normexport.scaling import AffineScaler

Runtime = Callable[[np.ndarray], np.ndarray]


class NumpyNet:
    """Forward pass of an MXNet symbol's Dense-network subset, in NumPy only."""

    def __init__(self, symbol_path: Path, params_path: Path) -> None:
        doc = files.read_json(symbol_path)
        try:
            self.nodes: list[dict[str, Any]] = list(doc["nodes"])
            self.head = int(doc["heads"][0][0])
            self.inputs = [[int(ref[0]) for ref in n.get("inputs", [])] for n in self.nodes]
            ops = [str(n["op"]) for n in self.nodes]
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise FormatError(f"{symbol_path}: not an MXNet symbol file ({exc!r})") from exc
        if not 0 <= self.head < len(self.nodes) or any(
            not 0 <= ref < i for i, refs in enumerate(self.inputs) for ref in refs
        ):
            raise FormatError(f"{symbol_path}: a node refers to a node that does not precede it")
        for op in ops:
            if op not in _NUMPY_OPS:
                raise NotImplementedError(f"the NumPy reference has no {op} op")
        # the last node that reads each value: intermediates are freed after it
        self.last_use = {ref: i for i, refs in enumerate(self.inputs) for ref in refs}
        params = read_params(params_path)
        self.params = {k.split(":", 1)[-1]: v for k, v in params.items()}

    def __call__(self, X: np.ndarray) -> np.ndarray:
        values: dict[int, np.ndarray] = {}
        with np.errstate(over="ignore"):
            for i, node in enumerate(self.nodes):
                args = [values[ref] for ref in self.inputs[i]]
                if node["op"] == "null":
                    value = self.params.get(node["name"], X).astype(X.dtype, copy=False)
                else:
                    value = _NUMPY_OPS[node["op"]](args, node.get("attrs", {}))
                values[i] = value
                for ref in self.inputs[i]:
                    if (
                        self.last_use[ref] == i
                        and ref != self.head
                        and self.nodes[ref]["op"] != "null"
                    ):
                        del values[ref]
        return values[self.head]


def _fully_connected(args: list[np.ndarray], attrs: dict[str, str]) -> np.ndarray:
    x = args[0]
    if attrs.get("flatten", "True") in ("True", "true", "1"):
        x = x.reshape(x.shape[0], -1)
    y = x @ args[1].T
    if attrs.get("no_bias", "False") not in ("True", "true", "1"):
        y = y + args[2]
    return y


def _activation(args: list[np.ndarray], attrs: dict[str, str]) -> np.ndarray:
    x, kind = args[0], attrs.get("act_type")
    one = x.dtype.type(1)
    if kind == "sigmoid":
        return one / (one + np.exp(-x))
    if kind == "tanh":
        return np.tanh(x)
    if kind == "relu":
        return np.maximum(x, 0)
    if kind == "softrelu":
        return np.logaddexp(x.dtype.type(0), x)
    raise NotImplementedError(f"the NumPy reference has no {kind} activation")


_NUMPY_OPS: dict[str, Callable[[list[np.ndarray], dict[str, str]], np.ndarray]] = {
    "null": lambda args, attrs: args[0],
    "FullyConnected": _fully_connected,
    "Activation": _activation,
    "broadcast_mul": lambda args, attrs: args[0] * args[1],
    "broadcast_add": lambda args, attrs: args[0] + args[1],
    "elemwise_mul": lambda args, attrs: args[0] * args[1],
    "elemwise_add": lambda args, attrs: args[0] + args[1],
    "Flatten": lambda args, attrs: args[0].reshape(args[0].shape[0], -1),
    "sigmoid": lambda args, attrs: _activation(args, {"act_type": "sigmoid"}),
    "tanh": lambda args, attrs: np.tanh(args[0]),
    "relu": lambda args, attrs: np.maximum(args[0], 0),
}


def numpy_runtime(directory: Path, in_scaler: AffineScaler, out_scaler: AffineScaler) -> Runtime:
    """normalize (scalers.json) → plain net (net-*) → de-normalize, all in NumPy."""
    net = NumpyNet(symbol_file(directory, NET_PREFIX), params_file(directory, NET_PREFIX))
    return lambda X: out_scaler.inverse_transform(net(in_scaler.transform(X)))
