"""Transforms in ONNX (core): bake splices Log/Exp/Asinh/Sinh nodes, splice and fold, both
dtypes, against a NumPy float64 truth, in onnxruntime."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from onnx_models import RTOL, gemm_mlp, ops, run

import normexport as nx
from normexport import passes
from normexport.errors import FormatError
from normexport.onnx_transforms import transform_nodes
from normexport.scaling import scalers_to_dict

TRUTH = {"log": np.log, "log1p": np.log1p, "asinh": np.arcsinh}
INVERSE = {"log": np.exp, "log1p": np.expm1, "asinh": np.sinh}
IN_COLUMNS, OUT_COLUMNS = ["a", "b", "c"], ["u", "v", "w"]


def raw_columns(name: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """Values in the transform's domain over several decades (both signs for asinh)."""
    magnitude = 10.0 ** rng.uniform(-2, 3, n)
    if name == "asinh":
        return magnitude * rng.choice([-1.0, 1.0], n)
    if name == "log1p":
        return magnitude - 0.5 * (magnitude < 0.5)  # a few values in (-1, 0)
    return magnitude


def scalers_for(name: str, in_cols: list[str], out_cols: list[str], seed: int = 0):
    rng = np.random.default_rng(seed)
    X = np.column_stack([raw_columns(name, 300, rng) for _ in IN_COLUMNS])
    Y = np.column_stack([raw_columns(name, 300, rng) for _ in OUT_COLUMNS])
    in_sc = nx.MinMaxScaler(transform=dict.fromkeys(in_cols, name)).fit(X, columns=IN_COLUMNS)
    out_sc = nx.StandardScaler(transform=dict.fromkeys(out_cols, name)).fit(
        Y, columns=OUT_COLUMNS, target=True
    )
    return in_sc, out_sc, X


def numpy_truth(model: onnx.ModelProto, in_sc, out_sc, X: np.ndarray) -> np.ndarray:
    """The plain Gemm-Tanh-Gemm in float64, between the scalers' NumPy maps."""
    w = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    Z = in_sc.transform(X.astype(np.float64))
    Yn = np.tanh(Z @ w["W1"] + w["b1"]) @ w["W2"] + w["b2"]
    return out_sc.inverse_transform(Yn)


def tolerance(out_sc, Y: np.ndarray, dtype: str) -> np.ndarray:
    """Per output, range-relative: the dtype's tolerance, times how much the inverse
    transform stretches a normalized error (|dy/dy_norm| = |y|·inverse_scale for exp,
    cosh ≈ |y| for sinh, relative to the output's span)."""
    stretch = np.abs(Y).max(axis=0) * np.abs(out_sc.inverse_affine()[0]) / out_sc.span()
    kinds = out_sc.transforms_
    stretch = np.array([s if k else 1.0 for s, k in zip(stretch, kinds, strict=True)])
    return RTOL[dtype] * np.maximum(1.0, stretch)


CASES = {  # (transformed inputs, transformed outputs): runs with and without Slice
    "mixed": (["b"], ["u", "w"]),
    "all": (IN_COLUMNS, OUT_COLUMNS),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("mode", ["splice", "fold"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", sorted(TRUTH))
def test_baked_transforms_match_numpy_truth(tmp_path, name, dtype, mode, case):
    in_cols, out_cols = CASES[case]
    in_sc, out_sc, X = scalers_for(name, in_cols, out_cols)
    model = gemm_mlp(dtype, n_in=3, n_out=3)
    onnx.save(model, tmp_path / "net.onnx")
    result = nx.bake(
        tmp_path / "net.onnx",
        tmp_path / "baked.onnx",
        scalers=scalers_to_dict(in_sc, out_sc, dtype),
        mode=mode,
    )
    baked = onnx.load(tmp_path / "baked.onnx")
    onnx.checker.check_model(baked, full_check=True)
    kinds = [n.op_type for n in baked.graph.node]
    if dtype == "float32" or name != "asinh":
        expected_op = {"log": "Log", "log1p": "Log", "asinh": "Asinh"}[name]
        assert expected_op in kinds
    if mode == "fold":
        assert "BatchNormalization" not in kinds  # the affine folded, the transforms stay
        plan = json.loads(next(p.value for p in baked.metadata_props if p.key == "normexport.fold"))
        assert plan["input"] == plan["output"] == "folded"
        assert plan["output_transforms"] == ", ".join(f"{name}({c})" for c in out_cols)
    assert ("Slice" in kinds) == (case == "mixed")
    truth = numpy_truth(model, in_sc, out_sc, X)
    got = run(baked, X.astype(dtype)).astype(np.float64)
    error = np.max(np.abs(got - truth), axis=0) / out_sc.span()
    assert np.all(error <= tolerance(out_sc, truth, dtype)), error
    assert result.report is None or result.report.ok


@pytest.mark.parametrize(
    ("op", "truth", "bound"), [("asinh", np.arcsinh, None), ("sinh", np.sinh, 700.0)]
)
def test_double_rewrites_of_asinh_and_sinh(op, truth, bound):
    """float64 Asinh/Sinh become basic ops (onnxruntime has no double kernel), checked
    from 1e-300 to 1e300 (sinh up to 700, where exp still fits) against NumPy."""
    x = np.concatenate([[0.0, -0.0, 1e-300, 1.0, -1.0], np.geomspace(1e-12, 1e300, 400)])
    x = np.concatenate([x, -x]).reshape(-1, 1)
    values = x if bound is None else np.clip(x, -bound, bound)
    model = _one_op_model(op, "float64")
    assert {"Asinh", "Sinh"} & set(ops(model))
    rewritten = passes.expand_double_ops(model)
    assert not {"Asinh", "Sinh"} & set(ops(rewritten))
    got = run(rewritten, values)
    # relative to each value, 4 ulps; near zero log(a + sqrt(a^2 + 1)) and e - 1/e lose
    # the leading digits of a small value: absolute 3e-16, which is the dtype's rounding
    # of a normalized value (range-relative, what verification measures)
    np.testing.assert_allclose(got, truth(values), rtol=1e-15, atol=3e-16)


def _one_op_model(op: str, dtype: str) -> onnx.ModelProto:
    from normexport.onnx_affine import _Names

    elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    graph = onnx.helper.make_graph(
        [],
        "t",
        [onnx.helper.make_tensor_value_info("input", elem, ["batch", 1])],
        [onnx.helper.make_tensor_value_info("output", elem, ["batch", 1])],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)])
    nodes, inits = transform_nodes("in", "input", "output", (op,), elem, _Names(model))
    model.graph.node.extend(nodes)
    model.graph.initializer.extend(inits)
    return model


def test_transform_nodes_are_named_by_side_op_and_run():
    model = _one_op_model("log", "float32")
    assert [n.name for n in model.graph.node] == ["normexport_in_log0"]
    from normexport.onnx_affine import _Names

    elem = onnx.TensorProto.FLOAT
    nodes, inits = transform_nodes(
        "out", "y", "z", (None, "expm1", "expm1", "sinh"), elem, _Names(model)
    )
    assert [(n.op_type, n.name) for n in nodes] == [
        ("Slice", "normexport_out_slice0"),
        ("Slice", "normexport_out_slice1"),
        ("Exp", "normexport_out_expm11_exp"),
        ("Sub", "normexport_out_expm11"),
        ("Slice", "normexport_out_slice2"),
        ("Sinh", "normexport_out_sinh2"),
        ("Concat", "normexport_out_concat"),
    ]
    assert "normexport_out_expm11_one" in {t.name for t in inits}


def test_factors_refuse_a_transform_column(tmp_path):
    (tmp_path / "factors.txt").write_text("0.5 0.0 log\n1.0 0.0\n")
    model = gemm_mlp(n_in=1, n_out=1)
    onnx.save(model, tmp_path / "net.onnx")
    with pytest.raises(FormatError, match="affine only.*--scalers"):
        nx.bake(tmp_path / "net.onnx", tmp_path / "out.onnx", factors=tmp_path / "factors.txt")
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize("mode", ["splice", "fold"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_tree_ensemble_with_a_log_input_bakes_and_verifies(tmp_path, dtype, mode):
    """bake's check puts rows at every split of a tree; for a log column the split is a
    transformed value, and the row holds its raw value (exp of it): the baked file and
    the original on NumPy-normalized rows must take the same branches."""
    from onnx_models import tree_ensemble

    rng = np.random.default_rng(0)
    X = np.column_stack(
        [10.0 ** rng.uniform(-2, 3, 300), rng.uniform(-1, 1, 300), rng.uniform(0, 5, 300)]
    )
    in_sc = nx.MinMaxScaler(transform={"x0": "log"}).fit(X)
    out_sc = nx.MinMaxScaler(transform={"y0": "log"}).fit(
        rng.uniform(1, 100, (300, 2)), columns=["y0", "y1"], target=True
    )
    onnx.save(tree_ensemble(dtype), tmp_path / "trees.onnx")
    result = nx.bake(
        tmp_path / "trees.onnx",
        tmp_path / "baked.onnx",
        scalers=scalers_to_dict(in_sc, out_sc, dtype),
        mode=mode,
    )
    assert result.report is not None and result.report.ok
    assert "Log" in ops(onnx.load(tmp_path / "baked.onnx"))


def test_split_rows_of_a_log_column_sit_at_its_splits():
    """The rows bake checks a tree with are raw values: for a log column, exp of the
    transformed split, so that normalizing them lands on every split of that column."""
    from onnx_models import tree_ensemble

    from normexport import baking, onnx_affine

    model = tree_ensemble("float64")
    rng = np.random.default_rng(0)
    X = np.column_stack(
        [10.0 ** rng.uniform(-2, 3, 300), rng.uniform(-1, 1, 300), rng.uniform(0, 5, 300)]
    )
    in_sc = nx.MinMaxScaler(transform={"x0": "log"}).fit(X)
    rows = baking._split_rows(model, in_sc, "float64")
    normalized = in_sc.transform(rows)[:, 0]
    for feature, threshold in onnx_affine.tree_splits(model):
        if feature == 0:
            assert np.min(np.abs(normalized - threshold)) <= 1e-12 * max(1.0, abs(threshold))
