"""PNG figures for the model directory's ``report/`` (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from normexport import files


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def loss_curves(history: list[dict[str, float]], best_epoch: int, path: Path) -> Path:
    """Train and validation loss per epoch (log scale), best epoch marked."""
    plt = _pyplot()
    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.semilogy(epochs, [h["train_loss"] for h in history], label="train")
    ax.semilogy(epochs, [h["val_loss"] for h in history], label="validation")
    ax.axvline(best_epoch, color="grey", linestyle=":", label=f"best epoch ({best_epoch})")
    ax.set_xlabel("epoch")
    ax.set_ylabel("MSE (normalized units)")
    ax.set_title("Training loss")
    ax.legend()
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return path


def parity(
    true: np.ndarray, pred: np.ndarray, columns: list[str], path: Path, rows: str = "hold-out"
) -> Path:
    """Predicted against true value per target (on the hold-out rows), in raw units."""
    plt = _pyplot()
    n = len(columns)
    fig, axes = plt.subplots(1, n, figsize=(4 * n, 4), dpi=100, squeeze=False)
    for j, (ax, name) in enumerate(zip(axes[0], columns, strict=True)):
        low, high = (
            float(min(true[:, j].min(), pred[:, j].min())),
            float(max(true[:, j].max(), pred[:, j].max())),
        )
        ax.plot([low, high], [low, high], color="grey", linewidth=1)
        ax.scatter(true[:, j], pred[:, j], s=6, alpha=0.6)
        rmse = float(np.sqrt(np.mean((pred[:, j] - true[:, j]) ** 2)))
        ax.set_title(f"{name}: {rows} RMSE {rmse:.3g}")
        ax.set_xlabel(f"true {name}")
        ax.set_ylabel(f"predicted {name}")
        ax.set_aspect("equal", adjustable="datalim")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return path


def _save(fig: Any, path: Path) -> None:
    with files.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": None})
