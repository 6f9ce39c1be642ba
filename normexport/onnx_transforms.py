"""The per-column transforms in ONNX graphs: the one builder of their nodes (pure functions).

A side's transforms sit at the graph's edge, outside the affine: ``input -> transforms
-> affine -> network`` and ``network -> affine -> inverse transforms -> output``, so
they are the same whether the affine was spliced or folded. Columns that share an op
form a run (:func:`normexport.transforms.runs`); a run that spans every column is one
node, otherwise each run is cut out with ``Slice`` (axis 1), runs with an op go through
it, and ``Concat`` puts the columns back in order:

=====================================  ==========================================
node                                   computes
=====================================  ==========================================
``normexport_<side>_slice<k>``         columns of run ``k`` (``Slice``, axis 1)
``normexport_<side>_log<k>``           ``Log``
``normexport_<side>_log1p<k>``         ``Log(x + 1)`` (``Add`` named ``..._plus1``)
``normexport_<side>_asinh<k>``         ``Asinh``
``normexport_<side>_exp<k>``           ``Exp``
``normexport_<side>_expm1<k>``         ``Exp(x) - 1`` (``Exp`` named ``..._exp``)
``normexport_<side>_sinh<k>``          ``Sinh``
``normexport_<side>_concat``           the columns in order (``Concat``, axis 1)
=====================================  ==========================================

MXNet's exporter writes the same nodes under the same names (``slice_axis`` becomes
this ``Slice``; :mod:`normexport.mx.exporter` converts ``log1p``, ``expm1``, ``arcsinh``
and ``sinh`` with :func:`op_nodes`), so a baked and an exported model agree node for
node. onnxruntime has no float64 ``Asinh`` or ``Sinh``:
:func:`normexport.passes.expand_double_ops` rewrites them in double graphs.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from normexport.affine import PREFIX
from normexport.errors import GraphError
from normexport.onnx_affine import (
    FLOAT_TYPES,
    _add_initializers,
    _Names,
    _rename_uses,
    interface,
    typed_output,
)
from normexport.onnxkit import copy_model, opset_of
from normexport.transforms import Kinds, runs

# The ONNX op of each transform op; log1p and expm1 are two nodes (see op_nodes).
ONNX_OPS = {"log": "Log", "exp": "Exp", "asinh": "Asinh", "sinh": "Sinh"}
MIN_OPSET = 10  # Slice with inputs (starts, ends, axes); Asinh and Sinh are opset 9


def op_nodes(op: str, source: str, target: str, name: str, one: str) -> list[onnx.NodeProto]:
    """The nodes of one transform op, ``target = op(source)``; ``one`` names a scalar 1
    of the tensor's type (used by ``log1p`` and ``expm1``)."""
    if op == "log1p":
        plus1 = f"{name}_plus1"
        return [
            helper.make_node("Add", [source, one], [plus1], name=plus1),
            helper.make_node("Log", [plus1], [target], name=name),
        ]
    if op == "expm1":
        exp = f"{name}_exp"
        return [
            helper.make_node("Exp", [source], [exp], name=exp),
            helper.make_node("Sub", [exp, one], [target], name=name),
        ]
    return [helper.make_node(ONNX_OPS[op], [source], [target], name=name)]


def transform_nodes(
    side: str, source: str, target: str, ops: Kinds, elem: int, names: _Names
) -> tuple[list[onnx.NodeProto], list[TensorProto]]:
    """The transforms of one side, built here and nowhere else: ``target = ops(source)``
    column by column (``ops``: one op name or None per column; at least one op)."""
    dtype = helper.tensor_dtype_to_np_dtype(elem)
    nodes: list[onnx.NodeProto] = []
    inits: list[TensorProto] = []
    pieces = runs(ops)
    whole = len(pieces) == 1

    def one_for(name: str) -> str:
        tensor = numpy_helper.from_array(np.array(1, dtype), names.fresh(f"{name}_one"))
        inits.append(tensor)
        return tensor.name

    outputs = []
    for k, (start, stop, op) in enumerate(pieces):
        part = source
        if not whole:
            part = names.fresh(f"{PREFIX}{side}_slice{k}")
            bounds = {"begin": start, "end": stop, "axis": 1}
            for key, value in bounds.items():
                inits.append(
                    numpy_helper.from_array(
                        np.array([value], np.int64), names.fresh(f"{part}_{key}")
                    )
                )
            slice_inputs = [source, *(t.name for t in inits[-3:])]
            nodes.append(helper.make_node("Slice", slice_inputs, [part], name=part))
        if op is not None:
            name = names.fresh(f"{PREFIX}{side}_{op}{k}")
            out = target if whole else name
            one = one_for(name) if op in ("log1p", "expm1") else ""
            nodes.extend(op_nodes(op, part, out, name, one))
            part = out
        outputs.append(part)
    if not whole:
        concat = names.fresh(f"{PREFIX}{side}_concat")
        nodes.append(helper.make_node("Concat", outputs, [target], name=concat, axis=1))
    return nodes, inits


def splice_transforms(model: onnx.ModelProto, in_ops: Kinds, out_ops: Kinds) -> onnx.ModelProto:
    """Apply ``in_ops`` to the raw input first and ``out_ops`` to the output last.

    The graph input and output keep their names and types; a side without any op is left
    alone. ``in_ops`` are transforms, ``out_ops`` their inverses
    (:func:`normexport.transforms.side_ops`).
    """
    if not any(in_ops) and not any(out_ops):
        return model
    if opset_of(model) < MIN_OPSET:
        raise GraphError(
            f"the model's opset {opset_of(model)} is older than {MIN_OPSET}, the first with "
            "Slice inputs; per-column transforms need it (bake --opset 13 converts it)"
        )
    model = copy_model(model)
    io = interface(model)
    if any(in_ops):
        _check_width(io.input, in_ops, "input")
        names = _Names(model)
        transformed = names.fresh(PREFIX + "input_transformed")
        _rename_uses(model.graph, io.input_name, transformed)
        elem = io.input.type.tensor_type.elem_type
        nodes, inits = transform_nodes("in", io.input_name, transformed, in_ops, elem, names)
        _add_initializers(model, inits)
        body = list(model.graph.node)
        del model.graph.node[:]
        model.graph.node.extend([*nodes, *body])
    if any(out_ops):
        typed = typed_output(model, io.output)
        _check_width(typed, out_ops, "output")
        names = _Names(model)
        name = io.output_name
        untransformed = names.fresh(PREFIX + "output_untransformed")
        for node in model.graph.node:
            node.output[:] = [untransformed if o == name else o for o in node.output]
        _rename_uses(model.graph, name, untransformed)
        for value in model.graph.value_info:
            if value.name == name:
                value.name = untransformed
        elem = typed.type.tensor_type.elem_type
        nodes, inits = transform_nodes("out", untransformed, name, out_ops, elem, names)
        _add_initializers(model, inits)
        model.graph.node.extend(nodes)
    return model


def _check_width(value: onnx.ValueInfoProto, ops: Kinds, label: str) -> None:
    tensor = value.type.tensor_type
    if tensor.elem_type not in FLOAT_TYPES:
        raise GraphError(f"{label} {value.name!r}: transforms need FLOAT or DOUBLE")
    dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
    if len(dims) != 2 or (dims[1] is not None and dims[1] != len(ops)):
        raise GraphError(
            f"{label} {value.name!r} has shape {dims}; per-column transforms need "
            f"[batch, {len(ops)}]"
        )
