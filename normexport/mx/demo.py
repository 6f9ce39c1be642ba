"""``normexport demo``: the original use case, end to end, on the bundled Munsell data.

Three colorimetric inputs (CIE x, y and luminance factor Y) → two Munsell outputs
(a, b: chroma·cos/sin of the hue angle, continuous where hue itself wraps around),
sigmoid hidden layers, float64. Trains, exports with splice and with fold, verifies
both on every row of the data set, and returns the report as text.
"""

from __future__ import annotations

import time
from importlib import resources
from pathlib import Path

from normexport import files, tables
from normexport.modeldir import (
    MANIFEST_FILE,
    NET_PREFIX,
    ONNX_FILE,
    REPORT_DIR,
    SCALERS_FILE,
    describe_directory,
    load_scalers,
)
from normexport.mx.exporting import export, export_directory, train_to_directory
from normexport.verification import verify

INPUTS = ["x", "y", "Y"]
TARGETS = ["a", "b"]
# Measured on this data (docs/data.md): about 0.25% of range hold-out RMSE on a and b
# in about a minute on 2 cores; plain first-order training of sigmoid nets needs many
# epochs, and a cosine decay of the learning rate beats a constant one on long runs.
HIDDEN = (64, 64, 64)
EPOCHS = 4000
BATCH_SIZE = 128
LR = 3e-2


def data_path() -> Path:
    """The bundled Munsell renotation "real" table (see docs/data.md)."""
    return Path(str(resources.files("normexport") / "data" / "munsell_real.csv"))


def run_demo(out: Path, *, epochs: int | None = None, progress: bool | None = None) -> str:
    """Train → export (splice, and fold into ``out/fold``) → verify; return the report."""
    started = time.perf_counter()
    data = data_path()
    result = train_to_directory(
        data,
        INPUTS,
        TARGETS,
        out,
        hidden=HIDDEN,
        activation="sigmoid",
        dtype="float64",
        epochs=epochs or EPOCHS,
        batch_size=BATCH_SIZE,
        lr=LR,
        lr_schedule="cosine",
        patience=None,  # the cosine schedule is planned for every epoch
        progress=progress,
    )
    export_directory(out, mode="splice")
    in_scaler, out_scaler, _ = load_scalers(out / SCALERS_FILE)
    manifest = files.read_json(out / MANIFEST_FILE)
    export(
        str(out / NET_PREFIX),
        in_scaler,
        out_scaler,
        out / "fold",
        mode="fold",
        training=manifest.get("training"),
    )
    X = tables.load_columns(data, INPUTS)
    reports = {mode: verify(d, X) for mode, d in (("splice", out), ("fold", out / "fold"))}

    lines = [
        f"normexport demo: Munsell renotation data ({X.shape[0]} rows), "
        f"{', '.join(INPUTS)} → {', '.join(TARGETS)}",
        f"network: {len(HIDDEN)} sigmoid layers {list(HIDDEN)}, float64, Adam lr {LR} "
        "(cosine decay), "
        f"batch {BATCH_SIZE}, {len(result.history)} epochs (best {result.best_epoch}), "
        f"{result.seconds:.1f} s",
        "",
        f"hold-out error ({result.settings['val_rows']} rows never trained on), raw units:",
    ]
    for name in TARGETS:
        lines.append(
            f"  {name}: RMSE {result.holdout_rmse[name]:.4g} "
            f"({100 * result.holdout_rmse_relative[name]:.2f}% of its range)"
        )
    lines += ["", "equivalence (max error relative to each output's range, all rows + edge rows):"]
    lines.append(f"  {'mode':<7} {'runtimes':<44} {'max abs err':>12} {'max rel err':>12}  result")
    for mode, report in reports.items():
        worst_abs = max(max(p.max_abs.values()) for p in report.pairs)
        worst_rel = max(max(p.max_rel.values()) for p in report.pairs)
        lines.append(
            f"  {mode:<7} {', '.join(report.runtimes):<44} {worst_abs:>12.3g} {worst_rel:>12.3g}"
            f"  {'PASS' if report.ok else 'FAIL'} (tolerance {report.rtol:g})"
        )
    lines += ["", "per runtime pair (splice):", _indent(reports["splice"].table())]
    lines += ["", describe_directory(out), "", describe_directory(out / "fold")]
    lines += [
        "",
        f"plots: {out / REPORT_DIR / 'loss.png'}, {out / REPORT_DIR / 'parity.png'}",
        f"next: normexport predict {out} DATA.csv   |   normexport inspect {out / ONNX_FILE}",
        f"total {time.perf_counter() - started:.1f} s",
    ]
    if not all(r.ok for r in reports.values()):
        from normexport.errors import VerificationError

        raise VerificationError("demo verification failed\n" + "\n".join(lines))
    return "\n".join(lines)


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())
