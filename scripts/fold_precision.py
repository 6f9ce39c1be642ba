#!/usr/bin/env python3
"""Measure what folding does to precision: fold vs splice vs a float64 NumPy reference.

Usage: .venv/bin/python scripts/fold_precision.py   (prints a Markdown table; ~20 s)

For each dtype and activation, random nets (seeded) get typical scalers (the demo's
kind of ranges) and extreme ones (column ranges 1e-6 … 1e6). Both exports run in
onnxruntime on raw rows over 1.5× the training box; errors are max |a - b| relative to
each output's range. The reference is the same network evaluated in float64 NumPy on
the float64 affine, i.e. the exact function the float32 weights define.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from conftest import random_net
from test_fold import extreme_scalers, onnx_of, run

from normexport.modeldir import NET_PREFIX, params_file, symbol_file
from normexport.mx import graph
from normexport.mx.checkpoint import save_checkpoint
from normexport.reference import NumpyNet
from normexport.scaling import AffineScaler


def typical_scalers():
    lows, ranges = np.array([0.2, 0.1, 1.0]), np.array([0.5, 0.6, 100.0])
    in_sc = AffineScaler.from_affine(1 / ranges, -lows / ranges)
    out_sc = AffineScaler.from_affine(
        np.array([50.0, 40.0]), np.array([-25.0, -20.0]), inverse=True
    )
    return in_sc, out_sc, lows, ranges


def reference(checkpoint, in_sc, out_sc, X):
    """float64 NumPy forward pass of the plain net between the float64 affines."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(checkpoint, tmp, NET_PREFIX)
        net = NumpyNet(symbol_file(tmp, NET_PREFIX), params_file(tmp, NET_PREFIX))
    x = X.astype(np.float64) * in_sc.scale_ + in_sc.shift_
    return net(x) * out_sc.inverse_scale_ + out_sc.inverse_shift_  # float64 params for float64 x


def main() -> None:
    import tempfile

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        for dtype in ("float32", "float64"):
            for kind in ("typical", "extreme"):
                worst = np.zeros(3)
                for activation in ("sigmoid", "tanh", "relu", "softrelu"):
                    for seed in range(3):
                        in_sc, out_sc, lows, ranges = (
                            typical_scalers() if kind == "typical" else extreme_scalers(seed)
                        )
                        ck = graph.from_block(
                            random_net(activation, dtype, hidden=(32, 32), seed=seed)
                        )
                        s = onnx_of(
                            tmp_path,
                            "s",
                            graph.splice(ck, in_sc.affine(), out_sc.inverse_affine()),
                            dtype,
                        )
                        f = onnx_of(
                            tmp_path,
                            "f",
                            graph.fold(ck, in_sc.affine(), out_sc.inverse_affine())[0],
                            dtype,
                        )
                        X = (
                            lows
                            + np.random.default_rng(seed).uniform(-0.25, 1.25, (4096, 3)) * ranges
                        )
                        a, b = run(s, X.astype(dtype)), run(f, X.astype(dtype))
                        ref = reference(ck, in_sc, out_sc, X.astype(dtype))
                        span = out_sc.span()
                        errs = [
                            np.abs(a - b).max(axis=0) / span,
                            np.abs(b - ref).max(axis=0) / span,
                            np.abs(a - ref).max(axis=0) / span,
                        ]
                        worst = np.maximum(worst, [e.max() for e in errs])
                rows.append((dtype, kind, *worst))
    print(
        "| dtype | scalers | fold vs splice | fold vs float64 reference | splice vs float64 reference |"
    )
    print("| --- | --- | --- | --- | --- |")
    for dtype, kind, a, b, c in rows:
        print(f"| {dtype} | {kind} | {a:.2g} | {b:.2g} | {c:.2g} |")


if __name__ == "__main__":
    main()
