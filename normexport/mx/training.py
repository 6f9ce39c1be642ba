"""Build and train a plain Dense regression network in normalized space.

The network never sees raw units: inputs and targets are scaled by the scalers (fitted
here unless given), so every layer trains on values of order one. The normalization is
attached to the network only after training, by :mod:`normexport.graph`.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon

from normexport.errors import DataError
from normexport.scaling import DTYPES, AffineScaler, MinMaxScaler

ACTIVATIONS = ("sigmoid", "tanh", "relu", "softrelu")
LR_SCHEDULES = ("plateau", "constant", "cosine")
NET_PREFIX = "net_"  # explicit, so parameter names never depend on what was built before

DEFAULT_HIDDEN = (32, 32, 32)
DEFAULT_EPOCHS = 300  # a maximum: training stops earlier when the hold-out stops improving
DEFAULT_PATIENCE = 20  # epochs without a hold-out improvement before training stops
MIN_IMPROVEMENT = 1e-3  # an improvement is a relative drop of the hold-out loss by this much
# Stalls are judged on an exponential average of the hold-out loss: at the rates that
# learn fastest it jumps by a factor of 2-3 from epoch to epoch, and one lucky epoch
# would otherwise look like a best that the next ten cannot beat.
SMOOTHING = 0.7
# The default batch size grows with the rows: the smallest power of two of at least 32
# rows that leaves at most STEPS_PER_EPOCH optimizer steps per epoch (at most 1024); the
# default learning rate grows with it, from 0.01 at batch 32 to at most 0.05.
MIN_BATCH_SIZE, MAX_BATCH_SIZE, STEPS_PER_EPOCH = 32, 1024, 200
BASE_LR, MAX_LR = 1e-2, 5e-2


def default_batch_size(train_rows: int) -> int:
    """32 up to 6,400 training rows, then doubling with the rows, up to 1024.

    Per-step overhead dominates small batches on a CPU; keeping 100 to 200 steps per
    epoch keeps each epoch informative while its cost stops growing with the rows
    (docs/performance.md has the measurement on 50,000 rows).
    """
    size = MIN_BATCH_SIZE
    while size < MAX_BATCH_SIZE and train_rows > size * STEPS_PER_EPOCH:
        size *= 2
    return size


def default_lr(batch_size: int) -> float:
    """Adam's rate for a batch size: 0.01 at 32, times (batch / 32)^0.75, at most 0.05.

    Larger batches take fewer, less noisy steps per epoch and learn as fast per epoch
    only with a larger rate (measured on 50,000 rows: batch 256 at 0.05 reaches the
    hold-out error of batch 32 at 0.01 in about as many epochs; at 0.01 it needs twice as
    many).
    """
    return min(MAX_LR, BASE_LR * (batch_size / MIN_BATCH_SIZE) ** 0.75)


@dataclass
class TrainResult:
    """What :func:`train` returns: the best network, its scalers and the record."""

    net: gluon.HybridBlock
    in_scaler: AffineScaler
    out_scaler: AffineScaler
    history: list[dict[str, float]]
    best_epoch: int
    holdout_rmse: dict[str, float]
    holdout_rmse_relative: dict[str, float]
    settings: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    holdout_true: np.ndarray | None = None  # raw units, for parity plots
    holdout_pred: np.ndarray | None = None
    # "hold-out", or "training" when val_fraction=0 left no rows to hold out: then the
    # holdout_* numbers are measured on the training rows and named so in the summary
    rmse_on: str = "hold-out"

    @property
    def _rmse_key(self) -> str:
        return "holdout" if self.rmse_on == "hold-out" else "training"

    def summary(self) -> dict[str, Any]:
        """JSON-ready training summary (goes into ``manifest.json``)."""
        best = self.history[self.best_epoch - 1] if self.history else {}
        return {
            "settings": self.settings,
            "epochs_run": len(self.history),
            "stopped": self.settings.get("stopped"),
            "best_epoch": self.best_epoch,
            "best_train_loss": best.get("train_loss"),
            "best_val_loss": best.get("val_loss"),
            "loss": "mean squared error in normalized units",
            f"{self._rmse_key}_rmse": self.holdout_rmse,
            f"{self._rmse_key}_rmse_relative_to_range": self.holdout_rmse_relative,
            "seconds": round(self.seconds, 3),
            "history": self.history,
        }


def build_net(
    n_outputs: int,
    hidden: Sequence[int] = DEFAULT_HIDDEN,
    activation: str = "sigmoid",
    dtype: str = "float64",
    prefix: str = NET_PREFIX,
) -> gluon.nn.HybridSequential:
    """A ``HybridSequential`` of ``Dense`` layers with a linear output layer."""
    _check_choice("activation", activation, ACTIVATIONS)
    _check_choice("dtype", dtype, DTYPES)
    if any(int(h) < 1 for h in hidden):
        raise DataError(f"hidden sizes must be positive integers, got {list(hidden)}")
    net = gluon.nn.HybridSequential(prefix=prefix)
    with net.name_scope():
        for width in hidden:
            net.add(gluon.nn.Dense(int(width), activation=activation, dtype=dtype))
        net.add(gluon.nn.Dense(n_outputs, dtype=dtype))
    return net


def train(
    X: Any,
    Y: Any,
    *,
    input_columns: Sequence[str] | None = None,
    target_columns: Sequence[str] | None = None,
    in_scaler: AffineScaler | None = None,
    out_scaler: AffineScaler | None = None,
    hidden: Sequence[int] = DEFAULT_HIDDEN,
    activation: str = "sigmoid",
    dtype: str = "float64",
    epochs: int = DEFAULT_EPOCHS,
    batch_size: int | None = None,
    patience: int | None = DEFAULT_PATIENCE,
    lr: float | None = None,
    lr_schedule: str = "plateau",
    val_fraction: float = 0.2,
    seed: int = 0,
    progress: bool | None = None,
) -> TrainResult:
    """Train a plain Dense net on normalized ``X`` → normalized ``Y``.

    Min-max scalers are fitted on all rows when none are given. Adam with L2 loss on
    shuffled mini-batches; ``val_fraction`` of the rows (a seeded split) are held out and
    the weights of the epoch with the lowest validation loss are kept. The same seed and
    data give the same weights. ``progress=None`` shows a bar only on a terminal.
    ``lr_schedule="plateau"`` (the default) halves the learning rate whenever the
    hold-out loss has not improved for half the patience (10 epochs by default; down to
    lr/1000); ``"cosine"`` decays it to lr/100 over the run, worth it for long runs
    (thousands of epochs); ``"constant"`` keeps it.

    ``epochs`` is a maximum: training stops early once the hold-out loss has not dropped
    by :data:`MIN_IMPROVEMENT` (relative) for ``patience`` epochs (``patience=None``
    runs every epoch; without hold-out rows there is nothing to stop on). ``batch_size``
    defaults to :func:`default_batch_size` of the training rows and ``lr`` to
    :func:`default_lr` of the batch size.

    Returns a :class:`TrainResult`, including the hold-out RMSE per target in raw units.
    """
    X = np.asarray(X, dtype=np.float64)
    Y = np.asarray(Y, dtype=np.float64)
    if X.ndim != 2 or Y.ndim != 2:
        raise DataError("X and Y must be 2-D arrays (rows, columns)")
    if X.shape[0] != Y.shape[0]:
        raise DataError(f"X has {X.shape[0]} rows but Y has {Y.shape[0]}")
    _check_choice("dtype", dtype, DTYPES)
    _check_choice("activation", activation, ACTIVATIONS)
    _check_choice("lr_schedule", lr_schedule, LR_SCHEDULES)
    if epochs < 1 or (batch_size is not None and batch_size < 1) or not (lr is None or lr > 0):
        raise DataError("epochs and batch size must be >= 1 and the learning rate > 0")
    if patience is not None and patience < 1:
        raise DataError(f"patience must be >= 1 (or None to run every epoch), got {patience}")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")

    if in_scaler is None:
        in_scaler = MinMaxScaler().fit(X, columns=input_columns)
    if out_scaler is None:
        if target_columns is None:
            target_columns = [f"y{i}" for i in range(Y.shape[1])]
        out_scaler = MinMaxScaler().fit(Y, columns=target_columns, target=True)
    out_scaler.check_target()
    Xn = in_scaler.transform(X).astype(dtype)
    Yn = out_scaler.transform(Y).astype(dtype)

    rng = np.random.RandomState(seed)
    order = rng.permutation(X.shape[0])
    n_val = round(val_fraction * X.shape[0])
    if val_fraction > 0 and (n_val < 1 or n_val >= X.shape[0]):
        raise DataError(f"{X.shape[0]} rows are too few for a validation split of {val_fraction}")
    val_idx, train_idx = order[:n_val], order[n_val:]
    batch_rule = "given" if batch_size is not None else "default (grows with the rows)"
    if batch_size is None:
        batch_size = default_batch_size(len(train_idx))
    lr_rule = "given" if lr is not None else "default (grows with the batch size)"
    if lr is None:
        lr = default_lr(batch_size)

    mx.random.seed(seed)
    net = build_net(Y.shape[1], hidden, activation, dtype)
    net.initialize(mx.init.Xavier(), ctx=mx.cpu())
    net.hybridize(static_alloc=True, static_shape=True)
    optimizer_params: dict[str, Any] = {"learning_rate": lr}
    if lr_schedule == "cosine":
        steps = epochs * max(1, len(train_idx) // batch_size)
        optimizer_params["lr_scheduler"] = mx.lr_scheduler.CosineScheduler(
            max_update=steps, base_lr=lr, final_lr=lr / 100
        )
    trainer = gluon.Trainer(net.collect_params(), "adam", optimizer_params)
    loss_fn = gluon.loss.L2Loss()
    loss_fn.hybridize(static_alloc=True, static_shape=True)

    x_train, y_train = Xn[train_idx], Yn[train_idx]
    x_val, y_val = (Xn[val_idx], Yn[val_idx]) if n_val else (x_train, y_train)
    settings = {
        "hidden": [int(h) for h in hidden],
        "activation": activation,
        "dtype": dtype,
        "epochs": epochs,
        "patience": patience if n_val else None,
        "batch_size": batch_size,
        "batch_size_rule": batch_rule,
        "lr": lr,
        "lr_rule": lr_rule,
        "optimizer": "adam",
        "lr_schedule": lr_schedule,
        "val_fraction": val_fraction,
        "seed": seed,
        "train_rows": len(train_idx),
        "val_rows": int(n_val),
    }

    history: list[dict[str, float]] = []
    best_loss, best_epoch, best_params = np.inf, 0, None
    mark, mark_epoch = np.inf, 0  # the loss to beat by MIN_IMPROVEMENT, and when it was set
    smoothed = None  # the hold-out loss averaged over the last epochs (SMOOTHING)
    wait = max(1, (patience or DEFAULT_PATIENCE) // 2)  # plateau: epochs before halving
    current_lr, last_cut = lr, 0
    stopped = f"reached the maximum of {epochs} epochs"
    started = time.perf_counter()
    bar = _progress(epochs, progress)
    try:
        for epoch in range(1, epochs + 1):
            train_loss = _run_epoch(net, trainer, loss_fn, x_train, y_train, batch_size, rng)
            val_loss = _mse(net, x_val, y_val)
            history.append(
                {
                    "epoch": epoch,
                    "train_loss": float(train_loss),
                    "val_loss": float(val_loss),
                    "lr": current_lr,
                }
            )
            if val_loss < best_loss:
                best_loss, best_epoch = val_loss, epoch
                best_params = {k: p.data().copy() for k, p in net.collect_params().items()}
            smoothed = (
                val_loss
                if smoothed is None
                else (SMOOTHING * smoothed + (1 - SMOOTHING) * val_loss)
            )
            if smoothed < mark * (1 - MIN_IMPROVEMENT):
                mark, mark_epoch = smoothed, epoch
            bar.set_postfix(train=f"{train_loss:.3g}", val=f"{val_loss:.3g}", refresh=False)
            bar.update(1)
            if (
                lr_schedule == "plateau"
                and n_val
                and min(epoch - mark_epoch, epoch - last_cut) >= wait
                and current_lr > lr / 1000
            ):
                current_lr, last_cut = max(current_lr / 2, lr / 1000), epoch
                trainer.set_learning_rate(current_lr)
            if patience is not None and n_val and epoch - mark_epoch >= patience:
                stopped = (
                    f"stopped early: the hold-out loss did not improve by "
                    f"{MIN_IMPROVEMENT:.1%} for {patience} epochs"
                )
                break
    finally:
        bar.close()
    assert best_params is not None
    for name, param in net.collect_params().items():
        param.set_data(best_params[name])

    raw_pred = out_scaler.inverse_transform(predict_normalized(net, x_val, dtype)).astype(
        np.float64
    )
    raw_true = Y[val_idx] if n_val else Y[train_idx]
    rmse = np.sqrt(np.mean((raw_pred - raw_true) ** 2, axis=0))
    span = Y.max(axis=0) - Y.min(axis=0)
    return TrainResult(
        net=net,
        in_scaler=in_scaler,
        out_scaler=out_scaler,
        history=history,
        best_epoch=best_epoch,
        holdout_rmse=dict(zip(out_scaler.columns_, rmse.tolist(), strict=True)),
        holdout_rmse_relative=dict(zip(out_scaler.columns_, (rmse / span).tolist(), strict=True)),
        settings={**settings, "stopped": stopped},
        seconds=time.perf_counter() - started,
        holdout_true=raw_true,
        holdout_pred=raw_pred,
        rmse_on="hold-out" if n_val else "training",
    )


def predict_normalized(net: gluon.HybridBlock, Xn: np.ndarray, dtype: str) -> np.ndarray:
    """Run the plain net on normalized rows (in chunks) and return normalized outputs."""
    chunks = [
        net(mx.nd.array(Xn[i : i + 65536], dtype=dtype)).asnumpy()
        for i in range(0, Xn.shape[0], 65536)
    ]
    return np.concatenate(chunks)


def _run_epoch(
    net: gluon.HybridBlock,
    trainer: gluon.Trainer,
    loss_fn: gluon.loss.Loss,
    X: np.ndarray,
    Y: np.ndarray,
    batch_size: int,
    rng: np.random.RandomState,
) -> float:
    order = rng.permutation(X.shape[0])
    # Full batches only keep shapes static (static_shape=True); the remainder joins next epoch.
    n_full = max(1, X.shape[0] // batch_size)
    size = min(batch_size, X.shape[0])
    xs, ys = mx.nd.array(X[order], dtype=X.dtype), mx.nd.array(Y[order], dtype=Y.dtype)
    losses = []
    for b in range(n_full):
        xb, yb = xs[b * size : (b + 1) * size], ys[b * size : (b + 1) * size]
        with autograd.record():
            loss = loss_fn(net(xb), yb)
        loss.backward()
        trainer.step(size)
        # kept on the device: reading it here would wait for each step (MXNet runs ahead)
        losses.append(loss.mean())
    # L2Loss is half the squared error, averaged over outputs: report the MSE.
    return 2.0 * float(mx.nd.add_n(*losses).asscalar()) / n_full


def _mse(net: gluon.HybridBlock, X: np.ndarray, Y: np.ndarray) -> float:
    pred = predict_normalized(net, X, str(X.dtype))
    return float(np.mean((pred.astype(np.float64) - Y) ** 2))


def _progress(epochs: int, enabled: bool | None) -> Any:
    from tqdm.auto import tqdm

    disable = not sys.stderr.isatty() if enabled is None else not enabled
    return tqdm(total=epochs, desc="training", unit="epoch", disable=disable, file=sys.stderr)


def _check_choice(what: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise DataError(f"{what} must be one of {', '.join(choices)}, got {value!r}")
