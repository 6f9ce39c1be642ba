"""Reproduce and explain why baking normalization into custom layers stalls training.

Run::

    .venv/bin/python scripts/why_custom_layers_stall.py [--epochs N] [--out DIR]

It trains the same sigmoid Dense network (3 hidden layers of 32, float64, the same
initial weights) on one synthetic 3 -> 2 regression problem in several ways:

* ``plain`` -- approach (B): inputs and targets scaled to 0…1, L2 loss in normalized
  units; the affine maps are applied outside the network afterwards.
* ``custom`` -- approach (A), what a user writes: ``NormDense`` (fixed ``x*s_in + t_in``)
  -> the same Dense stack -> ``DenormDense`` (fixed ``y*s_out + t_out``), L2 loss on the
  raw-unit targets, same optimizer and learning rate as ``plain``.
* variants of (A) that isolate one mechanism each (smaller learning rate, no input
  normalization, a centred output offset, plain MSE without L2Loss's 1/2, SGD).

Per epoch it records the training loss (in each model's own units), the validation MSE
in normalized units (comparable across all variants) and the validation RMSE of each
target as a percentage of its range; at initialization and at the end it records the
gradient norms of the first and last Dense layers and the fraction of saturated sigmoid
units. It writes ``why-custom-layers-stall.json`` and ``why-custom-layers-stall.png`` to
``--out`` (default ``docs/img/``).

Importable: :func:`run` returns the same dictionary that is written as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # running the file directly from a checkout
    sys.path.insert(0, str(ROOT))

from normexport.scaling import MinMaxScaler  # noqa: E402

STEM = "why-custom-layers-stall"
DTYPE = "float64"
INPUTS = ("temperature_K", "strain", "fraction")
TARGETS = ("y0_0_100", "y1_0_40")
HIDDEN = (32, 32, 32)
BATCH = 32
N_TRAIN = 2000
N_VAL = 500
DATA_SEED = 1234
DEFAULT_EPOCHS = 100
SATURATION_THRESHOLD = 0.01  # a sigmoid unit counts as saturated when s(1 - s) < this


# ------------------------------------------------------------------------------ data


def make_data(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A smooth 3 -> 2 function; raw inputs on very different ranges, raw targets
    spanning roughly 0…100 and 0…40."""
    temperature = rng.uniform(250.0, 350.0, n)
    strain = rng.uniform(0.0, 0.01, n)
    fraction = rng.uniform(0.0, 1.0, n)
    a = (temperature - 250.0) / 100.0
    b = strain / 0.01
    c = fraction
    # Both functions span (almost exactly) 0…1 on the unit cube.
    f0 = 0.5 + 0.5 * np.sin(3.0 * a + 2.0 * b) * (0.5 + 0.5 * c)
    f1 = 0.5 + 0.5 * np.tanh(3.0 * (b - 0.5) + 1.5 * (a - 0.5)) * np.cos(1.2 * c)
    X = np.stack([temperature, strain, fraction], axis=1)
    Y = np.stack([100.0 * f0, 40.0 * f1], axis=1)
    return X, Y


# ------------------------------------------------------------------------- variants


@dataclass(frozen=True)
class Variant:
    """One way of training the same Dense stack."""

    name: str
    label: str
    approach: str  # "plain": normalized X and Y; "custom": fixed layers, raw-unit loss
    optimizer: str = "adam"
    lr: float = 1e-3
    input_norm: bool = True  # custom only: NormDense in front (False: raw X goes in)
    offset: str = "min"  # custom only: t_out maps 0 -> target min ("min") or mid-range
    loss: str = "l2"  # "l2": gluon.loss.L2Loss (1/2 * sq); "mse": mean squared error
    momentum: float = 0.0  # sgd only
    # Per-target loss weights: "none"; "range2" = (s_k / s_0)**2, what a raw-unit loss
    # implicitly does, applied to the plain net; "inv_range2" = 1 / s_k**2, which turns
    # the custom net's raw-unit loss back into exactly the plain normalized loss.
    weights: str = "none"


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("plain", "(B) plain: normalized X and Y, Adam 1e-3", "plain"),
        Variant("custom", "(A) NormDense/DenormDense, raw-unit L2Loss, Adam 1e-3", "custom"),
        Variant("custom_mse", "(A) with MSE instead of L2Loss (no 1/2)", "custom", loss="mse"),
        Variant("custom_mid", "(A) with t_out at mid-range", "custom", offset="mid"),
        Variant(
            "custom_balanced",
            "(A) with raw loss weighted 1/s_out^2",
            "custom",
            weights="inv_range2",
        ),
        Variant(
            "plain_weighted", "(B) with loss weighted (s_out/s_out0)^2", "plain", weights="range2"
        ),
        Variant("custom_raw_in", "(A) without NormDense (raw X in)", "custom", input_norm=False),
        Variant("plain_lr1e-4", "(B) Adam 1e-4", "plain", lr=1e-4),
        Variant("custom_lr1e-4", "(A) Adam 1e-4", "custom", lr=1e-4),
        Variant("plain_sgd", "(B) SGD 0.1", "plain", optimizer="sgd", lr=0.1),
        Variant("custom_sgd", "(A) SGD 0.1", "custom", optimizer="sgd", lr=0.1),
        Variant("custom_sgd_1e-3", "(A) SGD 1e-3", "custom", optimizer="sgd", lr=1e-3),
        Variant("custom_sgd_1e-5", "(A) SGD 1e-5", "custom", optimizer="sgd", lr=1e-5),
    )
}


# --------------------------------------------------------------------------- the model


def _blocks() -> Any:
    """The custom layers, defined lazily so that importing this module needs no MXNet."""
    import mxnet as mx
    from mxnet import gluon

    class FixedAffine(gluon.HybridBlock):
        """``x * scale + shift`` per column, with constant, non-trainable factors."""

        def __init__(self, scale: np.ndarray, shift: np.ndarray, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            row = (1, int(np.size(scale)))
            with self.name_scope(), warnings.catch_warnings():
                # MXNet registers one initializer per Constant and says so, loudly.
                warnings.filterwarnings("ignore", message=".*overriding existing initializer")
                self.scale = self.params.get_constant(
                    "scale", mx.nd.array(np.reshape(scale, row), dtype=DTYPE)
                )
                self.shift = self.params.get_constant(
                    "shift", mx.nd.array(np.reshape(shift, row), dtype=DTYPE)
                )

        def hybrid_forward(self, F: Any, x: Any, scale: Any, shift: Any) -> Any:
            return F.broadcast_add(F.broadcast_mul(x, scale), shift)

    class NormDense(FixedAffine):
        """Raw inputs -> 0…1 inputs."""

    class DenormDense(FixedAffine):
        """0…1 outputs -> raw outputs."""

    return NormDense, DenormDense


def _dense_stack(seed: int) -> Any:
    """The trainable part: sigmoid hidden layers and a linear output, identical initial
    weights for every variant with the same seed (MXNet's default initializer)."""
    import mxnet as mx
    from mxnet import gluon

    stack = gluon.nn.HybridSequential(prefix="stack_")
    with stack.name_scope():
        n_in = len(INPUTS)
        for width in HIDDEN:
            stack.add(gluon.nn.Dense(width, activation="sigmoid", in_units=n_in, dtype=DTYPE))
            n_in = width
        stack.add(gluon.nn.Dense(len(TARGETS), in_units=n_in, dtype=DTYPE))
    mx.random.seed(seed)
    stack.initialize(mx.init.Uniform(0.07))  # Gluon's default, spelled out
    return stack


def _build(variant: Variant, seed: int, x_sc: MinMaxScaler, y_sc: MinMaxScaler) -> Any:
    from mxnet import gluon

    stack = _dense_stack(seed)
    if variant.approach == "plain":
        return stack
    NormDense, DenormDense = _blocks()
    net = gluon.nn.HybridSequential(prefix="custom_")
    if variant.input_norm:
        net.add(NormDense(x_sc.scale_, x_sc.shift_, prefix="normdense_"))
    net.add(stack)
    s_out, t_out = y_sc.inverse_scale_, y_sc.inverse_shift_
    if variant.offset == "mid":
        t_out = t_out + 0.5 * s_out
    net.add(DenormDense(s_out, t_out, prefix="denormdense_"))
    net.collect_params(".*dense_(scale|shift)$").initialize()  # the constants only
    return net


def _stack_of(net: Any, variant: Variant) -> Any:
    return net if variant.approach == "plain" else net[-2]


# ---------------------------------------------------------------------- measurements


def _loss_fn(variant: Variant, y_sc: MinMaxScaler) -> Any:
    """Per-row loss, averaged over the targets as gluon.loss.L2Loss does."""
    import mxnet as mx

    half = 0.5 if variant.loss == "l2" else 1.0
    s_out = y_sc.inverse_scale_
    if variant.weights == "none":
        w = np.ones_like(s_out)
    elif variant.weights == "range2":
        w = (s_out / s_out[0]) ** 2
    elif variant.weights == "inv_range2":
        w = 1.0 / s_out**2
    else:
        raise ValueError(f"unknown weights {variant.weights!r}")
    if variant.weights == "none" and variant.loss == "l2":
        from mxnet import gluon

        return gluon.loss.L2Loss()  # what a user writes
    weight = mx.nd.array(w.reshape(1, -1), dtype=DTYPE)

    def loss(pred: Any, label: Any) -> Any:
        return half * mx.nd.broadcast_mul((pred - label) ** 2, weight).mean(axis=1)

    return loss


def _to_raw(pred: np.ndarray, variant: Variant, y_sc: MinMaxScaler) -> np.ndarray:
    return y_sc.inverse_transform(pred) if variant.approach == "plain" else pred


def _evaluate(net: Any, X: Any, Y_raw: np.ndarray, variant: Variant, y_sc: MinMaxScaler):
    pred = _to_raw(net(X).asnumpy(), variant, y_sc)
    with np.errstate(over="ignore", invalid="ignore"):  # a diverged run gives inf/nan
        err_norm = (pred - Y_raw) * y_sc.scale_
        mse_norm = float(np.mean(err_norm**2))
        rmse_pct = [float(v) for v in 100.0 * np.sqrt(np.mean(err_norm**2, axis=0))]
    return mse_norm, rmse_pct


def _diagnose(net: Any, variant: Variant, X: Any, Y: Any, y_sc: MinMaxScaler) -> dict[str, Any]:
    """Gradient norms of the first and last Dense layer (the model's own loss, averaged
    over the whole training set as Trainer.step does), the share of the first layer's
    gradient that each target contributes, and sigmoid saturation."""
    import mxnet as mx
    from mxnet import autograd

    stack = _stack_of(net, variant)
    loss_fn = _loss_fn(variant, y_sc)
    with autograd.record():
        loss = loss_fn(net(X), Y).mean()
    loss.backward()
    first, last = stack[0], stack[-1]
    grads = {
        "loss": float(loss.asscalar()),
        "grad_first_weight": float(first.weight.grad().norm().asscalar()),
        "grad_last_weight": float(last.weight.grad().norm().asscalar()),
        "grad_last_bias": [float(v) for v in last.bias.grad().asnumpy()],
    }
    # The same loss with all but one target's error masked out: how much of the shared
    # (first-layer) gradient comes from each target.
    per_target = []
    for k in range(len(TARGETS)):
        mask = np.zeros((1, len(TARGETS)))
        mask[0, k] = 1.0
        m = mx.nd.array(mask, dtype=DTYPE)
        with autograd.record():
            pred = net(X)
            masked = mx.nd.broadcast_mul(pred, m) + mx.nd.broadcast_mul(Y, 1.0 - m)
            loss_k = loss_fn(masked, Y).mean()
        loss_k.backward()
        per_target.append(float(first.weight.grad().norm().asscalar()))
    grads["grad_first_weight_per_target"] = per_target
    # How strongly the first layer can see each input: norm of its weight column (the
    # stack sees normalized inputs, except in the raw-input variant).
    w = first.weight.data().asnumpy()
    grads["first_weight_column_norms"] = [float(v) for v in np.linalg.norm(w, axis=0)]
    # Hidden activations: run the stack layer by layer on the (normalized or raw) input.
    h = net[0](X) if variant.approach == "custom" and variant.input_norm else X
    saturated, total, per_layer = 0, 0, []
    for layer in list(stack)[:-1]:
        h = layer(h)
        s = h.asnumpy()
        sat = (s * (1.0 - s)) < SATURATION_THRESHOLD
        per_layer.append(float(sat.mean()))
        saturated += int(sat.sum())
        total += sat.size
    grads["saturated_fraction"] = saturated / total
    grads["saturated_per_layer"] = per_layer
    return grads


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def train_variant(
    variant: Variant,
    epochs: int,
    seed: int,
    data: dict[str, np.ndarray],
    x_sc: MinMaxScaler,
    y_sc: MinMaxScaler,
) -> dict[str, Any]:
    import mxnet as mx
    from mxnet import autograd, gluon

    net = _build(variant, seed, x_sc, y_sc)
    net.hybridize(static_alloc=True, static_shape=True)
    if variant.approach == "plain":
        X_tr, Y_tr = x_sc.transform(data["X_train"]), y_sc.transform(data["Y_train"])
        X_va = x_sc.transform(data["X_val"])
    else:
        X_tr, Y_tr, X_va = data["X_train"], data["Y_train"], data["X_val"]
    X_tr = mx.nd.array(X_tr, dtype=DTYPE)
    Y_tr = mx.nd.array(Y_tr, dtype=DTYPE)
    X_va = mx.nd.array(X_va, dtype=DTYPE)
    Y_va_raw = data["Y_val"]

    loss_fn = _loss_fn(variant, y_sc)
    opt: dict[str, float] = {"learning_rate": variant.lr}
    if variant.optimizer == "sgd":
        opt["momentum"] = variant.momentum
    trainer = gluon.Trainer(_stack_of(net, variant).collect_params(), variant.optimizer, opt)
    at_init = _diagnose(net, variant, X_tr, Y_tr, y_sc)
    mse0, pct0 = _evaluate(net, X_va, Y_va_raw, variant, y_sc)
    curves: dict[str, list] = {
        "train_loss": [None],
        "val_mse_norm": [mse0],
        "val_rmse_pct": [pct0],
    }
    rng = np.random.default_rng(seed)
    n = X_tr.shape[0]
    n_batches = n // BATCH
    diverged_at = None
    t0 = time.perf_counter()
    for epoch in range(1, epochs + 1):
        order = mx.nd.array(rng.permutation(n)[: n_batches * BATCH], dtype="int64")
        Xs, Ys = X_tr.take(order), Y_tr.take(order)
        total = 0.0
        batch_losses = []
        for i in range(n_batches):
            xb = Xs[i * BATCH : (i + 1) * BATCH]
            yb = Ys[i * BATCH : (i + 1) * BATCH]
            with autograd.record():
                loss = loss_fn(net(xb), yb)
            loss.backward()
            trainer.step(BATCH)
            batch_losses.append(loss.mean())
        total = float(mx.nd.add_n(*batch_losses).asscalar()) / n_batches
        mse, pct = _evaluate(net, X_va, Y_va_raw, variant, y_sc)
        curves["train_loss"].append(_finite(total))
        curves["val_mse_norm"].append(_finite(mse))
        curves["val_rmse_pct"].append([_finite(p) for p in pct])
        if not (math.isfinite(total) and math.isfinite(mse)):
            diverged_at = epoch
            break
    seconds = time.perf_counter() - t0
    at_end = _diagnose(net, variant, X_tr, Y_tr, y_sc) if diverged_at is None else None
    return {
        "variant": asdict(variant),
        "epochs_run": len(curves["train_loss"]) - 1,
        "diverged_at_epoch": diverged_at,
        "seconds": round(seconds, 2),
        "curves": curves,
        "at_init": _clean(at_init),
        "at_end": _clean(at_end),
    }


def _clean(obj: Any) -> Any:
    if isinstance(obj, float):
        return _finite(obj)
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clean(v) for v in obj]
    return obj


# ----------------------------------------------------------------------------- run


def run(
    epochs: int = DEFAULT_EPOCHS,
    seed: int = 0,
    variants: list[str] | tuple[str, ...] | None = None,
    lr: float | None = None,
) -> dict[str, Any]:
    """Train every requested variant for ``epochs`` epochs; return config + results.

    ``lr`` overrides the learning rate of the Adam variants that use the default 1e-3.
    """
    names = list(VARIANTS) if variants is None else list(variants)
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    rng = np.random.default_rng(DATA_SEED)
    X_train, Y_train = make_data(N_TRAIN, rng)
    X_val, Y_val = make_data(N_VAL, rng)
    data = {"X_train": X_train, "Y_train": Y_train, "X_val": X_val, "Y_val": Y_val}
    x_sc = MinMaxScaler().fit(X_train, columns=list(INPUTS))
    y_sc = MinMaxScaler().fit(Y_train, columns=list(TARGETS), target=True)
    results = {}
    for name in names:
        variant = VARIANTS[name]
        if lr is not None and variant.optimizer == "adam" and variant.lr == 1e-3:
            variant = replace(variant, lr=lr)
        results[name] = train_variant(variant, epochs, seed, data, x_sc, y_sc)
    return {
        "config": {
            "epochs": epochs,
            "seed": seed,
            "data_seed": DATA_SEED,
            "n_train": N_TRAIN,
            "n_val": N_VAL,
            "batch": BATCH,
            "hidden": list(HIDDEN),
            "activation": "sigmoid",
            "dtype": DTYPE,
            "inputs": list(INPUTS),
            "targets": list(TARGETS),
            "input_min": X_train.min(axis=0).tolist(),
            "input_max": X_train.max(axis=0).tolist(),
            "target_min": y_sc.data_min_.tolist(),
            "target_max": y_sc.data_max_.tolist(),
            "saturation_threshold": SATURATION_THRESHOLD,
            # Reference: always predicting the training mean (the "learned nothing" level).
            "val_mse_norm_mean_predictor": float(
                np.mean((y_sc.transform(Y_val) - y_sc.transform(Y_train).mean(axis=0)) ** 2)
            ),
        },
        "results": results,
    }


def summary_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per variant: the numbers the doc's table quotes."""
    rows = []
    for name, res in report["results"].items():
        c = res["curves"]
        end, init = res["at_end"] or {}, res["at_init"]
        rows.append(
            {
                "variant": name,
                "val_mse_norm_init": c["val_mse_norm"][0],
                "val_mse_norm_half": c["val_mse_norm"][len(c["val_mse_norm"]) // 2],
                "val_mse_norm_end": c["val_mse_norm"][-1],
                "fall_factor": (
                    c["val_mse_norm"][0] / c["val_mse_norm"][-1] if c["val_mse_norm"][-1] else None
                ),
                "rmse_pct_end": c["val_rmse_pct"][-1],
                "grad_first_init": init["grad_first_weight"],
                "grad_last_init": init["grad_last_weight"],
                "grad_first_per_target_init": init["grad_first_weight_per_target"],
                "saturated_init": init["saturated_fraction"],
                "saturated_end": end.get("saturated_fraction"),
                "diverged_at_epoch": res["diverged_at_epoch"],
            }
        )
    return rows


PANELS = (
    (
        "Adam 1e-3: validation MSE (normalized units)",
        ("plain", "custom", "custom_balanced", "plain_weighted", "custom_mid", "custom_raw_in"),
    ),
    (
        "other learning rates / optimizers: validation MSE (normalized)",
        (
            "custom_mse",
            "plain_lr1e-4",
            "custom_lr1e-4",
            "plain_sgd",
            "custom_sgd",
            "custom_sgd_1e-3",
            "custom_sgd_1e-5",
        ),
    ),
)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.2))

    def series(values: list) -> list[float]:
        return [np.nan if v is None else v for v in values]

    for ax, (title, names) in zip((axes[0], axes[2]), PANELS, strict=True):
        for name in names:
            if name not in results:
                continue
            res = results[name]
            plain = res["variant"]["approach"] == "plain"
            dotted = name in ("custom_balanced", "plain_weighted")
            style = ":" if dotted else ("-" if plain else "--")
            width = 3.0 if name in ("plain", "custom") else 1.6
            label = res["variant"]["label"]
            if res["diverged_at_epoch"]:
                label += f" (diverged, epoch {res['diverged_at_epoch']})"
            ax.plot(series(res["curves"]["val_mse_norm"]), style, lw=width, label=label)
        ax.set_title(title, fontsize=10)
        if ax.get_lines():
            ax.legend(fontsize=7.5, loc="upper right")
        # Diverged runs reach 1e290 before turning into inf: keep the axis readable.
        finite = [
            v
            for name in names
            if name in results
            for v in results[name]["curves"]["val_mse_norm"]
            if v is not None and v > 0
        ]
        if finite:
            ax.set_ylim(0.7 * min(finite), 2.0)
        ax.axhline(report["config"]["val_mse_norm_mean_predictor"], color="0.5", lw=0.8, zorder=0)
        ax.text(
            0,
            report["config"]["val_mse_norm_mean_predictor"] * 1.08,
            "predict the mean",
            fontsize=7,
            color="0.4",
        )
    targets = report["config"]["targets"]
    for name, style in (("plain", "-"), ("custom", "--")):
        if name not in results:
            continue
        pct = results[name]["curves"]["val_rmse_pct"]
        for k, tname in enumerate(targets):
            vals = [np.nan if p is None or p[k] is None else p[k] for p in pct]
            axes[1].plot(vals, style, lw=2.2, color=f"C{k + 2}", label=f"{name}: {tname}")
    axes[1].set_title("validation RMSE per target, % of its range", fontsize=10)
    if axes[1].get_lines():
        axes[1].legend(fontsize=8, loc="upper right")
    for ax in axes:
        ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.grid(True, which="both", alpha=0.3)
    cfg = report["config"]
    fig.suptitle(
        f"3 -> 2 regression, sigmoid {cfg['hidden']}, {cfg['dtype']}, seed {cfg['seed']}, "
        f"batch {cfg['batch']}, {cfg['n_train']} train rows",
        fontsize=10,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _format_table(rows: list[dict[str, Any]]) -> str:
    def f(v: Any, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    head = (
        f"{'variant':17s} {'valMSE0':>8s} {'valMSEmid':>9s} {'valMSEend':>9s} {'fall':>6s} "
        f"{'RMSE%y0':>7s} {'RMSE%y1':>7s} {'|g1|0':>8s} {'|gL|0':>8s} {'g1y0/g1y1':>9s} "
        f"{'sat0':>5s} {'satE':>5s}"
    )
    lines = [head]
    for r in rows:
        p = r["rmse_pct_end"]
        g0, g1 = r["grad_first_per_target_init"]
        lines.append(
            f"{r['variant']:17s} {f(r['val_mse_norm_init'], '8.3g')} "
            f"{f(r['val_mse_norm_half'], '9.3g')} "
            f"{f(r['val_mse_norm_end'], '9.3g')} {f(r['fall_factor'], '6.3g')} "
            f"{f(p[0], '7.2f')} {f(p[1], '7.2f')} {f(r['grad_first_init'], '8.3g')} "
            f"{f(r['grad_last_init'], '8.3g')} {f(g0 / g1, '9.2f')} "
            f"{f(r['saturated_init'], '5.2f')} {f(r['saturated_end'], '5.2f')}"
            + (f"  diverged@{r['diverged_at_epoch']}" if r["diverged_at_epoch"] else "")
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img")
    parser.add_argument("--variants", nargs="*", default=None, choices=list(VARIANTS))
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    report = run(args.epochs, args.seed, args.variants)
    report["summary"] = summary_rows(report)
    report["config"]["wall_seconds"] = round(time.perf_counter() - t0, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{STEM}.json").write_text(json.dumps(report, indent=1, allow_nan=False) + "\n")
    plot(report, args.out / f"{STEM}.png")
    print(_format_table(report["summary"]))
    print(f"wrote {args.out / (STEM + '.json')} and .png in {report['config']['wall_seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
