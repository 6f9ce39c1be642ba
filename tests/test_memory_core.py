"""Export's memory floor, core side: arrays are read, cast and written in blocks, and
large models are verified without onnxruntime's second copy (no MXNet needed).

Peak memory itself is measured by ``scripts/bench`` (export section); these tests pin
the mechanisms: block boundaries that split tensors give the same bytes, and the options
that keep one copy of the weights are set.
"""

from __future__ import annotations

import struct

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from test_core import MODEL

from normexport import mxparams, onnxkit, reference, runtimes
from normexport.modeldir import load_scalers

V3 = 0xF993FACA


def params_file(path, arrays: dict[str, np.ndarray]) -> None:
    """An MXNet ``.params`` file (V3 records), written without MXNet."""
    flags = {np.dtype("<f4"): 0, np.dtype("<f8"): 1}
    out = struct.pack("<QQQ", 0x112, 0, len(arrays))
    for value in arrays.values():
        out += struct.pack("<Iii", V3, 0, value.ndim) + struct.pack(f"<{value.ndim}q", *value.shape)
        out += struct.pack("<iii", 1, 0, flags[value.dtype]) + value.tobytes()
    out += struct.pack("<Q", len(arrays))
    out += b"".join(struct.pack("<Q", len(k)) + k.encode() for k in arrays)
    path.write_bytes(out)


def test_params_filled_in_blocks_equal_the_plain_read(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    arrays = {
        "arg:w": rng.standard_normal((37, 5)).astype("<f4"),  # 37 rows: blocks of 6, last 1
        "arg:b": rng.standard_normal(37),
        "arg:v": rng.standard_normal((2, 3, 4)).astype("<f4"),
        "aux:e": np.zeros((0,), "<f4"),
    }
    path = tmp_path / "p.params"
    params_file(path, arrays)
    monkeypatch.setattr(mxparams, "CHUNK_BYTES", 6 * 5 * 4)
    blocks = []

    def empty(shape, dtype):
        dest = np.full(shape, np.nan, dtype)
        blocks.append(dest)
        return dest

    filled = mxparams.read_params(path, empty=empty)
    plain = mxparams.read_params(path)
    assert list(filled) == list(arrays)
    for key, value in arrays.items():
        assert filled[key].dtype == value.dtype and filled[key].shape == value.shape
        np.testing.assert_array_equal(filled[key], value)
        np.testing.assert_array_equal(plain[key], value)
    assert all(any(a is b for b in blocks) for a in filled.values())  # filled in place


def test_params_convert_and_empty_are_exclusive(tmp_path):
    path = tmp_path / "p.params"
    params_file(path, {"arg:w": np.ones((2, 2), "<f4")})
    with pytest.raises(ValueError, match="convert or empty"):
        mxparams.read_params(path, np.asarray, empty=np.empty)


def gemm_model(w: np.ndarray) -> onnx.ModelProto:
    """``output = input @ w.T`` with ``w`` as a weightless initializer (dims only)."""
    elem = helper.np_dtype_to_tensor_dtype(w.dtype)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["input", "w"], ["output"], transB=1)],
        "g",
        [helper.make_tensor_value_info("input", elem, ["batch", w.shape[1]])],
        [helper.make_tensor_value_info("output", elem, ["batch", w.shape[0]])],
        [TensorProto(name="w", dims=w.shape, data_type=elem)],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


@pytest.mark.parametrize("external", [None, "m.onnx.data"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_weights_written_in_blocks_load_back_exactly(tmp_path, monkeypatch, external, dtype):
    w = np.random.default_rng(1).standard_normal((13, 7)).astype(dtype)
    monkeypatch.setattr(onnxkit, "WRITE_CHUNK_BYTES", 3 * 7 * w.itemsize)  # 5 blocks, last 1
    path = tmp_path / "m.onnx"
    written = onnxkit.write_model(gemm_model(w), path, {"w": w}, external=external)
    assert written == [path] + ([tmp_path / external] if external else [])
    onnx.checker.check_model(str(path), full_check=True)
    loaded = onnx.numpy_helper.to_array(onnx.load(str(path)).graph.initializer[0])
    np.testing.assert_array_equal(loaded, w)
    if external:
        assert (tmp_path / external).stat().st_size == w.nbytes
        assert path.stat().st_size < 1024


def test_weights_of_the_wrong_shape_or_dtype_are_refused(tmp_path):
    w = np.ones((3, 2), np.float32)
    for wrong in (np.ones((2, 2), np.float32), np.ones((3, 2), np.float64)):
        with pytest.raises(onnxkit.GraphError, match="initializer w: .* does not fit float32"):
            onnxkit.write_model(gemm_model(w), tmp_path / "m.onnx", {"w": wrong})
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("rows", [1, 5])
def test_float64_product_of_float32_weights_cast_in_blocks(monkeypatch, rows):
    """The reference's float64 evaluation casts float32 weights a block of rows at a time;
    the result is the product with the whole matrix cast (float64 sums of the same terms,
    tolerance a few float64 ulps of the output)."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((rows, 40))
    w = rng.standard_normal((33, 40)).astype(np.float32)
    monkeypatch.setattr(reference, "CAST_BLOCK_BYTES", 4 * 40 * 8)  # 9 blocks, last 1
    got = reference._matmul_transposed(x, w)
    want = x @ w.astype(np.float64).T
    assert got.dtype == np.float64 and got.shape == (rows, 33)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-13 * np.abs(want).max())
    same = reference._matmul_transposed(x.astype(np.float32), w)
    np.testing.assert_array_equal(same, x.astype(np.float32) @ w.T)


def test_reference_in_blocks_of_rows_and_weights_agrees(monkeypatch):
    """tests/data/mxnet_model (float32): the float64 reference, its weights cast in
    blocks and its rows run in blocks, gives what it gives in one piece (to float64
    rounding) and the MXNet profile's recorded predictions within float32 rounding."""
    in_sc, out_sc, _ = load_scalers(MODEL / "scalers.json")
    X = np.loadtxt(MODEL.parent / "rows.csv", delimiter=",", skiprows=1, ndmin=2)[:, 1:4]
    want = np.loadtxt(MODEL.parent / "mxnet_predictions.txt", ndmin=2)
    whole = reference.numpy_runtime(MODEL, in_sc, out_sc)(X)
    monkeypatch.setattr(reference, "CAST_BLOCK_BYTES", 8)
    monkeypatch.setattr(reference, "ACTIVATION_BYTES", 3 * 8 * 8)  # 3 rows of a width-8 layer
    got = reference.numpy_runtime(MODEL, in_sc, out_sc)(X)
    assert got.dtype == np.float64 and got.shape == want.shape == (len(X), 2)
    span = out_sc.span()
    assert np.max(np.abs(got - whole) / span) < 1e-14
    assert np.max(np.abs(got - want) / span) < 1e-5  # float32 runtime against float64


def test_large_models_are_verified_without_prepacking(tmp_path, monkeypatch):
    w = np.ones((4, 3), np.float32)
    path = tmp_path / "m.onnx"
    onnxkit.write_model(gemm_model(w), path, {"w": w}, external="m.onnx.data")
    key = "session.disable_prepacking"
    small = runtimes.session_options(path)
    assert not _has_entry(small, key)
    monkeypatch.setattr(runtimes, "PREPACK_MAX_BYTES", path.stat().st_size)  # data file counts
    large = runtimes.session_options(path)
    assert large.get_session_config_entry(key) == "1"
    X = np.arange(6, dtype=np.float32).reshape(2, 3)
    session = ort.InferenceSession(str(path), large, providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(session.run(None, {"input": X})[0], X @ w.T)


def _has_entry(options: ort.SessionOptions, key: str) -> bool:
    try:
        options.get_session_config_entry(key)
    except Exception:  # onnxruntime raises for a key that is not set
        return False
    return True
