"""The order of the stages, and the model directory as a unit.

train → (scalers.json, net-*) → splice or fold → model-* → model.onnx → verify →
manifest.json. A directory is written in a staging directory beside it and swapped
into place only when complete (manifest last), so a crash or a kill leaves either the
previous complete directory or the new one.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import platform
import shutil
import sys
from collections.abc import Callable, Iterator, Sequence
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import numpy as np

from normexport import __version__, io
from normexport.errors import DataError, GraphError, NormexportError, VerificationError
from normexport.scaling import (
    AffineScaler,
    MinMaxScaler,
    StandardScaler,
    scalers_from_dict,
    scalers_to_dict,
)

MANIFEST_FORMAT = "normexport.manifest/1"
MODES = ("splice", "fold")
_STAGING, _OLD = ".staging-", ".old-"


# --------------------------------------------------------------------------- public API


def export(
    model: Any,
    in_scaler: AffineScaler,
    out_scaler: AffineScaler,
    out_dir: str | os.PathLike[str],
    *,
    mode: str = "splice",
    opset: int = 13,
    verify_rows: np.ndarray | None = None,
    training: dict[str, Any] | None = None,
) -> Path:
    """Write a complete model directory for ``model`` with the scalers baked in.

    ``model`` is a hybridized Gluon block that has run forward once, a checkpoint
    prefix (``"path/net"`` for ``net-symbol.json`` + ``net-0000.params``), or a
    ``(symbol, arg_params, aux_params)`` tuple. The directory gets ``scalers.json``,
    ``net-*`` (the plain network), ``model-*`` (raw in, raw out), ``model.onnx`` and
    ``manifest.json``; the export is verified (on ``verify_rows`` if given, else on
    random rows over the training range) before it is swapped into place, and a
    failing verification raises :class:`~normexport.errors.VerificationError`
    leaving any previous directory untouched.
    """
    return _export(
        lambda: _as_checkpoint(model),
        in_scaler,
        out_scaler,
        Path(out_dir),
        mode=mode,
        opset=opset,
        verify_rows=verify_rows,
        training=training,
        write_net=True,
    )


def _export(
    load: Callable[[], Any],
    in_scaler: AffineScaler,
    out_scaler: AffineScaler,
    out_dir: Path,
    *,
    mode: str,
    opset: int,
    verify_rows: np.ndarray | None,
    training: dict[str, Any] | None,
    write_net: bool,
) -> Path:
    """:func:`export` with the checkpoint loaded by ``load`` (so that only this function
    holds it and can release it before verification). ``write_net=False`` keeps the
    directory's own ``net-*`` (re-exporting a trained directory need not rewrite it)."""
    from normexport import graph
    from normexport.to_onnx import check, check_opset
    from normexport.verification import verify_directory

    if mode not in MODES:
        raise DataError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    check_opset(opset)
    checkpoint = load()
    info = graph.describe(checkpoint, in_scaler.n_features_in_)
    if info.n_outputs != out_scaler.n_features_in_:
        raise GraphError(
            f"the network has {info.n_outputs} outputs, but the output scaler has "
            f"{out_scaler.n_features_in_} columns ({', '.join(out_scaler.columns_)})"
        )
    out_scaler.check_target()
    scalers = scalers_to_dict(in_scaler, out_scaler, info.dtype)
    with model_directory(out_dir) as stage, _stages(4) as step:
        step(f"{mode}: MXNet model and ONNX conversion")
        fold = _write_model_files(
            stage, checkpoint, scalers, in_scaler, out_scaler, info, mode, opset, write_net
        )
        # The checker and the runtimes load the model again: drop our copy first.
        del checkpoint
        step("onnx.checker (full check)")
        check(stage / io.ONNX_FILE)
        step("verification")
        report = verify_directory(stage, verify_rows)
        step("manifest")
        _write_manifest(
            stage,
            {
                "mode": mode,
                "fold": fold,
                "opset": opset,
                "dtype": info.dtype,
                "inputs": list(in_scaler.columns_),
                "outputs": list(out_scaler.columns_),
                "training": training,
                "verification": report.summary(),
            },
        )
        if not report.ok:
            raise VerificationError(
                "verification failed; the export was not written\n" + report.table()
            )
    return out_dir


def verify(
    model_dir: str | os.PathLike[str],
    X: Any = None,
    *,
    rows: int | None = None,
    rtol: float | None = None,
) -> Any:
    """Verify a model directory; returns a :class:`~normexport.verification.VerificationReport`."""
    from normexport.verification import verify_directory

    return verify_directory(model_dir, None if X is None else np.asarray(X), rows=rows, rtol=rtol)


def export_directory(
    model_dir: str | os.PathLike[str], *, mode: str = "splice", opset: int = 13
) -> Path:
    """Re-export a directory written by :func:`train_to_directory` (``normexport export DIR``)."""
    model_dir = Path(model_dir)
    repair(model_dir)  # a killed swap may have left DIR aside as .DIR.old-PID
    if model_dir.exists() and not model_dir.is_dir():
        raise NormexportError(
            f"{model_dir}: not a directory; give the model directory `normexport train` wrote"
        )
    in_scaler, out_scaler, _ = load_scalers(model_dir / io.SCALERS_FILE)
    manifest = _read_manifest(model_dir)
    return _export(
        lambda: _as_checkpoint(str(model_dir / io.NET_PREFIX)),
        in_scaler,
        out_scaler,
        model_dir,
        mode=mode,
        opset=opset,
        verify_rows=None,
        training=manifest.get("training") if manifest else None,
        write_net=False,
    )


def train_to_directory(
    data_csv: str | os.PathLike[str],
    inputs: Sequence[str],
    targets: Sequence[str],
    out_dir: str | os.PathLike[str],
    *,
    scaler: str = "minmax",
    **train_options: Any,
) -> Any:
    """Load a CSV, fit scalers, train, and write ``scalers.json``, ``net-*``, plots and a
    training manifest into ``out_dir``. Returns the :class:`~normexport.training.TrainResult`."""
    from normexport import checkpoint as ckpt
    from normexport import graph, plots
    from normexport.training import train

    _check_columns(inputs, targets)
    X, Y = io.load_table(data_csv, [inputs, targets])
    scaler_cls = {"minmax": MinMaxScaler, "standard": StandardScaler}.get(scaler)
    if scaler_cls is None:
        raise DataError(f"scaler must be minmax or standard, got {scaler!r}")
    in_scaler = scaler_cls().fit(X, columns=inputs)
    try:
        out_scaler = scaler_cls().fit(Y, columns=targets, target=True)
    except DataError as exc:
        raise DataError(f"{data_csv}: {exc}") from exc
    result = train(X, Y, in_scaler=in_scaler, out_scaler=out_scaler, **train_options)
    net_checkpoint = graph.from_block(result.net)
    dtype = result.settings["dtype"]
    with model_directory(out_dir, keep=False) as stage:
        io.write_json(stage / io.SCALERS_FILE, scalers_to_dict(in_scaler, out_scaler, dtype))
        ckpt.save_checkpoint(net_checkpoint, stage, io.NET_PREFIX)
        (stage / io.REPORT_DIR).mkdir(exist_ok=True)
        plots.loss_curves(result.history, result.best_epoch, stage / io.REPORT_DIR / "loss.png")
        assert result.holdout_true is not None and result.holdout_pred is not None
        plots.parity(
            result.holdout_true,
            result.holdout_pred,
            list(targets),
            stage / io.REPORT_DIR / "parity.png",
            rows=result.rmse_on,
        )
        summary = result.summary()
        summary["data"] = str(data_csv)
        summary["report"] = [f"{io.REPORT_DIR}/loss.png", f"{io.REPORT_DIR}/parity.png"]
        _write_manifest(stage, {"dtype": dtype, "training": summary})
    return result


def load_scalers(path: str | os.PathLike[str]) -> tuple[AffineScaler, AffineScaler, str]:
    return scalers_from_dict(io.read_json(path), str(path))


# --------------------------------------------------------------------------- stages


def _as_checkpoint(model: Any) -> Any:
    from normexport import checkpoint as ckpt
    from normexport import graph

    if isinstance(model, (str, os.PathLike)):
        prefix = str(model)
        return ckpt.load_checkpoint(f"{prefix}-symbol.json", f"{prefix}-0000.params")
    if isinstance(model, tuple) and len(model) == 3:
        return graph.Checkpoint(*model)
    if hasattr(model, "collect_params"):
        return graph.from_block(model)
    raise DataError(
        "model must be a Gluon HybridBlock, a checkpoint prefix, or "
        f"(symbol, arg_params, aux_params); got {type(model).__name__}"
    )


def _write_model_files(
    stage: Path,
    checkpoint: Any,
    scalers: dict[str, Any],
    in_scaler: AffineScaler,
    out_scaler: AffineScaler,
    info: Any,
    mode: str,
    opset: int,
    write_net: bool,
) -> dict[str, str]:
    """scalers.json, net-*, model-* and model.onnx; returns the fold plan."""
    from normexport import checkpoint as ckpt
    from normexport import graph, to_onnx

    in_affine, out_affine = in_scaler.affine(), out_scaler.inverse_affine()
    if mode == "fold":
        model, plan = graph.fold(checkpoint, in_affine, out_affine)
        fold = plan.to_dict()
    else:
        model = graph.splice(checkpoint, in_affine, out_affine)
        fold = {"input": "spliced", "output": "spliced"}
    io.write_json(stage / io.SCALERS_FILE, scalers)
    if write_net:
        ckpt.save_checkpoint(checkpoint, stage, io.NET_PREFIX)
    ckpt.save_checkpoint(model, stage, io.MODEL_PREFIX)
    for stale in stage.glob(io.ONNX_FILE + "*"):
        stale.unlink()
    to_onnx.convert(
        model,
        stage / io.ONNX_FILE,
        n_inputs=info.n_inputs,
        n_outputs=info.n_outputs,
        dtype=info.dtype,
        opset=opset,
        metadata=to_onnx.metadata_entries(mode, scalers, fold),
        run_checker=False,  # _export runs it once the checkpoint is released
    )
    return fold


def _write_manifest(stage: Path, fields: dict[str, Any]) -> None:
    files = {}
    nested = {d.name for d in stage.iterdir() if _is_model_directory(d)}
    for path in sorted(p for p in stage.rglob("*") if p.is_file()):
        rel = path.relative_to(stage).as_posix()
        if rel != io.MANIFEST_FILE and rel.split("/")[0] not in nested:
            files[rel] = {"sha256": io.sha256_file(path), "bytes": path.stat().st_size}
    manifest = {
        "format": MANIFEST_FORMAT,
        "normexport_version": __version__,
        "versions": _versions(),
        **fields,
        "files": files,
    }
    io.write_json(stage / io.MANIFEST_FILE, manifest)


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in ("mxnet", "numpy", "onnx", "onnxruntime"):
        with contextlib.suppress(importlib_metadata.PackageNotFoundError):
            versions[package] = importlib_metadata.version(package)
    return versions


def _read_manifest(model_dir: Path) -> dict[str, Any] | None:
    path = model_dir / io.MANIFEST_FILE
    return io.read_json(path, MANIFEST_FORMAT) if path.is_file() else None


def _check_columns(inputs: Sequence[str], targets: Sequence[str]) -> None:
    if not inputs or not targets:
        raise DataError("give at least one input column and one target column")
    both = set(inputs) & set(targets)
    if both:
        raise DataError(f"column {sorted(both)[0]!r} is both an input and a target")
    for group in (inputs, targets):
        if len(set(group)) != len(group):
            raise DataError(f"duplicate column in {', '.join(group)}")


@contextlib.contextmanager
def _stages(total: int) -> Iterator[Callable[[str], None]]:
    """A progress bar over named stages (stderr, only on a terminal)."""
    import sys

    from tqdm.auto import tqdm

    bar = tqdm(
        total=total,
        desc="export",
        unit="stage",
        file=sys.stderr,
        disable=not sys.stderr.isatty(),
        bar_format="{desc} [{n}/{total}]",
    )
    started = False

    def step(name: str) -> None:
        nonlocal started
        if started:
            bar.update(1)
        started = True
        bar.set_description_str(f"export: {name}")

    try:
        yield step
        bar.update(1)
    finally:
        bar.close()


# --------------------------------------------------------------------------- the directory


@contextlib.contextmanager
def model_directory(out_dir: str | os.PathLike[str], *, keep: bool = True) -> Iterator[Path]:
    """Stage a model directory beside ``out_dir`` and swap it in when the block succeeds.

    With ``keep``, the stage starts as a copy of the existing directory (an export keeps
    the training files). A failure removes the stage and leaves ``out_dir`` as it was.
    """
    target = Path(out_dir)
    repair(target)
    if target.exists() and not target.is_dir():
        raise NormexportError(f"{target}: exists and is not a directory")
    if target.is_dir() and any(target.iterdir()) and not _is_model_directory(target):
        raise NormexportError(
            f"{target}: exists and is not a normexport model directory; choose another --out"
        )
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise NormexportError(f"{target.parent}: cannot create ({exc.strerror})") from exc
    stage = target.parent / f".{target.name}{_STAGING}{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    try:
        if keep and target.is_dir():
            shutil.copytree(target, stage, copy_function=_link_or_copy)
            (stage / io.MANIFEST_FILE).unlink(missing_ok=True)
        else:
            stage.mkdir()
    except OSError as exc:
        shutil.rmtree(stage, ignore_errors=True)
        raise NormexportError(f"{target.parent}: cannot write here ({exc.strerror})") from exc
    try:
        yield stage
        _swap_in(stage, target)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _link_or_copy(src: str, dst: str) -> None:
    # Files are replaced (never modified in place), so a hard link is a safe, free copy.
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one step (Linux ``renameat2(RENAME_EXCHANGE)``).

    Returns False where the call or the flag is unsupported (other systems, some
    file systems), so the caller falls back to two renames.
    """
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _swap_in(stage: Path, target: Path) -> None:
    # One atomic exchange where possible: DIR is the old or the new directory at every
    # instant, never absent; the stage path then holds the old one and is removed.
    if target.is_dir() and _exchange(stage, target):
        shutil.rmtree(stage, ignore_errors=True)
        return
    old = target.parent / f".{target.name}{_OLD}{os.getpid()}"
    if target.exists():
        os.replace(target, old)
    os.replace(stage, target)
    shutil.rmtree(old, ignore_errors=True)


def _is_model_directory(path: Path) -> bool:
    return path.is_dir() and (
        (path / io.MANIFEST_FILE).is_file() or (path / io.SCALERS_FILE).is_file()
    )


def repair(target: Path) -> None:
    """Finish or undo what an interrupted run left beside ``target``.

    Stages are incomplete by definition and are removed. An ``.old-`` directory is the
    previous complete one: if ``target`` is missing (killed between the two renames) it
    is put back, otherwise it is removed.
    """
    parent = target.parent
    if not parent.is_dir():
        return
    for leftover in sorted(parent.glob(f".{target.name}{_STAGING}*")):
        shutil.rmtree(leftover, ignore_errors=True)
    for old in sorted(parent.glob(f".{target.name}{_OLD}*")):
        if not target.exists() and (old / io.MANIFEST_FILE).is_file():
            os.replace(old, target)
        else:
            shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------- CLI helpers


def export_files(
    symbol: str | os.PathLike[str],
    params: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    scalers: str | os.PathLike[str] | None = None,
    factors: str | os.PathLike[str] | None = None,
    mode: str = "splice",
    opset: int = 13,
) -> Path:
    """Export a checkpoint trained elsewhere, with a ``scalers.json`` or a factors file."""
    from normexport import checkpoint as ckpt
    from normexport import graph
    from normexport.scaling import factors_to_scalers

    if (scalers is None) == (factors is None):
        raise DataError("give exactly one of scalers or factors")
    model = ckpt.load_checkpoint(symbol, params)
    if scalers is not None:
        in_scaler, out_scaler, dtype = load_scalers(scalers)
        try:
            info = graph.describe(model, in_scaler.n_features_in_)
        except GraphError as exc:
            raise GraphError(f"{exc} (input columns from {scalers})") from exc
        if info.n_outputs != out_scaler.n_features_in_:
            raise GraphError(
                f"{scalers}: 'outputs' has {out_scaler.n_features_in_} columns "
                f"({', '.join(out_scaler.columns_)}), but the network has "
                f"{info.n_outputs} outputs"
            )
        net_dtype = info.dtype
        if dtype != net_dtype:
            raise GraphError(
                f"{scalers}: dtype is {dtype}, but the network's parameters in {params} are "
                f"{net_dtype}"
            )
    else:
        assert factors is not None
        rows = io.load_factors(factors)
        info = graph.widths_from_total(model, len(rows))
        in_scaler, out_scaler = factors_to_scalers(
            rows, info.n_inputs, info.n_outputs, str(factors)
        )
    return export(model, in_scaler, out_scaler, out_dir, mode=mode, opset=opset)


def describe_directory(model_dir: str | os.PathLike[str]) -> str:
    """A few lines for the terminal: mode, verification, files and sizes."""
    model_dir = Path(model_dir)
    manifest = _read_manifest(model_dir) or {}
    lines = [f"model directory {model_dir}/"]
    if "mode" in manifest:
        fold = manifest.get("fold") or {}
        sides = ", ".join(f"{k} {v}" for k, v in fold.items() if not k.endswith("_reason"))
        lines.append(
            f"  mode {manifest['mode']} ({sides}), opset {manifest.get('opset')}, "
            f"{manifest.get('dtype')}"
        )
        for side in ("input", "output"):
            reason = fold.get(f"{side}_reason")
            if reason:
                lines.append(f"  {side} side spliced, not folded: {reason}")
    check = manifest.get("verification")
    if check:
        lines.append(
            f"  verified on {check['rows']} rows with {', '.join(check['runtimes'])}: "
            f"max range-relative error {check['max_rel_error']:.3g} "
            f"(tolerance {check['rtol']:g}) {'PASS' if check['ok'] else 'FAIL'}"
        )
    for name, entry in sorted(manifest.get("files", {}).items()):
        lines.append(f"  {name:<24} {_human(entry['bytes']):>10}")
    return "\n".join(lines)


def _human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


def _model_scalers(path: Path) -> tuple[AffineScaler, AffineScaler, str]:
    """Scalers of a model directory (``scalers.json``) or ONNX file (its metadata)."""
    if path.is_dir():
        return load_scalers(path / io.SCALERS_FILE)
    from normexport.to_onnx import load_onnx, read_metadata

    meta = read_metadata(load_onnx(path, with_weights=False))
    if "normexport.scalers" not in meta:
        raise NormexportError(f"{path}: has no normexport.scalers metadata; bake it first")
    import json

    try:
        doc = json.loads(meta["normexport.scalers"])
    except json.JSONDecodeError as exc:
        raise NormexportError(
            f"{path}: metadata normexport.scalers is not valid JSON ({exc})"
        ) from exc
    return scalers_from_dict(doc, f"{path}: metadata normexport.scalers")


def load_input_rows(model: str | os.PathLike[str], data_csv: str | os.PathLike[str]) -> np.ndarray:
    in_scaler, _, _ = _model_scalers(Path(model))
    return io.load_columns(data_csv, in_scaler.columns_)


def predict_csv(
    model: str | os.PathLike[str], data_csv: str | os.PathLike[str], out_csv: str | None
) -> np.ndarray:
    """Run ``model.onnx`` on the CSV's input columns; write the target columns by name."""
    import sys

    from normexport.verification import CHUNK_ROWS, onnxruntime_runtime

    path = Path(model)
    onnx_path = path / io.ONNX_FILE if path.is_dir() else path
    if not onnx_path.is_file():
        raise NormexportError(f"{onnx_path}: no such file")
    in_scaler, out_scaler, dtype = _model_scalers(path)
    X = io.load_columns(data_csv, in_scaler.columns_)
    run = onnxruntime_runtime(onnx_path)
    Y = np.concatenate(
        [run(X[i : i + CHUNK_ROWS].astype(dtype)) for i in range(0, X.shape[0], CHUNK_ROWS)]
    )
    if out_csv:
        io.write_csv(out_csv, out_scaler.columns_, Y)
    else:
        import csv

        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(out_scaler.columns_)
        writer.writerows([repr(v) for v in row] for row in Y.tolist())
    return Y


def inspect(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A JSON-ready summary of a model directory or an ONNX file."""
    from normexport.to_onnx import summarize

    path = Path(path)
    if not path.exists():
        raise NormexportError(f"{path}: no such file or directory")
    summary: dict[str, Any] = {"path": str(path)}
    if path.is_dir():
        if not _is_model_directory(path):
            raise NormexportError(f"{path}: not a normexport model directory")
        manifest = _read_manifest(path)
        if manifest:
            summary["manifest"] = {k: v for k, v in manifest.items() if k != "training"}
            training = manifest.get("training")
            if training:
                summary["training"] = {k: v for k, v in training.items() if k != "history"}
        if (path / io.SCALERS_FILE).is_file():
            summary["scalers"] = io.read_json(path / io.SCALERS_FILE)
        if (path / io.ONNX_FILE).is_file():
            summary["onnx"] = summarize(path / io.ONNX_FILE)
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
        lines.append(f"scalers ({scalers['dtype']}):")
        for side in ("inputs", "outputs"):
            doc = scalers[side]
            for i, name in enumerate(doc["columns"]):
                stats = ""
                if doc["kind"] == "minmax":
                    stats = f"range [{doc['data_min'][i]:.6g}, {doc['data_max'][i]:.6g}]"
                elif doc["kind"] == "standard":
                    stats = f"mean {doc['mean'][i]:.6g} std {doc['std'][i]:.6g}"
                lines.append(
                    f"  {side[:-1]:<6} {name:<12} {doc['kind']:<8} {stats:<34} "
                    f"scale {doc['scale'][i]:.6g} shift {doc['shift'][i]:.6g}"
                )
    return "\n".join(lines)
