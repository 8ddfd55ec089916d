"""Activation-maximization figures."""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from PIL import Image

from ..io import save_figure, write_bytes


def as_image(img: torch.Tensor) -> np.ndarray:
    arr = img.detach().cpu().numpy()
    return arr[0] if arr.shape[0] == 1 else arr.transpose(1, 2, 0)


def show(ax, img: torch.Tensor) -> None:
    arr = as_image(img)
    ax.imshow(arr, cmap="gray" if arr.ndim == 2 else None, vmin=0, vmax=1)
    ax.set_xticks([])
    ax.set_yticks([])


def plot_sweep(display, classes, tv_weights, chosen, probs, loaded, path: Path, counts=None,
               label: str = "Activation maximization", pair_counts=None) -> Path:
    """Rows = tv weights, columns = classes; ``counts`` / ``pair_counts``: per weight, the class images / pairs
    the judge recognizes (shown next to the weight)."""
    rows, cols = len(tv_weights), len(classes)
    fig, axes = plt.subplots(rows, cols, figsize=(1.25 * cols + 0.8, 1.45 * rows + 0.5), squeeze=False,
                             layout="constrained")
    for i, w in enumerate(tv_weights):
        for j, c in enumerate(classes):
            ax = axes[i, j]
            show(ax, display[i * cols + j])
            ax.set_xlabel(f"p={probs[i, j]:.2f}", fontsize=7, labelpad=1)
            if i == 0:
                ax.set_title(loaded.class_names[c], fontsize=9)
            if j == 0:
                judged = "" if counts is None else f"\njudge {counts[i]}/{cols}"
                if pair_counts is not None and i < len(pair_counts):
                    judged += f"\npairs {pair_counts[i]}"
                ax.set_ylabel(f"tv {w:g}" + (" ◀" if w == chosen else "") + judged, fontsize=8,
                              color="crimson" if w == chosen else "black")
            if w == chosen:
                for spine in ax.spines.values():
                    spine.set_edgecolor("crimson")
                    spine.set_linewidth(2)
    judged = "" if counts is None else "; judge = images two independent classifiers recognize"
    fig.suptitle(f"{label}\nrows = tv weight (◀ chosen), columns = class, p = the network's probability of the "
                 f"target{judged}", fontsize=9)
    return save_figure(fig, path)


def plot_pair_sweep(display, pairs, tv_weights, chosen_rows, records, loaded, path: Path,
                    label: str = "Activation maximization") -> Path:
    """Rows = tv weights, columns = pairs (image i·P + j: pair j at weight i); each pair's chosen image is framed
    in red; ✓ = the judge puts both digits in its top two, N = the network does."""
    rows, cols = len(tv_weights), len(pairs)
    fig, axes = plt.subplots(rows, cols, figsize=(1.45 * cols + 0.9, 1.45 * rows + 0.6), squeeze=False,
                             layout="constrained")
    names = loaded.class_names
    for i, w in enumerate(tv_weights):
        for j, (a, b) in enumerate(pairs):
            ax, k = axes[i, j], i * cols + j
            show(ax, display[k])
            rec = records[k]
            marks = ("✓" if rec.get("judge_recognized") else "✗") + (" N" if rec.get("both_top2") else "")
            ax.set_xlabel(f"{marks}  judge p={rec.get('judge_probability', 0):.2f}", fontsize=7, labelpad=1)
            if i == 0:
                ax.set_title(f"{names[a]} & {names[b]}", fontsize=9)
            if j == 0:
                ax.set_ylabel(f"tv {w:g}", fontsize=8)
            if k in chosen_rows:
                for spine in ax.spines.values():
                    spine.set_edgecolor("crimson")
                    spine.set_linewidth(2)
    fig.suptitle(f"{label}: pairs\nrows = tv weight, columns = pair, red = chosen for the pair; ✓ = both digits in "
                 f"the judge's top two, N = in the network's", fontsize=9)
    return save_figure(fig, path)


def plot_row(display, labels, title, path: Path) -> Path:
    n = len(labels)
    fig, axes = plt.subplots(1, n, figsize=(1.5 * n, 2.1), squeeze=False, layout="constrained")
    for ax, img, label in zip(axes[0], display, labels):
        show(ax, img)
        ax.set_title(label, fontsize=8)
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)


def plot_pair(img, record: dict, loaded, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(2.6, 2.9), layout="constrained")
    show(ax, img)
    a, b = record["targets"]
    pa, pb = record["target_probabilities"]
    judged = ""
    if "judge_recognized" in record:
        tops = "  ".join(f"{name} {','.join(top)}" for name, top in record["judge_top_by"].items())
        judged = f"\njudge top two: {tops} {'✓' if record['judge_recognized'] else '✗'}"
    ax.set_title(f"{loaded.class_names[a]} & {loaded.class_names[b]} (tv {record['tv_weight']:g})\n"
                 f"p({loaded.class_names[a]})={pa:.2f}  p({loaded.class_names[b]})={pb:.2f}{judged}", fontsize=8)
    return save_figure(fig, path)


def save_image(img: torch.Tensor, loaded, path: Path) -> Path:
    """One optimized image as a PNG at 4× (nearest) for small inputs."""
    import io

    arr = (np.clip(as_image(img), 0, 1) * 255).astype(np.uint8)
    pil = Image.fromarray(arr)
    if pil.width < 100:
        pil = pil.resize((pil.width * 4, pil.height * 4), Image.NEAREST)
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return write_bytes(path, buf.getvalue())
