"""Transforms through the MXNet adapter: the spliced/folded MXNet model and its ONNX export,
each transform × dtype × mode, against a NumPy float64 truth; and train --transform end
to end."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from conftest import RTOL, mxnet_predict, random_net

import normexport as nx
from normexport.cli import main
from normexport.reference import NumpyNet

pytestmark = pytest.mark.mxnet
mx = pytest.importorskip("mxnet")

TRUTH_OPS = {"log": "Log", "log1p": "Log", "asinh": "Asinh"}
IN_COLUMNS, OUT_COLUMNS = ["a", "b", "c"], ["u", "v", "w"]


def raw(name: str, n: int, rng: np.random.Generator) -> np.ndarray:
    magnitude = 10.0 ** rng.uniform(-2, 3, (n, 3))
    if name == "asinh":
        return magnitude * rng.choice([-1.0, 1.0], (n, 3))
    return magnitude - 0.5 * (magnitude < 0.5) if name == "log1p" else magnitude


CASES = {"mixed": (["b"], ["u", "w"]), "all": (IN_COLUMNS, OUT_COLUMNS)}


def fitted(name: str, case: str, seed: int = 0):
    rng = np.random.default_rng(seed)
    in_cols, out_cols = CASES[case]
    X, Y = raw(name, 300, rng), raw(name, 300, rng)
    in_sc = nx.MinMaxScaler(transform=dict.fromkeys(in_cols, name)).fit(X, columns=IN_COLUMNS)
    out_sc = nx.MinMaxScaler(transform=dict.fromkeys(out_cols, name)).fit(
        Y, columns=OUT_COLUMNS, target=True
    )
    return in_sc, out_sc, X


def tolerance(out_sc, Y: np.ndarray, dtype: str) -> np.ndarray:
    """Range-relative, per output: the dtype's tolerance, times how much the inverse
    transform stretches a normalized error (|dy/dy_norm| ≈ |y|·inverse_scale for exp
    and sinh), relative to the output's span."""
    stretch = np.abs(Y).max(axis=0) * np.abs(out_sc.inverse_affine()[0]) / out_sc.span()
    stretch = np.where([k is not None for k in out_sc.transforms_], stretch, 1.0)
    return RTOL[dtype] * np.maximum(1.0, stretch)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("mode", ["splice", "fold"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", sorted(TRUTH_OPS))
def test_exported_transforms_match_numpy_truth(tmp_path, name, dtype, mode, case):
    in_sc, out_sc, X = fitted(name, case)
    net = random_net("tanh", dtype, n_in=3, n_out=3)
    out = nx.export(net, in_sc, out_sc, tmp_path / "m", mode=mode)
    # the truth: the scalers' NumPy maps around the plain net, all in float64
    plain = NumpyNet(out / "net-symbol.json", out / "net-0000.params")
    truth = out_sc.inverse_transform(plain(in_sc.transform(X)))
    tol = tolerance(out_sc, truth, dtype)
    got_mx = mxnet_predict(out, "model", X.astype(dtype), dtype).astype(np.float64)
    assert np.all(np.max(np.abs(got_mx - truth), axis=0) / out_sc.span() <= tol)
    import onnxruntime as ort

    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    got_onnx = session.run(None, {"input": X.astype(dtype)})[0].astype(np.float64)
    assert np.all(np.max(np.abs(got_onnx - truth), axis=0) / out_sc.span() <= tol)
    # the raw-in/raw-out MXNet symbol runs in the NumPy reference too (its transform ops)
    spliced = NumpyNet(out / "model-symbol.json", out / "model-0000.params")
    got_np = spliced(X.astype(dtype)).astype(np.float64)
    assert np.all(np.max(np.abs(got_np - truth), axis=0) / out_sc.span() <= tol)
    model = onnx.load(out / "model.onnx")
    kinds = [n.op_type for n in model.graph.node]
    names = [n.name for n in model.graph.node]
    assert ("Slice" in kinds) == (case == "mixed")
    if dtype == "float32" or name != "asinh":
        assert TRUTH_OPS[name] in kinds
    # run 0 ("all") or 1 ("mixed": column a untouched); float64 asinh is rewritten,
    # its nodes named after the original
    k = 0 if case == "all" else 1
    assert any(n.startswith(f"normexport_in_{name}{k}") for n in names)
    manifest = json.loads((out / "manifest.json").read_text())
    if mode == "fold":
        assert "BatchNormalization" not in kinds
        assert manifest["fold"]["output_transforms"] == ", ".join(
            f"{name}({c})" for c in CASES[case][1]
        )
    else:
        assert kinds.count("BatchNormalization") == 2  # the affines, rebuilt as ever
    assert manifest["verification"]["ok"]


def test_mxnet_and_bake_write_the_same_transform_nodes(tmp_path):
    """Export (MXNet's exporter + our converters) and bake (the ONNX builder) agree."""
    in_sc, out_sc, _ = fitted("log1p", "mixed")
    net = random_net("tanh", "float32", n_in=3, n_out=3)
    out = nx.export(net, in_sc, out_sc, tmp_path / "m", mode="splice")
    exported = onnx.load(out / "model.onnx")

    def transform_nodes(model):
        return [
            (n.op_type, n.name)
            for n in model.graph.node
            if n.name.startswith(("normexport_in_", "normexport_out_")) and "affine" not in n.name
        ]

    from normexport.onnx_transforms import splice_transforms
    from normexport.transforms import side_ops

    bare = onnx.helper.make_model(
        onnx.helper.make_graph(
            [onnx.helper.make_node("Identity", ["input"], ["output"], name="net")],
            "g",
            [onnx.helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, ["batch", 3])],
            [onnx.helper.make_tensor_value_info("output", onnx.TensorProto.FLOAT, ["batch", 3])],
        ),
        opset_imports=[onnx.helper.make_opsetid("", 13)],
    )
    baked = splice_transforms(bare, in_sc.transforms_, side_ops(out_sc.transforms_, "out"))
    assert transform_nodes(exported) == transform_nodes(baked)


def test_train_transform_end_to_end(tmp_path, capsys):
    """train --transform -> export -> predict, by the CLI, on targets spanning decades."""
    rng = np.random.default_rng(0)
    n = 400
    x1, x2 = rng.uniform(1, 3, n), rng.uniform(0, 1, n)
    y = np.exp(2.0 * x1) * (1 + x2)  # 2.7 decades
    csv = tmp_path / "t.csv"
    rows = "\n".join(f"{a!r},{b!r},{c!r}" for a, b, c in zip(x1, x2, y, strict=True))
    csv.write_text("x1,x2,y\n" + rows + "\n")
    args = ["train", str(csv), "--inputs", "x1,x2", "--targets", "y", "--out", str(tmp_path / "m")]
    args += ["--transform", "y=log", "--epochs", "30", "--hidden", "8", "--seed", "1"]
    assert main(args) == 0
    doc = json.loads((tmp_path / "m" / "scalers.json").read_text())
    assert doc["format"] == "normexport.scalers/2"
    assert doc["outputs"]["transform"] == {"y": "log"}
    assert main(["export", str(tmp_path / "m")]) == 0
    assert main(["predict", str(tmp_path / "m"), str(csv), "--out", str(tmp_path / "p.csv")]) == 0
    predicted = np.loadtxt(tmp_path / "p.csv", delimiter=",", skiprows=1, ndmin=2)[:, -1]
    assert np.all(predicted > 0)  # exp of anything is positive
    # trained briefly, the fit is rough; it must still be a fit, not noise
    assert np.median(np.abs(predicted / y - 1)) < 0.5
    capsys.readouterr()
    assert main(["export", str(tmp_path / "m"), "--mode", "fold", "--force"]) == 0
    assert "output transforms kept as nodes (only the affine folds): log(y)" in (
        capsys.readouterr().out
    )
    assert main(["inspect", str(tmp_path / "m")]) == 0
    shown = capsys.readouterr().out
    line = next(t for t in shown.splitlines() if t.strip().startswith("output y"))
    assert line.split()[2:4] == ["minmax", "log"]
    assert '"output_transforms": "log(y)"' in shown  # the fold plan in the metadata


def test_train_transform_out_of_domain_names_the_csv_line(tmp_path, capsys):
    csv = tmp_path / "t.csv"
    csv.write_text("x1,y\n1,2\n\n2,3\n3,-1\n")
    out = tmp_path / "m"
    args = ["train", str(csv), "--inputs", "x1", "--targets", "y", "--out", str(out)]
    code = main([*args, "--transform", "y=log"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"normexport: error: {csv}:5: column 'y': value -1 is outside the domain of log (needs > 0)"
    ]
    assert not out.exists()


@pytest.mark.parametrize("mode", ["splice", "fold"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_normalized_block_with_transforms(tmp_path, dtype, mode):
    """The Gluon block computes, trains on and exports the transformed normalization."""
    from normexport.gluon import Normalized

    in_sc, out_sc, X = fitted("log", "mixed")
    inner = random_net("tanh", dtype, n_in=3, n_out=3)
    inner.export(str(tmp_path / "inner"))  # the truth: the plain net in NumPy float64
    net = NumpyNet(tmp_path / "inner-symbol.json", tmp_path / "inner-0000.params")
    block = Normalized(inner, in_sc, out_sc)
    block.hybridize()
    x = mx.nd.array(X[:50], dtype=dtype)
    truth = out_sc.inverse_transform(net(in_sc.transform(X[:50])))
    tol = tolerance(out_sc, truth, dtype)
    got = block(x).asnumpy().astype(np.float64)
    assert np.all(np.max(np.abs(got - truth), axis=0) / out_sc.span() <= tol)
    # the loss is the plain net's on the scalers' NumPy maps
    Y = truth * 1.01
    with mx.autograd.record():
        loss = block.loss(x, mx.nd.array(Y, dtype=dtype))
    Yn = out_sc.transform(Y)
    Zn = net(in_sc.transform(X[:50]))
    want = 0.5 * np.mean((Zn - Yn) ** 2, axis=1)
    # a mean of squared differences of values near 1: a few hundred ulps of the dtype
    np.testing.assert_allclose(loss.asnumpy(), want, rtol=RTOL[dtype] * 100, atol=RTOL[dtype])
    files = block.export(tmp_path / "raw", mode=mode)
    loaded = mxnet_predict(tmp_path, "raw", X[:50].astype(dtype), dtype).astype(np.float64)
    assert files[0].endswith("raw-symbol.json")
    assert np.all(np.max(np.abs(loaded - truth), axis=0) / out_sc.span() <= tol)


def test_verification_reports_inputs_outside_the_domain(tmp_path):
    in_sc, out_sc, X = fitted("log", "mixed")
    net = random_net("tanh", "float64", n_in=3, n_out=3)
    out = nx.export(net, in_sc, out_sc, tmp_path / "m")
    rows = X[:20].copy()
    rows[[3, 7], 1] = [0.0, -5.0]  # column b is under log
    report = nx.verify(out, rows)
    assert report.ok  # NaN/-inf rows agree in every runtime
    assert (
        "column 'b': 2 of the 20 data rows lie outside the domain of log (<= 0); the "
        "transform gives NaN (-inf at the boundary) and the model's outputs for them mean nothing"
    ) in report.warnings
    assert report.transformed == {"u": "log", "w": "log"}  # compared as log(u), log(w)


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ("y=sqrt", "--transform: column 'y': unknown transform 'sqrt' (known: log, log1p, asinh)"),
        ("y", "argument --transform: 'y' is not COLUMN=TRANSFORM"),
        ("y=log,y=log1p", "argument --transform: column 'y' is given twice"),
        ("z=log", "--transform: transform for column 'z', which is not among the columns"),
    ],
)
def test_train_refuses_a_bad_transform_in_one_line(tmp_path, capsys, given, message):
    csv = tmp_path / "t.csv"
    csv.write_text("x1,y\n1,2\n2,3\n")
    out = tmp_path / "m"
    args = ["train", str(csv), "--inputs", "x1", "--targets", "y", "--out", str(out)]
    assert main([*args, "--transform", given]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()
