"""bake on the files real exporters write: the output width they really return, the
interleaving Reshape(-1, 1), opsets and domains, what was changed, and messages that name
the user's file (issue 16)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import helper
from onnx_models import (
    affines,
    declared_too_narrow,
    gemm_mlp,
    interleaving_mlp,
    make_ml_model,
    ops,
    raw_rows,
    run,
    tree_regressor,
)

from normexport import baking, onnxkit
from normexport.cli import main
from normexport.errors import GraphError, NormexportError


def factors_of(in_affine, out_affine):
    return np.vstack([np.column_stack(in_affine), np.column_stack(out_affine)])


def listing(directory):
    return sorted(p.name for p in directory.iterdir())


def save(model, path):
    onnx.save(model, str(path))
    return path


# ------------------------------------------------------------------------------ output width


@pytest.mark.parametrize("mode", ["splice", "fold"])
def test_declared_output_narrower_than_returned_is_repaired(tmp_path, mode):
    path = save(declared_too_narrow(), tmp_path / "rf.onnx")
    in_affine, out_affine = affines(3, 2)
    result = baking.bake(
        path, tmp_path / "b.onnx", factors=factors_of(in_affine, out_affine), mode=mode
    )
    assert result.report.ok and result.report.outputs == ["y0", "y1"]
    assert result.changes == [
        "output 'y': declared shape [N, 1] -> [batch, 2], the width it returns (2 values per row)"
    ]
    baked = onnx.load(str(tmp_path / "b.onnx"))
    assert onnx.helper.get_attribute_value  # the file is plain ONNX
    dims = baked.graph.output[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["N", 2]
    assert json.loads(onnxkit.read_metadata(baked)["normexport.changes"]) == result.changes
    X = raw_rows(in_affine, n=16).astype(np.float32)
    assert run(baked, X).shape == (16, 2)


def test_factors_for_the_declared_width_are_refused_with_the_real_one(tmp_path):
    path = save(declared_too_narrow(), tmp_path / "rf.onnx")
    with pytest.raises(
        NormexportError, match=r"4 rows, but the network has 3 inputs and 2 outputs"
    ):
        baking.bake(path, tmp_path / "b.onnx", factors=np.ones((4, 2)))
    assert listing(tmp_path) == ["rf.onnx"]


# ------------------------------------------------------------------------------ interleaving


@pytest.mark.parametrize("rows", [4, 5])  # factors for the declared width, or the real one
def test_interleaving_reshape_is_refused_naming_node_and_cause(tmp_path, rows):
    path = save(interleaving_mlp(), tmp_path / "mlp.onnx")
    with pytest.raises(GraphError) as info:
        baking.bake(path, tmp_path / "b.onnx", factors=np.ones((rows, 2)))
    message = str(info.value)
    assert message == (
        f"{path}: Reshape 'Reshape' returns 2 rows of one value per input row (shape [6, 1] "
        "for 3 rows): it interleaves the 2 outputs of each row into rows, so the file is "
        "wrong as exported (skl2onnx writes this for a multi-output MLPRegressor); bake "
        "--repair makes it Reshape(-1, 2)"
    )
    assert listing(tmp_path) == ["mlp.onnx"]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("mode", ["splice", "fold"])
def test_repair_regroups_and_is_proven_against_the_original_regrouped(tmp_path, dtype, mode):
    model = interleaving_mlp(dtype)
    path = save(model, tmp_path / "mlp.onnx")
    in_affine, out_affine = affines(3, 2, seed=2)
    result = baking.bake(
        path,
        tmp_path / "b.onnx",
        factors=factors_of(in_affine, out_affine),
        mode=mode,
        repair=True,
    )
    assert result.report.ok and result.report.dtype == dtype
    assert result.changes == [
        "Reshape 'Reshape': Reshape(-1, 1) -> Reshape(-1, 2), so each row's 2 outputs stay "
        "in its row (the original interleaved them into 2 rows)"
    ]
    if mode == "fold":
        assert (result.plan["input"], result.plan["output"]) == ("folded", "folded")
    baked = onnx.load(str(tmp_path / "b.onnx"))
    assert "shape_tensor" not in {t.name for t in baked.graph.initializer}  # left over: gone
    X = raw_rows(in_affine, n=8).astype(dtype)
    got = run(baked, X)
    Z = X * in_affine[0].astype(dtype) + in_affine[1].astype(dtype)
    want = run(model, Z).reshape(8, 2) * out_affine[0] + out_affine[1]
    assert got.shape == (8, 2)
    np.testing.assert_allclose(got, want, rtol=1e-5 if dtype == "float32" else 1e-12, atol=0)


def test_a_wrong_repair_is_caught_by_verification(tmp_path, monkeypatch):
    """The original's outputs are regrouped only for the comparison: a baked file that still
    returned the interleaved shape would fail, naming the file."""
    from normexport import onnx_affine

    def declare_only(model, n_out):  # a "repair" that forgets the Reshape
        return onnx_affine.declare_output(model, n_out), "nothing"

    monkeypatch.setattr(onnx_affine, "regroup_output", declare_only)
    path = save(interleaving_mlp(), tmp_path / "mlp.onnx")
    with pytest.raises(NormexportError) as info:
        baking.bake(path, tmp_path / "b.onnx", factors=np.ones((5, 2)), repair=True)
    message = str(info.value)
    assert message.startswith(f"{path}: the baked model: the ONNX checker refuses"), message
    assert ".tmp" not in message and "\n" not in message
    assert listing(tmp_path) == ["mlp.onnx"]


def test_only_the_original_is_regrouped_when_compared():
    shape = baking.ModelShape("x", "y", 3, 2, "float32", "float32", None)
    X = np.zeros((4, 3), np.float32)
    interleaved = np.arange(8, dtype=np.float32).reshape(8, 1)
    regrouped = baking._per_row(lambda X: interleaved, shape, "orig.onnx", regroup=True)
    np.testing.assert_array_equal(regrouped(X), interleaved.reshape(4, 2))
    strict = baking._per_row(lambda X: interleaved, shape, "baked.onnx")
    with pytest.raises(
        NormexportError, match=r"baked.onnx: returned shape \[8, 1\] for 4 rows; expected \[4, 2\]"
    ):
        strict(X)


def test_cli_repair(tmp_path, capsys):
    path = save(interleaving_mlp(), tmp_path / "mlp.onnx")
    np.savetxt(tmp_path / "f.txt", factors_of(*affines(3, 2)))
    args = ["bake", str(path), "--factors", str(tmp_path / "f.txt"), "--out"]
    assert main([*args, str(tmp_path / "a.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--repair makes it Reshape(-1, 2)" in err
    assert main([*args, str(tmp_path / "b.onnx"), "--repair", "--mode", "fold"]) == 0
    captured = capsys.readouterr()
    assert "changed: Reshape 'Reshape': Reshape(-1, 1) -> Reshape(-1, 2)" in captured.err
    assert "PASS" in captured.out


# ------------------------------------------------------------------------------ opsets


def _no_default_domain():
    """onnxmltools' XGBoost: one TreeEnsembleRegressor, only the ai.onnx.ml import."""
    return tree_regressor(n_out=1)


def test_file_without_default_domain_gets_the_import_its_new_nodes_need(tmp_path):
    model = make_ml_model(list(_no_default_domain().graph.node), n_out=1, opset=None, ml_opset=1)
    assert onnxkit.opset_of(model) == 0
    path = save(model, tmp_path / "xgb.onnx")
    factors = factors_of(*affines(3, 1))
    spliced = baking.bake(path, tmp_path / "s.onnx", factors=factors)
    assert spliced.report.ok
    assert spliced.changes == [
        "added the default-domain opset 9 import for the spliced affine (the file imported "
        "only ai.onnx.ml)"
    ]
    assert onnxkit.opset_of(onnx.load(str(tmp_path / "s.onnx"))) == 9
    folded = baking.bake(path, tmp_path / "f.onnx", factors=factors, mode="fold")
    assert folded.report.ok and folded.changes == []  # no new node: nothing to import
    assert onnxkit.opset_of(onnx.load(str(tmp_path / "f.onnx"))) == 0
    override = baking.bake(path, tmp_path / "o.onnx", factors=factors, opset=15)
    assert override.changes[0].startswith(
        "added the default-domain opset 15 import as --opset asks"
    )
    assert onnxkit.opset_of(onnx.load(str(tmp_path / "o.onnx"))) == 15


def test_old_opset_is_lifted_for_the_ops_it_uses(tmp_path):
    """onnxmltools' LightGBM: opset 8, a TreeEnsembleRegressor and an Identity."""
    trees = tree_regressor(n_out=1).graph.node[0]
    trees.output[0] = "t"
    nodes = [trees, helper.make_node("Identity", ["t"], ["y"], name="identity")]
    model = make_ml_model(nodes, n_out=1, opset=8, ml_opset=1)
    model.ir_version = 4
    path = save(model, tmp_path / "lgbm.onnx")
    result = baking.bake(path, tmp_path / "b.onnx", factors=factors_of(*affines(3, 1)))
    assert result.report.ok
    assert result.changes == [
        "opset 8 -> 9 for the spliced affine (the ops it uses are the same: Identity)"
    ]
    baked = onnx.load(str(tmp_path / "b.onnx"))
    assert onnxkit.opset_of(baked) == 9 and ops(baked)[0] == "BatchNormalization"
    folded = baking.bake(path, tmp_path / "f.onnx", factors=factors_of(*affines(3, 1)), mode="fold")
    assert folded.changes == [] and onnxkit.opset_of(onnx.load(str(tmp_path / "f.onnx"))) == 8


def test_old_opset_whose_ops_changed_is_converted(tmp_path):
    model = gemm_mlp(opset=8)
    path = save(model, tmp_path / "m.onnx")
    in_affine, out_affine = affines(3, 2)
    result = baking.bake(path, tmp_path / "b.onnx", factors=factors_of(in_affine, out_affine))
    assert result.report.ok
    assert result.changes == [
        "opset 8 -> 9 for the spliced affine (onnx.version_converter: Gemm changed between them)"
    ]
    assert onnxkit.opset_of(onnx.load(str(tmp_path / "b.onnx"))) == 9


def test_opset_override_converts_up_and_down(tmp_path):
    path = save(gemm_mlp(opset=15), tmp_path / "m.onnx")
    factors = factors_of(*affines(3, 2))
    up = baking.bake(path, tmp_path / "up.onnx", factors=factors, opset=17)
    assert up.changes == [
        "opset 15 -> 17 as --opset asks (the ops it uses are the same: Gemm, Tanh)"
    ]
    down = baking.bake(path, tmp_path / "down.onnx", factors=factors, opset=13)
    assert down.changes == ["opset 15 -> 13 (onnx.version_converter, as --opset asks)"]
    assert onnxkit.opset_of(onnx.load(str(tmp_path / "down.onnx"))) == 13


# ------------------------------------------------------------------------------ verification rows


def test_verification_includes_rows_at_the_tree_splits(tmp_path):
    model = tree_regressor()
    path = save(model, tmp_path / "t.onnx")
    splits = len(onnx_affine_splits(model))
    result = baking.bake(path, tmp_path / "b.onnx", factors=factors_of(*affines(3, 2)), mode="fold")
    assert result.report.ok
    assert result.report.data_rows > 1024 + splits  # the random rows, plus rows at each split


def onnx_affine_splits(model):
    from normexport import onnx_affine

    return onnx_affine.tree_splits(model)


# ------------------------------------------------------------------------------ messages


def test_errors_about_the_staged_file_name_the_users_file(tmp_path, monkeypatch):
    staged = []

    def failing_check(path, *, label=None):
        staged.append(str(path))
        raise GraphError(f"{path}: the ONNX checker refuses the file: node 3 of {path} is bad")

    monkeypatch.setattr(onnxkit, "check", failing_check)
    path = save(gemm_mlp(), tmp_path / "m.onnx")
    with pytest.raises(GraphError) as info:
        baking.bake(path, tmp_path / "b.onnx", factors=factors_of(*affines(3, 2)))
    message = str(info.value)
    assert staged and staged[0] not in message and ".tmp" not in message
    assert message == (
        f"{path} (baked): the ONNX checker refuses the file: node 3 of {path} (baked) is bad"
    )
    assert listing(tmp_path) == ["m.onnx"]
