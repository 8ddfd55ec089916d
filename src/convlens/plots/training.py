"""Learning curves and the confusion matrix."""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator

from ..io import save_figure


def plot_learning_curves(history: list[dict], path: str | Path) -> Path:
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8), layout="constrained")
    ax_loss.plot(epochs, [h["train_loss"] for h in history], "o-", label="training")
    ax_loss.plot(epochs, [h["val_loss"] for h in history], "s-", label="validation")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy loss", title="Loss by epoch")
    ax_acc.plot(epochs, [h["train_accuracy"] for h in history], "o-", label="training")
    ax_acc.plot(epochs, [h["val_accuracy"] for h in history], "s-", label="validation")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="Accuracy by epoch")
    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    return save_figure(fig, path)


def plot_confusion(cm: np.ndarray, path: str | Path, labels: list[str] | None = None) -> Path:
    n = cm.shape[0]
    labels = labels or [str(i) for i in range(n)]
    fig, ax = plt.subplots(figsize=(6.4, 5.6), layout="constrained")
    shown = np.log1p(cm)
    im = ax.imshow(shown, cmap="Blues")
    for i in range(n):
        for j in range(n):
            colour = "white" if shown[i, j] > shown.max() * 0.6 else "black"
            ax.text(j, i, str(int(cm[i, j])), ha="center", va="center", fontsize=8, color=colour)
    ax.set(xticks=range(n), yticks=range(n), xticklabels=labels, yticklabels=labels,
           xlabel="predicted class", ylabel="true class",
           title=f"Confusion matrix (accuracy {np.trace(cm) / max(cm.sum(), 1):.4f})")
    fig.colorbar(im, ax=ax, label="log(1 + count)")
    return save_figure(fig, path)
