"""Files: CSV tables, tagged JSON documents, atomic writes and the model directory.

Everything that reads user files validates once, here, and raises a
:class:`~normexport.errors.NormexportError` naming the file, line and column at fault.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import math
import os
import stat
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np

from normexport.errors import DataError, FormatError, NormexportError, first_line

# The model directory (see docs/model-directory.md).
SCALERS_FILE = "scalers.json"
NET_PREFIX = "net"
MODEL_PREFIX = "model"
ONNX_FILE = "model.onnx"
MANIFEST_FILE = "manifest.json"
REPORT_DIR = "report"

MAX_JSON_BYTES = 64 * 1024 * 1024  # scalers, manifests and symbols are small; refuse absurd ones
_PICKLE_MAGIC = b"\x80"
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def symbol_file(directory: str | os.PathLike[str], prefix: str) -> Path:
    return Path(directory) / f"{prefix}-symbol.json"


def params_file(directory: str | os.PathLike[str], prefix: str) -> Path:
    return Path(directory) / f"{prefix}-0000.params"


# --------------------------------------------------------------------------- atomic writes


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block succeeds, rename it over ``path``.

    For writers that insist on a file name (``mx.nd.save``, ``onnx.save``). If the block
    raises, the temporary file is removed and ``path`` is untouched.
    """
    target = Path(path)
    if target.is_dir():
        raise NormexportError(f"{target}: is a directory; give a file name")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        raise NormexportError(f"{target.parent}: cannot write here ({exc.strerror})") from exc
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give what open() would
        yield Path(tmp)
        _fsync(tmp)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; on success rename it over ``path``.

    If the block raises, the temporary file is removed and ``path`` is untouched, so a
    reader never sees half a file.
    """
    with atomic_path(path) as tmp, open(tmp, mode) as handle:
        yield handle


def _fsync(path: str | os.PathLike[str]) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_write(path, "wb") as handle:
        handle.write(data)


def sha256_file(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------- JSON


def dump_json(obj: Any) -> str:
    """Canonical JSON text: stable key order as given, two-space indent, final newline."""
    return json.dumps(obj, indent=2, allow_nan=False) + "\n"


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    write_bytes(path, dump_json(obj).encode("utf-8"))


def read_json(path: str | os.PathLike[str], format_tag: str | None = None) -> Any:
    """Read a JSON document; with ``format_tag``, require ``obj["format"] == format_tag``."""
    path = Path(path)
    raw = read_small_file(path, MAX_JSON_BYTES)
    if raw.startswith(_PICKLE_MAGIC):
        raise FormatError(f"{path}: looks like a Python pickle; normexport reads JSON only")
    try:
        obj = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError) as exc:
        raise FormatError(f"{path}: not valid JSON ({exc})") from exc
    if format_tag is not None:
        found = obj.get("format") if isinstance(obj, dict) else None
        if found != format_tag:
            raise FormatError(f"{path}: format tag is {found!r}, expected {format_tag!r}")
    return obj


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not allowed")


def read_small_file(path: Path, limit: int) -> bytes:
    """Read a whole file that must exist and be at most ``limit`` bytes."""
    try:
        info = path.stat()
        if stat.S_ISDIR(info.st_mode):
            raise FormatError(f"{path}: is a directory, expected a file")
        if not stat.S_ISREG(info.st_mode):  # a FIFO or device blocks or never ends
            raise FormatError(f"{path}: not a regular file")
        if info.st_size > limit:
            raise FormatError(f"{path}: {info.st_size} bytes, larger than the {limit}-byte limit")
        with open(path, "rb") as handle:
            data = handle.read(limit + 1)
        if len(data) > limit:
            raise FormatError(f"{path}: larger than the {limit}-byte limit")
        return data
    except FileNotFoundError as exc:
        raise NormexportError(f"{path}: no such file") from exc
    except PermissionError as exc:
        raise NormexportError(f"{path}: permission denied") from exc


# --------------------------------------------------------------------------- CSV tables


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


# --------------------------------------------------------------------------- side files

MAX_FACTORS_BYTES = 16 * 1024 * 1024


def load_factors(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a side file of ``(scale, shift)`` rows: ``.npy`` (no pickles) or text.

    Text is what ``numpy.savetxt`` writes: one row per line, whitespace- or
    comma-separated, ``#`` comments.
    """
    path = Path(path)
    raw = read_small_file(path, MAX_FACTORS_BYTES)
    if path.suffix == ".npy" or raw.startswith(b"\x93NUMPY"):
        import io as _bytesio

        try:
            array = np.load(_bytesio.BytesIO(raw), allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise FormatError(f"{path}: not a readable .npy array of numbers ({exc})") from exc
    else:
        if raw.startswith(_PICKLE_MAGIC):
            raise FormatError(f"{path}: looks like a Python pickle; expected text or .npy")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise FormatError(f"{path}: not a text file of numbers or a .npy array") from None
        if not any(line.split("#")[0].strip() for line in text.splitlines()):
            raise FormatError(f"{path}: empty, expected rows of (scale, shift)")
        try:
            delimiter = "," if "," in text else None
            array = np.loadtxt(text.splitlines(), delimiter=delimiter, ndmin=2)
        except ValueError as exc:
            raise FormatError(f"{path}: not a table of numbers ({first_line(exc)})") from exc
    return check_factors(array, str(path), error=FormatError)


def check_factors(
    factors: Any, source: str = "factors", *, error: type[NormexportError] = DataError
) -> np.ndarray:
    """Validate an array of ``(scale, shift)`` rows; return it as float64."""
    array = np.asarray(factors)
    if not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
        raise error(f"{source}: holds {array.dtype} values, expected real numbers")
    array = array.astype(np.float64)
    if array.ndim != 2 or array.shape[1] != 2:
        raise error(
            f"{source}: expected rows of (scale, shift), shape (n_inputs + n_outputs, 2); "
            f"got shape {array.shape}"
        )
    for row, (scale, shift) in enumerate(array):
        if not np.isfinite(scale) or scale == 0 or not np.isfinite(shift):
            raise error(
                f"{source}: row {row + 1}: scale {scale} and shift {shift} must be finite, "
                "scale non-zero"
            )
    return array
