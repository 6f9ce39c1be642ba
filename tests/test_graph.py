"""Splice and fold on MXNet graphs: equivalence, op lists, refusals."""

from __future__ import annotations

import pytest
from conftest import MXNET_SKIP

pytestmark = pytest.mark.mxnet  # every test here needs the MXNet adapter
pytest.importorskip("mxnet", reason=MXNET_SKIP)

import mxnet as mx
import numpy as np
from conftest import (
    ACTIVATIONS,
    DTYPES,
    RTOL,
    mxnet_predict,
    net_with_output_activation,
    random_net,
    range_relative_error,
)

from normexport.errors import GraphError
from normexport.mx import graph
from normexport.mx.checkpoint import load_checkpoint, save_checkpoint


def reference(net, in_sc, out_sc, X, dtype):
    """out.inverse_transform(net(in.transform(X))): the function the model must compute."""
    Xn = in_sc.transform(X.astype(dtype))
    return out_sc.inverse_transform(net(mx.nd.array(Xn, dtype=dtype)).asnumpy())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("mode", ["splice", "fold"])
def test_raw_model_equals_scaled_net(tmp_path, problem, scalers, dtype, activation, mode):
    X, _ = problem
    in_sc, out_sc = scalers
    net = random_net(activation, dtype)
    ck = graph.from_block(net)
    if mode == "splice":
        model = graph.splice(ck, in_sc.affine(), out_sc.inverse_affine())
    else:
        model, plan = graph.fold(ck, in_sc.affine(), out_sc.inverse_affine())
        assert (plan.input, plan.output) == ("folded", "folded")
    save_checkpoint(model, tmp_path, "model")
    got = mxnet_predict(tmp_path, "model", X.astype(dtype), dtype)
    assert got.dtype == np.dtype(dtype)
    want = reference(net, in_sc, out_sc, X, dtype)
    # float32: a few ulps of the normalized output, times the range; fold re-rounds W.
    assert range_relative_error(got, want, out_sc) < RTOL[dtype]


def test_module_api_loads_spliced_model(tmp_path, problem, scalers):
    X, _ = problem
    in_sc, out_sc = scalers
    net = random_net("tanh", "float64")
    save_checkpoint(
        graph.splice(graph.from_block(net), in_sc.affine(), out_sc.inverse_affine()),
        tmp_path,
        "model",
    )
    sym, arg, aux = mx.model.load_checkpoint(str(tmp_path / "model"), 0)
    mod = mx.mod.Module(sym, data_names=["data"], label_names=None)
    mod.bind(data_shapes=[mx.io.DataDesc("data", X.shape, dtype="float64")], for_training=False)
    mod.set_params(arg, aux)
    mod.forward(mx.io.DataBatch([mx.nd.array(X, dtype="float64")]), is_train=False)
    got = mod.get_outputs()[0].asnumpy()
    assert range_relative_error(got, reference(net, in_sc, out_sc, X, "float64"), out_sc) < 1e-12


def test_spliced_graph_structure(scalers):
    in_sc, out_sc = scalers
    ck = graph.from_block(random_net("sigmoid", "float32"))
    model = graph.splice(ck, in_sc.affine(), out_sc.inverse_affine())
    ops = graph.describe(ck).ops
    assert ops == ("FullyConnected", "Activation") * 2 + ("FullyConnected",)
    nodes = [n for n in graph._nodes(model.symbol) if n["op"] != "null"]
    assert [n["op"] for n in nodes][:2] == ["broadcast_mul", "broadcast_add"]
    assert [n["op"] for n in nodes][-2:] == ["broadcast_mul", "broadcast_add"]
    assert [n["name"] for n in nodes][:2] == ["normexport_in_mul", "normexport_in_add"]
    for name in (
        graph.constant_name("in", "scale"),
        graph.constant_name("in", "shift"),
        graph.constant_name("out", "scale"),
        graph.constant_name("out", "shift"),
    ):
        assert model.arg_params[name].shape[0] == 1
        assert model.arg_params[name].dtype == np.float32
    assert model.symbol.list_arguments()[0] == "data"
    # the input is not mutated
    assert graph.constant_name("in", "scale") not in ck.arg_params


def test_folded_graph_has_exactly_the_bare_ops(scalers):
    in_sc, out_sc = scalers
    ck = graph.from_block(random_net("relu", "float64", hidden=(4,)))
    folded, _ = graph.fold(ck, in_sc.affine(), out_sc.inverse_affine())
    assert [n["op"] for n in graph._nodes(folded.symbol)] == [
        n["op"] for n in graph._nodes(ck.symbol)
    ]
    assert set(folded.arg_params) == set(ck.arg_params)


def test_checkpoint_trained_elsewhere_splices(tmp_path, problem, scalers):
    """Plain Gluon code, another prefix, another input name, saved by net.export."""
    X, _ = problem
    in_sc, out_sc = scalers
    mx.random.seed(3)
    net = mx.gluon.nn.HybridSequential(prefix="theirs_")
    with net.name_scope():
        net.add(mx.gluon.nn.Dense(16, activation="tanh"), mx.gluon.nn.Dense(2))
    net.initialize()
    net.hybridize()
    net(mx.nd.zeros((1, 3)))
    net.export(str(tmp_path / "theirs"))
    # rename the input from 'data' to 'x' the way other code might have saved it
    sym, arg, aux = mx.model.load_checkpoint(str(tmp_path / "theirs"), 0)
    sym = sym(data=mx.sym.var("x"))
    ck = graph.Checkpoint(sym, arg, aux)
    assert graph.describe(ck).input_name == "x"
    for mode in ("splice", "fold"):
        model = (
            graph.splice(ck, in_sc.affine(), out_sc.inverse_affine())
            if mode == "splice"
            else graph.fold(ck, in_sc.affine(), out_sc.inverse_affine())[0]
        )
        save_checkpoint(model, tmp_path, mode)
        got = mxnet_predict(tmp_path, mode, X.astype(np.float32), "float32")
        assert range_relative_error(got, reference(net, in_sc, out_sc, X, "float32"), out_sc) < 1e-5


def test_fold_plan_says_why_a_side_is_spliced(scalers):
    in_sc, out_sc = scalers
    net = net_with_output_activation("sigmoid")
    ck = graph.from_block(net)
    model, plan = graph.fold(ck, in_sc.affine(), out_sc.inverse_affine())
    assert plan.input == "folded"
    assert plan.output == "spliced"
    assert "activation (sigmoid) follows the last FullyConnected" in plan.output_reason
    ops = [n["op"] for n in graph._nodes(model.symbol) if n["op"] != "null"]
    assert ops[-2:] == ["broadcast_mul", "broadcast_add"] and ops[0] == "FullyConnected"


def test_fold_refuses_shared_weights_and_no_bias(scalers):
    in_sc, out_sc = scalers
    data = mx.sym.var("data")
    w = mx.sym.var("w")
    h = mx.sym.FullyConnected(data, weight=w, num_hidden=3, no_bias=True, name="fc0")
    out = mx.sym.FullyConnected(
        mx.sym.Activation(h, act_type="tanh"), weight=w, num_hidden=3, no_bias=True, name="fc1"
    )
    out = mx.sym.FullyConnected(out, num_hidden=2, name="fc2")
    ck = graph.Checkpoint(
        out,
        {"w": mx.nd.ones((3, 3)), "fc2_weight": mx.nd.ones((2, 3)), "fc2_bias": mx.nd.zeros(2)},
        {},
    )
    plan = graph.plan_fold(ck)
    assert plan.input == "spliced" and "no bias" in plan.input_reason
    assert plan.output == "folded"


def checkpoint_with(symbol, **params):
    return graph.Checkpoint(symbol, {k: mx.nd.array(v) for k, v in params.items()}, {})


def test_refuses_several_inputs(scalers):
    a, b = mx.sym.var("a"), mx.sym.var("b")
    ck = checkpoint_with(
        mx.sym.FullyConnected(a + b, num_hidden=2, name="fc"),
        fc_weight=np.ones((2, 3)),
        fc_bias=np.zeros(2),
    )
    with pytest.raises(GraphError, match="2 inputs"):
        graph.splice(ck, scalers[0].affine(), scalers[1].inverse_affine())


def test_refuses_several_outputs(scalers):
    fc = mx.sym.FullyConnected(mx.sym.var("data"), num_hidden=2, name="fc")
    ck = checkpoint_with(mx.sym.Group([fc, fc * 2]), fc_weight=np.ones((2, 3)), fc_bias=np.zeros(2))
    with pytest.raises(GraphError, match="2 outputs"):
        graph.splice(ck, scalers[0].affine(), scalers[1].inverse_affine())


def test_refuses_wrong_input_width(scalers):
    ck = graph.from_block(random_net(n_in=4))
    with pytest.raises(
        GraphError, match="the network takes 4 inputs, but the input constants have 3"
    ):
        graph.splice(ck, scalers[0].affine(), scalers[1].inverse_affine())


def test_refuses_wrong_output_width(scalers):
    ck = graph.from_block(random_net(n_out=3))
    with pytest.raises(
        GraphError, match="the output side has 3 columns, but the affine has 2 scales"
    ):
        graph.splice(ck, scalers[0].affine(), scalers[1].inverse_affine())


def test_refuses_mixed_dtypes(scalers):
    ck = graph.from_block(random_net(dtype="float32"))
    arg = dict(ck.arg_params)
    name = sorted(arg)[0]
    arg[name] = arg[name].astype("float64")
    with pytest.raises(GraphError, match="mixes parameter dtypes"):
        graph.splice(
            graph.Checkpoint(ck.symbol, arg, {}), scalers[0].affine(), scalers[1].inverse_affine()
        )


def test_refuses_graph_that_already_carries_constants(scalers):
    ck = graph.from_block(random_net())
    spliced = graph.splice(ck, scalers[0].affine(), scalers[1].inverse_affine())
    with pytest.raises(GraphError, match="already carries normexport constants"):
        graph.splice(spliced, scalers[0].affine(), scalers[1].inverse_affine())


def test_refuses_unrun_block():
    from normexport.mx.training import build_net

    net = build_net(2, (4,))
    net.initialize()
    with pytest.raises(GraphError, match="run it forward once"):
        graph.from_block(net)


def test_checkpoint_round_trip_is_byte_identical(tmp_path, scalers):
    ck = graph.from_block(random_net())
    model = graph.splice(ck, scalers[0].affine(), scalers[1].inverse_affine())
    save_checkpoint(model, tmp_path / "", "a")
    loaded = load_checkpoint(tmp_path / "a-symbol.json", tmp_path / "a-0000.params")
    save_checkpoint(loaded, tmp_path, "b")
    for suffix in ("-symbol.json", "-0000.params"):
        assert (tmp_path / f"a{suffix}").read_bytes() == (tmp_path / f"b{suffix}").read_bytes()


def test_fold_into_bias_free_layers_when_the_shift_is_zero(tmp_path, problem):
    from normexport.scaling import AffineScaler

    X, _ = problem
    net = mx.gluon.nn.HybridSequential(prefix="nb_")
    with net.name_scope():
        net.add(
            mx.gluon.nn.Dense(8, activation="tanh", use_bias=False, dtype="float64"),
            mx.gluon.nn.Dense(2, use_bias=False, dtype="float64"),
        )
    net.initialize()
    net.hybridize()
    net(mx.nd.zeros((1, 3), dtype="float64"))
    ck = graph.from_block(net)
    in_sc = AffineScaler.from_affine([0.01, 100.0, 1.0], [0.0, 0.0, 0.0])
    zero_out = AffineScaler.from_affine([100.0, 40.0], [0.0, 0.0], inverse=True)
    folded, plan = graph.fold(ck, in_sc.affine(), zero_out.inverse_affine())
    assert (plan.input, plan.output) == ("folded", "folded")
    assert [n["op"] for n in graph._nodes(folded.symbol)] == [
        n["op"] for n in graph._nodes(ck.symbol)
    ]
    save_checkpoint(folded, tmp_path, "m")
    got = mxnet_predict(tmp_path, "m", X, "float64")
    assert (
        range_relative_error(got, reference(net, in_sc, zero_out, X, "float64"), zero_out) < 1e-12
    )
    # a non-zero output shift needs a bias: that side is spliced, and the plan says why
    shifted = AffineScaler.from_affine([100.0, 40.0], [5.0, 0.0], inverse=True)
    _, plan = graph.fold(ck, in_sc.affine(), shifted.inverse_affine())
    assert plan.output == "spliced" and "no bias to absorb the shift" in plan.output_reason


def test_first_op_not_fully_connected_splices_the_input_side(scalers):
    in_sc, out_sc = scalers
    net = mx.gluon.nn.HybridSequential(prefix="fl_")
    with net.name_scope():
        net.add(
            mx.gluon.nn.Flatten(), mx.gluon.nn.Dense(8, activation="tanh"), mx.gluon.nn.Dense(2)
        )
    net.initialize()
    net.hybridize()
    net(mx.nd.ones((1, 3)))
    ck = graph.from_block(net)
    _, plan = graph.fold(ck, in_sc.affine(), out_sc.inverse_affine())
    assert plan.to_dict() == {
        "input": "spliced",
        "output": "folded",
        "input_reason": "the first op is Flatten, not a FullyConnected layer",
    }
    # without constants the width cannot be read off the first layer; with a total it can
    with pytest.raises(GraphError, match="cannot tell how many inputs"):
        graph.describe(ck)
    info = graph.widths_from_total(ck, 5)
    assert (info.n_inputs, info.n_outputs) == (3, 2)
