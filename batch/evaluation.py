"""Holdout metrics and the plots people look at: ROC, precision-recall, calibration, loss."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

CALIBRATION_BINS = 10


def calibration_bins(y: np.ndarray, p: np.ndarray, bins: int = CALIBRATION_BINS
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean predicted, observed rate, rows) per bin of equal row count, by predicted score."""
    order = np.argsort(p, kind="stable")
    groups = [g for g in np.array_split(order, bins) if len(g)]
    predicted = np.array([p[g].mean() for g in groups])
    observed = np.array([y[g].mean() for g in groups])
    return predicted, observed, np.array([len(g) for g in groups])


def metrics(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    """ROC AUC, PR AUC (average precision), log loss, Brier score and expected calibration
    error (equal-count bins) of probabilities `p` for 0/1 labels `y`."""
    from sklearn.metrics import average_precision_score, brier_score_loss, log_loss, roc_auc_score

    p = np.clip(p.astype(np.float64), 1e-7, 1 - 1e-7)
    predicted, observed, rows = calibration_bins(y, p)
    return {
        "roc_auc": float(roc_auc_score(y, p)),
        "pr_auc": float(average_precision_score(y, p)),
        "log_loss": float(log_loss(y, p, labels=[0, 1])),
        "brier": float(brier_score_loss(y, p)),
        "ece": float(np.sum(rows * np.abs(predicted - observed)) / rows.sum()),
        "positive_rate": float(y.mean()),
        "rows": float(len(y)),
    }


def write_plots(directory: Path, y: np.ndarray, scores: Mapping[str, np.ndarray],
                losses: Sequence[float]) -> list[Path]:
    """roc.png, pr.png, calibration.png (one curve per named score) and loss.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import precision_recall_curve, roc_curve

    directory.mkdir(parents=True, exist_ok=True)
    written = []

    fig, ax = plt.subplots(figsize=(5, 5))
    for name, p in scores.items():
        fpr, tpr, _ = roc_curve(y, p)
        ax.plot(fpr, tpr, label=name)
    ax.plot([0, 1], [0, 1], ls=":", color="grey")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC (holdout)")
    ax.legend(loc="lower right")
    written.append(_save(fig, directory / "roc.png"))

    fig, ax = plt.subplots(figsize=(5, 5))
    for name, p in scores.items():
        precision, recall, _ = precision_recall_curve(y, p)
        ax.plot(recall, precision, label=name)
    ax.axhline(y.mean(), ls=":", color="grey", label="base rate")
    ax.set(xlabel="recall", ylabel="precision", title="Precision-recall (holdout)")
    ax.legend(loc="upper right")
    written.append(_save(fig, directory / "pr.png"))

    fig, ax = plt.subplots(figsize=(5, 5))
    for name, p in scores.items():
        predicted, observed, _ = calibration_bins(y, p)
        ax.plot(predicted, observed, marker="o", label=name)
    ax.plot([1e-4, 1], [1e-4, 1], ls=":", color="grey")
    ax.set(xscale="log", yscale="log", xlabel="mean predicted probability",
           ylabel="observed fraud rate", title="Calibration (equal-count bins)")
    ax.legend(loc="upper left")
    written.append(_save(fig, directory / "calibration.png"))

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(range(1, len(losses) + 1), losses, marker="o")
    ax.set(xlabel="epoch", ylabel="training log loss", title="Training curve")
    written.append(_save(fig, directory / "loss.png"))
    return written


def _save(fig, path: Path) -> Path:  # type: ignore[no-untyped-def]
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
