"""Hostile ONNX files, targets and races against the core (issue 17, round 2): no MXNet.

Each defect the adversarial pass found is rebuilt here and must end as the contract says:
exit status 2 with one line ``normexport: error: ...`` naming the user's file (never a
staging path), exit 1 only for a mismatch, never 3, and nothing written or left behind.
Inputs that once crashed a native library run in a child process.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import struct
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import one_line_error, run_cli
from onnx import TensorProto, helper, numpy_helper
from onnx_models import affines, gemm_mlp, make_model

import normexport as nx
from normexport import baking, files, mxparams, onnxkit
from normexport.cli import main
from normexport.errors import FormatError, GraphError, NormexportError

PY = sys.executable
DATA = Path(__file__).parent / "data"


def factors_of(in_affine, out_affine):
    return np.vstack([np.column_stack(in_affine), np.column_stack(out_affine)])


def save(model, path, **kwargs):
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    onnx.save_model(copy, str(path), **kwargs)
    return path


def listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@pytest.fixture
def workspace(tmp_path):
    """A float32 Gemm MLP, its factors, a bake of it (with metadata) and a CSV of rows."""
    model = gemm_mlp(trans_b=1)
    in_affine, out_affine = affines(3, 2)
    np.savetxt(tmp_path / "factors.txt", factors_of(in_affine, out_affine))
    save(model, tmp_path / "model.onnx")
    nx.bake(tmp_path / "model.onnx", tmp_path / "baked.onnx", factors=tmp_path / "factors.txt")
    (tmp_path / "rows.csv").write_text("x0,x1,x2\n300,0.005,0.5\n")
    return tmp_path


# ------------------------------------------------------------------ declared dims vs data


def _w1(model):
    return next(t for t in model.graph.initializer if t.name == "W1")


def damage(kind: str, model: onnx.ModelProto, directory: Path, name: str) -> Path:
    """``model`` with initializer W1's declared dims disagreeing with its data."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    path = directory / name
    if kind == "raw-longer":  # dims say more than raw_data holds
        _w1(model).dims[0] += 3
    elif kind == "raw-shorter":  # raw_data holds more than the dims say (the checker misses it)
        _w1(model).dims[0] -= 1
    elif kind == "typed-fields":
        tensor = _w1(model)
        values = numpy_helper.to_array(tensor)
        typed = helper.make_tensor("W1", TensorProto.FLOAT, values.shape, values.ravel().tolist())
        typed.dims[0] += 2
        tensor.CopyFrom(typed)
    elif kind == "constant-node":
        tensor = _w1(model)
        values = numpy_helper.to_array(tensor)
        model.graph.initializer.remove(tensor)
        value = numpy_helper.from_array(values, "W1")
        value.dims[0] += 1
        model.graph.node.insert(0, helper.make_node("Constant", [], ["W1"], value=value))
    else:  # external data: the length entry, or the file, disagrees with the dims
        location = f"{name}.data"
        save(
            model,
            path,
            save_as_external_data=True,
            location=location,
            size_threshold=0,
            all_tensors_to_one_file=True,
        )
        model = onnx.load(str(path), load_external_data=False)
        tensor = _w1(model)
        if kind == "external-length":
            tensor.dims[0] -= 1  # the data is 60 bytes, the dims say 48
        elif kind == "external-no-length":  # "mmap length is greater than file size"
            tensor.dims[0] += 100
            entries = [e for e in tensor.external_data if e.key != "length"]
            del tensor.external_data[:]
            tensor.external_data.extend(entries)
        else:
            raise AssertionError(kind)
    path.write_bytes(model.SerializeToString())
    return path


DAMAGE = [
    "raw-longer",
    "raw-shorter",
    "typed-fields",
    "constant-node",
    "external-length",
    "external-no-length",
]


@pytest.mark.parametrize("kind", DAMAGE)
@pytest.mark.parametrize("verb", ["bake", "predict", "inspect"])
def test_declared_dims_that_disagree_with_the_data_are_one_line(capsys, workspace, verb, kind):
    baked = onnx.load(str(workspace / "baked.onnx"))
    path = damage(kind, baked, workspace, f"{kind}.onnx")
    out = workspace / "out"
    argv = {
        "bake": ["bake", path, "--factors", workspace / "factors.txt", "--out", f"{out}.onnx"],
        "predict": ["predict", path, workspace / "rows.csv", "--out", f"{out}.csv"],
        "inspect": ["inspect", path],
    }[verb]
    before = listing(workspace)
    code, stdout, err = run_cli(capsys, *argv)
    which = "Constant" if kind == "constant-node" else "initializer 'W1'"
    line = one_line_error(code, err, f"{kind}.onnx", which, "declares shape", out=stdout)
    assert "bytes" in line or "values" in line
    assert listing(workspace) == before  # nothing written, nothing staged


def test_verify_refuses_a_damaged_model_onnx_with_exit_2(capsys, tmp_path):
    import shutil

    directory = tmp_path / "model"
    shutil.copytree(DATA / "mxnet_model", directory)
    model = onnx.load(str(directory / "model.onnx"))
    tensor = next(t for t in model.graph.initializer if list(t.dims) == [8])
    tensor.dims[0] = 1  # raw_data of 8 values; ORT fails in its own initializer check
    (directory / "model.onnx").write_bytes(model.SerializeToString())
    code, out, err = run_cli(capsys, "verify", directory)
    one_line_error(code, err, "model.onnx")


def test_verify_names_the_initializer(capsys, tmp_path):
    import shutil

    directory = tmp_path / "model"
    shutil.copytree(DATA / "mxnet_model", directory)
    model = onnx.load(str(directory / "model.onnx"))
    tensor = next(t for t in model.graph.initializer if list(t.dims) == [8])
    tensor.dims[0] = 1
    (directory / "model.onnx").write_bytes(model.SerializeToString())
    code, out, err = run_cli(capsys, "verify", directory)
    one_line_error(code, err, "model.onnx", f"initializer {tensor.name!r}")


def test_validate_accepts_every_way_of_storing_weights(tmp_path):
    """Raw data, typed fields, external data, Constant nodes, empty tensors, strings."""
    for typed in (False, True):
        onnxkit.validate(save(gemm_mlp(), tmp_path / "a.onnx"))
        model = make_model(
            [helper.make_node("Gemm", ["x", "W"], ["y"])],
            {"W": np.ones((3, 2))},
            typed_fields=typed,
        )
        empty = numpy_helper.from_array(np.zeros((0, 4), np.float32), "empty")
        strings = helper.make_tensor("s", TensorProto.STRING, [2], [b"a", b"b"])
        model.graph.initializer.extend([empty, strings])
        onnxkit.validate(save(model, tmp_path / "b.onnx"))
    save(
        gemm_mlp(hidden=300),
        tmp_path / "c.onnx",
        save_as_external_data=True,
        location="c.data",
        size_threshold=1024,
    )
    onnxkit.validate(tmp_path / "c.onnx")
    onnxkit.load_onnx(tmp_path / "c.onnx")


def test_negative_and_absurd_dims_are_refused_before_anything_allocates(tmp_path):
    model = gemm_mlp()
    _w1(model).dims[0] = -5
    with pytest.raises(GraphError, match=r"m.onnx: initializer 'W1' has a negative dimension"):
        onnxkit.validate(save(model, tmp_path / "m.onnx"))
    model = gemm_mlp()
    _w1(model).dims[:] = [2**62, 2**62]  # an int64 product would wrap around
    with pytest.raises(GraphError, match=r"initializer 'W1' declares shape .* but its raw_data"):
        onnxkit.validate(save(model, tmp_path / "m.onnx"))


# ------------------------------------------------------------------ recursive functions


def recursive_model(mutual: bool) -> onnx.ModelProto:
    opsets = [helper.make_opsetid("", 13), helper.make_opsetid("local", 1)]

    def function(name: str, calls: str) -> onnx.FunctionProto:
        body = [helper.make_node(calls, ["a"], ["b"], domain="local")]
        return helper.make_function("local", name, ["a"], ["b"], body, opsets)

    functions = [function("f", "g"), function("g", "f")] if mutual else [function("f", "f")]
    graph = helper.make_graph(
        [helper.make_node("f", ["x"], ["y"], domain="local")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
    )
    model = helper.make_model(graph, opset_imports=opsets, functions=functions)
    model.ir_version = 8
    return model


def test_recursive_functions_are_refused_before_any_checker_sees_them(tmp_path):
    """onnx.checker of onnx 1.18 recurses until it segfaults (rc -11, a staged temp left
    behind): run bake in a child, which must exit 2 with one line and leave nothing."""
    for mutual in (False, True):
        path = save(recursive_model(mutual), tmp_path / f"rec{int(mutual)}.onnx")
        np.savetxt(tmp_path / "f.txt", np.ones((5, 2)))
        child = subprocess.run(
            [
                PY,
                "-m",
                "normexport",
                "bake",
                path,
                "--factors",
                tmp_path / "f.txt",
                "--out",
                tmp_path / "out.onnx",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        chain = "local::f -> local::g -> local::f" if mutual else "local::f -> local::f"
        one_line_error(child.returncode, child.stderr, path.name, "recursive", chain)
        assert child.stdout == ""
    assert listing(tmp_path) == ["f.txt", "rec0.onnx", "rec1.onnx"]


@pytest.mark.parametrize("verb", ["predict", "inspect"])
def test_recursive_functions_refused_by_every_verb(capsys, tmp_path, verb):
    path = save(recursive_model(True), tmp_path / "rec.onnx")
    (tmp_path / "rows.csv").write_text("x0,x1,x2\n1,2,3\n")
    extra = [tmp_path / "rows.csv", "--out", tmp_path / "p.csv"] if verb == "predict" else []
    code, out, err = run_cli(capsys, verb, path, *extra)
    one_line_error(code, err, "rec.onnx", "model-local function local::f is recursive")
    assert not (tmp_path / "p.csv").exists()


def test_a_function_calling_another_is_not_recursion(tmp_path):
    opsets = [helper.make_opsetid("", 13), helper.make_opsetid("local", 1)]
    inner = helper.make_function(
        "local", "inner", ["a"], ["b"], [helper.make_node("Relu", ["a"], ["b"])], opsets
    )
    outer = helper.make_function(
        "local",
        "outer",
        ["a"],
        ["b"],
        [
            helper.make_node("inner", ["a"], ["t"], domain="local"),
            helper.make_node("inner", ["t"], ["b"], domain="local"),
        ],
        opsets,
    )
    graph = helper.make_graph(
        [helper.make_node("outer", ["x"], ["y"], domain="local")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
    )
    model = helper.make_model(graph, opset_imports=opsets, functions=[outer, inner])
    model.ir_version = 8
    onnxkit.validate(save(model, tmp_path / "ok.onnx"))


# ------------------------------------------------------------------ fixed batches


def fixed_batch_model(batch: int, open_width: bool = False) -> onnx.ModelProto:
    model = gemm_mlp(trans_b=1)
    for value in (model.graph.input[0], model.graph.output[0]):
        value.type.tensor_type.shape.dim[0].dim_value = batch
    if open_width:
        model.graph.output[0].type.tensor_type.shape.dim[1].dim_param = "w"
    return model


@pytest.mark.parametrize("batch", [2**27, 2**29])
def test_an_absurd_fixed_batch_is_refused_without_allocating(capsys, workspace, batch):
    path = save(fixed_batch_model(batch), workspace / "fixed.onnx")
    tracemalloc.start()
    try:
        code, out, err = run_cli(
            capsys,
            "bake",
            path,
            "--factors",
            workspace / "factors.txt",
            "--out",
            workspace / "out.onnx",
        )
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    one_line_error(code, err, "fixed.onnx", f"fixed batch of {batch} rows", "up to 4096")
    assert peak < 64 * 2**20, peak  # was 1.5 GB of padding, or MemoryError
    assert not (workspace / "out.onnx").exists()


def test_a_fixed_batch_model_runs_in_batches_of_that_size_and_no_more(workspace, monkeypatch):
    calls: list[int] = []
    runtime = baking._Runner.runtime

    def counting(self, path, label):
        run = runtime(self, path, label)

        def wrapped(X):
            calls.append(X.shape[0])
            return run(X)

        return wrapped

    monkeypatch.setattr(baking._Runner, "runtime", counting)
    path = save(fixed_batch_model(7), workspace / "fixed7.onnx")
    result = nx.bake(path, workspace / "out.onnx", factors=workspace / "factors.txt")
    assert result.report.ok
    assert set(calls) == {7}
    rows = result.report.rows
    assert sum(calls) <= 2 * (rows + 6)  # two files, each padded by at most one batch
    assert (
        onnx.load(str(workspace / "out.onnx"))
        .graph.input[0]
        .type.tensor_type.shape.dim[0]
        .dim_value
        == 7
    )


def test_an_absurd_fixed_batch_bakes_without_verification(workspace):
    path = save(fixed_batch_model(2**27), workspace / "fixed.onnx")
    result = nx.bake(path, workspace / "out.onnx", factors=workspace / "factors.txt", verify=False)
    assert result.report is None and (workspace / "out.onnx").is_file()


def test_the_probe_of_an_open_width_refuses_an_absurd_fixed_batch(workspace):
    """Factors for 3 outputs where the file declares 2: bake runs it to see what it returns."""
    path = save(fixed_batch_model(2**27), workspace / "open.onnx")
    with pytest.raises(GraphError, match="fixed batch of 134217728 rows; .* find the width"):
        nx.bake(path, workspace / "out.onnx", factors=np.ones((6, 2)), verify=False)


# ------------------------------------------------------------------ wall-clock limit


def endless_loop_model(n: int = 3) -> onnx.ModelProto:
    """y = x, through a Loop whose trip count is 2^62 (its body is the identity)."""
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Identity", ["acc_in"], ["acc_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, None),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, None),
        ],
    )
    graph = helper.make_graph(
        [helper.make_node("Loop", ["M", "cond", "x"], ["y"], body=body, name="forever")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", n])],
        [
            numpy_helper.from_array(np.array(2**62, np.int64), "M"),
            numpy_helper.from_array(np.array(True), "cond"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


# A regression here would hang for good: these run in a child that the test can outlive.
_BAKE_CHILD = """
import sys
from normexport import baking
from normexport.cli import main
baking.DEFAULT_TIMEOUT = float(sys.argv[1])
sys.exit(main(sys.argv[2:]))
"""


def bake_in_child(limit: float, *argv) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PY, "-c", _BAKE_CHILD, str(limit), "bake", *map(str, argv)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_model_that_never_finishes_is_stopped_naming_the_node(tmp_path):
    path = save(endless_loop_model(), tmp_path / "loop.onnx")
    np.savetxt(tmp_path / "f.txt", np.ones((6, 2)))
    started = time.monotonic()
    child = bake_in_child(0.5, path, "--factors", tmp_path / "f.txt", "--out", tmp_path / "o.onnx")
    elapsed = time.monotonic() - started
    line = one_line_error(
        child.returncode,
        child.stderr,
        f"{path} (baked): the model did not finish within bake's 0.5 s limit",
        "(Loop 'forever' was running)",
        out=child.stdout,
    )
    assert line
    assert elapsed < 60  # the 2^62 iterations would take years
    assert listing(tmp_path) == ["f.txt", "loop.onnx"]


def test_the_probe_runs_under_the_limit_too(tmp_path):
    """Factors for 4 outputs where the file declares 3: bake runs it to see what it returns."""
    path = save(endless_loop_model(), tmp_path / "loop.onnx")
    np.savetxt(tmp_path / "f.txt", np.ones((7, 2)))
    child = bake_in_child(0.3, path, "--factors", tmp_path / "f.txt", "--out", tmp_path / "o.onnx")
    one_line_error(child.returncode, child.stderr, f"{path}: the model did not finish", "forever")
    assert listing(tmp_path) == ["f.txt", "loop.onnx"]


def test_the_limit_in_python(tmp_path, monkeypatch):
    """timeout= reaches the runs (a model that does finish, with the watchdog armed)."""
    seen = []
    init = baking._Runner.__init__

    def recording(self, timeout):
        seen.append(timeout)
        init(self, timeout)

    monkeypatch.setattr(baking._Runner, "__init__", recording)
    model = gemm_mlp(trans_b=1)
    path = save(model, tmp_path / "m.onnx")
    nx.bake(path, tmp_path / "o.onnx", factors=factors_of(*affines(3, 2)), timeout=12.5)
    nx.bake(path, tmp_path / "o.onnx", factors=factors_of(*affines(3, 2)))
    assert seen == [12.5, baking.DEFAULT_TIMEOUT]


@pytest.mark.parametrize("timeout", [0, -1, float("nan"), "10", True])
def test_a_bad_timeout_is_refused(tmp_path, timeout):
    with pytest.raises(NormexportError, match="timeout must be a positive number"):
        nx.bake(tmp_path / "m.onnx", tmp_path / "o.onnx", factors=np.ones((5, 2)), timeout=timeout)


def test_no_limit_with_infinity(workspace):
    result = nx.bake(
        workspace / "model.onnx",
        workspace / "out.onnx",
        factors=workspace / "factors.txt",
        timeout=math.inf,
    )
    assert result.report.ok


# ------------------------------------------------------------------ one line on stderr


def test_onnxruntime_logs_nothing_before_the_error(capfd, tmp_path):
    """A file every checker accepts but onnxruntime cannot load (a ConstantOfShape whose
    value has two elements fails in its kernel's constructor): onnxruntime's coloured
    [E:onnxruntime:...] line (at log level 3) must not reach stderr."""
    value = numpy_helper.from_array(np.array([1.0, 2.0], np.float32))
    graph = helper.make_graph(
        [
            helper.make_node("Shape", ["x"], ["s"]),
            helper.make_node("ConstantOfShape", ["s"], ["c"], value=value, name="fill"),
            helper.make_node("Add", ["x", "c"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path = save(model, tmp_path / "fill.onnx")
    np.savetxt(tmp_path / "f.txt", np.ones((4, 2)))
    code = main(
        ["bake", str(path), "--factors", str(tmp_path / "f.txt"), "--out", str(tmp_path / "o.onnx")]
    )
    out, err = capfd.readouterr()
    one_line_error(code, err, "fill.onnx", "onnxruntime cannot load the model")
    assert "\x1b[" not in err and "[E:onnxruntime" not in err, err
    assert listing(tmp_path) == ["f.txt", "fill.onnx"]


def test_onnxruntime_logs_nothing_when_a_run_fails(capfd, tmp_path):
    """Valid to every checker, but its Reshape(3, -1) fails on 1041 rows, at run time."""
    model = make_model(
        [
            helper.make_node("Gemm", ["x", "W"], ["h"]),
            helper.make_node("Reshape", ["h", "shape"], ["y"], name="bad_reshape"),
        ],
        {"W": np.ones((3, 2)), "shape": np.array([3, -1], np.int64)},
    )
    path = save(model, tmp_path / "reshape.onnx")
    np.savetxt(tmp_path / "f.txt", np.ones((5, 2)))
    code = main(
        ["bake", str(path), "--factors", str(tmp_path / "f.txt"), "--out", str(tmp_path / "o.onnx")]
    )
    out, err = capfd.readouterr()
    one_line_error(code, err, "reshape.onnx", "onnxruntime failed to run the model")
    assert "\x1b[" not in err and "[E:onnxruntime" not in err, err
    assert listing(tmp_path) == ["f.txt", "reshape.onnx"]


def test_no_numpy_warning_escapes_bake(workspace):
    """Outputs that overflow float32 (a scale that fits, times outputs beyond 1) make
    NumPy warn in the comparison; bake reports, it does not warn."""
    in_affine, out_affine = affines(3, 2)
    out_affine = (np.array([3e38, 1.0]), out_affine[1])
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with contextlib.suppress(NormexportError):
            nx.bake(
                workspace / "model.onnx",
                workspace / "out.onnx",
                factors=factors_of(in_affine, out_affine),
            )


def test_fold_refuses_weights_that_overflow_the_dtype(workspace):
    """A scale that fits float32 (3e38) times a weight above 1.2 does not: refused like
    the spliced scale that does not fit, never stored as inf (a NaN model)."""
    in_affine, out_affine = affines(3, 2)
    model = make_model(
        [helper.make_node("Gemm", ["x", "W", "b"], ["y"], name="dense")],
        {"W": np.full((3, 2), 2.0), "b": np.zeros(2)},
    )
    path = save(model, workspace / "twos.onnx")
    in_affine = (np.array([3e38, 1.0, 1.0]), np.zeros(3))
    with pytest.raises(GraphError, match=r"Gemm 'dense': its folded weights overflow float32"):
        nx.bake(
            path, workspace / "out.onnx", factors=factors_of(in_affine, out_affine), mode="fold"
        )
    in_affine = (np.array([1e300, 1.0, 1.0]), np.zeros(3))
    with pytest.raises(GraphError, match=r"scale 1e\+300 does not fit in float32"):
        nx.bake(
            workspace / "model.onnx",
            workspace / "out.onnx",
            factors=factors_of(in_affine, out_affine),
            mode="fold",
        )
    assert not (workspace / "out.onnx").exists()


# ------------------------------------------------------------------ non-finite outputs


def _nan_where(condition):
    """A runtime factory returning the first input, or NaN on the rows ``condition`` picks."""
    return lambda: lambda X: np.where(condition(X)[:, None], np.nan, X[:, :1])


def test_runtimes_agreeing_on_nan_inside_the_training_range_fail():
    """Two runtimes that return the same NaN agree: a model returning NaN for finite
    inputs inside the training range must still fail, naming the first row."""
    from normexport.scaling import MinMaxScaler
    from normexport.verification import check_rows

    in_sc = MinMaxScaler().fit(np.array([[0.0, 10.0], [1.0, 20.0]]), columns=["a", "b"])
    out_sc = MinMaxScaler().fit(np.array([[0.0], [1.0]]), columns=["y"])
    rows = np.array([[0.5, 15.0], [0.25, 12.0], [0.75, 19.0]])
    nan_everywhere = _nan_where(lambda X: np.ones(len(X), bool))
    report = check_rows(
        {"one": nan_everywhere, "two": nan_everywhere}, rows, in_sc, out_sc, dtype="float64"
    )
    assert all(pair.ok for pair in report.pairs)  # they agree ...
    assert not report.ok  # ... and fail
    inside = report.non_finite["inside"]
    beyond_box = 6  # edge rows half a range beyond: both columns, or one, at either end
    assert inside["rows"] == report.rows - beyond_box
    assert inside["first"] == "edge row 2 (a=0, b=10)"  # rows 0-1 lie beyond the box
    assert report.non_finite["outside"]["rows"] == beyond_box
    assert "non-finite outputs for finite inputs inside the training range" in report.table()
    assert report.table().endswith("result: FAIL")

    # NaN only beyond the training range: reported, not a failure
    beyond = _nan_where(lambda X: ((X < [0, 10]) | (X > [1, 20])).any(axis=1))
    report = check_rows({"one": beyond, "two": beyond}, rows, in_sc, out_sc, dtype="float64")
    assert report.ok and "inside" not in report.non_finite
    assert report.non_finite["outside"]["rows"] == 6
    assert "outside the training range: 6 rows, the first edge row 0" in report.table()
    assert report.summary()["non_finite"]["outside"]["rows"] == 6


# ------------------------------------------------------------------ MXNet .params (pure Python)

V2 = 0xF993FAC9


def array_record(shape, flag=0, payload=b"") -> bytes:
    head = struct.pack("<Iii", V2, 0, len(shape)) + struct.pack(f"<{len(shape)}q", *shape)
    return head + struct.pack("<iii", 1, 0, flag) + payload


def params_bytes(records, names) -> bytes:
    out = struct.pack("<QQQ", 0x112, 0, len(records)) + b"".join(records)
    out += struct.pack("<Q", len(names)) + b"".join(struct.pack("<Q", len(n)) + n for n in names)
    return out


def test_params_dimension_beyond_32_bits_is_refused(tmp_path):
    """(2^33, 0) holds no element, but MXNet's 32-bit dims overflow on it (OverflowError)."""
    path = tmp_path / "wide.params"
    path.write_bytes(params_bytes([array_record((2**33, 0))], [b"arg:w"]))
    with pytest.raises(FormatError, match=r"wide.params: array 0: shape \(8589934592, 0\) has a"):
        mxparams.read_params(path)


def test_params_with_a_million_empty_arrays_is_refused_in_bounded_memory(tmp_path):
    n = 10**6
    record = array_record((0,))
    names = [b"arg:%d" % i for i in range(n)]
    path = tmp_path / "many.params"
    path.write_bytes(params_bytes([record] * n, names))
    assert path.stat().st_size > 30 * 2**20  # the 31 MB file of the report
    tracemalloc.start()
    try:
        with pytest.raises(FormatError, match=r"many.params: declares 1000000 arrays, more"):
            mxparams.read_params(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**20, peak  # refused from the count, before any array (was 1.1 GB)


def test_params_at_the_array_limit_read_in_bounded_memory(tmp_path):
    n = mxparams.MAX_ARRAYS
    names = [b"arg:%d" % i for i in range(n)]
    records = [array_record((0,))] * (n - 1) + [array_record((4,), payload=b"\0" * 16)]
    path = tmp_path / "limit.params"
    path.write_bytes(params_bytes(records, names))
    size = path.stat().st_size
    tracemalloc.start()
    try:
        loaded = mxparams.read_params(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(loaded) == n and loaded[f"arg:{n - 1}"].shape == (4,)
    # about 200 bytes a name + an empty array; the file itself is 35 bytes an entry
    assert peak < 400 * n, (peak, size)


def test_params_validated_before_any_array_is_converted(tmp_path):
    """Names are checked before ``convert`` (an MXNet NDArray each) runs even once."""
    path = tmp_path / "dup.params"
    path.write_bytes(
        params_bytes([array_record((2,), payload=b"\0" * 8)] * 2, [b"arg:w", b"arg:w"])
    )
    converted = []
    with pytest.raises(FormatError, match="duplicate parameter names"):
        mxparams.read_params(path, converted.append)
    assert converted == []


def test_params_round_trip_values(tmp_path):
    values = np.arange(6, dtype="<f8").reshape(2, 3)
    path = tmp_path / "v.params"
    path.write_bytes(
        params_bytes(
            [array_record((2, 3), flag=1, payload=values.tobytes()), array_record((0,))],
            [b"arg:w", b"aux:e"],
        )
    )
    loaded = mxparams.read_params(path)
    np.testing.assert_array_equal(loaded["arg:w"], values)
    assert loaded["aux:e"].shape == (0,)


# ------------------------------------------------------------------ targets


def test_out_to_a_character_device_is_a_stream(capsys, workspace):
    code, out, err = run_cli(
        capsys,
        "bake",
        workspace / "model.onnx",
        "--factors",
        workspace / "factors.txt",
        "--out",
        "/dev/null",
    )
    assert code == 0, err
    assert Path("/dev/null").is_char_device()


def test_out_to_a_fifo_is_a_stream(capsys, workspace):
    fifo = workspace / "pipe.onnx"
    os.mkfifo(fifo)
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()), daemon=True)
    reader.start()
    code, out, err = run_cli(
        capsys,
        "bake",
        workspace / "model.onnx",
        "--factors",
        workspace / "factors.txt",
        "--out",
        fifo,
    )
    reader.join(30)
    assert code == 0, err
    assert fifo.is_fifo()
    model = onnx.load_from_string(received[0])
    assert "normexport.scalers" in {p.key for p in model.metadata_props}
    assert not [p for p in listing(workspace) if p.endswith(".tmp")]


def test_out_to_a_descriptor_name_writes_through_it(workspace):
    """/proc/self/fd/N and /dev/fd/N of a pipe get the model, never a replaced file."""
    for template in ("/proc/self/fd/{}", "/dev/fd/{}"):
        read_end, write_end = os.pipe()
        received: list[bytes] = []

        def drain(fd=read_end, into=received):
            with os.fdopen(fd, "rb") as pipe:
                into.append(pipe.read())

        reader = threading.Thread(target=drain, daemon=True)
        reader.start()
        try:
            nx.bake(
                workspace / "model.onnx",
                template.format(write_end),
                factors=workspace / "factors.txt",
            )
        finally:
            os.close(write_end)
        reader.join(30)
        assert onnx.load_from_string(received[0]).graph.node


def test_out_to_dev_stdout_appends_to_what_the_shell_opened(workspace):
    """`--out /dev/stdout >> log`: the model goes through descriptor 1; the log keeps its
    first line (the file is neither replaced nor truncated)."""
    log = workspace / "log.bin"
    log.write_bytes(b"first line\n")
    with open(log, "ab") as sink:
        child = subprocess.run(
            [
                PY,
                "-m",
                "normexport",
                "bake",
                workspace / "model.onnx",
                "--factors",
                workspace / "factors.txt",
                "--out",
                "/dev/stdout",
            ],
            stdout=sink,
            stderr=subprocess.PIPE,
            text=False,
            timeout=120,
        )
    assert child.returncode == 0, child.stderr
    data = log.read_bytes()
    assert data.startswith(b"first line\n")
    reference = workspace / "reference.onnx"
    nx.bake(workspace / "model.onnx", reference, factors=workspace / "factors.txt")
    assert reference.read_bytes() in data
    assert b"result: PASS" in data


def test_stream_target_refused_when_the_model_needs_external_data(workspace):
    save(
        gemm_mlp(hidden=300),
        workspace / "ext.onnx",
        save_as_external_data=True,
        location="ext.data",
        size_threshold=1024,
    )
    with pytest.raises(NormexportError, match="/dev/null: is a character device, which bake"):
        nx.bake(workspace / "ext.onnx", "/dev/null", factors=np.ones((5, 2)))


def test_symlinked_out_replaces_the_file_it_names(workspace):
    real = workspace / "real.onnx"
    real.write_bytes(b"old")
    link = workspace / "link.onnx"
    link.symlink_to(real.name)
    result = nx.bake(workspace / "model.onnx", link, factors=workspace / "factors.txt")
    assert link.is_symlink() and os.readlink(link) == real.name
    assert onnx.load(str(real)).graph.node
    assert result.written == [real]
    assert not [p for p in listing(workspace) if p.startswith(".")]


def test_symlinked_out_with_external_data(workspace):
    """The data file lands beside the file the link names; through a link into another
    directory a loader would look for it beside the link, so that is refused."""
    save(
        gemm_mlp(hidden=300),
        workspace / "ext.onnx",
        save_as_external_data=True,
        location="ext.data",
        size_threshold=1024,
    )
    link = workspace / "link.onnx"
    link.symlink_to("real.onnx")
    result = nx.bake(workspace / "ext.onnx", link, factors=np.ones((5, 2)))
    assert link.is_symlink()
    assert result.written == [workspace / "real.onnx", workspace / "real.onnx.data"]
    onnx.checker.check_model(str(workspace / "real.onnx"), full_check=True)
    (workspace / "sub").mkdir()
    far = workspace / "far.onnx"
    far.symlink_to(workspace / "sub" / "real.onnx")
    with pytest.raises(NormexportError, match="far.onnx: is a symbolic link to .* another dir"):
        nx.bake(workspace / "ext.onnx", far, factors=np.ones((5, 2)))
    assert listing(workspace / "sub") == []


def test_symlink_to_a_directory_is_refused(workspace):
    (workspace / "dir").mkdir()
    (workspace / "dirlink").symlink_to("dir")
    with pytest.raises(NormexportError, match="dirlink: is a directory"):
        nx.bake(workspace / "model.onnx", workspace / "dirlink", factors=np.ones((5, 2)))
    assert listing(workspace / "dir") == []


# ------------------------------------------------------------------ leftovers and locks


def dead_pid() -> int:
    child = subprocess.Popen([PY, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_staging_of_a_dead_bake_is_removed_and_a_live_one_kept(workspace):
    dead = workspace / f".out.onnx.{dead_pid()}.abcd1234.tmp"
    dead.mkdir()
    (dead / "out.onnx").write_bytes(b"half")
    dead_file = workspace / f".out.onnx.{dead_pid()}.efgh5678.tmp"
    dead_file.write_bytes(b"half")
    live = workspace / f".out.onnx.{os.getpid()}.live0000.tmp"
    live.mkdir()
    other = workspace / f".out.onnx.5.{dead_pid()}.zzzz9999.tmp"  # target "out.onnx.5"
    other.mkdir()
    nx.bake(workspace / "model.onnx", workspace / "out.onnx", factors=workspace / "factors.txt")
    assert not dead.exists() and not dead_file.exists()
    assert live.exists() and other.exists()


def test_a_killed_bake_leaves_staging_that_the_next_bake_removes(workspace):
    path = save(endless_loop_model(), workspace / "loop.onnx")
    np.savetxt(workspace / "f.txt", np.ones((6, 2)))
    out = workspace / "out.onnx"
    child = subprocess.Popen(
        [PY, "-m", "normexport", "bake", path, "--factors", workspace / "f.txt", "--out", out],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        staged = []
        while time.monotonic() < deadline and not staged:  # verification is now running
            staged = [p for p in workspace.glob(".out.onnx.*.tmp") if (p / "out.onnx").exists()]
            time.sleep(0.05)
        assert staged, "the bake never staged its output"
        time.sleep(0.2)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert staged[0].exists()  # a kill runs no clean-up
    nx.bake(workspace / "model.onnx", out, factors=workspace / "factors.txt")
    assert [p.name for p in workspace.glob(".out.onnx*")] == []
    onnx.checker.check_model(str(out), full_check=True)


def test_a_second_bake_into_the_same_target_is_refused_naming_the_pid(capsys, workspace):
    out = workspace / "out.onnx"
    with files.target_lock(out):
        code, stdout, err = run_cli(
            capsys,
            "bake",
            workspace / "model.onnx",
            "--factors",
            workspace / "factors.txt",
            "--out",
            out,
        )
    one_line_error(code, err, f"another bake into {out} is running (pid {os.getpid()})")
    assert not out.exists()
    assert not [p for p in listing(workspace) if p.startswith(".out.onnx")]  # lock file gone


def test_the_lock_of_another_process_and_its_death(workspace):
    out = workspace / "out.onnx"
    holder = subprocess.Popen(
        [
            PY,
            "-c",
            "import sys, time; from normexport import files\n"
            "with files.target_lock(sys.argv[1]):\n"
            "    print('held', flush=True); time.sleep(600)",
            out,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(NormexportError, match=rf"another bake into .* \(pid {holder.pid}\)"):
            nx.bake(workspace / "model.onnx", out, factors=workspace / "factors.txt")
    finally:
        holder.kill()
        holder.wait()
    nx.bake(workspace / "model.onnx", out, factors=workspace / "factors.txt")  # freed by death
    assert out.is_file()


def test_target_lock_waits_when_asked(tmp_path):
    target = tmp_path / "model_dir"
    released = threading.Event()

    def hold():
        with files.target_lock(target, what="export"):
            released.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        time.sleep(0.1)
        busy = r"another export into .*model_dir is running"
        with pytest.raises(NormexportError, match=busy), files.target_lock(target, what="export"):
            pass
        threading.Timer(0.2, released.set).start()
        with files.target_lock(target, what="export", wait=30) as lock:
            assert lock == tmp_path / ".model_dir.lock"
    finally:
        released.set()
        holder.join()
    assert listing(tmp_path) == []


def test_a_symlinked_target_shares_the_lock_of_the_file_it_names(tmp_path):
    (tmp_path / "link.onnx").symlink_to("real.onnx")
    with (
        files.target_lock(tmp_path / "real.onnx"),
        pytest.raises(NormexportError, match="another bake into"),
        files.target_lock(tmp_path / "link.onnx"),
    ):
        pass
