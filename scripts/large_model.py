"""A network whose parameters exceed 2 GB exports with ONNX external data and verifies.

Too big for CI, so it is a script: it writes a model directory with a wide float32
network (3 → W → W → 2, sigmoid; W = 23200 gives 538 M parameters, 2.15 GB, beyond
protobuf's 2 GiB limit), then runs ``normexport.mx.exporting.export_directory`` on it in a
fresh process, instrumented like ``scripts/bench`` (wall time, peak RSS, per stage), and
checks the result: ``model.onnx`` + ``model.onnx.data``, verification passed.

``--paths`` runs other export paths on the same network, one after another, each in
its own process (``scripts/bench``'s export cases; bake reads a bare ONNX file with its
weights in external data, since inline weights cannot exceed 2 GiB). Each needs about
the model's size in memory beyond the interpreter (see docs/performance.md); a watchdog
stops a case (only that process) if the machine's available memory falls below
``--min-available-gib``. Results: ``bench-results/large-model-<time>.json`` and a table.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench  # scripts/bench.py: workers, probe, watchdog

DEFAULT_WIDTH = 23200


def parameters(width: int, n_in: int = 3, n_out: int = 2) -> int:
    return n_in * width + width + width * width + width + width * n_out + n_out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=DEFAULT_WIDTH)
    parser.add_argument("--dir", type=Path, default=bench.RESULTS / "large-model-work")
    parser.add_argument(
        "--paths",
        default="dir",
        help="comma-separated export paths to run, one after another: "
        + ", ".join(f"{k} ({v})" for k, v in bench.EXPORT_PATHS.items())
        + "; default dir",
    )
    parser.add_argument("--keep", action="store_true", help="keep the model directory")
    parser.add_argument("--min-available-gib", type=float, default=2.0)
    args = parser.parse_args(argv)
    paths = tuple(p.strip() for p in args.paths.split(",") if p.strip())
    unknown = set(paths) - set(bench.EXPORT_PATHS)
    if unknown:
        parser.error(f"unknown paths: {', '.join(sorted(unknown))}")

    n_params = parameters(args.width)
    size = 4 * n_params
    available = bench._mem_available_mib() / 1024
    print(
        f"large model: W={args.width}, {n_params:,} float32 parameters = {size / 1e9:.2f} GB "
        f"({size / 2**30:.2f} GiB); {available:.1f} GiB of memory available now",
        file=sys.stderr,
    )
    bench.RESULTS.mkdir(exist_ok=True)
    shutil.rmtree(args.dir, ignore_errors=True)
    watchdog = args.min_available_gib * 1024
    cases = [c for c in bench.path_cases(args.width, paths) if c["mode"] == "splice"]
    results = []
    try:
        for case in cases:
            results.append(
                bench.run_export_case(
                    case, args.dir, lambda m: print(m, file=sys.stderr, flush=True), watchdog
                )
            )
    finally:
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)
            shutil.rmtree(bench.side_dir(args.dir), ignore_errors=True)
    summary = {
        "format": "normexport.large-model/2",
        "started": _dt.datetime.now().isoformat(timespec="seconds"),
        "environment": bench.environment(),
        "width": args.width,
        "parameters": n_params,
        "cases": results,
    }
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = bench.RESULTS / f"large-model-{stamp}.json"
    out.write_text(json.dumps(summary, indent=2) + "\n")
    lines = [f"large model: {n_params:,} float32 parameters ({size / 2**30:.2f} GiB)"]
    checks: dict[str, bool] = {}
    for case in results:
        files = case["files"]
        model_mib = case["model_mib"]
        lines += [
            "",
            f"{case['name']}: {case['wall_seconds']:.0f} s wall "
            f"({case['seconds_per_gib']:.1f} s per GiB), peak RSS "
            f"{case['peak_mib'] / 1024:.2f} GiB; baseline {case['baseline']['rss_mib']:.0f} MiB; "
            f"beyond baseline {case['peak_beyond_baseline_mib'] / 1024:.2f} GiB = "
            f"{case['peak_over_model']:.2f}x the model, in '{case['peak_stage']}'",
            "files: " + ", ".join(f"{k} {v / 2**20:,.1f} MiB" for k, v in files.items()),
            "stages (seconds, peak RSS within the stage):",
        ]
        for name, stage in case["stages"].items():
            lines.append(
                f"  {name:<36} {stage['seconds']:>8.1f} s {stage['peak_mib'] / 1024:>7.2f} GiB "
                f"(from {stage['rss_before_mib'] / 1024:.2f})"
            )
        onnx_files = [k for k in files if k.endswith(".onnx")]
        checks.update(
            {
                f"{case['name']}: parameters exceed 2 GiB": model_mib > 2048,
                f"{case['name']}: external data written": any(k.endswith(".data") for k in files),
                f"{case['name']}: the .onnx file itself is small": all(
                    files[k] < 1 << 20 for k in onnx_files
                ),
                f"{case['name']}: verification passed": case["ok"],
                f"{case['name']}: peak within {bench.EXPORT_RSS_TARGET}x the model": case[
                    "peak_over_model"
                ]
                <= bench.EXPORT_RSS_TARGET,
            }
        )
        if case["error"]:
            lines.append(f"error: {case['error']}")
    lines += [f"check: {k}: {'yes' if v else 'NO'}" for k, v in checks.items()]
    print("\n".join(lines))
    print(f"wrote {out}", file=sys.stderr)
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
