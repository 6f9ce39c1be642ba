"""The independent NumPy reference: a Dense network's forward pass from its MXNet files.

It reads ``net-symbol.json`` as JSON and ``net-0000.params`` with
:mod:`normexport.mxparams` (no MXNet), normalizes with ``scalers.json`` and
de-normalizes the output. It never sees the spliced or folded graph, so a wrong splice
or fold shows up in verification as a disagreement, not as two copies of one mistake.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import math
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from normexport import files
from normexport.errors import FormatError
from normexport.modeldir import NET_PREFIX, params_file, symbol_file
from normexport.mxparams import read_params
from normexport.scaling import AffineScaler
from normexport.transforms import MXNET_OPS, NUMPY_OPS

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
        # Dense weights stay in their dtype: _fully_connected casts them a block at a time.
        self.weights = {
            self.nodes[refs[1]]["name"]
            for node, refs in zip(self.nodes, self.inputs, strict=True)
            if node["op"] == "FullyConnected" and len(refs) > 1
        }
        shapes = [self.params[k].shape for k in self.weights if k in self.params]
        self.widest = max((shape[0] for shape in shapes), default=1)

    def __call__(self, X: np.ndarray) -> np.ndarray:
        """The network on the rows of ``X``, in blocks of rows whose widest activation
        stays within :data:`ACTIVATION_BYTES` (each row is computed on its own)."""
        rows = max(1, ACTIVATION_BYTES // (self.widest * X.dtype.itemsize))
        if len(X) <= rows:
            return self._forward(X)
        return np.concatenate([self._forward(X[a : a + rows]) for a in range(0, len(X), rows)])

    def _forward(self, X: np.ndarray) -> np.ndarray:
        values: dict[int, np.ndarray] = {}
        with np.errstate(over="ignore"):
            for i, node in enumerate(self.nodes):
                args = [values[ref] for ref in self.inputs[i]]
                if node["op"] == "null":
                    value = self.params.get(node["name"], X)
                    if node["name"] not in self.weights:
                        value = value.astype(X.dtype, copy=False)
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
    y = _matmul_transposed(x, args[1])
    if attrs.get("no_bias", "False") not in ("True", "true", "1"):
        y += args[2]  # y is new: in place, one activation less
    return y


CAST_BLOCK_BYTES = 16 << 20  # float64 copies of float32 weights, a block of rows at a time
ACTIVATION_BYTES = 64 << 20  # the widest activation of one block of rows


def _matmul_transposed(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``x @ w.T`` in ``x``'s dtype. A weight of another dtype (float32 weights in the
    float64 evaluation) is cast a block of rows at a time, never copied whole."""
    if w.dtype == x.dtype:
        return x @ w.T
    if w.size * x.dtype.itemsize <= CAST_BLOCK_BYTES:  # small: one cast, as it always was
        return x @ w.astype(x.dtype).T
    out = np.empty((x.shape[0], w.shape[0]), dtype=x.dtype)
    step = max(1, CAST_BLOCK_BYTES // max(1, w.shape[1] * x.dtype.itemsize))
    for first in range(0, w.shape[0], step):
        out[:, first : first + step] = x @ w[first : first + step].astype(x.dtype).T
    return out


def _activation(args: list[np.ndarray], attrs: dict[str, str]) -> np.ndarray:
    x, kind = args[0], attrs.get("act_type")
    one = x.dtype.type(1)
    if kind == "sigmoid":
        y = np.negative(x)  # 1 / (1 + exp(-x)), computed in one new array
        np.exp(y, out=y)
        y += one
        return np.divide(one, y, out=y)
    if kind == "tanh":
        return np.tanh(x)
    if kind == "relu":
        return np.maximum(x, 0)
    if kind == "softrelu":
        return np.logaddexp(x.dtype.type(0), x)
    if kind == "softsign":
        return x / (one + np.abs(x))
    raise NotImplementedError(f"the NumPy reference has no {kind} activation")


def _float32(attrs: dict[str, str], key: str, default: float) -> float:
    """An MXNet float attribute as MXNet holds it (a float32), as a Python float."""
    return float(np.float32(attrs.get(key, default)))


# SELU's constants as MXNet's kernel holds them (float32)
_SELU_ALPHA = float(np.float32(1.6732632423543772848170429916717))
_SELU_LAMBDA = float(np.float32(1.0507009873554804934193349852946))


def _leaky_relu(args: list[np.ndarray], attrs: dict[str, str]) -> np.ndarray:
    """MXNet's LeakyReLU op at inference, in the input's dtype."""
    x, kind = args[0], attrs.get("act_type", "leaky")
    t = x.dtype.type
    negative = np.minimum(x, 0)
    if kind == "leaky":
        return np.maximum(x, 0) + t(_float32(attrs, "slope", 0.25)) * negative
    if kind == "prelu":
        if x.ndim != 2:
            raise NotImplementedError("the NumPy reference has prelu on 2-D data only")
        return np.maximum(x, 0) + args[1].reshape(1, -1).astype(x.dtype) * negative
    if kind == "elu":
        return np.maximum(x, 0) + t(_float32(attrs, "slope", 0.25)) * np.expm1(negative)
    if kind == "selu":
        return t(_SELU_LAMBDA) * (np.maximum(x, 0) + t(_SELU_ALPHA) * np.expm1(negative))
    if kind == "gelu":
        return t(0.5) * x * (t(1) + _erf(x / t(math.sqrt(2.0))))
    raise NotImplementedError(f"the NumPy reference has no LeakyReLU of kind {kind}")


_ERF = np.frompyfunc(math.erf, 1, 1)  # the C library's erf; NumPy has none


def _erf(x: np.ndarray) -> np.ndarray:
    return _ERF(x).astype(x.dtype)


def _batch_norm(args: list[np.ndarray], attrs: dict[str, str]) -> np.ndarray:
    """Inference BatchNorm (moving statistics) over axis 1 of (batch, features) data."""
    x, gamma, beta, mean, var = args
    if x.ndim != 2 or int(attrs.get("axis", "1")) not in (1, -1):
        raise NotImplementedError("the NumPy reference has BatchNorm over features only")
    if attrs.get("fix_gamma", "True") in _TRUE:  # MXNet's default
        gamma = np.ones_like(gamma)
    eps = x.dtype.type(float(attrs.get("eps", "0.001")))  # a double parameter in MXNet
    return (x - mean) / np.sqrt(var + eps) * gamma + beta


def _layer_norm(args: list[np.ndarray], attrs: dict[str, str]) -> np.ndarray:
    x, gamma, beta = args
    axis = int(attrs.get("axis", "-1"))
    if axis not in (-1, x.ndim - 1):
        raise NotImplementedError("the NumPy reference has LayerNorm over the last axis only")
    mean = x.mean(axis=-1, keepdims=True)
    var = np.square(x - mean).mean(axis=-1, keepdims=True)
    eps = x.dtype.type(_float32(attrs, "eps", 1e-5))  # a float32 parameter in MXNet
    return (x - mean) / np.sqrt(var + eps) * gamma + beta


def _dropout(args: list[np.ndarray], attrs: dict[str, str]) -> np.ndarray:
    if attrs.get("mode", "training") == "always":
        raise NotImplementedError("Dropout with mode='always' is random at inference")
    return args[0]  # the identity at inference


def _unary(function: Callable[[np.ndarray], np.ndarray]) -> Callable[..., np.ndarray]:
    def apply(args: list[np.ndarray], attrs: dict[str, str]) -> np.ndarray:
        with np.errstate(all="ignore"):  # out of the domain: NaN or -inf, as in MXNet
            return function(args[0])

    return apply


def _slice_axis(args: list[np.ndarray], attrs: dict[str, str]) -> np.ndarray:
    end = attrs.get("end", "None")
    index = [slice(None)] * args[0].ndim
    index[int(attrs["axis"])] = slice(int(attrs["begin"]), None if end == "None" else int(end))
    return args[0][tuple(index)]


def _scalar(attrs: dict[str, str]) -> float:
    return float(attrs.get("scalar", "0"))  # a double parameter in MXNet


_TRUE = ("True", "true", "1")

_NUMPY_OPS: dict[str, Callable[[list[np.ndarray], dict[str, str]], np.ndarray]] = {
    "null": lambda args, attrs: args[0],
    "FullyConnected": _fully_connected,
    "Activation": _activation,
    "LeakyReLU": _leaky_relu,
    "BatchNorm": _batch_norm,
    "LayerNorm": _layer_norm,
    "Dropout": _dropout,
    "broadcast_mul": lambda args, attrs: args[0] * args[1],
    "broadcast_add": lambda args, attrs: args[0] + args[1],
    "broadcast_sub": lambda args, attrs: args[0] - args[1],
    "elemwise_mul": lambda args, attrs: args[0] * args[1],
    "elemwise_add": lambda args, attrs: args[0] + args[1],
    "elemwise_sub": lambda args, attrs: args[0] - args[1],
    "_mul_scalar": lambda args, attrs: args[0] * args[0].dtype.type(_scalar(attrs)),
    "_div_scalar": lambda args, attrs: args[0] / args[0].dtype.type(_scalar(attrs)),
    "_plus_scalar": lambda args, attrs: args[0] + args[0].dtype.type(_scalar(attrs)),
    "_minus_scalar": lambda args, attrs: args[0] - args[0].dtype.type(_scalar(attrs)),
    "negative": lambda args, attrs: -args[0],
    "erf": lambda args, attrs: _erf(args[0]),
    "Flatten": lambda args, attrs: args[0].reshape(args[0].shape[0], -1),
    "sigmoid": lambda args, attrs: _activation(args, {"act_type": "sigmoid"}),
    "tanh": lambda args, attrs: np.tanh(args[0]),
    "relu": lambda args, attrs: np.maximum(args[0], 0),
    "softsign": lambda args, attrs: _activation(args, {"act_type": "softsign"}),
    # the transforms' ops (a model-* symbol): NumPy's own functions, as the scalers use
    **{MXNET_OPS[op]: _unary(function) for op, function in NUMPY_OPS.items()},
    "slice_axis": _slice_axis,
    "Concat": lambda args, attrs: np.concatenate(args, axis=int(attrs.get("dim", "1"))),
}


def numpy_runtime(
    directory: Path, in_scaler: AffineScaler, out_scaler: AffineScaler, dtype: str = "float64"
) -> Runtime:
    """normalize (scalers.json) → plain net (net-*) → de-normalize, all in NumPy.

    It evaluates in ``dtype`` whatever the network's: float64 by default, so for a
    float32 network it is the exact evaluation of the same weights (each float32 value
    is exact in float64) that float32 runtimes are measured against.
    """
    net = NumpyNet(symbol_file(directory, NET_PREFIX), params_file(directory, NET_PREFIX))
    # NaN from inputs outside a transform's domain is a result to report, not an error
    return lambda X: out_scaler.inverse_transform(
        net(in_scaler.transform(np.asarray(X).astype(dtype, copy=False))), check_finite=False
    )


@contextlib.contextmanager
def one_blas_thread() -> Iterator[None]:
    """Run NumPy's BLAS (OpenBLAS) on one thread inside the block, then restore it.

    For work that runs beside other threads (streamed verification runs the NumPy
    evaluations side by side with onnxruntime and a table reader): OpenBLAS's idle
    threads spin after each call, taking a core from the others, and on the reference's
    tall, thin chunks (rows x a layer's width) a second BLAS thread saves little
    (measured on 2 busy cores: the reference took 0.8-1.2 s with two threads, 0.33 s with
    one). Results do not depend on the thread count. Blocks may overlap across threads:
    the count is restored when the last one ends. Without OpenBLAS, or off Linux, this
    does nothing. (threadpoolctl lets only one thread at a time set OpenBLAS's count and
    restore it; blocks that overlap across threads then leave it changed.)
    """
    _ONE_BLAS_THREAD.enter()
    try:
        yield
    finally:
        _ONE_BLAS_THREAD.exit()


class _OneBlasThread:
    """Counts open :func:`one_blas_thread` blocks: the first saves and sets, the last restores."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.open = 0
        self.before: list[int] = []

    def enter(self) -> None:
        with self.lock:
            if not self.open:
                controls = _openblas_thread_controls()
                self.before = [get() for get, _ in controls]
                for _, set_threads in controls:
                    set_threads(1)
            self.open += 1

    def exit(self) -> None:
        with self.lock:
            self.open -= 1
            if not self.open:
                controls = _openblas_thread_controls()
                for (_, set_threads), n in zip(controls, self.before, strict=True):
                    set_threads(n)


_ONE_BLAS_THREAD = _OneBlasThread()
_OPENBLAS_SYMBOLS = [("openblas", ""), ("openblas", "64_"), ("scipy_openblas", "64_")]


@functools.cache
def _openblas_thread_controls() -> tuple[tuple[Callable[[], int], Callable[[int], None]], ...]:
    """(get, set) thread-count functions of NumPy's OpenBLAS, from the libraries loaded
    in this process (/proc/self/maps): those a NumPy wheel bundles (``numpy.libs``), else
    every OpenBLAS (a NumPy built against a shared one). Their symbols vary by build."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            paths = sorted({line.split(None, 5)[-1].strip() for line in maps if "openblas" in line})
    except OSError:
        return ()
    paths = [p for p in paths if "openblas" in Path(p).name and Path(p).is_file()]
    bundled = [p for p in paths if Path(p).parent.name == "numpy.libs"]
    controls = []
    for path in bundled or paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix, suffix in _OPENBLAS_SYMBOLS:
            get = getattr(lib, f"{prefix}_get_num_threads{suffix}", None)
            put = getattr(lib, f"{prefix}_set_num_threads{suffix}", None)
            if get is not None and put is not None:
                get.restype, put.argtypes = ctypes.c_int, [ctypes.c_int]
                controls.append((get, put))
                break
    return tuple(controls)
