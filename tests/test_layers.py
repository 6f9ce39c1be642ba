"""Every Gluon layer of a regression net exports in both dtypes and both modes, exactly.

Each case is a small net trained for a few epochs (so BatchNorm statistics, PReLU slopes
and LayerNorm gains are learned values, not their initial ones), exported with the
default tolerances and verified by all four runtimes: onnxruntime, the MXNet model, the
independent NumPy reference and onnx.reference. Nothing may be skipped: the NumPy
reference knows every layer, and onnxruntime runs every float64 file (ops it has no
double kernel for are rewritten; docs/onnx-interface.md).
"""

from __future__ import annotations

import pytest
from conftest import MXNET_SKIP

pytestmark = pytest.mark.mxnet  # every test here needs the MXNet adapter
pytest.importorskip("mxnet", reason=MXNET_SKIP)

import json
import warnings

import mxnet as mx
import numpy as np
import onnx
from conftest import DTYPES, INPUTS, TARGETS, smooth_problem
from mxnet import autograd, gluon

import normexport as nx
from normexport import files
from normexport.errors import GraphError, VerificationError
from normexport.mx import exporting, graph
from normexport.passes import DOUBLE_REWRITES
from normexport.reference import NumpyNet
from normexport.verification import DEFAULT_RTOL

nn = gluon.nn

# the layer under test follows a Dense(12) layer; normalizations get a tanh after them
LAYERS = {
    "dense": None,
    "relu": lambda: nn.Activation("relu"),
    "sigmoid": lambda: nn.Activation("sigmoid"),
    "tanh": lambda: nn.Activation("tanh"),
    "softrelu": lambda: nn.Activation("softrelu"),
    "softsign": lambda: nn.Activation("softsign"),
    "leaky": lambda: nn.LeakyReLU(0.1),
    "prelu": lambda: nn.PReLU(),
    "elu": lambda: nn.ELU(0.7),
    "selu": lambda: nn.SELU(),
    "swish": lambda: nn.Swish(),
    "gelu": lambda: nn.GELU(),
    "dropout": lambda: nn.Dropout(0.2),
    "batchnorm": lambda: nn.BatchNorm(),
    "layernorm": lambda: nn.LayerNorm(),
}
NORMALIZING = ("dropout", "batchnorm", "layernorm")


@pytest.fixture(scope="module")
def data():
    X, Y = smooth_problem(400, seed=3)
    in_sc = nx.MinMaxScaler().fit(X, columns=INPUTS)
    out_sc = nx.MinMaxScaler().fit(Y, columns=TARGETS, target=True)
    return X, Y, in_sc, out_sc


def build(layers, dtype, seed=0):
    mx.random.seed(seed)
    net = nn.HybridSequential(prefix="layers_")
    with net.name_scope():
        for layer in layers:
            net.add(layer)
    net.initialize(mx.init.Xavier())
    net.cast(dtype)
    net.hybridize()
    return net


def fit(net, X, Y, dtype, epochs=12, seed=0):
    """A few epochs of Adam; returns the normalized MSE before and after."""
    Xn, Yn = mx.nd.array(X, dtype=dtype), mx.nd.array(Y, dtype=dtype)
    mse = lambda: float(((net(Xn).asnumpy() - Y) ** 2).mean())  # noqa: E731
    before = mse()
    trainer = gluon.Trainer(net.collect_params(), "adam", {"learning_rate": 0.02})
    loss = gluon.loss.L2Loss()
    rng = np.random.RandomState(seed)
    for _ in range(epochs):
        order = rng.permutation(len(X))
        for start in range(0, len(X) - 31, 32):
            idx = mx.nd.array(order[start : start + 32], dtype="int64")
            with autograd.record():
                value = loss(net(Xn[idx]), Yn[idx])
            value.backward()
            trainer.step(32)
    return before, mse()


_TRAINED: dict = {}


def trained(kind, dtype, data):
    if (kind, dtype) not in _TRAINED:
        X, Y, in_sc, out_sc = data
        layers = [nn.Dense(12)]
        if LAYERS[kind] is not None:
            layers.append(LAYERS[kind]())
        if kind in NORMALIZING:
            layers.append(nn.Activation("tanh"))
        layers += [nn.Dense(8, activation="tanh"), nn.Dense(2, use_bias=False)]
        net = build(layers, dtype)
        _TRAINED[(kind, dtype)] = (net, *fit(net, in_sc.transform(X), out_sc.transform(Y), dtype))
    return _TRAINED[(kind, dtype)]


@pytest.mark.parametrize("mode", ["splice", "fold"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", list(LAYERS))
def test_every_layer_exports_exactly(tmp_path, data, kind, dtype, mode):
    X, _, in_sc, out_sc = data
    net, before, after = trained(kind, dtype, data)
    assert after < before / 4, (before, after)  # it learned: a non-trivial net
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no loosened tolerance, no sanity warning
        out = exporting.export(net, in_sc, out_sc, tmp_path / "m", mode=mode, verify_rows=X)
    check = files.read_json(out / "manifest.json")["verification"]
    assert check["ok"] and check["rtol"] == DEFAULT_RTOL[dtype] and "loosened" not in check
    assert check["runtimes"] == ["onnxruntime", "mxnet", "numpy", "onnx.reference"]
    assert check["skipped"] == {}
    assert check["max_rel_error"] < DEFAULT_RTOL[dtype]
    if dtype == "float32":  # measured against the float64 evaluation
        assert check["reference"] == "numpy" and check["float32_rounding"] < 1e-6
    ops = [n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node]
    if dtype == "float64":
        assert not set(ops) & set(DOUBLE_REWRITES), ops  # onnxruntime has no double kernel
    names = [n.name for n in onnx.load(str(out / "model.onnx")).graph.node]
    assert not any("batchnorm" in n for n in names if "normexport" not in n)  # folded
    assert "Dropout" not in ops and "Identity" not in ops


def test_the_issue_net_exports_in_both_dtypes(tmp_path):
    """Dense(64, tanh) → BatchNorm → LeakyReLU(0.1) → Dropout → Dense(32, relu) →
    Dense(3, no bias), trained on 5 inputs → 3 targets: the net of the report."""
    rng = np.random.default_rng(0)
    X = rng.uniform([250, 0, -5, 1e3, 0.1], [350, 0.01, 5, 2e3, 10], size=(800, 5))
    u = (X - X.min(0)) / (X.max(0) - X.min(0))
    Y = np.column_stack(
        [
            100 * np.sin(2 * u[:, 0] + u[:, 1]) * u[:, 2],
            40 * np.cos(3 * u[:, 3]) * u[:, 4],
            1e3 * u[:, 1] * u[:, 2],
        ]
    )
    in_sc, out_sc = nx.MinMaxScaler().fit(X), nx.MinMaxScaler().fit(Y, target=True)
    for dtype in DTYPES:
        net = build(
            [
                nn.Dense(64, activation="tanh"),
                nn.BatchNorm(),
                nn.LeakyReLU(0.1),
                nn.Dropout(0.1),
                nn.Dense(32, activation="relu"),
                nn.Dense(3, use_bias=False),
            ],
            dtype,
        )
        before, after = fit(net, in_sc.transform(X), out_sc.transform(Y), dtype, epochs=8)
        assert after < before / 4
        for mode in ("splice", "fold"):
            out = exporting.export(net, in_sc, out_sc, tmp_path / f"{dtype}-{mode}", mode=mode)
            report = nx.verify(out, X)
            assert report.ok and report.rtol == DEFAULT_RTOL[dtype], report.table()
            assert not report.skipped


def test_layernorm_converts_to_newer_opsets(tmp_path, data):
    """MXNet's exporter writes ReduceMean with an axes attribute (opset 13 rules); the
    version converter turns it into opset 18's axes input."""
    X, _, in_sc, out_sc = data
    net, _, _ = trained("layernorm", "float32", data)
    out = exporting.export(net, in_sc, out_sc, tmp_path / "m", opset=18, verify_rows=X)
    model = onnx.load(str(out / "model.onnx"))
    assert model.opset_import[0].version == 18
    reduce = [n for n in model.graph.node if n.op_type == "ReduceMean"]
    assert reduce and all(len(n.input) == 2 for n in reduce)  # axes is an input now
    assert files.read_json(out / "manifest.json")["verification"]["ok"]


# ---------------------------------------------------------------------------- for_inference


def _params(ck):
    return {k: v.asnumpy() for k, v in {**ck.arg_params, **ck.aux_params}.items()}


def _run(ck, X, dtype):
    block = gluon.SymbolBlock(ck.symbol, [mx.sym.var("data")])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, param in block.collect_params().items():
            value = {**ck.arg_params, **ck.aux_params}[name]
            param._load_init(value, [mx.cpu()], cast_dtype=True, dtype_source="saved")
    return block(mx.nd.array(X, dtype=dtype)).asnumpy()


def _numpy(ck, X, tmp_path):
    from normexport.mx.checkpoint import save_checkpoint

    save_checkpoint(ck, tmp_path, "net")
    return NumpyNet(tmp_path / "net-symbol.json", tmp_path / "net-0000.params")(X)


def _with_statistics(net, seed=1):
    """Give every BatchNorm learned-looking statistics (not the initial 0 and 1)."""
    rng = np.random.default_rng(seed)
    for name, param in net.collect_params().items():
        if "running_var" in name or "gamma" in name:
            param.set_data(mx.nd.array(rng.uniform(0.3, 2.0, param.shape), dtype=param.dtype))
        elif "running_mean" in name or "beta" in name:
            param.set_data(mx.nd.array(rng.normal(0, 0.5, param.shape), dtype=param.dtype))
    return net


@pytest.mark.parametrize(
    ("layers", "ops"),
    [
        # Dense → BatchNorm: folded into the Dense before it
        (lambda: [nn.Dense(6), nn.BatchNorm(), nn.Activation("tanh"), nn.Dense(2)], []),
        # BatchNorm first, then Dense: folded into the Dense after it
        (lambda: [nn.BatchNorm(), nn.Dense(6, activation="tanh"), nn.Dense(2)], []),
        # between activations: a multiply-add of its own
        (
            lambda: [
                nn.Dense(6, activation="tanh"),
                nn.BatchNorm(),
                nn.Activation("relu"),
                nn.Dense(2),
            ],
            ["broadcast_mul", "broadcast_add"],
        ),
        # before a Dense without bias and with a non-zero shift: a multiply-add
        (
            lambda: [nn.Dense(6, activation="tanh"), nn.BatchNorm(), nn.Dense(2, use_bias=False)],
            ["broadcast_mul", "broadcast_add"],
        ),
    ],
)
def test_batchnorm_is_folded_or_a_multiply_add(tmp_path, layers, ops):
    net = build(layers(), "float64")
    X = np.random.default_rng(0).uniform(-1, 2, size=(50, 3))
    net(mx.nd.array(X, dtype="float64"))
    _with_statistics(net)
    ck = graph.from_block(net)
    inference = graph.for_inference(ck, 3)
    kinds = [n["op"] for n in json.loads(inference.symbol.tojson())["nodes"] if n["op"] != "null"]
    assert "BatchNorm" not in kinds
    assert [k for k in kinds if k.startswith("broadcast")] == ops
    assert not [k for k in _params(inference) if "running" in k or "gamma" in k]
    want = _numpy(ck, X, tmp_path)  # the independent reference, on the original net
    got = _run(inference, X, "float64")
    assert np.abs(got - want).max() < 1e-13


@pytest.mark.parametrize("kind", ["leaky", "prelu", "gelu"])
def test_float64_kernels_that_compute_in_float32_are_spelled_out(tmp_path, kind):
    """MXNet's LeakyReLU kernels compute leaky, prelu and gelu in float32 even on float64
    data; the inference graph spells them out in float64 ops."""
    net = build([nn.Dense(6), LAYERS[kind](), nn.Dense(2)], "float64")
    X = np.random.default_rng(0).uniform(-3, 3, size=(200, 3))
    native = net(mx.nd.array(X, dtype="float64")).asnumpy()
    ck = graph.from_block(net)
    want = _numpy(ck, X, tmp_path)
    assert np.abs(native - want).max() > 1e-12  # the native kernel is float32-exact only
    inference = graph.for_inference(ck)
    kinds = [n["op"] for n in json.loads(inference.symbol.tojson())["nodes"]]
    assert "LeakyReLU" not in kinds
    assert np.abs(_run(inference, X, "float64") - want).max() < 1e-14
    # float32 keeps MXNet's own op: it computes in float32 anyway
    net32 = build([nn.Dense(6), LAYERS[kind](), nn.Dense(2)], "float32")
    net32(mx.nd.zeros((1, 3)))
    kinds32 = [
        n["op"]
        for n in json.loads(graph.for_inference(graph.from_block(net32)).symbol.tojson())["nodes"]
    ]
    assert "LeakyReLU" in kinds32


def test_dropout_is_removed_and_always_mode_refused():
    net = build([nn.Dense(4), nn.Dropout(0.5), nn.Dense(2)], "float32")
    net(mx.nd.zeros((1, 3)))
    inference = graph.for_inference(graph.from_block(net))
    assert "Dropout" not in inference.symbol.tojson()
    always = mx.sym.Dropout(
        mx.sym.FullyConnected(mx.sym.var("data"), num_hidden=2, name="fc"), p=0.5, mode="always"
    )
    ck = graph.Checkpoint(always, {"fc_weight": mx.nd.ones((2, 3)), "fc_bias": mx.nd.zeros(2)}, {})
    with pytest.raises(GraphError, match="mode='always'"):
        graph.for_inference(ck)


def test_a_plain_net_is_left_alone():
    net = build([nn.Dense(4, activation="tanh"), nn.Dense(2)], "float64")
    net(mx.nd.zeros((1, 3), dtype="float64"))
    ck = graph.from_block(net)
    assert graph.for_inference(ck) is ck


# ---------------------------------------------------------------------------- tolerance


def ill_conditioned_net():
    """float32: a tanh layer barely moving around 0.29, then a BatchNorm dividing by its
    tiny spread: the rounding of the tanh output (about 2e-8) grows 1000-fold."""
    net = build(
        [
            nn.Dense(8, activation="tanh"),
            nn.BatchNorm(epsilon=1e-12),
            nn.Activation("tanh"),
            nn.Dense(2),
        ],
        "float32",
    )
    net(mx.nd.zeros((1, 3)))
    dense, norm = net[0], net[1]
    dense.weight.set_data(dense.weight.data() * 1e-3)
    dense.bias.set_data(mx.nd.full(dense.bias.shape, 0.3))
    norm.running_mean.set_data(mx.nd.full(norm.running_mean.shape, np.tanh(0.3) + 0.5e-3))
    norm.running_var.set_data(mx.nd.full(norm.running_var.shape, 0.84e-6))
    return net


def test_a_loosened_tolerance_is_reported_never_silent(tmp_path, data):
    """Verification loosens the float32 tolerance to what a float32 evaluation of the
    network itself achieves, and says so; a given rtol is applied as given."""
    X, _, in_sc, out_sc = data
    net = ill_conditioned_net()
    with pytest.warns(UserWarning, match="tolerance loosened from 1e-05 to"):
        out = exporting.export(net, in_sc, out_sc, tmp_path / "m", verify_rows=X)
    check = files.read_json(out / "manifest.json")["verification"]
    assert check["ok"] and 1e-5 < check["rtol"] <= 1e-3 and check["rtol_default"] == 1e-5
    assert check["float32_rounding"] > 2.5e-6
    assert "float32 evaluation of this network" in check["loosened"]
    report = nx.verify(out, X)
    assert report.ok and report.loosened and report.loosened in report.table()
    assert not nx.verify(out, X, rtol=1e-5).ok  # given: applied as given
    with pytest.raises(VerificationError):
        exporting.export(net, in_sc, out_sc, tmp_path / "m2", verify_rows=X, rtol=1e-5)
    assert not (tmp_path / "m2").exists()
