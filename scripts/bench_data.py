"""Benchmarks of the core profile: the data plane (tables through the model) and scale (Dask).

Run through ``scripts/bench --sections data,scale`` (which makes sure ``.venv-core``
exists: numpy 2, the newest pyarrow, onnxruntime and dask). Every command runs in a
fresh process, so peak RSS is that command's own; times are best-of-N wall clock, and
every ratio compares two numbers measured in the same run.

data    the same 2M-row table through a 3-64-64-64-2 float32 net: ``normexport predict``
        CSV→CSV, CSV→Parquet and Parquet→Parquet, against a minimal pyarrow +
        onnxruntime loop over the same file; peak RSS of ``predict`` and ``verify --data``
        at 200k and at 2M rows; ``verify --data`` throughput against its runtimes' own
        compute time on the same rows (see :func:`bench_verify_compute`).
verify-data  only that last measurement (``--sections verify-data``); run it with the
        MXNet profile's Python too, where verification also runs MXNet:
        ``.venv/bin/python scripts/bench_data.py --sections verify-data``.
scale   rows/s of single-process ``predict`` over a partitioned Parquet dataset, and of
        ``predict --engine dask`` with 1 and 2 local worker processes on the same dataset.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench-results"
MODEL_DIR = ROOT / "tests" / "data" / "mxnet_model"  # exported in the MXNet profile
INPUTS = ["temp_k", "strain", "frac"]

# A minimal pyarrow + onnxruntime loop: what `predict` must stay within 1.25x of.
MINIMAL_LOOP = """
import sys, numpy as np, onnxruntime as ort, pyarrow as pa, pyarrow.csv as pc
model, src, dst = sys.argv[1:4]
session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
reader = pc.open_csv(src, read_options=pc.ReadOptions(block_size=1 << 22),
                     convert_options=pc.ConvertOptions(include_columns=["temp_k", "strain", "frac"]))
writer = None
for batch in reader:
    X = np.column_stack([batch.column(i).to_numpy() for i in range(3)]).astype(np.float32)
    Y = session.run(None, {"input": X})[0]
    table = pa.table({"load": Y[:, 0], "offset": Y[:, 1]})
    writer = writer or pc.CSVWriter(dst, table.schema)
    writer.write_table(table)
writer.close()
"""

# Runs one command and prints its peak RSS (this wrapper's children only).
MEASURE = """
import json, resource, subprocess, sys, time
started = time.perf_counter()
done = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
seconds = time.perf_counter() - started
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print(json.dumps({"rc": done.returncode, "seconds": seconds, "peak_mib": peak,
                  "stderr": done.stderr[-300:]}))
"""


def measure(argv: list[str], repeat: int = 1) -> dict[str, Any]:
    """Best-of-``repeat`` wall time and the peak RSS of ``argv`` in fresh processes.

    Bytecode is cached as an installed package's is (PYTHONDONTWRITEBYTECODE would make
    every start compile the package again, about 0.15 s).
    """
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    runs = []
    for _ in range(repeat):
        out = subprocess.run(
            [sys.executable, "-c", MEASURE, *argv],
            capture_output=True,
            text=True,
            check=True,
            env=env,
        )
        run = json.loads(out.stdout)
        if run["rc"] != 0:
            raise RuntimeError(f"{' '.join(argv)} failed: {run['stderr']}")
        runs.append(run)
    best = min(runs, key=lambda r: r["seconds"])
    return {"seconds": best["seconds"], "peak_mib": max(r["peak_mib"] for r in runs)}


def build_model(path: Path) -> None:
    """A 3-64-64-64-2 float32 tanh MLP with normexport scalers in its metadata."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from normexport import MinMaxScaler
    from normexport.scaling import scalers_to_dict

    rng = np.random.default_rng(0)
    widths = [3, 64, 64, 64, 2]
    nodes, inits, x = [], [], "input"
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        inits += [
            numpy_helper.from_array(rng.normal(0, a**-0.5, (a, b)).astype(np.float32), f"W{i}"),
            numpy_helper.from_array(np.zeros(b, np.float32), f"b{i}"),
        ]
        y = "output" if i == len(widths) - 2 else f"h{i}"
        nodes.append(
            helper.make_node("Gemm", [x, f"W{i}", f"b{i}"], [y if y == "output" else f"g{i}"])
        )
        if y != "output":
            nodes.append(helper.make_node("Tanh", [f"g{i}"], [y]))
        x = y
    graph = helper.make_graph(
        nodes,
        "bench",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 2])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    X = np.column_stack(
        [rng.uniform(250, 350, 64), rng.uniform(0, 0.01, 64), rng.uniform(0, 1, 64)]
    )
    in_sc = MinMaxScaler().fit(X, columns=INPUTS)
    out_sc = MinMaxScaler().fit(
        rng.uniform(-1, 1, (64, 2)), columns=["load", "offset"], target=True
    )
    helper.set_model_props(
        model, {"normexport.scalers": json.dumps(scalers_to_dict(in_sc, out_sc, "float32"))}
    )
    onnx.save_model(model, str(path))


def write_rows(path: Path, rows: int, seed: int = 0) -> None:
    """``rows`` rows of id + the three inputs, CSV or Parquet by extension, in chunks."""
    import pyarrow as pa

    from normexport.tables import TableWriter

    rng = np.random.default_rng(seed)
    with TableWriter(path) as out:
        for start in range(0, rows, 500_000):
            n = min(500_000, rows - start)
            columns = [
                pa.array(np.arange(start, start + n)),
                rng.uniform(250, 350, n),
                rng.uniform(0, 0.01, n),
                rng.uniform(0, 1, n),
            ]
            out.write(["id", *INPUTS], columns)


def normexport(*args: str) -> list[str]:
    return [sys.executable, "-m", "normexport", *args]


def bench_data(work: Path, rows: int, small: int, repeat: int, log: Any) -> dict[str, Any]:
    model = work / "mlp.onnx"
    build_model(model)
    csv, parquet = work / f"rows{rows}.csv", work / f"rows{rows}.parquet"
    log(f"data: writing {rows} rows as CSV and Parquet ...")
    write_rows(csv, rows)
    write_rows(parquet, rows)
    out: dict[str, Any] = {"rows": rows, "model": "3-64-64-64-2 tanh, float32"}
    cases = {
        "minimal pyarrow + onnxruntime loop (CSV→CSV)": [
            sys.executable,
            "-c",
            MINIMAL_LOOP,
            str(model),
            str(csv),
            str(work / "m.csv"),
        ],
        "predict CSV→CSV": normexport(
            "predict", str(model), str(csv), "--out", str(work / "p.csv")
        ),
        "predict CSV→Parquet": normexport(
            "predict", str(model), str(csv), "--out", str(work / "p.parquet")
        ),
        "predict Parquet→Parquet": normexport(
            "predict", str(model), str(parquet), "--out", str(work / "q.parquet")
        ),
    }
    timings = {}
    for name, argv in cases.items():
        log(f"data: {name} ...")
        timings[name] = measure(argv, repeat)
    base = timings["minimal pyarrow + onnxruntime loop (CSV→CSV)"]["seconds"]
    out["predict"] = {
        name: {**t, "rows_per_s": rows / t["seconds"], "ratio_to_minimal_loop": t["seconds"] / base}
        for name, t in timings.items()
    }
    # Memory against rows: the same commands at `small` and at `rows` rows.
    small_csv = work / f"rows{small}.csv"
    write_rows(small_csv, small)
    memory = {}
    for label, path in ((small, small_csv), (rows, csv)):
        log(f"data: peak RSS at {label} rows ...")
        memory[str(label)] = {
            "predict": measure(
                normexport("predict", str(model), str(path), "--out", str(work / "r.csv"))
            )["peak_mib"],
            "verify --data": measure(normexport("verify", str(MODEL_DIR), "--data", str(path)))[
                "peak_mib"
            ],
        }
    out["peak_mib"] = memory
    out["peak_ratio"] = {
        key: memory[str(rows)][key] / memory[str(small)][key]
        for key in ("predict", "verify --data")
    }
    out["verify"] = bench_verify_compute(csv, rows, repeat, log)
    return out


def bench_verify_compute(csv: Path, rows: int, repeat: int, log: Any) -> dict[str, Any]:
    """``verify --data`` wall time against the sum of its runtimes' own compute time.

    In one run, on the same file: ``verify MODEL_DIR --data csv`` end to end in a fresh
    process; each runtime that verification runs (``directory_runtimes``: onnxruntime,
    the float64 NumPy reference, its float32 probe for a float32 model, MXNet where
    installed, onnx.reference on its sample) timed alone in this process on the same rows
    (edge rows + data), in verification's chunks, already in the model's dtype, NumPy's
    BLAS on one thread as in ``verify --data``; loading a runtime is not compute. Best of
    ``repeat`` each. What the ratio leaves over is broken down by two more measurements:
    reading the table alone (this process) and ``verify`` on a 100-row file (start-up,
    imports, loading every runtime, fresh process).

    Throughput (rows per second once running, start-up excluded) is measured on a second
    file of three times the rows, the first one's rows repeated: the extra time ``verify``
    takes on the extra rows against the extra time its runtimes take on them.
    """
    from normexport import tables, verification

    log("verify-data: verify --data end to end ...")
    wall = measure(normexport("verify", str(MODEL_DIR), "--data", str(csv)), repeat)["seconds"]
    tiny = csv.with_name("rows100.csv")
    write_rows(tiny, 100)
    fixed = measure(normexport("verify", str(MODEL_DIR), "--data", str(tiny)), repeat)["seconds"]
    in_sc = _scalers()[0]
    log("verify-data: reading the table alone ...")
    read = _best_of(
        repeat,
        lambda: sum(
            1
            for _ in tables.iter_batches(csv, [in_sc.columns_], batch_rows=verification.CHUNK_ROWS)
        ),
    )
    compute, skipped = _runtime_compute(csv, repeat, log)
    total = sum(compute.values())

    big = csv.with_name("rows-x3.csv")
    with big.open("w") as out, csv.open() as first:
        header = first.readline()
        body = first.read()
        out.write(header + body * 3)
    log("verify-data: verify --data on three times the rows ...")
    wall_big = measure(normexport("verify", str(MODEL_DIR), "--data", str(big)), repeat)["seconds"]
    compute_big, _ = _runtime_compute(big, repeat, log)
    big.unlink()
    extra_compute = sum(compute_big.values()) - total
    return {
        "rows": rows,
        "wall_seconds": wall,
        "runtime_compute_seconds": compute,
        "skipped": skipped,
        "ratio_to_runtime_compute": wall / total,
        "rows_per_s": rows / wall,
        "read_alone_seconds": read,
        "verify_100_rows_seconds": fixed,
        # the cost that grows with the rows: end to end minus the fixed cost of a run
        "per_row_ratio_to_runtime_compute": (wall - fixed) / total,
        "rows_x3": 3 * rows,
        "wall_seconds_x3": wall_big,
        "runtime_compute_seconds_x3": compute_big,
        # throughput: the extra rows' extra time, against their runtimes' extra time
        "throughput_ratio_to_runtime_compute": (wall_big - wall) / extra_compute,
        "throughput_rows_per_s": 2 * rows / (wall_big - wall),
    }


def _scalers() -> Any:
    from normexport.modeldir import load_scalers

    return load_scalers(MODEL_DIR / "scalers.json")


def _best_of(repeat: int, run: Any) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times)


def _runtime_compute(csv: Path, repeat: int, log: Any) -> tuple[dict[str, float], dict[str, str]]:
    """Each verification runtime's own compute on ``csv``'s rows (see above)."""
    from normexport import tables, verification
    from normexport.reference import one_blas_thread

    in_sc, out_sc, dtype = _scalers()
    size = verification.CHUNK_ROWS
    X = np.concatenate([verification.edge_rows(in_sc), tables.load_columns(csv, in_sc.columns_)])
    chunks = [X[i : i + size].astype(dtype) for i in range(0, len(X), size)]
    del X
    compute, skipped = {}, {}
    for name, make in verification.directory_runtimes(MODEL_DIR, in_sc, out_sc, dtype).items():
        try:
            run = make()
        except (ImportError, NotImplementedError) as exc:
            skipped[name] = str(exc).splitlines()[0]
            continue
        part = (
            [chunks[0][: verification.REFERENCE_ROWS]]
            if name in verification.SAMPLE_ONLY
            else chunks
        )
        log(f"verify-data: {name} alone on {csv.name} ...")
        with one_blas_thread():  # as verify --data runs them
            compute[name] = _best_of(repeat, lambda run=run, part=part: [run(c) for c in part])
        del run
    return compute, skipped


def bench_scale(
    work: Path, partitions: int, rows_each: int, repeat: int, log: Any
) -> dict[str, Any]:
    """Rows/s of one process and of Dask with 1 and 2 workers, in this process.

    The clusters are started before the clock starts: what is compared is the scoring
    rate, not the seconds a LocalCluster takes to spawn its processes (reported apart).
    """
    from distributed import LocalCluster

    from normexport.engines.dask import predict_dataset
    from normexport.predicting import predict

    model = work / "mlp.onnx"
    if not model.exists():
        build_model(model)
    dataset = work / "dataset"
    shutil.rmtree(dataset, ignore_errors=True)
    dataset.mkdir()
    log(f"scale: writing {partitions} partitions of {rows_each} rows ...")
    for i in range(partitions):
        write_rows(dataset / f"part-{i}.parquet", rows_each, seed=i)
    total = partitions * rows_each
    out: dict[str, Any] = {"rows": total, "partitions": partitions}

    def best_of(run: Any) -> float:
        return _best_of(repeat, run)

    log("scale: predict, one process ...")
    seconds = best_of(lambda: predict(model, dataset, work / "single.parquet"))
    out["predict, one process"] = {"seconds": seconds, "rows_per_s": total / seconds}
    for workers in (1, 2):
        log(f"scale: dask, {workers} worker(s) ...")
        started = time.perf_counter()
        with LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster:
            spawn = time.perf_counter() - started

            def job(address: str = cluster.scheduler_address) -> None:
                shutil.rmtree(work / "dask", ignore_errors=True)  # every partition, every run
                predict_dataset(model, dataset, work / "dask", scheduler=address, progress=False)

            seconds = best_of(job)
        out[f"dask, {workers} worker(s)"] = {
            "seconds": seconds,
            "rows_per_s": total / seconds,
            "cluster_start_seconds": spawn,
        }
    one, two = out["dask, 1 worker(s)"]["rows_per_s"], out["dask, 2 worker(s)"]["rows_per_s"]
    out["dask 2 workers / 1 worker"] = two / one
    return out


def format_table(results: dict[str, Any]) -> str:
    lines = []
    data = results.get("data")
    if data and "predict" in data:
        lines.append(f"data plane: {data['rows']} rows, {data['model']}")
        for name, t in data["predict"].items():
            lines.append(
                f"  {name:<46} {t['seconds']:7.2f} s {t['rows_per_s'] / 1e6:6.2f} Mrows/s "
                f"{t['ratio_to_minimal_loop']:5.2f}x  peak {t['peak_mib']:.0f} MiB"
            )
        for key, ratio in data["peak_ratio"].items():
            small, big = sorted(data["peak_mib"], key=int)
            lines.append(
                f"  peak RSS {key:<14} {data['peak_mib'][small][key]:.0f} MiB at {small} rows, "
                f"{data['peak_mib'][big][key]:.0f} MiB at {big} rows: {ratio:.2f}x"
            )
    if data and "verify" in data:
        v = data["verify"]
        lines.append(
            f"  verify --data ({v['rows']} rows): {v['wall_seconds']:.2f} s "
            f"({v['rows_per_s'] / 1e3:.0f}k rows/s), {v['ratio_to_runtime_compute']:.2f}x its "
            f"runtimes' own compute ("
            + ", ".join(f"{k} {t:.2f} s" for k, t in v["runtime_compute_seconds"].items())
            + f"; sum {sum(v['runtime_compute_seconds'].values()):.2f} s)"
        )
        lines.append(
            f"    reading the table alone {v['read_alone_seconds']:.2f} s; verify on 100 rows "
            f"(start-up, loading the runtimes) {v['verify_100_rows_seconds']:.2f} s; the rest, "
            f"{v['wall_seconds'] - v['verify_100_rows_seconds']:.2f} s, is "
            f"{v['per_row_ratio_to_runtime_compute']:.2f}x the runtimes' compute"
            + "".join(f"; skipped {k}" for k in v["skipped"])
        )
        if "wall_seconds_x3" in v:
            extra = sum(v["runtime_compute_seconds_x3"].values()) - sum(
                v["runtime_compute_seconds"].values()
            )
            lines.append(
                f"    throughput: on {v['rows_x3']} rows {v['wall_seconds_x3']:.2f} s; the "
                f"{v['rows_x3'] - v['rows']} extra rows took "
                f"{v['wall_seconds_x3'] - v['wall_seconds']:.2f} s "
                f"({v['throughput_rows_per_s'] / 1e6:.2f} M rows/s) against {extra:.2f} s of "
                f"runtime compute: {v['throughput_ratio_to_runtime_compute']:.2f}x"
            )
    scale = results.get("scale")
    if scale:
        lines.append(f"scale: {scale['rows']} rows in {scale['partitions']} Parquet partitions")
        for name in ("predict, one process", "dask, 1 worker(s)", "dask, 2 worker(s)"):
            t = scale[name]
            lines.append(f"  {name:<24} {t['seconds']:7.2f} s {t['rows_per_s'] / 1e6:6.2f} Mrows/s")
        lines.append(f"  dask 2 workers / 1 worker: {scale['dask 2 workers / 1 worker']:.2f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default="data,scale")
    parser.add_argument("--quick", action="store_true", help="200k rows instead of 2M")
    args = parser.parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(sections) - {"data", "scale", "verify-data"}
    if unknown:
        parser.error(f"unknown sections: {', '.join(sorted(unknown))}")
    rows, small, repeat = (200_000, 20_000, 1) if args.quick else (2_000_000, 200_000, 3)
    RESULTS.mkdir(exist_ok=True)
    work = RESULTS / "work-data"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    results: dict[str, Any] = {
        "format": "normexport.bench-data/1",
        "quick": args.quick,
        "cpus": os.cpu_count(),
        "loadavg_start": os.getloadavg(),
    }
    if "data" in sections:
        results["data"] = bench_data(work, rows, small, repeat, log)
    if "verify-data" in sections and "data" not in sections:  # its part of data, alone
        csv = work / f"rows{rows}.csv"
        log(f"verify-data: writing {rows} rows as CSV ...")
        write_rows(csv, rows)
        results["data"] = {"verify": bench_verify_compute(csv, rows, repeat, log)}
    if "scale" in sections:
        results["scale"] = bench_scale(work, 16, rows // 8, repeat, log)
    results["loadavg_end"] = os.getloadavg()
    text = format_table(results)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (RESULTS / f"bench-data-{stamp}.json").write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / "latest-data.txt").write_text(text + "\n")
    shutil.rmtree(work, ignore_errors=True)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
