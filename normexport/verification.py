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
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from normexport import files, transforms
from normexport.errors import DataError, NormexportError, first_line
from normexport.modeldir import NET_PREFIX, ONNX_FILE, SCALERS_FILE, symbol_file
from normexport.reference import numpy_runtime, one_blas_thread
from normexport.runtimes import Runtime, onnx_reference_runtime, onnxruntime_runtime
from normexport.scaling import AffineScaler, StandardScaler, scalers_from_dict

DEFAULT_RTOL = {"float32": 1e-5, "float64": 1e-12}
CHUNK_ROWS = 65536
REFERENCE_ROWS = 256  # onnx.reference is a slow pure-Python runtime: a sample suffices
RANDOM_ROWS = 1024  # rows drawn when no data is given
PROBE = "numpy (float32)"  # a float32 evaluation: how much rounding the network amplifies


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
    """Structured, JSON-serializable result of :func:`verify_directory`.

    ``reference`` names the runtime every other one is measured against (the float64
    NumPy evaluation, for a float32 network); empty when every pair is compared.
    ``rounding`` is how far a float32 evaluation of the network lies from its float64
    evaluation, per output and relative to its range; when that forced a looser
    tolerance than ``rtol_default``, ``loosened`` says so. ``warnings`` are the sanity
    checks of :func:`sanity_warnings`. ``transformed`` names the outputs compared on their
    transformed values (``{"y": "log"}``: errors are those of ``log(y)``, relative to its
    range).
    """

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
    reference: str = ""
    rtol_default: float | None = None
    rounding: dict[str, float] = field(default_factory=dict)
    loosened: str = ""
    warnings: list[str] = field(default_factory=list)
    # rows of finite inputs whose outputs are not finite: inside the training box (a
    # failure) and outside it (reported), with the first of each
    non_finite: dict[str, Any] = field(default_factory=dict)
    transformed: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"format": "normexport.verification/1", **asdict(self)}

    def summary(self) -> dict[str, Any]:
        """The compact form stored in ``manifest.json``."""
        worst = max((max(p.max_rel.values()) for p in self.pairs), default=0.0)
        out: dict[str, Any] = {
            "ok": self.ok,
            "rows": self.rows,
            "rtol": self.rtol,
            "runtimes": self.runtimes,
            "skipped": self.skipped,
            "max_rel_error": worst,
        }
        if self.reference:
            out["reference"] = self.reference
        if self.rounding:
            out["float32_rounding"] = max(self.rounding.values())
        if self.loosened:
            out["rtol_default"] = self.rtol_default
            out["loosened"] = self.loosened
        if self.warnings:
            out["warnings"] = self.warnings
        if self.non_finite:
            out["non_finite"] = self.non_finite
        return out

    def table(self) -> str:
        """A readable table: one line per runtime pair and output."""
        against = (
            f"; each runtime against {self.reference} (a float64 evaluation)"
            if self.reference
            else ""
        )
        lines = [
            f"verification: {self.rows} rows ({self.data_rows} data + {self.edge_rows} edge), "
            f"{self.dtype}, tolerance {self.rtol:g} of each output's range{against}",
        ]
        if self.loosened:
            lines.append(self.loosened)
        if self.transformed:
            compared = ", ".join(f"{k}({c})" for c, k in self.transformed.items())
            lines.append(f"compared on transformed values, relative to their range: {compared}")
        lines.append(
            f"{'runtime pair':<30} {'rows':>7}  {'output':<10} {'max abs err':>12} "
            f"{'max rel err':>12}"
        )
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
        if self.rounding and not self.loosened:
            lines.append(
                f"float32 rounding of this network: {max(self.rounding.values()):.3g} of range"
            )
        lines.extend(_non_finite_lines(self.non_finite))
        lines.extend(f"warning: {w}" for w in self.warnings)
        lines.append("result: " + ("PASS" if self.ok else "FAIL"))
        return "\n".join(lines)


def _non_finite_lines(non_finite: dict[str, Any]) -> list[str]:
    lines = []
    for where, verdict in (("inside", "FAIL"), ("outside", "reported")):
        found = non_finite.get(where)
        if found:
            lines.append(
                f"non-finite outputs for finite inputs {where} the training range: "
                f"{found['rows']} rows, the first {found['first']} ({verdict})"
            )
    return lines


# ------------------------------------------------------------------------------- runtimes


# ------------------------------------------------------------------------------- rows


def edge_rows(scaler: AffineScaler) -> np.ndarray:
    """Each column at its minimum, maximum, midpoint and 50% beyond either end.

    One row with every column at the same landmark, then, per column, rows with that
    column at each landmark and the others at their midpoints. A transformed column's
    landmarks are taken on its transformed values (a log column's midpoint is the
    geometric mean), so they stay inside the transform's domain.
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
    return np.unique(_raw(scaler, np.array(rows)), axis=0)


def random_rows(scaler: AffineScaler, n: int, seed: int = 0) -> np.ndarray:
    """Uniform rows over the training box, in transformed values for a transformed
    column (used when no data is given)."""
    low, high = _training_box(scaler)
    return _raw(scaler, np.random.default_rng(seed).uniform(low, high, size=(n, low.size)))


def _raw(scaler: AffineScaler, rows: np.ndarray) -> np.ndarray:
    """Rows of :func:`_training_box` values back in raw units."""
    return transforms.apply(rows, transforms.side_ops(scaler.transforms_, "out"))


def _training_box(scaler: AffineScaler) -> tuple[np.ndarray, np.ndarray]:
    """Each column's training range; in transformed values for a transformed column."""
    low, high = getattr(scaler, "data_min_", None), getattr(scaler, "data_max_", None)
    if low is not None and high is not None:
        box = transforms.apply(np.stack([low, high]), scaler.transforms_)
        return box[0], box[1]
    if isinstance(scaler, StandardScaler):
        return scaler.mean_ - 2 * scaler.std_, scaler.mean_ + 2 * scaler.std_
    # Given factors: the (transformed) values that map to 0 and 1 in normalized space.
    scale, shift = scaler.inverse_affine()
    ends = np.stack([shift, scale + shift])
    return ends.min(axis=0), ends.max(axis=0)


def _chunks(X: np.ndarray, size: int) -> Iterator[np.ndarray]:
    for start in range(0, X.shape[0], size):
        yield X[start : start + size]


# ------------------------------------------------------------------------------- verify


@dataclass(frozen=True)
class Runs:
    """How rows go through the runtimes; :func:`compare` and :func:`compare_stream` share it.

    ``sample_only`` runtimes see the first :data:`REFERENCE_ROWS` rows; an ``optional``
    one that cannot load is skipped with its reason; ``reference`` and ``probe``: see
    :class:`_Tally`.
    """

    n_outputs: int
    dtype: str
    sample_only: frozenset[str] = frozenset()
    optional: frozenset[str] = frozenset()
    reference: str | None = None
    probe: str | None = None
    # the training box (low, high) of the raw inputs: a non-finite output inside it fails
    box: tuple[np.ndarray, np.ndarray] | None = None
    # run the garbage collector after each runtime of compare(), so that a large model's
    # runtime is gone before the next loads (about 50 ms a time in a busy process)
    collect: bool = True
    # runtimes that compare_stream may run side by side in worker threads (they release
    # the GIL while they compute); MXNet stays on the calling thread
    threaded: frozenset[str] = frozenset({"onnxruntime", "numpy", PROBE})


def compare(
    runtimes: dict[str, Callable[[], Runtime]],
    X: np.ndarray,
    runs: Runs,
    *,
    chunk_rows: int = CHUNK_ROWS,
) -> tuple[_Tally, dict[str, str]]:
    """Run ``X`` through each runtime in turn; fold the outputs into a :class:`_Tally`.

    ``runtimes`` maps names to *factories*: one runtime is loaded at a time, runs all
    rows in chunks, keeps only its outputs, and is released before the next loads, so
    a large model is in memory once, not once per runtime. Runtimes in ``sample_only``
    see only the first :data:`REFERENCE_ROWS` rows. A runtime in ``optional`` that
    cannot be loaded or run (not installed, an op it does not know) is skipped and
    returned with the reason instead of failing.
    """
    import gc

    results: dict[str, np.ndarray] = {}
    skipped: dict[str, str] = {}
    X = X.astype(runs.dtype)
    total = sum(min(len(X), REFERENCE_ROWS) if n in runs.sample_only else len(X) for n in runtimes)
    with _progress(X.shape[0] > chunk_rows, total=total, desc="verifying", unit="row") as bar:
        for name, make in runtimes.items():
            rows = X[:REFERENCE_ROWS] if name in runs.sample_only else X
            try:
                run = make()
                parts = []
                for chunk in _chunks(rows, chunk_rows):
                    parts.append(_run_checked(name, run, chunk, runs.n_outputs))
                    bar.update(chunk.shape[0])
            except (ImportError, NotImplementedError) as exc:
                if name not in runs.optional:
                    raise
                skipped[name] = first_line(exc)  # not installed, or an op it does not know
                continue
            results[name] = np.concatenate(parts)
            del run, parts
            if runs.collect:
                gc.collect()
    tally = _Tally(list(results), runs.n_outputs, reference=runs.reference, probe=runs.probe)
    tally.box = runs.box
    n = max((len(r) for r in results.values()), default=0)
    for start in range(0, n, chunk_rows):
        stop = start + chunk_rows
        tally.add({k: v[start:stop] for k, v in results.items()}, X[start:stop])
    return tally, skipped


class _Tally:
    """Running per-pair, per-output maxima of disagreement: rows are folded in as they
    come, so nothing grows with the row count. A pair is compared on the rows both saw
    (runtimes that see only a sample stop early).

    With a ``reference`` among the runtimes, each other runtime is paired with it only;
    otherwise every pair is compared. A ``probe`` runtime is paired with nobody: its
    largest distance from the reference is kept as :attr:`probe_error` (the rounding of a
    float32 evaluation). The output range seen by the first runtime is kept for the
    sanity checks.
    """

    def __init__(
        self,
        names: list[str],
        n_outputs: int,
        *,
        reference: str | None = None,
        probe: str | None = None,
    ) -> None:
        compared = [n for n in names if n != probe]
        self.reference: str | None = None
        if reference is not None and reference in compared:
            self.pairs_ = [(n, reference) for n in compared if n != reference]
            self.reference = reference
        else:
            self.pairs_ = list(itertools.combinations(compared, 2))
        self.worst = {pair: np.zeros(n_outputs) for pair in self.pairs_}
        self.rows = dict.fromkeys(self.pairs_, 0)
        self.probe = probe if probe in names and self.reference else None
        self.probe_error: np.ndarray | None = np.zeros(n_outputs) if self.probe else None
        self.watched = self.reference or (compared[0] if compared else None)
        self.low = np.full(n_outputs, np.inf)
        self.high = np.full(n_outputs, -np.inf)
        self.box: tuple[np.ndarray, np.ndarray] | None = None
        self.non_finite: dict[str, dict[str, Any]] = {}
        self.seen = 0  # rows of the watched runtime so far

    def add(
        self,
        outputs: dict[str, np.ndarray],
        rows: np.ndarray | None = None,
        only: str | None = None,
    ) -> None:
        """Fold in one chunk's outputs (and its input ``rows``, for the non-finite
        count); with ``only``, just the pairs that hold it."""
        for a, b in self.pairs_:
            if only is not None and only not in (a, b):
                continue
            if a in outputs and b in outputs:
                n = min(len(outputs[a]), len(outputs[b]))
                worst = _worst_disagreement(outputs[a][:n], outputs[b][:n])
                self.worst[(a, b)] = np.maximum(self.worst[(a, b)], worst)
                self.rows[(a, b)] += n
        if only is None and self.probe in outputs and self.reference in outputs:
            assert self.probe and self.reference and self.probe_error is not None
            n = min(len(outputs[self.probe]), len(outputs[self.reference]))
            worst = _worst_disagreement(outputs[self.probe][:n], outputs[self.reference][:n])
            self.probe_error = np.maximum(self.probe_error, worst)
        if self.watched in outputs and only in (None, self.watched):
            values = outputs[self.watched]
            with np.errstate(invalid="ignore"):
                values = np.asfortranarray(values)  # see _worst_disagreement
                self.low = np.fmin(self.low, np.fmin.reduce(values, axis=0, initial=np.inf))
                self.high = np.fmax(self.high, np.fmax.reduce(values, axis=0, initial=-np.inf))
            if rows is not None:
                self._count_non_finite(values, rows[: len(values)])
            self.seen += len(values)

    def _count_non_finite(self, values: np.ndarray, rows: np.ndarray) -> None:
        """Rows of finite inputs whose outputs are not finite (agreeing runtimes would
        otherwise pass a model that returns NaN), split by the training box."""
        bad = ~np.isfinite(values).all(axis=1) & np.isfinite(rows).all(axis=1)
        if not bad.any():
            return
        inside = np.zeros(len(rows), dtype=bool)
        if self.box is not None:
            low, high = self.box
            inside[:] = ((rows >= low) & (rows <= high)).all(axis=1)
        for where, mask in (("inside", bad & inside), ("outside", bad & ~inside)):
            if mask.any():
                found = self.non_finite.setdefault(where, {"rows": 0})
                found["rows"] += int(mask.sum())
                if "first" not in found:
                    i = int(np.argmax(mask))
                    found["first"] = (self.seen + i, rows[i].tolist())

    def pairs(
        self, outputs: list[str], span: np.ndarray, rtol: float, skipped: Iterable[str] = ()
    ) -> list[PairResult]:
        gone = set(skipped)
        results = []
        for pair in self.pairs_:
            if gone & set(pair):
                continue
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
    runs: Runs,
) -> tuple[_Tally, dict[str, str], int]:
    """:func:`compare` for rows that arrive in chunks (a table read batch by batch).

    Work overlaps: a thread reads (checks, converts) the next chunk
    (:class:`~normexport.tables.ReadAhead`) while this one runs through every runtime,
    the ``threaded`` ones side by side in worker threads (two chunks in flight, NumPy's
    BLAS on one thread: :func:`~normexport.reference.one_blas_thread`); the
    ``sample_only`` runtimes load and run on their rows in a thread of their own
    (:class:`_Sample`), so their start-up (onnx.reference's, mostly) is not waited for.
    Results are as if run in turn. Memory is bounded by a few chunks (and the models),
    never by the rows. Returns the tally, the skipped runtimes and the number of rows.
    """
    from concurrent.futures import Future, ThreadPoolExecutor

    from normexport.tables import ReadAhead

    stream = ReadAhead(c.astype(runs.dtype, copy=False) for c in chunks)
    loaded: dict[str, Runtime] = {}
    skipped: dict[str, str] = {}
    with stream, _Sample(runtimes, runs) as sample, one_blas_thread():
        for name, make in runtimes.items():
            if name in runs.sample_only:
                continue
            try:
                loaded[name] = make()
            except (ImportError, NotImplementedError) as exc:
                if name not in runs.optional:
                    raise
                skipped[name] = first_line(exc)
        names = [n for n in runtimes if n in loaded or n in runs.sample_only]
        tally = _Tally(names, runs.n_outputs, reference=runs.reference, probe=runs.probe)
        tally.box = runs.box
        seen = 0
        side = [name for name in loaded if name in runs.threaded]
        workers = max(1, min(len(side), os.cpu_count() or 1))

        with (
            ThreadPoolExecutor(workers, thread_name_prefix="normexport-runtime") as pool,
            _progress(True, desc="verifying", unit=" rows", unit_scale=True) as bar,
        ):

            def fold(chunk: np.ndarray, jobs: dict[str, Future[np.ndarray]]) -> None:
                """Collect a chunk's outputs (running those that stay on this thread)."""
                nonlocal seen
                results = {}
                for name, run in list(loaded.items()):
                    try:
                        results[name] = (
                            jobs[name].result()
                            if name in jobs
                            else _run_checked(name, run, chunk, runs.n_outputs)
                        )
                    except NotImplementedError as exc:
                        if name not in runs.optional:
                            raise
                        skipped[name] = first_line(exc)
                        del loaded[name]
                tally.add(results, chunk)
                sample.feed(chunk, results)
                seen += len(chunk)
                bar.update(len(chunk))

            # two chunks in flight: the workers start on the next while this one is folded
            flight: list[tuple[np.ndarray, dict[str, Future[np.ndarray]]]] = []
            for chunk in stream:
                jobs = {
                    name: pool.submit(_run_checked, name, loaded[name], chunk, runs.n_outputs)
                    for name in side
                    if name in loaded
                }
                flight.append((chunk, jobs))
                if len(flight) == 2:
                    fold(*flight.pop(0))
            for pending in flight:
                fold(*pending)
        sample.fold_into(tally, skipped)
    return tally, skipped, seen


class _Sample:
    """The ``sample_only`` runtimes of :func:`compare_stream`, each loaded in a thread of
    its own and run there on the first :data:`REFERENCE_ROWS` rows once they have come.

    The other runtimes' outputs on those rows are kept (a few hundred rows), so that
    :meth:`fold_into` compares them exactly as if the sample runtime had run in line.
    """

    def __init__(self, runtimes: dict[str, Callable[[], Runtime]], runs: Runs) -> None:
        from concurrent.futures import Future, ThreadPoolExecutor

        self.runs = runs
        self.rows: list[np.ndarray] = []
        self.outputs: dict[str, list[np.ndarray]] = {}
        self.have = 0
        self.ready: Future[np.ndarray | None] = Future()
        names = [n for n in runtimes if n in runs.sample_only]
        self.pool = ThreadPoolExecutor(max(1, len(names)), thread_name_prefix="normexport-sample")
        self.jobs = {name: self.pool.submit(self._run, runtimes[name]) for name in names}

    def _run(self, make: Callable[[], Runtime]) -> np.ndarray | None:
        run = make()
        rows = self.ready.result()
        return None if rows is None else run(rows)

    def feed(self, chunk: np.ndarray, results: dict[str, np.ndarray]) -> None:
        """Keep the head of a chunk and of the outputs on it, up to the sample's size."""
        take = min(len(chunk), REFERENCE_ROWS - self.have)
        if take <= 0 or not self.jobs:
            return
        self.rows.append(chunk[:take])
        for name, out in results.items():
            self.outputs.setdefault(name, []).append(out[:take])
        self.have += take
        if self.have == REFERENCE_ROWS:
            self.ready.set_result(np.concatenate(self.rows))

    def fold_into(self, tally: _Tally, skipped: dict[str, str]) -> None:
        """Wait for each sample runtime; fold its pairs into ``tally`` or mark it skipped."""
        if not self.ready.done():  # the stream ended before REFERENCE_ROWS rows
            self.ready.set_result(np.concatenate(self.rows) if self.rows else None)
        for name, job in self.jobs.items():
            try:
                out = job.result()
            except (ImportError, NotImplementedError) as exc:
                if name not in self.runs.optional:
                    raise
                skipped[name] = first_line(exc)
                continue
            if out is None:
                continue
            out = _checked(name, out, self.have, self.runs.n_outputs)
            others = {k: np.concatenate(v) for k, v in self.outputs.items() if k not in skipped}
            tally.add({**others, name: out}, only=name)

    def __enter__(self) -> _Sample:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.ready.done():  # an error ended the stream: let the jobs finish
            self.ready.set_result(None)
        self.pool.shutdown(wait=True)


def _progress(wanted: bool, **options: Any) -> Any:
    """tqdm's progress bar on stderr when ``wanted`` and stderr is a terminal; otherwise
    a stand-in, and tqdm is not imported (about 60 ms of a run's start-up)."""
    if not (wanted and sys.stderr.isatty()):
        return _NoProgress()
    from tqdm.auto import tqdm

    return tqdm(file=sys.stderr, **options)


class _NoProgress:
    """A hidden progress bar."""

    def __enter__(self) -> _NoProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def update(self, n: int = 1) -> None:
        return None


def _run_checked(name: str, run: Runtime, rows: np.ndarray, n_outputs: int) -> np.ndarray:
    return _checked(name, run(rows), rows.shape[0], n_outputs)


def _checked(name: str, out: Any, rows: int, n_outputs: int) -> np.ndarray:
    out = np.asarray(out, dtype=np.float64)
    if out.shape != (rows, n_outputs):
        raise NormexportError(f"{name} returned shape {out.shape}, expected {(rows, n_outputs)}")
    return out


def _worst_disagreement(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per column, the largest :func:`_disagreement` of ``a`` and ``b``.

    ``|a - b|`` alone gives it unless a difference is NaN (a NaN, or equal infinities):
    only then are the exact rules applied, so the common case costs three passes. The
    difference is laid out column by column: NumPy reduces a row-major (rows, 2) array
    over its rows some 20x slower than each contiguous column.
    """
    with np.errstate(invalid="ignore"):
        diff = np.subtract(a, b, order="F")
        np.abs(diff, out=diff)
    worst = diff.max(axis=0, initial=0.0)  # NaN where a difference is NaN
    if np.isnan(worst).any():
        worst = _disagreement(a, b).max(axis=0, initial=0.0)
    return worst


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
        source = random_rows(in_scaler, rows or RANDOM_ROWS, seed)
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
    float32 = dtype == "float32"
    return check_rows(
        directory_runtimes(directory, in_scaler, out_scaler, dtype),
        source,
        in_scaler,
        out_scaler,
        dtype=dtype,
        rtol=rtol,
        sample_only=SAMPLE_ONLY,
        optional=frozenset({"mxnet", "numpy", "onnx.reference", PROBE}),
        reference="numpy" if float32 else None,
        probe=PROBE if float32 else None,
        chunk_rows=chunk_rows,
        collect=_model_bytes(onnx_path) > COLLECT_BYTES,
    )


SAMPLE_ONLY = frozenset({"onnx.reference"})  # runtimes that see the first REFERENCE_ROWS rows


def directory_runtimes(
    directory: Path, in_scaler: AffineScaler, out_scaler: AffineScaler, dtype: str
) -> dict[str, Callable[[], Runtime]]:
    """The runtimes :func:`verify_directory` runs on a model directory, as factories."""
    onnx_path = directory / ONNX_FILE
    runtimes: dict[str, Callable[[], Runtime]] = {
        "onnxruntime": lambda: onnxruntime_runtime(onnx_path),
        "mxnet": lambda: _mxnet_runtime(directory, dtype),
        "numpy": lambda: numpy_runtime(directory, in_scaler, out_scaler),  # float64
        "onnx.reference": lambda: onnx_reference_runtime(onnx_path),
    }
    if dtype == "float32":  # float64 is the yardstick; a float32 evaluation shows the rounding
        runtimes[PROBE] = lambda: numpy_runtime(directory, in_scaler, out_scaler, "float32")
    return runtimes


COLLECT_BYTES = 16 * 1024 * 1024  # verify_directory releases larger models between runtimes


def _model_bytes(onnx_path: Path) -> int:
    return sum(p.stat().st_size for p in onnx_path.parent.glob(onnx_path.name + "*"))


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
    reference: str | None = None,
    probe: str | None = None,
    chunk_rows: int = CHUNK_ROWS,
    collect: bool = True,
) -> VerificationReport:
    """Edge rows of ``in_scaler`` plus ``data`` through every runtime; the report.

    ``data`` is an array, or an iterable of row chunks that is streamed (see
    :func:`compare_stream`). ``dtype`` picks the default tolerance; rows are fed as
    ``input_dtype`` (default ``dtype``). With a ``reference`` runtime, every other runtime
    is measured against it alone (else every pair is compared); a ``probe`` runtime (a
    float32 evaluation) measures the rounding the network itself causes, which sets the
    tolerance when it exceeds the default and no ``rtol`` is given (see
    :func:`tolerance`). Passing needs every pair within tolerance and at least two
    compared runtimes. The report carries :func:`sanity_warnings` on the data rows.
    """
    edges = edge_rows(in_scaler)
    runtimes, span = _on_transformed_outputs(runtimes, out_scaler)
    watch = _InputWatch(in_scaler)
    runs = Runs(
        out_scaler.n_features_in_,
        input_dtype or dtype,
        sample_only,
        optional,
        reference,
        probe,
        _training_box(in_scaler),
        collect,
    )
    if isinstance(data, np.ndarray):
        watch.add(data)
        all_rows = np.concatenate([edges, data])  # edges first: sampled runtimes see them
        tally, skipped = compare(runtimes, all_rows, runs, chunk_rows=chunk_rows)
        n_rows = int(all_rows.shape[0])
    else:
        stream = itertools.chain([edges], watch.watch(data))
        tally, skipped, n_rows = compare_stream(runtimes, stream, runs)
    rounding = None if tally.probe_error is None else tally.probe_error / span
    tolerance, loosened = _tolerance(dtype, rtol, rounding)
    pairs = tally.pairs(list(out_scaler.columns_), span, tolerance, skipped)
    loaded = [n for n in runtimes if n not in skipped and n != probe]
    warnings = watch.warnings() + _constant_output_warning(
        tally.low, tally.high, span, out_scaler.columns_, n_rows
    )
    non_finite = _describe_non_finite(tally.non_finite, len(edges), in_scaler.columns_)
    return VerificationReport(
        ok=all(p.ok for p in pairs) and len(loaded) >= 2 and "inside" not in non_finite,
        dtype=dtype,
        rtol=tolerance,
        rows=n_rows,
        data_rows=n_rows - int(edges.shape[0]),
        edge_rows=int(edges.shape[0]),
        outputs=list(out_scaler.columns_),
        output_span=dict(zip(out_scaler.columns_, span.tolist(), strict=True)),
        runtimes=loaded,
        skipped={k: v for k, v in skipped.items() if k != probe},
        pairs=pairs,
        reference=tally.reference or "",
        rtol_default=DEFAULT_RTOL[dtype],
        rounding={}
        if rounding is None
        else dict(zip(out_scaler.columns_, rounding.tolist(), strict=True)),
        loosened=loosened,
        warnings=warnings,
        non_finite=non_finite,
        transformed=out_scaler.transforms(),
    )


def _describe_non_finite(
    found: dict[str, dict[str, Any]], n_edges: int, columns: Sequence[str]
) -> dict[str, Any]:
    """The tally's non-finite counts, each first row named as an edge or data row with
    its input values."""
    described = {}
    for where, item in found.items():
        index, values = item["first"]
        row = f"edge row {index}" if index < n_edges else f"data row {index - n_edges}"
        shown = ", ".join(f"{c}={v:.6g}" for c, v in zip(columns, values, strict=True))
        described[where] = {"rows": item["rows"], "first": f"{row} ({shown})"}
    return described


def _on_transformed_outputs(
    runtimes: dict[str, Callable[[], Runtime]], out_scaler: AffineScaler
) -> tuple[dict[str, Callable[[], Runtime]], np.ndarray]:
    """The runtimes and spans to compare: an output with a transform (log y) is compared
    on its transformed values, relative to their range, where the network's rounding
    lives; in raw units ``exp`` would stretch it by the output's magnitude."""
    span = out_scaler.span()
    kinds = out_scaler.transforms_
    if not any(kinds):
        return runtimes, span
    low, high = _training_box(out_scaler)
    span = np.where([k is not None for k in kinds], np.where(high > low, high - low, 1.0), span)

    def transformed(make: Callable[[], Runtime]) -> Callable[[], Runtime]:
        def load() -> Runtime:
            run = make()
            return lambda X: transforms.apply(np.asarray(run(X), dtype=np.float64), kinds)

        return load

    return {name: transformed(make) for name, make in runtimes.items()}, span


# A float32 runtime's distance from the float64 evaluation is its own rounding; a
# second float32 evaluation (NumPy's) shows how large that is for this network.
# Runtimes sum in other orders, so they may round a few times worse than it.
ROUNDING_MARGIN = 4.0
MAX_LOOSENED_RTOL = 1e-3  # beyond this a float32 network is too ill-conditioned to vouch for


def tolerance(dtype: str, rtol: float | None, rounding: Any = None) -> float:
    """The tolerance verification applies (see :func:`_tolerance`)."""
    return _tolerance(dtype, rtol, None if rounding is None else np.asarray(rounding))[0]


def _tolerance(dtype: str, rtol: float | None, rounding: np.ndarray | None) -> tuple[float, str]:
    """``rtol`` if given; else the dtype's default, loosened, and said so, only when a
    float32 evaluation of the network itself misses its float64 evaluation by more than
    the default allows (times :data:`ROUNDING_MARGIN`, at most
    :data:`MAX_LOOSENED_RTOL`)."""
    default = DEFAULT_RTOL[dtype]
    if rtol is not None:
        return float(rtol), ""
    if rounding is None or not rounding.size or not np.all(np.isfinite(rounding)):
        return default, ""
    worst = float(rounding.max())
    if ROUNDING_MARGIN * worst <= default:
        return default, ""
    loosened = min(ROUNDING_MARGIN * worst, MAX_LOOSENED_RTOL)
    capped = (
        f" (capped at {MAX_LOOSENED_RTOL:g}: train this network in float64)"
        if loosened < ROUNDING_MARGIN * worst
        else ""
    )
    return loosened, (
        f"tolerance loosened from {default:g} to {loosened:.3g}{capped}: a float32 "
        f"evaluation of this network lies {worst:.3g} of range from its float64 evaluation "
        "(its layers amplify rounding); give rtol to choose the tolerance yourself"
    )


# ------------------------------------------------------------------------------- sanity

# Normalized values beyond these bands, in most data rows, mean the factors are wrong.
FAR_BANDS = {"minmax": (-1.0, 2.0), "standard": (-10.0, 10.0), "affine": (-10.0, 11.0)}
CONSTANT_SPREAD = 1e-6  # an output varying less than this share of its range is constant
_CAUSE = (
    "the factors may hold (min, max) rows in place of (scale, shift), or their two "
    "columns may be swapped (normalizing is x * scale + shift)"
)


class _InputWatch:
    """Per input column, how many data rows normalize far outside the usual band, and
    the normalized range seen: folded in chunk by chunk (see :func:`sanity_warnings`)."""

    def __init__(self, in_scaler: AffineScaler) -> None:
        self.scaler = in_scaler
        kind = in_scaler.kind if in_scaler.kind in FAR_BANDS else "affine"
        self.kind = kind
        low, high = FAR_BANDS[kind]
        if kind == "minmax":  # the band is relative to the feature range
            f_low, f_high = in_scaler.feature_range
            width = f_high - f_low
            low, high = f_low + low * width, f_low + high * width
        self.band = (low, high)
        n = in_scaler.n_features_in_
        self.rows = 0
        self.outside = np.zeros(n, dtype=np.int64)  # rows outside a transform's domain
        self.far = np.zeros(n, dtype=np.int64)
        self.low = np.full(n, np.inf)
        self.high = np.full(n, -np.inf)

    def add(self, X: np.ndarray) -> None:
        if not len(X):
            return
        scale, shift = self.scaler.affine()
        X = np.asarray(X, dtype=np.float64)
        self.outside += transforms.out_of_domain(X, self.scaler.transforms_)
        with np.errstate(all="ignore"):  # column by column in memory: see _worst_disagreement
            Xn = np.multiply(
                transforms.apply(X, self.scaler.transforms_), scale, dtype=np.float64, order="F"
            )
            Xn += shift
        self.rows += len(Xn)
        self.far += np.count_nonzero(Xn < self.band[0], axis=0)
        self.far += np.count_nonzero(Xn > self.band[1], axis=0)
        self.low = np.fmin(self.low, np.fmin.reduce(Xn, axis=0))  # NaN-ignoring min
        self.high = np.fmax(self.high, np.fmax.reduce(Xn, axis=0))

    def watch(self, chunks: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        for chunk in chunks:
            self.add(chunk)
            yield chunk

    def warnings(self) -> list[str]:
        if not self.rows:
            return []
        return self._outside_warnings() + self._far_warnings()

    def _outside_warnings(self) -> list[str]:
        lines = []
        for j, name in enumerate(self.scaler.transforms_):
            if name is None or not self.outside[j]:
                continue
            low = transforms.TRANSFORMS[name].low
            lines.append(
                f"column {self.scaler.columns_[j]!r}: {self.outside[j]} of the {self.rows} "
                f"data rows lie outside the domain of {name} (<= {low:g}); the transform "
                "gives NaN (-inf at the boundary) and the model's outputs for them mean nothing"
            )
        return lines

    def _far_warnings(self) -> list[str]:
        bad = [j for j in range(self.far.size) if self.far[j] * 2 > self.rows]
        if not bad:
            return []
        j = max(bad, key=lambda k: max(abs(self.low[k]), abs(self.high[k])))
        kind = {"minmax": "min-max", "standard": "z-score", "affine": "given"}[self.kind]
        return [
            f"the normalized inputs lie far outside [{self.band[0]:g}, {self.band[1]:g}] "
            f"({kind} factors) in most of the {self.rows} data rows (column "
            f"{self.scaler.columns_[j]!r}: {self.low[j]:.4g} to {self.high[j]:.4g}"
            + (f"; {len(bad)} columns in all" if len(bad) > 1 else "")
            + f"): {_CAUSE}"
        ]


def _constant_output_warning(
    low: np.ndarray, high: np.ndarray, span: np.ndarray, columns: list[str], rows: int
) -> list[str]:
    if not np.all(np.isfinite(low) & np.isfinite(high)):
        return []
    if not np.all(high - low <= CONSTANT_SPREAD * span):
        return []
    values = ", ".join(f"{c} = {v:.6g}" for c, v in zip(columns, low.tolist(), strict=True))
    return [
        f"the model's output is constant over the {rows} verification rows ({values}): "
        f"normalized inputs far from the training range saturate the network; {_CAUSE}"
    ]


def sanity_warnings(
    in_scaler: AffineScaler,
    out_scaler: AffineScaler,
    X: np.ndarray,
    Y: np.ndarray,
) -> list[str]:
    """One-line warnings about a model that verifies but is likely wrong: raw input rows
    ``X`` that normalize far outside the usual band in most rows (min-max: more than one
    range beyond [0, 1]; z-score: beyond ±10; given factors: beyond [-10, 11]), or
    outputs ``Y`` that are constant (each varies by less than 1e-6 of its range). Both
    name the likely cause: factors holding (min, max) instead of (scale, shift), or
    with their columns swapped. :func:`check_rows` puts these in every report.
    """
    watch = _InputWatch(in_scaler)
    watch.add(np.asarray(X, dtype=np.float64))
    Y = np.asarray(Y, dtype=np.float64)
    return watch.warnings() + _constant_output_warning(
        np.nanmin(Y, axis=0), np.nanmax(Y, axis=0), out_scaler.span(), out_scaler.columns_, len(Y)
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
