"""Splice and fold a per-column affine into ONNX graphs (pure ModelProto passes)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from onnx_models import (
    FOLDABLE,
    RTOL,
    affines,
    edge_mlp,
    expected,
    gemm_mlp,
    linear,
    make_model,
    matmul_add_mlp,
    ops,
    range_error,
    raw_rows,
    run,
    weights,
)

from normexport import affine, onnx_affine, onnxkit
from normexport.errors import GraphError

DTYPES = ["float32", "float64"]


def widths(model):
    io = onnx_affine.interface(model)
    out = onnx_affine.typed_output(model, io.output)
    dims = onnx_affine.tensor_dims(out)
    return io.input.type.tensor_type.shape.dim[1].dim_value, (1 if len(dims) == 1 else dims[1])


def check_equivalent(model, baked, in_affine, out_affine, dtype, *, exact=False):
    X = raw_rows(in_affine)
    got = run(baked, X.astype(dtype))
    want = expected(model, X, in_affine, out_affine, dtype)
    assert got.dtype == want.dtype and got.shape == want.shape
    if exact:
        np.testing.assert_array_equal(got, want)
    assert range_error(got, want, out_affine) <= RTOL[dtype]


def splice_ops(model, spliced_in=True, spliced_out=True):
    """The op list of ``model`` with the affine nodes a splice adds on each side."""
    _, n_out = widths(model)
    rank = len(onnx_affine.tensor_dims(model.graph.output[0]))
    out_ops = ["BatchNormalization"] if rank == 2 else ["Mul", "Add"]
    return (
        (["BatchNormalization"] if spliced_in else [])
        + ops(model)
        + (out_ops if spliced_out else [])
    )


# ------------------------------------------------------------------------------ splice


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(FOLDABLE))
def test_splice_adds_exactly_its_affine_ops(name, dtype):
    model = FOLDABLE[name](dtype)
    in_affine, out_affine = affines(*widths(model))
    before = model.SerializeToString()
    baked = onnx_affine.splice(model, in_affine, out_affine)
    assert model.SerializeToString() == before  # the input is never mutated
    assert ops(baked) == splice_ops(model)
    new_inits = {t.name for t in baked.graph.initializer} - {
        t.name for t in model.graph.initializer
    }
    assert new_inits and all(n.startswith("normexport_") for n in new_inits)
    new_nodes = [n for n in baked.graph.node if n.name not in {m.name for m in model.graph.node}]
    assert new_nodes and all(n.name.startswith("normexport_") for n in new_nodes)
    io = onnx_affine.interface(baked)
    assert (io.input_name, io.output_name) == ("x", "y")
    onnx.checker.check_model(baked, full_check=True)
    check_equivalent(model, baked, in_affine, out_affine, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_splice_is_bit_exact_against_numpy(dtype):
    # The last op is an activation, so nothing can fuse with the output affine.
    model = gemm_mlp(dtype, last_activation="Sigmoid")
    in_affine, out_affine = affines(3, 2, seed=3)
    baked = onnx_affine.splice(model, in_affine, out_affine)
    check_equivalent(model, baked, in_affine, out_affine, dtype, exact=True)


def test_splice_twice_gets_fresh_names():
    model = gemm_mlp()
    in_affine, out_affine = affines(3, 2)
    once = onnx_affine.splice(model, in_affine, out_affine)
    twice = onnx_affine.splice(once, in_affine, out_affine)
    names = [t.name for t in twice.graph.initializer]
    assert len(names) == len(set(names))
    assert "normexport_in_scale_1" in names
    onnx.checker.check_model(twice, full_check=True)
    X = raw_rows(in_affine)
    once_more = expected(once, X, in_affine, out_affine, "float32")  # once on in(x), then out
    np.testing.assert_allclose(run(twice, X.astype("float32")), once_more, rtol=1e-5)


@pytest.mark.parametrize("opset", [13, 14, 15])
def test_reference_evaluator_needs_inference_batchnorm(opset):
    model = gemm_mlp("float64", opset=opset)
    in_affine, out_affine = affines(3, 2)
    baked = onnx_affine.splice(model, in_affine, out_affine)
    X = raw_rows(in_affine)
    want = run(baked, X)
    got = ReferenceEvaluator(baked, new_ops=onnx_affine.reference_ops()).run(None, {"x": X})[0]
    np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-13)
    if opset <= 13:  # onnx.reference's own BatchNormalization-9 mixes in batch statistics
        plain = ReferenceEvaluator(baked).run(None, {"x": X})[0]
        assert not np.allclose(plain, want)


def test_splice_refuses_wrong_widths_and_bad_scales():
    model = gemm_mlp()
    (s_in, t_in), (s_out, t_out) = affines(3, 2)
    with pytest.raises(
        GraphError, match="input 'x': the input side has 3 columns, but the affine has 4"
    ):
        onnx_affine.splice_input(model, np.ones(4), np.zeros(4))
    with pytest.raises(GraphError, match="finite and non-zero"):
        onnx_affine.splice_output(model, np.array([1.0, 0.0]), t_out)
    with pytest.raises(GraphError, match="shift nan is not finite"):
        onnx_affine.splice_input(model, s_in, np.array([0.0, np.nan, 1.0]))


def test_interface_refuses_several_inputs_or_outputs():
    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["y"])],
        "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 2]) for n in "ab"],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
    )
    with pytest.raises(GraphError, match=r"2 input\(s\) \(a, b\)"):
        onnx_affine.interface(helper.make_model(graph))


# ------------------------------------------------------------------------------ fold


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(FOLDABLE))
def test_fold_adds_no_op(name, dtype):
    model = FOLDABLE[name](dtype)
    in_affine, out_affine = affines(*widths(model))
    before = model.SerializeToString()
    plan = onnx_affine.plan_fold(model, in_affine, out_affine)
    folded, plan2 = onnx_affine.fold(model, in_affine, out_affine)
    assert model.SerializeToString() == before
    assert plan == plan2
    assert (plan.input, plan.output) == ("folded", "folded"), plan
    assert ops(folded) == ops(model)
    onnx.checker.check_model(folded, full_check=True)
    check_equivalent(model, folded, in_affine, out_affine, dtype)


def test_fold_is_float64_then_cast():
    model = linear("float32", kind="matmul")
    (s, t), (so, to) = affines(3, 2)
    folded, _ = onnx_affine.fold(model, (s, t), (so, to))
    W = numpy_helper.to_array(model.graph.initializer[0]).astype(np.float64)
    b = numpy_helper.to_array(model.graph.initializer[1]).astype(np.float64)
    got = {t.name: numpy_helper.to_array(t) for t in folded.graph.initializer}
    np.testing.assert_array_equal(got["W"], (s[:, None] * W * so[None, :]).astype(np.float32))
    np.testing.assert_array_equal(got["b"], ((b + t @ W) * so + to).astype(np.float32))
    assert got["W"].dtype == got["b"].dtype == np.float32


def test_fold_absorbs_alpha_beta_and_adds_a_missing_bias():
    model = gemm_mlp(trans_b=1, alpha=0.5, beta=3.0, bias=False)
    in_affine, out_affine = affines(3, 2)
    folded, _ = onnx_affine.fold(model, in_affine, out_affine)
    fc1, fc2 = (n for n in folded.graph.node if n.op_type == "Gemm")
    assert [a.name for a in fc1.attribute] == ["transB"]
    assert len(fc1.input) == 3 and fc1.input[2].startswith("normexport_")
    assert len(fc2.input) == 3
    check_equivalent(model, folded, in_affine, out_affine, "float32")


def test_fold_keeps_weights_layout_and_shapes():
    model = gemm_mlp(trans_b=1)
    folded, _ = onnx_affine.fold(model, *affines(3, 2))
    shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
    assert {t.name: tuple(t.dims) for t in folded.graph.initializer} == shapes


def test_fold_with_zero_shift_needs_no_bias():
    # MatMul without an Add: the scale folds, and a zero shift needs no bias.
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"),
        helper.make_node("Tanh", ["h"], ["a"], name="act"),
        helper.make_node("MatMul", ["a", "W2"], ["y"], name="mm2"),
    ]
    model = make_model(nodes, {"W1": weights(rng, 3, 4), "W2": weights(rng, 4, 2)})
    (s, _), (so, _) = affines(3, 2)
    zero_in, zero_out = (s, np.zeros(3)), (so, np.zeros(2))
    folded, plan = onnx_affine.fold(model, zero_in, zero_out)
    assert (plan.input, plan.output) == ("folded", "folded")
    assert ops(folded) == ops(model) and len(folded.graph.initializer) == 2
    check_equivalent(model, folded, zero_in, zero_out, "float32")
    # With a shift, each MatMul becomes a Gemm whose new bias C carries it: still no new op.
    in_affine, out_affine = affines(3, 2)
    changes = []
    gemms, plan = onnx_affine.fold(model, in_affine, out_affine, changes=changes)
    assert (plan.input, plan.output) == ("folded", "folded")
    assert ops(gemms) == ["Gemm", "Tanh", "Gemm"]
    assert changes == [
        "MatMul 'mm1' is now a Gemm, whose bias C carries the folded shift",
        "MatMul 'mm2' is now a Gemm, whose bias C carries the folded shift",
    ]
    onnx.checker.check_model(gemms, full_check=True)
    check_equivalent(model, gemms, in_affine, out_affine, "float32")


def test_fold_into_an_old_style_initializer_input_updates_its_declaration():
    model = linear("float32", kind="gemm")
    for tensor in model.graph.initializer:
        model.graph.input.append(
            helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims)
        )
    model.graph.initializer[1].CopyFrom(numpy_helper.from_array(np.float32([0.1]), "b"))
    model.graph.input[2].CopyFrom(helper.make_tensor_value_info("b", TensorProto.FLOAT, [1]))
    onnx.checker.check_model(model, full_check=True)
    in_affine, out_affine = affines(3, 2)
    folded, plan = onnx_affine.fold(model, in_affine, out_affine)
    assert plan.input == plan.output == "folded"
    onnx.checker.check_model(folded, full_check=True)
    check_equivalent(model, folded, in_affine, out_affine, "float32")


# ------------------------------------------------------------------------------ fallbacks


def _shared_weight():
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Gemm", ["x", "W", "b1"], ["h"], name="fc1"),
        helper.make_node("Tanh", ["h"], ["a"], name="act"),
        helper.make_node("Gemm", ["a", "W", "b2"], ["y"], name="fc2"),
    ]
    inits = {"W": weights(rng, 3, 3), "b1": np.zeros(3), "b2": np.zeros(3)}
    return make_model(nodes, inits, n_out=3)


def _computed_weight():
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Identity", ["W0"], ["W1"], name="weight_copy"),
        helper.make_node("Gemm", ["x", "W1", "b1"], ["h"], name="fc1"),
        helper.make_node("Tanh", ["h"], ["a"], name="act"),
        helper.make_node("Gemm", ["a", "W2", "b2"], ["y"], name="fc2"),
    ]
    inits = {
        "W0": weights(rng, 3, 4),
        "b1": np.zeros(4),
        "W2": weights(rng, 4, 2),
        "b2": np.array([0.0, 1.0]),
    }
    return make_model(nodes, inits)


def _unknown_ops():
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Mul", ["x", "two"], ["x2"], name="double"),
        helper.make_node("Gemm", ["x2", "W1"], ["h"], name="fc1"),
        helper.make_node("Gemm", ["h", "W2"], ["z"], name="fc2"),
        helper.make_node("Neg", ["z"], ["y"], name="negate"),
    ]
    inits = {"two": np.array(2.0), "W1": weights(rng, 3, 4), "W2": weights(rng, 4, 2)}
    return make_model(nodes, inits)


def _input_feeds_two():
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Gemm", ["x", "W1", "b1"], ["h"], name="fc1"),
        helper.make_node("Tanh", ["h"], ["a"], name="act"),
        helper.make_node("Gemm", ["a", "W2"], ["z"], name="fc2"),
        helper.make_node("MatMul", ["x", "Wskip"], ["s"], name="skip"),
        helper.make_node("Add", ["z", "s"], ["y"], name="residual"),
    ]
    inits = {"W1": weights(rng, 3, 4), "b1": np.zeros(4), "W2": weights(rng, 4, 2)}
    inits["Wskip"] = weights(rng, 3, 2)
    return make_model(nodes, inits)


def _casts_change_dtype():
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Cast", ["x"], ["xd"], name="to_double", to=TensorProto.DOUBLE),
        helper.make_node("Gemm", ["xd", "W1", "b1"], ["h"], name="fc1"),
        helper.make_node("Tanh", ["h"], ["a"], name="act"),
        helper.make_node("Gemm", ["a", "W2", "b2"], ["yd"], name="fc2"),
        helper.make_node("Cast", ["yd"], ["y"], name="to_float", to=TensorProto.FLOAT),
    ]
    inits = {
        "W1": weights(rng, 3, 4),
        "b1": np.zeros(4),
        "W2": weights(rng, 4, 2),
        "b2": np.array([0.0, 1.0]),
    }
    return make_model(
        nodes, inits, dtype="float64", in_elem=TensorProto.FLOAT, out_elem=TensorProto.FLOAT
    )


def _reshape_other():
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Reshape", ["x", "s"], ["xr"], name="reshape_in"),
        helper.make_node("MatMul", ["xr", "W1"], ["m"], name="mm"),
        helper.make_node("Add", ["m", "b1"], ["y"], name="bias"),
    ]
    inits = {"s": np.array([0, -1]), "W1": weights(rng, 3, 2), "b1": np.zeros(2)}
    return make_model(nodes, inits)


def _transposed_output():
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Gemm", ["x", "W1", "b1"], ["h"], name="fc1"),
        helper.make_node("Gemm", ["W2", "h"], ["yt"], name="fc2", transB=1),
        helper.make_node("Transpose", ["yt"], ["y"], name="back", perm=[1, 0]),
    ]
    inits = {"W1": weights(rng, 3, 4), "b1": np.zeros(4), "W2": weights(rng, 4, 2).T}
    return make_model(nodes, inits)


FALLBACKS = {
    # name: (builder, input reason or None if folded, output reason or None)
    "activation_last": (
        lambda: gemm_mlp(last_activation="Sigmoid"),
        None,
        "an activation (Sigmoid 'act2') follows the last dense layer",
    ),
    "shared_weight": (
        _shared_weight,
        "Gemm 'fc1': its weight 'W' is shared with other nodes",
        "Gemm 'fc2': its weight 'W' is shared with other nodes",
    ),
    "computed_weight": (_computed_weight, "its weight 'W1' is not a constant", None),
    "unknown_ops": (
        _unknown_ops,
        "goes to Mul 'double', not a dense layer",
        "the output comes from Neg 'negate', not a dense layer",
    ),
    "input_feeds_two": (
        _input_feeds_two,
        "the input 'x' feeds 2 uses (Gemm 'fc1', MatMul 'skip')",
        "its bias 'z' is not a constant",
    ),
    "cast_changes_dtype": (
        _casts_change_dtype,
        "Cast 'to_double' casts FLOAT to DOUBLE; only a no-op Cast",
        "Cast 'to_float' casts DOUBLE to FLOAT; only a no-op Cast",
    ),
    "reshape_other": (_reshape_other, "Reshape 'reshape_in' reshapes to [0, -1]", None),
    "transposed_output": (
        _transposed_output,
        None,
        "the output comes from Transpose 'back', not a dense layer",
    ),
}


@pytest.mark.parametrize("name", sorted(FALLBACKS))
def test_fold_splices_what_it_cannot_fold_and_says_why(name):
    build, in_reason, out_reason = FALLBACKS[name]
    model = build()
    in_affine, out_affine = affines(*widths(model))
    folded, plan = onnx_affine.fold(model, in_affine, out_affine)
    for side, reason in (("input", in_reason), ("output", out_reason)):
        if reason is None:
            assert getattr(plan, side) == "folded", plan
            assert not getattr(plan, side + "_reason")
        else:
            assert getattr(plan, side) == "spliced"
            assert reason in getattr(plan, side + "_reason")
            assert reason in " ".join(plan.messages())
    assert ops(folded) == splice_ops(model, in_reason is not None, out_reason is not None)
    assert plan.to_dict()["input"] == plan.input
    onnx.checker.check_model(folded, full_check=True)
    dtype = "float32" if model.graph.input[0].type.tensor_type.elem_type == 1 else "float64"
    check_equivalent(model, folded, in_affine, out_affine, dtype)


def test_plan_to_dict_is_the_metadata_form():
    plan = onnx_affine.plan_fold(gemm_mlp(last_activation="Tanh"), *affines(3, 2))
    assert plan.to_dict() == {
        "input": "folded",
        "output": "spliced",
        "input_node": "Gemm 'fc1'",
        "output_reason": "an activation (Tanh 'act2') follows the last dense layer",
    }
    assert affine.SPLICED.to_dict() == {"input": "spliced", "output": "spliced"}


# ------------------------------------------------------------------------------ opsets


@pytest.mark.parametrize("opset", range(13, onnx.defs.onnx_opset_version() + 1))
@pytest.mark.parametrize("build", [matmul_add_mlp, edge_mlp], ids=["matmul_add", "edges"])
def test_every_opset_in_both_modes(opset, build):
    for dtype in DTYPES:
        model = build(dtype, opset=opset)
        in_affine, out_affine = affines(3, 2, seed=opset)
        spliced = onnx_affine.splice(model, in_affine, out_affine)
        folded, plan = onnx_affine.fold(model, in_affine, out_affine)
        assert plan.input == plan.output == "folded"
        for baked in (spliced, folded):
            onnx.checker.check_model(baked, full_check=True)
            check_equivalent(model, baked, in_affine, out_affine, dtype)


def test_convert_opset():
    model = matmul_add_mlp()
    assert onnxkit.opset_of(onnxkit.convert_opset(model, 17)) == 17
    assert onnxkit.convert_opset(model, 13) is not model


# ------------------------------------------------------------------------------ properties


finite_scale = st.floats(1e-3, 1e3).flatmap(lambda m: st.sampled_from([m, -m]))
# Shifts up to ten times the span: far larger ones leave float32 ill-conditioned in either
# mode (docs/fold.md, "Conditioning"), and the raw output itself cannot carry the digits.
offset = st.floats(-10, 10)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    s_in=st.lists(finite_scale, min_size=3, max_size=3),
    t_in=st.lists(offset, min_size=3, max_size=3),
    s_out=st.lists(finite_scale, min_size=2, max_size=2),
    k_out=st.lists(offset, min_size=2, max_size=2),
    dtype=st.sampled_from(DTYPES),
)
def test_splice_and_fold_agree_with_numpy_for_any_affine(s_in, t_in, s_out, k_out, dtype):
    model = _PROPERTY_MODELS[dtype]
    in_affine = (np.array(s_in), np.array(t_in))
    out_affine = (np.array(s_out), np.array(k_out) * np.abs(s_out))
    X = raw_rows(in_affine, n=16)
    want = expected(model, X, in_affine, out_affine, dtype)
    spliced = run(onnx_affine.splice(model, in_affine, out_affine), X.astype(dtype))
    np.testing.assert_array_equal(spliced, want)
    folded, _ = onnx_affine.fold(model, in_affine, out_affine)
    assert range_error(run(folded, X.astype(dtype)), want, out_affine) <= RTOL[dtype]


_PROPERTY_MODELS = {d: gemm_mlp(d, trans_b=1) for d in DTYPES}
