"""Run an exported model on a table: raw input columns in, raw target columns out."""

from __future__ import annotations

import csv
import os
import sys
from pathlib import Path

import numpy as np

from normexport import tables
from normexport.errors import NormexportError
from normexport.modeldir import ONNX_FILE, model_scalers
from normexport.runtimes import onnxruntime_runtime
from normexport.verification import CHUNK_ROWS


def load_input_rows(model: str | os.PathLike[str], data_csv: str | os.PathLike[str]) -> np.ndarray:
    in_scaler, _, _ = model_scalers(Path(model))
    return tables.load_columns(data_csv, in_scaler.columns_)


def predict_csv(
    model: str | os.PathLike[str], data_csv: str | os.PathLike[str], out_csv: str | None
) -> np.ndarray:
    """Run ``model.onnx`` on the CSV's input columns; write the target columns by name."""
    path = Path(model)
    onnx_path = path / ONNX_FILE if path.is_dir() else path
    if not onnx_path.is_file():
        raise NormexportError(f"{onnx_path}: no such file")
    in_scaler, out_scaler, dtype = model_scalers(path)
    X = tables.load_columns(data_csv, in_scaler.columns_)
    run = onnxruntime_runtime(onnx_path)
    Y = np.concatenate(
        [run(X[i : i + CHUNK_ROWS].astype(dtype)) for i in range(0, X.shape[0], CHUNK_ROWS)]
    )
    if out_csv:
        tables.write_table(out_csv, out_scaler.columns_, Y)
    else:
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(out_scaler.columns_)
        writer.writerows([repr(v) for v in row] for row in Y.tolist())
    return Y
