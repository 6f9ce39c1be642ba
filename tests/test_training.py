"""Training in normalized space: it learns, it is seeded, it refuses bad settings."""

from __future__ import annotations

import pytest
from conftest import MXNET_SKIP

pytestmark = pytest.mark.mxnet  # every test here needs the MXNet adapter
pytest.importorskip("mxnet", reason=MXNET_SKIP)

import itertools

import numpy as np
from conftest import smooth_problem

from normexport.errors import DataError
from normexport.mx.training import (
    MIN_IMPROVEMENT,
    SMOOTHING,
    default_batch_size,
    default_lr,
    train,
)


def smoothed(losses):
    """The exponential average of the hold-out loss that stalls are judged on."""
    out = [losses[0]]
    for value in losses[1:]:
        out.append(SMOOTHING * out[-1] + (1 - SMOOTHING) * value)
    return out


def stalled(losses, epochs):
    """The smoothed loss of the last `epochs` epochs never beat the best before them by
    0.1%, while some epoch before them did beat its predecessors' best."""
    average = smoothed(losses)
    mark = min(average[:-epochs])
    return all(v >= mark * (1 - MIN_IMPROVEMENT) for v in average[-epochs:])


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
    assert len(summary["history"]) == summary["epochs_run"] <= summary["settings"]["epochs"]
    assert summary["settings"]["batch_size"] == 32  # 1600 training rows: the smallest
    assert summary["stopped"]


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
        ({"patience": 0}, "patience must be >= 1"),
        ({"batch_size": 0}, "epochs and batch size"),
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


def test_early_stopping_keeps_the_best_epoch():
    """Training stops once the hold-out loss has not improved by 0.1% for `patience`
    epochs; the weights are those of the best epoch, as without early stopping."""
    X, Y = smooth_problem(300, seed=2)
    constant = {"lr": 0.05, "lr_schedule": "constant", "progress": False, "seed": 1}
    stopped = train(X, Y, epochs=400, patience=3, **constant)
    epochs = len(stopped.history)
    assert epochs < 400 and "stopped early" in stopped.settings["stopped"]
    losses = [h["val_loss"] for h in stopped.history]
    assert stopped.best_epoch == 1 + int(np.argmin(losses))
    # the last `patience` epochs brought no 0.1% improvement of the smoothed loss
    assert stalled(losses, 3) and not stalled(losses[:-1], 3)
    # the kept weights are the best epoch's: their hold-out MSE is the smallest
    error = (stopped.holdout_pred - stopped.holdout_true) * stopped.out_scaler.scale_
    assert np.mean(error**2) == pytest.approx(min(losses), rel=1e-9)
    # the same seed without early stopping runs every epoch, through the same first ones
    full = train(X, Y, epochs=epochs + 5, patience=None, **constant)
    assert len(full.history) == epochs + 5
    assert [h["val_loss"] for h in full.history[:epochs]] == losses
    assert full.settings["stopped"].startswith("reached the maximum")


def test_the_plateau_schedule_halves_the_rate_when_the_hold_out_stalls():
    X, Y = smooth_problem(300, seed=2)
    result = train(X, Y, epochs=300, patience=6, lr=0.05, progress=False, seed=1)
    assert result.settings["lr_schedule"] == "plateau"
    rates = [h["lr"] for h in result.history]
    assert rates[0] == 0.05 and min(rates) < 0.05
    for before, after in itertools.pairwise(rates):
        assert after in (before, max(before / 2, 0.05 / 1000))
    first_cut = next(i for i, (a, b) in enumerate(itertools.pairwise(rates)) if b < a)
    losses = [h["val_loss"] for h in result.history[: first_cut + 1]]
    assert stalled(losses, 3)  # 3 epochs (half the patience) without a 0.1% improvement


def test_without_hold_out_rows_every_epoch_runs():
    X, Y = smooth_problem(100)
    result = train(X, Y, epochs=6, patience=1, val_fraction=0.0, progress=False)
    assert len(result.history) == 6 and result.settings["patience"] is None


@pytest.mark.parametrize(
    ("rows", "size", "lr"),
    [
        (100, 32, 0.01),
        (6400, 32, 0.01),
        (6401, 64, 0.01 * 2**0.75),
        (40_000, 256, 0.01 * 8**0.75),
        (10**6, 1024, 0.05),
    ],
)
def test_default_batch_size_and_rate_grow_with_the_rows(rows, size, lr):
    assert default_batch_size(rows) == size
    assert default_lr(size) == pytest.approx(lr)
