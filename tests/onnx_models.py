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


# ------------------------------------------------------------------------------ exporters' edges


def _gemm_tanh_gemm(rng, dtype, n_in, n_out, hidden=5, bias=True):
    """Gemm(transB=1) → Tanh → Gemm(transB=1) from ``x`` to ``z``; nodes and initializers."""
    inits = {"W1": weights(rng, n_in, hidden).T, "W2": weights(rng, hidden, n_out).T}
    c1, c2 = (["b1"], ["b2"]) if bias else ([], [])
    if bias:
        inits.update(b1=rng.normal(size=hidden) * 0.1, b2=rng.normal(size=n_out) * 0.1)
    nodes = [
        helper.make_node("Gemm", ["x", "W1", *c1], ["h"], name="fc1", transB=1),
        helper.make_node("Tanh", ["h"], ["a"], name="act1"),
        helper.make_node("Gemm", ["a", "W2", *c2], ["z"], name="fc2", transB=1),
    ]
    return nodes, inits


def squeeze_output(dtype: str = "float32", *, opset: int = 13, seed: int = 8) -> onnx.ModelProto:
    """``y.squeeze(-1)`` after a one-output Linear, as both torch exporters write it."""
    rng = np.random.default_rng(seed)
    nodes, inits = _gemm_tanh_gemm(rng, dtype, 3, 1)
    if opset >= 13:
        inits["axes"] = np.array([1], dtype=np.int64)
        nodes.append(helper.make_node("Squeeze", ["z", "axes"], ["y"], name="squeeze"))
    else:
        nodes.append(helper.make_node("Squeeze", ["z"], ["y"], name="squeeze", axes=[1]))
    return make_model(nodes, inits, dtype=dtype, n_out=1, opset=opset, out_shape=["N"])


def squeeze_unsqueeze_flatten(dtype: str = "float32", *, seed: int = 9) -> onnx.ModelProto:
    """Squeeze, Unsqueeze and Flatten between a one-output layer and a ``[N, 1]`` output."""
    rng = np.random.default_rng(seed)
    nodes, inits = _gemm_tanh_gemm(rng, dtype, 3, 1)
    inits["axes"] = np.array([1], dtype=np.int64)
    nodes += [
        helper.make_node("Squeeze", ["z", "axes"], ["zs"], name="squeeze"),
        helper.make_node("Unsqueeze", ["zs", "axes"], ["zu"], name="unsqueeze"),
        helper.make_node("Flatten", ["zu"], ["y"], name="flatten", axis=1),
    ]
    return make_model(nodes, inits, dtype=dtype, n_out=1)


def _view_batch(source: str, target: str, tag: str) -> list[onnx.NodeProto]:
    """TorchScript's ``v.view(v.size(0), -1)``: Shape → Gather → Unsqueeze → Concat → Reshape."""

    def const(name, value):
        return helper.make_node(
            "Constant", [], [name], name=name, value=numpy_helper.from_array(np.array(value))
        )

    return [
        helper.make_node("Shape", [source], [f"{tag}_shape"], name=f"{tag}/Shape"),
        const(f"{tag}_zero", np.int64(0)),
        helper.make_node(
            "Gather", [f"{tag}_shape", f"{tag}_zero"], [f"{tag}_n"], name=f"{tag}/Gather", axis=0
        ),
        const(f"{tag}_axes", [0]),
        helper.make_node(
            "Unsqueeze", [f"{tag}_n", f"{tag}_axes"], [f"{tag}_n1"], name=f"{tag}/Unsqueeze"
        ),
        const(f"{tag}_minus1", [-1]),
        helper.make_node(
            "Concat",
            [f"{tag}_n1", f"{tag}_minus1"],
            [f"{tag}_target"],
            name=f"{tag}/Concat",
            axis=0,
        ),
        helper.make_node(
            "Reshape", [source, f"{tag}_target"], [target], name=f"{tag}/Reshape", allowzero=0
        ),
    ]


def torchscript_view(
    dtype: str = "float32", *, bias: bool = True, seed: int = 10
) -> onnx.ModelProto:
    """``x.view(x.size(0), -1)`` before the first layer and after the last, as TorchScript
    writes it; without bias its Linear layers are bare MatMuls."""
    rng = np.random.default_rng(seed)
    inits = {"W1": weights(rng, 3, 4), "W2": weights(rng, 4, 2)}
    nodes = _view_batch("x", "xv", "view_in")
    if bias:
        inits.update(b1=rng.normal(size=4) * 0.1, b2=rng.normal(size=2) * 0.1)
        nodes += [
            helper.make_node("MatMul", ["xv", "W1"], ["m1"], name="l1/MatMul"),
            helper.make_node("Add", ["m1", "b1"], ["h"], name="l1/Add"),
        ]
    else:
        nodes.append(helper.make_node("MatMul", ["xv", "W1"], ["h"], name="l1/MatMul"))
    nodes.append(helper.make_node("Tanh", ["h"], ["a"], name="act"))
    if bias:
        nodes += [
            helper.make_node("MatMul", ["a", "W2"], ["m2"], name="l2/MatMul"),
            helper.make_node("Add", ["m2", "b2"], ["z"], name="l2/Add"),
        ]
    else:
        nodes.append(helper.make_node("MatMul", ["a", "W2"], ["z"], name="l2/MatMul"))
    nodes += _view_batch("z", "y", "view_out")
    return make_model(nodes, inits, dtype=dtype, opset=17)


# ------------------------------------------------------------------------------ ai.onnx.ml

ML_OPSET = 3


def make_ml_model(
    nodes: list[onnx.NodeProto],
    inits: dict[str, np.ndarray] | None = None,
    *,
    dtype: str = "float32",
    n_in: int = 3,
    n_out: int = 2,
    opset: int | None = 17,
    ml_opset: int = ML_OPSET,
    out_elem: int = TensorProto.FLOAT,
) -> onnx.ModelProto:
    """A model whose ai.onnx.ml ops write FLOAT whatever the input type (as they do)."""
    tensors = []
    for name, value in (inits or {}).items():
        value = np.asarray(value)
        if np.issubdtype(value.dtype, np.floating):
            value = value.astype(dtype)
        tensors.append(numpy_helper.from_array(value, name))
    graph = helper.make_graph(
        nodes,
        "ml",
        [helper.make_tensor_value_info("x", ELEM[dtype], ["N", n_in])],
        [helper.make_tensor_value_info("y", out_elem, ["N", n_out])],
        tensors,
    )
    imports = [helper.make_opsetid("ai.onnx.ml", ml_opset)]
    if opset is not None:
        imports.insert(0, helper.make_opsetid("", opset))
    model = helper.make_model(graph, opset_imports=imports)
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def linear_regressor(dtype: str = "float32", *, n_out: int = 2, seed: int = 11) -> onnx.ModelProto:
    """skl2onnx's LinearRegression: one LinearRegressor (coefficients [target][feature])."""
    rng = np.random.default_rng(seed)
    node = helper.make_node(
        "LinearRegressor",
        ["x"],
        ["y"],
        name="linreg",
        domain="ai.onnx.ml",
        coefficients=rng.normal(size=3 * n_out).tolist(),
        intercepts=(rng.normal(size=n_out) * 0.1).tolist(),
        targets=n_out,
    )
    return make_ml_model([node], dtype=dtype, n_out=n_out)


def scaler_mlp(dtype: str = "float32", *, seed: int = 12) -> onnx.ModelProto:
    """skl2onnx's Pipeline(StandardScaler, MLPRegressor): Scaler → Cast → MatMul + Add ..."""
    rng = np.random.default_rng(seed)
    inits = {
        "W1": weights(rng, 3, 4),
        "b1": rng.normal(size=4) * 0.1,
        "W2": weights(rng, 4, 2),
        "b2": rng.normal(size=2) * 0.1,
    }
    nodes = [
        helper.make_node(
            "Scaler",
            ["x"],
            ["xs"],
            name="scaler",
            domain="ai.onnx.ml",
            offset=[0.25, -0.5, 0.1],
            scale=[2.0, 0.5, -1.5],
        ),
        helper.make_node("Cast", ["xs"], ["xc"], name="cast", to=ELEM[dtype]),
        helper.make_node("MatMul", ["xc", "W1"], ["m1"], name="mm1"),
        helper.make_node("Add", ["m1", "b1"], ["h"], name="add1"),
        helper.make_node("Relu", ["h"], ["a"], name="relu"),
        helper.make_node("MatMul", ["a", "W2"], ["m2"], name="mm2"),
        helper.make_node("Add", ["m2", "b2"], ["y"], name="add2"),
    ]
    return make_ml_model(nodes, inits, dtype=dtype, out_elem=ELEM[dtype])


MODES = ["BRANCH_LEQ", "BRANCH_LT", "BRANCH_GTE", "BRANCH_GT"]


def tree_regressor(
    dtype: str = "float32",
    *,
    n_out: int = 2,
    trees: int = 4,
    depth: int = 3,
    aggregate: str = "SUM",
    as_tensor: bool = False,
    modes: list[str] | None = None,
    seed: int = 13,
) -> onnx.ModelProto:
    """A TreeEnsembleRegressor of full binary trees: random features, thresholds in 0…1,
    every split mode, missing-value tracking both ways, a weight for every target in every
    leaf, and base values."""
    rng = np.random.default_rng(seed)
    attrs: dict[str, list] = {k: [] for k in ("treeids", "nodeids", "featureids", "modes")}
    attrs.update(values=[], truenodeids=[], falsenodeids=[], missing=[])
    targets: dict[str, list] = {"treeids": [], "nodeids": [], "ids": [], "weights": []}
    inner = 2**depth - 1
    for tree in range(trees):
        for k in range(2 * inner + 1):
            leaf = k >= inner
            attrs["treeids"].append(tree)
            attrs["nodeids"].append(k)
            attrs["featureids"].append(0 if leaf else int(rng.integers(3)))
            attrs["modes"].append("LEAF" if leaf else str(rng.choice(modes or MODES)))
            attrs["values"].append(0.0 if leaf else float(rng.uniform(0, 1)))
            attrs["truenodeids"].append(0 if leaf else 2 * k + 1)
            attrs["falsenodeids"].append(0 if leaf else 2 * k + 2)
            attrs["missing"].append(0 if leaf else int(rng.integers(2)))
            if leaf:
                for target in range(n_out):
                    targets["treeids"].append(tree)
                    targets["nodeids"].append(k)
                    targets["ids"].append(target)
                    targets["weights"].append(float(rng.normal()) / trees)
    kwargs: dict = dict(
        nodes_treeids=attrs["treeids"],
        nodes_nodeids=attrs["nodeids"],
        nodes_featureids=attrs["featureids"],
        nodes_modes=attrs["modes"],
        nodes_truenodeids=attrs["truenodeids"],
        nodes_falsenodeids=attrs["falsenodeids"],
        nodes_missing_value_tracks_true=attrs["missing"],
        target_treeids=targets["treeids"],
        target_nodeids=targets["nodeids"],
        target_ids=targets["ids"],
        n_targets=n_out,
        aggregate_function=aggregate,
        post_transform="NONE",
    )
    base = (rng.normal(size=n_out) * 0.1).tolist()
    if as_tensor:
        for key, value in (
            ("nodes_values", attrs["values"]),
            ("target_weights", targets["weights"]),
            ("base_values", base),
        ):
            # onnxruntime reads tensor attributes in the input's type
            kwargs[key + "_as_tensor"] = numpy_helper.from_array(np.array(value, dtype))
    else:
        kwargs.update(nodes_values=attrs["values"], target_weights=targets["weights"])
        kwargs["base_values"] = base
    node = helper.make_node(
        "TreeEnsembleRegressor", ["x"], ["y"], name="trees", domain="ai.onnx.ml", **kwargs
    )
    return make_ml_model([node], dtype=dtype, n_out=n_out, ml_opset=3 if as_tensor else 1)


def tree_ensemble(
    dtype: str = "float32", *, n_out: int = 2, depth: int = 3, aggregate: int = 1, seed: int = 14
) -> onnx.ModelProto:
    """The newer TreeEnsemble (ai.onnx.ml 5): two full trees per target, each of whose
    leaves feeds that target; splits in every mode, stored in the input's type."""
    rng = np.random.default_rng(seed)
    inner = 2**depth - 1
    node_attrs: dict[str, list] = {
        k: [] for k in ("features", "splits", "modes", "true", "false", "tleaf", "fleaf", "miss")
    }
    roots, leaf_targets, leaf_weights = [], [], []
    for tree in range(2 * n_out):
        target = tree % n_out
        base_node, base_leaf = len(node_attrs["features"]), len(leaf_targets)
        roots.append(base_node)
        for k in range(inner):
            node_attrs["features"].append(int(rng.integers(3)))
            node_attrs["splits"].append(float(rng.uniform(0, 1)))
            node_attrs["modes"].append(int(rng.integers(4)))
            node_attrs["miss"].append(int(rng.integers(2)))
            for child, ids, flags in ((2 * k + 1, "true", "tleaf"), (2 * k + 2, "false", "fleaf")):
                is_leaf = child >= inner
                node_attrs[ids].append(base_leaf + child - inner if is_leaf else base_node + child)
                node_attrs[flags].append(int(is_leaf))
        for _ in range(inner + 1):
            leaf_targets.append(target)
            leaf_weights.append(float(rng.normal()) / 2)
    node = helper.make_node(
        "TreeEnsemble",
        ["x"],
        ["y"],
        name="ensemble",
        domain="ai.onnx.ml",
        aggregate_function=aggregate,
        n_targets=n_out,
        post_transform=0,
        tree_roots=roots,
        nodes_featureids=node_attrs["features"],
        nodes_splits=numpy_helper.from_array(np.array(node_attrs["splits"], dtype)),
        nodes_modes=numpy_helper.from_array(np.array(node_attrs["modes"], np.uint8)),
        nodes_truenodeids=node_attrs["true"],
        nodes_trueleafs=node_attrs["tleaf"],
        nodes_falsenodeids=node_attrs["false"],
        nodes_falseleafs=node_attrs["fleaf"],
        nodes_missing_value_tracks_true=node_attrs["miss"],
        leaf_targetids=leaf_targets,
        leaf_weights=numpy_helper.from_array(np.array(leaf_weights, dtype)),
    )
    return make_ml_model([node], dtype=dtype, n_out=n_out, ml_opset=5, out_elem=ELEM[dtype])


def svm_regressor(
    dtype: str = "float32", *, kernel: str = "LINEAR", supports: int = 5, seed: int = 15
):
    """skl2onnx's SVR: SVMRegressor (+ a no-op Cast); ``supports=0`` is the linear mode."""
    rng = np.random.default_rng(seed)
    kwargs: dict = dict(
        kernel_type=kernel,
        kernel_params=[0.5, 0.0, 3.0],
        n_supports=supports,
        post_transform="NONE",
        rho=[0.25],
        coefficients=rng.normal(size=supports or 3).tolist(),
    )
    if supports:
        kwargs["support_vectors"] = rng.uniform(0, 1, size=3 * supports).tolist()
    nodes = [
        helper.make_node("SVMRegressor", ["x"], ["s"], name="svm", domain="ai.onnx.ml", **kwargs),
        helper.make_node("Cast", ["s"], ["y"], name="cast", to=TensorProto.FLOAT),
    ]
    return make_ml_model(nodes, dtype=dtype, n_out=1)


ML_FOLDABLE: dict[str, Callable[..., onnx.ModelProto]] = {
    "linear_regressor": linear_regressor,
    "linear_regressor_1": lambda dtype="float32": linear_regressor(dtype, n_out=1),
    "scaler_mlp": scaler_mlp,
    "trees_sum": tree_regressor,
    "trees_average": lambda dtype="float32": tree_regressor(dtype, aggregate="AVERAGE"),
    "trees_as_tensor": lambda dtype="float32": tree_regressor(dtype, as_tensor=True),
    "tree_ensemble_sum": tree_ensemble,
    "tree_ensemble_average": lambda dtype="float32": tree_ensemble(dtype, aggregate=0),
    "svm_linear_mode": lambda dtype="float32": svm_regressor(dtype, supports=0),
    "svm_linear_kernel": svm_regressor,
}
# onnxruntime has no float64 kernel for LinearRegressor and SVMRegressor.
FLOAT32_ONLY = frozenset(k for k in ML_FOLDABLE if k.startswith(("linear_regressor", "svm")))
EDGE_FOLDABLE: dict[str, Callable[..., onnx.ModelProto]] = {
    "squeeze_output": squeeze_output,
    "squeeze_output_opset11": lambda dtype="float32": squeeze_output(dtype, opset=11),
    "squeeze_unsqueeze_flatten": squeeze_unsqueeze_flatten,
    "torchscript_view": torchscript_view,
}


def interleaving_mlp(dtype: str = "float32", *, seed: int = 16) -> onnx.ModelProto:
    """skl2onnx's multi-output MLPRegressor: ... MatMul + Add ([N, 2]) → Reshape(-1, 1),
    which returns (2N, 1) with the targets interleaved, declared [N, 1]."""
    rng = np.random.default_rng(seed)
    inits = {
        "W1": weights(rng, 3, 4),
        "b1": rng.normal(size=4) * 0.1,
        "W2": weights(rng, 4, 2),
        "b2": rng.normal(size=2) * 0.1,
        "shape_tensor": np.array([-1, 1], dtype=np.int64),
    }
    nodes = [
        helper.make_node("Cast", ["x"], ["xc"], name="cast", to=ELEM[dtype]),
        helper.make_node("MatMul", ["xc", "W1"], ["m1"], name="mm1"),
        helper.make_node("Add", ["m1", "b1"], ["h"], name="add1"),
        helper.make_node("Tanh", ["h"], ["a"], name="tanh"),
        helper.make_node("MatMul", ["a", "W2"], ["m2"], name="mm2"),
        helper.make_node("Add", ["m2", "b2"], ["z"], name="add2"),
        helper.make_node("Reshape", ["z", "shape_tensor"], ["y"], name="Reshape"),
    ]
    return make_model(nodes, inits, dtype=dtype, n_out=1)


def declared_too_narrow(dtype: str = "float32") -> onnx.ModelProto:
    """skl2onnx's multi-output RandomForestRegressor: returns (N, 2), declares [N, 1]."""
    model = tree_regressor(dtype, n_out=2)
    model.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 1
    return model
