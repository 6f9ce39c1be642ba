"""The command line, end to end in a temporary directory, and its error contract."""

from __future__ import annotations

import pytest
from conftest import MXNET_SKIP

pytestmark = pytest.mark.mxnet  # every test here needs the MXNet adapter
pytest.importorskip("mxnet", reason=MXNET_SKIP)

import os
import shutil
import subprocess
import sys

import numpy as np
from conftest import INPUTS, TARGETS, mxnet_predict, one_line_error
from conftest import run_cli as run

from normexport import files, tables
from normexport.cli import main


def assert_user_error(capsys, argv, *fragments):
    code, out, err = run(capsys, *argv)
    return one_line_error(code, err, *fragments)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from conftest import smooth_problem

    root = tmp_path_factory.mktemp("cli")
    X, Y = smooth_problem(300)
    tables.write_table(root / "data.csv", INPUTS + TARGETS, np.column_stack([X, Y]))
    return root


@pytest.fixture(scope="module")
def model_dir(workspace):
    out = workspace / "model"
    assert (
        main(
            [
                "train",
                str(workspace / "data.csv"),
                "--inputs",
                ",".join(INPUTS),
                "--targets",
                ",".join(TARGETS),
                "--out",
                str(out),
                "--epochs",
                "3",
                "--dtype",
                "float32",
                "--hidden",
                "8,8",
            ]
        )
        == 0
    )
    assert main(["export", str(out)]) == 0
    return out


def test_train_export_verify_predict(capsys, workspace, model_dir):
    for name in (
        "scalers.json",
        "net-symbol.json",
        "net-0000.params",
        "model-symbol.json",
        "model-0000.params",
        "model.onnx",
        "manifest.json",
        "report/loss.png",
        "report/parity.png",
    ):
        assert (model_dir / name).is_file(), name
    manifest = files.read_json(model_dir / "manifest.json", "normexport.manifest/1")
    assert manifest["mode"] == "splice" and manifest["opset"] == 13
    assert manifest["training"]["settings"]["epochs"] == 3
    assert manifest["verification"]["ok"] is True
    for name, entry in manifest["files"].items():
        assert files.sha256_file(model_dir / name) == entry["sha256"]

    code, out, _ = run(capsys, "verify", model_dir, "--data", workspace / "data.csv")
    assert code == 0 and "result: PASS" in out

    code, out, _ = run(capsys, "verify", model_dir, "--json", "--rows", "20")
    assert code == 0
    import json

    assert json.loads(out)["data_rows"] == 20

    code, _, _ = run(
        capsys, "predict", model_dir, workspace / "data.csv", "--out", workspace / "pred.csv"
    )
    assert code == 0
    assert tables.read_header(workspace / "pred.csv") == TARGETS
    predicted = tables.load_columns(workspace / "pred.csv", TARGETS)
    X = tables.load_columns(workspace / "data.csv", INPUTS)
    expected = mxnet_predict(model_dir, "model", X.astype(np.float32), "float32")
    span = tables.load_columns(workspace / "data.csv", TARGETS).ptp(axis=0)
    assert predicted.shape == (300, 2)
    assert (np.abs(predicted - expected) / span).max() < 1e-5

    code, out, _ = run(capsys, "predict", model_dir, workspace / "data.csv")
    assert code == 0 and out.splitlines()[0] == "load,offset" and len(out.splitlines()) == 301


def test_export_fold_and_inspect(capsys, workspace, model_dir, tmp_path):
    target = tmp_path / "m"
    shutil.copytree(model_dir, target)
    code, out, _ = run(capsys, "export", target, "--mode", "fold", "--opset", "17")
    assert code == 0 and "mode fold (input folded, output folded), opset 17" in out
    code, out, _ = run(capsys, "inspect", target)
    assert code == 0
    assert "Gemm×3" in out and "normexport.mode = fold" in out
    assert "input  temp_k" in out and "output load" in out
    code, out, _ = run(capsys, "inspect", target / "model.onnx", "--json")
    import json

    summary = json.loads(out)
    assert summary["onnx"]["inputs"][0]["shape"] == ["batch", 3]
    assert summary["scalers"]["outputs"]["columns"] == TARGETS


def test_export_checkpoint_trained_elsewhere_with_factors(capsys, workspace, model_dir, tmp_path):
    factors = np.array([[0.01, -2.5], [100.0, 0.0], [1.0, 0.0], [100.0, 0.0], [40.0, 0.0]])
    np.savetxt(tmp_path / "factors.txt", factors)
    code, out, err = run(
        capsys,
        "export",
        "--symbol",
        model_dir / "net-symbol.json",
        "--params",
        model_dir / "net-0000.params",
        "--factors",
        tmp_path / "factors.txt",
        "--out",
        tmp_path / "ext",
        "--mode",
        "fold",
    )
    assert code == 0, err
    code, out, _ = run(capsys, "verify", tmp_path / "ext")
    assert code == 0, out
    np.save(tmp_path / "factors.npy", factors)
    code, _, err = run(
        capsys,
        "export",
        "--symbol",
        model_dir / "net-symbol.json",
        "--params",
        model_dir / "net-0000.params",
        "--factors",
        tmp_path / "factors.npy",
        "--out",
        tmp_path / "ext2",
    )
    assert code == 0, err


def test_export_checkpoint_with_scalers(capsys, model_dir, tmp_path):
    code, _, err = run(
        capsys,
        "export",
        "--symbol",
        model_dir / "net-symbol.json",
        "--params",
        model_dir / "net-0000.params",
        "--scalers",
        model_dir / "scalers.json",
        "--out",
        tmp_path / "ext",
    )
    assert code == 0, err
    assert (tmp_path / "ext" / "model.onnx").is_file()


def test_verify_exits_1_on_tampered_model(capsys, model_dir, tmp_path):
    from test_verification import tamper_params

    target = tmp_path / "m"
    shutil.copytree(model_dir, target)
    tamper_params(target / "model-0000.params", "dense0_weight")
    code, out, _ = run(capsys, "verify", target)
    assert code == 1 and "MISMATCH" in out and "result: FAIL" in out


def test_user_errors_are_one_line_exit_2(capsys, workspace, model_dir, tmp_path):
    data = workspace / "data.csv"
    bad = tmp_path / "bad.csv"
    bad.write_text("temp_k,strain,frac,load,offset\n1,2,3,4,5\n1,2,x,4,5\n")
    cases = [
        (
            [
                "train",
                tmp_path / "nope.csv",
                "--inputs",
                "a",
                "--targets",
                "b",
                "--out",
                tmp_path / "o",
            ],
            ["nope.csv: no such file"],
        ),
        (
            [
                "train",
                data,
                "--inputs",
                "temp_k,nope",
                "--targets",
                "load",
                "--out",
                tmp_path / "o",
            ],
            ["no column named 'nope'"],
        ),
        (
            [
                "train",
                bad,
                "--inputs",
                "temp_k,strain,frac",
                "--targets",
                "load",
                "--out",
                tmp_path / "o",
            ],
            ["bad.csv:3", "'frac'", "'x' is not a number"],
        ),
        (
            ["train", data, "--inputs", "temp_k", "--targets", "temp_k", "--out", tmp_path / "o"],
            ["both an input and a target"],
        ),
        (
            [
                "train",
                data,
                "--inputs",
                "a",
                "--targets",
                "b",
                "--out",
                tmp_path / "o",
                "--epochs",
                "0",
            ],
            ["--epochs", "must be > 0"],
        ),
        (["train", data, "--inputs", "a"], ["required", "--targets"]),
        (["export", tmp_path / "missing"], ["missing", "scalers.json: no such file"]),
        (["export", model_dir, "--opset", "99"], ["opset 99 is not supported"]),
        (["export", "--symbol", model_dir / "net-symbol.json"], ["missing --params"]),
        (["verify", tmp_path / "missing"], ["model.onnx: no such file"]),
        (["verify", model_dir, "--data", bad], ["bad.csv:3"]),
        (["predict", model_dir, tmp_path / "nope.csv"], ["nope.csv: no such file"]),
        (["inspect", tmp_path / "nothing"], ["nothing: no such file or directory"]),
        (["frobnicate"], ["invalid choice: 'frobnicate'"]),
    ]
    for argv, fragments in cases:
        assert_user_error(capsys, argv, *fragments)


def test_debug_shows_the_traceback_and_keeps_the_exit_status(capsys, tmp_path):
    code, _, err = run(capsys, "verify", tmp_path / "missing", "--debug")
    assert code == 2
    assert "Traceback (most recent call last)" in err
    assert err.strip().splitlines()[-1].startswith("normexport: error: ")


def test_help_and_version_are_instant_and_do_not_import_mxnet():
    code = (
        "import sys; from normexport.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "assert 'mxnet' not in sys.modules and 'onnx' not in sys.modules, 'heavy import'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    result = subprocess.run(
        [sys.executable, "-m", "normexport", "--version"], capture_output=True, text=True
    )
    assert result.returncode == 0 and result.stdout.startswith("normexport ")


@pytest.mark.parametrize(
    "verb", ["train", "export", "verify", "predict", "inspect", "bake", "demo"]
)
def test_every_verb_has_help_with_an_example(capsys, verb):
    code, out, _ = run(capsys, verb, "--help")
    assert code == 0 and "example:" in out and f"normexport {verb}" in out


def test_console_script_error_contract(tmp_path):
    exe = shutil.which("normexport", path=os.path.dirname(sys.executable))
    assert exe, "console script not installed"
    result = subprocess.run([exe, "verify", str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.startswith("normexport: error: ") and result.stderr.count("\n") == 1


def test_demo_fast_configuration(capsys, tmp_path):
    code, out, err = run(capsys, "demo", "--out", tmp_path / "demo", "--epochs", "2")
    assert code == 0, err
    assert "hold-out error" in out and "splice" in out and "fold" in out
    for png in ("loss.png", "parity.png"):
        path = tmp_path / "demo" / "report" / png
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and str(path) in out
    assert (tmp_path / "demo" / "fold" / "model.onnx").is_file()


def test_bake_verb(capsys, tmp_path):
    from test_docs import write_foreign_model

    write_foreign_model(tmp_path / "theirs.onnx")
    np.savetxt(
        tmp_path / "f.txt", [[0.01, -2.5], [100.0, 0.0], [1.0, 0.0], [10.0, 1.0], [4.0, 0.0]]
    )
    code, out, err = run(
        capsys,
        "bake",
        tmp_path / "theirs.onnx",
        "--factors",
        tmp_path / "f.txt",
        "--out",
        tmp_path / "baked.onnx",
        "--mode",
        "fold",
        "--rename",
    )
    assert code == 0, err
    assert "result: PASS" in out and "input folded, output folded" in out
    code, out, _ = run(capsys, "inspect", tmp_path / "baked.onnx")
    assert code == 0 and "input   input" in out and "normexport.mode = fold" in out
    code, out, _ = run(capsys, "predict", tmp_path / "baked.onnx", tmp_path / "missing.csv")
    assert code == 2
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    assert_user_error(
        capsys,
        [
            "bake",
            tmp_path / "junk.onnx",
            "--factors",
            tmp_path / "f.txt",
            "--out",
            tmp_path / "o.onnx",
        ],
        "junk.onnx",
    )
    assert not (tmp_path / "o.onnx").exists()
    np.savetxt(tmp_path / "short.txt", [[1.0, 0.0]])
    assert_user_error(
        capsys,
        [
            "bake",
            tmp_path / "theirs.onnx",
            "--factors",
            tmp_path / "short.txt",
            "--out",
            tmp_path / "o.onnx",
        ],
        "short.txt",
    )


def test_verify_given_an_onnx_file_says_it_wants_a_directory(capsys, model_dir):
    assert_user_error(
        capsys, ["verify", model_dir / "model.onnx"], "model.onnx: is a file", "model directory"
    )


def test_more_user_mistakes_are_one_line_exit_2(capsys, workspace, model_dir, tmp_path):
    from test_docs import write_foreign_model

    afile = tmp_path / "afile"
    afile.write_text("not a directory\n")
    write_foreign_model(tmp_path / "theirs.onnx")
    np.savetxt(tmp_path / "f.txt", [[1.0, 0.0]] * 5)
    cases = [
        (["export", afile], ["afile: not a directory"]),
        (
            ["predict", model_dir, workspace / "data.csv", "--out", tmp_path],
            [f"{tmp_path}: is a directory"],
        ),
        (["inspect", model_dir / "scalers.json"], ["scalers.json: not an ONNX model"]),
        (
            ["predict", model_dir / "scalers.json", workspace / "data.csv"],
            ["scalers.json: not an ONNX model"],
        ),
        (
            [
                "bake",
                tmp_path / "theirs.onnx",
                "--factors",
                tmp_path / "f.txt",
                "--out",
                tmp_path / "theirs.onnx",
            ],
            ["is the input model"],
        ),
        (["export", afile, "--debug"], ["afile: not a directory"]),
    ]
    for argv, fragments in cases:
        if "--debug" in argv:
            code, _, err = run(capsys, *argv)
            assert code == 2 and err.strip().splitlines()[-1].startswith("normexport: error:")
            continue
        assert_user_error(capsys, argv, *fragments)


def test_warnings_are_one_line(capsys, tmp_path):
    from conftest import smooth_problem

    X, Y = smooth_problem(60)
    X[:, 2] = 0.5  # a constant input column: scale 1, with a warning
    tables.write_table(tmp_path / "c.csv", INPUTS + TARGETS, np.column_stack([X, Y]))
    import subprocess
    import sys

    # a subprocess: pytest replaces Python's warning display in-process
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "normexport",
            "train",
            str(tmp_path / "c.csv"),
            "--inputs",
            ",".join(INPUTS),
            "--targets",
            ",".join(TARGETS),
            "--out",
            str(tmp_path / "m"),
            "--epochs",
            "1",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert "normexport: warning: constant column(s) frac: scale set to 1" in lines, lines
    assert not any("UserWarning" in line for line in lines)


def test_broken_pipe_is_not_an_error(workspace, model_dir):
    import subprocess
    import sys

    result = subprocess.run(
        f"{sys.executable} -m normexport predict {model_dir} {workspace / 'data.csv'} | head -1",
        shell=True,
        capture_output=True,
        text=True,
    )
    assert result.stdout == "load,offset\n"
    assert "Error" not in result.stderr and "error" not in result.stderr, result.stderr


def test_train_inputs_default_to_every_column_but_the_targets(capsys, workspace, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = tables.load_columns(workspace / "data.csv", INPUTS + TARGETS)
    pq.write_table(
        pa.table({name: table[:, j] for j, name in enumerate(INPUTS + TARGETS)}),
        tmp_path / "data.parquet",
    )
    out = tmp_path / "m"
    argv = ["train", tmp_path / "data.parquet", "--targets", ",".join(TARGETS), "--out", out]
    code, _, err = run(capsys, *argv, "--epochs", "2", "--hidden", "4")
    assert code == 0, err
    from normexport.modeldir import load_scalers

    in_sc, out_sc, _ = load_scalers(out / "scalers.json")
    assert in_sc.columns_ == INPUTS and out_sc.columns_ == TARGETS
    # a text column among them: one line that says how to choose the inputs
    with_id = tmp_path / "with_id.csv"
    with_id.write_text("id,temp_k,load\nA,1,2\nB,2,3\n")
    assert_user_error(
        capsys,
        ["train", with_id, "--targets", "load", "--out", tmp_path / "o"],
        "'id'",
        "choose them with --inputs",
    )
    assert not (tmp_path / "o").exists()
