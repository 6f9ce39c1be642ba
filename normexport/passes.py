"""The ordered ONNX post-processing passes that export and bake both run.

Each pass is a pure ``ModelProto -> ModelProto`` function; a failing pass fails the
whole export or bake. :func:`post_process` is the one ordered list.
"""

from __future__ import annotations

from collections.abc import Callable

import onnx
from onnx import TensorProto, helper, shape_inference

from normexport import __version__
from normexport.affine import SIDES
from normexport.errors import GraphError, first_line
from normexport.onnxkit import DEFAULT_OPSET, copy_model

INPUT, OUTPUT, BATCH = "input", "output", "batch"
GRAPH_NAME = "normexport_model"

Pass = Callable[[onnx.ModelProto], onnx.ModelProto]


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
    model = copy_model(model)
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
        model = copy_model(model)
        for value, width in ((model.graph.input[0], n_inputs), (model.graph.output[0], n_outputs)):
            shape = value.type.tensor_type.shape
            del shape.dim[:]
            shape.dim.add().dim_param = BATCH
            shape.dim.add().dim_value = width
        return model

    return apply


def drop_initializer_inputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """Initializers are constants, not graph inputs (IR >= 4); listing them invites overrides."""
    if model.ir_version and model.ir_version < 4:  # IR < 4 requires them listed
        return model
    model = copy_model(model)
    inits = {i.name for i in model.graph.initializer}
    keep = [i for i in model.graph.input if i.name not in inits]
    del model.graph.input[:]
    model.graph.input.extend(keep)
    return model


def drop_redundant_flatten(model: onnx.ModelProto) -> onnx.ModelProto:
    """Remove ``Flatten(axis=1)`` of 2-D tensors: the exporter puts one before each Gemm."""
    model = copy_model(model)
    try:
        inferred = shape_inference.infer_shapes(model)
    except Exception:  # custom domains or odd graphs: leave every Flatten in place
        return model
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
    model = copy_model(model)
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
    """Rewrite each spliced ``Mul``/``Add`` pair that MXNet's exporter wrote as the
    spliced affine of :func:`normexport.onnx_affine.affine_nodes` (one inference
    ``BatchNormalization``, exactly ``x * scale + shift``, and several times faster in
    onnxruntime than the broadcasting pair: docs/bake.md has the measurements)."""
    from normexport.onnx_affine import rebuild_affine

    for side in SIDES:
        model = rebuild_affine(model, side)
    return model


def set_opset(opset: int) -> Pass:
    """Stamp opset 13 (the rules the exporter translated with), then convert up if asked."""

    def apply(model: onnx.ModelProto) -> onnx.ModelProto:
        model = copy_model(model)
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
    model = copy_model(model)
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
        model = copy_model(model)
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
    metadata: dict[str, str],
    opset: int | None = None,
    rename: bool = True,
    batch: str | None = BATCH,
    widths: tuple[int, int] | None = None,
    own_graph: bool = True,
) -> onnx.ModelProto:
    """Run the passes in order; export and bake both come through here.

    Order matters: initializer inputs go before renaming (so the one real input is
    unambiguous); Flatten removal needs shapes, which inference finds only once inputs
    are named and the initializers are constants; Softplus is expanded before the opset
    is set so the converter sees only supported ops; the opset is set last among the
    graph edits so the version converter sees the final op list. ``own_graph`` (export)
    drops the exporter's redundant ``Flatten``s, stamps opset 13 before converting and
    names the graph; bake leaves a user's ops and graph name alone and converts its
    opset before splicing.
    """
    steps: list[Pass | None] = [
        drop_initializer_inputs,
        (lambda m: rename_io(m, batch=batch)) if rename else None,
        declare_shapes(*widths) if widths else None,
        drop_redundant_flatten if own_graph else None,  # a user's graph keeps its ops
        affine_as_batchnorm,
        expand_double_softplus,
        set_opset(opset) if own_graph and opset is not None else None,
        name_graph if own_graph else None,
        set_metadata(metadata),
    ]
    for apply in steps:
        if apply is not None:
            model = apply(model)
    return model
