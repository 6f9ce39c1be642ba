"""Convert a raw-in/raw-out MXNet checkpoint to ONNX, then post-process it.

Conversion is MXNet's own exporter (``mxnet.onnx.export_model``). It is given *hollow*
stand-ins for the weights (right shape and dtype, no values), so the op translation runs
as usual while the weight values never pass through Python lists: the exporter would
otherwise copy every parameter into ``float_data`` at about 52 bytes per float32 value,
and it serializes the whole graph, which fails beyond protobuf's 2 GB limit. The values
are written afterwards, one tensor at a time, as ``raw_data`` (or as external data for
large models): see :func:`write_model`.

Post-processing is an ordered list of pure ``ModelProto -> ModelProto`` passes; see
:data:`PASSES` for why the order matters.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper, shape_inference

from normexport import __version__, io
from normexport.errors import GraphError, first_line

DEFAULT_OPSET = 13
MIN_OPSET = 13  # the exporter translates with opset 12/13 rules; converting down fails
INPUT, OUTPUT, BATCH = "input", "output", "batch"
GRAPH_NAME = "normexport_model"
EXTERNAL_DATA_THRESHOLD = 1 << 30  # weights above 1 GiB go to an external data file

Pass = Callable[[onnx.ModelProto], onnx.ModelProto]


def newest_opset() -> int:
    return int(onnx.defs.onnx_opset_version())


def check_opset(opset: int) -> int:
    newest = newest_opset()
    if not MIN_OPSET <= opset <= newest:
        raise GraphError(
            f"opset {opset} is not supported: choose {MIN_OPSET} to {newest} (MXNet's "
            f"exporter translates ops with opset 13 rules; onnx {onnx.__version__} knows "
            f"opsets up to {newest})"
        )
    return opset


# --------------------------------------------------------------------------- conversion


def export_graph(
    symbol: Any,
    arg_params: dict[str, Any],
    aux_params: dict[str, Any],
    n_inputs: int,
    dtype: str,
) -> onnx.ModelProto:
    """Run MXNet's exporter on hollow weights; return the model without weight values."""
    from mxnet.onnx import export_model

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


# --------------------------------------------------------------------------- passes


def rename_io(
    model: onnx.ModelProto,
    input_name: str = INPUT,
    output_name: str = OUTPUT,
    *,
    batch: str | None = BATCH,
) -> onnx.ModelProto:
    """Name the single input ``input`` and the single output ``output``, with batch ``batch``.

    Other names can be given; ``batch=None`` leaves the first dimension as it is (for
    models exported with a fixed batch size).
    """
    model = _copy(model)
    graph = model.graph
    inits = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in inits]
    if len(inputs) != 1 or len(graph.output) != 1:
        raise GraphError(
            f"expected one input and one output, found {len(inputs)} and {len(graph.output)}"
        )
    renames = {inputs[0].name: input_name, graph.output[0].name: output_name}
    for node in graph.node:
        node.input[:] = [renames.get(n, n) for n in node.input]
        node.output[:] = [renames.get(n, n) for n in node.output]
    inputs[0].name, graph.output[0].name = input_name, output_name
    for value in (inputs[0], graph.output[0]):
        dims = value.type.tensor_type.shape.dim
        if dims and batch is not None:
            dims[0].Clear()
            dims[0].dim_param = batch
    return model


def declare_shapes(n_inputs: int, n_outputs: int) -> Pass:
    """Declare ``[batch, n_inputs]`` and ``[batch, n_outputs]`` (the exporter leaves the
    output's dims unknown)."""

    def apply(model: onnx.ModelProto) -> onnx.ModelProto:
        model = _copy(model)
        for value, width in ((model.graph.input[0], n_inputs), (model.graph.output[0], n_outputs)):
            shape = value.type.tensor_type.shape
            del shape.dim[:]
            shape.dim.add().dim_param = BATCH
            shape.dim.add().dim_value = width
        return model

    return apply


def drop_initializer_inputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """Initializers are constants, not graph inputs (IR >= 4); listing them invites overrides."""
    model = _copy(model)
    inits = {i.name for i in model.graph.initializer}
    keep = [i for i in model.graph.input if i.name not in inits]
    del model.graph.input[:]
    model.graph.input.extend(keep)
    return model


def drop_redundant_flatten(model: onnx.ModelProto) -> onnx.ModelProto:
    """Remove ``Flatten(axis=1)`` of 2-D tensors: the exporter puts one before each Gemm."""
    model = _copy(model)
    inferred = shape_inference.infer_shapes(model)
    ranks = {
        v.name: len(v.type.tensor_type.shape.dim)
        for v in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output)
        if v.type.tensor_type.HasField("shape")
    }
    graph_outputs = {o.name for o in model.graph.output}
    replace: dict[str, str] = {}
    keep = []
    for node in model.graph.node:
        node.input[:] = [replace.get(n, n) for n in node.input]
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        source = node.input[0] if node.input else ""
        if (
            node.op_type == "Flatten"
            and axis == 1
            and ranks.get(source) == 2
            and node.output[0] not in graph_outputs
        ):
            replace[node.output[0]] = source
            continue
        keep.append(node)
    del model.graph.node[:]
    model.graph.node.extend(keep)
    return model


SOFTPLUS_EXPANSION = ["Relu", "Abs", "Neg", "Exp", "Add", "Log", "Add"]


def expand_double_softplus(model: onnx.ModelProto) -> onnx.ModelProto:
    """Rewrite double ``Softplus`` (which onnxruntime does not implement) in basic ops.

    ``softplus(x) = relu(x) + log(1 + exp(-|x|))``: stable for any ``x`` and within an
    ulp-scale absolute error of ``log1p``; float32 graphs are left alone.
    """
    if model.graph.input[0].type.tensor_type.elem_type != TensorProto.DOUBLE:
        return model
    model = _copy(model)
    one = "normexport_one"
    nodes = []
    for node in model.graph.node:
        if node.op_type != "Softplus":
            nodes.append(node)
            continue
        x, y, p = node.input[0], node.output[0], f"{node.name or node.output[0]}_normexport"
        nodes += [
            helper.make_node("Relu", [x], [f"{p}_relu"], name=f"{p}_relu"),
            helper.make_node("Abs", [x], [f"{p}_abs"], name=f"{p}_abs"),
            helper.make_node("Neg", [f"{p}_abs"], [f"{p}_neg"], name=f"{p}_neg"),
            helper.make_node("Exp", [f"{p}_neg"], [f"{p}_exp"], name=f"{p}_exp"),
            helper.make_node("Add", [f"{p}_exp", one], [f"{p}_1p"], name=f"{p}_1p"),
            helper.make_node("Log", [f"{p}_1p"], [f"{p}_log"], name=f"{p}_log"),
            helper.make_node("Add", [f"{p}_relu", f"{p}_log"], [y], name=f"{p}_add"),
        ]
    if len(nodes) != len(model.graph.node):
        model.graph.initializer.append(helper.make_tensor(one, TensorProto.DOUBLE, [], [1.0]))
        del model.graph.node[:]
        model.graph.node.extend(nodes)
    return model


def affine_as_batchnorm(model: onnx.ModelProto) -> onnx.ModelProto:
    """Rewrite each spliced ``Mul``/``Add`` pair as one inference ``BatchNormalization``.

    With mean 0, variance 1 and epsilon 0, ``BatchNormalization`` computes exactly
    ``x * scale + shift`` per column, and onnxruntime runs it several times faster than
    the broadcasting pair (docs/bake.md has the measurements). The constants keep their
    names; their shape becomes ``(n,)``.
    """
    model = _copy(model)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    for side in ("in", "out"):
        scale, shift = f"normexport_{side}_scale", f"normexport_{side}_shift"
        mul = next((n for n in graph.node if n.op_type == "Mul" and scale in n.input), None)
        if mul is None or scale not in inits or shift not in inits:
            continue
        add = next((n for n in graph.node if n.op_type == "Add" and mul.output[0] in n.input), None)
        if add is None or shift not in add.input:
            continue
        source = next(i for i in mul.input if i != scale)
        width = int(np.prod(inits[scale].dims))
        for name in (scale, shift):
            del inits[name].dims[:]
            inits[name].dims.append(width)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(inits[scale].data_type)
        mean, var = f"normexport_{side}_mean", f"normexport_{side}_var"
        graph.initializer.extend(
            [
                numpy_helper.from_array(np.zeros(width, dtype), mean),
                numpy_helper.from_array(np.ones(width, dtype), var),
            ]
        )
        node = helper.make_node(
            "BatchNormalization",
            [source, scale, shift, mean, var],
            [add.output[0]],
            name=f"normexport_{side}_affine",
            epsilon=0.0,
        )
        nodes = []
        for n in graph.node:
            if n is mul:
                nodes.append(node)
            elif n is not add:
                nodes.append(n)
        del graph.node[:]
        graph.node.extend(nodes)
    return model


def set_opset(opset: int) -> Pass:
    """Stamp opset 13 (the rules the exporter translated with), then convert up if asked."""

    def apply(model: onnx.ModelProto) -> onnx.ModelProto:
        model = _copy(model)
        del model.opset_import[:]
        model.opset_import.append(helper.make_opsetid("", DEFAULT_OPSET))
        if opset != DEFAULT_OPSET:
            try:
                model = onnx.version_converter.convert_version(model, opset)
            except Exception as exc:
                raise GraphError(f"cannot convert to opset {opset}: {first_line(exc)}") from exc
        return model

    return apply


def name_graph(model: onnx.ModelProto) -> onnx.ModelProto:
    model = _copy(model)
    model.graph.name = GRAPH_NAME
    model.producer_name = "normexport"
    model.producer_version = __version__
    model.graph.doc_string = (
        "Raw-in/raw-out regression network: input normalization and output "
        "de-normalization are part of the graph (see metadata normexport.scalers)."
    )
    return model


def set_metadata(entries: dict[str, str]) -> Pass:
    def apply(model: onnx.ModelProto) -> onnx.ModelProto:
        model = _copy(model)
        existing = {p.key: p for p in model.metadata_props}
        for key, value in entries.items():
            if key in existing:
                existing[key].value = value
            else:
                model.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
        return model

    return apply


def post_process(
    model: onnx.ModelProto,
    *,
    opset: int,
    metadata: dict[str, str],
    n_outputs: int | None = None,
) -> onnx.ModelProto:
    """Run the passes in order.

    Order matters: initializer inputs go before renaming (so the one real input is
    unambiguous); Flatten removal needs shapes, which inference finds only once inputs
    are named and the initializers are constants; Softplus is expanded before the
    opset is set so the converter sees only supported ops; the opset is set last among the graph
    edits so the version converter sees the final op list.
    """
    n_inputs = model.graph.input[0].type.tensor_type.shape.dim[-1].dim_value
    passes: list[Pass] = [drop_initializer_inputs, rename_io]
    if n_outputs is not None:
        passes.append(declare_shapes(n_inputs, n_outputs))
    for apply in (
        *passes,
        drop_redundant_flatten,
        affine_as_batchnorm,
        expand_double_softplus,
        set_opset(check_opset(opset)),
        name_graph,
        set_metadata(metadata),
    ):
        model = apply(model)
    return model


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


# --------------------------------------------------------------------------- weights


def write_model(
    model: onnx.ModelProto,
    path: str | os.PathLike[str],
    params: dict[str, Any] | None = None,
    *,
    external: str | None = None,
) -> list[Path]:
    """Write ``model`` atomically, filling the initializers named in ``params`` one
    tensor at a time; return the files written.

    ``params`` maps initializer names to arrays (NumPy, memory maps, or anything with
    ``asnumpy()``), read only while that tensor is written, so the weights are never
    all copied into the protobuf. Without ``external`` they are streamed into the file
    as ``raw_data``: the weightless model is serialized first, then each tensor as a
    ``graph.initializer`` entry of its own (protobuf merges repeated fields that follow,
    so the file parses as one model). With ``external`` (a file name relative to the
    model), they are written to that file and referenced by offset, as onnx's external
    data format describes.
    """
    path = Path(path)
    model = _copy(model)
    params = params or {}
    filled = [t for t in model.graph.initializer if t.name in params]
    for tensor in filled:
        for field in ("raw_data", "float_data", "double_data", "int32_data", "int64_data"):
            tensor.ClearField(field)
    if external is None:
        kept = [t for t in model.graph.initializer if t.name not in params]
        del model.graph.initializer[:]
        model.graph.initializer.extend(kept)
        with io.atomic_write(path) as handle:
            handle.write(model.SerializeToString())
            for tensor in filled:
                array = _tensor_array(tensor, params[tensor.name])
                handle.write(_initializer_prefix(tensor, array.nbytes))
                array.tofile(handle)
                del array
        return [path]
    offset = 0
    placed = []
    for tensor in filled:
        nbytes = int(np.prod(tensor.dims, dtype=np.int64)) * _itemsize(tensor)
        offset = -(-offset // 64) * 64  # align like onnx's own external data writer
        tensor.data_location = TensorProto.EXTERNAL
        del tensor.external_data[:]
        for key, val in (("location", external), ("offset", str(offset)), ("length", str(nbytes))):
            tensor.external_data.append(onnx.StringStringEntryProto(key=key, value=val))
        placed.append((offset, tensor))
        offset += nbytes
    data_path = path.parent / external
    with io.atomic_write(data_path) as handle:
        for start, tensor in placed:
            handle.seek(start)
            array = _tensor_array(tensor, params[tensor.name])
            array.tofile(handle)
            del array
    io.write_bytes(path, model.SerializeToString())
    return [path, data_path]


def _itemsize(tensor: TensorProto) -> int:
    return int(helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize)


def _tensor_array(tensor: TensorProto, value: Any) -> np.ndarray:
    dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
    array = np.ascontiguousarray(value.asnumpy() if hasattr(value, "asnumpy") else value)
    if array.size != int(np.prod(tensor.dims, dtype=np.int64)) or array.dtype != dtype:
        raise GraphError(
            f"initializer {tensor.name}: {array.dtype} {array.shape} does not fit "
            f"{np.dtype(dtype).name} {list(tensor.dims)}"
        )
    return array.astype(array.dtype.newbyteorder("<"), copy=False)


def _initializer_prefix(tensor: TensorProto, nbytes: int) -> bytes:
    """Wire-format bytes of ``ModelProto.graph.initializer[+] = tensor`` up to the raw data.

    Field numbers from onnx.proto: ModelProto.graph = 7, GraphProto.initializer = 5,
    TensorProto.raw_data = 9; all length-delimited (wire type 2).
    """
    head = TensorProto(name=tensor.name, dims=list(tensor.dims), data_type=tensor.data_type)
    tensor_head = head.SerializeToString() + _key(9) + _varint(nbytes)
    tensor_len = len(tensor_head) + nbytes
    graph_head = _key(5) + _varint(tensor_len)
    return _key(7) + _varint(len(graph_head) + tensor_len) + graph_head + tensor_head


def _key(field: int) -> bytes:
    return _varint(field << 3 | 2)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def needs_external_data(params: dict[str, Any]) -> bool:
    total = sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in params.values())
    return total > EXTERNAL_DATA_THRESHOLD


def save_model(model: onnx.ModelProto, path: str | os.PathLike[str]) -> list[Path]:
    """Write a model whose values are all in the proto, atomically."""
    return write_model(model, path)


def check(path: str | os.PathLike[str], *, label: str | None = None) -> None:
    """``onnx.checker`` with ``full_check`` (on the path, so external data and >2 GB work).

    ``label`` names the file in the error when ``path`` is a staged temporary copy.
    """
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise GraphError(
            f"{label or path}: the ONNX checker refuses the file (full check): {first_line(exc)}"
        ) from exc


def metadata_entries(mode: str, scalers: dict[str, Any], fold: dict[str, str]) -> dict[str, str]:
    return {
        "normexport.version": __version__,
        "normexport.mode": mode,
        "normexport.fold": json.dumps(fold, sort_keys=True),
        "normexport.scalers": json.dumps(scalers, sort_keys=True),
    }


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
    model = post_process(model, opset=opset, metadata=metadata, n_outputs=n_outputs)
    params = {**arg_params, **aux_params}
    external = Path(out_path).name + ".data" if needs_external_data(params) else None
    written = write_model(model, out_path, params, external=external)
    if run_checker:
        check(out_path)
    return written


# --------------------------------------------------------------------------- reading

MAX_ONNX_BYTES = 64 * 1024**3


def load_onnx(path: str | os.PathLike[str], *, with_weights: bool = True) -> onnx.ModelProto:
    """Load an ONNX file with a clear error for missing, garbage or truncated files."""

    path = Path(path)
    if not path.is_file():
        raise GraphError(f"{path}: no such file")
    if path.stat().st_size > MAX_ONNX_BYTES:
        raise GraphError(f"{path}: larger than {MAX_ONNX_BYTES} bytes")
    try:
        # format="protobuf": onnx would otherwise pick a text parser from a .json/.txt name
        model = onnx.load(str(path), format="protobuf", load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError, ValueError, RuntimeError, ...
        raise GraphError(f"{path}: not an ONNX model ({first_line(exc)})") from exc
    if not model.graph.node and not model.graph.input:
        raise GraphError(f"{path}: not an ONNX model (no graph)")
    if with_weights:
        from onnx.external_data_helper import load_external_data_for_model, uses_external_data

        for tensor in model.graph.initializer:
            if uses_external_data(tensor):
                location = next(e.value for e in tensor.external_data if e.key == "location")
                if not (path.parent / location).is_file():
                    raise GraphError(f"{path}: external data file {location} is missing")
        try:
            load_external_data_for_model(model, str(path.parent))
        except (OSError, ValueError) as exc:
            raise GraphError(f"{path}: cannot read external data ({first_line(exc)})") from exc
    return model


def read_metadata(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


def summarize(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Interface, ops, weights and metadata of an ONNX file (weights are not loaded)."""
    from collections import Counter

    model = load_onnx(path, with_weights=False)
    graph = model.graph
    inits = {t.name for t in graph.initializer}

    def value(v: onnx.ValueInfoProto) -> dict[str, Any]:
        tensor = v.type.tensor_type
        dims = [
            d.dim_param or (d.dim_value if d.HasField("dim_value") else "?")
            for d in tensor.shape.dim
        ]
        return {
            "name": v.name,
            "type": TensorProto.DataType.Name(tensor.elem_type),
            "shape": dims,
        }

    meta = read_metadata(model)
    summary: dict[str, Any] = {
        "opset": next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None),
        "ir_version": model.ir_version,
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "graph": graph.name,
        "inputs": [value(v) for v in graph.input if v.name not in inits],
        "outputs": [value(v) for v in graph.output],
        "ops": dict(Counter(n.op_type for n in graph.node)),
        "initializers": len(graph.initializer),
        "parameters": int(sum(np.prod(t.dims, dtype=np.int64) for t in graph.initializer)),
        "metadata": {k: v for k, v in meta.items() if k != "normexport.scalers"},
    }
    if "normexport.scalers" in meta:
        try:
            summary["scalers"] = json.loads(meta["normexport.scalers"])
        except json.JSONDecodeError:
            summary["metadata"]["normexport.scalers"] = "(not valid JSON)"
    return summary
