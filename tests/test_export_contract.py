"""What export promises about the directory it writes, the names and the sanity checks.

No silent replacement of another network (``--force``), a manifest that lists only what
was written or kept on purpose, column names for a factors file through to ``predict``,
one-line sanity warnings on wrong factors (``--strict`` makes them errors), and the
smaller contracts: unfitted scalers, range-relative errors for z-scored outputs, the
direction of the factors ``inspect`` shows, the absolute data path in the manifest.
"""

from __future__ import annotations

import pytest
from conftest import MXNET_SKIP

pytestmark = pytest.mark.mxnet  # every test here needs the MXNet adapter
pytest.importorskip("mxnet", reason=MXNET_SKIP)

import shutil

import numpy as np
from conftest import INPUTS, TARGETS, one_line_error, random_net, smooth_problem
from conftest import run_cli as run

import normexport as nx
from normexport import files, tables
from normexport.errors import DataError
from normexport.modeldir import load_scalers
from normexport.mx import exporting


def factors_of(model_dir):
    """The side file a user of the original approach keeps: (scale, shift) rows."""
    in_sc, out_sc, _ = load_scalers(model_dir / "scalers.json")
    return np.concatenate(
        [np.column_stack(in_sc.affine()), np.column_stack(out_sc.inverse_affine())]
    )


def export_factors(capsys, model_dir, factors, out, *extra):
    return run(
        capsys,
        "export",
        "--symbol",
        model_dir / "net-symbol.json",
        "--params",
        model_dir / "net-0000.params",
        "--factors",
        factors,
        "--out",
        out,
        *extra,
    )


# ---------------------------------------------------------------------------- replacement


def test_a_different_network_is_not_replaced_without_force(capsys, trained_dir, tmp_path):
    target = tmp_path / "model"
    shutil.copytree(trained_dir / "model", target)
    before = {p.name: p.read_bytes() for p in target.iterdir() if p.is_file()}
    other = tmp_path / "other"
    other.mkdir()
    net = random_net("tanh", "float32", hidden=(5,), seed=3)
    from normexport.mx import checkpoint, graph

    checkpoint.save_checkpoint(graph.from_block(net), other, "net")
    args = (
        "export",
        "--symbol",
        other / "net-symbol.json",
        "--params",
        other / "net-0000.params",
        "--scalers",
        target / "scalers.json",
        "--out",
        target,
    )
    code, _, err = run(capsys, *args)
    one_line_error(code, err, str(target), "different network", "--force")
    assert {p.name: p.read_bytes() for p in target.iterdir() if p.is_file()} == before

    code, out, err = run(capsys, *args, "--force")
    assert code == 0, err
    manifest = files.read_json(target / "manifest.json")
    # the old network's training report and summary went with it
    assert not (target / "report").exists()
    assert manifest["training"] is None
    listed = set(manifest["files"])
    on_disk = {p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file()}
    assert listed == on_disk - {"manifest.json"}
    assert listed == {
        "scalers.json",
        "net-symbol.json",
        "net-0000.params",
        "model-symbol.json",
        "model-0000.params",
        "model.onnx",
    }


def test_the_same_network_is_re_exported_keeping_its_training_files(capsys, trained_dir, tmp_path):
    target = tmp_path / "model"
    shutil.copytree(trained_dir / "model", target)
    (target / "stray.txt").write_text("not ours")
    code, _, err = run(capsys, "export", target, "--mode", "fold")
    assert code == 0, err
    # the same files again, through --symbol/--params and the directory's own scalers
    code, _, err = run(
        capsys,
        "export",
        "--symbol",
        target / "net-symbol.json",
        "--params",
        target / "net-0000.params",
        "--scalers",
        target / "scalers.json",
        "--out",
        target,
    )
    assert code == 0, err
    manifest = files.read_json(target / "manifest.json")
    assert manifest["training"]["best_epoch"] >= 1  # kept on purpose
    assert {"report/loss.png", "report/parity.png"} <= set(manifest["files"])
    assert not (target / "stray.txt").exists()  # neither written nor kept on purpose
    on_disk = {p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file()}
    assert set(manifest["files"]) == on_disk - {"manifest.json"}


def test_the_api_refuses_too_and_force_replaces(tmp_path, scalers):
    in_sc, out_sc = scalers
    exporting.export(random_net(seed=1), in_sc, out_sc, tmp_path / "m")
    exporting.export(random_net(seed=1), in_sc, out_sc, tmp_path / "m")  # same: fine
    with pytest.raises(DataError, match="different network"):
        exporting.export(random_net(seed=2), in_sc, out_sc, tmp_path / "m")
    renamed = nx.MinMaxScaler().fit(smooth_problem(50)[0], columns=["a", "b", "c"])
    with pytest.raises(DataError, match="input columns are temp_k, strain, frac"):
        exporting.export(random_net(seed=1), renamed, out_sc, tmp_path / "m")
    exporting.export(random_net(seed=2), in_sc, out_sc, tmp_path / "m", force=True)


# ---------------------------------------------------------------------------- names


def test_factor_names_reach_predict(capsys, trained_dir, tmp_path):
    np.savetxt(tmp_path / "factors.txt", factors_of(trained_dir / "model"))
    data = trained_dir / "data.csv"
    # without names: placeholder columns, and the export says how to name them
    code, out, err = export_factors(
        capsys, trained_dir / "model", tmp_path / "factors.txt", tmp_path / "unnamed"
    )
    assert code == 0, err
    assert "note: the model's columns carry placeholder names (x0, x1, x2 -> y0, y1)" in out
    assert "--inputs IN1,IN2,IN3 --targets OUT1,OUT2" in out
    # predict on the user's own table then says the same, not just "no column named 'x0'"
    code, out, err = run(capsys, "predict", tmp_path / "unnamed", data)
    one_line_error(code, err, "no column named 'x0'", "--inputs IN1,IN2,IN3 --targets OUT1,OUT2")
    # with names: predict reads the user's own table by them
    names = ("--inputs", ",".join(INPUTS), "--targets", ",".join(TARGETS))
    code, out, err = export_factors(
        capsys, trained_dir / "model", tmp_path / "factors.txt", tmp_path / "named", *names
    )
    assert code == 0, err and "note:" not in out
    in_sc, out_sc, _ = load_scalers(tmp_path / "named" / "scalers.json")
    assert in_sc.columns_ == INPUTS and out_sc.columns_ == TARGETS
    code, _, err = run(capsys, "predict", tmp_path / "named", data, "--out", tmp_path / "p.csv")
    assert code == 0, err
    predicted = tables.load_columns(tmp_path / "p.csv", TARGETS)
    code, _, err = run(capsys, "predict", trained_dir / "model", data, "--out", tmp_path / "q.csv")
    assert code == 0, err
    np.testing.assert_allclose(
        predicted, tables.load_columns(tmp_path / "q.csv", TARGETS), rtol=1e-5, atol=1e-4
    )


def test_wrong_number_of_names_is_one_line(capsys, trained_dir, tmp_path):
    np.savetxt(tmp_path / "factors.txt", factors_of(trained_dir / "model"))
    code, _, err = export_factors(
        capsys, trained_dir / "model", tmp_path / "factors.txt", tmp_path / "m", "--inputs", "a,b"
    )
    one_line_error(code, err, "--inputs names 2 column(s) (a, b)", "3 input(s)")
    code, _, err = run(capsys, "export", trained_dir / "model", "--inputs", "a,b,c")
    one_line_error(code, err, "--inputs and --targets name the columns of --factors")


# ---------------------------------------------------------------------------- sanity


@pytest.mark.parametrize(
    ("mistake", "warnings"),
    [
        ("min-max rows", ["lie far outside [-10, 11] (given factors)"]),
        ("swapped columns", ["lie far outside [-10, 11]"]),
    ],
)
def test_wrong_factors_warn_and_strict_refuses(capsys, trained_dir, tmp_path, mistake, warnings):
    right = factors_of(trained_dir / "model")
    X = tables.load_columns(trained_dir / "data.csv", INPUTS)
    if mistake == "min-max rows":  # what people keep by mistake: (min, max) per column
        Y = tables.load_columns(trained_dir / "data.csv", TARGETS)
        wrong = np.concatenate(
            [np.column_stack([X.min(0), X.max(0)]), np.column_stack([Y.min(0), Y.max(0)])]
        )
    else:
        wrong = right[:, ::-1].copy()
        wrong[wrong[:, 0] == 0, 0] = 1e-3  # a zero scale is refused outright
    np.savetxt(tmp_path / "wrong.txt", wrong)
    names = ("--inputs", ",".join(INPUTS), "--targets", ",".join(TARGETS))
    data = ("--data", trained_dir / "data.csv")
    code, out, err = export_factors(
        capsys, trained_dir / "model", tmp_path / "wrong.txt", tmp_path / "m", *names, *data
    )
    assert code == 0, err  # the runtimes agree: verification passes ...
    lines = err.strip().splitlines()
    assert all(line.startswith("normexport: warning: ") for line in lines), err  # one line each
    assert len(lines) == len(warnings), err
    for line, fragment in zip(lines, warnings):
        assert fragment in line, line
        assert "(min, max) rows in place of (scale, shift)" in line and "swapped" in line
    assert files.read_json(tmp_path / "m" / "manifest.json")["verification"]["warnings"]

    code, out, err = export_factors(
        capsys,
        trained_dir / "model",
        tmp_path / "wrong.txt",
        tmp_path / "s",
        *names,
        *data,
        "--strict",
    )
    one_line_error(code, err, "--strict:", warnings[0])
    assert not (tmp_path / "s").exists()
    # the right factors: silent
    np.savetxt(tmp_path / "right.txt", right)
    code, out, err = export_factors(
        capsys,
        trained_dir / "model",
        tmp_path / "right.txt",
        tmp_path / "r",
        *names,
        *data,
        "--strict",
    )
    assert code == 0 and err == "", err


def test_a_constant_output_warns(tmp_path, scalers):
    """A network whose output does not move over the verification rows (saturated by
    wrong factors, or, as here, never trained past its bias) exports with a warning."""
    in_sc, out_sc = scalers
    net = random_net("sigmoid", "float64", seed=4)
    net[-1].weight.set_data(net[-1].weight.data() * 0)
    with pytest.warns(UserWarning, match="output is constant over the 1041 verification rows"):
        exporting.export(net, in_sc, out_sc, tmp_path / "m")
    with pytest.raises(DataError, match="--strict: the model's output is constant"):
        exporting.export(net, in_sc, out_sc, tmp_path / "s", strict=True)
    assert not (tmp_path / "s").exists()


def test_sanity_warnings_function():
    from normexport.verification import sanity_warnings

    X, Y = smooth_problem(200)
    in_sc = nx.MinMaxScaler().fit(X, columns=INPUTS)
    out_sc = nx.MinMaxScaler().fit(Y, columns=TARGETS)
    assert sanity_warnings(in_sc, out_sc, X, Y) == []
    assert sanity_warnings(in_sc, out_sc, X * 10, Y)[0].startswith("the normalized inputs")
    constant = np.tile(Y[:1], (200, 1))
    (line,) = sanity_warnings(in_sc, out_sc, X, constant)
    assert line.startswith("the model's output is constant over the 200 verification rows")
    z_in = nx.StandardScaler().fit(X, columns=INPUTS)
    assert sanity_warnings(z_in, out_sc, X, Y) == []
    assert "beyond" not in sanity_warnings(z_in, out_sc, X * 1e3, Y)[0]
    assert "[-10, 10]" in sanity_warnings(z_in, out_sc, X * 1e3, Y)[0]


# ---------------------------------------------------------------------------- smaller items


def test_an_unfitted_scaler_is_a_clear_error(tmp_path, scalers):
    in_sc, out_sc = scalers
    fresh = nx.MinMaxScaler()
    for use in (lambda: fresh.columns_, lambda: fresh.transform(np.ones((2, 3))), fresh.span):
        with pytest.raises(DataError, match="MinMaxScaler is not fitted yet"):
            use()
    assert not hasattr(fresh, "scale_") and not fresh.is_fitted
    with pytest.raises(DataError, match="in_scaler .MinMaxScaler. is not fitted"):
        exporting.export(random_net(), fresh, out_sc, tmp_path / "m")
    with pytest.raises(DataError, match="out_scaler .StandardScaler. is not fitted"):
        exporting.export(random_net(), in_sc, nx.StandardScaler(), tmp_path / "m")


def test_errors_are_relative_to_the_range_for_z_scored_outputs(tmp_path):
    X, Y = smooth_problem(300)
    in_sc = nx.StandardScaler().fit(X, columns=INPUTS)
    out_sc = nx.StandardScaler().fit(Y, columns=TARGETS, target=True)
    np.testing.assert_array_equal(out_sc.span(), Y.max(0) - Y.min(0))
    out = exporting.export(random_net(dtype="float64"), in_sc, out_sc, tmp_path / "m")
    report = nx.verify(out, X)
    assert report.output_span == dict(zip(TARGETS, (Y.max(0) - Y.min(0)).tolist()))
    for pair in report.pairs:
        for name in TARGETS:
            assert pair.max_rel[name] == pair.max_abs[name] / report.output_span[name]
    # the range travels in scalers.json; a file without it (older) falls back to one std
    doc = files.read_json(out / "scalers.json")
    assert doc["outputs"]["data_min"] == Y.min(0).tolist()
    del doc["outputs"]["data_min"], doc["outputs"]["data_max"]
    _, old, _ = nx.scaling.scalers_from_dict(doc)
    np.testing.assert_allclose(old.span(), Y.std(0))


def test_inspect_shows_output_factors_in_the_de_normalizing_direction(capsys, trained_dir):
    code, out, _ = run(capsys, "inspect", trained_dir / "model")
    assert code == 0
    _, out_sc, _ = load_scalers(trained_dir / "model" / "scalers.json")
    scale, shift = out_sc.inverse_affine()  # y = y_norm * scale + shift, as a factors file
    line = next(x for x in out.splitlines() if x.strip().startswith("output load"))
    assert f"scale {scale[0]:.6g} shift {shift[0]:.6g}" in line
    assert "outputs y = y_norm * scale + shift" in out


def test_manifest_records_the_data_path_absolute(capsys, tmp_path, monkeypatch):
    X, Y = smooth_problem(120)
    tables.write_table(tmp_path / "d.csv", INPUTS + TARGETS, np.column_stack([X, Y]))
    monkeypatch.chdir(tmp_path)
    args = ("train", "d.csv", "--inputs", ",".join(INPUTS), "--targets", ",".join(TARGETS))
    code, _, err = run(capsys, *args, "--out", "m", "--epochs", "2", "--hidden", "4")
    assert code == 0, err
    data = files.read_json(tmp_path / "m" / "manifest.json")["training"]["data"]
    assert data == str(tmp_path / "d.csv")


def test_errors_name_the_output_directory_not_its_staging_copy(tmp_path, scalers, monkeypatch):
    from normexport import verification
    from normexport.errors import FormatError

    def refuse(path):
        raise FormatError(f"{path}: onnxruntime cannot load the model: NOT_IMPLEMENTED")

    monkeypatch.setattr(verification, "onnxruntime_runtime", refuse)
    with pytest.raises(FormatError) as caught:
        exporting.export(random_net(), *scalers, tmp_path / "m")
    assert str(caught.value).startswith(f"{tmp_path / 'm' / 'model.onnx'}: onnxruntime cannot")
    assert ".staging" not in str(caught.value) and not (tmp_path / "m").exists()
