"""Shared pieces: a smooth synthetic 3→2 problem and small untrained or trained nets."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest

import normexport as nx

# Range-relative tolerances by dtype (docs/cli.md, "export: tolerance ..."). De-normalizing multiplies
# the network's float error by each output's range, so errors are compared relative to it.
RTOL = {"float32": 1e-5, "float64": 1e-12}
ACTIVATIONS = ["sigmoid", "tanh", "relu", "softrelu"]
DTYPES = ["float32", "float64"]
INPUTS = ["temp_k", "strain", "frac"]
TARGETS = ["load", "offset"]


# Tests marked `mxnet` need the MXNet adapter; the core profile (numpy 2, no MXNet) skips
# them for that reason alone. The MXNet profile must have MXNet: there, nothing is skipped.
MXNET_SKIP = "needs the MXNet adapter (pip install 'normexport[mxnet]'); not in this profile"


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def pytest_collection_modifyitems(config, items):
    if not _has("mxnet"):
        if os.environ.get("NORMEXPORT_PROFILE") == "mxnet":
            raise pytest.UsageError("the MXNet profile runs without MXNet installed")
        for item in items:
            if "mxnet" in item.keywords:
                item.add_marker(pytest.mark.skip(reason=MXNET_SKIP))
    if os.environ.get("NORMEXPORT_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow; run with NORMEXPORT_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def smooth_problem(n: int = 600, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Inputs on very different raw ranges; targets spanning about 0…100 and 0…40."""
    rng = np.random.default_rng(seed)
    X = np.column_stack([rng.uniform(250, 350, n), rng.uniform(0, 0.01, n), rng.uniform(0, 1, n)])
    u, v, w = (X[:, 0] - 250) / 100, X[:, 1] / 0.01, X[:, 2]
    Y = np.column_stack(
        [
            100 * (0.5 + 0.4 * np.sin(2 * u + v) * w),
            40 * (0.5 + 0.3 * np.cos(3 * v) * u + 0.2 * w * w),
        ]
    )
    return X, Y


@pytest.fixture(scope="session")
def problem():
    return smooth_problem()


@pytest.fixture(scope="session")
def scalers(problem):
    X, Y = problem
    return nx.MinMaxScaler().fit(X, columns=INPUTS), nx.MinMaxScaler().fit(Y, columns=TARGETS)


def random_net(activation="sigmoid", dtype="float64", hidden=(8, 8), n_in=3, n_out=2, seed=0):
    """An initialized, hybridized net that has run forward once (no training needed)."""
    import mxnet as mx

    from normexport.mx.training import build_net

    mx.random.seed(seed)
    net = build_net(n_out, hidden, activation, dtype)
    net.initialize(mx.init.Xavier())
    net.hybridize()
    net(mx.nd.zeros((1, n_in), dtype=dtype))
    return net


def net_with_output_activation(activation: str):
    """Dense(4, tanh) → Dense(2, activation): the output side cannot be folded."""
    import mxnet as mx

    net = mx.gluon.nn.HybridSequential(prefix="p_")
    with net.name_scope():
        net.add(
            mx.gluon.nn.Dense(4, activation="tanh"), mx.gluon.nn.Dense(2, activation=activation)
        )
    net.initialize()
    net.hybridize()
    net(mx.nd.zeros((1, 3)))
    return net


def mxnet_predict(directory, prefix, X, dtype):
    """Run a saved checkpoint through gluon.SymbolBlock.imports, as users load it."""
    import mxnet as mx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        block = mx.gluon.SymbolBlock.imports(
            f"{directory}/{prefix}-symbol.json", ["data"], f"{directory}/{prefix}-0000.params"
        )
    return block(mx.nd.array(X, dtype=dtype)).asnumpy()


def range_relative_error(got, want, out_scaler):
    return (np.abs(np.asarray(got, np.float64) - want) / out_scaler.span()).max()


@pytest.fixture(scope="session")
def trained_dir(tmp_path_factory, problem):
    """A model directory trained briefly and exported (splice), float32."""
    from normexport import tables
    from normexport.mx import exporting

    X, Y = problem
    root = tmp_path_factory.mktemp("trained")
    tables.write_table(root / "data.csv", INPUTS + TARGETS, np.column_stack([X, Y]))
    exporting.train_to_directory(
        root / "data.csv",
        INPUTS,
        TARGETS,
        root / "model",
        epochs=5,
        dtype="float32",
        progress=False,
    )
    exporting.export_directory(root / "model")
    return root


# ------------------------------------------------------------------------------ the CLI


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """``normexport ARGV`` in this process: (exit status, stdout, stderr)."""
    from normexport.cli import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code: int, err: str, *fragments: str, out: str | None = None) -> str:
    """The user-error contract: exit 2, one ``normexport: error:`` line holding each
    fragment, no traceback, never an internal temporary path; stdout empty when ``out``
    is given. Returns the line."""
    assert code == 2, (code, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("normexport: error: "), lines[0]
    assert "Traceback" not in err
    assert ".tmp" not in lines[0] and "staging" not in lines[0], lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    if out is not None:
        assert out == "", f"stdout must stay empty on a user error, got {out!r}"
    return lines[0]
