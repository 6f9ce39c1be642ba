"""Benchmarks: what the baked-in normalization costs, and how export scales.

Run through ``scripts/bench`` (which makes sure ``.venv`` exists). Sections:

inference     onnxruntime (one intra-op thread): bare network, spliced, folded and the
              separate-file approach (NumPy scaling around the bare session), at batch 1,
              64 and 4096, interleaved; medians of per-call time and of the per-round
              ratio against the bare network measured in the same round.
export        every export path (``EXPORT_PATHS``: ``export DIR`` splice and fold,
              ``export --symbol/--params`` with ``--scalers`` and ``--factors``,
              ``nx.export(block)``, bake of inline and external weights) on the largest
              wide float32 network, ``export DIR`` on the demo and smaller ones, each case
              in a fresh subprocess: wall time, peak RSS beyond the baseline against
              ``EXPORT_RSS_TARGET``, a per-stage breakdown (the kernel's high-water mark
              is reset at every stage boundary through /proc/self/clear_refs) and the
              stage holding the peak. ``scripts/large_model`` runs the same cases at
              2 GiB.
training      samples per second of ``normexport.mx.training.train`` on the demo data,
              float32 and float64, interleaved.
defaults      the training defaults against the previous ones (200 epochs at batch 32,
              lr 0.01, no early stopping) on a table of 50,000 rows, 5 inputs and
              3 targets: wall time and hold-out error of each, alternating which runs
              first. Not in the default set (the previous defaults take minutes):
              ``--sections defaults``.
verification  rows per second of ``verify_directory`` and its peak memory, at two row
              counts (the peak must not grow with the rows: verification is chunked).
transforms    what ``log`` targets buy on a physics-like table whose three targets span
              about 6.6, 10 and 4.4 decades: the same network trained on min-max targets and
              on log-then-min-max targets (same inputs, split and seed), hold-out median
              relative error on each target's smallest 10% and count of negative
              predictions. Not in the default set (it trains for minutes):
              ``--sections transforms``.

Results go to ``bench-results/bench-<time>.json`` (and ``latest.json``) plus a readable
table (``latest.txt``). ``--quick`` is a one-minute version with smaller cases and fewer
rounds; its numbers are noisier.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import functools
import gc
import itertools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench-results"
INFERENCE_BATCHES = (1, 64, 4096)
INFERENCE_VARIANTS = (
    "bare",
    "bare-2",  # control: a second session of the same bare file (A/A); its ratio is the noise
    "spliced",
    "folded",
    "separate",
    "baked-fold",  # normexport.baking.bake on the bare file, when that verb exists
    "baked-splice",
    # other forms of the same splice: model.onnx rewritten by this script (not normexport's
    # output); the form model.onnx already has is skipped
    "alt-muladd",
    "alt-bn",
    "alt-gemm",
)
ALTERNATIVES = {
    "alt-muladd": ("muladd", "each spliced affine as Mul then Add of (1, n) constants"),
    "alt-bn": ("bn", "each spliced affine as BatchNormalization (mean 0, var 1, epsilon 0)"),
    "alt-gemm": ("gemm", "each spliced affine as Gemm with a diagonal matrix"),
}
TARGETS = {
    # variant: {batch: max ratio to bare}; "faster than separate at batch 1" is checked apart
    "spliced": {1: 1.10, 4096: 1.05},
    "folded": {1: 1.01, 64: 1.01, 4096: 1.01},
    "baked-fold": {1: 1.01, 64: 1.01, 4096: 1.01},
}
EXPORT_RSS_TARGET = 1.5  # peak RSS beyond the baseline, in multiples of the model's size

FULL = {
    "rounds": 600,
    "sessions": 5,
    "block_seconds": 0.002,
    "wide_widths": (2896, 5793, 11585),  # ~34 MB, ~134 MB, ~537 MB of float32 parameters
    "train_epochs": 20,
    "train_repeats": 3,
    "verify_rows": (100_000, 1_000_000),
    "defaults_rows": 50_000,
    "defaults_seeds": (0, 1, 2),
    "transforms_rows": 10_000,
    "transforms_seeds": (0, 1, 2),
}
QUICK = {
    "rounds": 40,
    "sessions": 2,
    "block_seconds": 0.001,
    "wide_widths": (1024, 2048, 4096),
    "train_epochs": 3,
    "train_repeats": 1,
    "verify_rows": (20_000, 200_000),
    "defaults_rows": 10_000,
    "defaults_seeds": (0,),
    "transforms_rows": 5_000,
    "transforms_seeds": (0,),
}


# ------------------------------------------------------------------------------ memory


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> bool:
    """Reset the kernel's RSS high-water mark (VmHWM) of this process to its current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


class Probe:
    """Wall time and peak RSS of named stages, nested, in one process.

    Before every reset of the high-water mark the current mark is read and credited to
    every open stage and to the whole run, so nested stages keep exact peaks.
    """

    def __init__(self) -> None:
        self.can_reset = _reset_peak()
        self.stages: dict[str, dict[str, Any]] = {}
        self.open: list[dict[str, Any]] = []
        self.peak_kib = _status_kib("VmHWM")

    def _absorb(self) -> int:
        mark = _status_kib("VmHWM")
        self.peak_kib = max(self.peak_kib, mark)
        for frame in self.open:
            frame["peak"] = max(frame["peak"], mark)
        return mark

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self._absorb()
        _reset_peak()
        frame = {"name": name, "peak": 0, "rss_before": _status_kib("VmRSS")}
        depth = len(self.open)
        self.open.append(frame)
        started = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - started
            self._absorb()
            self.open.pop()
            entry = self.stages.setdefault(
                name,
                {
                    "calls": 0,
                    "seconds": 0.0,
                    "peak_mib": 0.0,
                    "rss_before_mib": None,
                    "depth": depth,
                },
            )
            entry["calls"] += 1
            entry["seconds"] += elapsed
            entry["peak_mib"] = max(entry["peak_mib"], frame["peak"] / 1024)
            if entry["rss_before_mib"] is None:
                entry["rss_before_mib"] = frame["rss_before"] / 1024

    def wrap(self, module: Any, attr: str, label: Callable[..., str] | str | None = None) -> None:
        original = getattr(module, attr)
        probe = self

        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            name = label(*args, **kwargs) if callable(label) else (label or attr)
            with probe.stage(name):
                return original(*args, **kwargs)

        setattr(module, attr, timed)


def instrument_runtimes(probe: Probe, prefix: str = "verify: ") -> None:
    """Time and measure each verification runtime: its loading and its calls."""
    from normexport import verification

    for factory_name, runtime_name in (
        ("onnxruntime_runtime", "onnxruntime"),
        ("_mxnet_runtime", "mxnet"),
        ("numpy_runtime", "numpy"),
        ("onnx_reference_runtime", "onnx.reference"),
    ):
        factory = getattr(verification, factory_name)

        def make(
            *a: Any, _factory: Any = factory, _name: str = runtime_name, **k: Any
        ) -> Callable[[Any], Any]:
            name = _name if _name != "numpy" or len(a) < 4 else f"numpy {a[3]}"
            with probe.stage(f"{prefix}load {name}"):
                run = _factory(*a, **k)

            def call(chunk: Any) -> Any:
                with probe.stage(f"{prefix}run {name}"):
                    return run(chunk)

            return call

        setattr(verification, factory_name, make)


def _heavy_imports() -> None:
    """Everything an export or a verification imports, so the baseline includes it."""
    import mxnet  # noqa: F401
    import numpy  # noqa: F401
    import onnx
    import onnx.reference  # noqa: F401
    import onnxruntime  # noqa: F401

    import normexport.mx.exporting
    import normexport.verification  # noqa: F401


def _baseline() -> dict[str, float]:
    return {"rss_mib": _status_kib("VmRSS") / 1024, "hwm_mib": _status_kib("VmHWM") / 1024}


# ------------------------------------------------------------------------------ workers
# Each worker runs in a fresh interpreter (python bench.py --worker NAME ARGS_JSON) and
# prints one JSON line.


def _wide_net(width: int) -> tuple[Any, Any, Any]:
    """The benchmark's wide float32 network (3 → W → W → 2, sigmoid), run forward once,
    and min-max scalers fitted on random rows: ``(net, in_scaler, out_scaler)``."""
    import mxnet as mx
    import numpy as np

    from normexport.mx.training import build_net
    from normexport.scaling import MinMaxScaler

    mx.random.seed(0)
    net = build_net(2, hidden=(width, width), activation="sigmoid", dtype="float32")
    net.initialize(mx.init.Xavier(), ctx=mx.cpu())
    net(mx.nd.zeros((1, 3), dtype="float32"))
    mx.nd.waitall()  # MXNet initializes asynchronously: the weights exist from here on
    rng = np.random.default_rng(0)
    X = rng.uniform([200, 0, 0], [400, 0.05, 1], size=(256, 3))
    Y = rng.uniform(-1, 1, size=(256, 2))
    in_sc = MinMaxScaler().fit(X, columns=["temp_k", "strain", "frac"])
    out_sc = MinMaxScaler().fit(Y, columns=["load", "offset"], target=True)
    return net, in_sc, out_sc


def worker_prepare_wide(args: dict[str, Any]) -> dict[str, Any]:
    """Write a model directory (scalers.json + net-*) of a wide float32 network, and the
    same factors as a side file (``factors.txt``, rows of scale and shift)."""
    import numpy as np

    from normexport import files, modeldir
    from normexport.mx import checkpoint, graph
    from normexport.scaling import scalers_to_dict

    width, out = int(args["width"]), Path(args["dir"])
    out.mkdir(parents=True, exist_ok=True)
    net, in_sc, out_sc = _wide_net(width)
    ckpt = graph.from_block(net)
    checkpoint.save_checkpoint(ckpt, out, modeldir.NET_PREFIX)
    files.write_json(out / modeldir.SCALERS_FILE, scalers_to_dict(in_sc, out_sc, "float32"))
    sides = (in_sc.affine(), out_sc.inverse_affine())
    np.savetxt(side_dir(out) / FACTORS_FILE, np.vstack([np.column_stack(x) for x in sides]))
    params = sum(int(np.prod(v.shape)) for v in ckpt.arg_params.values())
    return {
        "parameters": params,
        "params_bytes": modeldir.params_file(out, modeldir.NET_PREFIX).stat().st_size,
    }


FACTORS_FILE = "factors.txt"


def side_dir(directory: Path) -> Path:
    """Beside a prepared model directory (which ``export DIR`` replaces as a whole): the
    factors file, the bare ONNX files for bake, and the other paths' output directory."""
    side = directory.parent / f"{directory.name}-side"
    side.mkdir(parents=True, exist_ok=True)
    return side


def worker_prepare_onnx(args: dict[str, Any]) -> dict[str, Any]:
    """Write a bare ONNX file of the wide network's shape (``Gemm``/``Sigmoid``, random
    float32 weights) for bake: weights inline (``raw_data``) or in external data."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    from normexport import onnxkit

    width, path = int(args["width"]), Path(args["path"])
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    widths = (3, width, width, 2)
    params: dict[str, Any] = {}
    nodes, inits, x = [], [], "input"
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        w = rng.standard_normal((b, a), dtype=np.float32)
        w *= np.float32((2.0 / (a + b)) ** 0.5)
        params[f"w{i}"], params[f"b{i}"] = w, np.zeros(b, np.float32)
        for name in (f"w{i}", f"b{i}"):
            dims = params[name].shape
            inits.append(TensorProto(name=name, dims=dims, data_type=TensorProto.FLOAT))
        last = i == len(widths) - 2
        gemm = "output" if last else f"g{i}"
        nodes.append(helper.make_node("Gemm", [x, f"w{i}", f"b{i}"], [gemm], transB=1))
        if not last:
            x = f"h{i}"
            nodes.append(helper.make_node("Sigmoid", [gemm], [x]))
    graph = helper.make_graph(
        nodes,
        "bare",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 2])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    external = path.name + ".data" if args.get("external") else None
    onnxkit.write_model(model, path, params, external=external)
    onnx.checker.check_model(str(path))
    return {
        "parameters": sum(v.size for v in params.values()),
        "params_bytes": sum(v.nbytes for v in params.values()),
    }


EXPORT_PATHS = {
    "dir": "export DIR",
    "scalers": "export --symbol --params --scalers",
    "factors": "export --symbol --params --factors",
    "api": "nx.export(block, ...)",
    "bake": "bake MODEL.onnx --factors",
}


def _instrument_export(probe: Probe) -> None:
    from normexport import baking, onnxkit, verification
    from normexport.mx import checkpoint, exporter, exporting, graph

    probe.wrap(checkpoint, "load_checkpoint", "load checkpoint")
    probe.wrap(graph, "from_block", "checkpoint of the block")
    probe.wrap(graph, "splice", "splice")
    probe.wrap(graph, "fold", "fold")
    probe.wrap(checkpoint, "save_checkpoint", lambda c, d, p: f"save checkpoint ({p}-*)")
    probe.wrap(exporting, "convert", "onnx: total")
    probe.wrap(exporter, "export_graph", "onnx: MXNet exporter (hollow)")
    probe.wrap(exporter, "post_process", "onnx: post-processing passes")
    probe.wrap(exporter, "write_model", "onnx: write weights (streamed)")
    probe.wrap(exporting, "check", "onnx: checker (full_check)")
    probe.wrap(exporting, "verify_directory", "verify: total")
    instrument_runtimes(probe)
    probe.wrap(verification, "compare", "verify: all rows, all runtimes")
    probe.wrap(exporting, "write_manifest", "manifest (sha256 of files)")
    probe.wrap(baking, "load_model", "bake: load and check the input")
    probe.wrap(baking, "_transform", "bake: splice/fold (graph)")
    probe.wrap(baking, "_save", "bake: write (streamed)")
    probe.wrap(onnxkit, "check", "bake: checker (full_check)")
    probe.wrap(baking, "verify_bake", "bake: verify")
    probe.wrap(
        baking._Runner, "runtime", lambda self, path, label: f"bake: load ort {Path(path).name}"
    )


def worker_export(args: dict[str, Any]) -> dict[str, Any]:
    """One export path (``EXPORT_PATHS``) on one prepared model, instrumented stage by stage.

    The baseline is the RSS after the imports (and, for the API path, after building the
    network the user already holds), so what is beyond it is what the export costs.
    """
    _heavy_imports()
    import normexport as nx
    from normexport import baking, modeldir, onnxkit
    from normexport.errors import VerificationError
    from normexport.mx import exporting

    path, directory = args.get("path", "dir"), Path(args["dir"])
    side = side_dir(directory)
    out_dir = side / "out"
    if path == "api":
        net, in_sc, out_sc = _wide_net(int(args["width"]))
    gc.collect()
    base = _baseline()
    probe = Probe()
    _instrument_export(probe)
    if args.get("external"):
        onnxkit.EXTERNAL_DATA_THRESHOLD = 0  # force the external-data path at any size
    if args.get("inline"):
        onnxkit.EXTERNAL_DATA_THRESHOLD = 2**31  # weights inline up to protobuf's limit
    net_files = (directory / "net-symbol.json", directory / "net-0000.params")
    ok, error = True, ""
    started = time.perf_counter()
    with probe.stage("export total"):
        try:
            if path == "dir":
                exporting.export_directory(directory, mode=args["mode"])
                out_dir = directory
            elif path == "scalers":
                exporting.export_files(
                    *net_files,
                    out_dir,
                    scalers=directory / modeldir.SCALERS_FILE,
                    mode=args["mode"],
                )
            elif path == "factors":
                exporting.export_files(
                    *net_files, out_dir, factors=side / FACTORS_FILE, mode=args["mode"]
                )
            elif path == "api":
                nx.export(net, in_sc, out_sc, out_dir, mode=args["mode"])
            elif path == "bake":
                out_dir.mkdir(exist_ok=True)
                baking.bake(
                    side / args["onnx"],
                    out_dir / "baked.onnx",
                    factors=side / FACTORS_FILE,
                    mode=args["mode"],
                )
            else:
                raise ValueError(f"unknown export path {path!r}")
        except VerificationError as exc:
            ok, error = False, first_line(exc)
    wall = time.perf_counter() - started
    files = {p.name: p.stat().st_size for p in sorted(out_dir.iterdir()) if p.is_file()}
    if path == "bake":
        model_bytes = int(args["params_bytes"])
    else:
        model_bytes = net_files[1].stat().st_size if net_files[1].exists() else 0
        if path == "api":
            model_bytes = modeldir.params_file(out_dir, modeldir.NET_PREFIX).stat().st_size
    if out_dir != directory:
        shutil.rmtree(out_dir, ignore_errors=True)
    return {
        "ok": ok,
        "error": error,
        "external_data": any(name.endswith(".data") for name in files),
        "baseline": base,
        "hwm_reset_supported": probe.can_reset,
        "wall_seconds": wall,
        "peak_mib": probe.peak_kib / 1024,
        "peak_stage": peak_stage(probe.stages),
        "stages": probe.stages,
        "files": files,
        "params_bytes": model_bytes,
    }


def peak_stage(stages: dict[str, dict[str, Any]]) -> str:
    """The innermost stage that holds the overall peak."""
    return max(stages, key=lambda k: (stages[k]["peak_mib"], stages[k]["depth"]))


def worker_verify(args: dict[str, Any]) -> dict[str, Any]:
    """``verify_directory`` over N random rows of the training box, per runtime."""
    _heavy_imports()
    from normexport import modeldir, verification

    directory, n = Path(args["dir"]), int(args["rows"])
    in_scaler, _, _ = modeldir.load_scalers(directory / modeldir.SCALERS_FILE)
    X = verification.random_rows(in_scaler, n, seed=1)
    gc.collect()
    base = _baseline()
    probe = Probe()
    instrument_runtimes(probe, prefix="")
    started = time.perf_counter()
    with probe.stage("verify"):
        report = verification.verify_directory(directory, X)
    wall = time.perf_counter() - started
    return {
        "ok": report.ok,
        "rows": report.rows,
        "runtimes": report.runtimes,
        "baseline": base,
        "input_mib": X.nbytes / 2**20,
        "wall_seconds": wall,
        "rows_per_second": report.rows / wall,
        "runtime_seconds": {
            k[4:]: v["seconds"] for k, v in probe.stages.items() if k.startswith("run ")
        },
        "peak_mib": probe.peak_kib / 1024,
        "stages": probe.stages,
        "chunk_rows": verification.CHUNK_ROWS,
    }


def worker_baseline(args: dict[str, Any]) -> dict[str, Any]:
    bare = _baseline()
    _heavy_imports()
    return {"python_only": bare, "with_imports": _baseline()}


WORKERS = {
    "prepare_wide": worker_prepare_wide,
    "prepare_onnx": worker_prepare_onnx,
    "export": worker_export,
    "verify": worker_verify,
    "baseline": worker_baseline,
}


def _mem_available_mib() -> float:
    with open("/proc/meminfo") as handle:
        for line in handle:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    return float("inf")


def run_worker(
    name: str, args: dict[str, Any], timeout: float = 3600, min_available_mib: float = 1536
) -> dict[str, Any]:
    """Run a worker in a fresh interpreter; kill it (and only it) if the machine's available
    memory falls below ``min_available_mib`` (the machine is shared)."""
    import threading

    env = {**os.environ, "MPLBACKEND": "Agg", "PYTHONHASHSEED": "0"}
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--worker", name, json.dumps(args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )
    killed: list[str] = []

    def watch() -> None:
        started = time.monotonic()
        while proc.poll() is None:
            available = _mem_available_mib()
            if available < min_available_mib or time.monotonic() - started > timeout:
                killed.append(
                    f"available memory {available:.0f} MiB"
                    if available < min_available_mib
                    else f"timeout {timeout} s"
                )
                proc.kill()
                return
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    stdout, stderr = proc.communicate()
    watcher.join()
    if killed:
        raise RuntimeError(f"worker {name} {args} stopped by the watchdog: {killed[0]}")
    if proc.returncode != 0:
        raise RuntimeError(f"worker {name} {args} failed:\n{stderr[-4000:]}")
    return json.loads(stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


# ------------------------------------------------------------------------------ fixtures


def demo_options() -> dict[str, Any]:
    """The demo's training settings (``normexport.mx.demo.run_demo``), without the epochs."""
    import inspect

    from normexport.mx import demo
    from normexport.mx.training import train

    options: dict[str, Any] = {
        "hidden": demo.HIDDEN,
        "activation": "sigmoid",
        "batch_size": demo.BATCH_SIZE,
        "lr": demo.LR,
    }
    if "lr_schedule" in inspect.signature(train).parameters:
        options["lr_schedule"] = "cosine"
    if "patience" in inspect.signature(train).parameters:
        options["patience"] = None  # as the demo: the cosine schedule runs every epoch
    return options


def prepare_demo(work: Path, dtype: str, epochs: int) -> Path:
    """The demo network (Munsell data, 3-32-32-32-2 sigmoid), briefly trained, exported
    spliced (``DIR``), folded (``DIR/fold``) and bare (``DIR/bare.onnx``)."""
    from normexport import modeldir
    from normexport.mx import checkpoint, demo, exporter, exporting

    out = work / f"demo-{dtype}"
    if (out / "bare.onnx").is_file():
        return out  # prepared earlier in this run
    shutil.rmtree(out, ignore_errors=True)
    exporting.train_to_directory(
        demo.data_path(),
        demo.INPUTS,
        demo.TARGETS,
        out,
        dtype=dtype,
        epochs=epochs,
        progress=False,
        **demo_options(),
    )
    exporting.export_directory(out, mode="splice")
    in_scaler, out_scaler, _ = modeldir.load_scalers(out / modeldir.SCALERS_FILE)
    exporting.export(
        str(out / modeldir.NET_PREFIX), in_scaler, out_scaler, out / "fold", mode="fold"
    )
    net = checkpoint.load_checkpoint(
        modeldir.symbol_file(out, modeldir.NET_PREFIX),
        modeldir.params_file(out, modeldir.NET_PREFIX),
    )
    exporter.convert(
        net,
        out / "bare.onnx",
        n_inputs=len(demo.INPUTS),
        n_outputs=len(demo.TARGETS),
        dtype=dtype,
        metadata={},
    )
    return out


def baked_files(model_dir: Path) -> tuple[dict[str, Path], str]:
    """The bare file baked by ``normexport.baking.bake`` (fold and splice), if it exists."""
    try:
        from normexport import baking, modeldir
    except ImportError:
        return {}, "normexport.baking does not exist yet"
    bake = getattr(baking, "bake", None)
    if bake is None:
        return {}, "normexport.baking has no bake()"
    files = {}
    for mode in ("fold", "splice"):
        out = model_dir / f"baked-{mode}.onnx"
        try:
            bake(model_dir / "bare.onnx", out, scalers=model_dir / modeldir.SCALERS_FILE, mode=mode)
        except Exception as exc:
            return files, f"bake(mode={mode}) failed: {type(exc).__name__}: {first_line(exc)}"
        files[f"baked-{mode}"] = out
    return files, ""


def first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0]


# ------------------------------------------------------------------------------ inference


def _affine_sites(model: Any) -> tuple[str, list[dict[str, Any]]]:
    """The spliced affines of ``model``: constant ``Mul`` → ``Add`` pairs or inference
    ``BatchNormalization`` nodes (mean 0, variance 1, epsilon 0). Returns the form found
    (``"muladd"``, ``"bn"`` or ``""``) and, per affine, its nodes, input, output and
    (scale, shift)."""
    import numpy as np
    from onnx import numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    value = {name: numpy_helper.to_array(t) for name, t in inits.items()}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    sites, forms = [], set()
    for node in graph.node:
        users = consumers.get(node.output[0], [])
        if (
            node.op_type == "Mul"
            and node.input[1] in inits
            and len(users) == 1
            and users[0].op_type == "Add"
            and users[0].input[0] == node.output[0]
            and users[0].input[1] in inits
        ):
            scale, shift = value[node.input[1]], value[users[0].input[1]]
            sites.append(
                {
                    "nodes": [node, users[0]],
                    "x": node.input[0],
                    "y": users[0].output[0],
                    "scale": scale.reshape(-1),
                    "shift": shift.reshape(-1),
                }
            )
            forms.add("muladd")
        elif node.op_type == "BatchNormalization" and all(n in inits for n in node.input[1:5]):
            eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
            mean, var = value[node.input[3]], value[node.input[4]]
            if eps == 0 and not mean.any() and np.all(var == 1):
                sites.append(
                    {
                        "nodes": [node],
                        "x": node.input[0],
                        "y": node.output[0],
                        "scale": value[node.input[1]],
                        "shift": value[node.input[2]],
                    }
                )
                forms.add("bn")
    return (forms.pop() if len(forms) == 1 else ""), sites


def rewrite_affines(src: Path, dst: Path, form: str) -> str:
    """Write ``src`` with each spliced affine expressed as ``form``; return the form it had.

    ``form`` is ``"muladd"`` (``Mul`` then ``Add`` of ``(1, n)`` constants, as MXNet's
    exporter translates the splice), ``"bn"`` (``BatchNormalization`` in inference mode:
    mean 0, variance 1, epsilon 0, so ``y = x * scale + bias`` exactly) or ``"gemm"``
    (``Gemm`` with ``diag(scale)`` and ``bias``). A measurement aid for choosing the
    spliced form, not part of normexport.
    """
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(src))
    graph = model.graph
    found, sites = _affine_sites(model)
    by_first = {id(site["nodes"][0]): site for site in sites}
    drop = {id(n) for site in sites for n in site["nodes"][1:]}
    nodes = []
    for node in graph.node:
        if id(node) in drop:
            continue
        site = by_first.get(id(node))
        if site is None:
            nodes.append(node)
            continue
        x, y, scale, shift = site["x"], site["y"], site["scale"], site["shift"]
        p = f"{node.name or y}_bench"
        if form == "bn":
            consts = {
                f"{p}_scale": scale,
                f"{p}_bias": shift,
                f"{p}_mean": np.zeros_like(scale),
                f"{p}_var": np.ones_like(scale),
            }
            new = [helper.make_node("BatchNormalization", [x, *consts], [y], name=p, epsilon=0.0)]
        elif form == "gemm":
            consts = {f"{p}_diag": np.diag(scale), f"{p}_bias": shift}
            new = [helper.make_node("Gemm", [x, *consts], [y], name=p)]
        else:
            consts = {f"{p}_scale": scale.reshape(1, -1), f"{p}_shift": shift.reshape(1, -1)}
            new = [
                helper.make_node("Mul", [x, f"{p}_scale"], [f"{p}_mul"], name=f"{p}_mul"),
                helper.make_node("Add", [f"{p}_mul", f"{p}_shift"], [y], name=f"{p}_add"),
            ]
        graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in consts.items())
        nodes.extend(new)
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(dst))
    return found


def _session(path: Path, optimized: Path | None = None) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    if optimized is not None:
        options.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _optimized_ops(path: Path, tmp: Path) -> list[str]:
    import onnx

    target = tmp / f"{path.stem}.optimized.onnx"
    _session(path, target)
    return [n.op_type for n in onnx.load(str(target)).graph.node]


def bench_inference(work: Path, cfg: dict[str, Any], dtype: str, log: Callable[[str], None]):
    import numpy as np

    from normexport import modeldir, tables
    from normexport.mx import demo

    model_dir = prepare_demo(work, dtype, cfg["train_epochs"])
    in_scaler, out_scaler, _ = modeldir.load_scalers(model_dir / modeldir.SCALERS_FILE)
    files = {
        "bare": model_dir / "bare.onnx",
        "spliced": model_dir / modeldir.ONNX_FILE,
        "folded": model_dir / "fold" / modeldir.ONNX_FILE,
    }
    baked, baked_note = baked_files(model_dir)
    files.update(baked)
    import onnx

    spliced_form, _ = _affine_sites(onnx.load(str(files["spliced"])))
    alternatives = {}
    for name, (form, what) in ALTERNATIVES.items():
        if form != spliced_form:
            files[name] = model_dir / f"{name}.onnx"
            rewrite_affines(files["spliced"], files[name], form)
            alternatives[name] = what
    files["bare-2"] = files["bare"]
    # Several sessions per variant, used in turn: two sessions of one file can differ by
    # 15-25% at some batch sizes (buffer placement), which a single session would book
    # as a difference between variants. "bare-2" (A/A) shows what remains.
    k = cfg["sessions"]
    sessions = {name: [_session(path) for _ in range(k)] for name, path in files.items()}
    sessions["separate"] = [_session(files["bare"]) for _ in range(k)]
    in_s, in_t = (np.asarray(a, dtype=dtype) for a in in_scaler.affine())
    out_s, out_t = (np.asarray(a, dtype=dtype) for a in out_scaler.inverse_affine())

    def separate(run: Callable[..., Any], x: np.ndarray) -> np.ndarray:
        y = run(None, {"input": x * in_s + in_t})[0]
        return y * out_s + out_t

    data = tables.load_columns(demo.data_path(), demo.INPUTS)
    rng = np.random.default_rng(0)
    results: dict[str, Any] = {
        "dtype": dtype,
        "model": f"{len(demo.INPUTS)}-{'-'.join(map(str, demo.HIDDEN))}-{len(demo.TARGETS)} "
        "sigmoid (Munsell demo)",
        "baked_note": baked_note,
        "optimized_ops": {n: _optimized_ops(p, work) for n, p in files.items() if n != "bare-2"},
        "spliced_form": spliced_form,
        "alternatives": alternatives,
        "batches": {},
    }
    for batch in INFERENCE_BATCHES:
        raw = np.ascontiguousarray(data[rng.integers(0, len(data), batch)].astype(dtype))
        norm = np.ascontiguousarray(raw * in_s + in_t)
        calls: dict[str, list[Callable[[], Any]]] = {}
        for name, group in sessions.items():
            if name == "separate":
                calls[name] = [functools.partial(separate, sess.run, raw) for sess in group]
                continue
            feed = {"input": norm if name.startswith("bare") else raw}
            calls[name] = [functools.partial(sess.run, None, feed) for sess in group]
        # Same function, same rows: the baked-in files against the separate-file approach.
        reference = calls["separate"][0]()
        span = out_scaler.span()
        agreement = {
            name: float(np.max(np.abs(calls[name][0]()[0] - reference) / span))
            for name in calls
            if not name.startswith("bare") and name != "separate"
        }
        names = [v for v in INFERENCE_VARIANTS if v in calls]
        for group in calls.values():  # warm up (allocations, first-run planning)
            for fn in group:
                for _ in range(20):
                    fn()
        block = {}
        for name in names:  # calls per timed block, so one block lasts ~block_seconds
            t0 = time.perf_counter()
            for _ in range(20):
                calls[name][0]()
            per_call = (time.perf_counter() - t0) / 20
            block[name] = max(1, round(cfg["block_seconds"] / per_call))
        times: dict[str, list[float]] = {n: [] for n in names}
        ratios: dict[str, list[float]] = {n: [] for n in names if n != "bare"}
        clock = time.perf_counter
        gc.disable()
        try:
            for r in range(cfg["rounds"]):
                order = names[r % len(names) :] + names[: r % len(names)]
                this_round = {}
                for name in order:
                    group = calls[name]
                    # each variant walks through its sessions, offset so pairs vary
                    fn = group[(r + names.index(name)) % len(group)]
                    n_calls = block[name]
                    t0 = clock()
                    for _ in range(n_calls):
                        fn()
                    this_round[name] = (clock() - t0) / n_calls
                for name, value in this_round.items():
                    times[name].append(value)
                    if name != "bare":
                        ratios[name].append(value / this_round["bare"])
        finally:
            gc.enable()
        entry = {
            "rounds": cfg["rounds"],
            "sessions_per_variant": k,
            "calls_per_block": block,
            "median_us": {n: 1e6 * statistics.median(v) for n, v in times.items()},
            "ratio_to_bare": {n: statistics.median(v) for n, v in ratios.items()},
            "ratio_iqr": {n: _quartiles(v) for n, v in ratios.items()},
            "max_rel_diff_vs_separate": agreement,
        }
        if "separate" in ratios:
            entry["ratio_to_separate"] = {
                n: statistics.median(
                    a / b for a, b in zip(times[n], times["separate"], strict=True)
                )
                for n in names
                if not n.startswith("bare") and n != "separate"
            }
        results["batches"][str(batch)] = entry
        log(
            f"  inference {dtype} batch {batch}: "
            + ", ".join(f"{n} {entry['ratio_to_bare'][n]:.3f}x" for n in ratios)
        )
    results["targets"] = inference_targets(results)
    return results


def _quartiles(values: list[float]) -> list[float]:
    q = statistics.quantiles(values, n=4)
    return [q[0], q[2]]


def inference_targets(results: dict[str, Any]) -> dict[str, Any]:
    checks = {}
    for variant, limits in TARGETS.items():
        for batch, limit in limits.items():
            entry = results["batches"].get(str(batch))
            if entry and variant in entry["ratio_to_bare"]:
                value = entry["ratio_to_bare"][variant]
                checks[f"{variant} batch {batch} <= {limit}x bare"] = {
                    "value": value,
                    "met": value <= limit,
                }
    entry = results["batches"].get("1")
    if entry and "ratio_to_separate" in entry:
        for variant in ("spliced", "folded"):
            value = entry["ratio_to_separate"][variant]
            checks[f"{variant} batch 1 faster than separate"] = {"value": value, "met": value < 1}
    return checks


# ------------------------------------------------------------------------------ export


def path_cases(width: int, paths: tuple[str, ...] = tuple(EXPORT_PATHS)) -> list[dict[str, Any]]:
    """Every export path on the wide network of ``width``: ``export DIR`` (splice, fold,
    and splice with the weights inline in ``model.onnx``), ``export --symbol/--params``
    with ``--scalers`` and with ``--factors``, the API on a live block, and bake of a
    bare ONNX file with its weights inline (below protobuf's 2 GiB limit) and in
    external data."""
    cases: list[dict[str, Any]] = []
    inline_fits = 4 * (width * width + 6 * width) < 2**31 - 2**20
    for path in paths:
        name = f"W={width} {EXPORT_PATHS[path]}"
        if path == "dir":
            cases.append({"name": f"{name} (splice)", "path": path, "mode": "splice"})
            cases.append({"name": f"{name} (fold)", "path": path, "mode": "fold"})
            if inline_fits:
                cases.append(
                    {
                        "name": f"{name} (splice, inline)",
                        "path": path,
                        "mode": "splice",
                        "inline": True,
                    }
                )
        elif path == "bake":
            for external in (False, True) if inline_fits else (True,):
                where = "external data" if external else "inline"
                onnx_name = f"bare-{'ext' if external else 'raw'}.onnx"
                cases.append(
                    {
                        "name": f"{name} ({where})",
                        "path": path,
                        "mode": "splice",
                        "onnx": onnx_name,
                        "onnx_external": external,
                    }
                )
        else:
            cases.append({"name": name, "path": path, "mode": "splice"})
    for case in cases:
        case["width"] = width
    return cases


def run_export_case(
    case: dict[str, Any], directory: Path, log: Callable[[str], None], min_available_mib: float
) -> dict[str, Any]:
    """Prepare what ``case`` needs in ``directory`` (kept between cases of one width) and
    run it in a fresh process; returns the case with its measurements."""
    info: dict[str, Any] = {}
    if case["width"] is not None and not (directory / "net-0000.params").exists():
        shutil.rmtree(directory, ignore_errors=True)
        info = run_worker(
            "prepare_wide",
            {"width": case["width"], "dir": str(directory)},
            min_available_mib=min_available_mib,
        )
        (side_dir(directory) / "prepared.json").write_text(json.dumps(info))
    elif case["width"] is not None:
        info = json.loads((side_dir(directory) / "prepared.json").read_text())
    args: dict[str, Any] = {
        "dir": str(directory),
        "path": case["path"],
        "mode": case["mode"],
        "width": case["width"],
        "external": case.get("external"),
    }
    if case.get("inline"):
        args["inline"] = True
    if case["path"] == "bake":
        onnx_args = {
            "width": case["width"],
            "path": str(side_dir(directory) / case["onnx"]),
            "external": case["onnx_external"],
        }
        info = run_worker("prepare_onnx", onnx_args, min_available_mib=min_available_mib)
        args.update(onnx=case["onnx"], params_bytes=info["params_bytes"])
    try:
        result = run_worker("export", args, min_available_mib=min_available_mib)
    finally:
        if case["path"] == "bake":
            for leftover in side_dir(directory).glob(case["onnx"] + "*"):
                leftover.unlink()
    model_mib = result["params_bytes"] / 2**20
    beyond = result["peak_mib"] - result["baseline"]["rss_mib"]
    entry = {
        **case,
        "parameters": info.get("parameters"),
        "model_mib": model_mib,
        "peak_beyond_baseline_mib": beyond,
        "peak_over_model": beyond / model_mib,
        "seconds_per_gib": result["wall_seconds"] / (model_mib / 1024),
        **result,
    }
    log(
        f"  {case['name']}: {model_mib:.1f} MiB model, {result['wall_seconds']:.2f} s, "
        f"peak +{beyond:.0f} MiB over baseline ({beyond / model_mib:.2f}x model) in "
        f"'{result['peak_stage']}'{'' if result['ok'] else ' (verification FAILED)'}"
    )
    return entry


def bench_export(work: Path, cfg: dict[str, Any], log: Callable[[str], None]) -> dict[str, Any]:
    baseline = run_worker("baseline", {})
    demo_dir = work / "demo-float64"
    cases = [
        {"name": f"demo float64 (export DIR, {mode})", "path": "dir", "mode": mode, "width": None}
        for mode in ("splice", "fold")
    ]
    for width in cfg["wide_widths"][:-1]:
        cases.append(
            {
                "name": f"W={width} export DIR (splice)",
                "path": "dir",
                "mode": "splice",
                "width": width,
            }
        )
    cases += path_cases(cfg["wide_widths"][-1])
    out: dict[str, Any] = {"baseline": baseline, "target": EXPORT_RSS_TARGET, "cases": []}
    for case in cases:
        directory = demo_dir if case["width"] is None else work / f"wide-{case['width']}"
        out["cases"].append(run_export_case(case, directory, log, 1536))
        later = [c for c in cases[cases.index(case) + 1 :] if c["width"] == case["width"]]
        if case["width"] is not None and not later:
            shutil.rmtree(directory, ignore_errors=True)
            shutil.rmtree(side_dir(directory), ignore_errors=True)
    plain = [c for c in out["cases"] if c["name"].endswith("export DIR (splice)")]
    if len(plain) >= 2:
        # Growth between the smallest and largest wide case: marginal seconds and MiB per MiB.
        a, b = plain[0], plain[-1]
        dm = b["model_mib"] - a["model_mib"]
        out["growth"] = {
            "seconds_per_gib": 1024 * (b["wall_seconds"] - a["wall_seconds"]) / dm,
            "peak_mib_per_model_mib": (
                b["peak_beyond_baseline_mib"] - a["peak_beyond_baseline_mib"]
            )
            / dm,
        }
    largest = [c for c in out["cases"] if c["width"] == cfg["wide_widths"][-1]]
    out["met"] = {c["name"]: c["peak_over_model"] <= EXPORT_RSS_TARGET for c in largest if c["ok"]}
    return out


# ------------------------------------------------------------------------------ training


def bench_training(cfg: dict[str, Any], log: Callable[[str], None]) -> dict[str, Any]:
    from normexport import tables
    from normexport.mx import demo
    from normexport.mx.training import train

    X, Y = tables.load_table(demo.data_path(), [demo.INPUTS, demo.TARGETS])
    epochs = cfg["train_epochs"]
    options = demo_options()
    runs: dict[str, list[float]] = {"float32": [], "float64": []}
    rows = 0
    for _ in range(cfg["train_repeats"]):
        for dtype in ("float64", "float32"):
            result = train(
                X,
                Y,
                input_columns=demo.INPUTS,
                target_columns=demo.TARGETS,
                dtype=dtype,
                epochs=epochs,
                progress=False,
                **options,
            )
            rows = result.settings["train_rows"]
            per_epoch = (rows // demo.BATCH_SIZE) * demo.BATCH_SIZE  # full batches only
            runs[dtype].append(per_epoch * epochs / result.seconds)
    out = {
        "network": f"3-{'-'.join(map(str, demo.HIDDEN))}-2 sigmoid, Adam, batch "
        f"{demo.BATCH_SIZE}, {epochs} epochs per run, validation pass each epoch included",
        "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()},
        "train_rows": rows,
        "samples_per_second": {k: statistics.median(v) for k, v in runs.items()},
        "runs": runs,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "(unset)"),
    }
    log(
        "  training: "
        + ", ".join(f"{k} {v:,.0f} samples/s" for k, v in out["samples_per_second"].items())
    )
    return out


# The training defaults before issue 20: every epoch of 200 runs, batch 32, a constant 0.01.
PREVIOUS_DEFAULTS = {
    "epochs": 200,
    "batch_size": 32,
    "lr": 0.01,
    "lr_schedule": "constant",
    "patience": None,
}
DEFAULTS_SPEEDUP_TARGET = 4.0
DEFAULTS_TARGET_ROWS = 50_000


def training_problem(n: int, seed: int = 0) -> tuple[Any, Any]:
    """n rows: 5 inputs on very different raw ranges, 3 smooth targets (0-100, 0-40,
    0-1000 or so): the table the training defaults are measured on."""
    import numpy as np

    rng = np.random.default_rng(seed)
    low = np.array([250.0, 0.0, -5.0, 1e3, 0.1])
    high = np.array([350.0, 0.01, 5.0, 2e3, 10.0])
    X = rng.uniform(low, high, size=(n, 5))
    u = (X - low) / (high - low)
    Y = np.column_stack(
        [
            100 * (0.5 + 0.4 * np.sin(2 * u[:, 0] + u[:, 1]) * u[:, 2]),
            40 * (0.5 + 0.3 * np.cos(3 * u[:, 3]) * u[:, 4] + 0.2 * u[:, 0] ** 2),
            1e3 * (u[:, 1] * u[:, 2] + 0.3 * np.tanh(2 * u[:, 3] - 1) + 0.1 * u[:, 4]),
        ]
    )
    return X, Y


K_B = 8.617333262e-5  # Boltzmann's constant, eV/K
PHYSICS_TARGETS = ("rate", "flux", "path")


def physics_table(n: int, seed: int = 0) -> tuple[Any, Any]:
    """n rows of a physics-like table: temperature 600-1500 K, activation energy
    0.5-1.0 eV and pressure 0.01-100 bar (log-uniform) -> an Arrhenius rate (up to 6.7
    decades), the rate times the pressure (up to 10.7) and a mean free path ~ T/p (4.4)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    T = rng.uniform(600.0, 1500.0, n)
    E = rng.uniform(0.5, 1.0, n)
    p = 10.0 ** rng.uniform(-2.0, 2.0, n)
    rate = 1e3 * np.exp(-E / (K_B * T))
    return np.column_stack([T, E, p]), np.column_stack([rate, rate * p, 1e-3 * T / p])


def small_decile_error(true: Any, pred: Any) -> list[float]:
    """Per target, the median relative error |pred / true - 1| over the rows holding the
    smallest 10% of its true values."""
    import numpy as np

    out = []
    for j in range(true.shape[1]):
        small = true[:, j] <= np.quantile(true[:, j], 0.1)
        out.append(float(np.median(np.abs(pred[small, j] / true[small, j] - 1.0))))
    return out


def bench_transforms(cfg: dict[str, Any], log: Callable[[str], None]) -> dict[str, Any]:
    """The physics table trained twice per seed, on min-max and on log targets."""
    import numpy as np

    import normexport as nx
    from normexport.mx.training import train

    X, Y = physics_table(cfg["transforms_rows"])
    runs = []
    for seed in cfg["transforms_seeds"]:
        for arm, transform in (("min-max", None), ("log", dict.fromkeys(PHYSICS_TARGETS, "log"))):
            in_sc = nx.MinMaxScaler().fit(X, columns=["T", "E", "p"])
            out_sc = nx.MinMaxScaler(transform=transform).fit(
                Y, columns=list(PHYSICS_TARGETS), target=True
            )
            result = train(X, Y, in_scaler=in_sc, out_scaler=out_sc, seed=seed, progress=False)
            true, pred = result.holdout_true, result.holdout_pred
            run = {
                "targets": arm,
                "seed": seed,
                "seconds": result.seconds,
                "epochs_run": len(result.history),
                "small_decile_median_rel_error": dict(
                    zip(PHYSICS_TARGETS, small_decile_error(true, pred), strict=True)
                ),
                "median_rel_error": dict(
                    zip(
                        PHYSICS_TARGETS,
                        np.median(np.abs(pred / true - 1.0), axis=0).tolist(),
                        strict=True,
                    )
                ),
                "negative_predictions": dict(
                    zip(PHYSICS_TARGETS, np.sum(pred <= 0, axis=0).tolist(), strict=True)
                ),
                "holdout_rmse_relative": result.holdout_rmse_relative,
                "holdout_rows": len(true),
            }
            runs.append(run)
            small = ", ".join(
                f"{k} {100 * v:.1f}%" for k, v in run["small_decile_median_rel_error"].items()
            )
            log(
                f"  transforms: {arm} targets, seed {seed}: {run['seconds']:.0f} s, "
                f"{run['epochs_run']} epochs; smallest decile {small}; negative "
                f"{sum(run['negative_predictions'].values())}"
            )
    decades = np.log10(Y.max(axis=0) / Y.min(axis=0))
    return {
        "table": f"{cfg['transforms_rows']:,} rows: T, E, p -> rate, flux, path; 20% held out",
        "decades": dict(zip(PHYSICS_TARGETS, decades.round(1).tolist(), strict=True)),
        "network": "3x32 sigmoid, float64, Adam (the train defaults)",
        "runs": runs,
    }


def bench_defaults(cfg: dict[str, Any], log: Callable[[str], None]) -> dict[str, Any]:
    """``train(X, Y)`` with today's defaults against the previous defaults, same data,
    same seed, same process; per seed the two run back to back, alternating which
    goes first."""
    import numpy as np

    from normexport.mx.training import train

    X, Y = training_problem(cfg["defaults_rows"])
    runs: list[dict[str, Any]] = []
    for k, seed in enumerate(cfg["defaults_seeds"]):
        order = [("previous", PREVIOUS_DEFAULTS), ("current", {})]
        for name, options in order if k % 2 == 0 else order[::-1]:
            cpu = time.process_time()
            result = train(X, Y, progress=False, seed=seed, **options)
            cpu = time.process_time() - cpu
            relative = result.holdout_rmse_relative
            run = {
                "defaults": name,
                "seed": seed,
                "seconds": result.seconds,
                "cpu_seconds": cpu,  # all threads: less sensitive to other work on the machine
                "epochs_run": len(result.history),
                "best_epoch": result.best_epoch,
                "batch_size": result.settings["batch_size"],
                "lr": result.settings["lr"],
                "stopped": result.settings["stopped"],
                "holdout_rmse_relative": relative,
                "mean_holdout_rmse_relative": float(np.mean(list(relative.values()))),
                "loadavg": os.getloadavg()[0],
            }
            runs.append(run)
            log(
                f"  defaults: {name} seed {seed}: {run['seconds']:.1f} s, "
                f"{run['epochs_run']} epochs (batch {run['batch_size']}, lr {run['lr']:.3g}), "
                f"hold-out RMSE {100 * run['mean_holdout_rmse_relative']:.3f}% of range"
            )
    seeds = []
    for seed in cfg["defaults_seeds"]:
        prev, cur = (
            next(r for r in runs if r["seed"] == seed and r["defaults"] == which)
            for which in ("previous", "current")
        )
        seeds.append(
            {
                "seed": seed,
                "speedup": prev["seconds"] / cur["seconds"],
                "cpu_speedup": prev["cpu_seconds"] / cur["cpu_seconds"],
                "error_ratio": cur["mean_holdout_rmse_relative"]
                / prev["mean_holdout_rmse_relative"],
            }
        )
    total = {
        which: sum(r["seconds"] for r in runs if r["defaults"] == which)
        for which in ("previous", "current")
    }
    return {
        "table": f"{cfg['defaults_rows']:,} rows x 5 inputs -> 3 targets, 20% held out",
        "network": "3x32 sigmoid, float64, Adam (the train defaults)",
        "previous_defaults": PREVIOUS_DEFAULTS,
        "runs": runs,
        "seeds": seeds,
        "speedup_total": total["previous"] / total["current"],
        "target": f">= {DEFAULTS_SPEEDUP_TARGET:g}x faster at an equal or better hold-out error",
        "met": all(
            s["speedup"] >= DEFAULTS_SPEEDUP_TARGET and s["error_ratio"] <= 1.0 for s in seeds
        )
        if cfg["defaults_rows"] == DEFAULTS_TARGET_ROWS
        else None,  # the target is set on 50,000 rows; --quick runs a smaller table
    }


# ------------------------------------------------------------------------------ verification


def bench_verification(work: Path, cfg: dict[str, Any], log: Callable[[str], None]):
    cases = []
    for rows in cfg["verify_rows"]:
        result = run_worker("verify", {"dir": str(work / "demo-float64"), "rows": rows})
        beyond = result["peak_mib"] - result["baseline"]["rss_mib"]
        cases.append({**result, "requested_rows": rows, "peak_beyond_start_mib": beyond})
        log(
            f"  verify {rows:,} rows: {result['rows_per_second']:,.0f} rows/s, "
            f"peak +{beyond:.0f} MiB over start (input {result['input_mib']:.0f} MiB)"
        )
    return {"model": "demo float64 (spliced)", "cases": cases}


# ------------------------------------------------------------------------------ report


def environment() -> dict[str, Any]:
    from importlib import metadata

    versions = {}
    for package in ("mxnet", "numpy", "onnx", "onnxruntime"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[package] = metadata.version(package)
    cpu = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as handle:
        cpu = next(
            (ln.split(":", 1)[1].strip() for ln in handle if ln.startswith("model name")), ""
        )
    git = ""
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        git = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "loadavg_start": os.getloadavg(),
        "versions": versions,
        "git": git,
    }


def format_table(results: dict[str, Any]) -> str:
    lines = [
        f"normexport benchmarks ({'quick' if results['quick'] else 'full'}) "
        f"{results['started']}  git {results['environment']['git']}",
        f"machine: {results['environment']['cpus']} CPUs, {results['environment']['cpu']}, "
        f"load {results['environment']['loadavg_start'][0]:.2f} at start, "
        f"{results['environment'].get('loadavg_end', [0])[0]:.2f} at end",
    ]
    for dtype, inf in results.get("inference", {}).items():
        lines += ["", f"1. inference in onnxruntime, 1 thread, {inf['model']}, {dtype}:"]
        lines.append(
            f"   {'batch':>6} {'variant':<13} {'median µs':>10} {'× bare':>8} "
            f"{'IQR of ×':>15} {'× separate':>11}"
        )
        for batch, entry in inf["batches"].items():
            for name, us in entry["median_us"].items():
                ratio = entry["ratio_to_bare"].get(name)
                iqr = entry["ratio_iqr"].get(name)
                sep = entry.get("ratio_to_separate", {}).get(name)
                lines.append(
                    f"   {batch:>6} {name:<13} {us:>10.2f} "
                    f"{'' if ratio is None else f'{ratio:.3f}':>8} "
                    f"{'' if iqr is None else f'{iqr[0]:.3f}–{iqr[1]:.3f}':>15} "
                    f"{'' if sep is None else f'{sep:.3f}':>11}"
                )
        lines.append(
            f"   spliced = normexport's model.onnx, whose affines are {inf['spliced_form']}"
        )
        for name, what in inf.get("alternatives", {}).items():
            lines.append(f"   {name}: {what} (the bench's rewrite of model.onnx)")
        if inf.get("baked_note"):
            lines.append(f"   baked: {inf['baked_note']}")
        for check, value in inf["targets"].items():
            lines.append(
                f"   target {check}: {value['value']:.3f} {'MET' if value['met'] else 'NOT MET'}"
            )
    exp = results.get("export")
    if exp:
        b = exp["baseline"]["with_imports"]
        lines += [
            "",
            "2. export cost of every path (load, splice/fold, model files, ONNX, checker, "
            "verification, manifest), fresh process per case",
            f"   interpreter baseline: {exp['baseline']['python_only']['rss_mib']:.0f} MiB bare "
            f"python, {b['rss_mib']:.0f} MiB after importing mxnet, onnx, onnxruntime, normexport",
            f"   {'case':<58} {'model MiB':>9} {'wall s':>7} {'s/GiB':>6} "
            f"{'peak-base MiB':>13} {'× model':>7}  peak in",
        ]
        for case in exp["cases"]:
            lines.append(
                f"   {case['name']:<58} {case['model_mib']:>9.2f} {case['wall_seconds']:>7.2f} "
                f"{case['seconds_per_gib']:>6.1f} {case['peak_beyond_baseline_mib']:>13.0f} "
                f"{case['peak_over_model']:>7.2f}  {case['peak_stage']}"
                f"{'' if case['ok'] else '  (verification failed)'}"
            )
        if "growth" in exp:
            g = exp["growth"]
            lines.append(
                f"   growth (smallest → largest wide case): {g['seconds_per_gib']:.1f} s per GiB "
                f"of parameters, {g['peak_mib_per_model_mib']:.2f} MiB of peak per MiB"
            )
        met = exp.get("met", {})
        if met:
            lines.append(
                f"   target peak ≤ {exp['target']}× model beyond baseline (largest cases): "
                f"{sum(met.values())} of {len(met)} met"
                + "".join(f"\n     NOT MET: {k}" for k, v in met.items() if not v)
            )
        largest = max(exp["cases"], key=lambda c: c["model_mib"])
        lines.append(f"   stages of {largest['name']} (peak RSS within the stage, MiB):")
        for name, stage in largest["stages"].items():
            lines.append(
                f"     {name:<36} {stage['seconds']:>8.2f} s {stage['peak_mib']:>9.0f} MiB peak "
                f"(from {stage['rss_before_mib']:.0f})"
            )
    tr = results.get("training")
    if tr:
        lines += ["", f"3. training throughput ({tr['network']}, {tr['train_rows']} rows):"]
        for dtype, value in tr["samples_per_second"].items():
            lines.append(f"   {dtype}: {value:,.0f} samples/s")
    de = results.get("defaults")
    if de:
        lines += ["", f"5. training defaults ({de['table']}, {de['network']}):"]
        for run in de["runs"]:
            lines.append(
                f"   {run['defaults']:<8} seed {run['seed']}: {run['seconds']:7.1f} s, "
                f"{run['epochs_run']:>3} epochs, batch {run['batch_size']:>4}, lr "
                f"{run['lr']:.3g}, hold-out RMSE {100 * run['mean_holdout_rmse_relative']:.3f}% "
                f"of range ({run['stopped']})"
            )
        for seed in de["seeds"]:
            lines.append(
                f"   seed {seed['seed']}: {seed['speedup']:.1f}x faster ({seed['cpu_speedup']:.1f}x "
                f"less CPU time), error ratio {seed['error_ratio']:.2f}"
            )
        verdict = {True: "met", False: "NOT met", None: "set on 50,000 rows (a full run)"}
        lines.append(f"   target {de['target']}: {verdict[de['met']]}")
    lines += _transforms_lines(results.get("transforms"))
    ver = results.get("verification")
    if ver:
        lines += ["", f"4. verification throughput ({ver['model']}, all four runtimes):"]
        for case in ver["cases"]:
            per_rt = ", ".join(f"{k} {v:.2f} s" for k, v in case["runtime_seconds"].items())
            lines.append(
                f"   {case['rows']:>9,} rows: {case['wall_seconds']:.2f} s, "
                f"{case['rows_per_second']:,.0f} rows/s, peak +{case['peak_beyond_start_mib']:.0f}"
                f" MiB over start (input {case['input_mib']:.0f} MiB); {per_rt}"
            )
    return "\n".join(lines)


def _transforms_lines(tf: dict[str, Any] | None) -> list[str]:
    if not tf:
        return []
    decades = ", ".join(f"{k} {v:g}" for k, v in tf["decades"].items())
    lines = ["", f"6. transforms ({tf['table']}; decades: {decades}; {tf['network']}):"]
    for run in tf["runs"]:
        small = ", ".join(
            f"{k} {100 * v:.1f}%" for k, v in run["small_decile_median_rel_error"].items()
        )
        whole = ", ".join(f"{k} {100 * v:.2f}%" for k, v in run["median_rel_error"].items())
        negative = ", ".join(f"{k} {v}" for k, v in run["negative_predictions"].items())
        rmse = ", ".join(f"{k} {100 * v:.3f}%" for k, v in run["holdout_rmse_relative"].items())
        lines.append(
            f"   {run['targets']:<8} seed {run['seed']}: smallest decile {small} | all rows "
            f"{whole} | negative {negative} (of {run['holdout_rows']}) | RMSE of range {rmse} "
            f"| {run['seconds']:.0f} s"
        )
    return lines


def stage_table(case: dict[str, Any]) -> list[str]:
    """Markdown rows: each stage of one export case, its time and peak beyond the baseline."""
    base, model = case["baseline"]["rss_mib"], case["model_mib"]
    out = [
        "",
        f"Stages of {case['name']} (peak RSS within each stage, beyond the baseline):",
        "",
        "| stage | s | peak − baseline MiB | × model |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, stage in case["stages"].items():
        beyond = stage["peak_mib"] - base
        out.append(f"| {name} | {stage['seconds']:.2f} | {beyond:.0f} | {beyond / model:.2f} |")
    return out


def format_markdown(results: dict[str, Any], large: dict[str, Any] | None = None) -> str:
    """Markdown tables of a results file (and a scripts/large_model result), for the docs."""
    env = results["environment"]
    out = [
        f"<!-- from bench-results/bench-{results['started']}.json (git {env['git']}, "
        f"{'quick' if results['quick'] else 'full'} run) -->",
    ]
    for dtype, inf in results.get("inference", {}).items():
        batches = list(inf["batches"])
        out += [
            "",
            f"**{dtype}**, {inf['model']}; median time per call (µs) and median per-round "
            f"ratio to `bare` ({inf['batches'][batches[0]]['rounds']} rounds, "
            f"{inf['batches'][batches[0]].get('sessions_per_variant', 1)} sessions per variant):",
            "",
            "| variant | " + " | ".join(f"batch {b}: µs | × bare" for b in batches) + " |",
            "| --- | " + " | ".join("---: | ---:" for _ in batches) + " |",
        ]
        for name in inf["batches"][batches[0]]["median_us"]:
            cells = []
            for b in batches:
                entry = inf["batches"][b]
                ratio = entry["ratio_to_bare"].get(name)
                cells += [
                    f"{entry['median_us'][name]:.2f}",
                    "1" if ratio is None else f"{ratio:.3f}",
                ]
            out.append(f"| {name} | " + " | ".join(cells) + " |")
        sep = inf["batches"][batches[0]].get("ratio_to_separate", {})
        if sep:
            out += [
                "",
                f"At batch {batches[0]}, time relative to the separate-file approach: "
                + ", ".join(f"{k} {v:.3f}" for k, v in sep.items())
                + ".",
            ]
    exp = results.get("export")
    if exp:
        b = exp["baseline"]
        out += [
            "",
            f"Baseline: {b['python_only']['rss_mib']:.0f} MiB for the bare interpreter, "
            f"{b['with_imports']['rss_mib']:.0f} MiB after importing mxnet, onnx, "
            "onnxruntime and normexport.",
            "",
            "| case | model MiB | wall s | s per GiB | peak − baseline MiB | × model | "
            "stage holding the peak |",
            "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        for case in exp["cases"]:
            out.append(
                f"| {case['name']} | {case['model_mib']:.2f} | {case['wall_seconds']:.2f} | "
                f"{case['seconds_per_gib']:.1f} | {case['peak_beyond_baseline_mib']:.0f} | "
                f"{case['peak_over_model']:.2f} | {case['peak_stage']} |"
            )
        out += stage_table(max(exp["cases"], key=lambda c: c["model_mib"]))
    tr = results.get("training")
    if tr:
        out += [
            "",
            f"Training ({tr['network']}, {tr['train_rows']} training rows): "
            + ", ".join(f"{k} {v:,.0f} samples/s" for k, v in tr["samples_per_second"].items())
            + " (median of runs).",
        ]
    de = results.get("defaults")
    if de:
        out += [
            "",
            f"Training defaults ({de['table']}, {de['network']}):",
            "",
            "| defaults | seed | seconds | CPU seconds | epochs | batch | lr | hold-out RMSE, "
            "% of range (mean of targets) | stopped |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        for run in de["runs"]:
            out.append(
                f"| {run['defaults']} | {run['seed']} | {run['seconds']:.1f} | "
                f"{run['cpu_seconds']:.1f} | "
                f"{run['epochs_run']} | {run['batch_size']} | {run['lr']:.3g} | "
                f"{100 * run['mean_holdout_rmse_relative']:.3f} | {run['stopped']} |"
            )
    tf = results.get("transforms")
    if tf:
        out += [
            "",
            f"Transforms ({tf['table']}; {tf['network']}): median relative error over the "
            "hold-out rows (on each target's smallest 10%, and on all) and negative "
            "predictions.",
            "",
            "| targets | seed | smallest 10%: "
            + " | ".join(tf["decades"])
            + " | all rows: "
            + " | ".join(tf["decades"])
            + " | negative | RMSE, % of range: "
            + " | ".join(tf["decades"])
            + " |",
            "| --- | ---: |" + " ---: |" * (3 * len(tf["decades"]) + 1),
        ]
        for run in tf["runs"]:
            small = " | ".join(
                f"{100 * v:.1f}%" for v in run["small_decile_median_rel_error"].values()
            )
            whole = " | ".join(f"{100 * v:.2f}%" for v in run["median_rel_error"].values())
            rmse = " | ".join(f"{100 * v:.3f}%" for v in run["holdout_rmse_relative"].values())
            out.append(
                f"| {run['targets']} | {run['seed']} | {small} | {whole} | "
                f"{sum(run['negative_predictions'].values())} | {rmse} |"
            )
    ver = results.get("verification")
    if ver:
        out += [
            "",
            "| rows | wall s | rows/s | peak − start MiB | onnxruntime s | mxnet s | numpy s "
            "| onnx.reference s |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for case in ver["cases"]:
            rt = case["runtime_seconds"]
            out.append(
                f"| {case['rows']:,} | {case['wall_seconds']:.2f} | "
                f"{case['rows_per_second']:,.0f} | {case['peak_beyond_start_mib']:.0f} | "
                + " | ".join(
                    f"{rt.get(k, 0):.2f}"
                    for k in ("onnxruntime", "mxnet", "numpy", "onnx.reference")
                )
                + " |"
            )
    if large:
        out += [
            "",
            f"Large model: {large['parameters']:,} float32 parameters "
            f"({4 * large['parameters'] / 2**30:.2f} GiB):",
            "",
            "| path | wall s | s per GiB | peak RSS GiB | × model beyond the baseline | "
            "stage holding the peak | verified |",
            "| --- | ---: | ---: | ---: | ---: | --- | --- |",
        ]
        for case in large["cases"]:
            out.append(
                f"| {case['name']} | {case['wall_seconds']:.0f} | {case['seconds_per_gib']:.1f} | "
                f"{case['peak_mib'] / 1024:.2f} | {case['peak_over_model']:.2f} | "
                f"{case['peak_stage']} | {'yes' if case['ok'] else 'NO'} |"
            )
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a one-minute version")
    parser.add_argument(
        "--sections",
        default="inference,export,training,verification",
        help="comma-separated subset of inference,export,training,verification "
        "(and defaults and transforms, not run unless named: minutes)",
    )
    parser.add_argument("--rounds", type=int, help="override the number of inference rounds")
    parser.add_argument("--keep-work", action="store_true", help="keep bench-results/work")
    parser.add_argument(
        "--markdown",
        metavar="RESULTS_JSON",
        help="print markdown tables of an earlier results file instead of running",
    )
    parser.add_argument("--large", metavar="JSON", help="with --markdown: a large_model result")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("worker_args", nargs="?", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(WORKERS[args.worker](json.loads(args.worker_args or "{}"))))
        return 0

    if args.markdown:
        large = json.loads(Path(args.large).read_text()) if args.large else None
        print(format_markdown(json.loads(Path(args.markdown).read_text()), large), end="")
        return 0
    os.environ.setdefault("MPLBACKEND", "Agg")
    cfg = dict(QUICK if args.quick else FULL)
    if args.rounds:
        cfg["rounds"] = args.rounds
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    known = {"inference", "export", "training", "verification", "defaults", "transforms"}
    unknown = set(sections) - known
    if unknown:
        parser.error(f"unknown sections: {', '.join(sorted(unknown))}")
    RESULTS.mkdir(exist_ok=True)
    work = RESULTS / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    started = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    results: dict[str, Any] = {
        "format": "normexport.bench/1",
        "quick": args.quick,
        "started": started,
        "config": cfg,
        "environment": environment(),
    }
    t0 = time.perf_counter()
    if "inference" in sections or "export" in sections or "verification" in sections:
        log("preparing the demo network (float64) ...")
        prepare_demo(work, "float64", cfg["train_epochs"])
    if "inference" in sections:
        results["inference"] = {}
        for dtype in ("float64", "float32"):
            results["inference"][dtype] = bench_inference(work, cfg, dtype, log)
    if "export" in sections:
        results["export"] = bench_export(work, cfg, log)
    if "training" in sections:
        results["training"] = bench_training(cfg, log)
    if "verification" in sections:
        results["verification"] = bench_verification(work, cfg, log)
    if "defaults" in sections:
        results["defaults"] = bench_defaults(cfg, log)
    if "transforms" in sections:
        results["transforms"] = bench_transforms(cfg, log)
    results["environment"]["loadavg_end"] = os.getloadavg()
    results["seconds"] = time.perf_counter() - t0
    text = format_table(results)
    stem = f"bench-{started}{'-quick' if args.quick else ''}"
    (RESULTS / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / f"{stem}.txt").write_text(text + "\n")
    for name, content in (
        ("latest.json", json.dumps(results, indent=2) + "\n"),
        ("latest.txt", text + "\n"),
    ):
        (RESULTS / name).write_text(content)
    if not args.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    print(text)
    log(f"wrote {RESULTS / stem}.json and .txt ({results['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
