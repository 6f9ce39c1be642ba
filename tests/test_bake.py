"""normexport bake: any ONNX regression model + factors/scalers -> raw-in/raw-out file."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx_models import (
    FOLDABLE,
    RTOL,
    affines,
    edge_mlp,
    expected,
    gemm_mlp,
    make_model,
    matmul_add_mlp,
    ops,
    range_error,
    raw_rows,
    run,
    weights,
)

import normexport as nx
from normexport import baking, onnxkit
from normexport.errors import (
    DataError,
    FormatError,
    GraphError,
    NormexportError,
    VerificationError,
)
from normexport.scaling import scalers_from_dict, scalers_to_dict

NEWEST = onnx.defs.onnx_opset_version()


def factors_of(in_affine, out_affine):
    """Side-file rows: (scale, shift) normalizing each input, then de-normalizing each output."""
    return np.vstack([np.column_stack(in_affine), np.column_stack(out_affine)])


def save(model, path, **kwargs):
    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # save_as_external_data moves the weights out of the proto it saves
    onnx.save_model(copy, str(path), **kwargs)
    return path


@pytest.fixture
def mlp_file(tmp_path):
    """A float32 Gemm MLP on disk with its factors side file."""
    model = gemm_mlp(trans_b=1)
    in_affine, out_affine = affines(3, 2)
    np.savetxt(tmp_path / "factors.txt", factors_of(in_affine, out_affine))
    return save(model, tmp_path / "model.onnx"), tmp_path / "factors.txt", in_affine, out_affine


def check_baked(path, original, in_affine, out_affine, dtype):
    onnx.checker.check_model(str(path), full_check=True)
    X = raw_rows(in_affine, n=32)
    got = run(str(path), X.astype(dtype))
    want = expected(original, X, in_affine, out_affine, dtype)
    assert range_error(got, want, out_affine) <= RTOL[dtype]


def listing(directory):
    return sorted(p.name for p in directory.iterdir())


# ------------------------------------------------------------------------------ the happy path


@pytest.mark.parametrize("mode", ["splice", "fold"])
def test_bake_writes_a_verified_raw_in_raw_out_file(tmp_path, mlp_file, mode):
    model_path, factors, in_affine, out_affine = mlp_file
    before = model_path.read_bytes()
    out = tmp_path / "baked.onnx"
    result = baking.bake(model_path, out, factors=factors, mode=mode)
    assert model_path.read_bytes() == before
    assert result.path == out and result.written == [out]
    assert result.report is not None and result.report.ok
    assert result.report.runtimes == ["baked", "original+numpy"]
    assert result.report.rows == result.report.data_rows + result.report.edge_rows
    baked = onnx.load(str(out))
    original = onnx.load(str(model_path))
    assert ops(baked) == (
        ops(original)
        if mode == "fold"
        else ["BatchNormalization", *ops(original), "BatchNormalization"]
    )
    assert [i.name for i in baked.graph.input] == ["x"]
    assert [o.name for o in baked.graph.output] == ["y"]
    check_baked(out, original, in_affine, out_affine, "float32")
    # The temporary staging directory is gone.
    assert listing(tmp_path) == ["baked.onnx", "factors.txt", "model.onnx"]


def test_metadata_carries_version_mode_scalers_and_plan(tmp_path, mlp_file):
    model_path, factors, in_affine, out_affine = mlp_file
    result = baking.bake(model_path, tmp_path / "b.onnx", factors=factors, mode="fold")
    meta = onnxkit.read_metadata(onnx.load(str(tmp_path / "b.onnx")))
    assert meta["normexport.version"] == nx.__version__
    assert meta["normexport.mode"] == "fold"
    assert json.loads(meta["normexport.fold"]) == result.plan
    assert result.plan == {
        "input": "folded",
        "output": "folded",
        "input_node": "Gemm 'fc1'",
        "output_node": "Gemm 'fc2'",
    }
    in_sc, out_sc, dtype = scalers_from_dict(json.loads(meta["normexport.scalers"]))
    assert dtype == "float32" and in_sc.columns_ == ["x0", "x1", "x2"]
    np.testing.assert_array_equal(in_sc.affine()[0], in_affine[0])
    np.testing.assert_array_equal(out_sc.inverse_affine()[1], out_affine[1])


@pytest.mark.parametrize("opset", range(13, NEWEST + 1))
def test_every_opset_both_dtypes_both_modes(tmp_path, opset):
    for dtype in ("float32", "float64"):
        model = edge_mlp(dtype, opset=opset)
        in_affine, out_affine = affines(3, 2, seed=opset)
        path = save(model, tmp_path / f"m{dtype}.onnx")
        for mode in ("splice", "fold"):
            out = tmp_path / f"{dtype}-{mode}.onnx"
            result = baking.bake(path, out, factors=factors_of(in_affine, out_affine), mode=mode)
            assert result.report.ok and result.report.dtype == dtype
            assert result.report.rtol == RTOL[dtype]
            baked = onnx.load(str(out))
            assert baked.opset_import[0].version == opset
            assert len(ops(baked)) == len(ops(model)) + (2 if mode == "splice" else 0)
            check_baked(out, model, in_affine, out_affine, dtype)


@pytest.mark.parametrize("name", sorted(FOLDABLE))
def test_every_fold_pattern_bakes_and_verifies(tmp_path, name):
    model = FOLDABLE[name]("float64")
    path = save(model, tmp_path / "m.onnx")
    n_out = 1 if name == "rank1_output" else 2
    in_affine, out_affine = affines(3, n_out)
    for mode in ("splice", "fold"):
        result = baking.bake(
            path, tmp_path / f"{mode}.onnx", factors=factors_of(in_affine, out_affine), mode=mode
        )
        assert result.report.ok
        if mode == "fold":
            assert (result.plan["input"], result.plan["output"]) == ("folded", "folded")
            assert ops(onnx.load(str(tmp_path / "fold.onnx"))) == ops(model)


def test_opset_conversion(tmp_path):
    model = matmul_add_mlp(opset=13)
    path = save(model, tmp_path / "m.onnx")
    in_affine, out_affine = affines(3, 2)
    baking.bake(path, tmp_path / "b.onnx", factors=factors_of(in_affine, out_affine), opset=NEWEST)
    assert onnx.load(str(tmp_path / "b.onnx")).opset_import[0].version == NEWEST


def test_foreign_domain_op_at_the_edge_is_spliced(tmp_path):
    """An ai.onnx.ml op that is not per column (here a row-wise Normalizer) stays as it is."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node(
            "Normalizer", ["x"], ["xs"], name="normalizer", domain="ai.onnx.ml", norm="L2"
        ),
        helper.make_node("MatMul", ["xs", "W"], ["m"], name="mm"),
        helper.make_node("Add", ["m", "b"], ["y"], name="bias"),
    ]
    graph = helper.make_graph(
        nodes,
        "skl",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
        [
            numpy_helper.from_array(weights(rng, 3, 2).astype(np.float32), "W"),
            numpy_helper.from_array(np.float32([0.5, -0.5]), "b"),
        ],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 3)]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=8)
    path = save(model, tmp_path / "m.onnx")
    in_affine, out_affine = affines(3, 2)
    with pytest.warns(UserWarning, match="input affine spliced"):
        result = baking.bake(
            path, tmp_path / "b.onnx", factors=factors_of(in_affine, out_affine), mode="fold"
        )
    assert result.plan["input_reason"] == (
        "the input 'x' goes to Normalizer 'normalizer' (domain ai.onnx.ml), not a dense layer"
    )
    assert result.plan["output"] == "folded" and result.report.ok
    check_baked(tmp_path / "b.onnx", model, in_affine, out_affine, "float32")


def test_fold_fallback_is_said_not_silent(tmp_path):
    model = gemm_mlp(last_activation="Sigmoid")
    path = save(model, tmp_path / "m.onnx")
    in_affine, out_affine = affines(3, 2)
    with pytest.warns(UserWarning, match="output affine spliced, not folded: an activation"):
        result = baking.bake(
            path, tmp_path / "b.onnx", factors=factors_of(in_affine, out_affine), mode="fold"
        )
    assert result.plan["output"] == "spliced"
    assert "Sigmoid 'act2'" in result.plan["output_reason"]
    assert any("output affine spliced" in note for note in result.notes)
    assert ops(onnx.load(str(tmp_path / "b.onnx"))) == [*ops(model), "BatchNormalization"]


# ------------------------------------------------------------------------------ sources


def test_scalers_file_dict_npy_and_array_give_the_same_file(tmp_path, problem_scalers):
    in_sc, out_sc = problem_scalers
    model_path = save(gemm_mlp(), tmp_path / "m.onnx")
    doc = scalers_to_dict(in_sc, out_sc, "float64")
    (tmp_path / "scalers.json").write_text(json.dumps(doc))
    factors = factors_of(in_sc.affine(), out_sc.inverse_affine())
    np.save(tmp_path / "f.npy", factors)
    sources = {
        "json": {"scalers": tmp_path / "scalers.json"},
        "dict": {"scalers": doc},
        "npy": {"factors": tmp_path / "f.npy"},
        "array": {"factors": factors},
    }
    graphs = {}
    for name, source in sources.items():
        baking.bake(model_path, tmp_path / f"{name}.onnx", **source, mode="fold")
        baked = onnx.load(str(tmp_path / f"{name}.onnx"))
        graphs[name] = baked.graph.SerializeToString()
        meta = json.loads(onnxkit.read_metadata(baked)["normexport.scalers"])
        assert meta["dtype"] == "float32"  # re-stamped with the model's dtype
        if name in ("json", "dict"):
            assert meta["inputs"]["columns"] == in_sc.columns_
    assert len(set(graphs.values())) == 1


@pytest.fixture
def problem_scalers():
    rng = np.random.default_rng(0)
    X = rng.uniform([250, 0, 0], [350, 0.01, 1], (100, 3))
    Y = rng.uniform([0, -40], [100, 40], (100, 2))
    return (
        nx.MinMaxScaler().fit(X, columns=["temp_k", "strain", "frac"]),
        nx.MinMaxScaler().fit(Y, columns=["load", "offset"]),
    )


def test_data_csv_rows_by_name_or_by_count(tmp_path, problem_scalers):
    in_sc, out_sc = problem_scalers
    model_path = save(gemm_mlp(), tmp_path / "m.onnx")
    doc = scalers_to_dict(in_sc, out_sc, "float32")
    rows = np.random.default_rng(1).uniform([250, 0, 0], [350, 0.01, 1], (7, 3))
    named = tmp_path / "named.csv"
    named.write_text(
        "frac,temp_k,extra,strain\n" + "".join(f"{r[2]},{r[0]},0,{r[1]}\n" for r in rows)
    )
    result = baking.bake(model_path, tmp_path / "a.onnx", scalers=doc, data=named)
    assert result.report.data_rows == 7
    plain = tmp_path / "plain.csv"
    plain.write_text("a,b,c\n" + "".join(f"{r[0]},{r[1]},{r[2]}\n" for r in rows))
    assert (
        baking.bake(model_path, tmp_path / "b.onnx", scalers=doc, data=plain).report.data_rows == 7
    )
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match=r"wrong.csv: needs the input columns temp_k, strain, frac"):
        baking.bake(model_path, tmp_path / "c.onnx", scalers=doc, data=wrong)
    assert not (tmp_path / "c.onnx").exists()


# ------------------------------------------------------------------------------ sanity


def test_wrong_factors_warn_and_strict_refuses(tmp_path, mlp_file, capsys):
    """Factors kept as (min, max) rows: the runtimes agree (verification passes), but the
    user's rows normalize far outside any training range. bake warns, one line each, and
    --strict refuses and writes nothing."""
    from normexport.cli import main

    model_path, _, in_affine, out_affine = mlp_file
    X = raw_rows(in_affine, n=50)
    data = tmp_path / "rows.csv"
    np.savetxt(data, X, delimiter=",", header="x0,x1,x2", comments="")
    low, high = X.min(0), X.max(0)
    wrong = np.vstack([np.column_stack([low, high]), np.column_stack(out_affine)])
    np.savetxt(tmp_path / "wrong.txt", wrong)
    args = ["bake", str(model_path), "--factors", str(tmp_path / "wrong.txt"), "--data", str(data)]

    assert main([*args, "--out", str(tmp_path / "w.onnx")]) == 0
    out, err = capsys.readouterr()
    (line,) = err.strip().splitlines()
    assert line.startswith("normexport: warning: ") and "lie far outside" in line, err
    assert "(min, max) rows in place of (scale, shift)" in line
    assert "warning: the normalized inputs lie far outside" in out  # and in the report
    assert "note: the model's columns carry placeholder names (x0, x1, x2 -> y0, y1)" in out
    assert (tmp_path / "w.onnx").is_file()

    assert main([*args, "--out", str(tmp_path / "s.onnx"), "--strict"]) == 2
    out, err = capsys.readouterr()
    (line,) = err.strip().splitlines()
    assert line.startswith("normexport: error: ") and "--strict: the normalized inputs" in line
    assert not (tmp_path / "s.onnx").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "factors.txt", "model.onnx", "rows.csv", "w.onnx", "wrong.txt",
    ]  # fmt: skip

    # the right factors, named: silent, no note
    right = tmp_path / "factors.txt"
    names = ["--inputs", "a,b,c", "--targets", "u,v"]
    np.savetxt(data, X, delimiter=",", header="a,b,c", comments="")
    code = main([*args[:3], str(right), "--data", str(data), *names, "--strict", "--out",
                 str(tmp_path / "r.onnx")])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0 and err == "" and "note:" not in out, err
    # predict with the placeholder-named model on the user's table says how to name them
    assert main(["predict", str(tmp_path / "w.onnx"), str(data)]) == 2
    out, err = capsys.readouterr()
    (line,) = err.strip().splitlines()
    assert "rows.csv: no column named 'x0' (columns: a, b, c)" in line, line
    assert "--inputs IN1,IN2,IN3 --targets OUT1,OUT2" in line and out == ""


def test_strict_warns_through_the_api_and_needs_verification(tmp_path, mlp_file):
    model_path, _, in_affine, out_affine = mlp_file
    X = raw_rows(in_affine, n=50)
    data = tmp_path / "rows.csv"
    np.savetxt(data, X, delimiter=",", header="x0,x1,x2", comments="")
    swapped = factors_of(in_affine[::-1], out_affine)  # (shift, scale) rows for the inputs
    with pytest.warns(UserWarning, match="model.onnx: the normalized inputs lie far outside"):
        result = baking.bake(model_path, tmp_path / "w.onnx", factors=swapped, data=data)
    assert result.report.ok and len(result.report.warnings) == 1
    with pytest.raises(DataError, match="--strict: the normalized inputs lie far outside"):
        baking.bake(model_path, tmp_path / "s.onnx", factors=swapped, data=data, strict=True)
    assert not (tmp_path / "s.onnx").exists()
    with pytest.raises(DataError, match="strict needs verification"):
        baking.bake(model_path, tmp_path / "n.onnx", factors=swapped, strict=True, verify=False)


def test_no_verify_skips_the_check(tmp_path, mlp_file):
    model_path, factors, *_ = mlp_file
    result = baking.bake(model_path, tmp_path / "b.onnx", factors=factors, verify=False)
    assert result.report is None and (tmp_path / "b.onnx").is_file()


def test_rename_and_keep_names(tmp_path, mlp_file):
    model_path, factors, in_affine, out_affine = mlp_file
    for mode in ("splice", "fold"):
        baking.bake(model_path, tmp_path / "r.onnx", factors=factors, mode=mode, rename=True)
        baked = onnx.load(str(tmp_path / "r.onnx"))
        assert [v.name for v in baked.graph.input] == ["input"]
        assert [v.name for v in baked.graph.output] == ["output"]
        assert baked.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
        check_baked(
            tmp_path / "r.onnx", onnx.load(str(model_path)), in_affine, out_affine, "float32"
        )


def test_fixed_batch_model_keeps_its_batch_and_verifies(tmp_path):
    model = gemm_mlp()
    for value in (model.graph.input[0], model.graph.output[0]):
        value.type.tensor_type.shape.dim[0].Clear()
        value.type.tensor_type.shape.dim[0].dim_value = 1
    path = save(model, tmp_path / "m.onnx")
    in_affine, out_affine = affines(3, 2)
    result = baking.bake(
        path, tmp_path / "b.onnx", factors=factors_of(in_affine, out_affine), rename=True
    )
    assert result.report.ok and result.report.rows > 1000
    dim = onnx.load(str(tmp_path / "b.onnx")).graph.input[0].type.tensor_type.shape.dim[0]
    assert dim.dim_value == 1


def test_output_width_found_by_running_when_shapes_leave_it_open(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Gemm", ["x", "W"], ["z"], name="fc"),
        helper.make_node("Shape", ["z"], ["s"], name="shape"),
        helper.make_node("Reshape", ["z", "s"], ["y"], name="computed_reshape"),
    ]
    model = make_model(nodes, {"W": weights(rng, 3, 2)}, out_shape=[None, None])
    path = save(model, tmp_path / "m.onnx")
    in_affine, out_affine = affines(3, 2)
    probed = []
    probe = baking._probe
    monkeypatch.setattr(baking, "_probe", lambda *a: probed.append(probe(*a)) or probed[-1])
    with pytest.warns(UserWarning, match="output affine spliced"):
        result = baking.bake(
            path, tmp_path / "b.onnx", factors=factors_of(in_affine, out_affine), mode="fold"
        )
    assert [p.shape for p in probed] == [(3, 2)]
    assert result.report.ok
    assert "Reshape 'computed_reshape' has a computed shape" in result.plan["output_reason"]


def test_bake_refuses_to_overwrite_its_input(tmp_path, mlp_file):
    """The original is what verification compares against, and nothing is lost."""
    model_path, factors, _, _ = mlp_file
    before = model_path.read_bytes()
    with pytest.raises(NormexportError, match="is the input model"):
        baking.bake(model_path, model_path, factors=factors)
    assert model_path.read_bytes() == before


def test_public_api_is_lazy_attribute():
    assert nx.bake is baking.bake


# ------------------------------------------------------------------------------ external data


@pytest.mark.parametrize("mode", ["splice", "fold"])
def test_external_data_in_gives_external_data_out(tmp_path, mode):
    model = gemm_mlp("float32", hidden=300)  # W1 is 3x300: 3.6 kB, stored externally
    source = tmp_path / "src"
    source.mkdir()
    save(
        model,
        source / "m.onnx",
        save_as_external_data=True,
        location="m.weights",
        size_threshold=1024,
    )
    assert any(
        t.data_location == TensorProto.EXTERNAL
        for t in onnx.load(str(source / "m.onnx"), load_external_data=False).graph.initializer
    )
    in_affine, out_affine = affines(3, 2)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    result = baking.bake(
        source / "m.onnx", out_dir / "b.onnx", factors=factors_of(in_affine, out_affine), mode=mode
    )
    assert result.written == [out_dir / "b.onnx", out_dir / "b.onnx.data"]
    assert listing(out_dir) == ["b.onnx", "b.onnx.data"]
    baked = onnx.load(str(out_dir / "b.onnx"), load_external_data=False)
    locations = {
        e.value for t in baked.graph.initializer for e in t.external_data if e.key == "location"
    }
    assert locations == {"b.onnx.data"}
    check_baked(out_dir / "b.onnx", model, in_affine, out_affine, "float32")
    if mode == "fold":
        W1 = numpy_helper.to_array(model.graph.initializer[0]).astype(np.float64)
        folded = {t.name: t for t in onnx.load(str(out_dir / "b.onnx")).graph.initializer}
        np.testing.assert_array_equal(
            numpy_helper.to_array(folded["W1"]),
            (in_affine[0][:, None] * W1).astype(np.float32),
        )


def test_external_data_survives_opset_conversion(tmp_path):
    # onnx.version_converter keeps external tensors' names and dims but drops their data
    # location; the conversion pass must put it back.
    model = gemm_mlp("float64", hidden=300)
    save(
        model,
        tmp_path / "m.onnx",
        save_as_external_data=True,
        location="m.weights",
        size_threshold=1024,
    )
    in_affine, out_affine = affines(3, 2)
    for mode in ("splice", "fold"):
        out = tmp_path / f"{mode}.onnx"
        result = baking.bake(
            tmp_path / "m.onnx",
            out,
            factors=factors_of(in_affine, out_affine),
            mode=mode,
            opset=NEWEST,
        )
        assert result.report.ok and len(result.written) == 2
        check_baked(out, model, in_affine, out_affine, "float64")


def test_large_weights_go_external(tmp_path, mlp_file, monkeypatch):
    model_path, factors, in_affine, out_affine = mlp_file
    monkeypatch.setattr(onnxkit, "EXTERNAL_DATA_THRESHOLD", 10)
    big = save(gemm_mlp(hidden=100, trans_b=1), tmp_path / "big.onnx")
    result = baking.bake(big, tmp_path / "b.onnx", factors=factors, mode="fold")
    assert result.written == [tmp_path / "b.onnx", tmp_path / "b.onnx.data"]
    check_baked(tmp_path / "b.onnx", onnx.load(str(big)), in_affine, out_affine, "float32")


# ------------------------------------------------------------------------------ verification


def test_failed_verification_raises_with_the_table_and_writes_nothing(tmp_path, mlp_file):
    model_path, factors, *_ = mlp_file
    before = listing(tmp_path)
    with pytest.raises(VerificationError) as info:
        baking.bake(model_path, tmp_path / "b.onnx", factors=factors, mode="fold", rtol=1e-30)
    message = str(info.value)
    assert "model.onnx: the baked model disagrees" in message
    assert "MISMATCH" in message and "result: FAIL" in message
    assert listing(tmp_path) == before


# ------------------------------------------------------------------------------ refusals


def _two_inputs():
    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["y"])],
        "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 3]) for n in "ab"],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _two_outputs():
    graph = helper.make_graph(
        [helper.make_node("Neg", ["x"], ["y"]), helper.make_node("Abs", ["x"], ["z"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 3]) for n in "yz"],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _unary(in_type=TensorProto.FLOAT, in_shape=("N", 3), out_type=None, op="Neg"):
    graph = helper.make_graph(
        [helper.make_node(op, ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", in_type, list(in_shape))],
        [helper.make_tensor_value_info("y", out_type or in_type, list(in_shape))],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _newer_opset():
    model = gemm_mlp()
    model.opset_import[0].version = NEWEST + 1
    return model


def _newer_ir():
    model = gemm_mlp()
    model.ir_version = onnx.IR_VERSION + 1
    return model


BAD_MODELS = {
    "two_inputs": (
        _two_inputs,
        GraphError,
        r"exactly one input and one output, found 2 input\(s\) \(a, b\)",
    ),
    "two_outputs": (_two_outputs, GraphError, r"1 input\(s\) \(x\) and 2 output\(s\) \(y, z\)"),
    "3d_input": (
        lambda: _unary(in_shape=("N", 3, 4)),
        GraphError,
        r"input 'x' has shape \[N, 3, 4\] \(3-D\); bake needs \[batch, n_in\]",
    ),
    "1d_input": (lambda: _unary(in_shape=("N",)), GraphError, r"input 'x' has shape \[N\] \(1-D\)"),
    "open_width": (
        lambda: _unary(in_shape=("N", "F")),
        GraphError,
        "input 'x' has shape \\[N, F\\] with no fixed width",
    ),
    "integer_input": (
        lambda: _unary(TensorProto.INT64),
        GraphError,
        "input 'x' is INT64, not floating point",
    ),
    "float16_input": (
        lambda: _unary(TensorProto.FLOAT16),
        GraphError,
        "input 'x' is FLOAT16; bake supports FLOAT and DOUBLE",
    ),
    "integer_output": (
        lambda: _unary(TensorProto.FLOAT, out_type=TensorProto.INT64, op="Cast"),
        None,
        None,
    ),
    "newer_opset": (_newer_opset, FormatError, f"opset {NEWEST + 1} is newer than onnx"),
    "newer_ir": (_newer_ir, FormatError, f"IR version {onnx.IR_VERSION + 1} is newer than onnx"),
}


def assert_refused(tmp_path, exc_type, pattern, call, file_named="m.onnx"):
    before = listing(tmp_path)
    with pytest.raises(exc_type, match=pattern) as info:
        call()
    message = str(info.value)
    assert "\n" not in message, message
    assert file_named in message
    assert listing(tmp_path) == before  # nothing written, no temporary left behind
    return message


@pytest.mark.parametrize("name", sorted(BAD_MODELS))
def test_refuses_bad_models(tmp_path, name):
    build, exc_type, pattern = BAD_MODELS[name]
    model = build()
    if name == "integer_output":
        cast = model.graph.node[0]
        cast.attribute.append(helper.make_attribute("to", TensorProto.INT64))
        exc_type, pattern = GraphError, "output 'y' is INT64, not floating point"
    path = save(model, tmp_path / "m.onnx")
    factors = np.ones((6, 2))
    assert_refused(
        tmp_path,
        exc_type,
        pattern,
        lambda: baking.bake(path, tmp_path / "out.onnx", factors=factors),
    )


@pytest.mark.parametrize(
    ("content", "pattern"),
    [
        (b"", "not an ONNX model"),
        (b"name,value\n1,2\n", "not an ONNX model"),
        (b"\x00\x01\x02 not protobuf \xff\xfe", "not an ONNX model"),
    ],
    ids=["empty", "csv", "garbage"],
)
def test_refuses_files_that_are_not_onnx(tmp_path, content, pattern):
    path = tmp_path / "m.onnx"
    path.write_bytes(content)
    assert_refused(
        tmp_path,
        FormatError,
        pattern,
        lambda: baking.bake(path, tmp_path / "out.onnx", factors=np.ones((5, 2))),
    )


@pytest.mark.parametrize("keep", [0.3, 0.6, 0.9, 0.99])
def test_refuses_truncated_files(tmp_path, keep):
    data = gemm_mlp().SerializeToString()
    path = tmp_path / "m.onnx"
    path.write_bytes(data[: int(len(data) * keep)])
    assert_refused(
        tmp_path,
        NormexportError,
        "m.onnx: ",
        lambda: baking.bake(path, tmp_path / "out.onnx", factors=np.ones((5, 2))),
    )


def test_refuses_a_file_cut_after_its_graph(tmp_path):
    model = gemm_mlp()
    model.ClearField("opset_import")  # what a cut right after the graph field leaves
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    assert_refused(
        tmp_path,
        FormatError,
        "m.onnx: imports no ONNX",
        lambda: baking.bake(path, tmp_path / "out.onnx", factors=np.ones((5, 2))),
    )


def test_refuses_missing_model_file(tmp_path):
    assert_refused(
        tmp_path,
        NormexportError,
        "nope.onnx: no such file",
        lambda: baking.bake(tmp_path / "nope.onnx", tmp_path / "o.onnx", factors=np.ones((5, 2))),
        file_named="nope.onnx",
    )


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_refuses_missing_or_short_external_data(tmp_path, damage):
    save(
        gemm_mlp(hidden=300),
        tmp_path / "m.onnx",
        save_as_external_data=True,
        location="m.weights",
        size_threshold=1024,
    )
    weights_file = tmp_path / "m.weights"
    if damage == "missing":
        weights_file.unlink()
        pattern = "m.onnx: external data file 'm.weights' .* is missing"
    else:
        weights_file.write_bytes(weights_file.read_bytes()[:100])
        pattern = "m.onnx: external data file 'm.weights' is truncated"
    assert_refused(
        tmp_path,
        FormatError,
        pattern,
        lambda: baking.bake(tmp_path / "m.onnx", tmp_path / "o.onnx", factors=np.ones((5, 2))),
    )


def test_refuses_external_data_outside_the_model_directory(tmp_path):
    (tmp_path / "sub").mkdir()
    save(
        gemm_mlp(hidden=300),
        tmp_path / "sub" / "m.onnx",
        save_as_external_data=True,
        location="m.weights",
        size_threshold=1024,
    )
    model = onnx.load(str(tmp_path / "sub" / "m.onnx"), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../m.weights"
    (tmp_path / "sub" / "m.weights").rename(tmp_path / "m.weights")
    (tmp_path / "sub" / "m.onnx").write_bytes(model.SerializeToString())
    assert_refused(
        tmp_path,
        FormatError,
        "m.onnx: tensor 'W1' names external data '../m.weights' outside",
        lambda: baking.bake(
            tmp_path / "sub" / "m.onnx", tmp_path / "o.onnx", factors=np.ones((5, 2))
        ),
    )


@pytest.mark.parametrize(
    ("rows", "pattern"),
    [
        ("1 0\n1 0\n1 0\n1 0\n", "f.txt: 4 rows, but the network has 3 inputs and 2 outputs"),
        ("1 0\n1 0\n1 0\n1 0\n1 0\n1 0\n", "f.txt: 6 rows, but the network has 3 inputs"),
        ("1 0\nnan 0\n1 0\n1 0\n1 0\n", "f.txt: row 2: scale nan must be finite and non-zero"),
        ("1 0\n1 0\n1 0\ninf 0\n1 0\n", "f.txt: row 4: scale inf"),
        (
            "1 0\n1 0\n1 0\n1 0\n0 1\n",
            "f.txt: row 5: scale 0.0 must be finite and non-zero",
        ),
        ("1 0\n1 inf\n1 0\n1 0\n1 0\n", "f.txt: row 2: shift inf is not finite"),
        ("1 0 3\n1 0 3\n", "f.txt: expected rows of \\(scale, shift\\)"),
        ("one two\n", "f.txt: not a table of numbers"),
    ],
    ids=["too_few", "too_many", "nan", "inf", "zero", "inf_shift", "three_columns", "words"],
)
def test_refuses_bad_factors_files(tmp_path, mlp_file, rows, pattern):
    model_path, *_ = mlp_file
    (tmp_path / "f.txt").write_text(rows)
    assert_refused(
        tmp_path,
        NormexportError,
        pattern,
        lambda: baking.bake(model_path, tmp_path / "o.onnx", factors=tmp_path / "f.txt"),
        file_named="f.txt",
    )


@pytest.mark.parametrize("bad", [np.nan, np.inf, 0.0])
def test_refuses_bad_factor_arrays(tmp_path, mlp_file, bad):
    model_path, *_ = mlp_file
    factors = np.ones((5, 2))
    factors[3, 0] = bad
    assert_refused(
        tmp_path,
        DataError,
        "factors: row 4: scale",
        lambda: baking.bake(model_path, tmp_path / "o.onnx", factors=factors),
        file_named="factors",
    )


def test_refuses_scalers_of_the_wrong_width(tmp_path, mlp_file):
    model_path, *_ = mlp_file
    x = nx.MinMaxScaler().fit(np.array([[0.0, 1], [1, 2]]), columns=["a", "b"])
    y = nx.MinMaxScaler().fit(np.array([[0.0, 1], [1, 2]]), columns=["u", "v"])
    (tmp_path / "s.json").write_text(json.dumps(scalers_to_dict(x, y, "float32")))
    message = assert_refused(
        tmp_path,
        DataError,
        "s.json: 2 input columns \\(a, b\\), but .*model.onnx's input 'x' has 3",
        lambda: baking.bake(model_path, tmp_path / "o.onnx", scalers=tmp_path / "s.json"),
        file_named="s.json",
    )
    assert "model.onnx" in message


def test_refuses_scalers_with_zero_or_nan_scale(tmp_path, mlp_file, problem_scalers):
    model_path, *_ = mlp_file
    doc = scalers_to_dict(*problem_scalers, "float32")
    doc["inputs"]["scale"][1] = 0.0
    (tmp_path / "s.json").write_text(json.dumps(doc))
    assert_refused(
        tmp_path,
        NormexportError,
        "s.json: inputs: column 'strain': scale 0.0 must be finite",
        lambda: baking.bake(model_path, tmp_path / "o.onnx", scalers=tmp_path / "s.json"),
        file_named="s.json",
    )


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({}, "give either factors or scalers"),
        ({"scalers": {}, "factors": np.ones((5, 2))}, "give either factors or scalers"),
        ({"factors": np.ones((5, 2)), "mode": "melt"}, "mode must be one of splice, fold"),
        ({"factors": np.ones((5, 2)), "opset": 8}, "opset 8 is not supported: choose 9 to"),
        ({"factors": np.ones((5, 2)), "opset": NEWEST + 1}, f"opset {NEWEST + 1} is not supported"),
        ({"factors": np.ones((5, 2)), "rtol": -1.0}, "rtol must be a positive number"),
    ],
)
def test_refuses_bad_options(tmp_path, mlp_file, kwargs, pattern):
    model_path, *_ = mlp_file
    assert_refused(
        tmp_path,
        DataError,
        pattern,
        lambda: baking.bake(model_path, tmp_path / "o.onnx", **kwargs),
        file_named="",
    )


def test_refuses_output_paths_it_cannot_write(tmp_path, mlp_file):
    model_path, factors, *_ = mlp_file
    with pytest.raises(NormexportError, match="is a directory"):
        baking.bake(model_path, tmp_path, factors=factors)
    with pytest.raises(NormexportError, match="no-such-dir: no such directory"):
        baking.bake(model_path, tmp_path / "no-such-dir" / "o.onnx", factors=factors)


def test_refuses_rename_onto_a_taken_name(tmp_path):
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Gemm", ["x", "W"], ["output"], name="fc"),
        helper.make_node("Tanh", ["output"], ["y"], name="act"),
    ]
    path = save(make_model(nodes, {"W": weights(rng, 3, 2)}), tmp_path / "m.onnx")
    assert_refused(
        tmp_path,
        GraphError,
        "m.onnx: cannot rename to 'output'",
        lambda: baking.bake(path, tmp_path / "o.onnx", factors=np.ones((5, 2)), rename=True),
    )


# ------------------------------------------------------------------------------ the CLI


def test_cli_exit_codes(tmp_path, mlp_file, capsys):
    from normexport.cli import main

    model_path, factors, *_ = mlp_file
    out = tmp_path / "b.onnx"
    assert (
        main(
            [
                "bake",
                str(model_path),
                "--factors",
                str(factors),
                "--out",
                str(out),
                "--mode",
                "fold",
            ]
        )
        == 0
    )
    assert "PASS" in capsys.readouterr().out
    (tmp_path / "bad.txt").write_text("1 0\n")
    code = main(
        [
            "bake",
            str(model_path),
            "--factors",
            str(tmp_path / "bad.txt"),
            "--out",
            str(tmp_path / "c.onnx"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "bad.txt: 1 rows" in err
    assert not (tmp_path / "c.onnx").exists()


def test_model_with_inputs_listed_initializers_counts_one_input(tmp_path):
    model = gemm_mlp()
    for tensor in model.graph.initializer:
        model.graph.input.append(
            helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims)
        )
    path = save(model, tmp_path / "m.onnx")
    in_affine, out_affine = affines(3, 2)
    result = baking.bake(
        path, tmp_path / "o.onnx", factors=factors_of(in_affine, out_affine), mode="fold"
    )
    assert result.report.ok and result.plan["input"] == "folded"
    assert os.path.getsize(tmp_path / "o.onnx") > 0
