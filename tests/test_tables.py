"""The streaming table layer: CSV, Parquet and Parquet datasets through pyarrow."""

from __future__ import annotations

import gzip
import itertools
import os

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from normexport import tables
from normexport.errors import DataError, NormexportError


def write(tmp_path, text, name="t.csv"):
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, newline="")
    return path


def message(call, *args, **kw):
    with pytest.raises(NormexportError) as info:
        call(*args, **kw)
    text = str(info.value)
    assert "\n" not in text
    return text


def frame(n=1000, seed=0):
    """Columns of every kind a user table holds: floats, ints, a float32, an id, a label."""
    rng = np.random.default_rng(seed)
    return pa.table(
        {
            "x": rng.standard_normal(n) * 10.0 ** rng.integers(-300, 300, n),
            "y": rng.uniform(0, 1, n),
            "k": pa.array(rng.integers(-5, 5, n), pa.int16()),
            "f": rng.uniform(0, 1, n).astype(np.float32),
            "id": pa.array(rng.integers(0, 10**12, n), pa.int64()),
            "name": pa.array([f"r{i:05d}" for i in range(n)]),
        }
    )


def write_all_formats(tmp_path, table):
    """The same rows as CSV (pyarrow's writer), .csv.gz, Parquet and a 3-file dataset."""
    paths = {"csv": tmp_path / "t.csv", "parquet": tmp_path / "t.parquet"}
    pacsv.write_csv(table, paths["csv"])
    pq.write_table(table, paths["parquet"], row_group_size=300)
    paths["gz"] = tmp_path / "t.csv.gz"
    paths["gz"].write_bytes(gzip.compress(paths["csv"].read_bytes()))
    paths["dir"] = tmp_path / "ds"
    paths["dir"].mkdir()
    bounds = [0, 123, 600, table.num_rows]  # file sizes unrelated to the batch size
    for i, (a, b) in enumerate(itertools.pairwise(bounds)):
        pq.write_table(table.slice(a, b - a), paths["dir"] / f"part-{i:02d}.parquet")
    (paths["dir"] / "_SUCCESS").write_text("")  # what Spark leaves behind: ignored
    return paths


# --------------------------------------------------------------------------- formats


def test_every_format_gives_identical_arrays(tmp_path):
    table = frame()
    paths = write_all_formats(tmp_path, table)
    groups = [["x", "k"], ["id", "y"], ["f"]]
    want = [np.column_stack([table[c].to_numpy().astype(np.float64) for c in g]) for g in groups]
    for kind, path in paths.items():
        got = tables.load_table(path, groups)
        assert all(a.dtype == np.float64 for a in got)
        assert got[0].tobytes() == want[0].tobytes() and got[1].tobytes() == want[1].tobytes()
        # CSV holds a float32 as its shortest text: the same float32, not the same float64
        assert got[2].astype(np.float32).tobytes() == want[2].astype(np.float32).tobytes()
        assert tables.read_header(path) == table.column_names, kind


@pytest.mark.parametrize("kind", ["csv", "parquet", "dir"])
def test_batches_have_the_asked_size_and_first_row(tmp_path, kind):
    path = write_all_formats(tmp_path, frame(1050))[kind]
    batches = list(tables.iter_batches(path, [["y"]], keep=["id"], batch_rows=100))
    assert [b.first_row for b in batches] == list(range(0, 1050, 100))
    assert [b.rows for b in batches] == [100] * 10 + [50]
    assert all(b.arrays[0].shape == (b.rows, 1) for b in batches)


def test_csv_options_users_need(tmp_path):
    # BOM, CRLF, blank lines, quoted cells and a quoted newline, spaces around names and values
    text = '\ufeff"a" , b ,note\r\n1, 2 ,"x, y"\r\n\r\n"3",4,"two\r\nlines"\r\n'
    path = write(tmp_path, text)
    assert tables.read_header(path) == ["a", "b", "note"]
    assert tables.load_columns(path, ["b", "a"]).tolist() == [[2, 1], [4, 3]]
    (batch,) = tables.iter_batches(path, [["a"]], keep=["note"])
    assert batch.kept.column("note").to_pylist() == ["x, y", "two\r\nlines"]


@pytest.mark.parametrize("delimiter", [";", "\t", "\\t", "tab", "|"])
def test_delimiter(tmp_path, delimiter):
    char = {"\\t": "\t", "tab": "\t"}.get(delimiter, delimiter)
    path = write(tmp_path, f"a{char}b\n1{char}2.5\n")
    assert tables.load_columns(path, ["b"], delimiter=delimiter).tolist() == [[2.5]]
    assert tables.read_header(path, delimiter=delimiter) == ["a", "b"]


def test_int_columns_of_any_width_are_accepted(tmp_path):
    ints = {str(t): pa.array([1, 2, 100], t) for t in (pa.int8(), pa.uint16(), pa.int32())}
    table = pa.table({**ints, "i64": pa.array([-(2**40), 0, 7]), "h": pa.array([1.5, 2, 3])})
    pq.write_table(table, tmp_path / "i.parquet")
    got = tables.load_columns(tmp_path / "i.parquet", table.column_names)
    assert got.tolist() == [[1, 1, 1, -(2**40), 1.5], [2, 2, 2, 0, 2], [100, 100, 100, 7, 3]]


# --------------------------------------------------------------------------- kept columns


def test_keep_preserves_order_values_and_types(tmp_path):
    table = frame(500)
    paths = write_all_formats(tmp_path, table)
    keep = ["name", "id", "k"]
    for kind in ("parquet", "dir"):
        batches = list(tables.iter_batches(paths[kind], [["y"]], keep=keep, batch_rows=64))
        kept = pa.concat_tables([b.kept for b in batches])
        assert kept.column_names == keep
        assert kept.schema == table.select(keep).schema  # int64 stays int64, int16 int16
        assert kept.equals(table.select(keep)), kind
    # CSV has no types: kept CSV columns are their text, verbatim (leading zeros survive)
    path = write(tmp_path, "id,x,code\n007,1.5,a\n010,2.5,\n")
    (batch,) = tables.iter_batches(path, [["x"]], keep=["code", "id"])
    assert batch.kept.to_pydict() == {"code": ["a", ""], "id": ["007", "010"]}


def test_kept_input_column_is_float(tmp_path):
    path = write(tmp_path, "id,x\n1,1.5\n2,2.5\n")
    (batch,) = tables.iter_batches(path, [["x"]], keep=["x", "id"])
    assert batch.kept.column("x").to_pylist() == [1.5, 2.5]
    assert batch.kept.column("x").type == pa.float64()


# --------------------------------------------------------------------------- bad CSV


@pytest.mark.parametrize(
    ("text", "columns", "expected"),
    [
        ("", ["a"], "t.csv: empty file"),
        ("a,b\n", ["a"], "t.csv: no data rows"),
        ("a,b\n\n\n", ["a"], "t.csv: no data rows"),
        ("a,b\n1,2\n", ["z"], "t.csv: no column named 'z'"),
        ("a,a\n1,2\n", ["a"], "t.csv:1: duplicate column 'a'"),
        ("a,b\n1,2\n3\n", ["a"], "t.csv:3: row has 1 cells, header has 2"),
        ("a,b\n1,2\n3,x\n", ["b"], "t.csv:3: column 'b': 'x' is not a number"),
        ("a,b\n1,nan\n", ["b"], "t.csv:2: column 'b': nan is not finite"),
        ("a,b\n1,-inf\n", ["b"], "t.csv:2: column 'b': -inf is not finite"),
        ("a,\n1,2\n", ["a"], "t.csv:1: empty column name"),
        ("a,b\n1,\n", ["b"], "t.csv:2: column 'b': missing value"),
        ("a,b\n1,NA\n", ["b"], "t.csv:2: column 'b': 'NA' is not a number"),
        ("a,b\n1,1_0\n", ["b"], "t.csv:2: column 'b': '1_0' is not a number"),
        # lines count blank lines, CRLF and quoted newlines: the line is the file's
        ("a,b\n1,2\n\n\n3,x\n", ["b"], "t.csv:5: column 'b': 'x' is not a number"),
        ("a,b\r\n1,2\r\n\r\n3,inf\r\n", ["b"], "t.csv:4: column 'b': inf is not finite"),
        ('a,b,c\n1,"x\ny",2\n\n3,"p",\n', ["c"], "t.csv:5: column 'c': missing value"),
        ('a,b\n"1\n2",3\n4,5,6\n', ["b"], "t.csv:4: row has 3 cells, header has 2"),
        ("\ufeffa,b\n1,2\n3,x\n", ["b"], "t.csv:3: column 'b': 'x' is not a number"),
        ("\na,b\n", ["a"], "t.csv:1: empty header line"),
    ],
)
def test_bad_csv_names_file_line_and_column(tmp_path, text, columns, expected):
    path = write(tmp_path, text)
    assert expected in message(tables.load_columns, path, columns)


@pytest.mark.parametrize(
    ("header", "hint"),
    [
        ("a;b;c", "(the header looks ';'-separated: try --delimiter ';')"),
        ("a\tb\tc", "(the header looks tab-separated: try --delimiter '\\t')"),
    ],
)
def test_header_with_another_delimiter_gets_a_hint(tmp_path, header, hint):
    path = write(tmp_path, f"{header}\n1;2;3\n")
    text = message(tables.load_columns, path, ["a"])
    assert "t.csv: no column named 'a'" in text and text.endswith(hint)


def test_error_far_into_a_big_csv_names_its_line(tmp_path, monkeypatch):
    monkeypatch.setattr(tables, "CSV_BLOCK_BYTES", 1 << 12)  # many blocks
    rows = [f"{i},{i}.5" for i in range(5000)]
    rows[3210] = ""  # a blank line: not a row, but a line
    rows[4321] = "7,oops"
    path = write(tmp_path, "a,b\n" + "\n".join(rows) + "\n")
    assert "t.csv:4323: column 'b': 'oops' is not a number" in message(
        tables.load_columns, path, ["a", "b"]
    )
    rows[4321] = "7,nan"
    write(tmp_path, "a,b\n" + "\n".join(rows) + "\n")
    assert "t.csv:4323: column 'b': nan is not finite" in message(
        tables.load_columns, path, ["b"], batch_rows=1000
    )


def test_gzip_csv_errors_name_the_line(tmp_path):
    path = write(tmp_path, gzip.compress(b"a,b\n1,2\n3,x\n"), "t.csv.gz")
    assert "t.csv.gz:3: column 'b': 'x' is not a number" in message(
        tables.load_columns, path, ["b"]
    )
    path = write(tmp_path, b"a,b\n1,2\n", "u.csv.gz")
    assert "u.csv.gz: not a readable CSV file" in message(tables.read_header, path)


def test_files_that_are_not_tables(tmp_path):
    assert "nope.csv: no such file" in message(tables.load_columns, tmp_path / "nope.csv", ["a"])
    binary = write(tmp_path, b"\xff\xfe\x00garbage")
    assert "t.csv: not a UTF-8 text file" in message(tables.load_columns, binary, ["a"])
    latin = write(tmp_path, "a,b\n1,caf\xe9\n".encode("latin-1"), "l.csv")
    assert "l.csv:2: column 'b': not UTF-8 text" in message(tables.load_columns, latin, ["b"])
    assert tables.load_columns(latin, ["a"]).tolist() == [[1]]  # other columns are not read
    empty_dir = tmp_path / "d.csv"
    empty_dir.mkdir()
    assert "d.csv: is a directory" in message(tables.load_columns, empty_dir, ["a"])
    fifo = tmp_path / "f.csv"
    os.mkfifo(fifo)
    assert "f.csv: not a regular file" in message(tables.load_columns, fifo, ["a"])
    assert "no columns selected" in message(tables.load_table, latin, [[]])


def test_header_errors_come_before_the_first_batch(tmp_path):
    path = write(tmp_path, "a,b\n1,2\n")
    with pytest.raises(DataError, match="no column named 'c'"):
        tables.iter_batches(path, [["a"]], keep=["c"])  # no next() needed


def test_allow_missing_passes_nan_but_not_infinity(tmp_path):
    path = write(tmp_path, "a,b\n1,\n2,nan\n3,4\n")
    got = tables.load_columns(path, ["a", "b"], allow_missing=True)
    assert np.array_equal(got, [[1, np.nan], [2, np.nan], [3, 4]], equal_nan=True)
    write(tmp_path, "a,b\n1,\n2,-inf\n")
    assert "t.csv:3: column 'b': -inf is not finite" in message(
        tables.load_columns, path, ["b"], allow_missing=True
    )


# --------------------------------------------------------------------------- bad Parquet


def test_bad_parquet_names_file_row_and_column(tmp_path):
    path = tmp_path / "d.parquet"
    y = np.arange(40, dtype=np.float64)
    y[17] = np.nan
    table = pa.table({"a": np.arange(40), "b": y, "s": ["t"] * 40, "n": [1.0] * 39 + [None]})
    pq.write_table(table, path, row_group_size=10)
    assert "d.parquet: row 17: column 'b': nan is not finite" in message(
        tables.load_columns, path, ["a", "b"], batch_rows=8
    )
    y[17] = -np.inf
    pq.write_table(table.set_column(1, "b", pa.array(y)), path)
    assert "d.parquet: row 17: column 'b': -inf is not finite" in message(
        tables.load_columns, path, ["b"]
    )
    assert "d.parquet: row 39: column 'n': missing value" in message(
        tables.load_columns, path, ["n"]
    )
    assert np.isnan(tables.load_columns(path, ["n"], allow_missing=True)[39, 0])
    assert "d.parquet: column 's' holds string values, expected int or float" in message(
        tables.load_columns, path, ["a", "s"]
    )
    assert "d.parquet: no column named 'z' (columns: a, b, s, n)" in message(
        tables.load_columns, path, ["z"]
    )
    pq.write_table(table.slice(0, 0), path)
    assert "d.parquet: no data rows" in message(tables.load_columns, path, ["a"])
    write(tmp_path, "a,b\n1,2\n", "c.parquet")
    assert "c.parquet: not a Parquet file" in message(
        tables.load_columns, tmp_path / "c.parquet", ["a"]
    )


def test_bad_dataset_row_names_the_file_and_the_dataset_row(tmp_path):
    directory = tmp_path / "ds"
    directory.mkdir()
    for i in range(3):
        b = np.arange(10.0) + 10 * i
        if i == 1:
            b[4] = np.inf
        pq.write_table(pa.table({"b": b}), directory / f"part-{i}.parquet")
    text = message(tables.load_columns, directory, ["b"], batch_rows=4)
    assert text.endswith(
        "part-1.parquet: row 4 (row 14 of " + str(directory) + "): column 'b': inf is not finite"
    )


def test_dataset_reads_files_in_sorted_name_order(tmp_path):
    directory = tmp_path / "ds"
    (directory / "sub").mkdir(parents=True)
    names = ["b.parquet", "a.parquet", "sub/c.parquet", "a10.parquet"]
    for i, name in enumerate(names):
        pq.write_table(pa.table({"v": [float(i)] * 3}), directory / name)
    pq.write_table(pa.table({"v": [9.0]}), directory / ".hidden.parquet")
    got = tables.load_columns(directory, ["v"])[:, 0].tolist()
    assert got == [1.0] * 3 + [3.0] * 3 + [0.0] * 3 + [2.0] * 3  # a, a10, b, sub/c


# --------------------------------------------------------------------------- streaming


def test_iter_batches_streams_csv(tmp_path, monkeypatch):
    """Consuming one batch of a 10-batch file reads about one batch's worth of blocks."""
    monkeypatch.setattr(tables, "CSV_BLOCK_BYTES", 1 << 12)
    path = write(tmp_path, "a,b\n" + "".join(f"{i},{i / 7}\n" for i in range(10_000)))
    read = []
    real = pacsv.open_csv

    def counting(*args, **kwargs):
        for block in real(*args, **kwargs):
            read.append(block.num_rows)
            yield block

    monkeypatch.setattr(pacsv, "open_csv", counting)
    batches = tables.iter_batches(path, [["b"]], batch_rows=1000)
    assert read == []  # nothing read before the first batch is asked for
    first = next(batches)
    assert first.rows == 1000 and 1000 <= sum(read) < 2000  # about 200 rows a block
    assert len(list(batches)) == 9 and sum(read) == 10_000


@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_bad_last_row_surfaces_only_when_read(tmp_path, monkeypatch, kind):
    monkeypatch.setattr(tables, "CSV_BLOCK_BYTES", 1 << 14)  # a CSV is read a block at a time
    y = np.arange(10_000) / 7
    y[-1] = np.nan
    table = pa.table({"a": np.arange(10_000), "b": y})
    path = tmp_path / f"t.{kind}"
    if kind == "csv":
        pacsv.write_csv(table, path)
    else:
        pq.write_table(table, path, row_group_size=1000)
    batches = tables.iter_batches(path, [["a", "b"]], batch_rows=1000)
    for _ in range(9):
        assert next(batches).rows == 1000  # nine batches before the bad row is ever parsed
    with pytest.raises(DataError, match="nan is not finite"):
        next(batches)


# --------------------------------------------------------------------------- writing


def edge_floats(dtype):
    info = np.finfo(dtype)
    special = [1e-300, 5e-324, 1 / 3, 2 / 3, 0.1, 1e300, 1e16, 123456789.123, -0.0, 0.0]
    special += [info.max, -info.max, info.tiny, info.smallest_subnormal, info.eps]
    rng = np.random.default_rng(7)
    uint = np.uint64 if dtype == np.float64 else np.uint32
    bits = rng.integers(0, np.iinfo(uint).max, 20_000, dtype=uint, endpoint=True)
    random = bits.view(dtype)
    random = random[np.isfinite(random)]
    with np.errstate(over="ignore"):
        values = np.concatenate(
            [np.array(special).astype(dtype), random, rng.random(2000).astype(dtype)]
        )
    return values[np.isfinite(values)]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_csv_floats_round_trip_exactly(tmp_path, dtype):
    values = edge_floats(dtype)
    path = tmp_path / "o.csv"
    with tables.TableWriter(path) as out:
        for chunk in np.array_split(values, 3):
            out.write(["v", "w"], [chunk, -chunk])
    back = tables.load_columns(path, ["v", "w"])
    assert back.astype(dtype).view(values.dtype)[:, 0].tobytes() == values.tobytes()
    assert back.astype(dtype)[:, 1].tobytes() == (-values).tobytes()
    if dtype == np.float32:  # shortest float32 text: 0.1f is written 0.1, not 0.10000000149
        assert "\n0.1\n" in path.read_text().replace(",-0.1", "")


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_parquet_keeps_the_dtype(tmp_path, dtype):
    values = edge_floats(dtype)
    path = tmp_path / "o.parquet"
    with tables.TableWriter(path) as out:
        out.write(["v"], [values])
    stored = pq.read_table(path)
    assert stored.schema.field("v").type == pa.from_numpy_dtype(dtype)
    assert stored.column("v").to_numpy().tobytes() == values.tobytes()


def test_writer_passes_kept_columns_through(tmp_path):
    table = frame(300)
    paths = write_all_formats(tmp_path, table)
    for fmt in ("csv", "parquet"):
        out_path = tmp_path / f"out.{fmt}"
        with tables.TableWriter(out_path) as out:
            for b in tables.iter_batches(
                paths["parquet"], [["y"]], keep=["id", "name"], batch_rows=128
            ):
                out.write(
                    ["id", "y2", "name"],
                    [b.kept.column("id"), b.arrays[0][:, 0] * 2, b.kept.column("name")],
                )
        again = list(tables.iter_batches(out_path, [["y2"]], keep=["id", "name"]))
        y2 = np.concatenate([b.arrays[0][:, 0] for b in again])
        assert y2.tobytes() == (table.column("y").to_numpy() * 2).tobytes()
        kept = pa.concat_tables([b.kept for b in again])
        if fmt == "parquet":
            assert kept.equals(table.select(["id", "name"]))
        else:
            assert kept.column("id").to_pylist() == [str(i) for i in table.column("id").to_pylist()]
    assert (tmp_path / "out.csv").read_text().startswith("id,y2,name\n")


def test_writer_to_stdout_is_csv(capfdbinary):
    with tables.TableWriter(None) as out:
        out.write(["u", "v,w"], [np.array([0.5, 1e-300]), pa.array(["a", "b"])])
    assert capfdbinary.readouterr().out == b'u,"v,w"\n0.5,"a"\n1e-300,"b"\n'


def test_writer_is_atomic(tmp_path):
    path = tmp_path / "pred.csv"
    path.write_text("old complete file\n")

    class Boom(RuntimeError):
        pass

    for name in ("pred.csv", "pred.parquet", "new.csv"):
        with pytest.raises(Boom), tables.TableWriter(tmp_path / name) as out:
            out.write(["u"], [np.arange(1000.0)])
            assert len(os.listdir(tmp_path)) == 2  # the destination and one temporary file
            raise Boom("disk full halfway")
        assert os.listdir(tmp_path) == ["pred.csv"]  # no temporary file, nothing new
        assert path.read_text() == "old complete file\n"
    with tables.TableWriter(path) as out:
        out.write(["u"], [np.array([1.5])])
    assert path.read_text() == "u\n1.5\n" and os.listdir(tmp_path) == ["pred.csv"]


def test_writer_refuses_bad_destinations(tmp_path):
    assert f"{tmp_path}: is a directory" in message(tables.TableWriter(tmp_path).__enter__)
    assert "cannot write here" in message(tables.TableWriter(tmp_path / "no" / "o.csv").__enter__)


def test_writer_casts_later_batches_and_refuses_new_columns(tmp_path):
    with tables.TableWriter(tmp_path / "o.parquet") as out:
        out.write(["u"], [np.array([1.5], np.float32)])
        out.write(["u"], [np.array([2.5])])  # float64 into the float32 column
        with pytest.raises(ValueError, match="columns changed"):
            out.write(["v"], [np.array([1.0])])
    assert pq.read_table(tmp_path / "o.parquet").column("u").to_pylist() == [1.5, 2.5]


def test_writer_without_batches(tmp_path):
    with tables.TableWriter(tmp_path / "o.parquet"), tables.TableWriter(tmp_path / "o.csv"):
        pass
    assert pq.read_table(tmp_path / "o.parquet").num_rows == 0
    assert (tmp_path / "o.csv").read_bytes() == b""


def test_writer_gzip_csv_round_trips(tmp_path):
    values = np.array([0.1, 1 / 3, 5e-324])
    with tables.TableWriter(tmp_path / "o.csv.gz") as out:
        out.write(["v"], [values])
    assert gzip.decompress((tmp_path / "o.csv.gz").read_bytes()).startswith(b"v\n0.1\n")
    assert tables.load_columns(tmp_path / "o.csv.gz", ["v"])[:, 0].tobytes() == values.tobytes()


def test_dataset_files_may_differ_in_numeric_type_but_not_in_columns(tmp_path):
    directory = tmp_path / "ds"
    directory.mkdir()
    pq.write_table(
        pa.table({"b": [0.5, 1.5], "id": pa.array([1, 2], pa.int32())}), directory / "p0.parquet"
    )
    pq.write_table(
        pa.table({"b": pa.array([7, 8], pa.int8()), "id": pa.array([3, 4])}),
        directory / "p1.parquet",
    )
    (batch,) = tables.iter_batches(directory, [["b"]], keep=["id"])
    assert batch.arrays[0][:, 0].tolist() == [0.5, 1.5, 7, 8]
    assert batch.kept.column("id").type == pa.int32()  # the first file's type
    pq.write_table(pa.table({"id": [5]}), directory / "p2.parquet")
    assert "p2.parquet: no column named 'b'" in message(tables.load_columns, directory, ["b"])
    pq.write_table(pa.table({"b": ["x"]}), directory / "p2.parquet")
    assert "p2.parquet: column 'b' holds string values" in message(
        tables.load_columns, directory, ["b"]
    )


def test_parquet_metadata_goes_into_the_schema_and_csv_refuses_it(tmp_path):
    import pyarrow.parquet as pq

    path = tmp_path / "out.parquet"
    with tables.TableWriter(path, metadata={"normexport.record": '{"rows": 2}'}) as writer:
        writer.write(["y"], [np.array([1.0, 2.0])])
    assert pq.read_schema(path).metadata[b"normexport.record"] == b'{"rows": 2}'
    assert pq.read_table(path).column("y").to_pylist() == [1.0, 2.0]
    with pytest.raises(ValueError, match="CSV has none"):
        tables.TableWriter(tmp_path / "out.csv", metadata={"a": "b"})


def test_read_ahead_keeps_order_raises_in_order_and_stays_bounded():
    import time

    produced, closed = [], []

    def items(n, fail_at=None):
        try:
            for i in range(n):
                if i == fail_at:
                    raise DataError(f"t.csv:{i + 2}: bad")
                produced.append(i)
                yield i
        finally:
            closed.append(True)

    assert list(tables.ReadAhead(items(50), depth=2)) == list(range(50))
    produced.clear()
    got = []
    with pytest.raises(DataError, match="t.csv:9: bad"):
        for i in tables.ReadAhead(items(50, fail_at=7)):
            got.append(i)
    assert got == list(range(7))
    produced.clear()
    closed.clear()
    stream = tables.ReadAhead(items(1000), depth=2)
    assert [next(stream) for _ in range(5)] == list(range(5))
    time.sleep(0.2)  # give the producer time to run ahead, were it unbounded
    assert len(produced) <= 5 + 2 + 1  # consumed + queued + the one waiting to be queued
    stream.close()
    assert closed == [True] and len(produced) <= 8
    with pytest.raises(StopIteration):
        next(stream)


def test_float64_columns_become_numpy_without_copies_nulls_as_nan():
    array = pa.array([1.5, None, 3.0, 4.0, None, 6.0])
    np.testing.assert_array_equal(tables._float64_view(array), [1.5, np.nan, 3, 4, np.nan, 6])
    np.testing.assert_array_equal(tables._float64_view(array.slice(2, 3)), [3, 4, np.nan])
    dense = pa.array(np.arange(10.0)).slice(3, 4)
    view = tables._float64_view(dense)
    np.testing.assert_array_equal(view, [3, 4, 5, 6])
    assert not view.flags.owndata  # a view of pyarrow's buffer
    np.testing.assert_array_equal(tables._float64_view(pa.array([1, 2], pa.int32())), [1.0, 2.0])
    assert tables._float64_view(pa.array([], pa.float64())).shape == (0,)
