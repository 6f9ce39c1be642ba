"""Splice and fold fixed normalization into an MXNet graph (pure functions).

Every function takes a :class:`Checkpoint` ``(symbol, arg_params, aux_params)`` and
returns a new one; nothing here trains, reads files or prints.

splice
    ``data`` is re-bound to ``broadcast_add(broadcast_mul(data, in_scale), in_shift)``
    and the output goes through ``broadcast_add(broadcast_mul(y, out_scale), out_shift)``.
fold
    The input affine is folded into the first ``FullyConnected`` (``W' = W·diag(s)``,
    ``b' = b + W·t``) and the output affine into the last one when nothing follows it
    (``W' = diag(s)·W``, ``b' = s·b + t``); sides that cannot be folded are spliced, and
    the :class:`FoldPlan` says which and why.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, NamedTuple

import mxnet as mx
import numpy as np

from normexport.affine import PREFIX, Affine, FoldPlan, check_affine, constant_name, fold_dense
from normexport.errors import GraphError, NormexportError, first_line
from normexport.transforms import MXNET_OPS, Kinds, runs

INPUT_NAME = "data"


class Checkpoint(NamedTuple):
    symbol: mx.sym.Symbol
    arg_params: dict[str, mx.nd.NDArray]
    aux_params: dict[str, mx.nd.NDArray]


@dataclass(frozen=True)
class NetInfo:
    """What a checkpoint looks like from outside."""

    input_name: str
    n_inputs: int
    n_outputs: int
    dtype: str
    ops: tuple[str, ...]


# ------------------------------------------------------------------------------ inspection


def from_block(block: Any) -> Checkpoint:
    """The checkpoint of a live, initialized Gluon ``HybridBlock`` (as ``export`` would save)."""
    try:
        symbol = block(mx.sym.var(INPUT_NAME))
        params = {p.name: p.data() for p in block.collect_params().values()}
    except (mx.base.MXNetError, RuntimeError) as exc:
        raise GraphError(
            f"cannot read the network's graph ({first_line(exc)}); initialize it and run it "
            "forward once on a batch before exporting"
        ) from exc
    if isinstance(symbol, (list, tuple)):
        raise GraphError(f"the network has {len(symbol)} outputs; normexport needs exactly one")
    aux_names = set(symbol.list_auxiliary_states())
    arg_params = {k: v for k, v in params.items() if k in symbol.list_arguments()}
    aux_params = {k: v for k, v in params.items() if k in aux_names}
    return Checkpoint(symbol, arg_params, aux_params)


def describe(checkpoint: Checkpoint, n_inputs: int | None = None) -> NetInfo:
    """Input name, widths and dtype of a single-input, single-output network.

    The input width comes from the first layer's weight when ``n_inputs`` is not given;
    with it, shape inference checks that the network accepts that many columns.
    """
    symbol, arg_params, aux_params = checkpoint
    outputs = symbol.list_outputs()
    if len(outputs) != 1:
        raise GraphError(f"the network has {len(outputs)} outputs; normexport needs exactly one")
    free = [a for a in symbol.list_arguments() if a not in arg_params]
    if len(free) != 1:
        raise GraphError(
            f"the network has {len(free)} inputs ({', '.join(free) or 'none'}); "
            "normexport needs exactly one"
        )
    input_name = free[0]
    taken = [n for n in (*symbol.list_arguments(), *aux_params) if n.startswith(PREFIX)]
    if taken:
        raise GraphError(
            f"the network already carries normexport constants ({taken[0]}); "
            "export the plain network, not an exported model"
        )
    dtype = _params_dtype(arg_params, aux_params)
    nodes = _nodes(symbol)
    guessed = _first_layer_width(nodes, input_name, arg_params)
    if n_inputs is None:
        if guessed is None:
            raise GraphError(
                "cannot tell how many inputs the network takes (its first op is not a "
                "FullyConnected layer); give the scalers or factors to fix the width"
            )
        n_inputs = guessed
    elif guessed is not None and guessed != n_inputs:
        raise GraphError(
            f"the network takes {guessed} inputs, but the input constants have {n_inputs}"
        )
    n_outputs = _output_width(checkpoint, input_name, n_inputs)
    ops = tuple(n["op"] for n in nodes if n["op"] != "null")
    return NetInfo(input_name, n_inputs, n_outputs, dtype, ops)


def widths_from_total(checkpoint: Checkpoint, total: int) -> NetInfo:
    """The network's description when only ``n_inputs + n_outputs`` is known (a factors
    file): the first layer's weight gives the input width where it can; otherwise each
    split of ``total`` is tried with shape inference."""
    try:
        return describe(checkpoint)
    except GraphError as exc:
        if "cannot tell how many inputs" not in str(exc):
            raise
    fits = []
    for n_inputs in range(1, total):
        try:
            info = describe(checkpoint, n_inputs)
        except GraphError:
            continue
        if info.n_inputs + info.n_outputs == total:
            fits.append(info)
    if len(fits) != 1:
        raise GraphError(
            f"cannot tell how many inputs the network takes: {len(fits)} ways to split "
            f"{total} factor rows into inputs and outputs fit its graph; use --scalers"
        )
    return fits[0]


def _params_dtype(arg_params: dict[str, Any], aux_params: dict[str, Any]) -> str:
    dtypes = {np.dtype(v.dtype).name for v in (*arg_params.values(), *aux_params.values())}
    if not dtypes:
        raise GraphError("the network has no parameters")
    if len(dtypes) > 1:
        raise GraphError(f"the network mixes parameter dtypes ({', '.join(sorted(dtypes))})")
    dtype = dtypes.pop()
    if dtype not in ("float32", "float64"):
        raise GraphError(f"parameters are {dtype}; normexport supports float32 and float64")
    return dtype


def _output_width(checkpoint: Checkpoint, input_name: str, n_inputs: int) -> int:
    symbol, arg_params, aux_params = checkpoint
    shapes = {k: v.shape for k, v in (*arg_params.items(), *aux_params.items())}
    try:
        # infer_shape_partial raises on contradictions like infer_shape, but does not
        # print "infer_shape error. Arguments: ..." to stdout first.
        _, out_shapes, _ = symbol.infer_shape_partial(**{input_name: (1, n_inputs)}, **shapes)
    except mx.base.MXNetError as exc:
        raise GraphError(
            f"the network does not accept {n_inputs} input columns: {first_line(exc)}"
        ) from exc
    if out_shapes is None or len(out_shapes[0]) != 2 or 0 in out_shapes[0]:
        raise GraphError(f"the network's output has shape {out_shapes}; expected (batch, n)")
    return int(out_shapes[0][1])


def _nodes(symbol: mx.sym.Symbol) -> list[dict[str, Any]]:
    nodes: list[dict[str, Any]] = json.loads(symbol.tojson())["nodes"]
    return nodes


def _first_layer_width(
    nodes: list[dict[str, Any]], input_name: str, arg_params: dict[str, Any]
) -> int | None:
    consumers = _consumers(nodes, _index(nodes, input_name))
    if len(consumers) == 1 and nodes[consumers[0]]["op"] == "FullyConnected":
        weight = nodes[nodes[consumers[0]]["inputs"][1][0]]["name"]
        if weight in arg_params and len(arg_params[weight].shape) == 2:
            return int(arg_params[weight].shape[1])
    return None


def _index(nodes: list[dict[str, Any]], name: str) -> int:
    return next(i for i, n in enumerate(nodes) if n["op"] == "null" and n["name"] == name)


def _consumers(nodes: list[dict[str, Any]], index: int) -> list[int]:
    return [i for i, n in enumerate(nodes) if any(ref[0] == index for ref in n["inputs"])]


# ------------------------------------------------------------------------------ splice


def splice(checkpoint: Checkpoint, in_affine: Affine, out_affine: Affine) -> Checkpoint:
    """Wrap the network in fixed input and output affines (``broadcast_mul``/``broadcast_add``).

    Returns a new checkpoint whose input is ``data`` in raw units and whose output is in
    raw units. The four constants are ``(1, n)`` parameters in the network's dtype.
    """
    info = describe(checkpoint, len(in_affine[0]))
    in_affine, out_affine = _checked(info, in_affine, out_affine)
    checkpoint = _splice_input(checkpoint, info, in_affine)
    return _splice_output(checkpoint, info, out_affine)


def _checked(info: NetInfo, in_affine: Affine, out_affine: Affine) -> tuple[Affine, Affine]:
    """Both affines through the one factor check, against the network's widths and dtype."""
    try:
        return (
            check_affine("input", in_affine, info.n_inputs, dtype=info.dtype),
            check_affine("output", out_affine, info.n_outputs, dtype=info.dtype),
        )
    except NormexportError as exc:
        raise GraphError(str(exc)) from exc


def _constant(values: np.ndarray, dtype: str) -> mx.nd.NDArray:
    return mx.nd.array(np.asarray(values, dtype=np.float64).reshape(1, -1), dtype=dtype)


def _affine_nodes(x: mx.sym.Symbol, side: str, n: int, dtype: str) -> mx.sym.Symbol:
    scale = mx.sym.var(constant_name(side, "scale"), shape=(1, n), dtype=dtype)
    shift = mx.sym.var(constant_name(side, "shift"), shape=(1, n), dtype=dtype)
    scaled = mx.sym.broadcast_mul(x, scale, name=constant_name(side, "mul"))
    return mx.sym.broadcast_add(scaled, shift, name=constant_name(side, "add"))


def _splice_input(checkpoint: Checkpoint, info: NetInfo, affine: Affine) -> Checkpoint:
    symbol, arg_params, aux_params = checkpoint
    data = mx.sym.var(INPUT_NAME)
    new_input = _affine_nodes(data, "in", info.n_inputs, info.dtype)
    symbol = symbol(**{info.input_name: new_input})
    arg_params = {
        **arg_params,
        constant_name("in", "scale"): _constant(affine[0], info.dtype),
        constant_name("in", "shift"): _constant(affine[1], info.dtype),
    }
    return Checkpoint(symbol, arg_params, dict(aux_params))


def _splice_output(checkpoint: Checkpoint, info: NetInfo, affine: Affine) -> Checkpoint:
    symbol, arg_params, aux_params = checkpoint
    symbol = _affine_nodes(symbol, "out", info.n_outputs, info.dtype)
    arg_params = {
        **arg_params,
        constant_name("out", "scale"): _constant(affine[0], info.dtype),
        constant_name("out", "shift"): _constant(affine[1], info.dtype),
    }
    return Checkpoint(symbol, arg_params, dict(aux_params))


def splice_transforms(checkpoint: Checkpoint, in_ops: Kinds, out_ops: Kinds) -> Checkpoint:
    """Apply ``in_ops`` to the raw input ``data`` first and ``out_ops`` to the output
    last: the edges of a spliced or folded checkpoint (its input must be ``data``).

    Columns sharing an op form a run (:func:`normexport.transforms.runs`): one op when a
    run spans every column, else ``slice_axis`` per run and ``concat``, with the node
    names of :mod:`normexport.onnx_transforms` (which MXNet's exporter keeps).
    """
    symbol, arg_params, aux_params = checkpoint
    if any(in_ops):
        symbol = symbol(
            **{INPUT_NAME: apply_transforms(mx.sym, mx.sym.var(INPUT_NAME), "in", in_ops)}
        )
    if any(out_ops):
        symbol = apply_transforms(mx.sym, symbol, "out", out_ops)
    return Checkpoint(symbol, dict(arg_params), dict(aux_params))


def apply_transforms(F: Any, x: Any, side: str, ops: Kinds) -> Any:
    """``ops`` (one op name or None per column) on ``x`` with ``F`` (``mx.sym`` or
    ``mx.nd``): the transforms' nodes, in a symbol and in a Gluon block alike."""
    if not any(ops):
        return x
    pieces = runs(ops)
    parts = []
    for k, (start, stop, op) in enumerate(pieces):
        part = x
        if len(pieces) > 1:
            name = f"{PREFIX}{side}_slice{k}"
            part = F.slice_axis(x, axis=1, begin=start, end=stop, name=name)
        if op is not None:
            part = getattr(F, MXNET_OPS[op])(part, name=f"{PREFIX}{side}_{op}{k}")
        parts.append(part)
    if len(parts) == 1:
        return parts[0]
    return F.concat(*parts, dim=1, name=f"{PREFIX}{side}_concat")


def _rename_input(checkpoint: Checkpoint, info: NetInfo) -> Checkpoint:
    if info.input_name == INPUT_NAME:
        return checkpoint
    symbol = checkpoint.symbol(**{info.input_name: mx.sym.var(INPUT_NAME)})
    return Checkpoint(symbol, checkpoint.arg_params, checkpoint.aux_params)


# ------------------------------------------------------------------------------ fold


def plan_fold(
    checkpoint: Checkpoint, in_affine: Affine | None = None, out_affine: Affine | None = None
) -> FoldPlan:
    """Decide, without changing anything, which sides can be folded and why not.

    A layer without a bias can still absorb an affine whose shift is zero; pass the
    affines to let the plan know.
    """
    symbol, arg_params, _ = checkpoint
    info = describe(checkpoint, None if in_affine is None else len(in_affine[0]))
    nodes = _nodes(symbol)
    first = _consumers(nodes, _index(nodes, info.input_name))
    in_zero = in_affine is not None and not np.any(in_affine[1])
    out_zero = out_affine is not None and not np.any(out_affine[1])
    in_reason = (
        _foldable(nodes, first[0], arg_params, in_zero)
        if len(first) == 1
        else ("the input feeds several ops")
    )
    if not in_reason and nodes[first[0]]["inputs"][0][0] != _index(nodes, info.input_name):
        in_reason = "the input is not the first layer's data operand"
    head = json.loads(symbol.tojson())["heads"][0][0]
    last = nodes[head]
    if last["op"] == "FullyConnected":
        out_reason = _foldable(nodes, head, arg_params, out_zero)
    elif last["op"] == "Activation":
        act = last.get("attrs", {}).get("act_type", "an activation")
        out_reason = f"an activation ({act}) follows the last FullyConnected layer"
    else:
        out_reason = f"the last op is {last['op']}, not a FullyConnected layer"
    if not in_reason and nodes[first[0]]["op"] != "FullyConnected":
        in_reason = f"the first op is {nodes[first[0]]['op']}, not a FullyConnected layer"
    return FoldPlan(
        "spliced" if in_reason else "folded",
        "spliced" if out_reason else "folded",
        in_reason,
        out_reason,
    )


def _foldable(
    nodes: list[dict[str, Any]], index: int, arg_params: dict[str, Any], shift_zero: bool
) -> str:
    """Why the FullyConnected node at ``index`` cannot absorb an affine ('' if it can)."""
    node = nodes[index]
    if node["op"] != "FullyConnected":
        return f"the first op is {node['op']}, not a FullyConnected layer"
    if _has_no_bias(node) and not shift_zero:
        return f"layer {node['name']} has no bias to absorb the shift"
    for slot in node["inputs"][1:3]:
        param = nodes[slot[0]]
        if param["op"] != "null" or param["name"] not in arg_params:
            return f"layer {node['name']} has a non-constant weight or bias"
        if len(_consumers(nodes, slot[0])) > 1:
            return f"{param['name']} is shared with another layer"
    return ""


def _has_no_bias(node: dict[str, Any]) -> bool:
    return node.get("attrs", {}).get("no_bias", "False") in ("True", "true", "1")


def fold(
    checkpoint: Checkpoint, in_affine: Affine, out_affine: Affine
) -> tuple[Checkpoint, FoldPlan]:
    """Fold the affines into the first/last ``FullyConnected`` layers where possible.

    The arithmetic is done in float64 and cast to the network's dtype once. Sides that
    cannot be folded are spliced; the returned :class:`FoldPlan` says which and why.
    """
    info = describe(checkpoint, len(in_affine[0]))
    in_affine, out_affine = _checked(info, in_affine, out_affine)
    plan = plan_fold(checkpoint, in_affine, out_affine)
    symbol, arg_params, aux_params = checkpoint
    nodes = _nodes(symbol)
    wide: dict[str, np.ndarray] = {}

    def layer(index: int) -> tuple[str, str | None]:
        names = [nodes[ref[0]]["name"] for ref in nodes[index]["inputs"][1:3]]
        for name in names:
            wide.setdefault(name, arg_params[name].asnumpy().astype(np.float64))
        return names[0], names[1] if len(names) > 1 else None  # no bias: the shift is 0

    # FullyConnected computes data @ W.T + b: fold on W.T, the canonical orientation.
    targets: list[tuple[int, Affine | None, Affine | None]] = []
    if plan.input == "folded":
        targets.append((_consumers(nodes, _index(nodes, info.input_name))[0], in_affine, None))
    if plan.output == "folded":
        targets.append((json.loads(symbol.tojson())["heads"][0][0], None, out_affine))
    for index, affine_in, affine_out in targets:  # one after the other, also on one layer
        w, b = layer(index)
        W, C = fold_dense(wide[w].T, None if b is None else wide[b][None, :], affine_in, affine_out)
        wide[w] = W.T
        if b is not None:
            assert C is not None  # a bias stays a bias
            wide[b] = C.reshape(-1)
    arg_params = {**arg_params, **{k: mx.nd.array(v, dtype=info.dtype) for k, v in wide.items()}}
    folded = Checkpoint(symbol, arg_params, dict(aux_params))
    if plan.input == "spliced":
        folded = _splice_input(folded, info, in_affine)
    else:
        folded = _rename_input(folded, info)
    if plan.output == "spliced":
        folded = _splice_output(folded, info, out_affine)
    return folded, plan


# ------------------------------------------------------------------------------ inference form

# MXNet's own kernels for these LeakyReLU kinds compute in float32 even on float64 data
# (measured on mxnet 1.9.1: leaky, prelu and gelu differ from the float64 formulas by
# 1e-8 to 1e-7), so a float64 model spells them out in ops that are exact in float64.
_FLOAT32_KERNELS = ("leaky", "prelu", "gelu")
_DTYPE_CODES = {"float32": "0", "float64": "1"}  # MXNet's __dtype__ attribute values


def for_inference(checkpoint: Checkpoint, n_inputs: int | None = None) -> Checkpoint:
    """The network as it computes at inference, in ops that every runtime runs exactly.

    - ``Dropout`` is the identity at inference and is removed (``mode='always'``, which
      drops at inference too, is refused).
    - An inference ``BatchNorm`` is folded into the ``FullyConnected`` layer before it
      (``W' = diag(s) W``, ``b' = s b + t``) or after it (``W' = W diag(s)``,
      ``b' = b + W t``), with ``s = gamma / sqrt(var + eps)`` and ``t = beta - mean s``,
      in float64 and cast once; where neither exists it becomes a
      ``broadcast_mul``/``broadcast_add`` pair holding ``s`` and ``t``. (ONNX stores
      BatchNormalization's epsilon as a float32 attribute, which costs a float64
      network about 4e-10 of range.)
    - In float64, ``LeakyReLU`` of kind leaky, prelu and gelu is spelled out as
      ``relu(x) - a relu(-x)`` and ``0.5 x (1 + erf(x / sqrt 2))``: MXNet's own kernels
      for them compute in float32 even on float64 data.

    Slopes keep MXNet's values (its ``slope`` parameter is a float32), so the function
    is the trained one. ``n_inputs`` is needed when the first op is not a
    ``FullyConnected`` layer (see :func:`describe`). Returns a new checkpoint; a network
    without these layers comes back unchanged.
    """
    kinds = {n["op"] for n in _nodes(checkpoint.symbol)}
    if not kinds & {"Dropout", "BatchNorm", "LeakyReLU"}:
        return checkpoint
    return _InferenceRewrite(checkpoint, describe(checkpoint, n_inputs)).run()


class _InferenceRewrite:
    """One pass over the symbol's JSON that emits a new node list (:func:`for_inference`)."""

    def __init__(self, checkpoint: Checkpoint, info: NetInfo) -> None:
        symbol, self.arg_params, self.aux_params = checkpoint
        self.info = info
        self.doc = json.loads(symbol.tojson())
        self.old: list[dict[str, Any]] = self.doc["nodes"]
        self.shapes = _internal_shapes(checkpoint, info)
        self.values: dict[str, np.ndarray] = {}  # changed or new parameters, float64
        self.new: list[dict[str, Any]] = []
        self.remap: dict[tuple[int, int], tuple[int, int]] = {}
        self.readers: dict[int, list[int]] = {}  # node -> nodes reading it (-1: the output)
        self.outputs_read: dict[int, int] = {}  # node -> how many of its outputs are read
        for i, node in enumerate(self.old):
            for ref in node["inputs"]:
                self.readers.setdefault(ref[0], []).append(i)
                self.outputs_read[ref[0]] = max(self.outputs_read.get(ref[0], 1), ref[1] + 1)
        for ref in self.doc["heads"]:
            self.readers.setdefault(ref[0], []).append(-1)
            self.outputs_read[ref[0]] = max(self.outputs_read.get(ref[0], 1), ref[1] + 1)
        self.fold_before: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # FC -> (s, t)

    # -------------------------------------------------------------- emitting

    def emit(self, node: dict[str, Any]) -> tuple[int, int]:
        self.new.append(node)
        return (len(self.new) - 1, 0)

    def ref(self, old_ref: list[int]) -> list[int]:
        """The new reference for an old ``[node, output(, version)]``."""
        key = (old_ref[0], old_ref[1])
        if key not in self.remap:  # a variable, emitted where it is first read
            self.remap[key] = self.emit(dict(self.old[old_ref[0]]))
        index, output = self.remap[key]
        return [index, output, old_ref[2] if len(old_ref) > 2 else 0]

    def op(self, op: str, name: str, inputs: list[list[int]], **attrs: str) -> list[int]:
        node: dict[str, Any] = {"op": op, "name": name, "inputs": inputs}
        if attrs:
            node["attrs"] = attrs
        return [*self.emit(node), 0]

    def param(self, name: str, value: np.ndarray) -> list[int]:
        if any(n["name"] == name for n in self.old) or name in self.values:
            raise GraphError(f"the network already has a node named {name!r}")
        self.values[name] = value
        attrs = {"__dtype__": _DTYPE_CODES[self.info.dtype], "__shape__": str(value.shape)}
        return [*self.emit({"op": "null", "name": name, "attrs": attrs, "inputs": []}), 0]

    def value(self, ref: list[int]) -> np.ndarray:
        """A parameter's current value (changed ones included), in float64."""
        name = self.old[ref[0]]["name"]
        if name in self.values:
            return self.values[name]
        source = self.arg_params.get(name, self.aux_params.get(name))
        if source is None or self.old[ref[0]]["op"] != "null":
            raise GraphError(f"{name} is not a parameter of the network")
        return np.asarray(source.asnumpy(), dtype=np.float64)

    def set_value(self, ref: list[int], value: np.ndarray) -> None:
        self.values[self.old[ref[0]]["name"]] = value

    # -------------------------------------------------------------- the pass

    def run(self) -> Checkpoint:
        handlers = {
            "Dropout": self._dropout,
            "BatchNorm": self._batchnorm,
            "LeakyReLU": self._leaky_relu,
            "FullyConnected": self._fully_connected,
        }
        for i, node in enumerate(self.old):
            if node["op"] != "null":
                handlers.get(node["op"], self._copy)(i, node)
        heads = [self.ref(ref) for ref in self.doc["heads"]]
        used = {n["name"] for n in self.new if n["op"] == "null"}
        dtype = self.info.dtype

        def keep(params: dict[str, Any]) -> dict[str, Any]:
            return {
                k: mx.nd.array(self.values[k], dtype=dtype) if k in self.values else v
                for k, v in params.items()
                if k in used
            }

        arg_params, aux_params = keep(self.arg_params), keep(self.aux_params)
        for k, v in self.values.items():
            if k not in arg_params and k not in aux_params and k in used:
                arg_params[k] = mx.nd.array(v, dtype=dtype)
        doc = {
            "nodes": self.new,
            "arg_nodes": [i for i, n in enumerate(self.new) if n["op"] == "null"],
            "heads": heads,
            "attrs": self.doc.get("attrs", {}),
        }
        return Checkpoint(mx.sym.load_json(json.dumps(doc)), arg_params, aux_params)

    def _copy(self, i: int, node: dict[str, Any]) -> None:
        index, _ = self.emit({**node, "inputs": [self.ref(r) for r in node["inputs"]]})
        for k in range(self.outputs_read.get(i, 1)):
            self.remap[(i, k)] = (index, k)

    def _dropout(self, i: int, node: dict[str, Any]) -> None:
        if node.get("attrs", {}).get("mode", "training") == "always":
            raise GraphError(
                f"{node['name']}: Dropout with mode='always' drops values at inference too; "
                "the network is not a deterministic function"
            )
        index, output, _ = self.ref(node["inputs"][0])
        self.remap[(i, 0)] = (index, output)

    def _fully_connected(self, i: int, node: dict[str, Any]) -> None:
        """Copy the layer, folding in the affine of a BatchNorm that feeds it."""
        if i in self.fold_before:
            scale, shift = self.fold_before.pop(i)
            weight = self.value(node["inputs"][1])
            self.set_value(node["inputs"][1], weight * scale[None, :])
            if not _has_no_bias(node):
                self.set_value(node["inputs"][2], self.value(node["inputs"][2]) + weight @ shift)
        self._copy(i, node)

    # -------------------------------------------------------------- BatchNorm

    def _batchnorm(self, i: int, node: dict[str, Any]) -> None:
        attrs, name, data = node.get("attrs", {}), node["name"], node["inputs"][0]
        shape = self.shapes.get(data[0])
        axis = int(attrs.get("axis", "1"))
        if shape is None or len(shape) != 2 or axis not in (1, -1):
            raise GraphError(
                f"{name}: BatchNorm over axis {axis} of a tensor of shape {shape}; normexport "
                "exports BatchNorm over the features of (batch, features) data"
            )
        if self.outputs_read.get(i, 1) > 1:
            raise GraphError(f"{name}: the network reads its mean and variance outputs")
        gamma, beta, mean, var = (self.value(r) for r in node["inputs"][1:5])
        if attrs.get("fix_gamma", "True") in ("True", "true", "1"):  # MXNet's default
            gamma = np.ones_like(gamma)
        scale = gamma / np.sqrt(var + float(attrs.get("eps", "0.001")))
        shift = beta - mean * scale
        if self._fold_into_previous(i, data, scale, shift):
            return
        if self._fold_into_next(i, data, scale, shift):
            return
        x = self.ref(data)
        s = self.param(f"{name}_scale", scale.reshape(1, -1))
        t = self.param(f"{name}_shift", shift.reshape(1, -1))
        scaled = self.op("broadcast_mul", f"{name}_mul", [x, s])
        index, output, _ = self.op("broadcast_add", f"{name}_add", [scaled, t])
        self.remap[(i, 0)] = (index, output)

    def _fold_into_previous(
        self, i: int, data: list[int], scale: np.ndarray, shift: np.ndarray
    ) -> bool:
        """Dense → BatchNorm: ``s (x W^T + b) + t`` is one Dense layer."""
        layer = data[0]
        node = self.old[layer]
        if (
            node["op"] != "FullyConnected"
            or data[1] != 0
            or self.readers.get(layer) != [i]
            or _foldable(self.old, layer, self.arg_params, not shift.any())
        ):
            return False
        self.set_value(node["inputs"][1], self.value(node["inputs"][1]) * scale[:, None])
        if not _has_no_bias(node):
            self.set_value(node["inputs"][2], self.value(node["inputs"][2]) * scale + shift)
        self.remap[(i, 0)] = self.remap[(layer, 0)]
        return True

    def _fold_into_next(
        self, i: int, data: list[int], scale: np.ndarray, shift: np.ndarray
    ) -> bool:
        """BatchNorm → Dense: ``(x s + t) W^T + b = x (W diag s)^T + (b + W t)``."""
        readers = self.readers.get(i, [])
        if len(readers) != 1 or readers[0] < 0:
            return False
        layer = readers[0]
        node = self.old[layer]
        if (
            node["op"] != "FullyConnected"
            or node["inputs"][0][0] != i
            or _foldable(self.old, layer, self.arg_params, not shift.any())
        ):
            return False
        self.fold_before[layer] = (scale, shift)
        index, output, _ = self.ref(data)
        self.remap[(i, 0)] = (index, output)
        return True

    # -------------------------------------------------------------- LeakyReLU

    def _leaky_relu(self, i: int, node: dict[str, Any]) -> None:
        attrs = node.get("attrs", {})
        kind = attrs.get("act_type", "leaky")
        if self.info.dtype != "float64" or kind not in _FLOAT32_KERNELS:
            self._copy(i, node)
            return
        name = node["name"]
        x = self.ref(node["inputs"][0])
        if kind == "gelu":  # 0.5 x (1 + erf(x / sqrt 2)), each op exact in float64
            scaled = self.op("_div_scalar", f"{name}_div", [x], scalar=repr(float(np.sqrt(2.0))))
            erf = self.op("erf", f"{name}_erf", [scaled])
            one_plus = self.op("_plus_scalar", f"{name}_plus", [erf], scalar="1.0")
            product = self.op("elemwise_mul", f"{name}_mul", [x, one_plus])
            out = self.op("_mul_scalar", f"{name}_half", [product], scalar="0.5")
        else:  # relu(x) - a relu(-x): x where x > 0 and a x elsewhere, exactly
            positive = self.op("Activation", f"{name}_pos", [x], act_type="relu")
            flipped = self.op("negative", f"{name}_flip", [x])
            negative = self.op("Activation", f"{name}_negpart", [flipped], act_type="relu")
            if kind == "leaky":
                slope = float(np.float32(attrs.get("slope", "0.25")))  # MXNet's float32 slope
                sloped = self.op("_mul_scalar", f"{name}_slope", [negative], scalar=repr(slope))
            else:  # prelu: the learned slopes, one per feature or one for all
                row = self.param(f"{name}_slopes", self.value(node["inputs"][1]).reshape(1, -1))
                sloped = self.op("broadcast_mul", f"{name}_slope", [negative, row])
            out = self.op("elemwise_sub", f"{name}_sub", [positive, sloped])
        self.remap[(i, 0)] = (out[0], out[1])


def _internal_shapes(checkpoint: Checkpoint, info: NetInfo) -> dict[int, tuple[int, ...]]:
    """The output shape of each op node (by index), for a batch of one row."""
    symbol, arg_params, aux_params = checkpoint
    internals = symbol.get_internals()
    known = {k: v.shape for k, v in (*arg_params.items(), *aux_params.items())}
    try:
        _, shapes, _ = internals.infer_shape_partial(
            **{info.input_name: (1, info.n_inputs)}, **known
        )
    except mx.base.MXNetError as exc:
        raise GraphError(f"cannot infer the network's shapes: {first_line(exc)}") from exc
    by_name = dict(zip(internals.list_outputs(), shapes, strict=True))
    out: dict[int, tuple[int, ...]] = {}
    for i, node in enumerate(_nodes(symbol)):
        shape = by_name.get(f"{node['name']}_output", by_name.get(node["name"]))
        if shape is not None:
            out[i] = tuple(shape)
    return out
