"""Score one table partition with a model: the picklable function that table engines run.

``partition_predictor(model)`` returns a :class:`PartitionPredictor`, a small frozen object
holding the ONNX file's path, the input and target column names and the dtype; never an
onnxruntime session. Called on a pandas DataFrame it returns a DataFrame, on a pyarrow
Table or RecordBatch a Table: the kept columns first, then the target columns, rows in
input order. The session is created on first use in each process and cached there.

The same object works under Dask ``map_partitions``, Spark ``mapInPandas``
(:meth:`PartitionPredictor.map_iter`) and Ray ``map_batches`` (pandas batches); this
module imports no engine.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from normexport.errors import DataError, FormatError, NormexportError, first_line
from normexport.modeldir import ONNX_FILE, model_scalers
from normexport.scaling import AffineScaler

DEFAULT_BATCH_ROWS = 1 << 17  # rows per session.run, as normexport.tables reads them
_ELEM_TYPES = {"float32": 1, "float64": 11}  # onnx.TensorProto.FLOAT, DOUBLE


@dataclass(frozen=True)
class PartitionPredictor:
    """Raw input columns in, raw target columns out; see :func:`partition_predictor`."""

    path: str
    inputs: tuple[str, ...]
    targets: tuple[str, ...]
    dtype: str
    keep: tuple[str, ...] = ()
    batch_rows: int = DEFAULT_BATCH_ROWS
    threads: int = 1

    def __call__(self, table: Any, partition_info: dict[str, Any] | None = None) -> Any:
        # Dask passes partition_info={"number": i, ...} to functions that accept it.
        where = f"partition {partition_info['number']}" if partition_info else None
        return self.predict(table, where)

    def predict(self, table: Any, where: str | None = None) -> Any:
        """Predict one partition; ``where`` names it in error messages (a file, a number)."""
        prefix = f"{where}: " if where else ""
        if _family(table) == "pandas":
            X = self._pandas_inputs(table, prefix)
            Y = self.run(X)
            out = table.loc[:, [self._column(table, c, prefix) for c in self.keep]]
            for j, name in enumerate(self.targets):
                out[name] = Y[:, j]  # positional: safe with any index, duplicated or not
            return out
        import pyarrow as pa

        X = self._arrow_inputs(table, prefix)
        Y = self.run(X)
        kept = [table.column(self._column(table, c, prefix)) for c in self.keep]
        outputs = [pa.array(np.ascontiguousarray(Y[:, j])) for j in range(Y.shape[1])]
        return pa.table([*kept, *outputs], names=[*self.keep, *self.targets])

    def run(self, X: np.ndarray) -> np.ndarray:
        """The model on a ``rows × inputs`` array of the model's dtype, in ``batch_rows`` slices."""
        if X.shape[0] == 0:
            return np.empty((0, len(self.targets)), dtype=self.dtype)
        session = _session(self.path, self.threads)
        name_in, name_out = session.get_inputs()[0].name, session.get_outputs()[0].name
        try:
            Y = np.concatenate(
                [
                    session.run([name_out], {name_in: X[i : i + self.batch_rows]})[0]
                    for i in range(0, X.shape[0], self.batch_rows)
                ]
            )
        except Exception as exc:  # onnxruntime raises its own exception types
            raise FormatError(f"{self.path}: onnxruntime failed: {first_line(exc)}") from exc
        if Y.shape != (X.shape[0], len(self.targets)):
            raise FormatError(f"{self.path}: output shape {Y.shape}, expected (rows, targets)")
        return Y

    def meta(self, input_meta: Any) -> Any:
        """The empty output frame for an (empty) input frame: Dask's ``meta=``."""
        return self.predict(input_meta.iloc[:0])

    def output_schema(self, input_schema: Any, where: str | None = None) -> Any:
        """The output Arrow schema for an input Arrow schema; checks the schema on the way."""
        return self.predict(input_schema.empty_table(), where).schema

    def map_iter(self, batches: Iterable[Any]) -> Iterator[Any]:
        """Iterator in, iterator out: Spark's ``mapInPandas`` (and ``mapInArrow``) form."""
        for batch in batches:
            yield self.predict(batch)

    # -------------------------------------------------------------- input columns

    def _column(self, table: Any, name: str, prefix: str) -> str:
        names = list(table.column_names if _family(table) == "arrow" else table.columns)
        count = names.count(name)
        if count != 1:
            what = "no" if count == 0 else f"{count} columns named"
            shown = ", ".join(map(str, names[:20])) + (", ..." if len(names) > 20 else "")
            raise DataError(f"{prefix}{what} column {name!r} (columns: {shown})")
        return name

    def _pandas_inputs(self, df: Any, prefix: str) -> np.ndarray:
        from pandas.api.types import is_bool_dtype, is_complex_dtype, is_numeric_dtype

        X = np.empty((len(df), len(self.inputs)), dtype=self.dtype)
        for j, name in enumerate(self.inputs):
            series = df[self._column(df, name, prefix)]
            dtype = series.dtype
            if not is_numeric_dtype(dtype) or is_bool_dtype(dtype) or is_complex_dtype(dtype):
                raise DataError(f"{prefix}column {name!r} has type {dtype}, not a real number")
            values = _finite(series.to_numpy(np.float64, na_value=np.nan), name, prefix)
            X[:, j] = fits(values, self.dtype, name, prefix)
        return X

    def _arrow_inputs(self, table: Any, prefix: str) -> np.ndarray:
        import pyarrow as pa

        X = np.empty((table.num_rows, len(self.inputs)), dtype=self.dtype)
        for j, name in enumerate(self.inputs):
            column = table.column(self._column(table, name, prefix))
            kind, types = column.type, pa.types
            if not (types.is_integer(kind) or types.is_floating(kind) or types.is_decimal(kind)):
                raise DataError(f"{prefix}column {name!r} has type {kind}, not a real number")
            if column.null_count:
                row = int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
                raise DataError(f"{prefix}column {name!r}, row {row}: missing value")
            values = column.cast(pa.float64(), safe=False).to_numpy()
            X[:, j] = fits(_finite(values, name, prefix), self.dtype, name, prefix)
        return X

    def write_predictions(
        self,
        batches: Iterable[Any],
        writer: Any,
        where: str,
        progress: Callable[[int], Any] | None = None,
    ) -> int:
        """Score streamed :class:`normexport.tables.Batch` es into a
        :class:`normexport.tables.TableWriter`, each written before the next is read: the
        kept columns, then the targets. Returns the number of rows; ``progress`` is told
        each batch's."""
        import pyarrow as pa

        names = [*self.keep, *self.targets]
        rows = 0
        for batch in batches:
            Y = self.run(self.model_inputs(batch.arrays[0], where, batch.first_row))
            outputs = [pa.array(np.ascontiguousarray(Y[:, j])) for j in range(Y.shape[1])]
            writer.write(names, [*batch.kept.columns, *outputs])
            rows += batch.rows
            if progress is not None:
                progress(batch.rows)
        return rows

    def read_batches(self, path: str | os.PathLike[str], **options: Any) -> Iterator[Any]:
        """The model's input columns (and ``keep``) of the table at ``path``, streamed as
        :class:`normexport.tables.Batch` es (``options`` as for ``tables.iter_batches``).
        A missing column of a model with placeholder names says how to name them."""
        from normexport import tables
        from normexport.scaling import unnamed_hint

        try:
            return tables.iter_batches(path, [self.inputs], keep=self.keep, **options)
        except tables.MissingColumnError as exc:
            hint = unnamed_hint(self.inputs, self.targets)
            if hint is None:
                raise
            raise tables.MissingColumnError(f"{exc}; {hint}") from None

    def model_inputs(self, X: np.ndarray, where: str, first_row: int = 0) -> np.ndarray:
        """Finite float64 input rows (as the table layer gives them) in the model's dtype;
        a value the dtype cannot hold is an error naming ``where``, its row and column."""
        for j, name in enumerate(self.inputs):
            fits(X[:, j], self.dtype, name, f"{where}: ", first_row)
        return X.astype(self.dtype, copy=False)


def partition_predictor(
    model: str | os.PathLike[str],
    keep: Sequence[str] = (),
    *,
    batch_rows: int | None = None,
    threads: int = 1,
) -> PartitionPredictor:
    """A picklable partition function for ``model`` (an ONNX file or a model directory).

    ``keep`` names input-table columns (ids, keys) copied to the output ahead of the
    targets. ``threads`` is onnxruntime's intra-op thread count per process: engines run
    one task per core, so the default of 1 keeps every core busy without oversubscribing.
    The model path must be readable under the same name wherever the object is called.
    """
    onnx_path, in_scaler, out_scaler, dtype = read_model(model)
    if isinstance(keep, str):
        raise DataError("keep must be a list of column names, not a single string")
    kept = tuple(str(c) for c in keep)
    duplicates = sorted({c for c in kept if kept.count(c) > 1})
    if duplicates:
        raise DataError(f"keep lists {', '.join(map(repr, duplicates))} more than once")
    clash = [c for c in kept if c in out_scaler.columns_]
    if clash:
        raise DataError(f"keep column {clash[0]!r} is also a target column of {onnx_path}")
    if batch_rows is not None and batch_rows < 1:
        raise DataError(f"batch_rows must be at least 1, got {batch_rows}")
    if threads < 1:
        raise DataError(f"threads must be at least 1, got {threads}")
    return PartitionPredictor(
        path=str(onnx_path.resolve()),
        inputs=tuple(in_scaler.columns_),
        targets=tuple(out_scaler.columns_),
        dtype=dtype,
        keep=kept,
        batch_rows=batch_rows or DEFAULT_BATCH_ROWS,
        threads=threads,
    )


def read_model(model: str | os.PathLike[str]) -> tuple[Path, AffineScaler, AffineScaler, str]:
    """``(onnx_path, in_scaler, out_scaler, dtype)`` of a model directory or an ONNX file,
    after checking that the graph takes one input of the scalers' width and dtype."""
    from normexport.onnxkit import load_onnx

    path = Path(model)
    onnx_path = path / ONNX_FILE if path.is_dir() else path
    if not onnx_path.is_file():
        raise NormexportError(f"{onnx_path}: no such file")
    loaded = load_onnx(onnx_path, with_weights=False)  # read once: graph and metadata
    in_scaler, out_scaler, dtype = model_scalers(path, loaded)
    graph = loaded.graph
    inputs = [i for i in graph.input if i.name not in {t.name for t in graph.initializer}]
    if len(inputs) != 1 or len(graph.output) != 1:
        raise FormatError(f"{onnx_path}: expected one input and one output")
    tensor = inputs[0].type.tensor_type
    dims = tensor.shape.dim
    width = dims[1].dim_value if len(dims) == 2 and dims[1].HasField("dim_value") else None
    if tensor.elem_type != _ELEM_TYPES[dtype] or width not in (None, in_scaler.n_features_in_):
        raise FormatError(
            f"{onnx_path}: input {inputs[0].name!r} does not take {dtype} rows of "
            f"{in_scaler.n_features_in_} columns, as its scalers say"
        )
    return onnx_path, in_scaler, out_scaler, dtype


# ------------------------------------------------------------------ the per-process session

_SESSIONS: dict[str, tuple[tuple[int, int, int], Any]] = {}
_LOCK = threading.Lock()


def _session(path: str, threads: int) -> Any:
    """The process's onnxruntime session for ``path``, rebuilt if the file changed."""
    stat = os.stat(path)
    stamp = (stat.st_mtime_ns, stat.st_size, threads)
    with _LOCK:
        cached = _SESSIONS.get(path)
        if cached is None or cached[0] != stamp:
            cached = _SESSIONS[path] = (stamp, _new_session(path, threads))
    return cached[1]


def _new_session(path: str, threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4  # fatal only: failures are exceptions, each one line
    # Engines run one single-task process per core; ORT's default (a thread per core in
    # every process) would put cores x cores busy threads on the cores.
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        raise FormatError(f"{path}: onnxruntime cannot load the model: {first_line(exc)}") from exc


# ------------------------------------------------------------------ helpers


def _family(table: Any) -> str:
    root = type(table).__module__.split(".")[0]
    if root == "pandas" and hasattr(table, "columns"):
        return "pandas"
    if root == "pyarrow" and hasattr(table, "column_names"):
        return "arrow"
    raise DataError(
        f"expected a pandas DataFrame or a pyarrow Table/RecordBatch, got {type(table).__name__}"
    )


def fits(values: np.ndarray, dtype: str, name: str, prefix: str, first_row: int = 0) -> np.ndarray:
    """``values`` if the model's dtype holds every one; else one line naming the first that
    overflows it (float32 turns 1e300 into inf, and the model's output into NaN)."""
    limit = np.finfo(dtype).max
    big = np.abs(values) > limit
    if big.any():
        row = int(np.flatnonzero(big)[0])
        raise DataError(
            f"{prefix}row {first_row + row}, column {name!r}: {values[row]:g} is beyond "
            f"the range of the model's {dtype}"
        )
    return values


def _finite(values: np.ndarray, name: str, prefix: str) -> np.ndarray:
    bad = ~np.isfinite(values)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DataError(f"{prefix}column {name!r}, row {row}: {values[row]} is not finite")
    return values
