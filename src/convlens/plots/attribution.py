"""Attribution figures: a map over its image, and all methods side by side."""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from ..io import save_figure


def to_rgb(image: np.ndarray) -> np.ndarray:
    """(H, W) or (H, W, 3) in [0, 1] → (H, W, 3)."""
    return np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.5, cmap: str = "jet") -> np.ndarray:
    """Blend a normalized map (H, W) in [0, 1] over an image, jet colours."""
    colours = plt.get_cmap(cmap)(np.clip(heat, 0, 1))[..., :3]
    return np.clip((1 - alpha) * to_rgb(image) + alpha * colours, 0, 1)


def gradient_image(raw: np.ndarray) -> np.ndarray:
    """A signed input-shaped gradient (C, H, W) shown as an image centred on grey."""
    arr = raw.transpose(1, 2, 0) if raw.ndim == 3 else raw
    scale = np.abs(arr).max() or 1.0
    out = 0.5 + 0.5 * arr / scale
    return to_rgb(out[..., 0] if out.ndim == 3 and out.shape[2] == 1 else out)


def plot_overlay(image: np.ndarray, heat: np.ndarray, title: str, path: str | Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(6.4, 3.4))
    axes[0].imshow(to_rgb(image))
    axes[0].set_title("input")
    axes[1].imshow(overlay(image, heat))
    axes[1].set_title(title, fontsize=9)
    for ax in axes:
        ax.axis("off")
    return save_figure(fig, path)


def plot_methods(image: np.ndarray, maps: dict[str, np.ndarray], title: str, path: str | Path,
                 raws: dict[str, np.ndarray] | None = None) -> Path:
    """Input, then one panel per method (gradient methods as images, others as overlays)."""
    n = len(maps) + 1
    cols = min(n, 5)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.8 * rows), squeeze=False)
    axes = axes.ravel()
    axes[0].imshow(to_rgb(image))
    axes[0].set_title("input", fontsize=9)
    for ax, (name, heat) in zip(axes[1:], maps.items()):
        raw = (raws or {}).get(name)
        if raw is not None and raw.ndim == 3 and name in ("guided-backprop", "guided-gradcam", "deconvnet"):
            ax.imshow(gradient_image(raw))
        else:
            ax.imshow(overlay(image, heat))
        ax.set_title(name, fontsize=9)
    for ax in axes:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)
