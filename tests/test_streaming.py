"""predict and verify --data stream tables: formats agree, batches interleave with the
model, --keep passes columns through, bad tables get one line (core tests, no MXNet)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from test_core import DATA, MODEL

from normexport import predicting, tables, verification
from normexport.cli import main
from normexport.errors import DataError
from normexport.modeldir import load_scalers

INPUTS = ["temp_k", "strain", "frac"]


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    """1000 rows with an id and an extra column, as CSV, Parquet and a 3-file dataset."""
    root = tmp_path_factory.mktemp("streaming")
    rng = np.random.default_rng(0)
    n = 1000
    data = pa.table(
        {
            "id": pa.array([f"r{i:04d}" for i in range(n)]),
            "temp_k": rng.uniform(250, 350, n),
            "note": pa.array(["x"] * n),
            "strain": rng.uniform(0, 0.01, n),
            "frac": rng.integers(0, 2, n),  # an int column is a number too
        }
    )
    pacsv.write_csv(data, root / "t.csv")
    pq.write_table(data, root / "t.parquet", row_group_size=128)
    (root / "ds").mkdir()
    for k, start in enumerate((0, 300, 700)):
        stop = {0: 300, 300: 700, 700: n}[start]
        pq.write_table(data.slice(start, stop - start), root / "ds" / f"part-{k}.parquet")
    return root, data


def test_csv_parquet_and_a_dataset_give_identical_predictions(table, tmp_path):
    root, data = table
    outs = []
    for source in ("t.csv", "t.parquet", "ds"):
        out = tmp_path / f"{source}.parquet"
        assert predicting.predict(MODEL, root / source, out, keep=["id"], batch_rows=97) == 1000
        outs.append(pq.read_table(out))
    assert outs[0].equals(outs[1]) and outs[1].equals(outs[2])
    assert outs[0].column("id").to_pylist() == data.column("id").to_pylist()  # input order


def test_keep_copies_columns_in_the_order_given(table, tmp_path, capsys):
    root, data = table
    out = tmp_path / "p.parquet"
    code = main(
        ["predict", str(MODEL), str(root / "t.parquet"), "--out", str(out), "--keep", "note,id"]
    )
    assert code == 0, capsys.readouterr().err
    got = pq.read_table(out)
    assert got.column_names == ["note", "id", "load", "offset"]
    assert got.column("id").equals(data.column("id"))  # Parquet keeps the kept column's type


def test_predict_writes_each_batch_before_reading_the_next(table, tmp_path, monkeypatch):
    root, _ = table
    events: list[str] = []
    real_batches, real_write = tables.iter_batches, tables.TableWriter.write

    def batches(*args, **kwargs):
        for batch in real_batches(*args, **kwargs):
            events.append("read")
            yield batch

    def write(self, columns, arrays):
        events.append("write")
        return real_write(self, columns, arrays)

    monkeypatch.setattr(tables, "iter_batches", batches)
    monkeypatch.setattr(tables.TableWriter, "write", write)
    predicting.predict(MODEL, root / "t.csv", tmp_path / "p.csv", batch_rows=100)
    assert events == ["read", "write"] * 10


def test_verify_data_streams_and_agrees_with_the_array_path(table, monkeypatch):
    root, data = table
    in_sc, _, _ = load_scalers(MODEL / "scalers.json")
    X = np.column_stack([data.column(c).to_numpy().astype(float) for c in in_sc.columns_])
    whole = verification.verify_directory(MODEL, X)
    reads: list[int] = []
    real_batches = tables.iter_batches

    def batches(*args, **kwargs):
        for batch in real_batches(*args, **kwargs):
            reads.append(batch.rows)
            yield batch

    monkeypatch.setattr(tables, "iter_batches", batches)
    for source in ("t.csv", "t.parquet", "ds"):
        reads.clear()
        streamed = verification.verify_directory(MODEL, data=root / source, chunk_rows=256)
        assert streamed.ok and streamed.data_rows == 1000 and streamed.rows == whole.rows
        assert reads == [256, 256, 256, 232]
        assert [p.max_abs for p in streamed.pairs] == [p.max_abs for p in whole.pairs]


def test_verify_rows_samples_in_one_streaming_pass(table):
    root, _ = table
    report = verification.verify_directory(MODEL, data=root / "t.csv", rows=50)
    assert report.ok and report.data_rows == 50


def test_reservoir_sample_is_uniform_and_keeps_the_stream_order():
    X = np.arange(10_000, dtype=float).reshape(-1, 1)
    sample = verification.reservoir_sample((X[i : i + 700] for i in range(0, 10_000, 700)), 200)
    assert sample.shape == (200, 1) and np.all(np.diff(sample[:, 0]) > 0)
    means = [
        verification.reservoir_sample((X[i : i + 999] for i in range(0, 10_000, 999)), 50, k).mean()
        for k in range(100)
    ]
    # each sample mean has sd ~ 2887/sqrt(50) = 408; the mean of 100 of them ~ 41
    assert abs(np.mean(means) - 4999.5) < 4 * 41
    short = verification.reservoir_sample([X[:10]], 50)
    np.testing.assert_array_equal(short, X[:10])


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda p: p.write_text("temp_k,strain,frac\n300,0.1,0.5\n300,x,0.5\n"),
            ":3: column 'strain': 'x' is not a number",
        ),
        (lambda p: p.write_text("temp_k,strain\n300,0.1\n"), "no column named 'frac'"),
        (lambda p: p.write_text("temp_k;strain;frac\n300;0.1;0.5\n"), "looks ';'-separated"),
        (
            lambda p: p.write_text("temp_k,strain,frac\n300,,0.5\n"),
            ":2: column 'strain': missing value",
        ),
    ],
    ids=["not-a-number", "missing-column", "semicolons", "empty-cell"],
)
def test_bad_csv_is_one_line_naming_file_line_and_column(tmp_path, capsys, make, message):
    path = tmp_path / "bad.csv"
    make(path)
    for verb in (
        ["predict", str(MODEL), str(path), "--out", str(tmp_path / "o.csv")],
        ["verify", str(MODEL), "--data", str(path)],
    ):
        code = main(verb)
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and message in err and "bad.csv" in err, err
        assert not (tmp_path / "o.csv").exists()


def test_bad_parquet_names_file_row_and_column(tmp_path, capsys):
    path = tmp_path / "bad.parquet"
    pq.write_table(
        pa.table({"temp_k": [300.0, 301.0], "strain": [0.1, float("nan")], "frac": [0.5, 0.5]}),
        path,
    )
    code = main(["predict", str(MODEL), str(path)])
    err = capsys.readouterr().err
    assert code == 2 and "bad.parquet: row 1: column 'strain': nan is not finite" in err, err
    path2 = tmp_path / "str.parquet"
    pq.write_table(pa.table({"temp_k": ["a"], "strain": [0.1], "frac": [0.5]}), path2)
    code = main(["predict", str(MODEL), str(path2)])
    err = capsys.readouterr().err
    assert code == 2 and "column 'temp_k'" in err and "string" in err, err


def test_stdout_is_csv_and_parquet_keeps_float32(capsys, tmp_path):
    assert main(["predict", str(MODEL), str(DATA / "rows.csv")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "load,offset" and len(lines) == 51
    out = tmp_path / "p.parquet"
    assert main(["predict", str(MODEL), str(DATA / "rows.csv"), "--out", str(out)]) == 0
    assert pq.read_table(out).schema.field("load").type == pa.float32()


@pytest.mark.parametrize("cell", ["1_000", "\u0663", "\uff13", "\u22121", "0x10"])
def test_numbers_are_ascii_decimal_as_pyarrow_reads_them(tmp_path, capsys, cell):
    """Python's float() reads 1_000 and other scripts' digits; the table layer does not,
    and says so on the cell's line, like any other non-number."""
    path = tmp_path / "n.csv"
    path.write_text(f"temp_k,strain,frac\n300,{cell},0.5\n", encoding="utf-8")
    assert main(["predict", str(MODEL), str(path)]) == 2
    err = capsys.readouterr().err
    assert f"n.csv:2: column 'strain': {cell!r} is not a number" in err, err


def test_a_header_longer_than_a_read_block_is_refused_before_it_is_held(tmp_path, capsys):
    path = tmp_path / "wide.csv"
    names = ",".join(f"column_{i}" for i in range(100_000))  # about 1.2 MB on one line
    path.write_text(f"{names},temp_k,strain,frac\n")
    assert main(["predict", str(MODEL), str(path)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (
        f"normexport: error: {path}:1: the header row is longer than 512 KiB, "
        "the longest row normexport reads"
    )


def test_the_streamed_verdict_is_the_in_memory_one(table):
    """Chunks of 100 rows: onnx.reference's 256-row sample spans the edge rows and three
    data chunks, runs in its own thread, and still reports exactly what it does in line."""
    root, data = table
    in_sc, _, _ = load_scalers(MODEL / "scalers.json")
    X = np.column_stack([data.column(c).to_numpy().astype(float) for c in in_sc.columns_])
    whole = verification.verify_directory(MODEL, X, chunk_rows=100)
    streamed = verification.verify_directory(MODEL, data=root / "t.parquet", chunk_rows=100)
    assert "onnx.reference" in streamed.runtimes and streamed.rounding
    assert streamed.to_dict() == whole.to_dict()


def test_a_tampered_onnx_file_fails_the_streamed_check_on_every_pair(table, tmp_path):
    import shutil

    import onnx

    root, _ = table
    model = tmp_path / "model"
    shutil.copytree(MODEL, model)
    proto = onnx.load(str(model / "model.onnx"))
    bias = next(t for t in proto.graph.initializer if t.dims == [2] or list(t.dims) == [1, 2])
    values = onnx.numpy_helper.to_array(bias).copy()
    values.flat[0] += 1e-3  # a thousandth of a normalized unit on one output
    bias.CopyFrom(onnx.numpy_helper.from_array(values, bias.name))
    onnx.save(proto, str(model / "model.onnx"))
    report = verification.verify_directory(model, data=root / "t.csv", chunk_rows=100)
    assert not report.ok
    failed = {(p.a, p.b) for p in report.pairs if not p.ok}
    assert failed == {("onnxruntime", "numpy"), ("onnx.reference", "numpy")}


def test_a_bad_row_deep_in_the_table_is_one_line_and_stops_every_thread(tmp_path, capsys):
    """The bad row lies in the third 512 KiB read block, after chunks already ran."""
    import threading

    rng = np.random.default_rng(1)
    rows = [f"{t},{s},{f}" for t, s, f in rng.uniform([250, 0, 0], [350, 0.01, 1], (20000, 3))]
    rows[15000] = "300,oops,0.5"
    path = tmp_path / "deep.csv"
    path.write_text("temp_k,strain,frac\n" + "\n".join(rows) + "\n")
    assert path.stat().st_size > 2 * tables.CSV_BLOCK_BYTES
    message = "deep.csv:15002: column 'strain': 'oops' is not a number"
    code = main(["verify", str(MODEL), "--data", str(path)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err, err
    before = threading.active_count()
    with pytest.raises(DataError, match=message):
        verification.verify_directory(MODEL, data=path, chunk_rows=256)
    assert threading.active_count() == before  # reader, runtime and sample threads joined


def test_the_fast_worst_disagreement_is_the_exact_one():
    rng = np.random.default_rng(3)
    a = rng.normal(size=(500, 3))
    b = a + rng.normal(scale=1e-6, size=a.shape)
    special = [np.nan, np.inf, -np.inf, 0.0]
    for trial in range(50):
        x, y = a.copy(), b.copy()
        for _ in range(trial % 4):  # none, then up to three special values in random cells
            x[rng.integers(500), rng.integers(3)] = rng.choice(special)
            y[rng.integers(500), rng.integers(3)] = rng.choice(special)
        if trial % 5 == 0:
            y[7] = x[7] = np.inf  # equal infinities agree
        exact = verification._disagreement(x, y).max(axis=0, initial=0.0)
        np.testing.assert_array_equal(verification._worst_disagreement(x, y), exact)


def test_streamed_verification_runs_numpy_blas_on_one_thread_and_restores_it():
    import threading

    from normexport import reference

    controls = reference._openblas_thread_controls()
    if not controls:
        pytest.skip("no OpenBLAS found in this process (not Linux, or NumPy without OpenBLAS)")
    before = [get() for get, _ in controls]
    seen = []

    def runtime(X):  # on a worker thread ("numpy") or the calling thread ("other")
        seen.append([get() for get, _ in controls])
        return np.zeros((len(X), 2))

    in_sc, out_sc, _ = load_scalers(MODEL / "scalers.json")
    rows = verification.random_rows(in_sc, 300)
    report = verification.check_rows(
        {"numpy": lambda: runtime, "other": lambda: runtime},
        (rows[i : i + 100] for i in range(0, 300, 100)),
        in_sc,
        out_sc,
        dtype="float64",
    )
    assert report.ok and report.data_rows == 300
    assert seen == [[1] * len(controls)] * 8  # the edge rows and three chunks, twice
    assert [get() for get, _ in controls] == before
    # blocks overlapping in several threads: the last one to end restores the count
    start = threading.Barrier(4)
    seen.clear()

    def block():
        start.wait()
        with reference.one_blas_thread():
            seen.append([get() for get, _ in controls])

    threads = [threading.Thread(target=block) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == [[1] * len(controls)] * 4
    assert [get() for get, _ in controls] == before


def test_verify_data_shows_rows_per_second_on_a_terminal_only(table, monkeypatch, capsys):
    import io
    import sys

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    root, _ = table
    verification.verify_directory(MODEL, data=root / "t.csv", chunk_rows=256)
    assert capsys.readouterr().err == ""  # not a terminal: no bar
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    verification.verify_directory(MODEL, data=root / "t.csv", chunk_rows=256)
    shown = terminal.getvalue()
    assert "verifying" in shown and "rows/s" in shown and "1.02k" in shown, shown
