"""Fold for the patterns real exporters write: ai.onnx.ml layers, Squeeze/Unsqueeze and
TorchScript's view(batch, -1) at the edges, MatMul without a bias (issue 16)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from onnx_models import (
    EDGE_FOLDABLE,
    FLOAT32_ONLY,
    ML_FOLDABLE,
    RTOL,
    affines,
    expected,
    ops,
    range_error,
    raw_rows,
    run,
    svm_regressor,
    torchscript_view,
    tree_ensemble,
    tree_regressor,
)

from normexport import baking, onnx_affine

PATTERNS = {**ML_FOLDABLE, **EDGE_FOLDABLE}
CASES = [
    (name, dtype)
    for name in sorted(PATTERNS)
    for dtype in ("float32", "float64")
    if not (dtype == "float64" and name in FLOAT32_ONLY)
]


def widths(model):
    io = onnx_affine.interface(model)
    dims = onnx_affine.tensor_dims(onnx_affine.typed_output(model, io.output))
    return io.input.type.tensor_type.shape.dim[1].dim_value, 1 if len(dims) == 1 else dims[1]


def tolerance(model):
    """float32's wherever the model computes in float32: ai.onnx.ml regressors and the
    Scaler write FLOAT whatever they read."""
    return RTOL[baking.describe(Path("m.onnx"), model).dtype]


def check_equivalent(model, baked, in_affine, out_affine, dtype, n=256):
    X = raw_rows(in_affine, n=n)
    got = run(baked, X.astype(dtype))
    want = expected(model, X, in_affine, out_affine, dtype)
    assert got.shape == want.shape and got.dtype == want.dtype
    error = range_error(got, want, out_affine)
    assert error <= tolerance(model), error
    return error


@pytest.mark.parametrize(("name", "dtype"), CASES)
def test_both_sides_fold_and_add_no_op(name, dtype):
    model = PATTERNS[name](dtype)
    in_affine, out_affine = affines(*widths(model), seed=1)
    changes: list[str] = []
    folded, plan = onnx_affine.fold(model, in_affine, out_affine, changes=changes)
    assert (plan.input, plan.output) == ("folded", "folded"), plan
    assert ops(folded) == ops(model)  # constants and attributes change, never the ops
    assert len(folded.graph.initializer) == len(model.graph.initializer)
    onnx.checker.check_model(folded, full_check=True)
    check_equivalent(model, folded, in_affine, out_affine, dtype)
    spliced = onnx_affine.splice(model, in_affine, out_affine)
    check_equivalent(model, spliced, in_affine, out_affine, dtype)


@pytest.mark.parametrize(("name", "dtype"), CASES)
def test_bake_verifies_each_pattern(tmp_path, name, dtype):
    model = PATTERNS[name](dtype)
    onnx.save(model, tmp_path / "m.onnx")
    in_affine, out_affine = affines(*widths(model), seed=2)
    factors = np.vstack([np.column_stack(in_affine), np.column_stack(out_affine)])
    for mode in ("splice", "fold"):
        result = baking.bake(
            tmp_path / "m.onnx", tmp_path / f"{mode}.onnx", factors=factors, mode=mode
        )
        assert result.report.ok
        assert result.report.rtol == tolerance(model)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_matmul_without_bias_becomes_a_gemm_with_one(dtype):
    """TorchScript's Linear(bias=False) (and Keras use_bias=False): a MatMul with no Add."""
    model = torchscript_view(dtype, bias=False)
    in_affine, out_affine = affines(3, 2, seed=3)
    changes: list[str] = []
    folded, plan = onnx_affine.fold(model, in_affine, out_affine, changes=changes)
    assert (plan.input, plan.output) == ("folded", "folded")
    assert ops(model).count("MatMul") == 2
    assert ops(folded) == [op if op != "MatMul" else "Gemm" for op in ops(model)]
    assert changes == [
        "MatMul 'l1/MatMul' is now a Gemm, whose bias C carries the folded shift",
        "MatMul 'l2/MatMul' is now a Gemm, whose bias C carries the folded shift",
    ]
    onnx.checker.check_model(folded, full_check=True)
    check_equivalent(model, folded, in_affine, out_affine, dtype)
    # A zero shift needs no bias: the MatMuls stay.
    zero_in, zero_out = (in_affine[0], np.zeros(3)), (out_affine[0], np.zeros(2))
    kept, _ = onnx_affine.fold(model, zero_in, zero_out)
    assert ops(kept) == ops(model)


def test_fold_writes_the_folded_attributes():
    """LinearRegressor: coefficients [target][feature] and intercepts, folded in float64."""
    model = ML_FOLDABLE["linear_regressor"]()
    (s, t), (so, to) = affines(3, 2, seed=4)
    folded, _ = onnx_affine.fold(model, (s, t), (so, to))
    attrs = {a.name: helper.get_attribute_value(a) for a in model.graph.node[0].attribute}
    W = np.array(attrs["coefficients"], np.float64).reshape(2, 3).T
    b = np.array(attrs["intercepts"], np.float64)
    new = {a.name: helper.get_attribute_value(a) for a in folded.graph.node[0].attribute}
    np.testing.assert_array_equal(
        np.float32(new["coefficients"]), (s[:, None] * W * so).T.reshape(-1).astype(np.float32)
    )
    np.testing.assert_array_equal(
        np.float32(new["intercepts"]), ((b + t @ W) * so + to).astype(np.float32)
    )


def test_linear_svm_collapses_into_the_linear_mode():
    model = svm_regressor(supports=5)
    in_affine, out_affine = affines(3, 1, seed=5)
    changes: list[str] = []
    folded, plan = onnx_affine.fold(model, in_affine, out_affine, changes=changes)
    attrs = {a.name: helper.get_attribute_value(a) for a in folded.graph.node[0].attribute}
    assert attrs["n_supports"] == 0 and "support_vectors" not in attrs
    assert len(attrs["coefficients"]) == 3
    assert changes == [
        "SVMRegressor 'svm': its linear kernel's 5 support vectors are summed into 3 "
        "coefficients (n_supports 0, the op's linear mode)"
    ]
    check_equivalent(model, folded, in_affine, out_affine, "float32")


def _tree_attrs(node):
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


@pytest.mark.parametrize("aggregate", ["MIN", "MAX"])
def test_min_max_trees_swap_their_aggregate_for_negative_scales(aggregate):
    model = tree_regressor(aggregate=aggregate)
    in_affine = affines(3, 2, seed=6)[0]
    out_affine = (np.array([-2.0, -0.5]), np.array([1.0, -3.0]))
    folded, plan = onnx_affine.fold(model, in_affine, out_affine)
    assert plan.output == "folded"
    flipped = "MAX" if aggregate == "MIN" else "MIN"
    assert _tree_attrs(folded.graph.node[0])["aggregate_function"] == flipped.encode()
    check_equivalent(model, folded, in_affine, out_affine, "float32")
    mixed = (np.array([-2.0, 0.5]), np.array([1.0, -3.0]))
    plan = onnx_affine.plan_fold(model, in_affine, mixed)
    assert plan.output == "spliced"
    assert plan.output_reason == (
        f"TreeEnsembleRegressor 'trees' aggregates with {aggregate} over all targets, and "
        "the scales have both signs (a negative scale turns MIN into MAX)"
    )


def test_negative_input_scales_flip_the_split_modes():
    model = tree_regressor(modes=["BRANCH_LEQ", "BRANCH_LT"])
    in_affine = (np.array([-1.5, 2.0, -0.25]), np.array([0.5, -1.0, 2.0]))
    out_affine = affines(3, 2)[1]
    folded, _ = onnx_affine.fold(model, in_affine, out_affine)
    before, after = _tree_attrs(model.graph.node[0]), _tree_attrs(folded.graph.node[0])
    flip = {b"BRANCH_LEQ": b"BRANCH_GTE", b"BRANCH_LT": b"BRANCH_GT", b"LEAF": b"LEAF"}
    for feature, old, new in zip(
        before["nodes_featureids"], before["nodes_modes"], after["nodes_modes"], strict=True
    ):
        assert new == (flip[old] if in_affine[0][feature] < 0 else old)
    assert after["nodes_missing_value_tracks_true"] == before["nodes_missing_value_tracks_true"]
    check_equivalent(model, folded, in_affine, out_affine, "float32")


def test_float64_data_gets_double_thresholds():
    """A float64 row's boundary float needs a double threshold: nodes_values_as_tensor,
    which needs ai.onnx.ml 3."""
    model = tree_regressor("float64")
    assert [o.version for o in model.opset_import if o.domain == "ai.onnx.ml"] == [1]
    changes: list[str] = []
    folded, _ = onnx_affine.fold(model, *affines(3, 2), changes=changes)
    attrs = _tree_attrs(folded.graph.node[0])
    assert "nodes_values" not in attrs
    assert attrs["nodes_values_as_tensor"].data_type == onnx.TensorProto.DOUBLE
    assert [o.version for o in folded.opset_import if o.domain == "ai.onnx.ml"] == [3]
    assert changes == [
        "ai.onnx.ml opset 1 -> 3 for the double thresholds of TreeEnsembleRegressor 'trees'"
    ]


def test_tree_ensemble_takes_the_shift_in_one_tree_per_target():
    model = tree_ensemble(aggregate=1)
    in_affine, out_affine = affines(3, 2, seed=7)
    folded, plan = onnx_affine.fold(model, in_affine, out_affine)
    assert plan.output == "folded"
    check_equivalent(model, folded, in_affine, out_affine, "float32")


# ------------------------------------------------------------------------------ fallbacks


def _unscored_tree():
    """Target 1 has a weight in only some leaves: rows reaching others get 0, not the base."""
    model = tree_regressor(n_out=2, trees=1, depth=1)
    node = model.graph.node[0]
    attrs = _tree_attrs(node)
    keep = [
        i
        for i, (leaf, target) in enumerate(
            zip(attrs["target_nodeids"], attrs["target_ids"], strict=True)
        )
        if not (target == 1 and leaf == 2)
    ]
    for key in ("target_treeids", "target_nodeids", "target_ids", "target_weights"):
        values = [attrs[key][i] for i in keep]
        for a in node.attribute:
            if a.name == key:
                a.CopyFrom(helper.make_attribute(key, values))
    onnx.checker.check_model(model, full_check=True)
    return model


FALLBACKS = {
    "svm_rbf": (
        lambda: svm_regressor(kernel="RBF"),
        "SVMRegressor 'svm' has a non-linear kernel (RBF), which a per-column affine cannot enter",
        None,
    ),
    "tree_eq_split": (
        lambda: tree_regressor(modes=["BRANCH_EQ", "BRANCH_LEQ"]),
        "TreeEnsembleRegressor 'trees' has BRANCH_EQ splits, which a per-column affine cannot "
        "move exactly (only <=, <, >=, > splits can)",
        None,
    ),
    "tree_unscored_target": (
        _unscored_tree,
        None,
        "TreeEnsembleRegressor 'trees': no tree has a weight for target 1 in every leaf, and "
        "rows that reach none get 0 instead of the base value, so its shift has nowhere to go",
    ),
}


@pytest.mark.parametrize("name", sorted(FALLBACKS))
def test_what_cannot_fold_is_spliced_with_its_reason(name):
    build, in_reason, out_reason = FALLBACKS[name]
    model = build()
    in_affine, out_affine = affines(*widths(model), seed=8)
    folded, plan = onnx_affine.fold(model, in_affine, out_affine)
    assert plan.input_reason == (in_reason or "") and plan.output_reason == (out_reason or "")
    assert plan.input == ("spliced" if in_reason else "folded")
    assert plan.output == ("spliced" if out_reason else "folded")
    spliced_ops = ["BatchNormalization"] if in_reason else []
    assert ops(folded) == spliced_ops + ops(model) + (["BatchNormalization"] if out_reason else [])
    check_equivalent(model, folded, in_affine, out_affine, "float32")


def test_unscored_target_folds_when_its_shift_is_zero():
    model = _unscored_tree()
    in_affine, (so, to) = affines(3, 2, seed=9)
    to = np.array([to[0], 0.0])
    folded, plan = onnx_affine.fold(model, in_affine, (so, to))
    assert plan.output == "folded"
    check_equivalent(model, folded, in_affine, (so, to), "float32")


def test_view_whose_batch_comes_from_another_tensor_is_not_a_no_op():
    model = torchscript_view()
    rng = np.random.default_rng(0)
    model.graph.initializer.append(numpy_helper.from_array(rng.normal(size=(4, 3)), "other"))
    for node in model.graph.node:
        if node.name == "view_in/Shape":
            node.input[0] = "other"
    plan = onnx_affine.plan_fold(model, *affines(3, 2))
    assert (plan.input, plan.output) == ("spliced", "folded")
    assert plan.input_reason == "Reshape 'view_in/Reshape' takes its batch size from another tensor"


def test_squeeze_of_several_columns_is_not_passed_through():
    model = torchscript_view()
    node = next(n for n in model.graph.node if n.name == "view_out/Reshape")
    node.op_type, node.input[1] = "Unsqueeze", "view_out_axes"  # [N, 2] -> [N, 1, 2]
    del node.attribute[:]
    index = onnx_affine._Index(model)
    problem = onnx_affine._edge_problem(index, node, 2, output_side=True)
    assert (
        problem
        == "Unsqueeze 'view_out/Reshape' changes the layout of 2 columns; only one passes through it"
    )
