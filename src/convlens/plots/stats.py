"""Figures of the filter activation statistics and of feature maps (the readings of docs/filter-statistics.md)."""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from PIL import Image

from ..io import save_figure
from . import wrap_title

STRENGTH_THRESHOLD = 0.1


def upsample_nearest(arr: np.ndarray, size: int) -> np.ndarray:
    reps = int(np.ceil(size / arr.shape[-1]))
    big = arr.repeat(reps, axis=-2).repeat(reps, axis=-1)
    return big[..., :size, :size]


def dominant_filter_ranks(stat: dict, c: int, threshold: float = STRENGTH_THRESHOLD) -> np.ndarray:
    """Per pixel of class c: the rank of the winning filter (NaN where too weak to colour).

    Winner k* = argmax_k M[c,k,i,j] / max over classes and space of M[·,k].
    """
    mean_map = stat["mean_map"]
    peak = mean_map.max(axis=(0, 2, 3))
    norm = mean_map[c] / np.where(peak > 0, peak, 1)[:, None, None]
    winner = norm.argmax(0)
    strength = norm.max(0)
    rank = stat["rank"][c][winner].astype(float)
    rank[strength < threshold] = np.nan
    return rank


def plot_rank_overlay(stats: dict[str, dict], class_means: np.ndarray, path: str | Path,
                      class_names: list[str]) -> Path:
    """Grid rows = layers, columns = classes; pixels coloured by the rank of their dominant filter."""
    layers = list(stats)
    n_cls = len(class_names)
    fig, axes = plt.subplots(len(layers), n_cls, figsize=(1.55 * n_cls + 1.2, 1.7 * len(layers) + 0.4), squeeze=False,
                             layout="constrained")
    size = class_means.shape[-1]
    for r, layer in enumerate(layers):
        k = stats[layer]["score"].shape[1]
        cmap = plt.get_cmap("jet_r", k)
        for c in range(n_cls):
            ax = axes[r, c]
            rank = upsample_nearest(dominant_filter_ranks(stats[layer], c), size)
            ax.imshow(class_means[c], cmap="gray", vmin=0, vmax=1)
            ax.imshow(np.ma.masked_invalid(rank), cmap=cmap, vmin=0.5, vmax=k + 0.5, alpha=0.75,
                      interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(class_names[c])
            if c == 0:
                ax.set_ylabel(f"{layer}\n({k} filters)")
        sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0.5, k + 0.5))
        cb = fig.colorbar(sm, ax=axes[r, :].tolist(), fraction=0.02, pad=0.01)
        cb.set_ticks([1, k])
        cb.set_ticklabels(["rank 1 (most)", f"rank {k} (least)"], fontsize=8)
    fig.suptitle("Dominant filter per pixel, coloured by its rank for the class (red = most important, "
                 "blue = least); uncoloured: weak", fontsize=10)
    return save_figure(fig, path)


def plot_score_heatmaps(stats: dict[str, dict], path: str | Path, class_names: list[str]) -> Path:
    layers = list(stats)
    fig, axes = plt.subplots(1, len(layers), figsize=(4.3 * len(layers), 4), squeeze=False, layout="constrained")
    for ax, layer in zip(axes[0], layers):
        score = stats[layer]["score"]
        im = ax.imshow(score, cmap="viridis", aspect="auto")
        ax.set(title=f"{layer}: mean activation", xlabel="filter", ylabel="class",
               yticks=range(len(class_names)), yticklabels=class_names, xticks=range(score.shape[1]))
        ax.tick_params(axis="x", labelsize=7)
        fig.colorbar(im, ax=ax, fraction=0.046)
    return save_figure(fig, path)


def plot_score_bars(stat: dict, layer: str, path: str | Path, class_names: list[str]) -> Path:
    n = len(class_names)
    cols = 5
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 2.3 * rows + 0.3), squeeze=False, sharey=True,
                             layout="constrained")
    k = stat["score"].shape[1]
    colours = plt.get_cmap("jet_r", k)(np.arange(k))
    for c, ax in enumerate(axes.ravel()):
        if c >= n:
            ax.axis("off")
            continue
        order = np.argsort(stat["rank"][c])
        ax.bar(range(k), stat["score"][c][order], color=colours)
        ax.set_xticks(range(k))
        ax.set_xticklabels(order, fontsize=6)
        ax.set_title(f"class {class_names[c]}", fontsize=9)
    fig.suptitle(f"{layer}: filter scores sorted by rank (labels: filter index)", fontsize=10)
    return save_figure(fig, path)


def plot_class_probability(stats: dict[str, dict], path: str | Path, class_names: list[str]) -> Path:
    """P(c | top filter of c active at (i, j)) = M[c,k,i,j] / Σ_c' M[c',k,i,j] for the class's rank-1 filter."""
    layers = list(stats)
    n = len(class_names)
    fig, axes = plt.subplots(len(layers), n, figsize=(1.5 * n + 1, 1.7 * len(layers) + 0.4), squeeze=False,
                             layout="constrained")
    for r, layer in enumerate(layers):
        m = stats[layer]["mean_map"]
        total = m.sum(0)
        for c in range(n):
            k = int(np.argmin(stats[layer]["rank"][c]))
            prob = np.divide(m[c, k], total[k], out=np.zeros_like(total[k]), where=total[k] > 0)
            im = axes[r, c].imshow(prob, cmap="magma", vmin=0, vmax=1)
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
            if r == 0:
                axes[r, c].set_title(class_names[c])
            axes[r, c].set_xlabel(f"f{k}", fontsize=7)
            if c == 0:
                axes[r, c].set_ylabel(layer)
    fig.colorbar(im, ax=axes.ravel().tolist(), fraction=0.02, label="P(class | filter active)")
    fig.suptitle("Per-pixel class probability of each class's rank-1 filter", fontsize=10)
    return save_figure(fig, path)


def mosaic(tiles: np.ndarray, pad: int = 1, fill: float = np.nan) -> np.ndarray:
    """(rows, cols, h, w) tiles → one (rows·(h+pad), cols·(w+pad)) array: one imshow instead of many axes."""
    rows, cols, h, w = tiles.shape
    out = np.full((rows * (h + pad) - pad, cols * (w + pad) - pad), fill, dtype=float)
    for r in range(rows):
        for c in range(cols):
            out[r * (h + pad):r * (h + pad) + h, c * (w + pad):c * (w + pad) + w] = tiles[r, c]
    return out


def plot_mosaic(tiles: np.ndarray, row_labels: list[str], col_labels: list[str] | list[list[str]], title: str,
                path: str | Path, cmap: str = "inferno", scale_rows: bool = False) -> Path:
    """A labelled grid of small maps drawn as one image (fast for hundreds of tiles)."""
    rows, cols, h, w = tiles.shape
    if scale_rows:  # each tile scaled on its own row's maximum
        peak = tiles.reshape(rows, -1).max(1)
        tiles = tiles / np.where(peak > 0, peak, 1)[:, None, None, None]
    big = mosaic(tiles, pad=max(1, h // 10))
    width = min(0.62 * cols + 1.0, 18)
    fig, ax = plt.subplots(figsize=(width, 0.62 * rows + 0.9), layout="constrained")
    cm = plt.get_cmap(cmap).with_extremes(bad="white")
    ax.imshow(np.ma.masked_invalid(big), cmap=cm, interpolation="nearest")
    step_y, step_x = big.shape[0] / rows, big.shape[1] / cols
    ax.set_yticks([(r + 0.45) * step_y for r in range(rows)])
    ax.set_yticklabels(row_labels, fontsize=8)
    ax.set_xticks([(c + 0.45) * step_x for c in range(cols)])
    ax.set_xticklabels(col_labels if isinstance(col_labels[0], str) else ["" for _ in range(cols)], fontsize=7)
    if not isinstance(col_labels[0], str):  # per-tile labels (e.g. filter index per rank)
        for r in range(rows):
            for c in range(cols):
                ax.text((c + 0.05) * step_x, (r + 0.05) * step_y, col_labels[r][c], color="white", fontsize=6,
                        va="top")
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set_title(wrap_title(title, width, 9), fontsize=9)
    return save_figure(fig, path)


def plot_ranked_maps(stat: dict, layer: str, path: str | Path, class_names: list[str]) -> Path:
    """Rows = classes, columns = rank; each cell the filter's class-mean map (label: filter index)."""
    m = stat["mean_map"]
    order = np.argsort(stat["rank"], axis=1)
    tiles = np.stack([m[c, order[c]] for c in range(m.shape[0])])
    labels = [[f"f{f}" for f in order[c]] for c in range(m.shape[0])]
    return plot_mosaic(tiles / (m.max() or 1.0), class_names, labels,
                       f"{layer}: class-mean map of each filter, ordered by rank (left = rank 1)", path)


def plot_feature_maps(image: np.ndarray, acts: np.ndarray, layer: str, path: str | Path, title: str = "") -> Path:
    """The input and every filter's activation map of one layer."""
    k = acts.shape[0]
    cols = min(k + 1, 10)
    rows = (k + 1 + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(1.4 * cols, 1.5 * rows + 0.3), squeeze=False, layout="constrained")
    axes = axes.ravel()
    axes[0].imshow(image, cmap="gray")
    axes[0].set_title("input", fontsize=8)
    for i in range(k):
        axes[i + 1].imshow(acts[i], cmap="viridis")
        axes[i + 1].set_title(f"filter {i}", fontsize=7)
    for ax in axes:
        ax.axis("off")
    fig.suptitle(wrap_title(title or f"{layer} feature maps", 1.4 * cols, 9), fontsize=9)
    return save_figure(fig, path)


def plot_all_digits(images: np.ndarray, acts: np.ndarray, layer: str, path: str | Path,
                    class_names: list[str]) -> Path:
    """Rows = one representative image per class; columns = the input, then every filter of ``layer``."""
    n, k, h, w = acts.shape
    peak = acts.reshape(n, -1).max(1)
    scaled = acts / np.where(peak > 0, peak, 1)[:, None, None, None]
    inputs = np.stack([np.asarray(Image.fromarray((img * 255).astype(np.uint8)).resize((w, h), Image.BILINEAR),
                                  dtype=float) / 255 for img in images])
    tiles = np.concatenate([inputs[:, None], scaled], axis=1)
    return plot_mosaic(tiles, class_names, ["input"] + [f"f{i}" for i in range(k)],
                       f"{layer}: activation maps for one test image of every class (each row scaled to its maximum)",
                       path, cmap="viridis")


def plot_kernels(weights: np.ndarray, path: str | Path, layer: str = "l1") -> Path:
    """First-layer kernels (K, 1, h, w) on a shared diverging scale."""
    k = weights.shape[0]
    fig, axes = plt.subplots(1, k, figsize=(1.2 * k, 1.6), squeeze=False, layout="constrained")
    vmax = np.abs(weights).max() or 1.0
    for i in range(k):
        axes[0, i].imshow(weights[i, 0], cmap="RdBu_r", vmin=-vmax, vmax=vmax)
        axes[0, i].set_title(f"f{i}", fontsize=8)
        axes[0, i].axis("off")
    fig.suptitle(f"{layer} kernels (red positive, blue negative)", fontsize=9)
    return save_figure(fig, path)
