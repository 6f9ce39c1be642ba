"""ONNX conversion: interface contract, dtypes, opsets, post-processing passes."""

from __future__ import annotations

import pytest
from conftest import MXNET_SKIP

pytestmark = pytest.mark.mxnet  # every test here needs the MXNet adapter
pytest.importorskip("mxnet", reason=MXNET_SKIP)

import json

import numpy as np
import onnx
import onnxruntime as ort
from conftest import ACTIVATIONS, DTYPES, RTOL, random_net, range_relative_error
from onnx import TensorProto, helper, numpy_helper

from normexport import onnxkit, passes
from normexport.errors import GraphError
from normexport.mx import exporter, graph
from normexport.scaling import scalers_to_dict

ELEM = {"float32": TensorProto.FLOAT, "float64": TensorProto.DOUBLE}


def convert(tmp_path, net, in_sc, out_sc, dtype, mode="splice", opset=13):
    ck = graph.from_block(net)
    if mode == "splice":
        model = graph.splice(ck, in_sc.affine(), out_sc.inverse_affine())
    else:
        model, _ = graph.fold(ck, in_sc.affine(), out_sc.inverse_affine())
    path = tmp_path / "model.onnx"
    meta = onnxkit.metadata_entries(mode, scalers_to_dict(in_sc, out_sc, dtype), {})
    exporter.convert(model, path, n_inputs=3, n_outputs=2, dtype=dtype, opset=opset, metadata=meta)
    return path


def reference(net, in_sc, out_sc, X, dtype):
    import mxnet as mx

    Xn = in_sc.transform(X.astype(dtype))
    return out_sc.inverse_transform(net(mx.nd.array(Xn, dtype=dtype)).asnumpy())


def assert_interface(model: onnx.ModelProto, dtype: str, n_in: int = 3, n_out: int = 2):
    graph_ = model.graph
    inits = {t.name for t in graph_.initializer}
    assert [i.name for i in graph_.input] == ["input"]
    assert not inits & {i.name for i in graph_.input}, "initializers listed among inputs"
    assert [o.name for o in graph_.output] == ["output"]
    for value, width in ((graph_.input[0], n_in), (graph_.output[0], n_out)):
        tensor = value.type.tensor_type
        assert tensor.elem_type == ELEM[dtype]
        assert tensor.shape.dim[0].dim_param == "batch"
        assert tensor.shape.dim[1].dim_value == width
    assert "Flatten" not in [n.op_type for n in graph_.node]
    assert graph_.name == "normexport_model"
    assert model.producer_name == "normexport"
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["normexport.version"]
    assert meta["normexport.mode"] in ("splice", "fold")
    scalers = json.loads(meta["normexport.scalers"])
    assert scalers["format"] == "normexport.scalers/1"
    assert scalers["dtype"] == dtype
    onnx.checker.check_model(model, full_check=True)


@pytest.mark.parametrize("batch", [1, 7, 4096])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_onnx_matches_trained_function(tmp_path, problem, scalers, dtype, activation, batch):
    X, _ = problem
    X = np.resize(X, (batch, 3))  # repeat rows to reach the batch size
    in_sc, out_sc = scalers
    net = random_net(activation, dtype)
    path = convert(tmp_path, net, in_sc, out_sc, dtype)
    model = onnx.load(str(path))
    assert_interface(model, dtype)
    ops = [n.op_type for n in model.graph.node]
    act = {"sigmoid": ["Sigmoid"], "tanh": ["Tanh"], "relu": ["Relu"], "softrelu": ["Softplus"]}[
        activation
    ]
    if activation == "softrelu" and dtype == "float64":
        act = passes.SOFTPLUS_EXPANSION  # onnxruntime has no double Softplus
    bn = "BatchNormalization"  # the spliced Mul+Add pairs, in their fastest exact form
    assert ops == [bn, "Gemm", *act, "Gemm", *act, "Gemm", bn]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": X.astype(dtype)})[0]
    assert got.dtype == np.dtype(dtype) and got.shape == (batch, 2)
    assert range_relative_error(got, reference(net, in_sc, out_sc, X, dtype), out_sc) < RTOL[dtype]


def test_float64_model_is_double_end_to_end(tmp_path, scalers):
    path = convert(tmp_path, random_net("sigmoid", "float64"), *scalers, "float64")
    model = onnx.load(str(path))
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.DOUBLE
    assert model.graph.output[0].type.tensor_type.elem_type == TensorProto.DOUBLE
    assert {t.data_type for t in model.graph.initializer} == {TensorProto.DOUBLE}
    assert "Cast" not in [n.op_type for n in model.graph.node]


def test_fold_onnx_has_bare_ops(tmp_path, scalers):
    path = convert(tmp_path, random_net("tanh", "float32"), *scalers, "float32", mode="fold")
    assert [n.op_type for n in onnx.load(str(path)).graph.node] == [
        "Gemm",
        "Tanh",
        "Gemm",
        "Tanh",
        "Gemm",
    ]


@pytest.mark.parametrize("opset", range(13, onnxkit.newest_opset() + 1))
def test_every_supported_opset_runs(tmp_path, problem, scalers, opset):
    X, _ = problem
    net = random_net("sigmoid", "float64")
    path = convert(tmp_path, net, *scalers, "float64", opset=opset)
    model = onnx.load(str(path))
    assert [o.version for o in model.opset_import if o.domain == ""] == [opset]
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"input": X}
    )[0]
    assert range_relative_error(got, reference(net, *scalers, X, "float64"), scalers[1]) < 1e-12


@pytest.mark.parametrize("opset", [11, 12, 99])
def test_unsupported_opset_is_refused(opset):
    with pytest.raises(GraphError, match=f"opset {opset} is not supported"):
        exporter.check_opset(opset)


def test_weights_are_raw_data_not_float_lists(tmp_path, scalers):
    path = convert(tmp_path, random_net("sigmoid", "float32", hidden=(64, 64)), *scalers, "float32")
    for tensor in onnx.load(str(path)).graph.initializer:
        assert tensor.raw_data and not tensor.float_data


def test_conversion_is_byte_reproducible(tmp_path, scalers):
    net = random_net("sigmoid", "float32")
    a = convert(tmp_path / "", net, *scalers, "float32").read_bytes()
    (tmp_path / "b").mkdir()
    b = convert(tmp_path / "b", net, *scalers, "float32").read_bytes()
    assert a == b


def test_external_data_for_large_models(tmp_path, scalers, monkeypatch):
    """The external-data path (above 64 MiB), exercised with a low threshold."""
    monkeypatch.setattr(onnxkit, "EXTERNAL_DATA_THRESHOLD", 1000)
    net = random_net("relu", "float32", hidden=(64,))
    path = convert(tmp_path, net, *scalers, "float32")
    assert (tmp_path / "model.onnx.data").is_file()
    model = onnx.load(str(path), load_external_data=False)
    weights = [t for t in model.graph.initializer if "dense" in t.name]
    assert weights and all(t.data_location == TensorProto.EXTERNAL for t in weights)
    X = np.random.default_rng(0).uniform(0, 1, (5, 3)).astype(np.float32)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"input": X}
    )[0]
    assert range_relative_error(got, reference(net, *scalers, X, "float32"), scalers[1]) < 1e-5


# ---------------------------------------------------------------- passes on tiny inline models


def tiny_exported_like() -> onnx.ModelProto:
    """What MXNet's exporter produces: initializers as inputs, Flatten before Gemm."""
    W = numpy_helper.from_array(np.ones((2, 3), np.float32), "fc_weight")
    b = numpy_helper.from_array(np.zeros(2, np.float32), "fc_bias")
    nodes = [
        helper.make_node("Flatten", ["data"], ["flat"], name=""),
        helper.make_node("Gemm", ["flat", "fc_weight", "fc_bias"], ["fc_fwd"], transB=1),
    ]
    graph_ = helper.make_graph(
        nodes,
        "mxnet_converted_model",
        [
            helper.make_tensor_value_info("data", TensorProto.FLOAT, ["batch", 3]),
            helper.make_tensor_value_info("fc_weight", TensorProto.FLOAT, [2, 3]),
            helper.make_tensor_value_info("fc_bias", TensorProto.FLOAT, [2]),
        ],
        [helper.make_tensor_value_info("fc_fwd", TensorProto.FLOAT, [None, 2])],
        [W, b],
    )
    return helper.make_model(graph_, opset_imports=[helper.make_opsetid("", 23)])


def test_passes_without_mxnet():
    model = tiny_exported_like()
    before = model.SerializeToString()
    out = passes.post_process(model, opset=13, metadata={"normexport.mode": "splice"})
    assert model.SerializeToString() == before, "passes must not mutate their input"
    assert [n.op_type for n in out.graph.node] == ["Gemm"]
    assert list(out.graph.node[0].input) == ["input", "fc_weight", "fc_bias"]
    assert list(out.graph.node[0].output) == ["output"]
    assert [i.name for i in out.graph.input] == ["input"]
    assert out.graph.output[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert [o.version for o in out.opset_import] == [13]
    onnx.checker.check_model(out, full_check=True)
    X = np.arange(6, dtype=np.float32).reshape(2, 3)
    got = ort.InferenceSession(out.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"input": X}
    )[0]
    np.testing.assert_array_equal(got, X.sum(axis=1, keepdims=True).repeat(2, axis=1))


def test_flatten_of_higher_rank_is_kept():
    model = tiny_exported_like()
    model.graph.input[0].CopyFrom(
        helper.make_tensor_value_info("data", TensorProto.FLOAT, ["batch", 3, 1])
    )
    out = passes.drop_redundant_flatten(passes.drop_initializer_inputs(model))
    assert [n.op_type for n in out.graph.node] == ["Flatten", "Gemm"]


def test_rename_refuses_several_outputs():
    model = tiny_exported_like()
    model.graph.output.append(helper.make_tensor_value_info("flat", TensorProto.FLOAT, [None, 3]))
    with pytest.raises(GraphError, match="one input and one output"):
        passes.rename_io(passes.drop_initializer_inputs(model))


@pytest.mark.parametrize("content", [b"", b"garbage\x00\x01 not a protobuf", b"\x08"])
def test_load_onnx_refuses_garbage(tmp_path, content):
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(GraphError, match="bad.onnx: not an ONNX model"):
        onnxkit.load_onnx(path)


def test_load_onnx_refuses_truncated_file(tmp_path, scalers):
    path = convert(tmp_path, random_net(), *scalers, "float64")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(GraphError, match="not an ONNX model"):
        onnxkit.load_onnx(path)


def test_onnxruntime_loads_without_warnings(tmp_path, scalers):
    """ORT warns about initializers listed as inputs (MXNet's raw export has four); ours: none."""
    import subprocess
    import sys

    path = convert(tmp_path, random_net(), *scalers, "float64")
    code = (
        "import onnxruntime as ort, sys\n"
        "o = ort.SessionOptions(); o.log_severity_level = 1\n"
        "ort.InferenceSession(sys.argv[1], o, providers=['CPUExecutionProvider'])\n"
    )
    result = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "[W:" not in result.stderr and "[E:" not in result.stderr, result.stderr
