"""Prove that the exported files compute the trained function.

The same rows go through every runtime that can read the model directory:

``onnxruntime``     ``model.onnx`` (CPU provider)
``mxnet``           ``model-symbol.json`` + ``model-0000.params`` (the raw-in/raw-out model)
``numpy``           an independent forward pass: ``scalers.json`` normalizes, the plain
                    ``net-*`` network runs in NumPy (params parsed without MXNet), the
                    output is de-normalized; it never sees the spliced or folded graph
``onnx.reference``  ``onnx.reference.ReferenceEvaluator`` on a sample of the rows

Errors are reported per output and per pair of runtimes, absolute and relative to each
output's span (its data range for min-max scalers). Rows are processed in chunks, so
memory stays bounded however many rows are checked.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from normexport import files
from normexport.errors import DataError, NormexportError, first_line
from normexport.modeldir import NET_PREFIX, ONNX_FILE, SCALERS_FILE, symbol_file
from normexport.reference import numpy_runtime
from normexport.runtimes import Runtime, onnx_reference_runtime, onnxruntime_runtime
from normexport.scaling import AffineScaler, MinMaxScaler, StandardScaler, scalers_from_dict

DEFAULT_RTOL = {"float32": 1e-5, "float64": 1e-12}
CHUNK_ROWS = 65536
REFERENCE_ROWS = 256  # onnx.reference is a slow pure-Python runtime: a sample suffices
RANDOM_ROWS = 1024  # rows drawn when no data is given


@dataclass
class PairResult:
    """Disagreement between two runtimes over the rows both ran."""

    a: str
    b: str
    rows: int
    max_abs: dict[str, float]
    max_rel: dict[str, float]
    ok: bool


@dataclass
class VerificationReport:
    """Structured, JSON-serializable result of :func:`verify_directory`."""

    ok: bool
    dtype: str
    rtol: float
    rows: int
    data_rows: int
    edge_rows: int
    outputs: list[str]
    output_span: dict[str, float]
    runtimes: list[str]
    skipped: dict[str, str] = field(default_factory=dict)
    pairs: list[PairResult] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"format": "normexport.verification/1", **asdict(self)}

    def summary(self) -> dict[str, Any]:
        """The compact form stored in ``manifest.json``."""
        worst = max((max(p.max_rel.values()) for p in self.pairs), default=0.0)
        return {
            "ok": self.ok,
            "rows": self.rows,
            "rtol": self.rtol,
            "runtimes": self.runtimes,
            "skipped": self.skipped,
            "max_rel_error": worst,
        }

    def table(self) -> str:
        """A readable table: one line per runtime pair and output."""
        lines = [
            f"verification: {self.rows} rows ({self.data_rows} data + {self.edge_rows} edge), "
            f"{self.dtype}, tolerance {self.rtol:g} of each output's span",
            f"{'runtime pair':<30} {'rows':>7}  {'output':<10} {'max abs err':>12} "
            f"{'max rel err':>12}",
        ]
        for pair in self.pairs:
            for name in self.outputs:
                rel = pair.max_rel[name]
                flag = "ok" if rel <= self.rtol else "MISMATCH"
                lines.append(
                    f"{pair.a + ' vs ' + pair.b:<30} {pair.rows:>7}  {name:<10} "
                    f"{pair.max_abs[name]:>12.3g} {rel:>12.3g}  {flag}"
                )
        for runtime, reason in self.skipped.items():
            lines.append(f"skipped {runtime}: {reason}")
        lines.append("result: " + ("PASS" if self.ok else "FAIL"))
        return "\n".join(lines)


# ------------------------------------------------------------------------------- runtimes


# ------------------------------------------------------------------------------- rows


def edge_rows(scaler: AffineScaler) -> np.ndarray:
    """Each column at its minimum, maximum, midpoint and 50% beyond either end.

    One row with every column at the same landmark, then, per column, rows with that
    column at each landmark and the others at their midpoints.
    """
    low, high = _training_box(scaler)
    width = high - low
    landmarks = [low, high, (low + high) / 2, low - width / 2, high + width / 2]
    rows = [mark for mark in landmarks]
    mid = (low + high) / 2
    for j in range(low.size):
        for mark in landmarks:
            row = mid.copy()
            row[j] = mark[j]
            rows.append(row)
    return np.unique(np.array(rows), axis=0)


def random_rows(scaler: AffineScaler, n: int, seed: int = 0) -> np.ndarray:
    """Uniform rows over the training box (used when no data is given)."""
    low, high = _training_box(scaler)
    return np.random.default_rng(seed).uniform(low, high, size=(n, low.size))


def _training_box(scaler: AffineScaler) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(scaler, MinMaxScaler):
        return scaler.data_min_, scaler.data_max_
    if isinstance(scaler, StandardScaler):
        return scaler.mean_ - 2 * scaler.std_, scaler.mean_ + 2 * scaler.std_
    # Given factors: the raw values that map to 0 and 1 in normalized space.
    ends = scaler.inverse_transform(
        np.array([[0.0] * scaler.n_features_in_, [1.0] * scaler.n_features_in_])
    )
    return ends.min(axis=0), ends.max(axis=0)


def _chunks(X: np.ndarray, size: int) -> Iterator[np.ndarray]:
    for start in range(0, X.shape[0], size):
        yield X[start : start + size]


# ------------------------------------------------------------------------------- verify


def compare(
    runtimes: dict[str, Callable[[], Runtime]],
    X: np.ndarray,
    *,
    outputs: list[str],
    span: np.ndarray,
    dtype: str,
    rtol: float,
    sample_only: frozenset[str] = frozenset(),
    optional: frozenset[str] = frozenset(),
    chunk_rows: int = CHUNK_ROWS,
) -> tuple[list[PairResult], dict[str, str]]:
    """Run ``X`` through each runtime in turn and compare every pair.

    ``runtimes`` maps names to *factories*: one runtime is loaded at a time, runs all
    rows in chunks, keeps only its outputs, and is released before the next loads, so
    a large model is in memory once, not once per runtime. Runtimes in ``sample_only``
    see only the first :data:`REFERENCE_ROWS` rows. A runtime in ``optional`` that
    cannot be loaded is skipped (returned with the reason) instead of failing.
    """
    import gc

    from tqdm.auto import tqdm

    results: dict[str, np.ndarray] = {}
    skipped: dict[str, str] = {}
    X = X.astype(dtype)
    total = sum(min(len(X), REFERENCE_ROWS) if n in sample_only else len(X) for n in runtimes)
    with tqdm(
        total=total,
        desc="verifying",
        unit="row",
        file=sys.stderr,
        disable=not sys.stderr.isatty() or X.shape[0] <= chunk_rows,
    ) as bar:
        for name, make in runtimes.items():
            rows = X[:REFERENCE_ROWS] if name in sample_only else X
            try:
                run = make()
            except (ImportError, NotImplementedError) as exc:
                if name not in optional:
                    raise
                skipped[name] = first_line(exc)  # not installed, or an op it does not know
                continue
            parts = []
            for chunk in _chunks(rows, chunk_rows):
                parts.append(_run_checked(name, run, chunk, len(outputs)))
                bar.update(chunk.shape[0])
            results[name] = np.concatenate(parts)
            del run, parts
            gc.collect()
    return _pair_results(results, outputs, span, rtol, chunk_rows), skipped


def _pair_results(
    results: dict[str, np.ndarray],
    outputs: list[str],
    span: np.ndarray,
    rtol: float,
    chunk_rows: int,
) -> list[PairResult]:
    tally = _Tally(list(results), len(outputs))
    n = max((len(r) for r in results.values()), default=0)
    for start in range(0, n, chunk_rows):
        tally.add({k: v[start : start + chunk_rows] for k, v in results.items()})
    return tally.pairs(outputs, span, rtol)


class _Tally:
    """Running per-pair, per-output maxima of disagreement: rows are folded in as they
    come, so nothing grows with the row count. A pair is compared on the rows both saw
    (runtimes that see only a sample stop early)."""

    def __init__(self, names: list[str], n_outputs: int) -> None:
        self.pairs_ = list(itertools.combinations(names, 2))
        self.worst = {pair: np.zeros(n_outputs) for pair in self.pairs_}
        self.rows = dict.fromkeys(self.pairs_, 0)

    def add(self, outputs: dict[str, np.ndarray]) -> None:
        for a, b in self.pairs_:
            if a in outputs and b in outputs:
                n = min(len(outputs[a]), len(outputs[b]))
                diff = _disagreement(outputs[a][:n], outputs[b][:n])
                self.worst[(a, b)] = np.maximum(self.worst[(a, b)], diff.max(axis=0, initial=0.0))
                self.rows[(a, b)] += n

    def pairs(self, outputs: list[str], span: np.ndarray, rtol: float) -> list[PairResult]:
        results = []
        for pair in self.pairs_:
            rel = self.worst[pair] / span
            results.append(
                PairResult(
                    a=pair[0],
                    b=pair[1],
                    rows=self.rows[pair],
                    max_abs=dict(zip(outputs, self.worst[pair].tolist(), strict=True)),
                    max_rel=dict(zip(outputs, rel.tolist(), strict=True)),
                    ok=bool(np.all(rel <= rtol)),
                )
            )
        return results


def compare_stream(
    runtimes: dict[str, Callable[[], Runtime]],
    chunks: Iterable[np.ndarray],
    *,
    outputs: list[str],
    span: np.ndarray,
    dtype: str,
    rtol: float,
    sample_only: frozenset[str] = frozenset(),
    optional: frozenset[str] = frozenset(),
) -> tuple[list[PairResult], dict[str, str], int]:
    """:func:`compare` for rows that arrive in chunks (a table read batch by batch).

    Every runtime is loaded at once and each chunk runs through all of them before the
    next is read, so memory is bounded by a chunk (and the models), never by the rows.
    Returns the pairs, the skipped runtimes and the number of rows.
    """
    from tqdm.auto import tqdm

    loaded: dict[str, Runtime] = {}
    skipped: dict[str, str] = {}
    for name, make in runtimes.items():
        try:
            loaded[name] = make()
        except (ImportError, NotImplementedError) as exc:
            if name not in optional:
                raise
            skipped[name] = first_line(exc)
    tally = _Tally(list(loaded), len(outputs))
    seen = 0
    with tqdm(
        desc="verifying", unit=" rows", unit_scale=True, file=sys.stderr,
        disable=not sys.stderr.isatty(),
    ) as bar:  # fmt: skip
        for chunk in chunks:
            chunk = chunk.astype(dtype, copy=False)
            results = {}
            for name, run in loaded.items():
                rows = chunk[: max(0, REFERENCE_ROWS - seen)] if name in sample_only else chunk
                if len(rows):
                    results[name] = _run_checked(name, run, rows, len(outputs))
            tally.add(results)
            seen += len(chunk)
            bar.update(len(chunk))
    return tally.pairs(outputs, span, rtol), skipped, seen


def _run_checked(name: str, run: Runtime, rows: np.ndarray, n_outputs: int) -> np.ndarray:
    out = np.asarray(run(rows), dtype=np.float64)
    if out.shape != (rows.shape[0], n_outputs):
        raise NormexportError(
            f"{name} returned shape {out.shape}, expected {(rows.shape[0], n_outputs)}"
        )
    return out


def _disagreement(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """|a - b|, where equal values (infinities and NaNs included) agree and a NaN
    against a number disagrees infinitely."""
    with np.errstate(invalid="ignore"):
        diff = np.abs(a - b)
    same = (a == b) | (np.isnan(a) & np.isnan(b))
    diff[same] = 0.0
    diff[np.isnan(diff)] = np.inf
    return diff


CHUNK_BYTES = 64 * 1024 * 1024


def _rows_per_chunk(directory: Path, dtype: str) -> int:
    """Rows whose widest activation fits in :data:`CHUNK_BYTES` (wide nets get smaller
    chunks, so memory stays bounded for any width)."""
    try:
        nodes = files.read_json(symbol_file(directory, NET_PREFIX)).get("nodes", [])
        widths = [int(n.get("attrs", {}).get("num_hidden", 0)) for n in nodes]
    except (NormexportError, AttributeError, TypeError, ValueError):
        return CHUNK_ROWS
    widest = max([1, *widths])
    return max(256, min(CHUNK_ROWS, CHUNK_BYTES // (widest * np.dtype(dtype).itemsize)))


def verify_directory(
    directory: str | os.PathLike[str],
    X: np.ndarray | None = None,
    *,
    data: str | os.PathLike[str] | None = None,
    rows: int | None = None,
    rtol: float | None = None,
    seed: int = 0,
    chunk_rows: int = CHUNK_ROWS,
) -> VerificationReport:
    """Verify a model directory on ``X`` (raw input rows) or the table ``data``, plus edge rows.

    ``data`` (CSV, Parquet or a dataset; the input columns by name) is streamed: each
    batch runs through every runtime and is folded into running maxima, so memory does
    not grow with the rows. ``rows=N`` samples N rows (of ``data`` in one streaming pass,
    reservoir sampling). Without ``X`` or ``data``, random rows over the training range
    are used. ``rtol`` overrides the per-dtype tolerance on range-relative error.
    """
    directory = Path(directory)
    onnx_path = directory / ONNX_FILE
    if directory.is_file():
        raise NormexportError(
            f"{directory}: is a file; verify takes a model directory (the one `normexport "
            "export` wrote), which holds the MXNet model and scalers to compare against"
        )
    if not onnx_path.is_file():
        raise NormexportError(f"{onnx_path}: no such file; run `normexport export {directory}`")
    in_scaler, out_scaler, dtype = scalers_from_dict(
        files.read_json(directory / SCALERS_FILE), str(directory / SCALERS_FILE)
    )
    if rows is not None and rows < 1:
        raise DataError(f"rows must be >= 1, got {rows}")
    chunk_rows = min(chunk_rows, _rows_per_chunk(directory, dtype))
    table: Iterable[np.ndarray] | None = None
    if data is not None:
        from normexport import tables

        batches = tables.iter_batches(data, [in_scaler.columns_], batch_rows=chunk_rows)
        table = (batch.arrays[0] for batch in batches)
        if rows is not None:
            X, table = reservoir_sample(table, rows, seed), None
    if table is not None:
        source: np.ndarray | Iterable[np.ndarray] = table
    elif X is None:
        source = random_rows(in_scaler, RANDOM_ROWS, seed)
    else:
        source = np.asarray(X, dtype=np.float64)
        if source.ndim != 2 or source.shape[1] != in_scaler.n_features_in_:
            raise DataError(
                f"verification rows must have {in_scaler.n_features_in_} columns "
                f"({', '.join(in_scaler.columns_)}), got shape {source.shape}"
            )
        if rows is not None and data is None and rows < source.shape[0]:
            pick = np.random.default_rng(seed).choice(source.shape[0], rows, replace=False)
            source = source[np.sort(pick)]
    return check_rows(
        {
            "onnxruntime": lambda: onnxruntime_runtime(onnx_path),
            "mxnet": lambda: _mxnet_runtime(directory, dtype),
            "numpy": lambda: numpy_runtime(directory, in_scaler, out_scaler),
            "onnx.reference": lambda: onnx_reference_runtime(onnx_path),
        },
        source,
        in_scaler,
        out_scaler,
        dtype=dtype,
        rtol=rtol,
        sample_only=frozenset({"onnx.reference"}),
        optional=frozenset({"mxnet", "numpy", "onnx.reference"}),
        chunk_rows=chunk_rows,
    )


def reservoir_sample(chunks: Iterable[np.ndarray], n: int, seed: int = 0) -> np.ndarray:
    """``n`` rows drawn uniformly from a stream of row chunks in one pass (reservoir
    sampling), returned in the stream's order; memory holds ``n`` rows and one chunk."""
    rng = np.random.default_rng(seed)
    sample: np.ndarray | None = None
    order = np.empty(0, dtype=np.int64)  # each kept row's position in the stream
    seen = 0
    for chunk in chunks:
        if sample is None:
            sample = np.empty((n, chunk.shape[1]), dtype=chunk.dtype)
            order = np.full(n, -1, dtype=np.int64)
        fill = max(0, min(n - seen, len(chunk)))
        sample[seen : seen + fill] = chunk[:fill]
        order[seen : seen + fill] = np.arange(seen, seen + fill)
        rest = np.arange(seen + fill, seen + len(chunk))  # stream positions past the fill
        if len(rest):
            slots = rng.integers(0, rest + 1)  # row i replaces slot j < n with chance n/(i+1)
            for i, j in zip(rest[slots < n], slots[slots < n], strict=True):
                sample[j] = chunk[i - seen]
                order[j] = i
        seen += len(chunk)
    if sample is None:
        raise DataError("no rows to sample")
    kept = order >= 0
    return sample[kept][np.argsort(order[kept], kind="stable")]


def check_rows(
    runtimes: dict[str, Callable[[], Runtime]],
    data: np.ndarray | Iterable[np.ndarray],
    in_scaler: AffineScaler,
    out_scaler: AffineScaler,
    *,
    dtype: str,
    rtol: float | None = None,
    input_dtype: str | None = None,
    sample_only: frozenset[str] = frozenset(),
    optional: frozenset[str] = frozenset(),
    chunk_rows: int = CHUNK_ROWS,
) -> VerificationReport:
    """Edge rows of ``in_scaler`` plus ``data`` through every runtime; the report.

    ``data`` is an array, or an iterable of row chunks that is streamed (see
    :func:`compare_stream`). ``dtype`` picks the default tolerance; rows are fed as
    ``input_dtype`` (default ``dtype``). Passing needs every pair within tolerance and at
    least two runtimes.
    """
    edges = edge_rows(in_scaler)
    tolerance = DEFAULT_RTOL[dtype] if rtol is None else float(rtol)
    span = out_scaler.span()
    common = {
        "outputs": list(out_scaler.columns_),
        "span": span,
        "dtype": input_dtype or dtype,
        "rtol": tolerance,
        "sample_only": sample_only,
        "optional": optional,
    }
    if isinstance(data, np.ndarray):
        all_rows = np.concatenate([edges, data])  # edges first: sampled runtimes see them
        pairs, skipped = compare(runtimes, all_rows, chunk_rows=chunk_rows, **common)  # type: ignore[arg-type]
        n_rows = int(all_rows.shape[0])
    else:
        stream = itertools.chain([edges], data)
        pairs, skipped, n_rows = compare_stream(runtimes, stream, **common)  # type: ignore[arg-type]
    loaded = [n for n in runtimes if n not in skipped]
    return VerificationReport(
        ok=all(p.ok for p in pairs) and len(loaded) >= 2,
        dtype=dtype,
        rtol=tolerance,
        rows=n_rows,
        data_rows=n_rows - int(edges.shape[0]),
        edge_rows=int(edges.shape[0]),
        outputs=list(out_scaler.columns_),
        output_span=dict(zip(out_scaler.columns_, span.tolist(), strict=True)),
        runtimes=loaded,
        skipped=skipped,
        pairs=pairs,
    )


def _mxnet_runtime(directory: Path, dtype: str) -> Runtime:
    """The MXNet adapter's runtime, when MXNet is installed (verify runs without it)."""
    try:
        from normexport.mx.runtime import mxnet_runtime
    except ImportError as exc:
        raise NotImplementedError(
            f"MXNet is not installed ({exc}); pip install 'normexport[mxnet]' to add it"
        ) from exc
    return mxnet_runtime(directory, dtype)


def verify(
    model_dir: str | os.PathLike[str],
    X: Any = None,
    *,
    data: str | os.PathLike[str] | None = None,
    rows: int | None = None,
    rtol: float | None = None,
) -> VerificationReport:
    """Verify a model directory: ``nx.verify(dir, X)`` or ``nx.verify(dir, data="t.csv")``
    (streamed); ``report.ok``, ``report.to_dict()``."""
    X = None if X is None else np.asarray(X)
    return verify_directory(model_dir, X, data=data, rows=rows, rtol=rtol)


def report_json(report: VerificationReport) -> str:
    return json.dumps(report.to_dict(), indent=2)
