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
