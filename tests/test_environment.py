"""The pinned stack imports together and runs: a broken pin set fails here, loudly."""

from __future__ import annotations

import pytest
from conftest import MXNET_SKIP

pytestmark = pytest.mark.mxnet  # every test here needs the MXNet adapter
pytest.importorskip("mxnet", reason=MXNET_SKIP)

import numpy as np


def test_mxnet_onnx_onnxruntime_work_together():
    import mxnet as mx
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    assert mx.__version__ == "1.9.1"
    assert tuple(int(p) for p in np.__version__.split(".")[:2]) < (1, 24)
    a = mx.nd.array([[1.0, 2.0]])
    assert (a * 2 + 1).asnumpy().tolist() == [[3.0, 5.0]]

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 2])
    graph = helper.make_graph([helper.make_node("Neg", ["x"], ["y"])], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model, full_check=True)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    out = sess.run(None, {"x": np.array([[1.0, -2.0]], dtype=np.float32)})[0]
    assert out.tolist() == [[-1.0, 2.0]]

    # MXNet's exporter imports onnx.mapping (gone in onnx 1.19): import it here.
    from mxnet.onnx import export_model  # noqa: F401
