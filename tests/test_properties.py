"""Property tests: random Dense networks with random affine constants export and agree.

Each example draws a network (1 to 4 hidden layers of width 1 to 64, 1 to 4 inputs, 1
to 3 outputs), a scaler kind (min-max or z-score) and per-column ranges whose widths
span 1e-6 to 1e6, so the affine scales span about 1e-6 to 1e6; the shifts put a
range's offset up to ``MAX_OFFSET`` widths away from zero. Every combination of
activation and dtype is a separate test, so each is covered whatever Hypothesis draws.

For both modes, ``nx.export`` must succeed, which means its verification found
onnxruntime, MXNet, the NumPy reference and ``onnx.reference`` within the dtype's
range-relative tolerance; on top of that, ``model.onnx`` must match the trained
function itself (the Gluon net between the scalers), and splice and fold must agree.

Conditioning bounds the offsets, not the software: a column whose values sit ``k``
widths from zero loses ``log10(k)`` of its significant digits before any arithmetic,
in the raw input or output value itself (one float32 ulp of a value 100 widths from
zero is 8e-6 of the width, against a 1e-5 tolerance; docs/fold.md, "Conditioning"), and
fold's ``b + W·t`` cancels against ``W·diag(s)·x`` at that magnitude. Measured on 12
random tanh nets per line (splice / fold passing): float32, offsets up to 1e3: 11 / 0;
up to 1e2: 11 / 9; float64, up to 1e5: 12 / 0; up to 1e3: 12 / 12. ``MAX_OFFSET`` keeps
a margin of about ten below the first failures.

Examples per test: ``NORMEXPORT_PROPERTY_EXAMPLES`` (default 10, about 10 s in all).
"""

from __future__ import annotations

import pytest
from conftest import MXNET_SKIP

pytestmark = pytest.mark.mxnet  # every test here needs the MXNet adapter
pytest.importorskip("mxnet", reason=MXNET_SKIP)

import json
import os
import tempfile
from pathlib import Path

import numpy as np
from conftest import ACTIVATIONS, DTYPES, RTOL, random_net
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import normexport as nx

EXAMPLES = int(os.environ.get("NORMEXPORT_PROPERTY_EXAMPLES", "10"))
MAX_OFFSET = {"float32": 10.0, "float64": 200.0}  # |column offset| / column width
RUNTIMES = {"onnxruntime", "mxnet", "numpy", "onnx.reference"}

PROPERTY = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@st.composite
def ranges(draw, n: int, dtype: str):
    """``(low, width)`` per column: width 10**[-6, 6], low = offset * width."""
    exponents = draw(st.lists(st.floats(-6, 6), min_size=n, max_size=n))
    offsets = draw(
        st.lists(
            st.floats(-MAX_OFFSET[dtype], MAX_OFFSET[dtype], allow_nan=False),
            min_size=n,
            max_size=n,
        )
    )
    width = 10.0 ** np.array(exponents)
    return np.array(offsets) * width, width


@st.composite
def problems(draw, dtype: str):
    n_in = draw(st.integers(1, 4))
    n_out = draw(st.integers(1, 3))
    hidden = draw(st.lists(st.integers(1, 64), min_size=1, max_size=4))
    seed = draw(st.integers(0, 2**16))
    kind = draw(st.sampled_from([nx.MinMaxScaler, nx.StandardScaler]))
    inputs, outputs = draw(ranges(n_in, dtype)), draw(ranges(n_out, dtype))
    return n_in, n_out, tuple(hidden), seed, kind, inputs, outputs


def table(rng, low, width, rows: int = 64) -> np.ndarray:
    """Rows over ``[low, low + width]`` per column, with both ends present."""
    X = low + width * rng.uniform(0.0, 1.0, size=(rows, low.size))
    X[0], X[1] = low, low + width
    return X


def onnx_run(path: Path, X: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": X})[0]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@PROPERTY
@given(data=st.data())
def test_random_dense_networks_export_and_agree(activation, dtype, data):
    import mxnet as mx

    n_in, n_out, hidden, seed, kind, (x_low, x_width), (y_low, y_width) = data.draw(
        problems(dtype), label="problem"
    )
    rng = np.random.default_rng(seed)
    X, Y = table(rng, x_low, x_width), table(rng, y_low, y_width)
    in_sc, out_sc = kind().fit(X), kind().fit(Y, target=True)
    net = random_net(activation, dtype, hidden, n_in, n_out, seed)
    # The trained function itself, in the network's dtype: scalers around the Gluon net.
    Xd = X.astype(dtype)
    truth = out_sc.inverse_transform(net(mx.nd.array(in_sc.transform(Xd), dtype=dtype)).asnumpy())

    span = out_sc.span()
    outputs = {}
    with tempfile.TemporaryDirectory(prefix="normexport-property-") as tmp:
        for mode in ("splice", "fold"):
            out = nx.export(net, in_sc, out_sc, Path(tmp) / mode, mode=mode, verify_rows=X)
            check = json.loads((out / "manifest.json").read_text())["verification"]
            assert check["ok"] and set(check["runtimes"]) == RUNTIMES, check
            assert check["skipped"] == {}, check["skipped"]
            outputs[mode] = onnx_run(out / "model.onnx", Xd)
            assert outputs[mode].dtype == np.dtype(dtype)
            error = (np.abs(outputs[mode] - truth) / span).max()
            assert error <= RTOL[dtype], (mode, error)
    agreement = (np.abs(outputs["splice"] - outputs["fold"]) / span).max()
    assert agreement <= RTOL[dtype], agreement
