"""The ordered ONNX post-processing passes that export and bake both run.

Each pass is a pure ``ModelProto -> ModelProto`` function; a failing pass fails the
whole export or bake. :func:`post_process` is the one ordered list.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import onnx
from onnx import TensorProto, helper, numpy_helper, shape_inference

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

# erf(x) = 2/sqrt(pi) x exp(-x^2) sum_n (2 x^2)^n / (1 3 5 ... (2n+1)): every term is
# positive, so there is no cancellation; with |x| clipped at 5.9 (erf(5.9) is 1 to
# 1e-16) and 101 terms the sum is within 2e-15 of erf everywhere (measured against
# math.erf on 200,000 points in [-8, 8]). The polynomial runs in z = x^2 / 32 (exact),
# so that no coefficient is tiny: onnxruntime's optimizer drops an Add of a double
# constant below about 1e-44 as if it were zero (measured, onnxruntime 1.32).
ERF_CLIP = 5.9
ERF_TERMS = 101
ERF_Z = 32.0


def _erf_coefficients() -> list[float]:
    """Coefficients of the sum as a polynomial in z = x^2 / 32, exact to the last bit."""
    from fractions import Fraction

    coefficients, denominator = [], Fraction(1)
    for n in range(ERF_TERMS):
        coefficients.append(float(Fraction(2**n) * Fraction(int(ERF_Z)) ** n / denominator))
        denominator *= 2 * n + 3
    return coefficients


class _DoubleOps:
    """Builds the replacement of one op in double ops that onnxruntime implements."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        graph = model.graph
        self.taken = {i.name for i in graph.initializer} | {
            o for n in graph.node for o in (*n.input, *n.output)
        }
        self.constants: dict[float, str] = {}

    def constant(self, value: float) -> str:
        """The name of a double scalar initializer holding ``value`` (one per value)."""
        if value not in self.constants:
            name = self.unique(f"normexport_c{len(self.constants)}")
            self.model.graph.initializer.append(
                helper.make_tensor(name, TensorProto.DOUBLE, [], [value])
            )
            self.constants[value] = name
        return self.constants[value]

    def unique(self, name: str) -> str:
        candidate, k = name, 1
        while candidate in self.taken:
            candidate, k = f"{name}_{k}", k + 1
        self.taken.add(candidate)
        return candidate

    def expand(self, node: onnx.NodeProto) -> list[onnx.NodeProto] | None:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        x, y = node.input[0], node.output[0]
        stem = f"{node.name or y}_normexport"
        nodes: list[onnx.NodeProto] = []

        def op(kind: str, *inputs: str, out: str | None = None) -> str:
            out = out or self.unique(f"{stem}_{kind.lower()}")
            nodes.append(helper.make_node(kind, list(inputs), [out], name=self.unique(out)))
            return out

        def negative_part() -> str:  # min(x, 0), exactly
            return op("Min", x, self.constant(0.0))

        def exp_minus_one() -> str:  # exp(min(x, 0)) - 1: within 2e-16 of expm1
            return op("Sub", op("Exp", negative_part()), self.constant(1.0))

        kind = node.op_type
        if kind == "Softplus":  # relu(x) + log(1 + exp(-|x|)), stable for any x
            relu = op("Relu", x)
            tail = op("Log", op("Add", op("Exp", op("Neg", op("Abs", x))), self.constant(1.0)))
            op("Add", relu, tail, out=y)
        elif kind == "LeakyRelu":  # relu(x) + alpha min(x, 0)
            alpha = float(attrs.get("alpha", 0.01))
            op("Add", op("Relu", x), op("Mul", negative_part(), self.constant(alpha)), out=y)
        elif kind == "PRelu":  # relu(x) + slope min(x, 0)
            op("Add", op("Relu", x), op("Mul", negative_part(), node.input[1]), out=y)
        elif kind == "Elu":  # relu(x) + alpha (exp(min(x, 0)) - 1)
            alpha = float(attrs.get("alpha", 1.0))
            op("Add", op("Relu", x), op("Mul", exp_minus_one(), self.constant(alpha)), out=y)
        elif kind == "Selu":  # gamma (relu(x) + alpha (exp(min(x, 0)) - 1))
            alpha = float(attrs.get("alpha", 1.67326319217681884765625))
            gamma = float(attrs.get("gamma", 1.05070102214813232421875))
            inner = op("Add", op("Relu", x), op("Mul", exp_minus_one(), self.constant(alpha)))
            op("Mul", inner, self.constant(gamma), out=y)
        elif kind == "Softsign":  # x / (1 + |x|)
            op("Div", x, op("Add", op("Abs", x), self.constant(1.0)), out=y)
        elif kind == "HardSigmoid":  # max(0, min(1, alpha x + beta))
            alpha, beta = float(attrs.get("alpha", 0.2)), float(attrs.get("beta", 0.5))
            line = op("Add", op("Mul", x, self.constant(alpha)), self.constant(beta))
            op("Max", op("Min", line, self.constant(1.0)), self.constant(0.0), out=y)
        elif kind == "Erf":
            clipped = op("Max", op("Min", x, self.constant(ERF_CLIP)), self.constant(-ERF_CLIP))
            square = op("Mul", clipped, clipped)
            z = op("Mul", square, self.constant(1.0 / ERF_Z))
            coefficients = _erf_coefficients()
            total = self.constant(coefficients[-1])
            for c in reversed(coefficients[:-1]):  # Horner in z
                total = op("Add", op("Mul", total, z), self.constant(c))
            front = op("Mul", clipped, self.constant(2.0 / math.sqrt(math.pi)))
            op("Mul", op("Mul", front, op("Exp", op("Neg", square))), total, out=y)
        elif kind == "Asinh":  # sign(x) (log(a + sqrt(a^2 + 1)) + log(c)), a = min(|x|, B)
            # B = 2^500 keeps a^2 finite; c = max(|x|, B) / B (exactly 1 below B) restores
            # log(|x|) beyond it, where asinh(|x|) = log(2 |x|) to the last bit.
            big = self.constant(ASINH_BIG)
            magnitude = op("Abs", x)
            a = op("Min", magnitude, big)
            root = op("Sqrt", op("Add", op("Mul", a, a), self.constant(1.0)))
            ratio = op("Div", op("Max", magnitude, big), big)
            value = op("Add", op("Log", op("Add", a, root)), op("Log", ratio))
            op("Mul", op("Sign", x), value, out=y)
        elif kind == "Sinh":  # sign(x) (e - 1/e) / 2, e = exp(|x|)
            e = op("Exp", op("Abs", x))
            half = op("Mul", op("Sub", e, op("Div", self.constant(1.0), e)), self.constant(0.5))
            op("Mul", op("Sign", x), half, out=y)
        else:
            return None
        return nodes


ASINH_BIG = 2.0**500

DOUBLE_REWRITES = (
    "Asinh",
    "Sinh",
    "Softplus",
    "LeakyRelu",
    "PRelu",
    "Elu",
    "Selu",
    "Softsign",
    "HardSigmoid",
    "Erf",
)


def expand_double_ops(model: onnx.ModelProto) -> onnx.ModelProto:
    """Rewrite double ops that onnxruntime does not implement in ops it does.

    onnxruntime has no float64 kernel for the ops in :data:`DOUBLE_REWRITES` (it fails
    at session creation); each becomes a few elementwise ops with the same result
    (docs/onnx-interface.md lists the formulas and their precision). Float32 graphs are
    left alone.
    """
    if model.graph.input[0].type.tensor_type.elem_type != TensorProto.DOUBLE:
        return model
    if not any(n.op_type in DOUBLE_REWRITES for n in model.graph.node):
        return model
    model = copy_model(model)
    builder = _DoubleOps(model)
    nodes: list[onnx.NodeProto] = []
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            nodes.append(node)
            continue
        nodes.extend(builder.expand(node) or [node])
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


_ARITHMETIC = ("Add", "Sub", "Mul", "Div", "Min", "Max", "Pow")


def match_constant_types(model: onnx.ModelProto) -> onnx.ModelProto:
    """In a double graph, make float32 scalar constants of arithmetic ops double.

    MXNet's exporter writes some constants as float32 whatever the network's dtype
    (LayerNorm's epsilon, for one), which a float64 graph refuses. The float32 value
    is the one MXNet computes with (its attributes are float32), so the cast is exact.
    Runs on our own exports only: a user's graph is left as it is.
    """
    if model.graph.input[0].type.tensor_type.elem_type != TensorProto.DOUBLE:
        return model
    readers: dict[str, set[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, set()).add(node.op_type)
    model = copy_model(model)
    for tensor in model.graph.initializer:
        if (
            tensor.data_type == TensorProto.FLOAT
            and readers.get(tensor.name)
            and readers[tensor.name] <= set(_ARITHMETIC)
        ):
            value = numpy_helper.to_array(tensor).astype("float64")
            tensor.CopyFrom(numpy_helper.from_array(value, tensor.name))
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
        match_constant_types if own_graph else None,  # our exporter's float32 constants
        affine_as_batchnorm,
        expand_double_ops,
        set_opset(opset) if own_graph and opset is not None else None,
        name_graph if own_graph else None,
        set_metadata(metadata),
    ]
    for apply in steps:
        if apply is not None:
            model = apply(model)
    return model
