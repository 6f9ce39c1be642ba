"""Tables, JSON and atomic writes."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

from normexport import files, tables
from normexport.errors import DataError, FormatError, NormexportError


def write(tmp_path, text, name="t.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_load_columns_selects_by_name(tmp_path):
    path = write(tmp_path, "a,b,c\n1,2,3\n4,5,6\n\n")
    np.testing.assert_array_equal(tables.load_columns(path, ["c", "a"]), [[3, 1], [6, 4]])
    assert tables.read_header(path) == ["a", "b", "c"]


def test_load_table_reads_groups(tmp_path):
    path = write(tmp_path, "a,b,c\n1,2,3\n")
    X, Y = tables.load_table(path, [["a"], ["b", "c"]])
    assert X.shape == (1, 1) and Y.shape == (1, 2)


@pytest.mark.parametrize(
    ("text", "columns", "message"),
    [
        ("", ["a"], "t.csv: empty file"),
        ("a,b\n", ["a"], "t.csv: no data rows"),
        ("a,b\n1,2\n", ["z"], "t.csv: no column named 'z'"),
        ("a,a\n1,2\n", ["a"], "t.csv:1: duplicate column 'a'"),
        ("a,b\n1,2\n3\n", ["a"], "t.csv:3: row has 1 cells, header has 2"),
        ("a,b\n1,2\n3,x\n", ["b"], "t.csv:3: column 'b': 'x' is not a number"),
        ("a,b\n1,nan\n", ["b"], "t.csv:2: column 'b': nan is not finite"),
        ("a,b\n1,-inf\n", ["b"], "t.csv:2: column 'b': -inf is not finite"),
        ("a,\n1,2\n", ["a"], "t.csv:1: empty column name"),
    ],
)
def test_bad_tables_name_file_line_and_column(tmp_path, text, columns, message):
    path = write(tmp_path, text)
    with pytest.raises(DataError) as info:
        tables.load_columns(path, columns)
    assert message in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="nope.csv: no such file"):
        tables.load_columns(tmp_path / "nope.csv", ["a"])


def test_binary_file_is_refused(tmp_path):
    path = tmp_path / "t.csv"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(DataError, match="t.csv"):
        tables.load_columns(path, ["a"])


def test_json_round_trip_and_format_tag(tmp_path):
    path = tmp_path / "x.json"
    files.write_json(path, {"format": "t/1", "v": [1.5, 2]})
    assert files.read_json(path, "t/1") == {"format": "t/1", "v": [1.5, 2]}
    with pytest.raises(FormatError, match="format tag is 't/1', expected 'u/1'"):
        files.read_json(path, "u/1")


def test_json_refuses_pickle_garbage_and_nan(tmp_path):
    p = tmp_path / "p.json"
    p.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(FormatError, match="pickle"):
        files.read_json(p)
    p.write_text("{not json")
    with pytest.raises(FormatError, match="not valid JSON"):
        files.read_json(p)
    p.write_text('{"a": NaN}')
    with pytest.raises(FormatError, match="not valid JSON"):
        files.read_json(p)
    with pytest.raises(NormexportError, match="no such file"):
        files.read_json(tmp_path / "missing.json")


def test_atomic_write_keeps_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(b"old complete file")

    class Boom(RuntimeError):
        pass

    with pytest.raises(Boom), files.atomic_write(path) as handle:
        handle.write(b"new half-")
        raise Boom("disk full halfway")
    assert path.read_bytes() == b"old complete file"
    assert os.listdir(tmp_path) == ["model.bin"]  # no temporary file left behind


def test_atomic_write_replaces_on_success(tmp_path):
    path = tmp_path / "f.txt"
    files.write_bytes(path, b"one")
    files.write_bytes(path, b"two")
    assert path.read_bytes() == b"two"
    assert os.listdir(tmp_path) == ["f.txt"]


def test_atomic_write_into_missing_directory(tmp_path):
    with pytest.raises(NormexportError, match="cannot write here"):
        files.write_bytes(tmp_path / "no" / "f.txt", b"x")


def test_write_csv_round_trips(tmp_path):
    values = np.array([[0.1, 1e-17], [3.0, -2.5]])
    tables.write_table(tmp_path / "o.csv", ["u", "v"], values)
    assert tables.load_columns(tmp_path / "o.csv", ["u", "v"]).tobytes() == values.tobytes()
