"""Verification: agreement, the ability to fail, rows, chunking, report format."""

from __future__ import annotations

import pytest
from conftest import MXNET_SKIP

pytestmark = pytest.mark.mxnet  # every test here needs the MXNet adapter
pytest.importorskip("mxnet", reason=MXNET_SKIP)

import json
import shutil

import numpy as np
import onnx
from conftest import INPUTS

from normexport import files, tables
from normexport.mx import exporting
from normexport.mxparams import read_params
from normexport.scaling import MinMaxScaler
from normexport.verification import edge_rows, verify_directory


def copy_model(trained_dir, tmp_path):
    target = tmp_path / "model"
    shutil.copytree(trained_dir / "model", target)
    return target


def test_all_runtimes_agree(trained_dir, problem):
    X, _ = problem
    report = verify_directory(trained_dir / "model", X)
    assert report.ok, report.table()
    assert report.runtimes == ["onnxruntime", "mxnet", "numpy", "onnx.reference"]
    # float32: each runtime is measured against the float64 NumPy evaluation
    assert report.reference == "numpy"
    assert [(p.a, p.b) for p in report.pairs] == [
        ("onnxruntime", "numpy"),
        ("mxnet", "numpy"),
        ("onnx.reference", "numpy"),
    ]
    assert report.rows == X.shape[0] + report.edge_rows
    ref_pairs = [p for p in report.pairs if "onnx.reference" in (p.a, p.b)]
    assert all(p.rows == 256 for p in ref_pairs)
    for pair in report.pairs:
        assert max(pair.max_rel.values()) < 1e-5
    # the rounding of a float32 evaluation is measured and reported, far below 1e-5
    assert set(report.rounding) == {"load", "offset"}
    assert 0 < max(report.rounding.values()) < 1e-6
    assert report.rtol == 1e-5 and not report.loosened


def test_report_is_json_and_a_table(trained_dir):
    report = verify_directory(trained_dir / "model")
    doc = json.loads(json.dumps(report.to_dict()))
    assert doc["format"] == "normexport.verification/1"
    assert doc["ok"] is True and doc["dtype"] == "float32" and doc["rtol"] == 1e-5
    assert set(doc["pairs"][0]["max_rel"]) == {"load", "offset"}
    table = report.table()
    assert "onnxruntime vs numpy" in table and table.endswith("result: PASS")


def tamper_params(path, name_part):
    """Change one weight in an MXNet params file, re-saving it with MXNet."""
    import mxnet as mx

    params = {k: mx.nd.array(v, dtype=v.dtype) for k, v in read_params(path).items()}
    key = next(k for k in sorted(params) if name_part in k)
    values = params[key].asnumpy()
    values.flat[0] += 0.05
    params[key] = mx.nd.array(values, dtype=values.dtype)
    mx.nd.save(str(path), params)


def test_tampered_mxnet_model_fails(trained_dir, tmp_path):
    model_dir = copy_model(trained_dir, tmp_path)
    tamper_params(model_dir / "model-0000.params", "dense0_weight")
    report = verify_directory(model_dir)
    assert not report.ok
    bad = {(p.a, p.b) for p in report.pairs if not p.ok}
    assert bad == {("mxnet", "numpy")}


def test_tampered_onnx_fails(trained_dir, tmp_path):
    model_dir = copy_model(trained_dir, tmp_path)
    model = onnx.load(str(model_dir / "model.onnx"))
    tensor = next(t for t in model.graph.initializer if "dense1_bias" in t.name)
    values = onnx.numpy_helper.to_array(tensor).copy()
    values[0] += 0.05
    tensor.CopyFrom(onnx.numpy_helper.from_array(values, tensor.name))
    onnx.save(model, str(model_dir / "model.onnx"))
    report = verify_directory(model_dir)
    assert not report.ok
    bad = {(p.a, p.b) for p in report.pairs if not p.ok}
    # both ONNX runtimes read the tampered file
    assert bad == {("onnxruntime", "numpy"), ("onnx.reference", "numpy")}


def test_tampered_scalers_fail(trained_dir, tmp_path):
    """The NumPy reference uses scalers.json; a changed shift must be caught."""
    model_dir = copy_model(trained_dir, tmp_path)
    doc = files.read_json(model_dir / "scalers.json")
    doc["outputs"]["inverse_shift"][0] += 1.0
    doc["outputs"]["shift"][0] = (
        -doc["outputs"]["inverse_shift"][0] / doc["outputs"]["inverse_scale"][0]
    )
    files.write_json(model_dir / "scalers.json", doc)
    assert not verify_directory(model_dir).ok


def test_chunking_gives_the_same_answer(trained_dir, problem):
    X, _ = problem
    whole = verify_directory(trained_dir / "model", X)
    chunked = verify_directory(trained_dir / "model", X, chunk_rows=37)
    # Kernels may round differently at other batch sizes, so values match to tolerance.
    assert whole.ok and chunked.ok
    assert [p.rows for p in whole.pairs] == [p.rows for p in chunked.pairs]
    for a, b in zip(whole.pairs, chunked.pairs):
        for name in a.max_rel:
            assert abs(a.max_rel[name] - b.max_rel[name]) < 1e-5


def test_rows_samples_and_rtol_overrides(trained_dir, problem):
    X, _ = problem
    report = verify_directory(trained_dir / "model", X, rows=50, rtol=1e-30)
    assert report.data_rows == 50
    assert not report.ok  # float32 cannot meet 1e-30: the threshold is applied


def test_edge_rows_cover_min_max_mid_and_beyond():
    sc = MinMaxScaler().fit(np.array([[0.0, 10.0], [2.0, 30.0]]), columns=["a", "b"])
    rows = edge_rows(sc)
    for column, (low, high) in enumerate([(0.0, 2.0), (10.0, 30.0)]):
        values = set(rows[:, column].tolist())
        width = high - low
        assert {low, high, (low + high) / 2, low - width / 2, high + width / 2} <= values


def test_wrong_width_rows_are_refused(trained_dir):
    with pytest.raises(Exception, match="must have 3 columns"):
        verify_directory(trained_dir / "model", np.ones((4, 2)))


def test_verify_reads_data_columns_by_name(trained_dir, tmp_path):
    """The table's columns in another order, with an extra one: read by name, the
    streamed verdict is the in-memory one on the same rows."""
    X = tables.load_columns(trained_dir / "data.csv", INPUTS)
    shuffled = tmp_path / "shuffled.csv"
    order = INPUTS[::-1]
    rows = "".join(
        f"{i}," + ",".join(repr(float(X[i, INPUTS.index(c)])) for c in order) + "\n"
        for i in range(len(X))
    )
    shuffled.write_text("id," + ",".join(order) + "\n" + rows)
    streamed = verify_directory(trained_dir / "model", data=shuffled)
    in_memory = verify_directory(trained_dir / "model", X)
    assert streamed.ok and in_memory.ok
    assert streamed.rows == in_memory.rows and streamed.data_rows == len(X)
    # the same rows: each runtime's rounding may differ with the batch it ran in, not more
    for a, b in zip(streamed.pairs, in_memory.pairs, strict=True):
        for name in a.max_rel:
            assert abs(a.max_rel[name] - b.max_rel[name]) <= streamed.rtol, (a, b)


def test_onnx_reference_is_skipped_for_large_models_and_says_why(trained_dir, monkeypatch):
    from normexport import runtimes

    monkeypatch.setattr(runtimes, "REFERENCE_MAX_BYTES", 100)
    report = verify_directory(trained_dir / "model")
    assert report.ok
    assert "onnx.reference" not in report.runtimes
    assert "runs models up to 0 MiB" in report.skipped["onnx.reference"]
    assert "skipped onnx.reference" in report.table()


_EXPORTS: dict = {}


def exported(tmp_path_factory, scalers, dtype, activation):
    """One spliced export per dtype × activation, shared by the batch sizes."""
    from conftest import random_net

    key = (dtype, activation)
    if key not in _EXPORTS:
        out = tmp_path_factory.mktemp(f"{dtype}-{activation}")
        exporting.export(random_net(activation, dtype), *scalers, out / "m")
        _EXPORTS[key] = out / "m"
    return _EXPORTS[key]


@pytest.mark.parametrize("batch", [1, 7, 4096])
@pytest.mark.parametrize("activation", ["sigmoid", "tanh", "relu", "softrelu"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_all_runtimes_agree_at_each_batch_size(
    tmp_path_factory, problem, scalers, dtype, activation, batch
):
    """Every runtime is called with `batch` rows at a time (chunk size) and they agree."""
    from conftest import RTOL

    model_dir = exported(tmp_path_factory, scalers, dtype, activation)
    X = np.resize(problem[0], (batch, 3))
    report = verify_directory(model_dir, X, chunk_rows=batch)
    assert report.ok, report.table()
    assert report.runtimes == ["onnxruntime", "mxnet", "numpy", "onnx.reference"]
    assert report.rtol == RTOL[dtype]
    assert report.data_rows == batch
