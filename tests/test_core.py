"""The core works without MXNet: nothing imports it, and the MXNet verbs say which extra.

`tests/data/mxnet_model` was exported in the MXNet profile (`normexport train` on 200
rows of the smooth problem, `normexport export --mode fold`, float32);
`mxnet_predictions.txt` holds the MXNet runtime's output on `rows.csv`. The core profile
predicts the same rows from the same files, so the two profiles are checked against each
other on every run.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pyarrow.parquet as pq
import pytest
from onnx_models import affines, gemm_mlp

DATA = Path(__file__).parent / "data"
MODEL = DATA / "mxnet_model"
# Importing mxnet fails in the child when it is set to None in sys.modules: the core
# profile's situation, in either profile.
BLOCK_MXNET = "import sys; sys.modules['mxnet'] = None\n"


def run_python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300
    )


def test_core_paths_never_import_mxnet_or_dask(tmp_path):
    model = tmp_path / "m.onnx"
    onnx.save_model(gemm_mlp(), str(model))
    factors = tmp_path / "f.txt"
    (in_scale, in_shift), (out_scale, out_shift) = affines(3, 2)
    np.savetxt(factors, np.column_stack([np.r_[in_scale, out_scale], np.r_[in_shift, out_shift]]))
    code = f"""
import sys, json
from normexport.cli import main
codes = [
    main(["bake", {str(model)!r}, "--factors", {str(factors)!r}, "--out", {str(tmp_path / "b.onnx")!r}]),
    main(["predict", {str(MODEL)!r}, {str(DATA / "rows.csv")!r}, "--out", {str(tmp_path / "p.csv")!r}]),
    main(["inspect", {str(MODEL)!r}]),
    main(["inspect", {str(tmp_path / "b.onnx")!r}, "--json"]),
]
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("mxnet", "dask", "distributed") or m == "normexport.mx" or m.startswith("normexport.mx."))
print(json.dumps({{"codes": codes, "loaded": loaded}}), file=sys.stderr)
"""
    result = run_python(code)
    report = json.loads(result.stderr.strip().splitlines()[-1])
    assert report == {"codes": [0, 0, 0, 0], "loaded": []}, result.stderr


def test_verify_runs_without_mxnet_and_says_why_it_left_it_out():
    result = run_python(
        BLOCK_MXNET + "from normexport.cli import main; sys.exit(main(sys.argv[1:]))",
        "verify",
        str(MODEL),
        "--json",
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] and "mxnet" not in report["runtimes"]
    assert {"onnxruntime", "numpy", "onnx.reference"} <= set(report["runtimes"])
    assert "normexport[mxnet]" in report["skipped"]["mxnet"]


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "d.csv", "--inputs", "a", "--targets", "b", "--out", "m"],
        ["export", "some_dir"],
        ["demo", "--out", "x"],
    ],
    ids=["train", "export", "demo"],
)
def test_mxnet_verbs_without_mxnet_exit_2_naming_the_extra(argv):
    result = run_python(
        BLOCK_MXNET + "from normexport.cli import main; sys.exit(main(sys.argv[1:]))", *argv
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and 'pip install "normexport[mxnet]"' in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_api_export_without_mxnet_names_the_extra():
    result = run_python(BLOCK_MXNET + "import normexport as nx\nnx.export")
    assert result.returncode == 1
    assert "MissingExtraError" in result.stderr and "normexport[mxnet]" in result.stderr


def test_predictions_match_the_mxnet_profile(tmp_path):
    """`predict` here gives the MXNet profile's `predict` output bit for bit, in CSV and
    Parquet, and agrees with the MXNet runtime itself within the float32 tolerance."""
    from normexport.predicting import predict
    from normexport.tables import load_columns

    there = load_columns(DATA / "predict_mxnet_profile.csv", ["load", "offset"])
    for out in (tmp_path / "p.csv", tmp_path / "p.parquet"):
        assert predict(MODEL, DATA / "rows.csv", out, keep=["id"]) == there.shape[0]
    table = pq.read_table(tmp_path / "p.parquet")
    assert table.column_names == ["id", "load", "offset"]
    # CSV kept columns pass through as their text (an id like 007 keeps its zeros)
    assert table.column("id").to_pylist() == [str(i) for i in range(1000, 1050)]
    here = np.column_stack([table.column(c).to_numpy() for c in ("load", "offset")])
    assert here.dtype == np.float32  # Parquet keeps the model's dtype
    np.testing.assert_array_equal(here, there.astype(np.float32))
    csv = load_columns(tmp_path / "p.csv", ["load", "offset"])
    np.testing.assert_array_equal(csv, there)  # CSV floats round-trip exactly
    # The MXNet runtime computed the unfolded graph in float32: 1e-5 of each range.
    mxnet = np.loadtxt(DATA / "mxnet_predictions.txt")
    span = np.ptp(mxnet, axis=0)
    assert (np.abs(here - mxnet) / span).max() < 1e-5


def test_bake_names_the_factor_columns(tmp_path, capsys):
    from normexport.cli import main

    model = tmp_path / "m.onnx"
    onnx.save_model(gemm_mlp(), str(model))
    factors = tmp_path / "f.txt"
    (in_scale, in_shift), (out_scale, out_shift) = affines(3, 2)
    np.savetxt(factors, np.column_stack([np.r_[in_scale, out_scale], np.r_[in_shift, out_shift]]))
    out = tmp_path / "b.onnx"
    argv = ["bake", str(model), "--factors", str(factors), "--out", str(out)]
    assert main([*argv, "--inputs", "a,b,c", "--targets", "u,v"]) == 0
    doc = json.loads(
        {p.key: p.value for p in onnx.load(str(out)).metadata_props}["normexport.scalers"]
    )
    assert doc["inputs"]["columns"] == ["a", "b", "c"] and doc["outputs"]["columns"] == ["u", "v"]
    capsys.readouterr()
    assert main([*argv[:-1], str(tmp_path / "c.onnx"), "--inputs", "a,b"]) == 2
    assert "3" in capsys.readouterr().err
