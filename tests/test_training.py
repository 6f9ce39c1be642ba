"""Training in normalized space: it learns, it is seeded, it refuses bad settings."""

from __future__ import annotations

import pytest
from conftest import MXNET_SKIP

pytestmark = pytest.mark.mxnet  # every test here needs the MXNet adapter
pytest.importorskip("mxnet", reason=MXNET_SKIP)

import numpy as np
from conftest import smooth_problem

from normexport.errors import DataError
from normexport.mx.training import train


@pytest.fixture(scope="module")
def learned():
    X, Y = smooth_problem(2000, seed=1)
    return train(X, Y, dtype="float32", progress=False, seed=0)  # the defaults, untuned


def test_learns_a_smooth_function_below_one_percent_of_range(learned):
    # Targets span about 0…100 and 0…40 in raw units; the hold-out RMSE is in raw units.
    for name, rel in learned.holdout_rmse_relative.items():
        assert rel < 0.01, (name, rel, learned.holdout_rmse)
    assert learned.history[learned.best_epoch - 1]["val_loss"] == min(
        h["val_loss"] for h in learned.history
    )
    # in normalized units the validation MSE falls by more than 100×
    assert learned.history[0]["val_loss"] / min(h["val_loss"] for h in learned.history) > 100


def test_summary_is_json_ready(learned):
    import json

    summary = json.loads(json.dumps(learned.summary()))
    assert summary["best_epoch"] == learned.best_epoch
    assert set(summary["holdout_rmse"]) == {"y0", "y1"}
    assert len(summary["history"]) == summary["settings"]["epochs"]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_same_seed_same_weights(dtype):
    X, Y = smooth_problem(200)
    a = train(X, Y, epochs=3, dtype=dtype, progress=False, seed=7)
    b = train(X, Y, epochs=3, dtype=dtype, progress=False, seed=7)
    c = train(X, Y, epochs=3, dtype=dtype, progress=False, seed=8)
    pa, pb, pc = (
        {k: v.data().asnumpy() for k, v in r.net.collect_params().items()} for r in (a, b, c)
    )
    assert all(np.array_equal(pa[k], pb[k]) for k in pa)
    assert not all(np.array_equal(pa[k], pc[k]) for k in pa)
    assert all(v.dtype == np.dtype(dtype) for v in pa.values())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"activation": "gelu"}, "activation must be one of"),
        ({"dtype": "float16"}, "dtype must be one of"),
        ({"epochs": 0}, "epochs and batch size"),
        ({"val_fraction": 1.0}, "val_fraction must be in"),
        ({"hidden": (0,)}, "hidden sizes must be positive"),
    ],
)
def test_refuses_bad_settings(kwargs, message):
    X, Y = smooth_problem(50)
    with pytest.raises(DataError, match=message):
        train(X, Y, progress=False, **kwargs)


def test_refuses_constant_target():
    X, Y = smooth_problem(50)
    Y[:, 1] = 3.0
    with pytest.raises(DataError, match="target column 'y1' is constant"):
        train(X, Y, progress=False, epochs=1)


def test_refuses_row_mismatch():
    X, Y = smooth_problem(50)
    with pytest.raises(DataError, match="X has 50 rows but Y has 49"):
        train(X, Y[:49], progress=False)


def test_without_hold_out_rows_the_rmse_says_it_is_on_training_rows():
    X, Y = smooth_problem(100)
    result = train(X, Y, epochs=2, val_fraction=0.0, progress=False)
    assert result.rmse_on == "training"
    summary = result.summary()
    assert "training_rmse" in summary and "holdout_rmse" not in summary
