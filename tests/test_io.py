"""JSON documents and atomic writes (tables: tests/test_tables.py)."""

from __future__ import annotations

import os
import pickle

import pytest

from normexport import files
from normexport.errors import FormatError, NormexportError


def write(tmp_path, text, name="t.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


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
