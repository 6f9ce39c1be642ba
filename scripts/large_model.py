"""A network whose parameters exceed 2 GB exports with ONNX external data and verifies.

Too big for CI, so it is a script: it writes a model directory with a wide float32
network (3 → W → W → 2, sigmoid; W = 23200 gives 538 M parameters, 2.15 GB, beyond
protobuf's 2 GiB limit), then runs ``normexport.mx.exporting.export_directory`` on it in a
fresh process, instrumented like ``scripts/bench`` (wall time, peak RSS, per stage), and
checks the result: ``model.onnx`` + ``model.onnx.data``, verification passed.

It needs several times the model's size in memory (see docs/performance.md); a watchdog
stops the export (only that process) if the machine's available memory falls below
``--min-available-gib``. Results: ``bench-results/large-model-<time>.json`` and a table.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import shutil
import sys
import time
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
    parser.add_argument("--keep", action="store_true", help="keep the model directory")
    parser.add_argument("--min-available-gib", type=float, default=2.0)
    args = parser.parse_args(argv)

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
    started = time.perf_counter()
    prepared = bench.run_worker(
        "prepare_wide", {"width": args.width, "dir": str(args.dir)}, min_available_mib=watchdog
    )
    prepare_seconds = time.perf_counter() - started
    print(f"  wrote the network in {prepare_seconds:.0f} s; exporting ...", file=sys.stderr)
    result = bench.run_worker(
        "export", {"dir": str(args.dir), "mode": "splice"}, min_available_mib=watchdog
    )
    files = result["files"]
    model_mib = result["params_bytes"] / 2**20
    beyond = result["peak_mib"] - result["baseline"]["rss_mib"]
    checks = {
        "parameters exceed 2 GiB": result["params_bytes"] > 2**31,
        "model.onnx.data written": "model.onnx.data" in files,
        "model.onnx itself is small": files.get("model.onnx", 1 << 40) < 1 << 20,
        "verification passed": result["ok"],
    }
    summary = {
        "format": "normexport.large-model/1",
        "started": _dt.datetime.now().isoformat(timespec="seconds"),
        "environment": bench.environment(),
        "width": args.width,
        "parameters": prepared["parameters"],
        "params_bytes": result["params_bytes"],
        "prepare_seconds": prepare_seconds,
        "export": result,
        "peak_beyond_baseline_mib": beyond,
        "peak_over_model": beyond / model_mib,
        "checks": checks,
    }
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = bench.RESULTS / f"large-model-{stamp}.json"
    out.write_text(json.dumps(summary, indent=2) + "\n")
    lines = [
        f"large model: {prepared['parameters']:,} float32 parameters, "
        f"{result['params_bytes'] / 1e9:.2f} GB ({model_mib / 1024:.2f} GiB)",
        f"export (splice + ONNX with external data + verification + manifest): "
        f"{result['wall_seconds']:.0f} s wall",
        f"peak RSS {result['peak_mib'] / 1024:.2f} GiB; baseline after imports "
        f"{result['baseline']['rss_mib']:.0f} MiB; beyond baseline {beyond / 1024:.2f} GiB "
        f"= {beyond / model_mib:.2f}x the model",
        "files: " + ", ".join(f"{k} {v / 2**20:,.1f} MiB" for k, v in files.items()),
        "stages (seconds, peak RSS within the stage):",
    ]
    for name, stage in result["stages"].items():
        lines.append(
            f"  {name:<36} {stage['seconds']:>8.1f} s {stage['peak_mib'] / 1024:>7.2f} GiB "
            f"(from {stage['rss_before_mib'] / 1024:.2f})"
        )
    lines += [f"check: {k}: {'yes' if v else 'NO'}" for k, v in checks.items()]
    if result["error"]:
        lines.append(f"error: {result['error']}")
    print("\n".join(lines))
    print(f"wrote {out}", file=sys.stderr)
    if not args.keep:
        shutil.rmtree(args.dir, ignore_errors=True)
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
