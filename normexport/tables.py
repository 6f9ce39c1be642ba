"""Read and write tables (CSV, Parquet, Parquet datasets) in streamed record batches with pyarrow.

Reading: ``.csv`` (any file that is not Parquet, also ``.csv.gz``), ``.parquet`` / ``.pq``, or a
directory of Parquet files read as one dataset (files in sorted path order). Only the requested
columns are converted, and memory is bounded by a batch (plus pyarrow's CSV read-ahead, about
19 MB, or one Parquet row group), never by the table.

Every bad table raises one :class:`~normexport.errors.DataError` line naming the file, the row
and the column: for CSV the 1-based file line (the header is line 1, exact even across blank
lines and quoted newlines, see :meth:`_Csv._locate`), for Parquet the 0-based row index.

Values: input columns may hold any int or float type (CSV cells must parse as numbers); NaN and
infinities are errors. A missing value (an empty CSV cell, a Parquet null) is an error unless
``allow_missing=True``: then missing values and NaN become NaN and pass through to the model
(infinities stay errors). Kept columns pass through untouched: Parquet columns keep their type,
CSV columns their text (a streamed reader infers types from its first block, which later rows
may contradict), except a kept column that is also an input, which is read as float64.

Writing: :class:`TableWriter` writes CSV or Parquet atomically; CSV floats use the shortest text
that reads back to the same float64 or float32 (pyarrow's writer), Parquet keeps each dtype.
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
import os
import queue
import stat
import sys
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from normexport import files
from normexport.errors import DataError, first_line

PathLike = str | os.PathLike[str]
T = TypeVar("T")

# Measured on 2M rows: reading at 64 Ki rows a batch is as fast as at 256 Ki, in 1/4 the memory.
DEFAULT_BATCH_ROWS = 1 << 16
# pyarrow's CSV read unit; it reads about 36 blocks ahead, so this bounds memory (about 19 MB)
# at no cost in speed (measured 256 KiB to 4 MiB). A longer row is refused.
CSV_BLOCK_BYTES = 1 << 19
PARQUET_SUFFIXES = (".parquet", ".pq")
_HINT_DELIMITERS = {";": "';'", "\t": "'\\t'", "|": "'|'", ",": "','"}
_MAX_LISTED = 20  # columns named in a "no column named" message


class MissingColumnError(DataError):
    """The table has no column of a name asked for."""


@dataclass
class Batch:
    """One streamed batch: float64 ``(rows, len(group))`` arrays per group, kept columns."""

    arrays: list[np.ndarray]
    kept: pa.Table
    first_row: int  # 0-based index of this batch's first data row in the whole table

    @property
    def rows(self) -> int:
        return self.kept.num_rows


# --------------------------------------------------------------------------- reading


def read_header(path: PathLike, *, delimiter: str | None = None) -> list[str]:
    """The column names of a CSV file (its first row), a Parquet file or a dataset."""
    return _open(Path(path), delimiter).header


def iter_batches(
    path: PathLike,
    groups: Sequence[Sequence[str]],
    *,
    keep: Sequence[str] = (),
    batch_rows: int = DEFAULT_BATCH_ROWS,
    delimiter: str | None = None,
    allow_missing: bool = False,
) -> Iterator[Batch]:
    """Stream a table as :class:`Batch` es of ``batch_rows`` rows (the last may be shorter).

    Header and column errors raise here; value errors when the batch holding them is read.
    """
    if batch_rows < 1:
        raise ValueError(f"batch_rows must be positive, got {batch_rows}")
    source = _open(Path(path), delimiter)
    picks = [list(group) for group in groups]
    kept = list(dict.fromkeys(keep))
    if any(not group for group in picks) or not (picks or kept):
        raise DataError(f"{source.path}: no columns selected")
    numeric = list(dict.fromkeys(name for group in picks for name in group))
    for name in numeric + kept:
        source.require(name)
    for name in numeric:
        source.require_number(name)
    return _rebatch(source, numeric, kept, picks, batch_rows, allow_missing)


def load_table(path: PathLike, groups: Sequence[Sequence[str]], **kw: Any) -> list[np.ndarray]:
    """Read column groups whole, as float64 arrays ``(rows, len(group))`` (one pass)."""
    parts = [batch.arrays for batch in iter_batches(path, groups, **kw)]
    return [np.concatenate([p[i] for p in parts]) for i in range(len(groups))]


def load_columns(path: PathLike, columns: Sequence[str], **kw: Any) -> np.ndarray:
    """Read the named columns whole, as one float64 array ``(rows, len(columns))``."""
    return load_table(path, [columns], **kw)[0]


def locate_row(path: PathLike, row: int, *, delimiter: str | None = None) -> str:
    """Where data row ``row`` (0-based, as in :func:`load_table`'s arrays) is, to start an
    error message: ``file:LINE`` for CSV (1-based file line), ``file: row N`` otherwise."""
    source = _open(Path(path), delimiter)
    if isinstance(source, _Csv):
        with source._records() as records:
            next(records, None)  # the header
            data = (line for line, cells in records if cells)
            for index, line in enumerate(data):
                if index == row:
                    return f"{source.path}:{line}"
    return f"{source.path}: row {row}"


class ReadAhead(Iterator[T]):
    """Iterate ``items`` as a background thread produces them, up to ``depth`` ahead.

    Producing starts at once. pyarrow's readers and NumPy release the GIL, so reading
    (checking, converting) the next batch overlaps with whatever the consumer does with
    this one; at most ``depth + 2`` items exist at a time. An exception raised while
    producing is raised by ``next``, in order. ``close()`` (or leaving the ``with``
    block) stops the producer after its current item.
    """

    def __init__(self, items: Iterable[T], depth: int = 1) -> None:
        self._buffer: queue.Queue[tuple[bool, Any]] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(
            target=self._produce, args=(iter(items),), name="normexport-read-ahead", daemon=True
        )
        self._thread.start()

    def _put(self, entry: tuple[bool, Any]) -> bool:
        while not self._stop.is_set():
            with contextlib.suppress(queue.Full):
                self._buffer.put(entry, timeout=0.05)
                return True
        return False

    def _produce(self, source: Iterator[T]) -> None:
        try:
            for item in source:
                if not self._put((False, item)):
                    return
            self._put((True, None))
        except BaseException as exc:  # handed to the consumer, raised there
            self._put((True, exc))
        finally:
            getattr(source, "close", lambda: None)()

    def __next__(self) -> T:
        if self._done:
            raise StopIteration
        last, item = self._buffer.get()
        if last:
            self.close()
            if item is not None:
                raise item
            raise StopIteration
        return item

    def close(self) -> None:
        self._done = True
        self._stop.set()
        self._thread.join()

    def __enter__(self) -> ReadAhead[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _rebatch(
    source: _Source,
    numeric: list[str],
    keep: list[str],
    groups: list[list[str]],
    batch_rows: int,
    allow_missing: bool,
) -> Iterator[Batch]:
    """Validate each source batch, then re-cut the stream into ``batch_rows`` batches."""
    pending: list[pa.RecordBatch] = []
    have = emitted = 0
    for raw in source.batches(numeric, keep, allow_missing, batch_rows):
        for name in numeric:
            found = _bad_value(raw.column(name), allow_missing)
            if found is not None:
                raise source.error(found[0], name, found[1])
        pending.append(raw)
        have += raw.num_rows
        while have >= batch_rows:
            table = pa.Table.from_batches(pending)
            yield _batch(table.slice(0, batch_rows), groups, keep, emitted)
            pending = table.slice(batch_rows).to_batches()
            have, emitted = have - batch_rows, emitted + batch_rows
    if have:
        yield _batch(pa.Table.from_batches(pending), groups, keep, emitted)
    elif not emitted:
        raise DataError(f"{source.path}: no data rows{source.after_header}")


def _batch(table: pa.Table, groups: list[list[str]], keep: list[str], first_row: int) -> Batch:
    arrays = []
    for group in groups:
        out = np.empty((table.num_rows, len(group)), np.float64)
        for j, name in enumerate(group):
            start = 0
            for chunk in table.column(name).chunks:  # one copy, nulls become NaN
                out[start : start + len(chunk), j] = _float64_view(chunk)
                start += len(chunk)
        arrays.append(out)
    return Batch(arrays, table.select(keep), first_row)


def _float64_view(array: pa.Array) -> np.ndarray:
    """A float64 array's values as a NumPy view of its buffer, nulls read as NaN.

    ``pa.Array.to_numpy`` would do, but its first call imports pandas (about 0.2 s of a
    verify run); the buffer protocol needs nothing.
    """
    if array.type != pa.float64():
        array = array.cast(pa.float64())
    validity, data = array.buffers()[:2]
    if data is None:  # an empty array may have no buffer
        return np.empty(0, np.float64)
    values = np.frombuffer(data, np.float64, len(array), array.offset * 8)
    if array.null_count:
        bits = np.unpackbits(np.frombuffer(validity, np.uint8), bitorder="little")
        valid = bits[array.offset : array.offset + len(array)].astype(bool)
        values = np.where(valid, values, np.nan)
    return values


def _bad_value(array: pa.Array, allow_missing: bool) -> tuple[int, str] | None:
    """The first missing or non-finite value of a numeric column: (index, problem)."""
    if array.null_count and not allow_missing:
        return int(np.argmax(array.is_null().to_numpy(zero_copy_only=False))), "missing value"
    if not pa.types.is_floating(array.type):
        return None
    values = _float64_view(array)
    bad = np.isinf(values) if allow_missing else ~np.isfinite(values)
    if not bad.any():
        return None
    i = int(np.argmax(bad))
    return i, f"{float(values[i])} is not finite"


class _Source:
    """A table being read: its header, its raw record batches, and where a row is."""

    path: Path
    header: list[str]
    after_header = ""

    def require(self, name: str) -> None:
        if name not in self.header:
            listed = ", ".join(self.header[:_MAX_LISTED])
            more = ", ..." if len(self.header) > _MAX_LISTED else ""
            raise MissingColumnError(
                f"{self.path}: no column named {name!r} (columns: {listed}{more}){self.hint()}"
            )

    def hint(self) -> str:
        return ""

    def require_number(self, name: str) -> None:
        """Refuse a column that cannot hold numbers (Parquet knows its types)."""

    def batches(
        self, numeric: list[str], keep: list[str], allow_missing: bool, batch_rows: int
    ) -> Iterator[pa.RecordBatch]:
        raise NotImplementedError

    def error(self, index: int, column: str, problem: str) -> DataError:
        """The error for row ``index`` of the batch last yielded."""
        raise NotImplementedError


def _open(path: Path, delimiter: str | None) -> _Source:
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except PermissionError:
        raise DataError(f"{path}: permission denied") from None
    if stat.S_ISDIR(mode):
        return _Parquet(path, directory=True)
    if not stat.S_ISREG(mode):  # a FIFO or a device blocks or never ends
        raise DataError(f"{path}: not a regular file, expected a table")
    if path.suffix.lower() in PARQUET_SUFFIXES:
        return _Parquet(path, directory=False)
    return _Csv(path, _one_char(delimiter))


def _one_char(delimiter: str | None) -> str:
    named = {None: ",", "\\t": "\t", "tab": "\t"}
    value = named.get(delimiter, delimiter)
    if value is None or len(value) != 1 or value in '\r\n"':
        raise DataError(f"delimiter {delimiter!r}: expected one character (or '\\t')")
    return value


class _Csv(_Source):
    after_header = " after the header"

    def __init__(self, path: Path, delimiter: str) -> None:
        self.path, self.delimiter = path, delimiter
        self._check_header_length()
        with self._records() as records:
            first = next(records, None)
        if first is None:
            raise DataError(f"{path}: empty file, expected a header row")
        raw = first[1]
        if not raw:
            raise DataError(f"{path}:1: empty header line")
        if not all(_is_utf8(cell) for cell in raw):
            raise DataError(f"{path}: not a UTF-8 text file")
        self.raw = raw  # pyarrow knows columns by their raw header text
        self.header = [cell.strip() for cell in raw]
        seen: set[str] = set()
        for name in self.header:
            if not name:
                raise DataError(f"{path}:1: empty column name in the header")
            if name in seen:
                raise DataError(f"{path}:1: duplicate column {name!r} in the header")
            seen.add(name)
        self.numeric: list[str] = []
        self.keep: list[str] = []
        self.allow_missing = False
        self.delivered = 0  # data rows yielded before the current batch

    def hint(self) -> str:
        if len(self.header) == 1:
            for char, shown in _HINT_DELIMITERS.items():
                if char != self.delimiter and char in self.header[0]:
                    looks = "tab" if char == "\t" else shown
                    return f" (the header looks {looks}-separated: try --delimiter {shown})"
        return ""

    def _check_header_length(self) -> None:
        """A row longer than a read block cannot be read: say so before anything holds it."""
        try:
            with pa.input_stream(str(self.path), compression="detect") as stream:
                head = stream.read(CSV_BLOCK_BYTES)
        except (OSError, pa.ArrowException):
            return  # _records names the problem
        if len(head) == CSV_BLOCK_BYTES and b"\n" not in head and b"\r" not in head:
            raise DataError(
                f"{self.path}:1: the header row is longer than {CSV_BLOCK_BYTES >> 10} KiB, "
                "the longest row normexport reads"
            )

    @contextlib.contextmanager
    def _records(self) -> Iterator[Iterator[tuple[int, list[str]]]]:
        """Python's csv reader over the file: (first line, cells) per record, blanks included."""
        try:
            stream = pa.input_stream(str(self.path), compression="detect")  # .gz and friends
            with io.TextIOWrapper(
                stream, encoding="utf-8-sig", errors="surrogateescape", newline=""
            ) as text:
                reader = csv.reader(text, delimiter=self.delimiter)

                def records() -> Iterator[tuple[int, list[str]]]:
                    line = 1
                    for cells in reader:
                        yield line, cells
                        line = reader.line_num + 1

                yield records()
        except PermissionError:
            raise DataError(f"{self.path}: permission denied") from None
        except (OSError, csv.Error, pa.ArrowException) as exc:
            raise DataError(f"{self.path}: not a readable CSV file ({first_line(exc)})") from exc

    def batches(
        self, numeric: list[str], keep: list[str], allow_missing: bool, batch_rows: int
    ) -> Iterator[pa.RecordBatch]:
        self.numeric, self.keep, self.allow_missing = numeric, keep, allow_missing
        raw = dict(zip(self.header, self.raw, strict=True))
        names = numeric + [name for name in keep if name not in numeric]
        types = {raw[n]: pa.float64() if n in numeric else pa.string() for n in names}
        try:
            reader = pacsv.open_csv(
                str(self.path),
                read_options=pacsv.ReadOptions(block_size=CSV_BLOCK_BYTES),
                parse_options=pacsv.ParseOptions(delimiter=self.delimiter, newlines_in_values=True),
                convert_options=pacsv.ConvertOptions(
                    include_columns=[raw[n] for n in names],
                    column_types=types,
                    null_values=[""],  # only an empty cell is missing; "nan" is a (bad) number
                    strings_can_be_null=False,
                ),
            )
            for batch in reader:
                yield pa.RecordBatch.from_arrays(batch.columns, names=names)
                self.delivered += batch.num_rows
        except pa.ArrowException as exc:  # bad cell, ragged row, bad UTF-8: find its line
            found = self._locate(self.delivered)
            raise found or DataError(f"{self.path}: {first_line(exc)}") from exc

    def error(self, index: int, column: str, problem: str) -> DataError:
        row = self.delivered + index
        found = self._locate(row)  # pyarrow's row index -> file line: re-read in Python
        return found or DataError(f"{self.path}: data row {row + 1}: column {column!r}: {problem}")

    def _locate(self, start: int) -> DataError | None:
        """The first bad record from data row ``start`` on, named by its first file line.

        Runs only on the error path: Python's csv reader agrees with pyarrow on records
        (blank lines skipped, quoted newlines inside one record), so lines are exact.
        """
        width = len(self.header)
        checks = [(j, name) for j, name in enumerate(self.header) if name in self.numeric]
        texts = [(j, name) for j, name in enumerate(self.header) if name in self.keep]
        with self._records() as records:
            next(records, None)  # the header
            data = (record for record in records if record[1])
            for row, (line, cells) in enumerate(data):
                if row < start:
                    continue
                if len(cells) != width:
                    return DataError(
                        f"{self.path}:{line}: row has {len(cells)} cells, header has {width}"
                    )
                for j, name in texts:
                    if not _is_utf8(cells[j]):
                        return DataError(f"{self.path}:{line}: column {name!r}: not UTF-8 text")
                for j, name in checks:
                    problem = _cell_problem(cells[j], self.allow_missing)
                    if problem:
                        return DataError(f"{self.path}:{line}: column {name!r}: {problem}")
        return None


def _cell_problem(cell: str, allow_missing: bool) -> str | None:
    """Python's verdict on a numeric CSV cell, worded like the Parquet checks."""
    text = cell.strip()
    if not text:
        return None if allow_missing else "missing value"
    if not _is_utf8(text):
        return "not UTF-8 text"
    try:
        value = float(text)
    except ValueError:
        return f"{text!r} is not a number"
    if "_" in text or not text.isascii():  # Python reads 1_000 and other scripts' digits
        return f"{text!r} is not a number"
    if math.isinf(value) or (math.isnan(value) and not allow_missing):
        return f"{text} is not finite"
    return None


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # surrogate-escaped bytes that were not UTF-8
        return False
    return True


class _Parquet(_Source):
    """A Parquet file, or a directory of them read in sorted path order as one table.

    Files are read one row group at a time without pre-buffering: pyarrow's dataset scanner
    and pre-buffered reads hold several row groups (measured: 2-3x the memory, no faster).
    """

    def __init__(self, path: Path, *, directory: bool) -> None:
        self.path, self.directory = path, directory
        self.files = [path]
        if directory:
            self.files = sorted(
                p
                for p in path.rglob("*")
                if p.suffix.lower() in PARQUET_SUFFIXES
                and p.is_file()
                and not any(part.startswith((".", "_")) for part in p.relative_to(path).parts)
            )
            if not self.files:
                raise DataError(f"{path}: is a directory without Parquet files, expected a table")
        with self._open(self.files[0]) as first:
            self.schema = first.schema_arrow
        self.header = self.schema.names
        seen: set[str] = set()
        for name in self.header:
            if name in seen:
                raise DataError(f"{path}: duplicate column {name!r}")
            seen.add(name)
        self.where = (path, 0, 0)  # file of the current batch, its row there, dataset row

    @staticmethod
    def _open(file: Path) -> pq.ParquetFile:
        try:
            return pq.ParquetFile(file, pre_buffer=False)
        except (OSError, pa.ArrowException) as exc:
            raise DataError(f"{file}: not a Parquet file ({first_line(exc)})") from exc

    def require_number(
        self, name: str, schema: pa.Schema | None = None, at: Path | None = None
    ) -> None:
        kind = (schema or self.schema).field(name).type
        if not (pa.types.is_integer(kind) or pa.types.is_floating(kind)):
            where = at or self.path
            raise DataError(f"{where}: column {name!r} holds {kind} values, expected int or float")

    def batches(
        self, numeric: list[str], keep: list[str], allow_missing: bool, batch_rows: int
    ) -> Iterator[pa.RecordBatch]:
        names = numeric + [name for name in keep if name not in numeric]
        types = [pa.float64() if n in numeric else self.schema.field(n).type for n in names]
        row = 0
        for file in self.files:
            with self._open(file) as reader:
                schema = reader.schema_arrow
                for name in names:  # a dataset's later files must hold the columns too
                    if name not in schema.names:
                        raise MissingColumnError(f"{file}: no column named {name!r}")
                for name in numeric:
                    self.require_number(name, schema, file)
                in_file = 0
                try:
                    for batch in reader.iter_batches(batch_size=batch_rows, columns=names):
                        self.where = (file, in_file, row)
                        yield pa.RecordBatch.from_arrays(
                            [
                                _cast(batch.column(n), kind, safe=n not in numeric)
                                for n, kind in zip(names, types, strict=True)
                            ],
                            names=names,
                        )
                        in_file += batch.num_rows
                        row += batch.num_rows
                except (OSError, pa.ArrowException) as exc:
                    raise DataError(f"{file}: {first_line(exc)}") from exc

    def error(self, index: int, column: str, problem: str) -> DataError:
        file, in_file, row = self.where
        at = f"{self.path}: row {row + index}"
        if self.directory:
            at = f"{file}: row {in_file + index} (row {row + index} of {self.path})"
        return DataError(f"{at}: column {column!r}: {problem}")


def _cast(array: pa.Array, kind: pa.DataType, *, safe: bool) -> pa.Array:
    """Inputs become float64 (any int or float); kept columns take the first file's type."""
    return array if array.type == kind else array.cast(kind, safe=safe)


# --------------------------------------------------------------------------- writing


class TableWriter:
    """Write batches to ``.csv`` (``.csv.gz``) or ``.parquet`` atomically, or CSV to stdout.

    ``metadata`` (Parquet only) goes into the file's schema.

    The file appears (``os.replace``) only when the ``with`` block ends cleanly; on an
    exception the temporary file is removed and an existing destination is untouched.
    """

    def __init__(
        self,
        path: PathLike | None,
        *,
        format: str | None = None,
        metadata: dict[str, str] | None = None,
    ) -> None:
        self.path = None if path is None else Path(path)
        if format is None:
            suffix = "" if self.path is None else self.path.suffix.lower()
            format = "parquet" if suffix in PARQUET_SUFFIXES else "csv"
        if format not in ("csv", "parquet"):
            raise ValueError(f"format must be 'csv' or 'parquet', got {format!r}")
        if format == "parquet" and self.path is None:
            raise DataError("Parquet cannot go to standard output; give --out FILE.parquet")
        if metadata and format != "parquet":
            raise ValueError("metadata goes into a Parquet file's schema; CSV has none")
        self.format = format
        self.metadata = metadata
        self._stack: contextlib.ExitStack[Any] | None = None
        self._sink: Any = None
        self._writer: Any = None  # a pyarrow CSVWriter or ParquetWriter
        self._schema: pa.Schema | None = None

    def __enter__(self) -> TableWriter:
        if self.path is None:
            sys.stdout.flush()
            self._sink = sys.stdout.buffer
            return self
        if self.path.is_dir():
            raise DataError(f"{self.path}: is a directory; give a file name")
        self._stack = contextlib.ExitStack()
        tmp = self._stack.enter_context(files.atomic_path(self.path))  # the one atomic write
        gzip = self.format == "csv" and self.path.suffix.lower() == ".gz"
        self._sink = pa.output_stream(str(tmp), compression="gzip" if gzip else None)
        return self

    def write(self, columns: Sequence[str], arrays: Sequence[np.ndarray | pa.Array]) -> None:
        """Append one batch: one 1-D array (numpy or pyarrow) per column name."""
        table = pa.Table.from_arrays([_arrow(a) for a in arrays], names=list(columns))
        schema = self._schema
        if schema is None:
            self._schema, self._writer = table.schema, self._open(table.schema)
        elif table.schema != schema:
            if table.schema.names != schema.names:
                raise ValueError(f"columns changed from {schema.names} to {list(columns)}")
            table = table.cast(schema)
        with self._naming_errors():
            self._writer.write_table(table)

    @contextlib.contextmanager
    def _naming_errors(self) -> Iterator[None]:
        """A failed write (disk full, file too large) names the file the user gave."""
        try:
            yield
        except BrokenPipeError:
            raise  # the reader went away (`| head`): the CLI ends quietly
        except OSError as exc:
            where = self.path if self.path is not None else "standard output"
            raise DataError(f"{where}: cannot write ({first_line(exc)})") from exc

    def _open(self, schema: pa.Schema) -> pacsv.CSVWriter | pq.ParquetWriter:
        if self.format == "parquet":
            return pq.ParquetWriter(self._sink, schema.with_metadata(self.metadata or {}))
        header = io.StringIO()
        csv.writer(header, lineterminator="\n").writerow(schema.names)  # quoted only if needed
        self._sink.write(header.getvalue().encode("utf-8"))
        return pacsv.CSVWriter(
            self._sink, schema, write_options=pacsv.WriteOptions(include_header=False)
        )

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if kind is None:
                if self._writer is None and self.format == "parquet":
                    self._writer = pq.ParquetWriter(self._sink, pa.schema([]))  # valid, empty
                with self._naming_errors():
                    self._close()
            else:
                with contextlib.suppress(Exception):
                    self._close()
        except BaseException as failure:
            if self._stack is not None:
                self._stack.__exit__(type(failure), failure, failure.__traceback__)
            raise
        if self._stack is not None:  # renames the file into place, or removes it on error
            self._stack.__exit__(kind, exc, tb)

    def _close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._stack is None:
            self._sink.flush()  # standard output stays open
        elif self._sink is not None:
            self._sink.close()
            self._sink = None


def write_table(path: PathLike | None, columns: Sequence[str], values: np.ndarray) -> None:
    """Write a 2-D array as one table (CSV or Parquet by ``path``'s extension)."""
    with TableWriter(path) as writer:
        writer.write(columns, [values[:, j] for j in range(values.shape[1])])


def _arrow(values: np.ndarray | pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    if isinstance(values, pa.Array | pa.ChunkedArray):
        return values
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"expected one 1-D array per column, got shape {array.shape}")
    return pa.array(array)


__all__ = [
    "DEFAULT_BATCH_ROWS",
    "Batch",
    "ReadAhead",
    "TableWriter",
    "iter_batches",
    "load_columns",
    "load_table",
    "read_header",
    "write_table",
]
