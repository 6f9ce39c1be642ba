"""Convert a raw-in/raw-out MXNet checkpoint to ONNX with MXNet's own exporter.

The exporter is given *hollow* stand-ins for the weights (right shape and dtype, no
values), so the op translation runs as usual while the weight values never pass through
Python lists: the exporter would otherwise copy every parameter into ``float_data`` at
about 52 bytes per float32 value, and it serializes the whole graph, which fails beyond
protobuf's 2 GB limit. The values are written afterwards, one tensor at a time, as
``raw_data`` (or as external data for large models) by
:func:`normexport.onnxkit.write_model`; the post-processing is
:func:`normexport.passes.post_process`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from mxnet.onnx import export_model
from mxnet.onnx.mx2onnx._export_onnx import MXNetGraph

from normexport import onnxkit
from normexport.errors import GraphError, first_line
from normexport.onnx_transforms import op_nodes
from normexport.onnxkit import DEFAULT_OPSET, check, newest_opset, write_model
from normexport.passes import BATCH, post_process
from normexport.transforms import MXNET_OPS


def export_graph(
    symbol: Any,
    arg_params: dict[str, Any],
    aux_params: dict[str, Any],
    n_inputs: int,
    dtype: str,
) -> onnx.ModelProto:
    """Run MXNet's exporter on hollow weights; return the model without weight values."""
    hollow = [
        {k: _HollowParam(v.shape, v.dtype) for k, v in params.items()}
        for params in (arg_params, aux_params)
    ]
    with tempfile.TemporaryDirectory(prefix="normexport-onnx-") as tmp:
        path = os.path.join(tmp, "graph.onnx")
        # The exporter logs at INFO and warns about opsets; it has nothing for our users.
        logger = logging.getLogger()
        level = logger.level
        logger.setLevel(logging.WARNING)
        try:
            with _translation_opset_check():
                export_model(
                    symbol,
                    hollow,
                    in_shapes=[(1, n_inputs)],
                    in_types=[np.dtype(dtype)],
                    onnx_file_path=path,
                    dynamic=True,
                    dynamic_input_shapes=[(BATCH, n_inputs)],
                )
        except Exception as exc:  # the exporter raises bare AttributeError/ValueError/...
            raise GraphError(f"MXNet's ONNX exporter failed: {first_line(exc)}") from exc
        finally:
            logger.setLevel(level)
        return onnx.load(path)


_CHECK_LOCK = threading.Lock()


@contextlib.contextmanager
def _translation_opset_check() -> Iterator[None]:
    """Let the exporter check its graph against the opset its rules translate with.

    ``export_model`` translates ops with opset 12/13 rules, then runs
    ``onnx.checker.check_graph`` against the newest opset of the installed onnx, which
    refuses valid opset-13 translations (LayerNorm's ``ReduceMean`` with an ``axes``
    attribute: "Unrecognized attribute: axes for operator ReduceMean", since opset 18
    takes axes as an input). For the duration of the call, the check runs at opset 13,
    the rules actually used; :func:`normexport.passes.set_opset` stamps that opset and
    our own full check of the finished file runs after post-processing.
    """
    original = onnx.checker.check_graph

    def check_graph(graph: Any, ctx: Any = None, *args: Any, **kwargs: Any) -> None:
        context = onnx.checker.C.CheckerContext()
        context.ir_version = onnx.IR_VERSION
        context.opset_imports = {"": DEFAULT_OPSET}
        original(graph, context, *args, **kwargs)

    with _CHECK_LOCK:
        onnx.checker.check_graph = check_graph
        try:
            yield
        finally:
            onnx.checker.check_graph = original


def _convert_erf(node: dict[str, Any], **kwargs: Any) -> list[onnx.NodeProto]:
    """MXNet's ``erf`` as ONNX ``Erf`` (the exporter of mxnet 1.9.1 has no rule for it;
    :func:`normexport.mx.graph.for_inference` writes float64 GELU with it)."""
    outputs = kwargs["outputs_lookup"]
    source = node["inputs"][0]
    name = node["name"]
    return [onnx.helper.make_node("Erf", [outputs[source[0]][source[1]].name], [name], name=name)]


if "erf" not in MXNetGraph.registry_.get(DEFAULT_OPSET, {}):
    MXNetGraph.register("erf", DEFAULT_OPSET)(_convert_erf)


def _convert_transform(op: str) -> Any:
    """MXNet's ``log1p``, ``expm1``, ``arcsinh`` and ``sinh`` (the transforms' ops, which
    the exporter of mxnet 1.9.1 has no rule for) as the nodes that
    :func:`normexport.onnx_transforms.op_nodes` builds, under the MXNet node's name."""

    def convert(node: dict[str, Any], **kwargs: Any) -> list[onnx.NodeProto]:
        source = node["inputs"][0]
        value = kwargs["outputs_lookup"][source[0]][source[1]]
        name = node["name"]
        one = f"{name}_one"
        if op in ("log1p", "expm1"):
            kwargs["initializer"].append(
                onnx.numpy_helper.from_array(np.array(1, np.dtype(value.dtype)), one)
            )
        return op_nodes(op, value.name, name, name, one)

    return convert


for _op, _mx_op in MXNET_OPS.items():  # log and exp it has
    if _mx_op not in MXNetGraph.registry_.get(DEFAULT_OPSET, {}):
        MXNetGraph.register(_mx_op, DEFAULT_OPSET)(_convert_transform(_op))


class _Unfilled(Sequence[float]):
    """A sequence with a tensor's length but a single value: what the exporter copies.

    One value (not none) keeps the exporter's own ``check_graph`` content; the real
    values replace it in :func:`write_model`.
    """

    def __init__(self, size: int) -> None:
        self._size = size

    def __len__(self) -> int:
        return self._size

    def __getitem__(self, index: Any) -> Any:
        raise IndexError(index)

    def __iter__(self) -> Iterator[float]:
        return iter((0.0,))


class _HollowArray(np.ndarray):
    """Zero-strided array of the right shape whose ``flatten().tolist()`` holds nothing."""

    def flatten(self, order: Any = "C") -> Any:
        return self

    def tolist(self) -> Any:
        return _Unfilled(int(np.prod(self.shape, dtype=np.int64)))


@dataclass(frozen=True)
class _HollowParam:
    shape: tuple[int, ...]
    dtype: Any

    def asnumpy(self) -> np.ndarray:
        return np.broadcast_to(np.zeros((), self.dtype), self.shape).view(_HollowArray)


def needs_external_data(params: dict[str, Any]) -> bool:
    total = sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in params.values())
    return total > onnxkit.EXTERNAL_DATA_THRESHOLD


def convert(
    checkpoint: Any,
    out_path: str | os.PathLike[str],
    *,
    n_inputs: int,
    n_outputs: int,
    dtype: str,
    opset: int = DEFAULT_OPSET,
    metadata: dict[str, str],
    run_checker: bool = True,
) -> list[Path]:
    """The whole conversion: export, post-process, write the weights, check.

    Returns the files written (the model, plus ``<name>.data`` for large models).
    ``run_checker=False`` leaves :func:`check` to the caller (who may first release
    the checkpoint: the checker loads the whole file).
    """
    symbol, arg_params, aux_params = checkpoint
    check_opset(opset)
    model = export_graph(symbol, arg_params, aux_params, n_inputs, dtype)
    model = post_process(model, opset=opset, metadata=metadata, widths=(n_inputs, n_outputs))
    params = {**arg_params, **aux_params}
    external = Path(out_path).name + ".data" if needs_external_data(params) else None
    written = write_model(model, out_path, params, external=external)
    if run_checker:
        check(out_path)
    return written


def check_opset(opset: int) -> int:
    newest = newest_opset()
    if not MIN_OPSET <= opset <= newest:
        raise GraphError(
            f"opset {opset} is not supported: choose {MIN_OPSET} to {newest} (MXNet's "
            f"exporter translates ops with opset 13 rules; onnx {onnx.__version__} knows "
            f"opsets up to {newest})"
        )
    return opset


MIN_OPSET = 13  # the exporter translates with opset 12/13 rules; converting down fails
