"""Batch scoring on a real Dask cluster (LocalCluster, 2 worker processes, 1 thread each).

The output equals in-process prediction bit for bit; a worker killed mid-job and a client
killed mid-job (then rerun) lose nothing and redo only what is missing; bad input is
refused in one line before anything is written.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pytest

distributed = pytest.importorskip("distributed")

import cloudpickle
import onnx
import onnxruntime as ort
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from onnx import TensorProto, helper, numpy_helper

import normexport as nx
from normexport import partition
from normexport.engines import MANIFEST_FILE, MANIFEST_FORMAT
from normexport.engines.dask import predict_dataset, run_cli
from normexport.errors import DataError
from normexport.partition import PartitionPredictor, partition_predictor
from normexport.scaling import scalers_to_dict

INPUTS = ["temp_k", "strain", "frac"]
TARGETS = ["load", "offset"]
ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class SlowPredictor(PartitionPredictor):
    """Sleeps before each model call, so that a job is still running when the test strikes."""

    delay: float = 0.0

    def run(self, X: np.ndarray) -> np.ndarray:
        time.sleep(self.delay if len(X) else 0)  # schema checks run it on no rows
        return super().run(X)


# Workers cannot import this test module: ship its classes by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A float32 3→8→2 MLP (Gemm, Tanh, Gemm) whose metadata names its columns."""
    rng = np.random.default_rng(0)
    X = np.column_stack(
        [rng.uniform(250, 350, 64), rng.uniform(0, 0.01, 64), rng.uniform(0, 1, 64)]
    )
    Y = np.column_stack([X[:, 0] / 3.5, 4000 * X[:, 1]])
    in_sc = nx.MinMaxScaler().fit(X, columns=INPUTS)
    out_sc = nx.MinMaxScaler().fit(Y, columns=TARGETS, target=True)
    weights = {
        "W1": rng.normal(size=(3, 8)) * [[0.02], [100.0], [1.0]],
        "b1": rng.normal(size=8),
        "W2": rng.normal(size=(8, 2)) * 10,
        "b2": np.array([80.0, 20.0]),
    }
    graph = helper.make_graph(
        [
            helper.make_node("Gemm", ["input", "W1", "b1"], ["h"]),
            helper.make_node("Tanh", ["h"], ["a"]),
            helper.make_node("Gemm", ["a", "W2", "b2"], ["output"]),
        ],
        "mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 2])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()],
    )
    onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx_model.ir_version = 8
    scalers = scalers_to_dict(in_sc, out_sc, "float32")
    helper.set_model_props(onnx_model, {"normexport.scalers": json.dumps(scalers)})
    onnx.checker.check_model(onnx_model, full_check=True)
    directory = tmp_path_factory.mktemp("model")
    onnx.save(onnx_model, directory / "model.onnx")
    (directory / "scalers.json").write_text(json.dumps(scalers))
    return directory / "model.onnx"


@pytest.fixture(scope="module")
def client():
    """The shared cluster: 2 worker processes with 1 thread each, on loopback only."""
    with (
        distributed.LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
        ) as cluster,
        distributed.Client(cluster, set_as_default=False) as client,
    ):
        yield client


def frames(parts: int, rows: int, seed: int = 1) -> dict[str, pd.DataFrame]:
    """``parts`` partitions of raw rows: an id, the inputs (not in order), a text column."""
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(parts):
        n = rows + i % 3
        out[f"part-{i}"] = pd.DataFrame(
            {
                "frac": rng.uniform(0, 1, n),
                "id": np.arange(n) + 1000 * i,
                "temp_k": rng.uniform(250, 350, n),
                "note": [f"row{j}" for j in range(n)],
                "strain": rng.uniform(0, 0.01, n),
            }
        )
    return out


def write_dataset(directory: Path, data: dict[str, pd.DataFrame], kind: str = "parquet") -> Path:
    directory.mkdir(parents=True)
    for name, frame in data.items():
        if kind == "parquet":
            frame.to_parquet(directory / f"{name}.parquet", index=False)
        else:
            frame.to_csv(directory / f"{name}.csv", index=False)
    return directory


def reference(model: Path, frame: pd.DataFrame) -> np.ndarray:
    """onnxruntime on the raw float64 columns cast to float32: no normexport involved."""
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": frame[INPUTS].to_numpy(np.float64).astype(np.float32)})[0]


def check_outputs(out: Path, model: Path, data: dict[str, pd.DataFrame], keep: str = "id") -> None:
    """Every partition's output: keep column then targets, rows in order, bits equal."""
    predictor = partition_predictor(model, keep=[keep])
    for name, frame in data.items():
        table = pq.read_table(out / f"{name}.parquet")
        assert table.column_names == [keep, *TARGETS]
        assert [str(v) for v in table[keep].to_pylist()] == [str(v) for v in frame[keep]]
        got = np.column_stack([table[t].to_numpy() for t in TARGETS])
        assert got.dtype == np.float32
        for want in (reference(model, frame), predictor(frame)[TARGETS].to_numpy()):
            np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
    assert not list(out.glob(".*.tmp")), "a temporary file was left behind"


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def outputs(out: Path) -> dict[str, tuple[int, int]]:
    """Finished outputs by name: (inode, mtime_ns)."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("part-*.parquet")}


# ------------------------------------------------------------------------ the callable


def test_predictor_is_small_picklable_and_runs_under_map_partitions(model, client):
    import dask.dataframe as dd

    predictor = nx.partition_predictor(model.parent, keep=["id"])  # a model directory
    blob = pickle.dumps(predictor)
    assert len(blob) < 1000 and b"InferenceSession" not in blob
    data = pd.concat(frames(3, 40).values(), ignore_index=True)

    want = predictor(data)
    assert list(want.columns) == ["id", *TARGETS] and want.index.equals(data.index)
    np.testing.assert_array_equal(want[TARGETS].to_numpy(), reference(model, data))
    table = pa.Table.from_pandas(data, preserve_index=False)
    for arrow in (table, table.combine_chunks().to_batches()[0]):
        assert predictor(arrow).to_pandas().equals(want.reset_index(drop=True))
    assert [len(f) for f in predictor.map_iter([data[:5], data[5:]])] == [5, len(data) - 5]

    frame = dd.from_pandas(data, npartitions=4)
    got = client.compute(frame.map_partitions(predictor, meta=predictor.meta(frame._meta)))
    pd.testing.assert_frame_equal(got.result(), want, check_exact=True)
    # One session per worker process, reused by later partitions.
    sessions = client.run(lambda: {k: id(v[1]) for k, v in partition._SESSIONS.items()})
    client.compute(frame.map_partitions(predictor, meta=predictor.meta(frame._meta))).result()
    assert client.run(lambda: {k: id(v[1]) for k, v in partition._SESSIONS.items()}) == sessions

    bad = data.copy()
    bad.loc[45, "strain"] = np.nan
    job = dd.from_pandas(bad, npartitions=4).map_partitions(
        predictor, meta=predictor.meta(frame._meta)
    )
    with pytest.raises(DataError, match=r"^partition 1: column 'strain', row \d+: nan is not"):
        client.compute(job).result()


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d.drop(columns="strain"), r"no column 'strain' \(columns: frac, id, temp_k"),
        (lambda d: d.assign(frac=d.frac.astype(str)), r"column 'frac' has type \S+, not a real"),
        (lambda d: d.assign(frac=d.frac > 0.5), r"column 'frac' has type bool, not a real"),
        (lambda d: d.assign(temp_k=np.inf), r"column 'temp_k', row 0: inf is not finite"),
        (lambda d: d.drop(columns="id"), r"no column 'id'"),
    ],
)
def test_predictor_refuses_bad_frames_in_one_line(model, change, message):
    predictor = partition_predictor(model, keep=["id"])
    data = change(frames(1, 10)["part-0"])
    for table in (data, pa.Table.from_pandas(data)):
        with pytest.raises(DataError, match=message) as caught:
            predictor.predict(table, where="f.parquet")
        assert str(caught.value).startswith("f.parquet: ") and "\n" not in str(caught.value)


# ------------------------------------------------------------------------ the dataset job


def test_dataset_equals_in_process_prediction_and_resumes(model, tmp_path, client, capsys):
    data = frames(11, 120)  # part-10 sorts after part-9
    source = write_dataset(tmp_path / "data", data)
    (source / "_SUCCESS").touch()
    out = tmp_path / "out"
    result = predict_dataset(model, source, out, keep=["id"], workers=2)  # its own LocalCluster
    assert result["run"] == {**result["run"], "partitions": 11, "done": 0, "computed": 11}
    check_outputs(out, model, data)
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest == {k: v for k, v in result.items() if k != "run"}
    assert manifest["format"] == MANIFEST_FORMAT and manifest["keep"] == ["id"]
    assert manifest["model"]["sha256"] == hashlib.sha256(model.read_bytes()).hexdigest()
    assert [p["output"] for p in manifest["partitions"]] == [f"{n}.parquet" for n in data]
    assert manifest["rows"] == sum(len(f) for f in data.values())
    for entry, frame in zip(manifest["partitions"], data.values(), strict=True):
        path = Path(entry["input"])
        assert entry["rows"] == len(frame) == pq.read_metadata(out / entry["output"]).num_rows
        assert entry["fingerprint"] == {
            "bytes": path.stat().st_size,
            "mtime_ns": path.stat().st_mtime_ns,
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        }

    # A rerun trusts every output; a changed input is redone, and only that one.
    before = outputs(out)
    address = client.scheduler.address
    assert (
        predict_dataset(model, source, out, keep=["id"], scheduler=address)["run"]["computed"] == 0
    )
    assert outputs(out) == before
    data["part-4"] = frames(5, 130, seed=9)["part-4"]
    data["part-4"].to_parquet(source / "part-4.parquet", index=False)
    capsys.readouterr()
    result = predict_dataset(model, source, out, keep=["id"], scheduler=address)
    assert result["run"]["computed"] == 1
    assert "resuming: 10 of 11 partitions done, computing 1" in capsys.readouterr().err
    assert {k: v for k, v in outputs(out).items() if v != before[k]}.keys() == {"part-4.parquet"}
    check_outputs(out, model, data)


def test_csv_glob_through_run_cli(model, tmp_path, client, capsys):
    data = frames(3, 50)
    source = write_dataset(tmp_path / "data", data, kind="csv")
    out = tmp_path / "out"
    code = run_cli(
        str(model), str(source / "part-*.csv"), str(out), "id", client.scheduler.address, None
    )
    assert code == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"wrote 153 rows in 3 partitions to {out} (3 computed, 0 already")
    check_outputs(out, model, data)


def test_worker_killed_mid_job_loses_nothing(model, tmp_path, client):
    data = frames(12, 60)
    source = write_dataset(tmp_path / "data", data)
    slow = SlowPredictor(**asdict(partition_predictor(model, keep=["id"])), delay=0.5)
    out = tmp_path / "out"
    pids = client.run(os.getpid)
    with ThreadPoolExecutor(1) as pool:
        job = pool.submit(predict_dataset, slow, source, out, scheduler=client.scheduler.address)
        wait_for(lambda: len(outputs(out)) >= 1, "the first output")
        busy = [w for w, keys in client.processing().items() if keys]
        victim = pids[busy[0]]
        os.kill(victim, signal.SIGKILL)
        result = job.result(timeout=120)
    assert result["run"]["computed"] == 12
    check_outputs(out, model, data)
    client.wait_for_workers(2, timeout=60)
    assert victim not in client.run(os.getpid).values()


CHILD = """
import sys, time
from dataclasses import asdict, dataclass
from normexport.engines.dask import predict_dataset
from normexport.partition import PartitionPredictor, partition_predictor

@dataclass(frozen=True)
class Slow(PartitionPredictor):
    delay: float = 0.0
    def run(self, X):
        time.sleep(self.delay if len(X) else 0)
        return super().run(X)

model, data, out = sys.argv[1:]
predict_dataset(Slow(**asdict(partition_predictor(model, ["id"])), delay=0.4), data, out)
"""


def test_client_killed_mid_job_then_rerun_redoes_only_the_rest(model, tmp_path, client, capsys):
    data = frames(16, 60)
    source = write_dataset(tmp_path / "data", data)
    out = tmp_path / "out"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    with open(tmp_path / "child.log", "wb") as log:
        # Its own session: the kill takes the client and its local cluster, as Ctrl-C would.
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(model), str(source), str(out)],
            env=env,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        try:
            wait_for(lambda: len(outputs(out)) >= 3 or child.poll() is not None, "3 outputs", 90)
        finally:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
    time.sleep(0.2)
    finished = outputs(out)
    assert 3 <= len(finished) < 16, (tmp_path / "child.log").read_text()
    assert not (out / MANIFEST_FILE).exists()

    capsys.readouterr()
    result = predict_dataset(model, source, out, keep=["id"], scheduler=client.scheduler.address)
    k = len(finished)
    assert result["run"] == {**result["run"], "partitions": 16, "done": k, "computed": 16 - k}
    assert f"resuming: {k} of 16 partitions done, computing {16 - k}" in capsys.readouterr().err
    assert {name: outputs(out)[name] for name in finished} == finished  # untouched
    check_outputs(out, model, data)
    assert len(json.loads((out / MANIFEST_FILE).read_text())["partitions"]) == 16


# ------------------------------------------------------------------------ bad input


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _drop_strain(data):
    data["part-1"] = data["part-1"].drop(columns="strain")
    return "parquet", {}, r"part-1\.parquet: no column named 'strain'"


def _text_frac(data):
    data["part-2"]["frac"] = data["part-2"]["frac"].map(lambda v: f"{v:.3f}%")
    return "parquet", {}, r"part-2\.parquet: column 'frac' holds \S*string values"


def _text_in_csv(data):
    data["part-0"]["strain"] = data["part-0"]["strain"].astype(object)
    data["part-0"].loc[3, "strain"] = "abc"
    return "csv", {}, r"part-0\.csv:5: column 'strain': 'abc' is not a number"


def _missing_keep(data):
    return "parquet", {"keep": ["id", "batch"]}, r"part-0\.parquet: no column named 'batch'"


def _silent_scheduler(data):
    address = f"tcp://127.0.0.1:{free_port()}"
    return (
        "parquet",
        {"scheduler": address, "timeout": 2},
        f"^scheduler {address}: no answer within 2 s$",
    )


def _not_an_address(data):
    return "parquet", {"scheduler": "tcp://127.0.0.1:port"}, r"^scheduler \S+: not an address \("


@pytest.mark.parametrize(
    "case",
    [_drop_strain, _text_frac, _text_in_csv, _missing_keep, _silent_scheduler, _not_an_address],
)
def test_bad_input_is_one_line_and_writes_nothing(model, tmp_path, case):
    data = frames(3, 20)
    kind, options, message = case(data)
    source = write_dataset(tmp_path / "data", data, kind)
    out = tmp_path / "out"
    options = {"keep": ["id"], "scheduler": "tcp://127.0.0.1:1", **options}
    with pytest.raises(DataError, match=message) as caught:
        predict_dataset(model, source, out, **options)
    assert "\n" not in str(caught.value)
    assert not out.exists()


def test_bad_value_found_on_a_worker_names_file_row_and_column(model, tmp_path, client):
    data = frames(4, 30)
    data["part-2"].loc[7, "temp_k"] = np.nan
    source = write_dataset(tmp_path / "data", data)
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"part-2\.parquet: row 7: column 'temp_k': ") as caught:
        predict_dataset(model, source, out, keep=["id"], scheduler=client.scheduler.address)
    assert "\n" not in str(caught.value)
    assert not (out / MANIFEST_FILE).exists() and not (out / "part-2.parquet").exists()
