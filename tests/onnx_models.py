"""Tiny ONNX regression models built inline with onnx.helper, in the shapes exporters write.

Every builder returns a checked ``ModelProto`` with input ``x`` ``[N, n_in]`` and output
``y`` ``[N, n_out]``; weights come from a seeded generator, scaled so that the hidden and
output values stay of order one for inputs in ``[0, 1]``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

ELEM = {"float32": TensorProto.FLOAT, "float64": TensorProto.DOUBLE}
RTOL = {"float32": 1e-5, "float64": 1e-12}
NEWEST_OPSET = onnx.defs.onnx_opset_version()


def make_model(
    nodes: list[onnx.NodeProto],
    inits: dict[str, np.ndarray],
    *,
    dtype: str = "float32",
    n_in: int = 3,
    n_out: int = 2,
    opset: int = 13,
    out_shape: list | None = None,
    in_elem: int | None = None,
    out_elem: int | None = None,
    typed_fields: bool = False,
) -> onnx.ModelProto:
    """Floating initializers take ``dtype``; integer ones (shapes) stay int64."""
    tensors = []
    for name, value in inits.items():
        value = np.asarray(value)
        if np.issubdtype(value.dtype, np.floating):
            value = value.astype(dtype)
        if typed_fields and np.issubdtype(value.dtype, np.floating):
            tensors.append(
                helper.make_tensor(name, ELEM[dtype], value.shape, value.reshape(-1).tolist())
            )
        else:
            tensors.append(numpy_helper.from_array(value, name))
    graph = helper.make_graph(
        nodes,
        "net",
        [helper.make_tensor_value_info("x", in_elem or ELEM[dtype], ["N", n_in])],
        [
            helper.make_tensor_value_info(
                "y", out_elem or ELEM[dtype], ["N", n_out] if out_shape is None else out_shape
            )
        ],
        tensors,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = min(model.ir_version, 10)  # what exporters of this era write
    onnx.checker.check_model(model, full_check=True)
    return model


def weights(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    return rng.normal(size=(rows, cols)) / np.sqrt(rows)


def gemm_mlp(
    dtype: str = "float32",
    *,
    opset: int = 13,
    trans_b: int = 0,
    alpha: float = 1.0,
    beta: float = 1.0,
    bias: bool = True,
    hidden: int = 5,
    n_in: int = 3,
    n_out: int = 2,
    last_activation: str | None = None,
    seed: int = 0,
    typed_fields: bool = False,
) -> onnx.ModelProto:
    """Gemm → Tanh → Gemm, as PyTorch writes a two-layer MLP (transB=1 for nn.Linear)."""
    rng = np.random.default_rng(seed)
    W1, W2 = weights(rng, n_in, hidden), weights(rng, hidden, n_out)
    inits = {
        "W1": W1.T if trans_b else W1,
        "W2": W2.T if trans_b else W2,
    }
    attrs = {"transB": trans_b} if trans_b else {}
    if alpha != 1.0 or beta != 1.0:
        attrs.update(alpha=alpha, beta=beta)
    c1, c2 = (["b1"], ["b2"]) if bias else ([], [])
    if bias:
        inits.update(b1=rng.normal(size=hidden) * 0.1, b2=rng.normal(size=n_out) * 0.1)
    last = "y" if last_activation is None else "z"
    nodes = [
        helper.make_node("Gemm", ["x", "W1", *c1], ["h"], name="fc1", **attrs),
        helper.make_node("Tanh", ["h"], ["a"], name="act1"),
        helper.make_node("Gemm", ["a", "W2", *c2], [last], name="fc2", **attrs),
    ]
    if last_activation:
        nodes.append(helper.make_node(last_activation, ["z"], ["y"], name="act2"))
    return make_model(
        nodes, inits, dtype=dtype, n_in=n_in, n_out=n_out, opset=opset, typed_fields=typed_fields
    )


def matmul_add_mlp(
    dtype: str = "float32", *, opset: int = 13, bias_first: bool = False, seed: int = 1
) -> onnx.ModelProto:
    """MatMul → Add → Sigmoid → MatMul → Add, as tf2onnx writes a Keras Dense stack."""
    rng = np.random.default_rng(seed)
    inits = {
        "W1": weights(rng, 3, 4),
        "b1": rng.normal(size=4) * 0.1,
        "W2": weights(rng, 4, 2),
        "b2": rng.normal(size=(1, 2)) * 0.1,
    }
    add2 = ["b2", "m2"] if bias_first else ["m2", "b2"]
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["m1"], name="dense/MatMul"),
        helper.make_node("Add", ["m1", "b1"], ["h"], name="dense/BiasAdd"),
        helper.make_node("Sigmoid", ["h"], ["a"], name="dense/Sigmoid"),
        helper.make_node("MatMul", ["a", "W2"], ["m2"], name="dense_1/MatMul"),
        helper.make_node("Add", add2, ["y"], name="dense_1/BiasAdd"),
    ]
    return make_model(nodes, inits, dtype=dtype, opset=opset)


def edge_mlp(dtype: str = "float32", *, opset: int = 13, seed: int = 2) -> onnx.ModelProto:
    """No-op Cast, Reshape(-1, n), Flatten and Identity between the layers and both edges."""
    rng = np.random.default_rng(seed)
    elem = ELEM[dtype]
    inits = {
        "W1": weights(rng, 3, 4),
        "b1": rng.normal(size=4) * 0.1,
        "W2": weights(rng, 4, 2),
        "b2": rng.normal(size=2) * 0.1,
        "shape_in": np.array([-1, 3], dtype=np.int64),
        "shape_out": np.array([-1, 2], dtype=np.int64),
    }
    nodes = [
        helper.make_node("Cast", ["x"], ["xc"], name="cast_in", to=elem),
        helper.make_node("Reshape", ["xc", "shape_in"], ["xr"], name="reshape_in"),
        helper.make_node("Flatten", ["xr"], ["xf"], name="flatten_in", axis=1),
        helper.make_node("Gemm", ["xf", "W1", "b1"], ["h"], name="fc1"),
        helper.make_node("Relu", ["h"], ["a"], name="act1"),
        helper.make_node("Gemm", ["a", "W2", "b2"], ["z"], name="fc2"),
        helper.make_node("Reshape", ["z", "shape_out"], ["zr"], name="reshape_out"),
        helper.make_node("Cast", ["zr"], ["zc"], name="cast_out", to=elem),
        helper.make_node("Identity", ["zc"], ["y"], name="identity_out"),
    ]
    return make_model(nodes, inits, dtype=dtype, opset=opset)


def data_as_b_mlp(
    dtype: str = "float32", *, trans_a: int = 0, bias: bool = True, seed: int = 3
) -> onnx.ModelProto:
    """First layer Gemm(W, x, transB=1) computes W·xᵀ ([hidden, N]), then Transpose."""
    rng = np.random.default_rng(seed)
    W1 = weights(rng, 3, 4).T  # (hidden, n_in)
    inits = {"W1": W1.T if trans_a else W1, "W2": weights(rng, 4, 2), "b2": np.zeros(2) + 0.2}
    c1 = []
    if bias:
        inits["c1"] = rng.normal(size=(4, 1)) * 0.1
        c1 = ["c1"]
    nodes = [
        helper.make_node("Gemm", ["W1", "x", *c1], ["ht"], name="fc1", transA=trans_a, transB=1),
        helper.make_node("Transpose", ["ht"], ["h"], name="t", perm=[1, 0]),
        helper.make_node("Tanh", ["h"], ["a"], name="act1"),
        helper.make_node("Gemm", ["a", "W2", "b2"], ["y"], name="fc2", alpha=2.0, beta=0.5),
    ]
    return make_model(nodes, inits, dtype=dtype)


def linear(dtype: str = "float32", *, kind: str = "gemm", seed: int = 4) -> onnx.ModelProto:
    """One dense layer: the first and the last layer are the same node."""
    rng = np.random.default_rng(seed)
    inits = {"W": weights(rng, 3, 2), "b": np.array([0.3, -0.2])}
    if kind == "gemm":
        nodes = [helper.make_node("Gemm", ["x", "W", "b"], ["y"], name="fc", alpha=1.5, beta=0.5)]
    else:
        nodes = [
            helper.make_node("MatMul", ["x", "W"], ["m"], name="mm"),
            helper.make_node("Add", ["m", "b"], ["y"], name="bias"),
        ]
    return make_model(nodes, inits, dtype=dtype)


def constant_nodes(dtype: str = "float32", seed: int = 5) -> onnx.ModelProto:
    """Weights held by Constant nodes instead of initializers."""
    rng = np.random.default_rng(seed)
    consts = {
        "W1": weights(rng, 3, 4),
        "b1": rng.normal(size=4) * 0.1,
        "W2": weights(rng, 4, 2),
        "b2": rng.normal(size=2) * 0.1,
    }
    nodes = [
        helper.make_node(
            "Constant", [], [k], name=f"const_{k}", value=numpy_helper.from_array(v.astype(dtype))
        )
        for k, v in consts.items()
    ]
    nodes += [
        helper.make_node("Gemm", ["x", "W1", "b1"], ["h"], name="fc1"),
        helper.make_node("Tanh", ["h"], ["a"], name="act1"),
        helper.make_node("Gemm", ["a", "W2", "b2"], ["y"], name="fc2"),
    ]
    return make_model(nodes, {}, dtype=dtype)


def rank1_output(dtype: str = "float32", seed: int = 6) -> onnx.ModelProto:
    """One value per row as a [N] output: Gemm → Reshape(-1), as skl2onnx often writes."""
    rng = np.random.default_rng(seed)
    inits = {"W": weights(rng, 3, 1), "b": np.array([0.5]), "flat": np.array([-1])}
    nodes = [
        helper.make_node("Gemm", ["x", "W", "b"], ["z"], name="fc"),
        helper.make_node("Reshape", ["z", "flat"], ["y"], name="ravel"),
    ]
    return make_model(nodes, inits, dtype=dtype, n_out=1, out_shape=["N"])


# Patterns in which both sides fold, by name.
FOLDABLE: dict[str, Callable[..., onnx.ModelProto]] = {
    "gemm": gemm_mlp,
    "gemm_transB": lambda dtype="float32", **kw: gemm_mlp(dtype, trans_b=1, **kw),
    "gemm_alpha_beta": lambda dtype="float32", **kw: gemm_mlp(dtype, alpha=0.75, beta=1.5, **kw),
    "gemm_transB_alpha_beta": lambda dtype="float32", **kw: gemm_mlp(
        dtype, trans_b=1, alpha=-1.25, beta=0.5, **kw
    ),
    "gemm_no_bias": lambda dtype="float32", **kw: gemm_mlp(dtype, bias=False, **kw),
    "gemm_typed_fields": lambda dtype="float32", **kw: gemm_mlp(dtype, typed_fields=True, **kw),
    "matmul_add": matmul_add_mlp,
    "matmul_add_bias_first": lambda dtype="float32", **kw: matmul_add_mlp(
        dtype, bias_first=True, **kw
    ),
    "cast_reshape_flatten_edges": edge_mlp,
    "gemm_data_as_B": data_as_b_mlp,
    "gemm_data_as_B_transA_no_bias": lambda dtype="float32": data_as_b_mlp(
        dtype, trans_a=1, bias=False
    ),
    "single_gemm": linear,
    "single_matmul_add": lambda dtype="float32": linear(dtype, kind="matmul"),
    "constant_nodes": constant_nodes,
    "rank1_output": rank1_output,
}


# ------------------------------------------------------------------------------ running


def session(model: onnx.ModelProto | str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    source = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def run(model: onnx.ModelProto | str, X: np.ndarray) -> np.ndarray:
    sess = session(model)
    return sess.run(None, {sess.get_inputs()[0].name: X})[0]


def affines(n_in: int, n_out: int, seed: int = 0) -> tuple[tuple, tuple]:
    """Input and output affines with scales over four decades, both signs, and shifts."""
    rng = np.random.default_rng(seed)

    def one(n: int, unit: Callable[[np.ndarray], np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        scale = rng.choice([-1.0, 1.0], n) * 10.0 ** rng.uniform(-2, 2, n)
        return scale, rng.uniform(-5, 5, n) * unit(scale)

    # Input shifts are in normalized units; output shifts in raw units, within a few spans
    # (far larger ones leave float32 outputs without the digits to compare).
    return one(n_in, np.ones_like), one(n_out, np.abs)


def raw_rows(in_affine: tuple, n: int = 64, seed: int = 0) -> np.ndarray:
    """Raw rows whose normalized values cover [0, 1]."""
    scale, shift = in_affine
    U = np.random.default_rng(seed).uniform(0, 1, (n, scale.size))
    return (U - shift) / scale


def expected(model: onnx.ModelProto | str, X: np.ndarray, in_affine, out_affine, dtype: str):
    """The original on NumPy-normalized rows, de-normalized with NumPy."""
    Xd = X.astype(dtype)
    Z = Xd * in_affine[0].astype(dtype) + in_affine[1].astype(dtype)
    Y = run(model, Z)
    return Y * out_affine[0].astype(Y.dtype) + out_affine[1].astype(Y.dtype)


def range_error(got: np.ndarray, want: np.ndarray, out_affine) -> float:
    """Max error relative to each output's span (|scale| of the de-normalization)."""
    got = np.asarray(got, np.float64).reshape(len(want), -1)
    want = np.asarray(want, np.float64).reshape(len(got), -1)
    return float((np.abs(got - want) / np.abs(out_affine[0])).max())


def ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]
