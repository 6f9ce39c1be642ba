"""Splice or fold a per-column affine into any ONNX regression model (pure functions).

The model is one that some framework exported: one 2-D floating-point input
``[batch, n_in]`` and one output with ``n_out`` values per row, trained on normalized
data. Two affines make it raw-in/raw-out:

- the input affine ``x_norm = x * scale + shift`` in front of the input, and
- the output affine ``y = y_norm * scale + shift`` after the output.

splice
    Each affine becomes one ``BatchNormalization`` node (mean 0, variance 1, epsilon 0),
    which computes exactly ``x * scale + shift``. Measured in onnxruntime with one thread
    it is the fastest exact form: about 5x faster than ``Mul`` + ``Add`` on a
    ``(4096, 3)`` float32 batch and no slower at batch 1 (see ``docs/bake.md``). A
    diagonal ``Gemm`` is as fast for three columns, but its cost and its matrix grow with
    the square of the width and it turns an infinite input into NaN. Tensors that are
    not known to be 2-D (a ``[batch]`` output) and opsets before 9 get ``Mul`` + ``Add``.
fold
    The input affine goes into the weights of the first dense layer and the output affine
    into the last one, in float64, cast once to the weights' dtype. A dense layer is a
    ``Gemm`` (any ``transA``/``transB``, ``alpha``, ``beta``, with or without ``C``) or a
    ``MatMul`` followed by an ``Add`` of a constant; between it and the graph's edge may
    sit no-op ``Cast``, ``Identity``, ``Flatten(axis=1)`` of 2-D data and
    ``Reshape(-1, n)``. Weights may be initializers (``raw_data``, typed fields or
    external data, read through a loader) or ``Constant`` nodes. A side that does not
    match is spliced instead, and :class:`FoldPlan` says which side and why.

Every function takes a ``ModelProto`` and returns a new one; the input is never mutated.
New nodes, tensors and initializers are named ``normexport_...``.

Examples
--------
>>> import numpy as np
>>> from onnx import TensorProto, helper, numpy_helper
>>> graph = helper.make_graph(
...     [helper.make_node("Gemm", ["x", "W", "b"], ["y"], name="dense")],
...     "net",
...     [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2])],
...     [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1])],
...     [numpy_helper.from_array(np.ones((2, 1), np.float32), "W"),
...      numpy_helper.from_array(np.zeros(1, np.float32), "b")],
... )
>>> model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
>>> affine_in = (np.array([0.5, 2.0]), np.array([0.0, -1.0]))
>>> affine_out = (np.array([10.0]), np.array([3.0]))
>>> [n.op_type for n in splice(model, affine_in, affine_out).graph.node]
['BatchNormalization', 'Gemm', 'BatchNormalization']
>>> folded, plan = fold(model, affine_in, affine_out)
>>> [n.op_type for n in folded.graph.node], plan.input, plan.output
(['Gemm'], 'folded', 'folded')
"""

from __future__ import annotations

import dataclasses
import functools
from collections import Counter
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import AttributeProto, TensorProto, helper, numpy_helper

from normexport.affine import (
    PREFIX,
    SPLICED,
    SPLIT_FLIP,
    Affine,
    FoldPlan,
    as_float64,
    check_affine,
    constant_name,
    fold_dense,
    fold_leaves,
    fold_scaler,
    fold_splits,
)
from normexport.errors import GraphError, NormexportError, first_line
from normexport.onnxkit import copy_model, opset_of

__all__ = ["SPLICED", "FoldPlan", "fold", "plan_fold", "splice"]
MIN_BN_OPSET = 9  # BatchNormalization-9 is the first without `spatial`/`is_test`
FLOAT_TYPES: dict[int, str] = {TensorProto.FLOAT: "float32", TensorProto.DOUBLE: "float64"}

TensorLoader = Callable[[TensorProto], np.ndarray]

# Ops that, right before the output, mean "the last dense layer is not last".
ACTIVATIONS = frozenset(
    {
        *("Relu", "LeakyRelu", "PRelu", "Elu", "Selu", "Celu", "Gelu", "Sigmoid", "HardSigmoid"),
        *("Tanh", "Softplus", "Softsign", "Softmax", "LogSoftmax", "HardSwish", "Mish", "Swish"),
        *("ThresholdedRelu", "Clip", "Exp", "Erf", "Abs"),
    }
)
_EDGE_OPS = ("Identity", "Cast", "Reshape", "Flatten")
_OUTPUT_EDGE_OPS = (*_EDGE_OPS, "Squeeze", "Unsqueeze")


# ------------------------------------------------------------------------------ interface


@dataclass(frozen=True)
class Interface:
    """The one real input and output of a model, as declared (initializers excluded)."""

    input: onnx.ValueInfoProto
    output: onnx.ValueInfoProto

    @property
    def input_name(self) -> str:
        return self.input.name

    @property
    def output_name(self) -> str:
        return self.output.name


def interface(model: onnx.ModelProto) -> Interface:
    """The single non-initializer input and the single output; GraphError otherwise."""
    graph = model.graph
    inits = {t.name for t in graph.initializer}
    inputs = [v for v in graph.input if v.name not in inits]
    if len(inputs) != 1 or len(graph.output) != 1:
        names = ", ".join(v.name for v in inputs) or "none"
        outs = ", ".join(v.name for v in graph.output) or "none"
        raise GraphError(
            f"expected exactly one input and one output, found {len(inputs)} input(s) "
            f"({names}) and {len(graph.output)} output(s) ({outs})"
        )
    return Interface(inputs[0], graph.output[0])


def tensor_dims(value: onnx.ValueInfoProto) -> list[int | str | None] | None:
    """Declared dims (int, symbol or None for unknown), or None if the rank is unknown."""
    tensor = value.type.tensor_type
    if not tensor.HasField("shape"):
        return None
    return [
        d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim
    ]


# ------------------------------------------------------------------------------ splice


def splice(model: onnx.ModelProto, in_affine: Affine, out_affine: Affine) -> onnx.ModelProto:
    """Put the input affine in front of the input and the output affine after the output."""
    return splice_output(splice_input(model, *in_affine), *out_affine)


def splice_input(model: onnx.ModelProto, scale: Any, shift: Any) -> onnx.ModelProto:
    """Normalize the raw input first: ``x_norm = x * scale + shift``, then the old graph.

    The graph input keeps its name and type; every former use of it reads the affine's
    output ``normexport_input_normalized``.
    """
    model = copy_model(model)
    io = interface(model)
    name = io.input_name
    names = _Names(model)
    normalized = names.fresh(PREFIX + "input_normalized")
    _rename_uses(model.graph, name, normalized)
    nodes, inits = affine_nodes(model, "in", name, normalized, (scale, shift), io.input, names)
    _add_initializers(model, inits)
    graph_nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend([*nodes, *graph_nodes])
    return model


def splice_output(model: onnx.ModelProto, scale: Any, shift: Any) -> onnx.ModelProto:
    """De-normalize the output last: ``y = y_norm * scale + shift``.

    The graph output keeps its name and type; the node that produced it now writes
    ``normexport_output_normalized`` (and every internal use of the old value reads that).
    """
    model = copy_model(model)
    io = interface(model)
    name = io.output_name
    producers = [n for n in model.graph.node if name in n.output]
    if not producers:
        raise GraphError(f"output {name!r} is not computed by any node of the graph")
    typed = typed_output(model, io.output)  # before the edit, while shapes still infer
    names = _Names(model)
    normalized = names.fresh(PREFIX + "output_normalized")
    producer = producers[0]
    producer.output[:] = [normalized if o == name else o for o in producer.output]
    _rename_uses(model.graph, name, normalized)
    for value in model.graph.value_info:
        if value.name == name:
            value.name = normalized
    nodes, inits = affine_nodes(model, "out", normalized, name, (scale, shift), typed, names)
    _add_initializers(model, inits)
    model.graph.node.extend(nodes)
    return model


def affine_nodes(
    model: onnx.ModelProto,
    side: str,
    source: str,
    target: str,
    affine: Affine,
    value: onnx.ValueInfoProto,
    names: _Names,
) -> tuple[list[onnx.NodeProto], list[TensorProto]]:
    """The spliced affine, built here and nowhere else: ``target = source * scale + shift``.

    ``side`` is ``"in"`` or ``"out"``; ``value`` (the tensor's declared type) sets the
    dtype and width. A 2-D tensor at opset 9 or later gets one inference
    ``BatchNormalization`` (mean 0, variance 1, epsilon 0); a tensor of other or
    unknown rank, or an older opset, gets a broadcasting ``Mul`` + ``Add``.
    """
    label = "input" if side == "in" else "output"
    elem = value.type.tensor_type.elem_type
    if elem not in FLOAT_TYPES:
        kind = TensorProto.DataType.Name(elem) if elem else "unknown"
        raise GraphError(f"{label} {value.name!r} has element type {kind}; need FLOAT or DOUBLE")
    dtype = FLOAT_TYPES[elem]
    dims = tensor_dims(value)
    width = dims[-1] if dims and isinstance(dims[-1], int) else None
    try:
        scale, shift = check_affine(label, affine, width, dtype=dtype)
    except NormexportError as exc:
        raise GraphError(f"{label} {value.name!r}: {exc}") from exc
    scale_t = numpy_helper.from_array(
        scale.astype(dtype), names.fresh(constant_name(side, "scale"))
    )
    shift_t = numpy_helper.from_array(
        shift.astype(dtype), names.fresh(constant_name(side, "shift"))
    )
    nodes, extra = _affine_ops(model, side, source, target, scale_t, shift_t, dims, names)
    return nodes, [scale_t, shift_t, *extra]


def _affine_ops(
    model: onnx.ModelProto,
    side: str,
    source: str,
    target: str,
    scale: TensorProto,
    shift: TensorProto,
    dims: list[int | str | None] | None,
    names: _Names,
) -> tuple[list[onnx.NodeProto], list[TensorProto]]:
    """The ops of the spliced affine on given ``scale``/``shift`` constants, and the
    constants those ops add (``BatchNormalization``'s mean 0 and variance 1)."""
    node_name = names.fresh(constant_name(side, "affine"))
    if dims is not None and len(dims) == 2 and opset_of(model) >= MIN_BN_OPSET:
        width = int(np.prod(scale.dims, dtype=np.int64))
        for tensor in (scale, shift):  # BatchNormalization takes (n,) vectors
            del tensor.dims[:]
            tensor.dims.append(width)
        dtype = helper.tensor_dtype_to_np_dtype(scale.data_type)
        extra = [
            numpy_helper.from_array(
                np.zeros(width, dtype), names.fresh(constant_name(side, "mean"))
            ),
            numpy_helper.from_array(np.ones(width, dtype), names.fresh(constant_name(side, "var"))),
        ]
        node = helper.make_node(
            "BatchNormalization",
            [source, scale.name, shift.name, *(t.name for t in extra)],
            [target],
            name=node_name,
            epsilon=0.0,
        )
        return [node], extra
    # Unknown rank, a [batch] output or an old opset: plain broadcasting multiply-add.
    scaled = names.fresh(constant_name(side, "scaled"))
    nodes = [
        helper.make_node("Mul", [source, scale.name], [scaled], name=node_name),
        helper.make_node("Add", [scaled, shift.name], [target], name=names.fresh(node_name)),
    ]
    return nodes, []


def rebuild_affine(model: onnx.ModelProto, side: str) -> onnx.ModelProto:
    """Replace a ``Mul``/``Add`` pair on ``normexport_<side>_scale``/``_shift`` constants
    (how MXNet's exporter writes a splice) with :func:`affine_nodes`; else a copy."""
    model = copy_model(model)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    scale, shift = constant_name(side, "scale"), constant_name(side, "shift")
    mul = next((n for n in graph.node if n.op_type == "Mul" and scale in n.input), None)
    if mul is None or scale not in inits or shift not in inits:
        return model
    add = next((n for n in graph.node if n.op_type == "Add" and mul.output[0] in n.input), None)
    if add is None or shift not in add.input:
        return model
    source, target = next(i for i in mul.input if i != scale), add.output[0]
    edge = source if side == "in" else target
    value = _typed_values(model).get(edge)
    if value is None:  # inside the graph (after an input transform): infer its shape
        value = _typed_values(_infer(model)).get(edge)
    if value is None:
        return model
    at = next(k for k, n in enumerate(graph.node) if n is mul)
    body = [n for n in graph.node if n is not mul and n is not add]
    del graph.node[:]
    graph.node.extend(body)  # the old pair's node names are free again for the new ones
    # The constants keep their tensors: export fills in their values only when writing.
    nodes, extra = _affine_ops(
        model, side, source, target, inits[scale], inits[shift], tensor_dims(value), _Names(model)
    )
    graph.initializer.extend(extra)
    body[at:at] = nodes
    del graph.node[:]
    graph.node.extend(body)
    return model


def _typed_values(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    graph = model.graph
    return {v.name: v for v in (*graph.input, *graph.output, *graph.value_info)}


def typed_output(model: onnx.ModelProto, output: onnx.ValueInfoProto) -> onnx.ValueInfoProto:
    """The output's declared type, completed by shape inference where dims are missing."""
    dims = tensor_dims(output)
    if dims and isinstance(dims[-1], int):
        return output
    inferred = _infer(model)
    for value in inferred.graph.output:
        if value.name == output.name and tensor_dims(value) is not None:
            return value
    return output


# ------------------------------------------------------------------------------ output repairs


def declare_output(model: onnx.ModelProto, n_out: int) -> onnx.ModelProto:
    """Declare the output ``[batch, n_out]`` (the batch dim copied from the input's)."""
    model = copy_model(model)
    io = interface(model)
    batch = io.input.type.tensor_type.shape.dim[0]
    shape = model.graph.output[0].type.tensor_type.shape
    del shape.dim[:]
    shape.dim.add().CopyFrom(batch)
    shape.dim.add().dim_value = n_out
    keep = [v for v in model.graph.value_info if v.name != io.output_name]
    del model.graph.value_info[:]
    model.graph.value_info.extend(keep)
    return model


def output_reshape(model: onnx.ModelProto) -> onnx.NodeProto | None:
    """The ``Reshape`` with a constant target that writes the output, directly or
    through ``Identity``/``Cast``; None if there is none."""
    index = _Index(model)
    name = interface(model).output_name
    while (node := index.producer.get(name)) is not None and node.domain in ("", "ai.onnx"):
        if node.op_type == "Reshape":
            return node if len(node.input) > 1 and index.is_constant(node.input[1]) else None
        if node.op_type not in ("Identity", "Cast"):
            return None
        name = node.input[0]
    return None


def interleaving_reshape(model: onnx.ModelProto) -> tuple[onnx.NodeProto, int] | None:
    """The output's ``Reshape(-1, 1)`` (or ``Reshape(-1)``) of data that shape inference
    says has ``k > 1`` columns, with ``k``: it turns each row's ``k`` outputs into ``k``
    rows, interleaving the targets. None if the output has no such Reshape."""
    node = output_reshape(model)
    if node is None:
        return None
    index = _Index(model)
    tensor = index.const(node.input[1])
    assert tensor is not None  # output_reshape checked it
    target = [int(v) for v in np.asarray(numpy_helper.to_array(tensor)).reshape(-1)]
    if target not in ([-1, 1], [-1]):
        return None
    inferred = _infer(model)
    for value in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output):
        if value.name == node.input[0]:
            dims = tensor_dims(value)
            if dims is not None and len(dims) == 2 and isinstance(dims[1], int) and dims[1] > 1:
                return node, dims[1]
    return None


def regroup_output(model: onnx.ModelProto, n_out: int) -> tuple[onnx.ModelProto, str]:
    """Make the output's ``Reshape(-1, 1)`` a ``Reshape(-1, n_out)``: one row of ``n_out``
    outputs per input row, where the file returned ``n_out`` rows of one. Returns the new
    model and the node's label; GraphError if the output has no constant Reshape."""
    model = copy_model(model)
    node = output_reshape(model)
    if node is None:
        raise GraphError("the output does not come from a Reshape with a constant shape")
    name = _Names(model).fresh(PREFIX + "output_shape")
    _add_initializers(model, [numpy_helper.from_array(np.array([-1, n_out], np.int64), name)])
    old, node.input[1] = node.input[1], name
    if old not in _Index(model).uses:  # the old shape constant is left over: drop it
        keep = [t for t in model.graph.initializer if t.name != old]
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)
        keep_nodes = [n for n in model.graph.node if old not in n.output]
        del model.graph.node[:]
        model.graph.node.extend(keep_nodes)
    return declare_output(model, n_out), _label(node)


# ------------------------------------------------------------------------------ fold

ML = "ai.onnx.ml"
_ML_INPUT_OPS = frozenset(
    {"LinearRegressor", "Scaler", "SVMRegressor", "TreeEnsembleRegressor", "TreeEnsemble"}
)
_ML_OUTPUT_OPS = _ML_INPUT_OPS - {"Scaler"}
# ai.onnx.ml ops whose output is FLOAT whatever their input (TreeEnsemble follows its input).
FLOAT_ML_OPS = frozenset(_ML_INPUT_OPS - {"TreeEnsemble"})
_SHAPE_ONLY = frozenset({"Shape", "Size"})  # read a tensor's shape, never its values
_TREE_MODES = {"BRANCH_LEQ": "LEQ", "BRANCH_LT": "LT", "BRANCH_GTE": "GTE", "BRANCH_GT": "GT"}
_TREE5_MODES = {0: "LEQ", 1: "LT", 2: "GTE", 3: "GT", 4: "EQ", 5: "NEQ", 6: "MEMBER"}
_TREE5_AGGREGATES = {0: "AVERAGE", 1: "SUM", 2: "MIN", 3: "MAX"}
BATCH_DIM = "batch"  # stands for the batch size in a shape computed by the graph


@dataclass
class _Layer:
    """A layer matched at one edge of the graph that can absorb that side's affine."""

    node: onnx.NodeProto
    kind: str  # "gemm", "matmul", or the ai.onnx.ml op type
    data_slot: int = 0  # which operand is the data: 0 (A) or 1 (B, Gemm with transB=1)
    weight: str | None = None
    bias: str | None = None  # Gemm's C, or the constant operand of the Add after a MatMul
    add: onnx.NodeProto | None = None
    elem: int = TensorProto.FLOAT  # element type of the data it reads (splits compare in it)
    out_elem: int = TensorProto.FLOAT  # element type it writes

    @property
    def label(self) -> str:
        return _label(self.node)


def plan_fold(
    model: onnx.ModelProto,
    in_affine: Affine,
    out_affine: Affine,
    *,
    load: TensorLoader = numpy_helper.to_array,
) -> FoldPlan:
    """Decide, without changing anything, which side folds into which layer, and why not."""
    return _plan(_Index(model, load), in_affine, out_affine)[0]


def fold(
    model: onnx.ModelProto,
    in_affine: Affine,
    out_affine: Affine,
    *,
    load: TensorLoader = numpy_helper.to_array,
    changes: list[str] | None = None,
) -> tuple[onnx.ModelProto, FoldPlan]:
    """Fold each affine into the first/last layer; splice the sides that cannot.

    Folding works in float64 and casts once to each constant's dtype, and adds no op.
    A folded ``Gemm`` ends with ``alpha = beta = 1`` (both are absorbed into its
    constants); a ``Gemm`` without ``C`` gets one (``normexport_..._bias``) when the
    shift needs it, and a ``MatMul`` without a bias ``Add`` becomes such a ``Gemm``.
    ``ai.onnx.ml`` layers absorb the affine into their attributes (coefficients, leaf
    weights, split thresholds). ``load`` reads a weight tensor (pass one that knows the
    model's directory for external data). Anything changed besides constants (an op
    type, an ``ai.onnx.ml`` opset) is described in ``changes`` when a list is given.
    """
    model = copy_model(model)
    io = interface(model)
    # The same factors are refused in both modes: one that does not fit the data's dtype
    # (1e300 in float32) would make the folded weights inf, as it makes a spliced scale.
    for label, affine, value in (("input", in_affine, io.input), ("output", out_affine, io.output)):
        elem = value.type.tensor_type.elem_type
        try:
            check_affine(label, affine, None, dtype=FLOAT_TYPES.get(elem))
        except NormexportError as exc:
            raise GraphError(f"{label} {value.name!r}: {exc}") from exc
    index = _Index(model, load)
    plan, first, last = _plan(index, in_affine, out_affine)
    # One entry per layer: the first and the last layer may be the same node.
    layers: dict[int, tuple[_Layer, Affine | None, Affine | None]] = {}
    if first is not None:
        layers[id(first.node)] = (first, as_float64(in_affine), None)
    if last is not None:
        prev = layers.get(id(last.node))
        if prev is not None:  # one layer, both sides: it reads what the input side found
            last = dataclasses.replace(last, elem=prev[0].elem)
        layers[id(last.node)] = (last, prev[1] if prev else None, as_float64(out_affine))
    names = _Names(model)
    notes = [] if changes is None else changes
    for layer, affine_in, affine_out in layers.values():
        if layer.kind in ("gemm", "matmul"):
            _fold_layer(model, index, names, layer, affine_in, affine_out, notes)
        else:
            _fold_ml(model, layer, affine_in, affine_out, notes)
    if plan.input == "spliced":
        model = splice_input(model, *in_affine)
    if plan.output == "spliced":
        model = splice_output(model, *out_affine)
    return model, plan


def _plan(
    index: _Index, in_affine: Affine, out_affine: Affine
) -> tuple[FoldPlan, _Layer | None, _Layer | None]:
    io = interface(index.model)
    first = _match_input(index, io, as_float64(in_affine))
    last = _match_output(index, io, as_float64(out_affine))
    plan = FoldPlan.of(first, last, lambda layer: layer.label)
    return (
        plan,
        first if isinstance(first, _Layer) else None,
        last if isinstance(last, _Layer) else None,
    )


# ---------------------------------------------------------------- matching the input side


def _match_input(index: _Index, io: Interface, affine: Affine) -> _Layer | str:
    """The first layer the input reaches through no-op ops, or why there is none."""
    n_in = affine[0].size
    name = io.input_name
    dtype = io.input.type.tensor_type.elem_type
    what = f"the input {name!r}"
    while True:
        sole = index.sole_consumer(name)
        if isinstance(sole, str):
            return f"{what} {sole}"
        node = sole
        op = node.op_type
        if node.domain == ML and op in _ML_INPUT_OPS:
            return _match_ml_input(index, node, name, n_in, dtype)
        if node.domain not in ("", "ai.onnx"):
            return f"{what} goes to {_label(node)} (domain {node.domain}), not a dense layer"
        if op in _EDGE_OPS:
            problem = _edge_problem(index, node, n_in, chain={io.input_name})
            if op == "Cast" and not problem and _attr(node, "to", 0) != dtype:
                problem = _cast_problem(node, dtype)
            if problem:
                return problem
            name, what = node.output[0], f"the output of {_label(node)}"
            continue
        if op == "Gemm":
            return _match_gemm_input(index, node, name, n_in)
        if op == "MatMul":
            return _match_matmul_input(index, node, name, n_in)
        return f"{what} goes to {_label(node)}, not a dense layer (Gemm, or MatMul + Add)"


def _match_gemm_input(index: _Index, node: onnx.NodeProto, data: str, n_in: int) -> _Layer | str:
    label = _label(node)
    slots = [i for i, n in enumerate(node.input) if n == data]
    if slots != [0] and slots != [1]:
        return f"{label} takes the input as operand C or twice; only A or B can be folded"
    slot = slots[0]
    if slot == 0 and _attr(node, "transA", 0):
        return f"{label} has transA=1 on the input, so it contracts over the batch axis"
    if slot == 1 and not _attr(node, "transB", 0):
        return f"{label} has the input as B without transB=1, so it contracts over the batch axis"
    weight = node.input[1 - slot]
    problem = index.constant_problem(weight, label, "weight", ndim=2)
    if problem:
        return problem
    shape = index.const_shape(weight)
    trans = _attr(node, "transB", 0) if slot == 0 else not _attr(node, "transA", 0)
    k = shape[1] if trans else shape[0]
    if k != n_in:
        return f"{label}: its weight contracts {k} features, the input has {n_in}"
    bias = _gemm_bias(node)
    problem = _bias_problem(index, bias, label, row=slot == 0)
    if problem:
        return problem
    return _Layer(node, "gemm", slot, weight, bias, out_elem=index.elem(weight))


def _match_matmul_input(index: _Index, node: onnx.NodeProto, data: str, n_in: int) -> _Layer | str:
    """``MatMul(data, W)``, with its bias ``Add`` if one follows; without one, a shift
    makes it a ``Gemm`` with a bias (the data is 2-D here)."""
    label = _label(node)
    if node.input[0] != data or node.input[1] == data:
        return f"{label} has the input as its second operand (contracted over the batch axis)"
    weight = node.input[1]
    problem = index.constant_problem(weight, label, "weight", ndim=2)
    if problem:
        return problem
    if index.const_shape(weight)[0] != n_in:
        return f"{label}: its weight has {index.const_shape(weight)[0]} rows, the input {n_in}"
    add, bias = _bias_add(index, node)
    if isinstance(add, str):
        return _Layer(node, "matmul", 0, weight, None, out_elem=index.elem(weight))
    return _Layer(node, "matmul", 0, weight, bias, add, out_elem=index.elem(weight))


def _bias_add(index: _Index, matmul: onnx.NodeProto) -> tuple[onnx.NodeProto | str, str | None]:
    """The ``Add`` of a constant that directly follows ``matmul``, or why there is none."""
    out = matmul.output[0]
    sole = index.sole_consumer(out)
    if isinstance(sole, str):
        return f"has no Add of a constant after it (its output {sole})", None
    if sole.op_type != "Add" or sole.domain not in ("", "ai.onnx"):
        return f"is followed by {_label(sole)}, not an Add of a constant", None
    others = [n for n in sole.input if n != out]
    if len(others) != 1:
        return f"is followed by {_label(sole)}, which adds it to itself", None
    bias = others[0]
    problem = index.constant_problem(bias, _label(sole), "bias")
    if problem:
        return problem, None
    if not _bias_fits(index.const_shape(bias), row=True):
        return f"is followed by {_label(sole)} with a bias of shape {index.const_shape(bias)}", None
    return sole, bias


def _match_ml_input(
    index: _Index, node: onnx.NodeProto, data: str, n_in: int, elem: int
) -> _Layer | str:
    """An ``ai.onnx.ml`` layer that reads the input: its attributes absorb the affine."""
    label = _label(node)
    op = node.op_type
    if list(node.input) != [data]:
        return f"{label} reads other tensors besides the input"
    layer = _Layer(node, op, elem=elem)
    if op == "LinearRegressor":
        targets = _attr(node, "targets", 1)
        coefficients = _attr(node, "coefficients", [])
        if len(coefficients) != targets * n_in:
            return f"{label} has {len(coefficients)} coefficients, not {targets} × {n_in}"
        return layer
    if op == "Scaler":
        for key in ("offset", "scale"):
            if len(_attr(node, key, [0.0])) not in (1, n_in):
                return f"{label} has {len(_attr(node, key, []))} {key}s for {n_in} columns"
        return layer
    if op == "SVMRegressor":
        kernel = _text(_attr(node, "kernel_type", "LINEAR"))
        supports = _attr(node, "n_supports", 0)
        if supports > 0 and kernel != "LINEAR":
            return (
                f"{label} has a non-linear kernel ({kernel}), which a per-column affine "
                "cannot enter"
            )
        vectors = _attr(node, "support_vectors" if supports else "coefficients", [])
        if len(vectors) != max(supports, 1) * n_in:
            return f"{label} has {len(vectors)} support vector values for {n_in} columns"
        return layer
    # TreeEnsembleRegressor / TreeEnsemble: the splits move to raw space.
    branches = _tree_branches(node)
    if branches is None:
        return f"{label} has no readable split thresholds"
    _, features, _, modes = branches
    bad = sorted({m for m in modes if m not in SPLIT_FLIP})
    if bad:
        return (
            f"{label} has {', '.join(bad)} splits, which a per-column affine cannot move "
            "exactly (only <=, <, >=, > splits can)"
        )
    if features.size and (features.min() < 0 or features.max() >= n_in):
        return f"{label} splits on feature {int(features.max())}, the input has {n_in} columns"
    return layer


# ---------------------------------------------------------------- matching the output side


def _match_output(index: _Index, io: Interface, affine: Affine) -> _Layer | str:
    """The last layer, reached backwards from the output through no-op ops."""
    n_out = affine[0].size
    name = io.output_name
    casts: list[onnx.NodeProto] = []
    while True:
        node = index.producer.get(name)
        if node is None:
            return f"the output {name!r} is not computed by a node"
        op = node.op_type
        label = _label(node)
        if node.domain == ML and op in _ML_OUTPUT_OPS:
            layer = _match_ml_output(index, node, affine)
        elif node.domain not in ("", "ai.onnx"):
            return f"the output comes from {label} (domain {node.domain}), not a dense layer"
        elif op in _OUTPUT_EDGE_OPS:
            source = node.input[0]
            sole = index.sole_consumer(source)
            if isinstance(sole, str):
                return f"the input of {label} {sole}"
            problem = _edge_problem(
                index, node, n_out, output_side=True, chain={io.input_name, source}
            )
            if problem:
                return problem
            if op == "Cast":
                casts.append(node)
            name = source
            continue
        elif op == "Gemm":
            layer = _match_gemm_output(index, node, n_out)
        elif op == "Add":
            layer = _match_add_output(index, node, n_out)
        elif op == "MatMul":
            layer = _match_matmul_output(index, node, n_out)
        elif op in ACTIVATIONS:
            return f"an activation ({label}) follows the last dense layer"
        else:
            return f"the output comes from {label}, not a dense layer (Gemm, or MatMul + Add)"
        if isinstance(layer, _Layer):
            for cast in casts:
                if _attr(cast, "to", 0) != layer.out_elem:
                    return _cast_problem(cast, layer.out_elem)
        return layer


def _match_gemm_output(index: _Index, node: onnx.NodeProto, n_out: int) -> _Layer | str:
    label = _label(node)
    if index.is_constant(node.input[0]) or not index.is_constant(node.input[1]):
        return f"{label} does not compute data · constant weight (its output is not per row)"
    if _attr(node, "transA", 0):
        return f"{label} has transA=1 on its data, so its output is not per row"
    weight = node.input[1]
    problem = index.constant_problem(weight, label, "weight", ndim=2)
    if problem:
        return problem
    shape = index.const_shape(weight)
    n = shape[0] if _attr(node, "transB", 0) else shape[1]
    if n != n_out:
        return f"{label} has {n} outputs, the model's output has {n_out} columns"
    bias = _gemm_bias(node)
    problem = _bias_problem(index, bias, label, row=True)
    if problem:
        return problem
    return _Layer(node, "gemm", 0, weight, bias, out_elem=index.elem(weight))


def _match_add_output(index: _Index, add: onnx.NodeProto, n_out: int) -> _Layer | str:
    label = _label(add)
    producers = [index.producer.get(n) for n in add.input]
    matmuls = [m for m in producers if m is not None and m.op_type == "MatMul"]
    if len(matmuls) != 1:
        return f"the output comes from {label}, which does not add a bias to a MatMul"
    matmul = matmuls[0]
    problem = _matmul_problem(index, matmul, n_out)
    if problem:
        return problem
    found, bias = _bias_add(index, matmul)
    if isinstance(found, str):
        return f"{_label(matmul)} {found}"
    weight = matmul.input[1]
    return _Layer(matmul, "matmul", 0, weight, bias, found, out_elem=index.elem(weight))


def _match_matmul_output(index: _Index, node: onnx.NodeProto, n_out: int) -> _Layer | str:
    """A ``MatMul`` without a bias: it becomes a ``Gemm`` if the shift needs a bias, which
    takes 2-D data."""
    problem = _matmul_problem(index, node, n_out)
    if problem:
        return problem
    rank = index.rank(node.input[0])
    if rank != 2:
        shown = "of unknown rank" if rank is None else f"{rank}-D"
        return (
            f"{_label(node)} has no Add of a constant after it and its data is {shown}, "
            "so it cannot become a Gemm with a bias"
        )
    weight = node.input[1]
    return _Layer(node, "matmul", 0, weight, None, out_elem=index.elem(weight))


def _matmul_problem(index: _Index, node: onnx.NodeProto, n_out: int) -> str:
    label = _label(node)
    if index.is_constant(node.input[0]):
        return f"{label} multiplies a constant by the data; its output is not per row"
    problem = index.constant_problem(node.input[1], label, "weight", ndim=2)
    if problem:
        return problem
    if index.const_shape(node.input[1])[1] != n_out:
        return f"{label} has {index.const_shape(node.input[1])[1]} outputs, the model {n_out}"
    return ""


def _match_ml_output(index: _Index, node: onnx.NodeProto, affine: Affine) -> _Layer | str:
    """An ``ai.onnx.ml`` regressor that writes the output: its coefficients, intercepts,
    leaf weights or base values absorb the affine."""
    scale, shift = affine
    n_out = scale.size
    label = _label(node)
    op = node.op_type
    post = _text(_attr(node, "post_transform", "NONE"))
    if post not in ("NONE", "0"):
        return f"{label} applies post_transform {post}, which is not linear"
    layer = _Layer(node, op, out_elem=TensorProto.FLOAT)
    if op == "LinearRegressor":
        width = _attr(node, "targets", 1)
    elif op == "SVMRegressor":
        if _attr(node, "one_class", 0):
            return f"{label} is a one-class SVM (its output is ±1, not a regression)"
        width = 1
    else:
        width = _attr(node, "n_targets", 1)
        aggregate = _tree_aggregate(node)
        if aggregate in ("MIN", "MAX") and (scale > 0).any() and (scale < 0).any():
            return (
                f"{label} aggregates with {aggregate} over all targets, and the scales have "
                "both signs (a negative scale turns MIN into MAX)"
            )
        # onnxruntime returns 0, not the base value, for a target that a row reaches no
        # leaf weight of: a shift needs a target that some tree scores in every leaf.
        scored = _scored_targets(node)
        unscored = [j for j in range(min(n_out, width)) if shift[j] and j not in scored]
        if unscored:
            return (
                f"{label}: no tree has a weight for target {unscored[0]} in every leaf, and "
                "rows that reach none get 0 instead of the base value, so its shift has "
                "nowhere to go"
            )
        if op == "TreeEnsemble" and aggregate in ("SUM", "AVERAGE"):
            owned = _tree5_owned_trees(node)
            missing = [j for j in range(min(n_out, width)) if shift[j] and j not in owned]
            if missing:
                return (
                    f"{label} has no base values and no tree of its own for target "
                    f"{missing[0]}, so that target's shift has nowhere to go"
                )
    if width != n_out:
        return f"{label} has {width} targets, the model's output has {n_out} columns"
    return layer


# ---------------------------------------------------------------- edge ops


def _edge_problem(
    index: _Index,
    node: onnx.NodeProto,
    width: int,
    *,
    output_side: bool = False,
    chain: Collection[str] = (),
) -> str:
    """Why ``node`` is not a no-op on ``[batch, width]`` ('' if it is).

    Identity, a Cast (its type is checked by the caller), ``Flatten(axis=1)`` of 2-D data,
    ``Reshape(-1, n)``/``Reshape(0, n)`` and the computed ``view(batch, -1)``; on the output
    side of a single column, any ``Squeeze``/``Unsqueeze``/``Flatten`` and ``Reshape(-1)``
    too (a scalar affine commutes with every change of layout).
    """
    label = _label(node)
    op = node.op_type
    if op in ("Squeeze", "Unsqueeze"):
        if width != 1:
            return f"{label} changes the layout of {width} columns; only one passes through it"
        return ""
    if op == "Flatten":
        rank = index.rank(node.input[0]) if output_side else 2  # the input side is 2-D
        if (_attr(node, "axis", 1) != 1 or rank != 2) and not (output_side and width == 1):
            return f"{label} is not Flatten(axis=1) of 2-D data, so it is not a no-op"
    if op == "Reshape":
        shape_name = node.input[1] if len(node.input) > 1 else ""
        tensor = index.const(shape_name)
        target: list[int | str]
        if tensor is None:
            found = _batch_shape(index, shape_name)
            if found is None:
                return (
                    f"{label} has a computed shape; only Reshape(-1, n) and view(batch, -1) "
                    "can be folded through"
                )
            target, sources = found
            if not sources <= {node.input[0], *chain}:
                return f"{label} takes its batch size from another tensor"
        else:
            try:
                target = [int(v) for v in np.asarray(index.load(tensor)).reshape(-1)]
            except Exception as exc:  # a damaged shape tensor
                return f"{label}: cannot read its shape ({first_line(exc)})"
        allowed: list[list[int | str]] = [[-1, width], [BATCH_DIM, -1], [BATCH_DIM, width]]
        if not _attr(node, "allowzero", 0):
            allowed.append([0, width])
        if output_side and width == 1:
            allowed += [[-1], [BATCH_DIM]]
        if target not in allowed:
            shown = "[" + ", ".join(str(t) for t in target) + "]"
            return f"{label} reshapes to {shown}; only Reshape(-1, {width}) can be folded through"
    return ""


def _batch_shape(index: _Index, name: str) -> tuple[list[int | str], set[str]] | None:
    """A shape the graph computes as ``Concat(batch of v, constants...)`` (TorchScript's
    ``x.view(x.size(0), -1)``): the target with :data:`BATCH_DIM` for the batch entry, and
    the tensors ``v`` whose batch it takes; None for any other computation."""
    node = index.producer.get(name)
    if node is None or node.op_type != "Concat" or _attr(node, "axis", 0) != 0:
        return None
    target: list[int | str] = []
    sources: set[str] = set()
    for part in node.input:
        const = index.const(part)
        if const is not None:
            try:
                target += [int(v) for v in np.asarray(index.load(const)).reshape(-1)]
            except Exception:  # a damaged constant: not a shape we understand
                return None
            continue
        source = _batch_of(index, part)
        if source is None:
            return None
        target.append(BATCH_DIM)
        sources.add(source)
    return target, sources


def _batch_of(index: _Index, name: str) -> str | None:
    """``v`` if ``name`` is the 1-element tensor ``[v.shape[0]]``, else None.

    Recognized: ``Unsqueeze(Gather(Shape(v), 0), [0])``, ``Gather(Shape(v), [0])``,
    ``Slice(Shape(v), [0], [1])`` and ``Shape(v, start=0, end=1)``.
    """
    node = index.producer.get(name)
    if node is None:
        return None
    scalar = False
    if node.op_type == "Unsqueeze":
        if _ints(index, node, "axes", 1) != [0]:
            return None
        node, scalar = index.producer.get(node.input[0]), True
        if node is None:
            return None
    if node.op_type == "Gather":
        indices = index.const(node.input[1]) if len(node.input) > 1 else None
        if indices is None or _attr(node, "axis", 0) != 0:
            return None
        values = np.asarray(index.load(indices))
        if values.reshape(-1).tolist() != [0] or (values.ndim == 0) != scalar:
            return None
        shape = index.producer.get(node.input[0])
        if shape is None or shape.op_type != "Shape" or _attr(shape, "start", 0) != 0:
            return None
        return shape.input[0]
    if scalar:
        return None
    if node.op_type == "Slice":
        starts, ends = _ints(index, node, "starts", 1), _ints(index, node, "ends", 2)
        axes = _ints(index, node, "axes", 3)
        steps = _ints(index, node, "steps", 4)
        if starts != [0] or ends != [1] or axes not in (None, [0]) or steps not in (None, [1]):
            return None
        shape = index.producer.get(node.input[0])
        if shape is None or shape.op_type != "Shape" or _attr(shape, "start", 0) != 0:
            return None
        return shape.input[0]
    if node.op_type == "Shape" and _attr(node, "start", 0) == 0 and _attr(node, "end", None) == 1:
        return node.input[0]
    return None


def _ints(index: _Index, node: onnx.NodeProto, attr: str, slot: int) -> list[int] | None:
    """An int list given as attribute ``attr`` (old opsets) or as constant input ``slot``."""
    value = _attr(node, attr, None)
    if value is not None:
        return [int(v) for v in value]
    if len(node.input) > slot and node.input[slot]:
        const = index.const(node.input[slot])
        if const is not None:
            return [int(v) for v in np.asarray(index.load(const)).reshape(-1)]
    return None


def _cast_problem(node: onnx.NodeProto, dtype: int) -> str:
    to = TensorProto.DataType.Name(_attr(node, "to", 0))
    return (
        f"{_label(node)} casts {TensorProto.DataType.Name(dtype)} to {to}; only a no-op "
        "Cast can be folded through"
    )


def _gemm_bias(node: onnx.NodeProto) -> str | None:
    return node.input[2] if len(node.input) > 2 and node.input[2] else None


def _bias_problem(index: _Index, bias: str | None, label: str, *, row: bool) -> str:
    """Why a Gemm's optional C cannot absorb a shift ('' if it can, or there is none)."""
    if bias is None:
        return ""
    problem = index.constant_problem(bias, label, "bias C")
    if problem:
        return problem
    if not _bias_fits(index.const_shape(bias), row=row):
        return f"{label}: C has shape {index.const_shape(bias)}, which depends on the batch"
    return ""


def _bias_fits(shape: tuple[int, ...], *, row: bool) -> bool:
    """Whether a bias of ``shape`` broadcasts per column (row) or per output feature
    (column, Gemm with the data as B) without depending on the batch."""
    if len(shape) > 2:
        return False
    padded = (1,) * (2 - len(shape)) + tuple(shape)
    return padded[0] == 1 if row else padded[1] == 1


# ---------------------------------------------------------------- applying a fold


def _fold_layer(
    model: onnx.ModelProto,
    index: _Index,
    names: _Names,
    layer: _Layer,
    affine_in: Affine | None,
    affine_out: Affine | None,
    notes: list[str],
) -> None:
    """Fold the affines into a dense ``layer`` in place (``model`` is fold()'s own copy)."""
    node = layer.node
    assert layer.weight is not None  # matched as a dense layer
    w_tensor = index.const(layer.weight)
    assert w_tensor is not None  # matched as a constant
    W = np.asarray(index.load(w_tensor), dtype=np.float64)
    b_tensor = index.const(layer.bias) if layer.bias else None
    C = None if b_tensor is None else np.asarray(index.load(b_tensor), dtype=np.float64)
    bias_shape = None if b_tensor is None else tuple(b_tensor.dims)
    if layer.kind == "gemm":
        alpha, beta = _attr(node, "alpha", 1.0), _attr(node, "beta", 1.0)
        trans_a, trans_b = _attr(node, "transA", 0), _attr(node, "transB", 0)
        C2 = None if C is None else beta * _as_2d(C)
        if layer.data_slot == 0:  # Y = alpha·D·B' + beta·C
            Wc = alpha * (W.T if trans_b else W)
            Cc = C2
        else:  # Y = alpha·A'·Dᵀ + beta·C, i.e. Yᵀ = D·(alpha·A'ᵀ) + beta·Cᵀ
            Wc = alpha * (W if trans_a else W.T)
            Cc = None if C2 is None else C2.T
    else:
        Wc, Cc = W, None if C is None else _as_2d(C)
    Wc, Cc = fold_dense(Wc, Cc, affine_in, affine_out)
    # Back to the layer's own layout and dtypes.
    if layer.kind == "gemm":
        if layer.data_slot == 0:
            stored_w = Wc.T if _attr(node, "transB", 0) else Wc
            stored_c = Cc
        else:
            stored_w = Wc if _attr(node, "transA", 0) else Wc.T
            stored_c = None if Cc is None else Cc.T
        _drop_attr(node, "alpha")
        _drop_attr(node, "beta")
    else:
        stored_w, stored_c = Wc, Cc
    dtype = helper.tensor_dtype_to_np_dtype(w_tensor.data_type)
    index.replace_const(model, layer.weight, _cast(stored_w, dtype, node, "weights"))
    if stored_c is None:
        return
    stored_c = _restore_shape(stored_c, bias_shape)
    if layer.bias is not None and b_tensor is not None:
        bias_dtype = helper.tensor_dtype_to_np_dtype(b_tensor.data_type)
        index.replace_const(model, layer.bias, _cast(stored_c, bias_dtype, node, "bias"))
        return
    # A Gemm without C, or a MatMul without a bias Add: a Gemm with a new C.
    if layer.kind == "matmul":
        notes.append(f"{_label(node)} is now a Gemm, whose bias C carries the folded shift")
        node.op_type = "Gemm"
    name = names.fresh(f"{PREFIX}{node.name or 'gemm'}_bias")
    _add_initializers(model, [numpy_helper.from_array(_cast(stored_c, dtype, node, "bias"), name)])
    while len(node.input) < 2:
        node.input.append("")
    if len(node.input) == 2:
        node.input.append(name)
    else:
        node.input[2] = name


def _as_2d(array: np.ndarray) -> np.ndarray:
    return array.reshape((1,) * (2 - array.ndim) + array.shape) if array.ndim < 2 else array


def _restore_shape(array: np.ndarray, shape: tuple[int, ...] | None) -> np.ndarray:
    """Back to the original bias rank when the values fit it; 1-D for a new Gemm bias row."""
    if shape is None:
        return array.reshape(-1) if array.shape[0] == 1 else array
    padded = (1,) * (array.ndim - len(shape)) + tuple(shape)
    if padded == array.shape:
        return array.reshape(shape)
    if len(shape) < array.ndim and array.shape[0] == 1:
        return array.reshape(array.shape[1:])
    return array


# ---------------------------------------------------------------- ai.onnx.ml layers


def _fold_ml(
    model: onnx.ModelProto,
    layer: _Layer,
    affine_in: Affine | None,
    affine_out: Affine | None,
    notes: list[str],
) -> None:
    """Fold the affines into the attributes of an ``ai.onnx.ml`` layer, in float64, cast
    once to each attribute's type."""
    node = layer.node
    op = node.op_type
    if op == "LinearRegressor":
        targets = _attr(node, "targets", 1)
        coefficients = np.asarray(_attr(node, "coefficients", []), dtype=np.float64)
        W = coefficients.reshape(targets, -1).T  # y = x @ W + C
        C = np.asarray(_attr(node, "intercepts", [0.0] * targets), dtype=np.float64)
        W, folded_c = fold_dense(W, C.reshape(1, -1), affine_in, affine_out)
        _set_attr(node, "coefficients", W.T.reshape(-1))
        _set_attr(node, "intercepts", np.zeros(targets) if folded_c is None else folded_c)
    elif op == "Scaler":
        assert affine_in is not None  # a Scaler is matched on the input side only
        offset, scale = fold_scaler(
            _attr(node, "offset", [0.0]), _attr(node, "scale", [1.0]), affine_in
        )
        _set_attr(node, "offset", offset)
        _set_attr(node, "scale", scale)
    elif op == "SVMRegressor":
        _fold_svm(node, affine_in, affine_out, notes)
    else:
        if affine_in is not None:
            _fold_tree_splits(model, layer, affine_in, notes)
        if affine_out is not None:
            _fold_tree_leaves(node, affine_out)


def _fold_svm(
    node: onnx.NodeProto, affine_in: Affine | None, affine_out: Affine | None, notes: list[str]
) -> None:
    """``y = K(x) @ coef + rho``: the output side folds into ``coef`` and ``rho``.

    The input side enters only a linear kernel, ``K_i(x) = x · sv_i``, where the model is
    one dense layer ``y = x · w + rho`` with ``w = Σ coef_i sv_i``. It is written as such
    (``n_supports = 0``, the op's linear mode) before folding: folding into every support
    vector instead leaves a sum of many large terms that cancel, which float32 cannot
    carry.
    """
    supports = _attr(node, "n_supports", 0)
    coefficients = np.asarray(_attr(node, "coefficients", []), dtype=np.float64).reshape(-1, 1)
    if supports and affine_in is not None:
        vectors = np.asarray(_attr(node, "support_vectors", []), dtype=np.float64)
        coefficients = vectors.reshape(supports, -1).T @ coefficients
        notes.append(
            f"{_label(node)}: its linear kernel's {supports} support vectors are summed into "
            f"{coefficients.shape[0]} coefficients (n_supports 0, the op's linear mode)"
        )
        _drop_attr(node, "support_vectors")
        _set_attr(node, "n_supports", 0)
    rho = np.asarray(_attr(node, "rho", [0.0]), dtype=np.float64).reshape(1, 1)
    W, C = fold_dense(coefficients, rho, affine_in, affine_out)
    _set_attr(node, "coefficients", W.reshape(-1))
    _set_attr(node, "rho", np.zeros(1) if C is None else C.reshape(-1))


def _fold_tree_splits(
    model: onnx.ModelProto, layer: _Layer, affine: Affine, notes: list[str]
) -> None:
    """Thresholds to raw space (exact boundary floats), modes flipped where a scale is
    negative; missing-value tracking is untouched (NaN compares false either way)."""
    node = layer.node
    branches = _tree_branches(node)
    assert branches is not None  # checked when matched
    where, features, thresholds, modes = branches
    dtype = FLOAT_TYPES[layer.elem]
    scale, shift = affine
    raw, new_modes = fold_splits(thresholds, modes, scale[features], shift[features], dtype)
    if node.op_type == "TreeEnsemble":
        splits = _attr(node, "nodes_splits", None)
        values = numpy_helper.to_array(splits).astype(np.float64)
        values[where] = raw
        _set_attr(node, "nodes_splits", numpy_helper.from_array(values.astype(dtype)))
        codes = numpy_helper.to_array(_attr(node, "nodes_modes", None)).copy()
        reverse = {v: k for k, v in _TREE5_MODES.items()}
        codes[where] = [reverse[m] for m in new_modes]
        _set_attr(node, "nodes_modes", numpy_helper.from_array(codes.astype(np.uint8)))
        return
    as_tensor = _attr(node, "nodes_values_as_tensor", None)
    if as_tensor is not None:
        values = numpy_helper.to_array(as_tensor).astype(np.float64)
    else:
        values = np.asarray(_attr(node, "nodes_values", []), dtype=np.float64)
    values[where] = raw
    if as_tensor is None and dtype == "float32":  # float32 data: float32 boundaries
        _set_attr(node, "nodes_values", values)
    elif as_tensor is not None and (
        as_tensor.data_type == TensorProto.DOUBLE or dtype == "float32"
    ):
        kind = helper.tensor_dtype_to_np_dtype(as_tensor.data_type)
        _set_attr(node, "nodes_values_as_tensor", numpy_helper.from_array(values.astype(kind)))
    else:  # float64 data: its boundary floats need double thresholds (ai.onnx.ml 3)
        _drop_attr(node, "nodes_values")
        _set_attr(node, "nodes_values_as_tensor", numpy_helper.from_array(values))
        _require_ml_opset(model, 3, f"for the double thresholds of {_label(node)}", notes)
    modes_all = [_text(m) for m in _attr(node, "nodes_modes", [])]
    for k, mode in zip(where.tolist(), new_modes, strict=True):
        modes_all[k] = "BRANCH_" + mode
    _set_attr(node, "nodes_modes", modes_all)


def _cast(values: np.ndarray, dtype: Any, node: onnx.NodeProto, what: str) -> np.ndarray:
    """Folded float64 constants in the layer's dtype; one that overflows it (finite
    factors on large weights) is refused naming the layer, never stored as inf."""
    with np.errstate(over="ignore", invalid="ignore"):
        cast = values.astype(dtype)
    if np.issubdtype(cast.dtype, np.floating) and not np.isfinite(cast[np.isfinite(values)]).all():
        raise GraphError(
            f"{_label(node)}: its folded {what} overflow {np.dtype(dtype).name}; "
            "the factors are too large for this layer in that dtype"
        )
    return cast


def _fold_tree_leaves(node: onnx.NodeProto, affine: Affine) -> None:
    """Leaf weights times the scale of their target; the shift into the base values (or,
    for ``TreeEnsemble``, which has none, into leaves). A negative scale swaps MIN/MAX."""
    scale = affine[0]
    aggregate = _tree_aggregate(node)
    if node.op_type == "TreeEnsemble":
        weights_t = _attr(node, "leaf_weights", None)
        weights = numpy_helper.to_array(weights_t).astype(np.float64)
        targets = np.asarray(_attr(node, "leaf_targetids", []), dtype=np.int64)
        shifted = np.zeros(weights.shape)
        if aggregate in ("MIN", "MAX"):
            shifted[:] = 1.0  # every leaf takes the shift: min(w + t) = min(w) + t
        else:
            trees = len(_attr(node, "tree_roots", []))
            owned = _tree5_owned_trees(node)
            for leaves in owned.values():
                shifted[sorted(leaves)] = trees if aggregate == "AVERAGE" else 1.0
        new, _ = fold_leaves(weights, targets, affine, shift_leaves=shifted)
        dtype = helper.tensor_dtype_to_np_dtype(weights_t.data_type)
        _set_attr(node, "leaf_weights", numpy_helper.from_array(new.astype(dtype)))
        if aggregate in ("MIN", "MAX") and (scale < 0).all():
            _set_attr(node, "aggregate_function", 3 if aggregate == "MIN" else 2)
        return
    n_targets = _attr(node, "n_targets", 1)
    targets = np.asarray(_attr(node, "target_ids", []), dtype=np.int64)
    weights_t = _attr(node, "target_weights_as_tensor", None)
    weights = (
        numpy_helper.to_array(weights_t).astype(np.float64)
        if weights_t is not None
        else np.asarray(_attr(node, "target_weights", []), dtype=np.float64)
    )
    base_t = _attr(node, "base_values_as_tensor", None)
    base = (
        numpy_helper.to_array(base_t).astype(np.float64)
        if base_t is not None
        else np.asarray(_attr(node, "base_values", [0.0] * n_targets), dtype=np.float64)
    )
    new, new_base = fold_leaves(weights, targets, affine, base=base)
    if weights_t is not None:
        dtype = helper.tensor_dtype_to_np_dtype(weights_t.data_type)
        _set_attr(node, "target_weights_as_tensor", numpy_helper.from_array(new.astype(dtype)))
    else:
        _set_attr(node, "target_weights", new)
    assert new_base is not None
    if base_t is not None:
        dtype = helper.tensor_dtype_to_np_dtype(base_t.data_type)
        _set_attr(node, "base_values_as_tensor", numpy_helper.from_array(new_base.astype(dtype)))
    else:
        _set_attr(node, "base_values", new_base)
    if aggregate in ("MIN", "MAX") and (scale < 0).all():
        _set_attr(node, "aggregate_function", "MAX" if aggregate == "MIN" else "MIN")


def _tree_aggregate(node: onnx.NodeProto) -> str:
    if node.op_type == "TreeEnsemble":
        return _TREE5_AGGREGATES.get(_attr(node, "aggregate_function", 1), "?")
    return _text(_attr(node, "aggregate_function", "SUM"))


def _tree_branches(
    node: onnx.NodeProto,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]] | None:
    """The split nodes of a tree ensemble: positions, features, thresholds, modes
    (``LEQ``, ``LT``, ``GTE``, ``GT``, or the op's own name for any other)."""
    features = np.asarray(_attr(node, "nodes_featureids", []), dtype=np.int64)
    if node.op_type == "TreeEnsemble":
        splits, codes = _attr(node, "nodes_splits", None), _attr(node, "nodes_modes", None)
        if splits is None or codes is None:
            return None
        values = numpy_helper.to_array(splits).astype(np.float64)
        modes = [_TREE5_MODES.get(int(c), str(c)) for c in numpy_helper.to_array(codes)]
        where = np.arange(len(modes))
    else:
        as_tensor = _attr(node, "nodes_values_as_tensor", None)
        values = (
            numpy_helper.to_array(as_tensor).astype(np.float64)
            if as_tensor is not None
            else np.asarray(_attr(node, "nodes_values", []), dtype=np.float64)
        )
        names = [_text(m) for m in _attr(node, "nodes_modes", [])]
        where = np.array([k for k, m in enumerate(names) if m != "LEAF"], dtype=np.int64)
        modes = [_TREE_MODES.get(names[k], names[k]) for k in where.tolist()]
    if not (len(values) == len(features) >= len(modes)):
        return None
    return where, features[where], values[where], modes


def tree_splits(model: onnx.ModelProto) -> list[tuple[int, float]]:
    """``(feature, threshold)`` of every split of every tree ensemble in the graph (for
    verification rows placed at the decisions)."""
    found: list[tuple[int, float]] = []
    for node in model.graph.node:
        if node.domain == ML and node.op_type in ("TreeEnsembleRegressor", "TreeEnsemble"):
            branches = _tree_branches(node)
            if branches is not None:
                _, features, thresholds, _ = branches
                found += zip(features.tolist(), thresholds.tolist(), strict=True)
    return found


def _scored_targets(node: onnx.NodeProto) -> set[int]:
    """The targets that every row scores: some tree has a weight for them in every leaf."""
    if node.op_type == "TreeEnsemble":
        targets = list(_attr(node, "leaf_targetids", []))
        feeds = [
            [{targets[leaf]} if 0 <= leaf < len(targets) else set() for leaf in leaves]
            for leaves in _tree5_leaves(node)
        ]
    else:
        trees = list(_attr(node, "nodes_treeids", []))
        ids = list(_attr(node, "nodes_nodeids", []))
        modes = [_text(m) for m in _attr(node, "nodes_modes", [])]
        weights: dict[tuple[int, int], set[int]] = {}
        for tree, leaf, target in zip(
            _attr(node, "target_treeids", []),
            _attr(node, "target_nodeids", []),
            _attr(node, "target_ids", []),
            strict=False,
        ):
            weights.setdefault((tree, leaf), set()).add(target)
        per_tree: dict[int, list[set[int]]] = {}
        for tree, leaf, mode in zip(trees, ids, modes, strict=False):
            if mode == "LEAF":
                per_tree.setdefault(tree, []).append(weights.get((tree, leaf), set()))
        feeds = list(per_tree.values())
    scored: set[int] = set()
    for leaves in feeds:
        if leaves:
            scored |= set.intersection(*leaves)
    return scored


def _tree5_leaves(node: onnx.NodeProto) -> list[set[int]]:
    """For ``TreeEnsemble``: the leaves each tree reaches."""
    roots = list(_attr(node, "tree_roots", []))
    true_ids = list(_attr(node, "nodes_truenodeids", []))
    false_ids = list(_attr(node, "nodes_falsenodeids", []))
    true_leaf = list(_attr(node, "nodes_trueleafs", []))
    false_leaf = list(_attr(node, "nodes_falseleafs", []))
    per_tree: list[set[int]] = []
    for root in roots:
        leaves: set[int] = set()
        stack, seen = [root], set()
        while stack:
            k = stack.pop()
            if k in seen or not 0 <= k < len(true_ids):
                continue
            seen.add(k)
            for child, is_leaf in ((true_ids[k], true_leaf[k]), (false_ids[k], false_leaf[k])):
                if is_leaf:
                    leaves.add(child)
                else:
                    stack.append(child)
        per_tree.append(leaves)
    return per_tree


def _tree5_owned_trees(node: onnx.NodeProto) -> dict[int, set[int]]:
    """For ``TreeEnsemble``: per target, the leaves of one tree whose every leaf feeds that
    target and no other tree shares (adding the shift there adds it once per row)."""
    targets = list(_attr(node, "leaf_targetids", []))
    per_tree = _tree5_leaves(node)
    counts = Counter(leaf for leaves in per_tree for leaf in leaves)
    owned: dict[int, set[int]] = {}
    for leaves in per_tree:
        kinds = {targets[leaf] for leaf in leaves if 0 <= leaf < len(targets)}
        if len(kinds) == 1 and all(counts[leaf] == 1 for leaf in leaves):
            owned.setdefault(kinds.pop(), leaves)
    return owned


def _require_ml_opset(model: onnx.ModelProto, version: int, why: str, notes: list[str]) -> None:
    for entry in model.opset_import:
        if entry.domain == ML and entry.version < version:
            notes.append(f"ai.onnx.ml opset {entry.version} -> {version} {why}")
            entry.version = version


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _set_attr(node: onnx.NodeProto, name: str, value: Any) -> None:
    """Set attribute ``name`` (in place of the old one, if any). Arrays become float lists."""
    if isinstance(value, np.ndarray):
        value = [float(v) for v in value.reshape(-1)]
    new = helper.make_attribute(name, value)
    for attr in node.attribute:
        if attr.name == name:
            attr.CopyFrom(new)
            return
    node.attribute.append(new)


# ------------------------------------------------------------------------------ graph index


class _Index:
    """Who produces and uses each value, and which values are constants."""

    def __init__(self, model: onnx.ModelProto, load: TensorLoader = numpy_helper.to_array) -> None:
        graph = model.graph
        self.model = model
        self.load = load
        self.inits = {t.name: t for t in graph.initializer}
        self.const_nodes = {
            n.output[0]: n
            for n in graph.node
            if n.op_type == "Constant"
            and n.domain in ("", "ai.onnx")
            and len(n.attribute) == 1
            and n.attribute[0].name == "value"
        }
        self.producer = {o: n for n in graph.node for o in n.output if o}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for name in dict.fromkeys(node.input):
                if name:
                    self.consumers.setdefault(name, []).append(node)
        self.uses: Counter[str] = Counter()
        for node in graph.node:
            self.uses.update(n for n in node.input if n)
            for sub in _subgraphs(node):
                self.uses.update(_all_uses(sub))
        # Uses by Shape/Size read only the shape, which an affine leaves alone.
        self.shape_uses: Counter[str] = Counter(
            n.input[0]
            for n in graph.node
            if n.op_type in _SHAPE_ONLY and n.domain in ("", "ai.onnx") and n.input
        )
        self.outputs = {o.name for o in graph.output}
        self.uses.update(self.outputs)
        self.graph_inputs = {v.name for v in graph.input}
        self._ranks: dict[str, int] | None = None

    def sole_consumer(self, name: str) -> onnx.NodeProto | str:
        """The one node that uses ``name`` once, or a phrase saying why there is not one."""
        if name in self.outputs:
            return "is also a graph output"
        users = [
            u
            for u in self.consumers.get(name, [])
            if not (u.op_type in _SHAPE_ONLY and u.domain in ("", "ai.onnx"))
        ]
        uses = self.uses[name] - self.shape_uses[name]
        if not users:
            return "is not used by any node"
        if len(users) > 1 or uses > 1:
            names = ", ".join(_label(u) for u in users[:3])
            return f"feeds {uses} uses ({names}), not one"
        return users[0]

    def const(self, name: str | None) -> TensorProto | None:
        if not name:
            return None
        if name in self.inits:
            return self.inits[name]
        node = self.const_nodes.get(name)
        return node.attribute[0].t if node is not None else None

    def elem(self, name: str) -> int:
        """The element type of constant ``name`` (FLOAT if it is not a constant)."""
        tensor = self.const(name)
        return tensor.data_type if tensor is not None else TensorProto.FLOAT

    def is_constant(self, name: str) -> bool:
        return self.const(name) is not None

    def const_shape(self, name: str) -> tuple[int, ...]:
        tensor = self.const(name)
        return tuple(tensor.dims) if tensor is not None else ()

    def constant_problem(self, name: str, label: str, role: str, ndim: int | None = None) -> str:
        """Why the ``role`` operand ``name`` of ``label`` cannot absorb an affine ('' if ok)."""
        tensor = self.const(name)
        if tensor is None:
            return f"{label}: its {role} {name!r} is not a constant"
        if tensor.data_type not in FLOAT_TYPES:
            kind = TensorProto.DataType.Name(tensor.data_type)
            return f"{label}: its {role} {name!r} is {kind}, not FLOAT or DOUBLE"
        if self.uses[name] != 1:
            return f"{label}: its {role} {name!r} is shared with other nodes"
        if ndim is not None and len(tensor.dims) != ndim:
            return f"{label}: its {role} {name!r} is {len(tensor.dims)}-D, not {ndim}-D"
        return ""

    def rank(self, name: str) -> int | None:
        if self._ranks is None:
            inferred = _infer(self.model)
            self._ranks = {}
            for value in (
                *inferred.graph.input,
                *inferred.graph.value_info,
                *inferred.graph.output,
            ):
                dims = tensor_dims(value)
                if dims is not None:
                    self._ranks[value.name] = len(dims)
        return self._ranks.get(name)

    def replace_const(self, model: onnx.ModelProto, name: str, array: np.ndarray) -> None:
        """Give constant ``name`` new values (and dims), keeping its name and kind."""
        new = numpy_helper.from_array(np.ascontiguousarray(array), name)
        graph = model.graph
        for i, tensor in enumerate(graph.initializer):
            if tensor.name == name:
                graph.initializer[i].CopyFrom(new)
                self.inits[name] = graph.initializer[i]
                break
        else:
            node = self.const_nodes[name]
            new.name = node.attribute[0].t.name
            node.attribute[0].t.CopyFrom(new)
        # An initializer listed as a graph input (old exporters) declares its shape there.
        for value in (*graph.input, *graph.value_info):
            if value.name == name and value.type.tensor_type.HasField("shape"):
                shape = value.type.tensor_type.shape
                del shape.dim[:]
                for d in array.shape:
                    shape.dim.add().dim_value = d


class _Names:
    """Fresh names that collide with nothing in the model (nodes, values, subgraphs)."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.taken: set[str] = set()
        for graph in graphs(model.graph):
            self.taken.update(t.name for t in graph.initializer)
            self.taken.update(v.name for v in (*graph.input, *graph.output, *graph.value_info))
            for node in graph.node:
                self.taken.add(node.name)
                self.taken.update(node.input)
                self.taken.update(node.output)

    def fresh(self, base: str) -> str:
        name, k = base, 0
        while name in self.taken:
            k += 1
            name = f"{base}_{k}"
        self.taken.add(name)
        return name


def graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph`` and all its subgraphs (If/Loop/Scan bodies), depth first."""
    yield graph
    for node in graph.node:
        for sub in _subgraphs(node):
            yield from graphs(sub)


def _subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    for attr in node.attribute:
        if attr.type == AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == AttributeProto.GRAPHS:
            yield from attr.graphs


def _all_uses(graph: onnx.GraphProto) -> Iterator[str]:
    for sub in graphs(graph):
        for node in sub.node:
            yield from (n for n in node.input if n)
        yield from (o.name for o in sub.output)


def _rename_uses(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Every node input (and subgraph output) named ``old`` reads ``new`` instead."""
    for sub in graphs(graph):
        for node in sub.node:
            node.input[:] = [new if n == old else n for n in node.input]
        if sub is not graph:
            for value in sub.output:
                if value.name == old:
                    value.name = new


def _add_initializers(model: onnx.ModelProto, tensors: list[TensorProto]) -> None:
    model.graph.initializer.extend(tensors)
    if model.ir_version and model.ir_version < 4:  # IR < 4: every initializer is an input
        for tensor in tensors:
            model.graph.input.append(
                helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims)
            )


def _infer(model: onnx.ModelProto) -> onnx.ModelProto:
    try:
        return onnx.shape_inference.infer_shapes(model)
    except Exception:  # custom domains or odd graphs: shapes stay as declared
        return model


def _attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


def _drop_attr(node: onnx.NodeProto, name: str) -> None:
    """Drop attribute ``name`` (for Gemm's alpha/beta: back to the default, 1.0)."""
    keep = [a for a in node.attribute if a.name != name]
    del node.attribute[:]
    node.attribute.extend(keep)


def node_label(node: onnx.NodeProto) -> str:
    """How messages name a node: ``Gemm 'fc1'`` (or by its first output if it has no name)."""
    return _label(node)


def _label(node: onnx.NodeProto) -> str:
    if node.name:
        return f"{node.op_type} {node.name!r}"
    return f"{node.op_type} (output {node.output[0]!r})" if node.output else node.op_type


def value_names(model: onnx.ModelProto) -> set[str]:
    """Every node, value and initializer name in the model and its subgraphs."""
    return set(_Names(model).taken)


# ------------------------------------------------------------------------------ onnx.reference


def reference_ops() -> list[type]:
    """Operators to pass as ``ReferenceEvaluator(model, new_ops=reference_ops())``.

    ``onnx.reference``'s ``BatchNormalization`` for opsets 9 to 13 fills in the default
    ``momentum`` and then mixes the batch's own statistics into the result (training
    semantics). Every runtime that serves a model (onnxruntime among them) computes the
    inference form, ``(x - mean) / sqrt(var + epsilon) * scale + B``; this does too, for
    every opset, unless a node asks for ``training_mode=1``.
    """
    return [_reference_batch_normalization()]


@functools.cache
def _reference_batch_normalization() -> type:
    from onnx.reference.op_run import OpRun

    class BatchNormalization(OpRun):
        op_domain = ""

        def _run(
            self,
            x: np.ndarray,
            scale: np.ndarray,
            bias: np.ndarray,
            mean: np.ndarray,
            var: np.ndarray,
            epsilon: float = 1e-5,
            training_mode: int = 0,
            **_: Any,
        ) -> tuple[np.ndarray]:
            if training_mode:
                raise NotImplementedError("BatchNormalization with training_mode=1")
            shape = (1, -1) + (1,) * (x.ndim - 2)
            factor = scale / np.sqrt(var + x.dtype.type(epsilon))
            offset = bias - mean * factor
            y = x * factor.reshape(shape).astype(x.dtype) + offset.reshape(shape).astype(x.dtype)
            return (y.astype(x.dtype, copy=False),)

    return BatchNormalization
