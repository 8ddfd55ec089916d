"""Faithfulness figures: metric bars, deletion/insertion curves, sanity-check curves."""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from ..io import save_figure

METRIC_LABELS = {"deletion_auc": "deletion AUC (lower is better)", "insertion_auc": "insertion AUC (higher is better)",
                 "average_drop": "Average Drop % (lower is better)",
                 "increase_in_confidence": "Increase in Confidence % (higher is better)"}


def method_colours(n: int) -> np.ndarray:
    """One colour per method, the same in every faithfulness figure (tab20: distinct up to 20)."""
    return plt.get_cmap("tab20")(np.arange(n) % 20)


def value_limits(values: list[float], room: float = 0.22) -> tuple[float, float]:
    """x limits that include 0 and leave ``room`` (a fraction of the span) for the value labels."""
    lo, hi = min(0.0, *values), max(0.0, *values)
    span = hi - lo or 1.0
    return lo - (room * span if lo < 0 else 0.0), hi + room * span


def plot_metric_table(table: dict[str, dict], path: str | Path) -> Path:
    methods = list(table)
    fig, axes = plt.subplots(1, len(METRIC_LABELS), figsize=(4.2 * len(METRIC_LABELS), 0.35 * len(methods) + 1.6),
                             layout="constrained")
    for ax, (key, label) in zip(axes, METRIC_LABELS.items()):
        values = [table[m][key] for m in methods]
        ax.barh(range(len(methods)), values, color=method_colours(len(methods)))
        ax.set_xlim(*value_limits(values))
        ax.set_yticks(range(len(methods)))
        ax.set_yticklabels(methods if ax is axes[0] else [""] * len(methods), fontsize=8)
        ax.invert_yaxis()
        ax.set_title(label, fontsize=9)
        for i, v in enumerate(values):
            ax.text(v, i, f" {v:.3f}" if v < 10 else f" {v:.1f}", va="center", fontsize=7)
    return save_figure(fig, path)


def plot_curves(curves: dict[str, dict], path: str | Path) -> Path:
    fig, (ax_d, ax_i) = plt.subplots(1, 2, figsize=(11, 4.4), layout="constrained")
    for colour, (name, c) in zip(method_colours(len(curves)), curves.items()):
        ax_d.plot(c["fractions"], c["deletion_mean"], color=colour, label=f"{name} ({c['deletion_auc']:.3f})")
        ax_i.plot(c["fractions"], c["insertion_mean"], color=colour, label=f"{name} ({c['insertion_auc']:.3f})")
    ax_d.set(xlabel="fraction of pixels removed", ylabel="target probability (mean over images)")
    ax_d.set_title("Deletion: most important pixels removed first", fontsize=10)
    ax_i.set(xlabel="fraction of pixels revealed")
    ax_i.set_title("Insertion: most important pixels revealed first", fontsize=10)
    for ax in (ax_d, ax_i):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, title="method (AUC)", title_fontsize=7)
    return save_figure(fig, path)


def plot_sanity(result: dict, path: str | Path, metric: str = "spearman_abs") -> Path:
    steps = result["steps"]
    methods = [k for k in steps[0] if k != "randomized"]
    labels = ["original"] + [s["randomized"][-1] for s in steps]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4), layout="constrained")
    for ax, key in zip(axes, (metric, "ssim")):
        for m in methods:
            ax.plot(range(len(labels)), [1.0] + [s[m][key] for s in steps], "o-", label=m, markersize=3)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
        ax.set_ylim(-0.3, 1.05)
        ax.axhline(0, color="grey", lw=0.6)
        ax.grid(alpha=0.3)
        ax.set_ylabel({"spearman_abs": "Spearman ρ of |map| vs original", "ssim": "SSIM vs original"}[key])
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{result['mode'].capitalize()} randomization of the weights "
                 f"({'top layer first' if result['mode'] == 'cascading' else 'one layer at a time'})", fontsize=10)
    return save_figure(fig, path)
