"""Export and train to a model directory: the only code that knows the order of the stages.

train → (scalers.json, net-*) → splice or fold → model-* → model.onnx → verify →
manifest.json. A directory is written in a staging directory beside it and swapped
into place only when complete (manifest last), so a crash or a kill leaves either the
previous complete directory or the new one.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from normexport import files, tables, transforms
from normexport.affine import SPLICED, load_factors
from normexport.errors import (
    DataError,
    GraphError,
    NormexportError,
    VerificationError,
    first_line,
)
from normexport.modeldir import (
    MODEL_PREFIX,
    NET_PREFIX,
    ONNX_FILE,
    REPORT_DIR,
    SCALERS_FILE,
    carry_over,
    is_model_directory,
    load_scalers,
    model_directory,
    read_manifest,
    repair,
    write_manifest,
)
from normexport.mx import checkpoint as ckpt
from normexport.mx import graph, plots
from normexport.mx.exporter import check, check_opset, convert
from normexport.mx.gluon import Normalized
from normexport.mx.training import train
from normexport.onnxkit import metadata_entries
from normexport.scaling import (
    AffineScaler,
    MinMaxScaler,
    StandardScaler,
    factors_to_scalers,
    scalers_to_dict,
)
from normexport.verification import verify_directory

MODES = ("splice", "fold")


# --------------------------------------------------------------------------- public API


def export(
    model: Any,
    in_scaler: AffineScaler | str | os.PathLike[str] | None = None,
    out_scaler: AffineScaler | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    *,
    mode: str = "splice",
    opset: int = 13,
    rtol: float | None = None,
    force: bool = False,
    strict: bool = False,
    verify_rows: np.ndarray | None = None,
    verify_data: str | os.PathLike[str] | None = None,
    training: dict[str, Any] | None = None,
) -> Path:
    """Write a complete model directory for ``model`` with the scalers baked in.

    ``model`` is a hybridized Gluon block that has run forward once, a checkpoint
    prefix (``"path/net"`` for ``net-symbol.json`` + ``net-0000.params``), or a
    ``(symbol, arg_params, aux_params)`` tuple. The directory gets ``scalers.json``,
    ``net-*`` (the plain network), ``model-*`` (raw in, raw out), ``model.onnx`` and
    ``manifest.json``; the export is verified (on ``verify_rows``, or on the input
    columns of the table ``verify_data``, streamed, if given; else on random rows over
    the training range) before it is swapped into place, and a
    failing verification raises :class:`~normexport.errors.VerificationError`
    leaving any previous directory untouched. A :class:`normexport.gluon.Normalized`
    block carries its scalers: ``export(block, out_dir)``.

    ``rtol`` sets the verification tolerance on range-relative error (default: 1e-5 in
    float32, measured against a float64 evaluation, and 1e-12 in float64; a float32
    network whose own rounding exceeds that gets a looser one, with a warning).
    ``out_dir`` may hold an earlier export of the same network (same symbol, parameters
    and columns), which is replaced; a different network there is an error unless
    ``force``. Sanity warnings (constant output, inputs normalizing far outside the
    usual range: see :func:`normexport.verification.sanity_warnings`) are issued as
    ``UserWarning``; ``strict`` makes them errors.
    """
    if isinstance(model, Normalized):
        if out_dir is None and out_scaler is None and isinstance(in_scaler, (str, os.PathLike)):
            in_scaler, out_dir = None, in_scaler
        if in_scaler is not None or out_scaler is not None:
            raise DataError("a Normalized block carries its scalers: export(block, out_dir)")
        model, in_scaler, out_scaler = model.checkpoint(), model.in_scaler, model.out_scaler
    if out_dir is None:
        raise DataError("out_dir is missing: export(model, in_scaler, out_scaler, out_dir)")
    in_scaler = _fitted_scaler("in_scaler", in_scaler)
    out_scaler = _fitted_scaler("out_scaler", out_scaler)
    return _export(
        functools.partial(_as_checkpoint, model),
        in_scaler,
        out_scaler,
        Path(out_dir),
        mode=mode,
        opset=opset,
        rtol=rtol,
        force=force,
        strict=strict,
        verify_rows=verify_rows,
        verify_data=verify_data,
        training=training,
        write_net=True,
    )


def _fitted_scaler(name: str, scaler: Any) -> AffineScaler:
    if not isinstance(scaler, AffineScaler):
        raise DataError(f"{name} must be a normexport scaler, got {type(scaler).__name__}")
    if not scaler.is_fitted:
        raise DataError(f"{name} ({type(scaler).__name__}) is not fitted; call fit(X) first")
    return scaler


def _export(
    load: Callable[[], Any],
    in_scaler: AffineScaler,
    out_scaler: AffineScaler,
    out_dir: Path,
    *,
    mode: str,
    opset: int,
    rtol: float | None,
    force: bool,
    strict: bool,
    verify_rows: np.ndarray | None,
    training: dict[str, Any] | None,
    write_net: bool,
    verify_data: str | os.PathLike[str] | None = None,
) -> Path:
    """:func:`export` with the checkpoint loaded by ``load`` (so that only this function
    holds it and can release it before the checker and verification: a checkpoint the
    caller still holds stays in memory beside them). ``write_net=False`` keeps the
    directory's own ``net-*`` (re-exporting a trained directory need not rewrite it)."""
    if mode not in MODES:
        raise DataError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if rtol is not None and not (0 < rtol < 1):
        raise DataError(f"rtol must be in (0, 1), got {rtol}")
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
    keep = [] if write_net else [f"{NET_PREFIX}-symbol.json", f"{NET_PREFIX}-0000.params"]
    with (
        model_directory(out_dir, keep=keep) as stage,
        _named_as(stage, out_dir),
        _stages(4) as step,
    ):
        step(f"{mode}: MXNet model and ONNX conversion")
        files.write_json(stage / SCALERS_FILE, scalers)
        if write_net:
            ckpt.save_checkpoint(checkpoint, stage, NET_PREFIX)
        previous = _previous_export(out_dir, stage, force)
        if previous is not None:
            training = training or previous.get("training")
        fold = _write_model_files(stage, checkpoint, in_scaler, out_scaler, info, mode, opset)
        # The checker and the runtimes load the model again: drop our copy first.
        del checkpoint
        step("onnx.checker (full check)")
        check(stage / ONNX_FILE)
        step("verification")
        report = verify_directory(stage, verify_rows, data=verify_data, rtol=rtol)
        step("manifest")
        write_manifest(
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
        if strict and report.warnings:
            raise DataError(f"--strict: {report.warnings[0]}; the export was not written")
        for line in ([report.loosened] if report.loosened else []) + report.warnings:
            warnings.warn(f"{out_dir}: {line}", UserWarning, stacklevel=3)
    return out_dir


@contextlib.contextmanager
def _named_as(stage: Path, out_dir: Path) -> Iterator[None]:
    """Errors name the directory being written, not its hidden staging directory."""
    try:
        yield
    except NormexportError as exc:
        message = str(exc)
        if str(stage) not in message:
            raise
        renamed = type(exc)(message.replace(str(stage), str(out_dir)))
        raise renamed.with_traceback(exc.__traceback__) from exc


def _previous_export(out_dir: Path, stage: Path, force: bool) -> dict[str, Any] | None:
    """What an earlier export of the same network in ``out_dir`` leaves to this one.

    Same network (symbol, parameters and columns, compared with the new ``net-*`` and
    ``scalers.json`` in ``stage``): its training report is carried over and its manifest
    returned. A different one is refused unless ``force`` (then nothing of it is kept).
    No model directory there: None.
    """
    if not is_model_directory(out_dir):
        return None
    difference = _difference(out_dir, stage)
    if difference:
        if not force:
            raise DataError(
                f"{out_dir}: holds a model directory of a different network ({difference}); "
                "choose another output directory, or give --force (force=True) to replace it"
            )
        return None
    manifest = read_manifest(out_dir) or {}
    training = manifest.get("training") or {}
    report = training.get("report") if isinstance(training, dict) else None
    carry = [p for p in report if isinstance(p, str)] if isinstance(report, list) else []
    nested = [d.name for d in out_dir.iterdir() if is_model_directory(d)]
    carry_over(out_dir, stage, [*carry, *nested])
    return manifest


def _difference(old: Path, new: Path) -> str:
    """'' when the two directories hold the same network, else what differs."""
    for name in (f"{NET_PREFIX}-symbol.json", f"{NET_PREFIX}-0000.params"):
        if not (old / name).is_file():
            return f"it has no {name}"
        if files.sha256_file(old / name) != files.sha256_file(new / name):
            return f"its {name} differs"
    try:
        old_in, old_out, _ = load_scalers(old / SCALERS_FILE)
    except NormexportError as exc:
        return f"its {SCALERS_FILE} is unreadable: {first_line(exc)}"
    new_in, new_out, _ = load_scalers(new / SCALERS_FILE)
    for side, a, b in (("input", old_in, new_in), ("output", old_out, new_out)):
        if list(a.columns_) != list(b.columns_):
            return (
                f"its {side} columns are {', '.join(a.columns_)}, this export's "
                f"{', '.join(b.columns_)}"
            )
    return ""


def export_directory(
    model_dir: str | os.PathLike[str],
    *,
    mode: str = "splice",
    opset: int = 13,
    rtol: float | None = None,
    strict: bool = False,
) -> Path:
    """Re-export a directory written by :func:`train_to_directory` (``normexport export DIR``).

    Its ``net-*``, training report and training summary are kept; ``rtol`` and
    ``strict`` as for :func:`export`.
    """
    model_dir = Path(model_dir)
    repair(model_dir)  # a killed swap may have left DIR aside as .DIR.old-PID
    if model_dir.exists() and not model_dir.is_dir():
        raise NormexportError(
            f"{model_dir}: not a directory; give the model directory `normexport train` wrote"
        )
    in_scaler, out_scaler, _ = load_scalers(model_dir / SCALERS_FILE)
    manifest = read_manifest(model_dir)
    return _export(
        lambda: _as_checkpoint(str(model_dir / NET_PREFIX)),
        in_scaler,
        out_scaler,
        model_dir,
        mode=mode,
        opset=opset,
        rtol=rtol,
        force=False,
        strict=strict,
        verify_rows=None,
        training=manifest.get("training") if manifest else None,
        write_net=False,
    )


def train_to_directory(
    data_csv: str | os.PathLike[str],
    inputs: Sequence[str] | None,
    targets: Sequence[str],
    out_dir: str | os.PathLike[str],
    *,
    scaler: str = "minmax",
    transform: dict[str, str] | None = None,
    **train_options: Any,
) -> Any:
    """Load a CSV, fit scalers, train, and write ``scalers.json``, ``net-*``, plots and a
    training manifest into ``out_dir``. Returns the :class:`~normexport.training.TrainResult`.

    ``inputs=None`` takes every column of the table but the targets. ``transform`` maps
    input or target columns to ``log``, ``log1p`` or ``asinh``."""
    chosen = inputs is not None
    if inputs is None:
        inputs = [c for c in tables.read_header(data_csv) if c not in set(targets)]
    _check_columns(inputs, targets)
    try:
        X, Y = tables.load_table(data_csv, [inputs, targets])
    except DataError as exc:
        if chosen:
            raise
        raise DataError(
            f"{exc} (the inputs are every column but the targets; choose them with --inputs)"
        ) from exc
    scaler_cls = {"minmax": MinMaxScaler, "standard": StandardScaler}.get(scaler)
    if scaler_cls is None:
        raise DataError(f"scaler must be minmax or standard, got {scaler!r}")
    transform = transforms.check_spec(transform, "--transform")
    transforms.kinds_for(transform, [*inputs, *targets], "--transform")
    try:
        in_scaler = scaler_cls(transform=_subset(transform, inputs)).fit(X, columns=inputs)
        out_scaler = scaler_cls(transform=_subset(transform, targets)).fit(
            Y, columns=targets, target=True
        )
    except transforms.DomainError as exc:
        where = tables.locate_row(data_csv, exc.row)
        raise DataError(f"{where}: column {exc.column!r}: {exc.problem}") from exc
    except DataError as exc:
        raise DataError(f"{data_csv}: {exc}") from exc
    result = train(X, Y, in_scaler=in_scaler, out_scaler=out_scaler, **train_options)
    net_checkpoint = graph.from_block(result.net)
    dtype = result.settings["dtype"]
    with model_directory(out_dir) as stage:
        files.write_json(stage / SCALERS_FILE, scalers_to_dict(in_scaler, out_scaler, dtype))
        ckpt.save_checkpoint(net_checkpoint, stage, NET_PREFIX)
        (stage / REPORT_DIR).mkdir(exist_ok=True)
        plots.loss_curves(result.history, result.best_epoch, stage / REPORT_DIR / "loss.png")
        assert result.holdout_true is not None and result.holdout_pred is not None
        plots.parity(
            result.holdout_true,
            result.holdout_pred,
            list(targets),
            stage / REPORT_DIR / "parity.png",
            rows=result.rmse_on,
        )
        summary = result.summary()
        summary["data"] = str(Path(data_csv).resolve())
        summary["report"] = [f"{REPORT_DIR}/loss.png", f"{REPORT_DIR}/parity.png"]
        write_manifest(stage, {"dtype": dtype, "training": summary})
    return result


def _subset(transform: dict[str, str], columns: Sequence[str]) -> dict[str, str]:
    return {c: k for c, k in transform.items() if c in columns}


# --------------------------------------------------------------------------- stages


def _as_checkpoint(model: Any) -> Any:
    """The checkpoint of a prefix, a tuple or a block, with room for the splice."""
    if isinstance(model, (str, os.PathLike)):
        return _load_for_export(f"{model}-symbol.json", f"{model}-0000.params")
    if isinstance(model, tuple) and len(model) == 3:
        checkpoint = graph.Checkpoint(*model)
    elif hasattr(model, "collect_params"):
        checkpoint = graph.from_block(model)
    else:
        raise DataError(
            "model must be a Gluon HybridBlock, a checkpoint prefix, or "
            f"(symbol, arg_params, aux_params); got {type(model).__name__}"
        )
    ckpt.check_room_to_splice(checkpoint.symbol, "the network")
    return checkpoint


def _load_for_export(symbol: str | os.PathLike[str], params: str | os.PathLike[str]) -> Any:
    checkpoint = ckpt.load_checkpoint(symbol, params)
    ckpt.check_room_to_splice(checkpoint.symbol, str(symbol))
    return checkpoint


def _write_model_files(
    stage: Path,
    checkpoint: Any,
    in_scaler: AffineScaler,
    out_scaler: AffineScaler,
    info: Any,
    mode: str,
    opset: int,
) -> dict[str, str]:
    """model-* and model.onnx (beside scalers.json and net-*); returns the fold plan."""
    in_affine, out_affine = in_scaler.affine(), out_scaler.inverse_affine()
    inference = graph.for_inference(checkpoint, info.n_inputs)
    if mode == "fold":
        model, plan = graph.fold(inference, in_affine, out_affine)
        fold = plan.keeping(in_scaler.transforms(), out_scaler.transforms()).to_dict()
    else:
        model = graph.splice(inference, in_affine, out_affine)
        fold = SPLICED.to_dict()
    del inference
    model = graph.splice_transforms(
        model, in_scaler.transforms_, transforms.side_ops(out_scaler.transforms_, "out")
    )
    ckpt.save_checkpoint(model, stage, MODEL_PREFIX)
    for stale in stage.glob(ONNX_FILE + "*"):
        stale.unlink()
    scalers = files.read_json(stage / SCALERS_FILE)
    convert(
        model,
        stage / ONNX_FILE,
        n_inputs=info.n_inputs,
        n_outputs=info.n_outputs,
        dtype=info.dtype,
        opset=opset,
        metadata=metadata_entries(mode, scalers, fold),
        run_checker=False,  # _export runs it once the checkpoint is released
    )
    return fold


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


# --------------------------------------------------------------------------- CLI helpers


def export_files(
    symbol: str | os.PathLike[str],
    params: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    scalers: str | os.PathLike[str] | None = None,
    factors: str | os.PathLike[str] | None = None,
    inputs: Sequence[str] | None = None,
    targets: Sequence[str] | None = None,
    mode: str = "splice",
    opset: int = 13,
    rtol: float | None = None,
    force: bool = False,
    strict: bool = False,
    data: str | os.PathLike[str] | None = None,
) -> Path:
    """Export a checkpoint trained elsewhere, with a ``scalers.json`` or a factors file.

    ``inputs`` and ``targets`` name the columns of a factors file (which has no names);
    without them they are ``x0, ...`` and ``y0, ...``. ``data`` is a table whose input
    columns (by name) verification runs on, instead of random rows over the range the
    factors imply: only real rows show factors that do not fit the data.
    """
    if (scalers is None) == (factors is None):
        raise DataError("give exactly one of scalers or factors")
    if scalers is not None and (inputs is not None or targets is not None):
        raise DataError(f"{scalers} names the columns; --inputs and --targets go with --factors")
    # Held in a list that _export empties, so that it releases the weights once written.
    loaded = [_load_for_export(symbol, params)]
    model = loaded[0]
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
        rows = load_factors(factors)
        info = graph.widths_from_total(model, len(rows))
        in_scaler, out_scaler = factors_to_scalers(
            rows, info.n_inputs, info.n_outputs, str(factors), inputs=inputs, targets=targets
        )
    del model
    return _export(
        loaded.pop,
        in_scaler,
        out_scaler,
        Path(out_dir),
        mode=mode,
        opset=opset,
        rtol=rtol,
        force=force,
        strict=strict,
        verify_rows=None,
        verify_data=data,
        training=None,
        write_net=True,
    )
