"""MXNet checkpoints on disk: validated loading and reproducible, atomic saving.

A symbol file is checked in Python before MXNet's C++ parser sees it, and sizes are
bounded before anything is allocated. Measured on mxnet 1.9.1: ``mx.sym.load_json``
trusts every ``[node, output]`` reference, so an output index past a node's outputs
(``[3, 7, 0]`` in ``heads``, or ``[1, 5, 0]`` pointing into a variable) kills the
process with a segmentation fault or ``std::bad_alloc``, at load or at the first shape
inference. Unknown ops and bad attribute values only raise ``MXNetError``. So every
reference is checked against the number of outputs of the node it names: one for a
variable; for an op, what MXNet reports for that op alone, built from its attributes
and fed plain variables (a composition that has no references to get wrong). That
costs about 15 µs per distinct node and keeps the load in-process; loading in a
child process instead would cost a second MXNet import (about 1.3 s of a 3.4 s export
on the development machine) and still leave later steps unprotected.
"""

from __future__ import annotations

import ctypes
import functools
import json
import os
import re
from pathlib import Path
from typing import Any

import mxnet as mx
import numpy as np
from mxnet.base import _LIB

from normexport import files
from normexport.errors import FormatError, first_line
from normexport.modeldir import params_file, symbol_file
from normexport.mx.graph import Checkpoint
from normexport.mxparams import read_params

MAX_SYMBOL_BYTES = 64 * 1024 * 1024
MAX_PARAMS_BYTES = 64 * 1024**3
MAX_NODES = 100_000
SPLICE_NODES = 64  # room the splice needs in a net's symbol: its nodes stay within MAX_NODES
MAX_ELEMENTS = 2**34  # one tensor of more than 16 Gi elements is not a regression net
MAX_COUNT = 4096  # num_outputs, num_args, ...: how many outputs or inputs an op may declare
_MAX_DIGITS = 20  # longer integers are out of range without being converted (Python limits that)
_COUNT_ATTRS = ("num_outputs", "num_args")
_SIZE_ATTRS = ("num_hidden", "num_filter", "input_dim", "output_dim", "state_size")
_SHAPE_ATTRS = ("__shape__", "shape", "target_shape")
_INTEGERS = re.compile(r"^\s*[\[(]?\s*(-?\d+\s*(,\s*-?\d+\s*)*,?)?\s*[\])]?\s*$")


def load_checkpoint(
    symbol_path: str | os.PathLike[str], params_path: str | os.PathLike[str]
) -> Checkpoint:
    """Load ``(symbol, arg_params, aux_params)`` and check that they fit together."""
    symbol = load_symbol(symbol_path)
    arg_params, aux_params = load_params(params_path, symbol)
    _check_shapes(symbol, arg_params, aux_params, f"{params_path}", Path(symbol_path).name)
    missing_aux = [a for a in symbol.list_auxiliary_states() if a not in aux_params]
    if missing_aux:
        raise FormatError(f"{params_path}: lacks {missing_aux[0]!r}, which the symbol names")
    free = [a for a in symbol.list_arguments() if a not in arg_params]
    if len(free) > 1:
        # More than one unbound argument: either several inputs or missing weights.
        weights = [a for a in free if a != "data"]
        raise FormatError(
            f"{params_path}: lacks {weights[0]!r}, which the symbol names "
            f"(unbound arguments: {', '.join(free)})"
        )
    return Checkpoint(symbol, arg_params, aux_params)


def _check_shapes(
    symbol: mx.sym.Symbol,
    arg_params: dict[str, mx.nd.NDArray],
    aux_params: dict[str, mx.nd.NDArray],
    source: str,
    symbol_name: str,
) -> None:
    """Refuse parameters whose shapes contradict the graph (or each other).

    Shape inference needs the input's shape to reach past the first layer; when the one
    free input feeds a ``FullyConnected`` layer, its width is that layer's weight's.
    """
    names = set(symbol.list_arguments()) | set(symbol.list_auxiliary_states())
    shapes = {k: v.shape for k, v in (*arg_params.items(), *aux_params.items()) if k in names}
    free = [a for a in symbol.list_arguments() if a not in shapes]
    if len(free) == 1:
        width = _first_layer_width(symbol, free[0], shapes)
        if width is not None:
            shapes[free[0]] = (1, width)
    try:
        symbol.infer_shape_partial(**shapes)  # unlike infer_shape, prints nothing on error
    except mx.base.MXNetError as exc:
        raise FormatError(
            f"{source}: parameter shapes do not fit {symbol_name}: {first_line(exc)}"
        ) from exc


def _first_layer_width(
    symbol: mx.sym.Symbol, input_name: str, shapes: dict[str, tuple[int, ...]]
) -> int | None:
    nodes = json.loads(symbol.tojson())["nodes"]
    index = next(i for i, n in enumerate(nodes) if n["op"] == "null" and n["name"] == input_name)
    users = [n for n in nodes if any(ref[0] == index for ref in n["inputs"])]
    if len(users) != 1 or users[0]["op"] != "FullyConnected" or len(users[0]["inputs"]) < 2:
        return None
    if users[0]["inputs"][0][0] != index:
        return None
    weight = shapes.get(nodes[users[0]["inputs"][1][0]]["name"])
    return int(weight[1]) if weight is not None and len(weight) == 2 else None


def load_symbol(path: str | os.PathLike[str]) -> mx.sym.Symbol:
    path = Path(path)
    if path.exists() and not path.is_file() and not path.is_dir():
        # A FIFO or a device would block or never end; only regular files are read.
        raise FormatError(f"{path}: not a regular file, expected an MXNet symbol file")
    raw = files.read_small_file(path, MAX_SYMBOL_BYTES)
    if raw.startswith(files.PICKLE_MAGIC):
        raise FormatError(f"{path}: looks like a Python pickle; expected an MXNet symbol (JSON)")
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"{path}: not an MXNet symbol file (not valid JSON: {exc})") from exc
    except RecursionError:
        raise FormatError(f"{path}: not an MXNet symbol file (JSON nested too deeply)") from None
    validate_symbol_json(doc, str(path))
    try:
        # MXNet parses what was validated, re-serialized: a duplicate key or any other
        # ambiguity of the original text cannot be read differently by the C++ parser.
        return mx.sym.load_json(json.dumps(doc))
    except mx.base.MXNetError as exc:
        raise FormatError(f"{path}: MXNet cannot load this symbol: {first_line(exc)}") from exc


def check_room_to_splice(symbol: mx.sym.Symbol, source: str) -> None:
    """Refuse, before any work, a net whose spliced symbol would exceed :data:`MAX_NODES`."""
    nodes = len(json.loads(symbol.tojson())["nodes"])
    if nodes > MAX_NODES - SPLICE_NODES:
        raise FormatError(
            f"{source}: {nodes} nodes; the exported model adds up to {SPLICE_NODES} to the "
            f"net's, within the {MAX_NODES}-node limit, so a net may have at most "
            f"{MAX_NODES - SPLICE_NODES}"
        )


def validate_symbol_json(doc: Any, source: str) -> None:
    """Check an MXNet symbol document before MXNet parses it.

    Types, that every reference points to an earlier node and to an output that node
    has, that each op exists and gets the number of inputs it takes, and that sizes,
    shapes and counts in attributes are bounded. Raises :class:`FormatError` naming
    ``source``, the node and the fault.
    """
    if not isinstance(doc, dict) or not isinstance(doc.get("nodes"), list):
        raise FormatError(f"{source}: not an MXNet symbol file (no 'nodes' list)")
    nodes = doc["nodes"]
    if not nodes or len(nodes) > MAX_NODES:
        raise FormatError(f"{source}: {len(nodes)} nodes; expected 1 to {MAX_NODES}")
    _check_graph_attrs(doc.get("attrs", {}), source)
    outputs: list[int] = []  # visible outputs of each node checked so far
    variables: set[str] = set()
    for i, node in enumerate(nodes):
        where = f"{source}: node {i}"
        if not isinstance(node, dict):
            raise FormatError(f"{where}: expected an object")
        op, name = node.get("op"), node.get("name")
        if not isinstance(op, str) or not isinstance(name, str):
            raise FormatError(f"{where}: 'op' and 'name' must be strings")
        where = f"{source}: node {i} ({name!r})"
        for key in ("control_deps", "subgraphs"):
            if node.get(key):
                raise FormatError(f"{where}: {key!r} is not supported (no control flow here)")
        attrs = node.get("attrs", node.get("attr", node.get("param", {})))
        if not isinstance(attrs, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in attrs.items()
        ):
            raise FormatError(f"{where}: 'attrs' must map strings to strings")
        _check_sizes(attrs, where)
        inputs = node.get("inputs", [])
        if not isinstance(inputs, list):
            raise FormatError(f"{where}: 'inputs' must be a list")
        for ref in inputs:
            _check_ref(ref, outputs, where)
        if op == "null":
            if inputs:
                raise FormatError(f"{where}: a variable (op 'null') cannot have inputs")
            if name in variables:
                raise FormatError(f"{where}: a second variable named {name!r}")
            variables.add(name)
            outputs.append(1)
        else:
            outputs.append(_op_outputs(op, attrs, len(inputs), where))
    heads = doc.get("heads")
    if not isinstance(heads, list) or not heads:
        raise FormatError(f"{source}: no 'heads' (graph outputs)")
    for ref in heads:
        _check_ref(ref, outputs, f"{source}: heads")
    arg_nodes = doc.get("arg_nodes", [])
    if not isinstance(arg_nodes, list) or not all(
        isinstance(a, int) and 0 <= a < len(nodes) and nodes[a]["op"] == "null" for a in arg_nodes
    ):
        raise FormatError(f"{source}: 'arg_nodes' must list variable nodes")


def _check_graph_attrs(attrs: Any, source: str) -> None:
    # MXNet reads each value as a typed pair, e.g. "mxnet_version": ["int", 10901].
    if not isinstance(attrs, dict) or not all(
        isinstance(v, list) and len(v) == 2 and isinstance(v[0], str) for v in attrs.values()
    ):
        raise FormatError(f"{source}: 'attrs' must map names to [type, value] pairs")
    version = attrs.get("mxnet_version", ["int", 0])
    if version[0] != "int" or not isinstance(version[1], int) or isinstance(version[1], bool):
        raise FormatError(f"{source}: 'mxnet_version' must be [\"int\", N], got {version!r}")


def _check_ref(ref: Any, outputs: list[int], where: str) -> None:
    """``[node, output(, version)]``: an earlier node, and an output that node has."""
    if (
        not isinstance(ref, list)
        or len(ref) not in (2, 3)
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in ref)
    ):
        raise FormatError(f"{where}: an input reference must be [node, output(, version)]")
    if not 0 <= ref[0] < len(outputs):
        raise FormatError(f"{where}: refers to node {ref[0]}, which does not precede it")
    if not 0 <= ref[1] < outputs[ref[0]] or (len(ref) == 3 and ref[2] < 0):
        raise FormatError(
            f"{where}: refers to output {ref[1]} of node {ref[0]}, which has "
            f"{outputs[ref[0]]} output(s)"
        )


def _op_outputs(op: str, attrs: dict[str, str], n_inputs: int, where: str) -> int:
    """How many outputs ``op`` has with these attributes; it must take ``n_inputs`` inputs."""
    if op not in _registered_ops():
        raise FormatError(f"{where}: unknown op {op!r} (not an operator of mxnet {mx.__version__})")
    signature = _op_signature(op, tuple(sorted(attrs.items())), n_inputs)
    if isinstance(signature, str):
        raise FormatError(f"{where}: {op}: {signature}")
    takes, gives = signature
    if takes != n_inputs:
        raise FormatError(f"{where}: {op} takes {takes} inputs here, but the node lists {n_inputs}")
    return gives


@functools.lru_cache(maxsize=1)
def _registered_ops() -> frozenset[str]:
    return frozenset(mx.operator.get_all_registered_operators())


@functools.lru_cache(maxsize=4096)
def _op_signature(
    op: str, attrs: tuple[tuple[str, str], ...], n_inputs: int
) -> tuple[int, int] | str:
    """``(inputs, outputs)`` of ``op`` alone, composed with ``n_inputs`` fresh variables.

    Composition (what ``mx.sym.<op>(...)`` does) fills in any inputs not given, so the
    count of arguments and auxiliary states afterwards is what the op takes. Returns the
    first line of MXNet's complaint instead when the op refuses its attributes or inputs.
    """
    from mxnet.base import OpHandle, SymbolHandle, c_str, c_str_array, check_call, mx_uint

    keys, values = [k for k, _ in attrs], [v for _, v in attrs]
    try:
        handle, created = OpHandle(), SymbolHandle()
        check_call(_LIB.NNGetOpHandle(c_str(op), ctypes.byref(handle)))
        check_call(
            _LIB.MXSymbolCreateAtomicSymbol(
                handle,
                mx_uint(len(keys)),
                c_str_array(keys),
                c_str_array(values),
                ctypes.byref(created),
            )
        )
        symbol = mx.sym.Symbol(created)
        symbol._compose(
            *(mx.sym.var(f"normexport_probe{k}") for k in range(n_inputs)), name="normexport_probe"
        )
        takes = len(symbol.list_arguments()) + len(symbol.list_auxiliary_states())
        return takes, len(symbol.list_outputs())
    except mx.base.MXNetError as exc:
        return first_line(exc)


def _check_sizes(attrs: dict[str, str], where: str) -> None:
    """Bound every integer (or tuple of integers) attribute before MXNet acts on it."""
    for key in (*_SIZE_ATTRS, *_COUNT_ATTRS, "__shape__"):
        if key in attrs and not _INTEGERS.match(attrs[key]):
            raise FormatError(f"{where}: {key}={_clip(attrs[key])} is not an integer or shape")
    for key, text in attrs.items():
        if not _INTEGERS.match(text):
            continue
        digits = re.findall(r"-?\d+", text)
        if len(digits) > MAX_COUNT or any(len(v) > _MAX_DIGITS for v in digits):
            raise FormatError(f"{where}: {key}={_clip(text)} is out of range")
        numbers = [int(v) for v in digits]
        if any(abs(v) > MAX_ELEMENTS for v in numbers):
            raise FormatError(f"{where}: {key}={_clip(text)} is out of range")
        if key in _COUNT_ATTRS and not all(0 < v <= MAX_COUNT for v in numbers):
            raise FormatError(f"{where}: {key}={text} is out of range (1 to {MAX_COUNT})")
        if key in _SIZE_ATTRS and not all(v > 0 for v in numbers):
            raise FormatError(f"{where}: {key}={text} is out of range")
        if key in _SHAPE_ATTRS:
            if key == "__shape__" and any(v < 0 for v in numbers):
                raise FormatError(f"{where}: {key} {_clip(text)} has a negative dimension")
            if int(np.prod([max(abs(v), 1) for v in numbers], dtype=object)) > MAX_ELEMENTS:
                raise FormatError(f"{where}: {key} {_clip(text)} is out of range")


def _clip(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def load_params(
    path: str | os.PathLike[str], symbol: mx.sym.Symbol | None = None
) -> tuple[dict[str, mx.nd.NDArray], dict[str, mx.nd.NDArray]]:
    """Read a ``.params`` file into ``(arg_params, aux_params)``.

    Accepts both ``net.export`` files (``arg:``/``aux:`` prefixes) and
    ``save_parameters`` files (bare names, sorted by the symbol's auxiliary states).
    The file is parsed by :mod:`normexport.mxparams`, never by ``mx.nd.load``.
    """
    path = Path(path)
    size = path.stat().st_size if path.is_file() else 0
    if size > MAX_PARAMS_BYTES:
        raise FormatError(f"{path}: {size} bytes, larger than the {MAX_PARAMS_BYTES}-byte limit")
    # Parsed in Python (never by mx.nd.load), so a hostile file cannot crash the process;
    # each array is filled in place, block by block, so the weights are held once.
    loaded = read_params(path, empty=lambda shape, dtype: mx.nd.empty(shape, dtype=dtype))
    aux_names = set(symbol.list_auxiliary_states()) if symbol is not None else set()
    arg_params: dict[str, mx.nd.NDArray] = {}
    aux_params: dict[str, mx.nd.NDArray] = {}
    for key, value in loaded.items():
        kind, _, name = key.partition(":")
        if not name:
            kind, name = ("aux" if key in aux_names else "arg"), key
        if kind not in ("arg", "aux"):
            raise FormatError(f"{path}: unexpected entry {key!r}")
        (aux_params if kind == "aux" else arg_params)[name] = value
    return arg_params, aux_params


def save_checkpoint(checkpoint: Checkpoint, directory: str | os.PathLike[str], prefix: str) -> None:
    """Write ``PREFIX-symbol.json`` and ``PREFIX-0000.params``, atomically and reproducibly.

    Keys are sorted: ``mx.nd.save`` writes in dict order, so sorting makes the bytes
    independent of how the dict was built.
    """
    symbol, arg_params, aux_params = checkpoint
    files.write_bytes(symbol_file(directory, prefix), symbol.tojson().encode("utf-8"))
    entries = {f"arg:{k}": arg_params[k] for k in sorted(arg_params)}
    entries.update({f"aux:{k}": aux_params[k] for k in sorted(aux_params)})
    with files.atomic_path(params_file(directory, prefix)) as tmp:
        mx.nd.save(str(tmp), entries)
