"""MXNet checkpoints on disk: validated loading and reproducible, atomic saving.

A symbol file is checked in Python before MXNet's C++ parser sees it (malformed graphs
can abort the process there), and sizes are bounded before anything is allocated.
"""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path
from typing import Any

import mxnet as mx
import numpy as np

from normexport import io
from normexport.errors import FormatError, first_line
from normexport.graph import Checkpoint
from normexport.mxparams import read_params

MAX_SYMBOL_BYTES = 64 * 1024 * 1024
MAX_PARAMS_BYTES = 64 * 1024**3
MAX_NODES = 100_000
MAX_ELEMENTS = 2**34  # one tensor of more than 16 Gi elements is not a regression net


def load_checkpoint(
    symbol_path: str | os.PathLike[str], params_path: str | os.PathLike[str]
) -> Checkpoint:
    """Load ``(symbol, arg_params, aux_params)`` and check that they fit together."""
    symbol = load_symbol(symbol_path)
    arg_params, aux_params = load_params(params_path, symbol)
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


def load_symbol(path: str | os.PathLike[str]) -> mx.sym.Symbol:
    path = Path(path)
    raw = io.read_small_file(path, MAX_SYMBOL_BYTES)
    try:
        text = raw.decode("utf-8")
        doc = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"{path}: not an MXNet symbol file (not valid JSON: {exc})") from exc
    validate_symbol_json(doc, str(path))
    try:
        return mx.sym.load_json(text)
    except mx.base.MXNetError as exc:
        raise FormatError(f"{path}: MXNet cannot load this symbol: {first_line(exc)}") from exc


def validate_symbol_json(doc: Any, source: str) -> None:
    """Structural checks of an MXNet symbol document: types, node references, sizes."""
    if not isinstance(doc, dict) or not isinstance(doc.get("nodes"), list):
        raise FormatError(f"{source}: not an MXNet symbol file (no 'nodes' list)")
    nodes = doc["nodes"]
    if not nodes or len(nodes) > MAX_NODES:
        raise FormatError(f"{source}: {len(nodes)} nodes; expected 1 to {MAX_NODES}")
    for i, node in enumerate(nodes):
        where = f"{source}: node {i}"
        if not isinstance(node, dict):
            raise FormatError(f"{where}: expected an object")
        if not isinstance(node.get("op"), str) or not isinstance(node.get("name"), str):
            raise FormatError(f"{where}: 'op' and 'name' must be strings")
        where = f"{source}: node {i} ({node['name']!r})"
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
            _check_ref(ref, i, where)
    heads = doc.get("heads")
    if not isinstance(heads, list) or not heads:
        raise FormatError(f"{source}: no 'heads' (graph outputs)")
    for ref in heads:
        _check_ref(ref, len(nodes), f"{source}: heads")
    arg_nodes = doc.get("arg_nodes", [])
    if not isinstance(arg_nodes, list) or not all(
        isinstance(a, int) and 0 <= a < len(nodes) and nodes[a]["op"] == "null" for a in arg_nodes
    ):
        raise FormatError(f"{source}: 'arg_nodes' must list variable nodes")


def _check_ref(ref: Any, limit: int, where: str) -> None:
    if (
        not isinstance(ref, list)
        or len(ref) not in (2, 3)
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in ref)
    ):
        raise FormatError(f"{where}: an input reference must be [node, output(, version)]")
    if not 0 <= ref[0] < limit or ref[1] < 0:
        raise FormatError(f"{where}: refers to node {ref[0]}, which does not precede it")


def _check_sizes(attrs: dict[str, str], where: str) -> None:
    for key in ("num_hidden", "num_filter", "input_dim", "output_dim"):
        if key in attrs:
            try:
                value = int(attrs[key])
            except ValueError:
                raise FormatError(f"{where}: {key}={attrs[key]!r} is not an integer") from None
            if not 0 < value <= MAX_ELEMENTS:
                raise FormatError(f"{where}: {key}={value} is out of range")
    if "__shape__" in attrs:
        try:
            shape = ast.literal_eval(attrs["__shape__"])
            dims = [int(d) for d in (shape if isinstance(shape, tuple) else (shape,))]
        except (ValueError, SyntaxError, TypeError):
            raise FormatError(f"{where}: __shape__={attrs['__shape__']!r} is not a shape") from None
        if any(d < 0 for d in dims) or np.prod([max(d, 1) for d in dims]) > MAX_ELEMENTS:
            raise FormatError(f"{where}: __shape__ {tuple(dims)} is out of range")


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
    # Parsed in Python (never by mx.nd.load), so a hostile file cannot crash the process.
    loaded = {k: mx.nd.array(v, dtype=v.dtype) for k, v in read_params(path).items()}
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
    io.write_bytes(io.symbol_file(directory, prefix), symbol.tojson().encode("utf-8"))
    entries = {f"arg:{k}": arg_params[k] for k in sorted(arg_params)}
    entries.update({f"aux:{k}": aux_params[k] for k in sorted(aux_params)})
    with io.atomic_path(io.params_file(directory, prefix)) as tmp:
        mx.nd.save(str(tmp), entries)
