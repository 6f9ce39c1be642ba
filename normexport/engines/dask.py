"""Score a partitioned dataset on a Dask cluster: one task per file, resumable, manifest last.

``predict_dataset`` validates every partition, skips outputs that a previous run already
finished, runs :func:`normexport.engines.predict_file` for the rest as Dask tasks (a task
whose worker dies is re-run elsewhere), then writes ``_manifest.json``. Without a
scheduler address it runs on a ``distributed.LocalCluster`` for the duration of the call.
Workers and client must see the model, the dataset and OUT_DIR under the same paths.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from normexport import engines
from normexport.errors import DataError, MissingExtraError, NormexportError
from normexport.partition import PartitionPredictor, partition_predictor

EXTRA = 'pip install "normexport[dask]"'
DEFAULT_WORKERS = 2
CLOSE_TIMEOUT = 30.0  # seconds for the local cluster to stop its workers
DEFAULT_TIMEOUT = 10.0  # seconds to wait for a scheduler to answer
RETRIES = 2  # re-runs of a task that raised an unexpected (possibly transient) error


def predict_dataset(
    model: str | os.PathLike[str] | PartitionPredictor,
    dataset: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    keep: Sequence[str] = (),
    scheduler: str | None = None,
    workers: int | None = None,
    progress: bool | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> dict[str, Any]:
    """Predict every partition of ``dataset`` into ``out_dir``; return the manifest.

    ``model`` is an ONNX file, a model directory, or a :class:`PartitionPredictor` (then
    ``keep`` is its own). ``scheduler`` is a Dask scheduler address; without one, a local
    cluster of ``workers`` processes (default 2) with one thread each runs the job.
    ``progress`` shows a bar on stderr (default: when stderr is a terminal). The returned
    manifest has an extra ``"run"`` entry: partitions, done (by earlier runs), computed,
    seconds. Bad input raises :class:`~normexport.errors.DataError` before anything is
    written.
    """
    started = time.monotonic()
    _require_distributed()
    if isinstance(model, PartitionPredictor):
        if keep:
            raise DataError("keep= applies to a model path; give it to partition_predictor")
        predictor = model
    else:
        predictor = partition_predictor(model, keep)
    if scheduler and workers:
        raise DataError("workers applies to the local cluster; a scheduler brings its own")
    if workers is not None and workers < 1:
        raise DataError(f"workers must be at least 1, got {workers}")
    parts = engines.list_partitions(dataset)
    out = Path(out_dir).resolve()
    engines.check_partitions(parts, predictor, out)
    model_sha = engines.model_sha256(predictor)
    done = engines.finished(parts, out, predictor, model_sha)
    todo = [p for p in parts if p.output not in done]
    if done:
        print(
            f"resuming: {len(done)} of {len(parts)} partitions done, computing {len(todo)}",
            file=sys.stderr,
        )
    if todo:
        with _client(scheduler, workers or DEFAULT_WORKERS, timeout) as client:
            out.mkdir(parents=True, exist_ok=True)
            # The old manifest would describe outputs that are about to change.
            (out / engines.MANIFEST_FILE).unlink(missing_ok=True)
            engines.clean_temporaries(todo, out)
            done.update(_run(client, predictor, todo, out, model_sha, progress))
        engines.clean_temporaries(todo, out)
    document = engines.manifest(predictor, model_sha, [done[p.output] for p in parts])
    engines.write_manifest(out, document)
    run = {
        "partitions": len(parts),
        "done": len(parts) - len(todo),
        "computed": len(todo),
        "seconds": round(time.monotonic() - started, 3),
    }
    return {**document, "run": run}


def run_cli(
    model: str,
    dataset: str,
    out: str,
    keep: str | Sequence[str] | None,
    scheduler: str | None,
    workers: int | None,
) -> int:
    """``normexport predict MODEL DATASET --out OUTDIR --engine dask ...``; errors propagate
    (the CLI prints a :class:`~normexport.errors.NormexportError` as one line, exit 2)."""
    if isinstance(keep, str):
        keep = [c.strip() for c in keep.split(",") if c.strip()]
    result = predict_dataset(
        model, dataset, out, keep=keep or (), scheduler=scheduler, workers=workers
    )
    run = result["run"]
    print(
        f"wrote {result['rows']} rows in {run['partitions']} partitions to {out} "
        f"({run['computed']} computed, {run['done']} already done) in {run['seconds']:.1f} s",
        file=sys.stderr,
    )
    return 0


def _task(
    part: engines.Partition, predictor: PartitionPredictor, out_dir: str, model_sha: str
) -> dict[str, Any]:
    # A user error is deterministic: report it instead of raising, so it is not retried.
    try:
        return engines.predict_file(predictor, part, out_dir, model_sha)
    except NormexportError as exc:
        return {"error": str(exc)}


def _run(
    client: Any,
    predictor: PartitionPredictor,
    todo: Sequence[engines.Partition],
    out: Path,
    model_sha: str,
    progress: bool | None,
) -> dict[str, dict[str, Any]]:
    """Submit one task per partition; collect records as they finish, stop at the first error."""
    from distributed import as_completed
    from distributed.scheduler import KilledWorker
    from tqdm import tqdm

    futures = client.map(
        _task,
        todo,
        predictor=predictor,
        out_dir=str(out),
        model_sha=model_sha,
        key=[f"normexport-predict-{p.output}-{os.urandom(4).hex()}" for p in todo],
        retries=RETRIES,
    )
    source = {f.key: p.source for f, p in zip(futures, todo, strict=True)}
    show = sys.stderr.isatty() if progress is None else progress
    records: dict[str, dict[str, Any]] = {}
    with tqdm(total=len(todo), unit="part", file=sys.stderr, disable=not show) as bar:
        try:
            for future in as_completed(futures, loop=client.loop):
                try:
                    record = future.result()
                except KilledWorker as exc:
                    raise NormexportError(
                        f"{source[future.key]}: its task killed {exc.allowed_failures + 1} "
                        "workers (out of memory? use smaller partitions); see the worker logs"
                    ) from exc
                future.release()  # its output is on disk: no recompute if its worker dies later
                if "error" in record:
                    raise DataError(record["error"])
                records[record["output"]] = record
                bar.update()
        finally:
            client.cancel([f for f in futures if not f.done()])
    return records


def _require_distributed() -> None:
    try:
        import distributed  # noqa: F401
    except ImportError as exc:
        raise MissingExtraError(
            f"the Dask engine needs distributed, which is not installed here ({exc}); {EXTRA}"
        ) from exc


@contextlib.contextmanager
def _client(scheduler: str | None, workers: int, timeout: float) -> Iterator[Any]:
    """A distributed Client: connected to ``scheduler``, or on a local cluster of its own."""
    from distributed import Client, LocalCluster

    if scheduler:
        from distributed.comm import get_address_host_port

        # Checked first: a Client refused for its address lingers and times out at exit.
        try:
            get_address_host_port(scheduler)
        except (ValueError, NotImplementedError) as exc:
            raise DataError(f"scheduler {scheduler}: not an address ({exc})") from None
        try:
            client = Client(scheduler, timeout=timeout, set_as_default=False)
        except (OSError, TimeoutError):
            client = None
        if client is None:  # raised outside the handler, which holds the half-made Client
            raise DataError(f"scheduler {scheduler}: no answer within {timeout:g} s")
        with client:
            yield client
        return
    cluster = LocalCluster(
        n_workers=workers,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address=None,
        # No dashboard; the scheduler's health endpoint on any free loopback port, not 8787.
        scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
    )
    try:
        with Client(cluster, set_as_default=False) as client:
            yield client
    finally:
        # Every output is written and checked by now: a worker that is slow to stop (a
        # loaded machine) must not fail the job. Its process is ended with the cluster.
        with contextlib.suppress(TimeoutError, asyncio.CancelledError, OSError):
            cluster.close(timeout=CLOSE_TIMEOUT)
