"""CSV tables by column name (to be replaced by the pyarrow table layer)."""

from __future__ import annotations

import contextlib
import csv
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO

import numpy as np

from normexport.errors import DataError
from normexport.files import atomic_write


def read_header(path: str | os.PathLike[str]) -> list[str]:
    """The column names of a CSV file (its first row)."""
    path = Path(path)
    with _open_csv(path) as handle:
        row = next(csv.reader(handle), None)
    if row is None:
        raise DataError(f"{path}: empty file, expected a header row")
    return _check_header(path, row)


def load_columns(path: str | os.PathLike[str], columns: Sequence[str]) -> np.ndarray:
    """Read the named columns of a CSV file as a float64 array of shape ``(rows, len(columns))``.

    Errors name the file, line (1-based, the header is line 1) and column: a missing
    file or column, a duplicate header, a ragged row, a non-numeric, NaN or infinite
    cell, or a table with no data rows.
    """
    return load_table(path, [columns])[0]


def load_table(path: str | os.PathLike[str], groups: Sequence[Sequence[str]]) -> list[np.ndarray]:
    """Like :func:`load_columns` for several column groups read in one pass."""
    path = Path(path)
    with _open_csv(path) as handle:
        reader = csv.reader(handle)
        header_row = next(reader, None)
        if header_row is None:
            raise DataError(f"{path}: empty file, expected a header row")
        header = _check_header(path, header_row)
        index = {name: i for i, name in enumerate(header)}
        picks = []
        for group in groups:
            if not group:
                raise DataError(f"{path}: no columns selected")
            missing = [c for c in group if c not in index]
            if missing:
                raise DataError(
                    f"{path}: no column named {missing[0]!r} (columns: {', '.join(header)})"
                )
            picks.append([index[c] for c in group])
        rows: list[list[list[float]]] = [[] for _ in groups]
        for line_no, row in enumerate(reader, start=2):
            if not row or all(not cell.strip() for cell in row):
                continue  # blank line
            if len(row) != len(header):
                raise DataError(
                    f"{path}:{line_no}: row has {len(row)} cells, header has {len(header)}"
                )
            for out, pick in zip(rows, picks, strict=True):
                out.append([_parse_cell(path, line_no, header[j], row[j]) for j in pick])
    if not rows[0]:
        raise DataError(f"{path}: no data rows after the header")
    return [np.asarray(r, dtype=np.float64) for r in rows]


@contextlib.contextmanager
def _open_csv(path: Path) -> Iterator[IO[str]]:
    try:
        if path.is_dir():
            raise DataError(f"{path}: is a directory, expected a CSV file")
        if path.exists() and not path.is_file():  # a FIFO or device blocks or never ends
            raise DataError(f"{path}: not a regular file, expected a CSV file")
        with open(path, newline="", encoding="utf-8-sig") as handle:
            yield handle
    except FileNotFoundError as exc:
        raise DataError(f"{path}: no such file") from exc
    except PermissionError as exc:
        raise DataError(f"{path}: permission denied") from exc
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not a UTF-8 text file") from exc
    except csv.Error as exc:
        raise DataError(f"{path}: not a readable CSV file ({exc})") from exc


def _check_header(path: Path, row: list[str]) -> list[str]:
    header = [cell.strip() for cell in row]
    seen: set[str] = set()
    for name in header:
        if not name:
            raise DataError(f"{path}:1: empty column name in the header")
        if name in seen:
            raise DataError(f"{path}:1: duplicate column {name!r} in the header")
        seen.add(name)
    return header


def _parse_cell(path: Path, line_no: int, column: str, cell: str) -> float:
    try:
        value = float(cell)
    except ValueError:
        raise DataError(
            f"{path}:{line_no}: column {column!r}: {cell.strip()!r} is not a number"
        ) from None
    if not math.isfinite(value):
        raise DataError(f"{path}:{line_no}: column {column!r}: {cell.strip()} is not finite")
    return value


def write_csv(path: str | os.PathLike[str], columns: Sequence[str], values: np.ndarray) -> None:
    """Write a header and rows atomically; floats keep full precision (``repr``)."""
    with atomic_write(path, "w") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(columns)
        for row in values.tolist():
            writer.writerow([repr(v) for v in row])
