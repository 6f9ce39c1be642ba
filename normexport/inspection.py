"""Describe a model directory or an ONNX file: interface, ops, scalers, manifest."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from normexport import files
from normexport.errors import NormexportError
from normexport.modeldir import (
    ONNX_FILE,
    SCALERS_FILE,
    is_model_directory,
    read_manifest,
)
from normexport.onnxkit import summarize


def inspect(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A JSON-ready summary of a model directory or an ONNX file."""
    path = Path(path)
    if not path.exists():
        raise NormexportError(f"{path}: no such file or directory")
    summary: dict[str, Any] = {"path": str(path)}
    if path.is_dir():
        if not is_model_directory(path):
            raise NormexportError(f"{path}: not a normexport model directory")
        manifest = read_manifest(path)
        if manifest:
            summary["manifest"] = {k: v for k, v in manifest.items() if k != "training"}
            training = manifest.get("training")
            if training:
                summary["training"] = {k: v for k, v in training.items() if k != "history"}
        if (path / SCALERS_FILE).is_file():
            summary["scalers"] = files.read_json(path / SCALERS_FILE)
        if (path / ONNX_FILE).is_file():
            summary["onnx"] = summarize(path / ONNX_FILE)
    else:
        summary["onnx"] = summarize(path)
        if "scalers" in summary["onnx"]:
            summary["scalers"] = summary["onnx"].pop("scalers")
    return summary


def format_inspection(summary: dict[str, Any]) -> str:
    lines = [f"{summary['path']}"]
    onnx_info = summary.get("onnx")
    if onnx_info:
        lines.append(
            f"ONNX: opset {onnx_info['opset']}, IR {onnx_info['ir_version']}, producer "
            f"{onnx_info['producer']}, graph {onnx_info['graph']!r}"
        )
        for kind in ("inputs", "outputs"):
            for value in onnx_info[kind]:
                lines.append(f"  {kind[:-1]:<7} {value['name']} {value['type']} {value['shape']}")
        ops = ", ".join(f"{op}×{n}" for op, n in onnx_info["ops"].items())
        lines.append(f"  ops     {ops}")
        lines.append(
            f"  weights {onnx_info['parameters']} values in {onnx_info['initializers']} "
            "initializers"
        )
        for key, value in onnx_info["metadata"].items():
            lines.append(f"  meta    {key} = {value}")
    manifest = summary.get("manifest")
    if manifest and "mode" in manifest:
        lines.append(
            f"manifest: mode {manifest['mode']}, fold {manifest.get('fold')}, "
            f"verification {'PASS' if manifest['verification']['ok'] else 'FAIL'}"
        )
    training = summary.get("training")
    if training:
        kind = "hold-out" if "holdout_rmse" in training else "training"
        values = training.get("holdout_rmse", training.get("training_rmse", {}))
        rmse = ", ".join(f"{k} {v:.4g}" for k, v in values.items())
        lines.append(
            f"training: best epoch {training['best_epoch']} of "
            f"{training['epochs_run']}, {kind} RMSE {rmse}"
        )
    scalers = summary.get("scalers")
    if scalers:
        lines.append(
            f"scalers ({scalers['dtype']}), in the factors file's directions: inputs "
            "x_norm = x * scale + shift, outputs y = y_norm * scale + shift"
        )
        if any(scalers[side].get("transform") for side in ("inputs", "outputs")):
            lines.append(
                "  (a transformed column is scaled after its transform, x_norm = "
                "log(x) * scale + shift, and de-normalized by its inverse, y = exp(...))"
            )
        for side in ("inputs", "outputs"):
            doc = scalers[side]
            # outputs: the de-normalizing factors, which the graph and a factors file hold
            keys = ("scale", "shift") if side == "inputs" else ("inverse_scale", "inverse_shift")
            transform = doc.get("transform", {})
            for i, name in enumerate(doc["columns"]):
                stats = ""
                if doc["kind"] == "minmax":
                    stats = f"range [{doc['data_min'][i]:.6g}, {doc['data_max'][i]:.6g}]"
                elif doc["kind"] == "standard":
                    stats = f"mean {doc['mean'][i]:.6g} std {doc['std'][i]:.6g}"
                lines.append(
                    f"  {side[:-1]:<6} {name:<12} {doc['kind']:<8} {transform.get(name, ''):<6}"
                    f"{stats:<34} scale {doc[keys[0]][i]:.6g} shift {doc[keys[1]][i]:.6g}"
                )
    return "\n".join(lines)
