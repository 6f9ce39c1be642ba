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
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import load_external_data_for_model
from onnx_models import affines, gemm_mlp, raw_rows, run
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


# ------------------------------------------------------------------ inline weights as a view


def test_inline_view_leaves_large_tensors_in_the_file(tmp_path):
    """Each inline tensor of at least ``min_bytes`` refers to its bytes in the file; read
    back through onnx's external data loader they equal the file's tensors, and the rest
    of the model parses as protobuf parses it."""
    model = gemm_mlp(hidden=40)
    path = tmp_path / "m.onnx"
    onnx.save_model(model, str(path))
    view = onnxkit.load_onnx(path, with_weights=False, leave_in_file=200)
    by_name = {t.name: t for t in view.graph.initializer}
    assert [t.name for t in view.graph.initializer] == [t.name for t in model.graph.initializer]
    assert {n for n, t in by_name.items() if t.external_data} == {"W1", "W2"}  # b1: 160 bytes
    assert all(e.value == "m.onnx" for e in by_name["W1"].external_data if e.key == "location")
    stripped = onnx.ModelProto()
    stripped.CopyFrom(view)
    del stripped.graph.initializer[:]
    del model.graph.initializer[:], view.graph.initializer[:]
    assert view == stripped and view.graph == model.graph
    load_external_data_for_model(stripped, str(tmp_path))  # (no initializers: a no-op)
    full = onnx.load(str(path))
    for tensor in by_name.values():
        wanted = next(t for t in full.graph.initializer if t.name == tensor.name)
        np.testing.assert_array_equal(
            numpy_helper.to_array(tensor, base_dir=str(tmp_path)), numpy_helper.to_array(wanted)
        )


def test_inline_view_of_a_streamed_file(tmp_path):
    """write_model appends each tensor as its own ``graph`` field (protobuf merges them):
    the view reads every occurrence."""
    w = np.random.default_rng(3).standard_normal((9, 4)).astype(np.float32)
    path = tmp_path / "s.onnx"
    onnxkit.write_model(gemm_model(w), path, {"w": w})
    view = onnxkit.load_onnx(path, with_weights=False, leave_in_file=1)
    (tensor,) = view.graph.initializer
    assert tensor.data_location == TensorProto.EXTERNAL and list(tensor.dims) == [9, 4]
    np.testing.assert_array_equal(numpy_helper.to_array(tensor, base_dir=str(tmp_path)), w)
    assert [n.op_type for n in view.graph.node] == ["Gemm"]


@pytest.mark.parametrize("cut", [1, 30, 700])
def test_inline_view_of_a_truncated_file_is_one_line(tmp_path, cut):
    path = tmp_path / "t.onnx"
    onnx.save_model(gemm_mlp(hidden=40), str(path))
    path.write_bytes(path.read_bytes()[:-cut])
    with pytest.raises(onnxkit.GraphError, match=r"t.onnx: not an ONNX model \(") as info:
        onnxkit.load_onnx(path, with_weights=False, leave_in_file=200)
    assert "\n" not in str(info.value)


def test_bake_of_large_inline_weights_reads_them_from_the_file(tmp_path, monkeypatch):
    """Above the threshold bake loads a view (no weights held), checks the graph, writes
    the weights from the file through memory maps and runs the original in onnxruntime
    from the view; the result is what a bake of the same model below it gives."""
    import normexport as nx

    model = gemm_mlp(hidden=300)  # W1, W2: 3600 and 2400 bytes, at least 1 KiB
    src = tmp_path / "in.onnx"
    onnx.save_model(model, str(src))
    (in_scale, in_shift), (out_scale, out_shift) = affines(3, 2)
    factors = np.vstack(
        [np.column_stack([in_scale, in_shift]), np.column_stack([out_scale, out_shift])]
    )
    small = nx.bake(src, tmp_path / "small.onnx", factors=factors)
    assert small.report.ok and not (tmp_path / "small.onnx.data").exists()

    monkeypatch.setattr(onnxkit, "EXTERNAL_DATA_THRESHOLD", 100)
    loaded = []
    load = onnxkit.load_onnx
    monkeypatch.setattr(onnxkit, "load_onnx", lambda *a, **k: loaded.append(k) or load(*a, **k))
    large = nx.bake(src, tmp_path / "large.onnx", factors=factors)
    assert large.report.ok and (tmp_path / "large.onnx.data").is_file()
    assert {"with_weights": False, "leave_in_file": 1024} in loaded
    X = raw_rows((in_scale, in_shift)).astype(np.float32)
    np.testing.assert_array_equal(
        run(str(tmp_path / "large.onnx"), X), run(str(tmp_path / "small.onnx"), X)
    )


def test_bake_of_a_large_inline_model_with_a_broken_graph_is_refused(tmp_path, monkeypatch):
    """The checker still sees the graph when the weights stay in the file."""
    import normexport as nx

    model = gemm_mlp(hidden=40)
    model.graph.node[1].input[0] = "nowhere"
    src = tmp_path / "bad.onnx"
    onnx.save_model(model, str(src))
    monkeypatch.setattr(onnxkit, "EXTERNAL_DATA_THRESHOLD", 100)
    with pytest.raises(nx.NormexportError, match=r"bad.onnx: not a valid ONNX model .*nowhere"):
        nx.bake(src, tmp_path / "out.onnx", factors=np.ones((5, 2)))
    assert not (tmp_path / "out.onnx").exists()


def test_bake_of_a_large_inline_model_through_a_symbolic_link(tmp_path, monkeypatch):
    """A link's name is not its target's: such an input is loaded whole, and bakes."""
    import normexport as nx

    (tmp_path / "models").mkdir()
    real = tmp_path / "models" / "real.onnx"
    onnx.save_model(gemm_mlp(hidden=300), str(real))
    (tmp_path / "links").mkdir()
    link = tmp_path / "links" / "link.onnx"  # beside neither the file it names nor its data
    link.symlink_to(real)
    monkeypatch.setattr(onnxkit, "EXTERNAL_DATA_THRESHOLD", 100)
    result = nx.bake(link, tmp_path / "links" / "out.onnx", factors=np.ones((5, 2)))
    assert result.report.ok and (tmp_path / "links" / "out.onnx.data").is_file()
