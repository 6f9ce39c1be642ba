"""The float64 rewrites of ops onnxruntime has no double kernel for (core: no MXNet).

Each op is put in a one-node double graph, rewritten by ``passes.expand_double_ops`` and
run in onnxruntime; the result must equal the op's ONNX definition, evaluated in NumPy
float64 (math.erf for Erf), within a few ulps. The original op really is missing in
onnxruntime (so the rewrite is needed), and float32 graphs are left alone.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from normexport import passes

SELU_ALPHA, SELU_GAMMA = 1.67326319217681884765625, 1.05070102214813232421875
f32 = lambda v: float(np.float32(v))  # noqa: E731  (ONNX float attributes are float32)

CASES = {
    # op: (attributes, extra inputs, NumPy definition)
    "LeakyRelu": ({"alpha": 0.1}, {}, lambda x: np.where(x > 0, x, f32(0.1) * x)),
    "PRelu": (
        {},
        {"slope": np.array([0.25, -0.5, 2.0])},
        lambda x: np.where(x > 0, x, np.array([0.25, -0.5, 2.0]) * x),
    ),
    "Elu": ({"alpha": 0.7}, {}, lambda x: np.where(x > 0, x, f32(0.7) * np.expm1(x))),
    "Selu": (
        {},
        {},
        lambda x: SELU_GAMMA * np.where(x > 0, x, SELU_ALPHA * np.expm1(x)),
    ),
    "Softsign": ({}, {}, lambda x: x / (1 + np.abs(x))),
    "Softplus": ({}, {}, lambda x: np.logaddexp(0, x)),
    "HardSigmoid": (
        {"alpha": 0.3, "beta": 0.4},
        {},
        lambda x: np.clip(f32(0.3) * x + f32(0.4), 0, 1),
    ),
    "Erf": ({}, {}, np.frompyfunc(math.erf, 1, 1)),
    "Asinh": ({}, {}, np.arcsinh),
    "Sinh": ({}, {}, np.sinh),
}


def one_node(op, attrs, extra, elem=TensorProto.DOUBLE):
    inits = [
        helper.make_tensor(k, elem, list(v.shape), v.astype(np.float64).ravel().tolist())
        for k, v in extra.items()
    ]
    node = helper.make_node(op, ["x", *extra], ["y"], name="the_op", **attrs)
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", elem, ["batch", 3])],
        [helper.make_tensor_value_info("y", elem, ["batch", 3])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def session(model):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


X = np.concatenate(
    [
        np.linspace(-8, 8, 3001),
        np.linspace(-1e-3, 1e-3, 201),
        [0.0, -0.0, 1e-300, -1e-300, 30.0, -30.0, 700.0, -700.0],
    ]
)
X = np.resize(X, (X.size // 3, 3))


@pytest.mark.parametrize("op", list(CASES))
def test_each_rewrite_is_the_op(op):
    attrs, extra, definition = CASES[op]
    model = one_node(op, attrs, extra)
    with pytest.raises(Exception, match="NOT_IMPLEMENTED|Could not find an implementation"):
        session(model)  # the reason for the rewrite: no double kernel in onnxruntime
    rewritten = passes.expand_double_ops(model)
    onnx.checker.check_model(rewritten, full_check=True)
    assert op not in [n.op_type for n in rewritten.graph.node]
    got = session(rewritten).run(None, {"x": X})[0]
    want = definition(X).astype(np.float64)
    assert got.dtype == np.float64 and np.all(np.isfinite(got))
    # within a few ulps of the larger of the value and 1 (exp(x) - 1 for expm1, the erf sum)
    error = np.abs(got - want) / np.maximum(np.abs(want), 1.0)
    assert error.max() < 2e-15, (op, error.max(), X.ravel()[error.argmax()])


def test_float32_graphs_are_left_alone():
    model = one_node("LeakyRelu", {"alpha": 0.1}, {}, TensorProto.FLOAT)
    assert passes.expand_double_ops(model) is model


def test_rewrites_share_constants_and_keep_names_unique():
    nodes = [
        helper.make_node("Elu", ["x"], ["a"], name="n"),
        helper.make_node("Elu", ["a"], ["y"], name="n_normexport_min"),  # a clashing name
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.DOUBLE, ["batch", 3])],
        [helper.make_tensor_value_info("y", TensorProto.DOUBLE, ["batch", 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    rewritten = passes.expand_double_ops(model)
    onnx.checker.check_model(rewritten, full_check=True)
    names = [n.name for n in rewritten.graph.node]
    assert len(names) == len(set(names))
    constants = [t for t in rewritten.graph.initializer]
    assert len(constants) == len({(t.double_data[0] if t.double_data else None) for t in constants})
    got = session(rewritten).run(None, {"x": X})[0]
    elu = lambda v: np.where(v > 0, v, np.expm1(v))  # noqa: E731
    assert np.abs(got - elu(elu(X))).max() < 1e-15


def test_float32_constants_of_our_exporter_become_double():
    """LayerNorm's epsilon comes out of MXNet's exporter as float32 in a double graph."""
    eps = helper.make_tensor("eps", TensorProto.FLOAT, [], [1e-5])
    node = helper.make_node("Add", ["x", "eps"], ["y"])
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.DOUBLE, ["batch", 3])],
        [helper.make_tensor_value_info("y", TensorProto.DOUBLE, ["batch", 3])],
        [eps],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    fixed = passes.match_constant_types(model)
    onnx.checker.check_model(fixed, full_check=True)
    value = onnx.numpy_helper.to_array(fixed.graph.initializer[0])
    assert value.dtype == np.float64 and value == np.float32(1e-5)  # the value MXNet uses
    assert (session(fixed).run(None, {"x": X})[0] == X + float(np.float32(1e-5))).all()
