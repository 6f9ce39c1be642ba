"""The bundled Munsell renotation "real" data (normexport/data/munsell_real.csv)."""

from __future__ import annotations

import csv
import io
import math
import re
from importlib import resources

import pytest

COLUMNS = ["hue", "value", "chroma", "x", "y", "Y", "a", "b"]
FAMILIES = ["R", "YR", "Y", "GY", "G", "BG", "B", "PB", "P", "RP"]
HUE = re.compile(r"^(\d+(?:\.\d+)?)([A-Z]+)$")


@pytest.fixture(scope="module")
def table():
    resource = resources.files("normexport").joinpath("data/munsell_real.csv")
    text = resource.read_text(encoding="ascii")
    reader = csv.reader(io.StringIO(text))
    header = next(reader)
    rows = list(reader)
    return header, rows


def column(table, name):
    header, rows = table
    i = header.index(name)
    return [float(row[i]) for row in rows]


def test_header_is_exactly_the_documented_columns(table):
    header, _ = table
    assert header == COLUMNS


def test_row_count_and_shape(table):
    _, rows = table
    assert len(rows) == 2734
    assert all(len(row) == len(COLUMNS) for row in rows)


def test_numeric_columns_are_finite(table):
    for name in COLUMNS[1:]:
        values = column(table, name)
        assert all(math.isfinite(v) for v in values), name


def test_notation_and_chromaticity_ranges(table):
    assert set(column(table, "value")) == {float(v) for v in range(1, 10)}
    assert set(column(table, "chroma")) <= {float(c) for c in range(2, 40, 2)}
    for name in ("x", "y"):
        assert all(0.0 < v < 1.0 for v in column(table, name)), name
    assert all(0.0 < v <= 100.0 for v in column(table, "Y"))


def test_Y_has_one_value_per_munsell_value_level(table):
    Y = column(table, "Y")
    assert len(set(Y)) == 9
    pairs = set(zip(column(table, "value"), Y))
    assert len(pairs) == 9


def test_a_b_follow_from_hue_and_chroma_on_every_row(table):
    header, rows = table
    i_hue, i_chroma, i_a, i_b = (header.index(n) for n in ("hue", "chroma", "a", "b"))
    for line, row in enumerate(rows, start=2):
        match = HUE.match(row[i_hue])
        assert match is not None, f"line {line}: bad hue {row[i_hue]!r}"
        step, family = float(match[1]), match[2]
        assert family in FAMILIES, f"line {line}: unknown family {family!r}"
        assert 0.0 < step <= 10.0, f"line {line}: bad step {step}"
        H = (10 * FAMILIES.index(family) + step) % 100
        theta = 2 * math.pi * H / 100
        chroma = float(row[i_chroma])
        a, b = float(row[i_a]), float(row[i_b])
        assert math.isclose(a, chroma * math.cos(theta), rel_tol=1e-12, abs_tol=1e-12), line
        assert math.isclose(b, chroma * math.sin(theta), rel_tol=1e-12, abs_tol=1e-12), line
        assert math.isclose(math.hypot(a, b), chroma, rel_tol=1e-12), line


def test_10RP_is_hue_zero(table):
    header, rows = table
    i_hue, i_chroma, i_a, i_b = (header.index(n) for n in ("hue", "chroma", "a", "b"))
    rp = [row for row in rows if row[i_hue] == "10RP"]
    assert rp
    for row in rp:
        assert float(row[i_a]) == float(row[i_chroma])
        assert float(row[i_b]) == 0.0


def test_first_row_matches_source(table):
    _, rows = table
    assert rows[0] == ["10RP", "1.0", "2.0", "0.3629", "0.271", "1.21", "2.0", "0.0"]
