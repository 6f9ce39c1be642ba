"""Run an exported model on a table: raw input columns in, raw target columns out.

The table streams: each record batch is read, run through the model and written before
the next is read, so memory is bounded by the batch whatever the row count. The model
runs through the same :class:`~normexport.partition.PartitionPredictor` that the Dask
engine ships to its workers, so one process and a cluster give the same numbers.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

from normexport import tables
from normexport.partition import partition_predictor


def predict(
    model: str | os.PathLike[str],
    data: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    *,
    keep: Sequence[str] = (),
    batch_rows: int = tables.DEFAULT_BATCH_ROWS,
    delimiter: str | None = None,
    allow_missing: bool = False,
    progress: bool | None = None,
) -> int:
    """Predict every row of ``data`` into ``out`` (CSV or Parquet by extension; CSV on
    standard output when ``out`` is None); returns the number of rows.

    ``keep`` copies those input columns to the output, in order, ahead of the targets;
    rows keep the input's order. The output file appears only when complete.
    """
    predictor = partition_predictor(model, keep, batch_rows=batch_rows, threads=os.cpu_count() or 1)
    batches = predictor.read_batches(
        data, batch_rows=batch_rows, delimiter=delimiter, allow_missing=allow_missing
    )
    with tables.TableWriter(out) as writer, _progress(progress) as bar:
        return predictor.write_predictions(batches, writer, str(data), bar.update)


def _progress(enabled: bool | None) -> Any:
    """A rows/s progress bar on stderr, shown only on a terminal unless asked for."""
    from tqdm.auto import tqdm

    show = sys.stderr.isatty() if enabled is None else enabled
    return tqdm(desc="predict", unit=" rows", unit_scale=True, file=sys.stderr, disable=not show)
