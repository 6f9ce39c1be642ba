"""The ONNX toolbox: load, check, streamed write, opset, metadata and summary.

Used by every path that reads or writes an ONNX file (export, bake, predict, inspect,
verify). Writing streams the weights one tensor at a time (:func:`write_model`), so no
path holds a second copy of the model in the protobuf.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from normexport import __version__, files
from normexport.errors import FormatError, GraphError, first_line

DEFAULT_OPSET = 13
# Weights above this go to an external data file: a file with its weights inline is read
# whole by onnx.checker and onnxruntime, which then hold them twice; external data they
# map or skip (see docs/performance.md).
EXTERNAL_DATA_THRESHOLD = 64 << 20
WRITE_CHUNK_BYTES = 16 << 20  # the largest block of a tensor copied out while writing


def newest_opset() -> int:
    return int(onnx.defs.onnx_opset_version())


# --------------------------------------------------------------------------- conversion


# --------------------------------------------------------------------------- passes


def opset_of(model: onnx.ModelProto) -> int:
    """The default-domain opset the model imports (0 if none)."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def convert_opset(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """The model at ``opset`` through ``onnx.version_converter`` (a copy if already there)."""
    if opset_of(model) == opset:
        return copy_model(model)
    try:
        converted = onnx.version_converter.convert_version(model, opset)
    except Exception as exc:  # the converter raises RuntimeError/IndexError/... freely
        raise GraphError(
            f"cannot convert from opset {opset_of(model)} to {opset}: {first_line(exc)}"
        ) from exc
    # The converter keeps an external tensor's name and dims but drops where its data is.
    external = {
        t.name: t for t in model.graph.initializer if t.data_location == TensorProto.EXTERNAL
    }
    for tensor in converted.graph.initializer:
        if tensor.name in external:
            tensor.CopyFrom(external[tensor.name])
    return converted


def copy_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """A deep copy (every pass returns a new model and leaves its input alone)."""
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

    ``params`` maps initializer names to arrays (NumPy, memory maps or MXNet NDArrays),
    copied out a block of rows at a time while that tensor is written, so neither the
    protobuf nor the writer ever holds a copy of the weights. Without ``external`` they
    are streamed into the file as ``raw_data``: the weightless model is serialized
    first, then each tensor as a ``graph.initializer`` entry of its own (protobuf merges
    repeated fields that follow, so the file parses as one model). With ``external`` (a
    file name relative to the model), they are written to that file and referenced by
    offset, as onnx's external data format describes.
    """
    path = Path(path)
    model = copy_model(model)
    params = params or {}
    filled = [t for t in model.graph.initializer if t.name in params]
    for tensor in filled:
        for field in ("raw_data", "float_data", "double_data", "int32_data", "int64_data"):
            tensor.ClearField(field)
    if external is None:
        kept = [t for t in model.graph.initializer if t.name not in params]
        del model.graph.initializer[:]
        model.graph.initializer.extend(kept)
        with files.atomic_write(path) as handle:
            handle.write(model.SerializeToString())
            for tensor in filled:
                handle.write(_initializer_prefix(tensor, _nbytes(tensor)))
                _write_tensor(handle, tensor, params[tensor.name])
        return [path]
    offset = 0
    placed = []
    for tensor in filled:
        nbytes = _nbytes(tensor)
        offset = -(-offset // 64) * 64  # align like onnx's own external data writer
        tensor.data_location = TensorProto.EXTERNAL
        del tensor.external_data[:]
        for key, val in (("location", external), ("offset", str(offset)), ("length", str(nbytes))):
            tensor.external_data.append(onnx.StringStringEntryProto(key=key, value=val))
        placed.append((offset, tensor))
        offset += nbytes
    data_path = path.parent / external
    with files.atomic_write(data_path) as handle:
        for start, tensor in placed:
            handle.seek(start)
            _write_tensor(handle, tensor, params[tensor.name])
    files.write_bytes(path, model.SerializeToString())
    return [path, data_path]


def _nbytes(tensor: TensorProto) -> int:
    return math.prod(tensor.dims) * int(helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize)


def _write_tensor(handle: Any, tensor: TensorProto, value: Any) -> None:
    """Write ``value``'s bytes (little-endian) for ``tensor``, a block of rows at a time.

    ``value`` is a NumPy array (a memory map too) or an MXNet NDArray; a block of at most
    :data:`WRITE_CHUNK_BYTES` is copied out at a time (``value[a:b]`` is a view in both),
    so writing holds no copy of the tensor.
    """
    dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
    shape = tuple(value.shape)
    if math.prod(shape) != math.prod(tensor.dims) or np.dtype(value.dtype) != dtype:
        raise GraphError(
            f"initializer {tensor.name}: {np.dtype(value.dtype).name} {shape} does not fit "
            f"{np.dtype(dtype).name} {list(tensor.dims)}"
        )
    if not shape:
        value, shape = value.reshape((1,)), (1,)
    row_bytes = math.prod(shape[1:]) * np.dtype(dtype).itemsize
    step = max(1, WRITE_CHUNK_BYTES // max(1, row_bytes))
    for first in range(0, shape[0], step):
        block = value[first : first + step]
        array = np.ascontiguousarray(block.asnumpy() if hasattr(block, "asnumpy") else block)
        array.astype(array.dtype.newbyteorder("<"), copy=False).tofile(handle)


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


# --------------------------------------------------------------------------- reading

MAX_ONNX_BYTES = 64 * 1024**3


def load_onnx(
    path: str | os.PathLike[str], *, with_weights: bool = True, leave_in_file: int | None = None
) -> onnx.ModelProto:
    """Load an ONNX file with a clear error for missing, garbage or truncated files.

    Before anything else reads the graph, :func:`validate` refuses what would crash or
    mislead a checker or runtime: recursive model-local functions, and tensors whose
    declared dims disagree with their data. With ``leave_in_file`` (and without
    ``with_weights``), inline initializers of at least that many bytes stay in the file
    (:func:`read_inline_view`), so that loading holds no weights.
    """

    path = Path(path)
    if not path.is_file():
        raise GraphError(f"{path}: no such file")
    if path.stat().st_size > MAX_ONNX_BYTES:
        raise GraphError(f"{path}: larger than {MAX_ONNX_BYTES} bytes")
    try:
        if leave_in_file is not None and not with_weights:
            model = read_inline_view(path, leave_in_file)
        else:
            # format="protobuf": onnx would otherwise pick a text parser from a .json name
            model = onnx.load(str(path), format="protobuf", load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError, ValueError, RuntimeError, ...
        raise GraphError(f"{path}: not an ONNX model ({first_line(exc)})") from exc
    if not model.graph.node and not model.graph.input:
        raise GraphError(f"{path}: not an ONNX model (no graph)")
    validate(path, model)
    if with_weights:
        from onnx.external_data_helper import load_external_data_for_model

        try:
            load_external_data_for_model(model, str(path.parent))
        except (OSError, ValueError) as exc:
            raise GraphError(f"{path}: cannot read external data ({first_line(exc)})") from exc
    return model


def read_inline_view(path: Path, min_bytes: int) -> onnx.ModelProto:
    """The model in ``path``, with the inline ``raw_data`` of each main-graph initializer
    of at least ``min_bytes`` left in the file: such a tensor refers to it as external
    data (location: the file's own name, offset and length of the bytes), as if the file
    were its own data file.

    One streamed pass over the protobuf wire format (``ModelProto.graph`` = 7,
    ``GraphProto.initializer`` = 5, ``TensorProto.raw_data`` = 9); everything else is
    parsed by protobuf as usual. Reading a file with inline weights whole costs two
    copies of them (the bytes and the parsed message); this holds none, and anything
    that handles external data (memory maps, onnxruntime) reads them from the file.
    """
    size = path.stat().st_size
    top, graph, tensors = bytearray(), bytearray(), []
    with open(path, "rb") as handle:
        wire = _Wire(handle, size)
        while wire.pos < size:
            start = wire.pos
            field, kind = wire.key()
            if (field, kind) != (7, 2):
                top += wire.field(start, kind)
                continue
            end = wire.end()  # repeated occurrences of graph merge: each is scanned
            while wire.pos < end:
                start = wire.pos
                field, kind = wire.key()
                if (field, kind) == (5, 2):
                    tensors.append(_tensor_view(wire, wire.end(), min_bytes, path.name))
                else:
                    graph += wire.field(start, kind)
            wire.expect(end)
    model = onnx.ModelProto.FromString(bytes(top))
    model.graph.MergeFromString(bytes(graph))
    model.graph.initializer.extend(tensors)
    return model


def _tensor_view(wire: _Wire, end: int, min_bytes: int, location: str) -> TensorProto:
    body, data = bytearray(), None
    while wire.pos < end:
        start = wire.pos
        field, kind = wire.key()
        if (field, kind) == (9, 2):
            data_end = wire.end()
            if data_end - wire.pos >= min_bytes:
                data = (wire.pos, data_end - wire.pos)
                wire.seek(data_end)
                continue
            wire.seek(start)
            wire.key()
        body += wire.field(start, kind)
    wire.expect(end)
    tensor = TensorProto.FromString(bytes(body))
    if data is not None and tensor.data_location != TensorProto.EXTERNAL:
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", location), ("offset", data[0]), ("length", data[1])):
            tensor.external_data.append(onnx.StringStringEntryProto(key=key, value=str(value)))
    return tensor


class _Wire:
    """Protobuf wire format read from a file, bounds-checked (a truncated or damaged file
    raises ValueError, which the caller reports as not an ONNX model)."""

    def __init__(self, handle: Any, size: int) -> None:
        self.handle, self.size, self.pos = handle, size, 0

    def seek(self, pos: int) -> None:
        if not 0 <= pos <= self.size:
            raise ValueError("truncated or damaged protobuf")
        self.handle.seek(pos)
        self.pos = pos

    def varint(self) -> int:
        value = 0
        for shift in range(0, 70, 7):
            byte = self.handle.read(1)
            if not byte:
                raise ValueError("truncated protobuf")
            self.pos += 1
            value |= (byte[0] & 0x7F) << shift
            if byte[0] < 0x80:
                return value
        raise ValueError("damaged protobuf (a varint of more than 10 bytes)")

    def key(self) -> tuple[int, int]:
        key = self.varint()
        return key >> 3, key & 7

    def end(self) -> int:
        """Where a length-delimited value whose length comes next ends."""
        end = self.varint()
        end += self.pos
        if end > self.size:
            raise ValueError("truncated protobuf (a field runs past the end of the file)")
        return end

    def expect(self, end: int) -> None:
        if self.pos != end:
            raise ValueError("damaged protobuf (a field runs past its message)")

    def field(self, start: int, kind: int) -> bytes:
        """The whole field that began at ``start`` (its key just read), as bytes."""
        if kind == 2:
            self.seek(self.end())
        elif kind == 0:
            self.varint()
        elif kind in (1, 5):  # fixed64, fixed32
            self.seek(self.pos + (8 if kind == 1 else 4))
        else:
            raise ValueError(f"unsupported protobuf wire type {kind}")
        end = self.pos
        self.handle.seek(start)
        data = self.handle.read(end - start)
        self.handle.seek(end)
        return data


# --------------------------------------------------------------------------- validation


def validate(path: str | os.PathLike[str], model: onnx.ModelProto | None = None) -> None:
    """Refuse, with one line naming ``path``, a file that would crash or mislead the
    tools after us: recursive model-local functions (``onnx.checker`` of onnx < 1.19
    recurses until it segfaults) and tensors whose declared dims disagree with their
    data (``raw_data``, typed fields or external data), which end in reshape errors or
    "mmap length is greater than file size" deep inside onnx or NumPy.

    Only sizes are compared (the external data files are ``stat``-ed, never read), so
    this costs nothing next to loading. Without ``model`` the file is parsed (without its
    external data): for a caller that only has a path, such as a runtime that failed to
    load the file and wants the reason.
    """
    path = Path(path)
    if model is None:
        try:
            model = onnx.load(str(path), format="protobuf", load_external_data=False)
        except Exception as exc:  # protobuf's DecodeError, ValueError, RuntimeError, ...
            raise GraphError(f"{path}: not an ONNX model ({first_line(exc)})") from exc
    check_functions(path, model)
    check_tensors(path, model)


def _holders(model: onnx.ModelProto) -> Iterator[Any]:
    """The main graph, each model-local function and every subgraph (If/Loop/Scan
    bodies) inside them: everything that holds nodes, found without recursion."""
    stack: list[Any] = [model.graph, *model.functions]
    while stack:
        holder = stack.pop()
        yield holder
        for node in holder.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    stack.append(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    stack.extend(attr.graphs)


def _function_key(item: Any) -> tuple[str, str, str]:
    """``(domain, name, overload)`` of a function, or of the op a node calls."""
    name = item.name if isinstance(item, onnx.FunctionProto) else item.op_type
    return (item.domain, name, getattr(item, "overload", ""))


def _function_label(key: tuple[str, str, str]) -> str:
    domain, name, overload = key
    return f"{domain}::{name}" + (f":{overload}" if overload else "")


def check_functions(path: Path, model: onnx.ModelProto) -> None:
    """Model-local functions that call themselves, directly or through others, are refused."""
    if not model.functions:
        return
    keys = {_function_key(f) for f in model.functions}
    calls: dict[tuple[str, str, str], set[tuple[str, str, str]]] = {k: set() for k in keys}
    for function in model.functions:
        caller = _function_key(function)
        stack: list[Any] = [function]
        while stack:
            holder = stack.pop()
            for node in holder.node:
                called = _function_key(node)
                if called in keys:
                    calls[caller].add(called)
                for attr in node.attribute:
                    if attr.type == onnx.AttributeProto.GRAPH:
                        stack.append(attr.g)
                    elif attr.type == onnx.AttributeProto.GRAPHS:
                        stack.extend(attr.graphs)
    # Depth-first search without recursion: 1 = on the current path, 2 = done.
    state: dict[tuple[str, str, str], int] = {}
    for start in sorted(calls):
        if start in state:
            continue
        path_: list[tuple[str, str, str]] = [start]
        todo = [iter(sorted(calls[start]))]
        state[start] = 1
        while todo:
            step = next(todo[-1], None)
            if step is None:
                state[path_.pop()] = 2
                todo.pop()
                continue
            callee = step
            if state.get(callee) == 1:
                cycle = [*path_[path_.index(callee) :], callee]
                chain = " -> ".join(_function_label(k) for k in cycle)
                raise GraphError(
                    f"{path}: model-local function {_function_label(callee)} is recursive "
                    f"({chain}); ONNX does not allow recursive functions"
                )
            elif callee not in state:
                state[callee] = 1
                path_.append(callee)
                todo.append(iter(sorted(calls[callee])))


# Element width in bits of the types whose raw data packs several elements per byte.
_SUB_BYTE_BITS = {
    getattr(TensorProto, name): bits
    for name, bits in (("INT4", 4), ("UINT4", 4), ("FLOAT4E2M1", 4), ("INT2", 2), ("UINT2", 2))
    if hasattr(TensorProto, name)
}
_COMPLEX = {TensorProto.COMPLEX64, TensorProto.COMPLEX128}


def check_tensors(path: Path, model: onnx.ModelProto) -> None:
    """Every initializer and constant tensor holds exactly the data its dims declare."""
    base = path.parent.resolve()
    sizes: dict[str, int] = {}
    for holder in _holders(model):
        for tensor in getattr(holder, "initializer", ()):
            _check_tensor(path, base, tensor, f"initializer {tensor.name!r}", sizes)
        for node in holder.node:
            for attr in node.attribute:
                tensors = [attr.t] if attr.type == onnx.AttributeProto.TENSOR else attr.tensors
                for tensor in tensors:
                    label = f"{node.op_type} {node.name!r} (attribute {attr.name!r})"
                    _check_tensor(path, base, tensor, label, sizes)


def _check_tensor(path: Path, base: Path, tensor: TensorProto, label: str, sizes: dict) -> None:
    dims = list(tensor.dims)
    if any(d < 0 for d in dims):
        raise GraphError(f"{path}: {label} has a negative dimension in its shape {dims}")
    count = math.prod(dims)  # a Python int: no int64 wrap-around on hostile dims
    kind = TensorProto.DataType.Name(tensor.data_type) if tensor.data_type else "UNDEFINED"
    try:
        itemsize = helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
        field = helper.tensor_dtype_to_field(tensor.data_type)
    except (KeyError, ValueError, TypeError):
        return  # a type this onnx does not know: its checker says so
    string = tensor.data_type == TensorProto.STRING
    bits = _SUB_BYTE_BITS.get(tensor.data_type, itemsize * 8)
    nbytes = -(-count * bits // 8)
    declared = f"declares shape {dims} ({count} {kind} values"
    declared += ")" if string else f", {nbytes} bytes)"
    if tensor.data_location == TensorProto.EXTERNAL:
        if not string:
            _check_external(path, base, tensor, label, nbytes, declared, sizes)
        return
    if tensor.HasField("raw_data"):
        held = len(tensor.raw_data)
        if not string and held != nbytes:
            raise GraphError(f"{path}: {label} {declared}, but its raw_data holds {held} bytes")
        return
    values = len(getattr(tensor, field))
    wanted = 2 * count if tensor.data_type in _COMPLEX else count
    if tensor.data_type in _SUB_BYTE_BITS:
        wanted = nbytes  # packed: one byte's worth of elements per int32_data entry
    if values != wanted:
        raise GraphError(f"{path}: {label} {declared}, but its {field} holds {values} values")


def _check_external(
    path: Path, base: Path, tensor: TensorProto, label: str, nbytes: int, declared: str, sizes: dict
) -> None:
    info = {e.key: e.value for e in tensor.external_data}
    location = info.get("location", "")
    file = (base / location).resolve()
    if not location or os.path.isabs(location) or base not in file.parents:
        raise GraphError(
            f"{path}: tensor {tensor.name!r} names external data {location!r} "
            "outside the model's directory"
        )
    try:
        offset = _bounded_int(info.get("offset", "0"))
        length = _bounded_int(info["length"]) if "length" in info else None
    except ValueError:
        raise GraphError(
            f"{path}: tensor {tensor.name!r} has a malformed external data offset or length"
        ) from None
    if location not in sizes:
        if not file.is_file():
            raise GraphError(
                f"{path}: external data file {location!r} (tensor {tensor.name!r}) is missing"
            )
        sizes[location] = file.stat().st_size
    if length is not None and length != nbytes:
        raise GraphError(
            f"{path}: {label} {declared}, but its external data in {location!r} is "
            f"{length} bytes long"
        )
    needed = offset + nbytes
    if sizes[location] < needed:
        raise GraphError(
            f"{path}: external data file {location!r} is truncated: {label} {declared} "
            f"and needs bytes up to {needed}, the file has {sizes[location]}"
        )


def _bounded_int(text: str) -> int:
    """A non-negative decimal integer of at most 20 digits (offsets and lengths)."""
    if not (text.isascii() and text.isdigit() and len(text) <= 20):
        raise ValueError(text)
    return int(text)


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
            summary["scalers"] = files.parse_json(meta["normexport.scalers"], str(path))
        except FormatError as exc:
            summary["metadata"]["normexport.scalers"] = f"(unreadable: {first_line(exc)})"
    return summary
