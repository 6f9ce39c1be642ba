"""Score a partitioned dataset file by file: the engine-neutral half of every engine driver.

A driver (:mod:`normexport.engines.dask`) lists the partitions (:func:`list_partitions`),
checks every schema before any work (:func:`check_partitions`), skips outputs that are
already done (:func:`finished`), runs :func:`predict_file` for the rest on its workers
and writes the manifest last (:func:`write_manifest`). Each output is one Parquet file
per input partition, written atomically, with the record that makes it trustworthy on a
rerun in its schema metadata. Nothing here imports an engine.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from normexport import __version__, files
from normexport.errors import DataError, NormexportError
from normexport.partition import PartitionPredictor

MANIFEST_FILE = "_manifest.json"
MANIFEST_FORMAT = "normexport.predictions/1"
RECORD_KEY = b"normexport.partition"  # Parquet schema metadata of every output file
_SUFFIXES = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".csv.gz": "csv"}


@dataclass(frozen=True)
class Partition:
    """One input file and the name of its output file in OUT_DIR."""

    source: str
    output: str
    kind: str  # "parquet" or "csv"


def list_partitions(dataset: str | os.PathLike[str]) -> list[Partition]:
    """The partitions of a Parquet/CSV file, a directory of them, or a glob, in natural order.

    In a directory, names starting with ``.`` or ``_`` (``_SUCCESS``, ``_metadata``,
    ``.crc`` files) and other suffixes are skipped; subdirectories are not searched.
    """
    text = os.fspath(dataset)
    path = Path(text)
    if path.is_dir():
        found = [p for p in path.iterdir() if p.is_file() and not p.name.startswith((".", "_"))]
        found = [p for p in found if _suffix(p)]
        if not found:
            raise DataError(f"{path}: no .parquet or .csv files in this directory")
    elif path.is_file():
        if not _suffix(path):
            raise DataError(f"{path}: not a .parquet or .csv file")
        found = [path]
    elif glob.has_magic(text):
        found = [Path(p) for p in glob.glob(text) if Path(p).is_file()]
        if not found or not all(_suffix(p) for p in found):
            raise DataError(f"{text}: matches no files, or files other than .parquet/.csv")
    else:
        raise DataError(f"{path}: no such file or directory")
    parts = [_partition(p) for p in sorted(found, key=lambda p: _natural(str(p)))]
    outputs = [p.output for p in parts]
    clash = next((o for o in outputs if outputs.count(o) > 1), None)
    if clash:
        raise DataError(f"{text}: two partitions would both be written to {clash}")
    return parts


def check_partitions(
    parts: Sequence[Partition], predictor: PartitionPredictor, out_dir: str | os.PathLike[str]
) -> None:
    """Refuse bad input before any work, as the workers would: missing columns, non-numeric
    Parquet columns, non-numeric values in a CSV file's first block, unreadable files, and
    an OUT_DIR that would overwrite an input. Reads footers, headers and first blocks only."""

    out = Path(out_dir).resolve()
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a directory")
    for part in parts:
        if Path(part.source) == out / part.output:
            raise DataError(f"{part.source}: OUT_DIR {out} would overwrite this input")
        batches = predictor.read_batches(part.source, batch_rows=1)
        if part.kind == "csv":  # CSV has no types: its first block's values stand in
            next(batches)


def finished(
    parts: Sequence[Partition],
    out_dir: str | os.PathLike[str],
    predictor: PartitionPredictor,
    model_sha256: str,
) -> dict[str, dict[str, Any]]:
    """Records of the outputs that can be trusted: same input (path, size, mtime_ns), same
    model, same keep, same row count. Reads only Parquet footers; writes nothing."""
    import pyarrow.parquet as pq

    done: dict[str, dict[str, Any]] = {}
    for part in parts:
        target = Path(out_dir) / part.output
        if not target.is_file():
            continue
        try:
            meta = pq.read_metadata(target)
            record = json.loads((meta.metadata or {})[RECORD_KEY])
        except (OSError, ValueError, KeyError):
            continue  # not ours, or unreadable: recompute
        expected = {
            "input": part.source,
            "output": part.output,
            "model_sha256": model_sha256,
            "keep": list(predictor.keep),
            "targets": list(predictor.targets),
        }
        stat = {k: record.get("fingerprint", {}).get(k) for k in ("bytes", "mtime_ns")}
        if stat == _stat(part.source) and all(record.get(k) == v for k, v in expected.items()):
            done[part.output] = {**record, "rows": meta.num_rows}
    return done


def predict_file(
    predictor: PartitionPredictor, part: Partition, out_dir: str, model_sha256: str
) -> dict[str, Any]:
    """Stream one partition through the model into ``OUT_DIR/<output>``, atomically.

    The worker's task. Reading and value checks are :mod:`normexport.tables`', as in
    single-process ``predict``, so the numbers are the same. The returned record, also
    stored in the output's schema metadata, holds the input's fingerprint: size,
    mtime_ns and the sha256 of its bytes.
    """
    from normexport.tables import TableWriter

    stat = _stat(part.source)
    record = {
        "input": part.source,
        "fingerprint": {**stat, "sha256": files.sha256_file(part.source)},
        "output": part.output,
        "rows": 0,
        "model_sha256": model_sha256,
        "keep": list(predictor.keep),
        "targets": list(predictor.targets),
    }
    batches = predictor.read_batches(part.source, batch_rows=predictor.batch_rows)
    # the record in the schema, less the row count that the footer holds
    text = json.dumps({k: v for k, v in record.items() if k != "rows"})
    target = Path(out_dir) / part.output
    with TableWriter(target, format="parquet", metadata={RECORD_KEY.decode(): text}) as writer:
        record["rows"] = predictor.write_predictions(batches, writer, part.source)
        if _stat(part.source) != stat:  # raised inside: the output is not written
            raise DataError(f"{part.source}: changed while it was being read")
    return record


def clean_temporaries(parts: Sequence[Partition], out_dir: str | os.PathLike[str]) -> None:
    """Remove temporary files that killed tasks left behind for these partitions."""
    for part in parts:
        for tmp in Path(out_dir).glob(f".{glob.escape(part.output)}.*.tmp"):
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()


def model_sha256(predictor: PartitionPredictor) -> str:
    """sha256 of the ONNX file, folded with its external-data files' when it has any."""
    from onnx.external_data_helper import uses_external_data

    from normexport.onnxkit import load_onnx

    digest = files.sha256_file(predictor.path)
    graph = load_onnx(predictor.path, with_weights=False).graph
    external = sorted(
        {
            entry.value
            for tensor in graph.initializer
            if uses_external_data(tensor)
            for entry in tensor.external_data
            if entry.key == "location"
        }
    )
    if not external:
        return digest
    folded = hashlib.sha256(digest.encode())
    for name in external:
        folded.update(f"\n{name}:{files.sha256_file(Path(predictor.path).parent / name)}".encode())
    return folded.hexdigest()


def manifest(
    predictor: PartitionPredictor, model_sha: str, records: Sequence[dict[str, Any]]
) -> dict[str, Any]:
    """The completion manifest (format ``normexport.predictions/1``); records in input order."""
    return {
        "format": MANIFEST_FORMAT,
        "normexport": __version__,
        "model": {"path": predictor.path, "sha256": model_sha, "dtype": predictor.dtype},
        "inputs": list(predictor.inputs),
        "targets": list(predictor.targets),
        "keep": list(predictor.keep),
        "rows": sum(r["rows"] for r in records),
        "partitions": [
            {k: r[k] for k in ("input", "fingerprint", "output", "rows")} for r in records
        ],
    }


def write_manifest(out_dir: str | os.PathLike[str], document: dict[str, Any]) -> None:
    files.write_json(Path(out_dir) / MANIFEST_FILE, document)


# ------------------------------------------------------------------ helpers


def _suffix(path: Path) -> str | None:
    name = path.name.lower()
    return next((s for s in _SUFFIXES if name.endswith(s) and len(name) > len(s)), None)


def _partition(path: Path) -> Partition:
    suffix = _suffix(path) or ""
    return Partition(str(path.resolve()), path.name[: -len(suffix)] + ".parquet", _SUFFIXES[suffix])


def _natural(text: str) -> list[Any]:
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", text)]


def _stat(path: str) -> dict[str, int]:
    try:
        stat = os.stat(path)
    except OSError as exc:
        raise NormexportError(f"{path}: {exc.strerror}") from exc
    return {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
