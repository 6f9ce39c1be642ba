"""Fold mode: bare op lists and equivalence with splice, including extreme scales."""

from __future__ import annotations

import pytest
from conftest import MXNET_SKIP

pytestmark = pytest.mark.mxnet  # every test here needs the MXNet adapter
pytest.importorskip("mxnet", reason=MXNET_SKIP)

import numpy as np
import onnx
import onnxruntime as ort
from conftest import ACTIVATIONS, DTYPES, RTOL, net_with_output_activation, random_net

from normexport import files, inspection, modeldir
from normexport.mx import exporter, exporting, graph
from normexport.scaling import AffineScaler, scalers_to_dict


def extreme_scalers(seed: int, n_in: int = 3, n_out: int = 2):
    """Column ranges from 1e-6 to 1e6 (scales 1e6 … 1e-6), offsets of the range's order."""
    rng = np.random.default_rng(seed)
    ranges_in = 10.0 ** rng.uniform(-6, 6, n_in)
    ranges_in[:2] = [1e-6, 1e6]
    lows_in = rng.uniform(-1, 1, n_in) * ranges_in
    ranges_out = 10.0 ** rng.uniform(-6, 6, n_out)
    ranges_out[0] = 1e6
    lows_out = rng.uniform(-1, 1, n_out) * ranges_out
    in_sc = AffineScaler.from_affine(1 / ranges_in, -lows_in / ranges_in)
    out_sc = AffineScaler.from_affine(ranges_out, lows_out, inverse=True)
    return in_sc, out_sc, lows_in, ranges_in


def onnx_of(tmp_path, name, checkpoint, dtype, n_in=3, n_out=2):
    path = tmp_path / f"{name}.onnx"
    exporter.convert(checkpoint, path, n_inputs=n_in, n_outputs=n_out, dtype=dtype, metadata={})
    return path


def run(path, X):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"input": X}
    )[0]


def test_op_lists_of_bare_spliced_and_folded(tmp_path, scalers):
    in_sc, out_sc = scalers
    ck = graph.from_block(random_net("sigmoid", "float32"))
    bare = onnx_of(tmp_path, "bare", ck, "float32")
    spliced = onnx_of(
        tmp_path, "splice", graph.splice(ck, in_sc.affine(), out_sc.inverse_affine()), "float32"
    )
    folded = onnx_of(
        tmp_path, "fold", graph.fold(ck, in_sc.affine(), out_sc.inverse_affine())[0], "float32"
    )
    ops = {
        name: [n.op_type for n in onnx.load(str(p)).graph.node]
        for name, p in (("bare", bare), ("splice", spliced), ("fold", folded))
    }
    assert ops["bare"] == ["Gemm", "Sigmoid", "Gemm", "Sigmoid", "Gemm"]
    assert ops["fold"] == ops["bare"]
    assert ops["splice"] == ["BatchNormalization", *ops["bare"], "BatchNormalization"]
    assert not {"Mul", "Add", "Sub", "Div"} & set(ops["fold"])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("seed", [0, 1])
def test_fold_equals_splice_at_extreme_scales(tmp_path, dtype, activation, seed):
    in_sc, out_sc, lows, ranges = extreme_scalers(seed)
    ck = graph.from_block(random_net(activation, dtype, seed=seed))
    spliced = onnx_of(
        tmp_path, "s", graph.splice(ck, in_sc.affine(), out_sc.inverse_affine()), dtype
    )
    folded_ck, plan = graph.fold(ck, in_sc.affine(), out_sc.inverse_affine())
    assert (plan.input, plan.output) == ("folded", "folded")
    folded = onnx_of(tmp_path, "f", folded_ck, dtype)
    rng = np.random.default_rng(seed)
    # raw rows over 1.5× each column's training range
    X = (lows + rng.uniform(-0.25, 1.25, (257, 3)) * ranges).astype(dtype)
    a, b = run(spliced, X), run(folded, X)
    # float64 reference through the scalers, in NumPy
    span = out_sc.span()
    err = np.abs(a.astype(np.float64) - b) / span
    # Both round differently: splice rounds x*s+t, fold rounds W·diag(s); the gap is a
    # few ulps of the normalized activations, times the output range.
    assert err.max() < RTOL[dtype], err.max()


def test_fold_metadata_records_the_plan(tmp_path, scalers):
    """manifest, inspect and ONNX metadata say which sides were folded."""

    in_sc, out_sc = scalers
    net = net_with_output_activation("relu")
    out = exporting.export(net, in_sc, out_sc, tmp_path / "m", mode="fold")
    manifest = files.read_json(out / "manifest.json")
    assert manifest["fold"]["input"] == "folded"
    assert manifest["fold"]["output"] == "spliced"
    assert "activation (relu)" in manifest["fold"]["output_reason"]
    meta = {p.key: p.value for p in onnx.load(str(out / "model.onnx")).metadata_props}
    assert meta["normexport.mode"] == "fold"
    assert '"output": "spliced"' in meta["normexport.fold"]
    text = inspection.format_inspection(inspection.inspect(out))
    assert "output side spliced" in modeldir.describe_directory(out)
    assert "normexport.fold" in text
    assert scalers_to_dict(in_sc, out_sc, "float32")["dtype"] == "float32"
