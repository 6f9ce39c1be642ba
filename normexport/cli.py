"""The ``normexport`` command line: ``main(argv=None) -> int``.

Exit status: 0 success, 1 verification found a mismatch, 2 user error (one line on
stderr, no traceback; ``--debug`` shows it), 3 internal error (a bug: please report it).
Each verb imports its stage lazily, so ``normexport --help`` never loads MXNet.
"""

from __future__ import annotations

import signal
import sys


def _interrupted_early(signum: int, frame: object) -> None:
    # Ctrl-C before main() is running (while the imports below load): one line, no traceback.
    print("normexport: interrupted", file=sys.stderr)
    sys.exit(130)


# Before any heavy import, so an early Ctrl-C never prints a traceback; main() hands
# SIGINT back to Python, where KeyboardInterrupt unwinds (and cleans up) normally.
signal.signal(signal.SIGINT, _interrupted_early)

import argparse
import os
import textwrap
import threading
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from normexport import __version__
from normexport.errors import NormexportError, VerificationError, first_line

EXIT_OK, EXIT_MISMATCH, EXIT_USER, EXIT_INTERNAL = 0, 1, 2, 3
STRICT_HELP = "fail on sanity warnings (constant output, inputs far outside the range)"


class UserError(NormexportError):
    """A command-line usage error."""


class _Parser(argparse.ArgumentParser):
    """argparse, but errors are one line (``normexport: error: ...``) and exit 2."""

    def error(self, message: str) -> NoReturn:
        raise UserError(message)


def _columns(text: str) -> list[str]:
    names = [c.strip() for c in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of names")
    return names


def _transforms(text: str) -> dict[str, str]:
    """``COL=log,COL2=log1p`` as ``{"COL": "log", "COL2": "log1p"}``."""
    out: dict[str, str] = {}
    for item in text.split(","):
        column, sep, name = (part.strip() for part in item.partition("="))
        if not sep or not column or not name:
            raise argparse.ArgumentTypeError(
                f"{item.strip()!r} is not COLUMN=TRANSFORM (e.g. y=log1p; log, log1p or asinh)"
            )
        if column in out:
            raise argparse.ArgumentTypeError(f"column {column!r} is given twice")
        out[column] = name
    return out


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of integers like 32,32") from None
    if not all(0 < s <= 1 << 16 for s in sizes):
        raise argparse.ArgumentTypeError(f"hidden sizes must be 1..65536, got {text!r}")
    return sizes


def _positive(kind: type) -> Any:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a valid {kind.__name__}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    parser = _Parser(
        prog="normexport",
        description="Ship a regression network with its normalization baked into the "
        "MXNet model and its ONNX export.",
        epilog="Run 'normexport VERB --help' for each verb's options and an example.",
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"normexport {__version__}")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)
    verbs.required = True

    def verb(name: str, summary: str, example: str) -> argparse.ArgumentParser:
        return verbs.add_parser(
            name,
            help=summary,
            description=summary,
            epilog="example:\n" + textwrap.indent(example, "  "),
            formatter_class=argparse.RawDescriptionHelpFormatter,
            parents=[common],
        )

    p = verb(
        "train",
        "Train a plain Dense network on normalized data into a model directory.",
        "normexport train data.csv --inputs temp_k,strain,frac --targets load,offset "
        "--out model_dir",
    )
    p.add_argument(
        "data", metavar="DATA", help="the training table: .csv (header row), .parquet, or a dataset"
    )
    p.add_argument(
        "--inputs", type=_columns, help="input columns, A,B,C (default: all but the targets)"
    )
    p.add_argument("--targets", required=True, type=_columns, help="target columns, U,V")
    p.add_argument("--out", required=True, metavar="DIR", help="model directory to write")
    p.add_argument("--hidden", type=_sizes, default=[32, 32, 32], help="hidden widths (32,32,32)")
    p.add_argument(
        "--activation", choices=["sigmoid", "tanh", "relu", "softrelu"], default="sigmoid"
    )
    p.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    p.add_argument("--scaler", choices=["minmax", "standard"], default="minmax")
    p.add_argument(
        "--transform",
        type=_transforms,
        metavar="COL=T,...",
        help="transform input or target columns before scaling: log (values > 0), log1p "
        "(> -1) or asinh (any sign), e.g. y=log,x2=asinh; the export undoes it on outputs",
    )
    p.add_argument(
        "--epochs",
        type=_positive(int),
        metavar="MAX",
        help="at most this many epochs (300); training stops earlier when the hold-out "
        "stops improving",
    )
    p.add_argument(
        "--patience",
        type=_positive(int),
        metavar="N",
        help="stop after N epochs without a hold-out improvement of 0.1%% (20)",
    )
    p.add_argument("--no-early-stop", action="store_true", help="run every epoch up to --epochs")
    p.add_argument(
        "--batch-size",
        type=_positive(int),
        metavar="N",
        help="rows per step (default: 32, doubling with the rows to keep at most 200 steps "
        "an epoch, at most 1024)",
    )
    p.add_argument(
        "--lr",
        type=_positive(float),
        help="Adam learning rate (default: 0.01 at batch 32, growing with the batch size "
        "to at most 0.05)",
    )
    p.add_argument(
        "--lr-schedule",
        choices=["plateau", "constant", "cosine"],
        default="plateau",
        help="plateau (default) halves the rate after half the patience without a "
        "hold-out improvement; cosine decays to lr/100 over --epochs (for long runs)",
    )
    p.add_argument("--val-fraction", type=_fraction, default=0.2, help="hold-out share (0.2)")
    p.add_argument("--seed", type=int, default=0)

    p = verb(
        "export",
        "Splice (or fold) the normalization into the network; write MXNet and ONNX models.",
        "normexport export model_dir --mode fold\n"
        "normexport export --symbol net-symbol.json --params net-0000.params "
        "--factors factors.txt --out model_dir",
    )
    p.add_argument("dir", nargs="?", metavar="DIR", help="a directory written by 'train'")
    p.add_argument("--symbol", metavar="F", help="symbol JSON of a network trained elsewhere")
    p.add_argument("--params", metavar="F", help="its .params file")
    p.add_argument("--scalers", metavar="F", help="scalers.json with the normalization")
    p.add_argument(
        "--factors",
        metavar="F",
        help="side file of (scale, shift) rows: n_inputs normalizing rows, then "
        "n_outputs de-normalizing rows (text or .npy)",
    )
    p.add_argument(
        "--inputs",
        type=_columns,
        metavar="A,B,..",
        help="with --factors: names of the input columns, in the file's row order",
    )
    p.add_argument(
        "--targets",
        type=_columns,
        metavar="U,V,..",
        help="with --factors: names of the target columns, in the file's row order",
    )
    p.add_argument("--out", metavar="DIR", help="model directory to write (with --symbol)")
    p.add_argument("--mode", choices=["splice", "fold"], default="splice")
    p.add_argument("--opset", type=int, default=13, help="ONNX opset (13)")
    p.add_argument(
        "--rtol",
        type=_positive(float),
        help="verification tolerance on range-relative error (1e-5 float32, 1e-12 float64)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="replace a model directory of a different network at --out",
    )
    p.add_argument("--strict", action="store_true", help=STRICT_HELP)
    p.add_argument(
        "--data",
        metavar="DATA",
        help="with --symbol: verify on the input columns of this table (by name) instead "
        "of random rows over the range the factors imply",
    )

    p = verb(
        "verify",
        "Check that MXNet, onnxruntime, NumPy and onnx.reference agree on the model.",
        "normexport verify model_dir --data data.csv --rows 10000",
    )
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--data", metavar="DATA.csv", help="rows to check (default: random rows)")
    p.add_argument("--rows", type=_positive(int), help="sample N of the data rows")
    p.add_argument("--rtol", type=_positive(float), help="tolerance on range-relative error")
    p.add_argument("--json", action="store_true", help="print the report as JSON")

    p = verb(
        "predict",
        "Run model.onnx on the raw input columns of a table; write the target columns.",
        "normexport predict model_dir data.parquet --out predictions.csv --keep id",
    )
    p.add_argument("dir", metavar="DIR|MODEL.onnx", help="model directory or model .onnx file")
    p.add_argument(
        "data",
        metavar="DATA",
        help=".csv, .csv.gz, .parquet, or a directory of Parquet files (with --engine dask "
        "also a glob of CSV files: one output file per input file)",
    )
    p.add_argument(
        "--out",
        metavar="OUT",
        help="output .csv or .parquet (default: CSV on standard output); with --engine, "
        "a directory",
    )
    p.add_argument(
        "--keep",
        type=_columns,
        default=[],
        metavar="ID,...",
        help="input columns copied to the output, in order, ahead of the targets",
    )
    p.add_argument(
        "--batch-rows",
        type=_positive(int),
        metavar="N",
        help="rows per record batch (default: 65536, sized for throughput)",
    )
    p.add_argument("--delimiter", metavar="C", help="CSV delimiter (default ','; '\\t' for tab)")
    p.add_argument(
        "--allow-missing",
        action="store_true",
        help="pass empty cells and NaN to the model as NaN instead of refusing them",
    )
    p.add_argument(
        "--engine",
        choices=["dask"],
        help="score DATA's partitions on a Dask cluster into the directory --out "
        "(pip install 'normexport[dask]')",
    )
    p.add_argument(
        "--scheduler", metavar="ADDR", help="with --engine dask: a running scheduler's address"
    )
    p.add_argument(
        "--workers",
        type=_positive(int),
        metavar="N",
        help="with --engine dask and no --scheduler: local worker processes (default: 2)",
    )

    p = verb(
        "inspect",
        "Summarize a model directory or ONNX file: graph, metadata, embedded scalers.",
        "normexport inspect model_dir/model.onnx",
    )
    p.add_argument("path", metavar="DIR|MODEL.onnx")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")

    p = verb(
        "bake",
        "Bake normalization into any ONNX regression model (PyTorch, Keras, sklearn, ...).",
        "normexport bake model.onnx --factors factors.txt --out baked.onnx --mode fold",
    )
    p.add_argument("model", metavar="MODEL.onnx")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--factors", metavar="F", help="side file of (scale, shift) rows")
    source.add_argument("--scalers", metavar="F", help="scalers.json")
    p.add_argument("--out", required=True, metavar="OUT.onnx")
    p.add_argument("--mode", choices=["splice", "fold"], default="splice")
    p.add_argument("--opset", type=int, help="convert to this opset (default: keep)")
    p.add_argument("--rename", action="store_true", help="name the input/output input/output")
    p.add_argument("--no-verify", action="store_true", help="skip the equivalence check")
    p.add_argument("--strict", action="store_true", help=STRICT_HELP)
    p.add_argument("--data", metavar="DATA", help="rows for verification (.csv, .parquet, dataset)")
    p.add_argument(
        "--timeout",
        type=_positive(float),
        metavar="SECONDS",
        help="stop a model that runs longer than this in all (300; inf for no limit)",
    )
    p.add_argument(
        "--inputs", type=_columns, metavar="A,B,...", help="with --factors: input column names"
    )
    p.add_argument(
        "--targets", type=_columns, metavar="U,V,...", help="with --factors: target column names"
    )
    p.add_argument(
        "--repair",
        action="store_true",
        help="repair an output Reshape(-1, 1) that interleaves the outputs into rows",
    )

    p = verb(
        "demo",
        "Train, export (splice and fold) and verify on the bundled Munsell data.",
        "normexport demo --out munsell_model",
    )
    p.add_argument("--out", metavar="DIR", default="normexport-demo", help="(normexport-demo)")
    p.add_argument("--epochs", type=_positive(int), help="training epochs (demo default)")
    return parser


def run() -> None:
    """The console script: :func:`main`, then exit. The work is done (or undone) when
    main returns, so a Ctrl-C during the interpreter's shutdown is ignored."""
    code = main()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(code)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    interrupted: list[int] = []

    def on_interrupt(signum: int, frame: object) -> None:
        # A KeyboardInterrupt raised inside a C extension's import comes out as an
        # ImportError ("initialization failed"): remembering the signal tells them apart.
        interrupted.append(signum)
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():  # signals are main-thread only
        signal.signal(signal.SIGINT, on_interrupt)
    debug = "--debug" in argv
    warnings.formatwarning = _one_line_warning
    try:
        args = build_parser().parse_args(argv)
        _load_libraries(_LIBRARIES.get(args.verb, ()))
        with warnings.catch_warnings():
            # Numeric RuntimeWarnings (overflow in exp, ...) are noise on a terminal:
            # verification judges the numbers. Warnings meant for the user are UserWarnings.
            warnings.filterwarnings("ignore", category=RuntimeWarning)
            return int(_VERBS[args.verb](args) or EXIT_OK)
    except SystemExit as exc:  # --help and --version
        return int(exc.code or 0)
    except BrokenPipeError:
        # The reader of our output went away (`normexport predict ... | head`): not an error.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except KeyboardInterrupt:
        print("normexport: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if interrupted:
            print("normexport: interrupted", file=sys.stderr)
            return 130
        code, message = _classify(exc)
        if debug:
            traceback.print_exc()
        print(message, file=sys.stderr)
        return code


# The compiled libraries each verb loads. A Ctrl-C inside a C extension's import can be
# printed as a traceback by the extension itself (NumPy's C API import prints the error
# before replacing it), so they are imported with SIGINT held; it arrives afterwards.
_CORE = ("numpy", "pyarrow", "onnx", "onnxruntime")
_LIBRARIES: dict[str, tuple[str, ...]] = {
    "train": (*_CORE, "mxnet"),
    "export": (*_CORE, "mxnet"),
    "demo": (*_CORE, "mxnet"),
    "verify": _CORE,
    "predict": _CORE,
    "bake": _CORE,
    "inspect": ("numpy", "onnx"),  # what inspect loads anyway: no pyarrow, no onnxruntime
}


def _load_libraries(names: Sequence[str]) -> None:
    """Import ``names`` (those installed) with SIGINT held until they are loaded."""
    import contextlib
    import importlib

    held = threading.current_thread() is threading.main_thread() and hasattr(
        signal, "pthread_sigmask"
    )
    before = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT}) if held else None
    try:
        for name in names:
            with contextlib.suppress(Exception):  # not installed: the verb says what to do
                importlib.import_module(name)
    finally:
        if before is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, before)


def _classify(exc: Exception) -> tuple[int, str]:
    """Exit status and the one line to print for an exception."""
    if isinstance(exc, VerificationError):
        return EXIT_MISMATCH, f"normexport: {exc}"
    if isinstance(exc, NormexportError):
        return EXIT_USER, f"normexport: error: {first_line(exc)}"
    if isinstance(exc, OSError) and exc.strerror:
        # The file system said no (not a directory, read-only, disk full ...): the user's
        # environment, not a bug.
        where = f"{exc.filename}: " if exc.filename else ""
        return EXIT_USER, f"normexport: error: {where}{exc.strerror.lower()}"
    return EXIT_INTERNAL, (
        f"normexport: internal error: {type(exc).__name__}: {first_line(exc)} "
        "(run again with --debug for the traceback)"
    )


def _given(args: argparse.Namespace, *names: str) -> dict[str, Any]:
    """The options the user gave; the others take the called function's own defaults."""
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def _one_line_warning(message: Any, category: Any, *args: Any, **kwargs: Any) -> str:
    return f"normexport: warning: {message}\n"


# --------------------------------------------------------------------------- verbs


def _train(args: argparse.Namespace) -> int:
    from normexport.mx import require

    options = _given(args, "epochs", "batch_size", "patience", "lr")  # else train()'s defaults
    if args.no_early_stop:
        if args.patience is not None:
            raise UserError("give either --patience or --no-early-stop")
        options["patience"] = None
    result = require("exporting").train_to_directory(
        args.data,
        args.inputs,
        args.targets,
        args.out,
        scaler=args.scaler,
        transform=args.transform,
        hidden=args.hidden,
        activation=args.activation,
        dtype=args.dtype,
        lr_schedule=args.lr_schedule,
        val_fraction=args.val_fraction,
        seed=args.seed,
        **options,
    )
    settings = result.settings
    print(
        f"trained {args.activation} net {args.hidden} ({args.dtype}) in {result.seconds:.1f} s, "
        f"batch {settings['batch_size']}"
    )
    print(
        f"best epoch {result.best_epoch} of {len(result.history)} ({settings['stopped']}); "
        f"{result.rmse_on} RMSE (raw units):"
    )
    if result.rmse_on != "hold-out":
        print("  (no hold-out rows with --val-fraction 0: RMSE on the training rows)")
    for name, rmse in result.holdout_rmse.items():
        print(
            f"  {name:<12} {rmse:.6g}  ({100 * result.holdout_rmse_relative[name]:.3f}% of range)"
        )
    print(f"wrote {args.out}; next: normexport export {args.out}")
    return EXIT_OK


def _export(args: argparse.Namespace) -> int:
    from normexport.modeldir import describe_directory, load_scalers
    from normexport.mx import require
    from normexport.scaling import unnamed_hint

    exporting = require("exporting")
    options = {"mode": args.mode, "opset": args.opset, "rtol": args.rtol, "strict": args.strict}
    if args.dir and (args.symbol or args.params or args.out or args.scalers or args.factors):
        raise UserError("give either DIR or --symbol/--params/--out with --scalers or --factors")
    if (args.inputs or args.targets) and not args.factors:
        raise UserError("--inputs and --targets name the columns of --factors")
    if args.dir and args.data:
        raise UserError("--data goes with --symbol (DIR is verified over its training range)")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        out = _run_export(exporting, args, options)
    for warning in caught:  # the loosened tolerance and the sanity warnings: one line each
        if issubclass(warning.category, UserWarning):
            print(f"normexport: warning: {warning.message}", file=sys.stderr)
        else:
            warnings.warn_explicit(
                warning.message, warning.category, warning.filename, warning.lineno
            )
    print(describe_directory(out))
    in_scaler, out_scaler, _ = load_scalers(Path(out) / "scalers.json")
    hint = unnamed_hint(in_scaler.columns_, out_scaler.columns_)
    if hint:
        print(f"note: {hint}")
    return EXIT_OK


def _run_export(exporting: Any, args: argparse.Namespace, options: dict[str, Any]) -> Path:
    if args.dir:
        out = exporting.export_directory(args.dir, **options)
    else:
        missing = [f for f in ("symbol", "params", "out") if not getattr(args, f)]
        if missing:
            raise UserError(f"give DIR, or --symbol, --params and --out (missing --{missing[0]})")
        if bool(args.scalers) == bool(args.factors):
            raise UserError("give exactly one of --scalers or --factors with --symbol")
        out = exporting.export_files(
            args.symbol,
            args.params,
            args.out,
            scalers=args.scalers,
            factors=args.factors,
            inputs=args.inputs,
            targets=args.targets,
            force=args.force,
            data=args.data,
            **options,
        )
    return Path(out)


def _verify(args: argparse.Namespace) -> int:
    from normexport.verification import report_json, verify

    report = verify(args.dir, data=args.data, rows=args.rows, rtol=args.rtol)
    if args.json:
        print(report_json(report))
    else:
        print(report.table())
    return EXIT_OK if report.ok else EXIT_MISMATCH


def _predict(args: argparse.Namespace) -> int:
    if args.engine == "dask":
        if not args.out:
            raise UserError("--engine dask writes one file per partition: give --out DIR")
        from normexport.engines.dask import run_cli

        return run_cli(args.dir, args.data, args.out, args.keep, args.scheduler, args.workers)
    if args.scheduler or args.workers:
        raise UserError("--scheduler and --workers go with --engine dask")
    from normexport.predicting import predict

    options = _given(args, "batch_rows", "delimiter")  # else the function's defaults
    rows = predict(
        args.dir, args.data, args.out, keep=args.keep, allow_missing=args.allow_missing, **options
    )
    if args.out:
        print(f"wrote {args.out} ({rows} rows)", file=sys.stderr)
    return EXIT_OK


def _inspect(args: argparse.Namespace) -> int:
    from normexport.inspection import format_inspection, inspect

    summary = inspect(args.path)
    if args.json:
        import json

        print(json.dumps(summary, indent=2))
    else:
        print(format_inspection(summary))
    return EXIT_OK


def _bake(args: argparse.Namespace) -> int:
    from normexport.baking import bake

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fold fallbacks are printed from result.notes
        result = bake(
            args.model,
            args.out,
            factors=args.factors,
            scalers=args.scalers,
            mode=args.mode,
            opset=args.opset,
            rename=args.rename,
            verify=not args.no_verify,
            data=args.data,
            repair=args.repair,
            timeout=args.timeout,
            inputs=args.inputs,
            targets=args.targets,
            strict=args.strict,
        )
    for note in result.notes:
        print(note, file=sys.stderr)
    for line in result.report.warnings if result.report is not None else []:
        print(f"normexport: warning: {line}", file=sys.stderr)
    for change in result.changes:
        print(f"changed: {change}", file=sys.stderr)
    if result.report is not None:
        print(result.report.table())
    sides = ", ".join(f"{side} {result.plan[side]}" for side in ("input", "output"))
    print(f"wrote {args.out} (mode {args.mode}: {sides})")
    if result.hint:
        print(f"note: {result.hint}")
    return EXIT_OK


def _demo(args: argparse.Namespace) -> int:
    from normexport.mx import require

    print(require("demo").run_demo(Path(args.out), epochs=args.epochs))
    return EXIT_OK


_VERBS = {
    "train": _train,
    "export": _export,
    "verify": _verify,
    "predict": _predict,
    "inspect": _inspect,
    "bake": _bake,
    "demo": _demo,
}
