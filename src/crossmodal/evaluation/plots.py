"""The evaluation plots, one PNG per head: confusion matrix, one-vs-rest ROC curves, reliability diagram.

    from pathlib import Path
    from crossmodal.evaluation.plots import plot_confusion, plot_reliability, plot_roc
    plot_confusion(y, proba, labels, "gated: test confusion matrix", Path("reports/plots/gated_confusion.png"))

Drawn with matplotlib's Agg backend (no display needed); called by ``crossmodal.evaluation.evaluate.evaluate_all``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def plot_confusion(y: np.ndarray, proba: np.ndarray, labels, title: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import confusion_matrix

    cm = confusion_matrix(y, proba.argmax(axis=1), labels=list(range(len(labels)))) if len(y) else None
    if cm is None:
        cm = np.zeros((len(labels), len(labels)), dtype=np.int64)
    size = 2.5 + 0.5 * len(labels)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(cm, cmap="Blues")
    threshold = cm.max() / 2 if cm.max() else 1
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", color="white" if cm[i, j] > threshold else "black")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_roc(y: np.ndarray, proba: np.ndarray, labels, title: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import auc, roc_curve

    fig, ax = plt.subplots(figsize=(5, 4.5))
    # Binary: one curve, the positive class. Multi-class: one-vs-rest, one curve per class.
    classes = [1] if len(labels) == 2 else list(range(len(labels)))
    for c in classes:
        positives = y == c
        if not positives.any() or positives.all():
            continue  # ROC undefined for this class on this split (no positives or no negatives)
        fpr, tpr, _ = roc_curve(positives, proba[:, c])
        ax.plot(fpr, tpr, label=f"{labels[c]} (AUC {auc(fpr, tpr):.3f})")
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right", fontsize="small")
    else:
        ax.text(0.5, 0.5, "ROC undefined: a class is missing", ha="center", va="center")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_reliability(y: np.ndarray, before: np.ndarray, after: np.ndarray, temperature: float, title: str,
                     path: Path) -> Path:
    """Reliability diagram: accuracy against confidence per bin, before and after temperature scaling."""
    import matplotlib

    from crossmodal.evaluation.metrics import ECE_BINS, expected_calibration_error, reliability_bins

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 4.2), sharey=True)
    width = 1.0 / ECE_BINS
    centres = (np.arange(ECE_BINS) + 0.5) * width
    for ax, proba, name in ((axes[0], before, "as trained"), (axes[1], after, f"temperature T={temperature:.2f}")):
        ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1)
        if len(y):
            conf, acc, count = reliability_bins(y, proba)
            shown = count > 0
            ax.bar(centres[shown], acc[shown], width=width, edgecolor="black", alpha=0.7, label="accuracy")
            ax.plot(conf[shown], acc[shown], "o", color="tab:red", markersize=3, label="(confidence, accuracy)")
            ax.set_title(f"{name}: ECE {expected_calibration_error(y, proba):.3f}")
            ax.legend(loc="upper left", fontsize="small")
        else:
            ax.text(0.5, 0.5, "no test rows", ha="center", va="center")
            ax.set_title(name)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence (top-class probability)")
    axes[0].set_ylabel("accuracy")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
