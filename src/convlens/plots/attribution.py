"""Attribution figures: one display rule for every map (explain, the lab and the report all use it).

Contrast is robust: a map is divided by the 99th percentile of its |values| and clipped, so a few extreme
pixels (typical of gradients) no longer squeeze everything else into the background. What a method's map
is comes from its class (``gradient_image``, ``signed``):

- a gradient worth showing as an image (guided backprop, deconvnet, guided Grad-CAM): on a colour input,
  the gradient itself as an image centred on grey (grey = 0); on a grey input, its sign in colour (below);
- signed maps (integrated gradients, input × gradient): red for positive, blue for negative over a
  dimmed image, opacity = |value|;
- unsigned, per pixel (saliency, SmoothGrad): a perceptual colormap over a dimmed image, opacity = value;
- unsigned, coarse (CAM family: a layer-resolution raw map): jet over the image, as in the papers.
"""
from __future__ import annotations

import functools
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from ..attribution import method_info
from ..errors import ConvlensError
from ..io import figure_png, save_figure, write_bytes
from . import wrap_title
from .png import Band, compress_band, png_from_bands

ROBUST_PERCENTILE = 99.0
SIGNED_NOTE = ("Signed maps: red raises the class score, blue lowers it; gradient images: grey = 0. "
               f"Every map is clipped at the {ROBUST_PERCENTILE:g}th percentile of its |values|.")
POSITIVE, NEGATIVE = np.array([0.95, 0.15, 0.1]), np.array([0.15, 0.5, 1.0])  # bright on the dimmed backdrop


def display_map(values: np.ndarray, signed: bool, percentile: float = ROBUST_PERCENTILE) -> np.ndarray:
    """A map scaled for display by q = the ``percentile``-th percentile of |values| (the max if q is 0).

    signed: clip(v / q, −1, 1), so 0 stays 0 and display_map(−v) = −display_map(v);
    unsigned: clip(|v| / q, 0, 1). A flat (all-zero) or non-finite map gives zeros, never NaN.
    Any shape; one sample at a time (the percentile runs over all of its elements).
    """
    v = np.nan_to_num(np.asarray(values, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    magnitude = np.abs(v)
    if magnitude.size == 0:
        return magnitude
    scale = float(np.percentile(magnitude, percentile))
    if scale <= 0:  # fewer non-zero values than 1 − percentile: scale on the largest
        scale = float(magnitude.max())
    if scale <= 0:
        return np.zeros_like(v)
    return np.clip(v / scale, -1.0, 1.0) if signed else np.clip(magnitude / scale, 0.0, 1.0)


def to_rgb(image: np.ndarray) -> np.ndarray:
    """(H, W) or (H, W, 3) in [0, 1] → (H, W, 3)."""
    return np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image


def dimmed(image: np.ndarray) -> np.ndarray:
    """The image as a low-contrast grey backdrop (luminance mapped to [0.2, 0.5])."""
    rgb = to_rgb(image)
    grey = rgb @ np.array([0.299, 0.587, 0.114])
    return to_rgb(0.2 + 0.3 * grey)


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.5, cmap: str = "jet") -> np.ndarray:
    """Blend a map (H, W) in [0, 1] over an image with a constant opacity."""
    colours = plt.get_cmap(cmap)(np.clip(heat, 0, 1))[..., :3]
    return np.clip((1 - alpha) * to_rgb(image) + alpha * colours, 0, 1)


def weighted_overlay(image: np.ndarray, colours: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Colours (H, W, 3) over the dimmed image with opacity ``weight`` (H, W) in [0, 1]."""
    w = np.clip(weight, 0, 1)[..., None]
    return np.clip((1 - w) * dimmed(image) + w * colours, 0, 1)


def signed_overlay(image: np.ndarray, shown: np.ndarray) -> np.ndarray:
    """A display-scaled signed map in [−1, 1]: red positive, blue negative, opacity |value|."""
    colours = np.where(shown[..., None] >= 0, POSITIVE, NEGATIVE)
    return weighted_overlay(image, colours, np.abs(shown))


def magnitude_overlay(image: np.ndarray, shown: np.ndarray, cmap: str = "inferno") -> np.ndarray:
    """A display-scaled map in [0, 1] on a perceptual colormap (from its bright half), opacity = value."""
    colours = plt.get_cmap(cmap)(0.35 + 0.65 * np.clip(shown, 0, 1))[..., :3]
    return weighted_overlay(image, colours, shown)


def gradient_image(raw: np.ndarray) -> np.ndarray:
    """A signed input-shaped gradient (3, H, W) as a colour image centred on grey (grey = 0)."""
    return 0.5 + 0.5 * display_map(raw.transpose(1, 2, 0), signed=True)


def method_traits(name: str) -> tuple[bool, bool]:
    """(gradient_image, signed) of a registered method (:func:`method_info`); False for unknown names."""
    try:
        info = method_info(name)  # registered names and noise tunnels over them ('vargrad:lrp')
    except ConvlensError:
        return False, False
    return info.gradient_image, info.signed


def method_panel(name: str, image: np.ndarray, raw: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """How one method's map of one image is shown: an (H, W, 3) image in [0, 1].

    ``image``: the input (H, W) or (H, W, 3) in [0, 1]; ``raw``: the method's own output for this image
    ((C, H, W) for gradient methods, (h, w) for CAMs); ``heat``: its (H, W) map at input resolution.
    """
    as_gradient, signed = method_traits(name)
    per_pixel = raw.ndim == 3
    if as_gradient and per_pixel:
        if raw.shape[0] == 3:
            return gradient_image(raw)
        return signed_overlay(image, display_map(raw.sum(0), signed=True))
    if signed:
        return signed_overlay(image, display_map(heat, signed=True))
    shown = display_map(heat, signed=False)
    return magnitude_overlay(image, shown) if per_pixel else overlay(image, shown)


def shows_sign(name: str) -> bool:
    """Whether the method's panel shows a sign (red/blue or around grey)."""
    return any(method_traits(name))


def overlay_figure(image: np.ndarray, panel: np.ndarray, title: str, signed: bool = False):
    """The input beside one method's panel (see ``method_panel``); ``signed`` adds the colour key."""
    fig, axes = plt.subplots(1, 2, figsize=(6.4, 3.4), layout="constrained")
    axes[0].imshow(to_rgb(image))
    axes[0].set_title("input", fontsize=9)
    axes[1].imshow(panel)
    axes[1].set_title(title, fontsize=9)
    for ax in axes:
        ax.axis("off")
    if signed:
        fig.supxlabel(wrap_title(SIGNED_NOTE, 6.4, 8), fontsize=8)
    return fig


def plot_overlay(image: np.ndarray, panel: np.ndarray, title: str, path: str | Path, signed: bool = False) -> Path:
    return save_figure(overlay_figure(image, panel, title, signed), path)


def overlay_png(image: np.ndarray, panel: np.ndarray, title: str, signed: bool = False) -> bytes:
    return figure_png(overlay_figure(image, panel, title, signed))


def methods_figure(image: np.ndarray, panels: dict[str, np.ndarray], title: str):
    """Input, then one panel per method (see ``method_panel``)."""
    n = len(panels) + 1
    cols = min(n, 5)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.7 * rows + 0.4), squeeze=False,
                             layout="constrained")
    axes = axes.ravel()
    axes[0].imshow(to_rgb(image))
    axes[0].set_title("input", fontsize=9)
    for ax, (name, panel) in zip(axes[1:], panels.items()):
        ax.imshow(panel)
        ax.set_title(name, fontsize=9)
    for ax in axes:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    if any(shows_sign(name) for name in panels):
        fig.supxlabel(SIGNED_NOTE, fontsize=8)
    return fig


def plot_methods(image: np.ndarray, panels: dict[str, np.ndarray], title: str, path: str | Path) -> Path:
    return save_figure(methods_figure(image, panels, title), path)


def methods_png(image: np.ndarray, panels: dict[str, np.ndarray], title: str) -> bytes:
    return figure_png(methods_figure(image, panels, title))


class ContactSheets:
    """Many images on few pages: one row per image (input, then one panel per method, see
    ``method_panel``), ``rows`` rows per page, written as ``sheet-001.png``, ``sheet-002.png``… Drawn
    with Pillow (no axes), so a thousand images cost seconds, not minutes.

    A row is drawn and compressed on its own (:meth:`band`: any process can do it, see
    :mod:`convlens.plots.png`) and queued with :meth:`add_band`; a full page is the header band and its
    rows' bands joined, written to ``out``. :meth:`state` and :meth:`restore` carry the unfinished page
    across an interruption.
    """

    def __init__(self, out: str | Path | None, methods: list[str], rows: int = 20, cell: int = 96, label: int = 14):
        self.out, self.methods, self.rows, self.cell, self.label = out and Path(out), methods, rows, cell, label
        self.page: list[Band] = []
        self.count = 0

    def row(self, caption: str, image: np.ndarray, panels: dict[str, np.ndarray]) -> np.ndarray:
        """One image's row, (label + cell, cols·cell, 3) uint8: its caption above the input and one panel
        per method."""
        from PIL import Image, ImageDraw

        c, cols = self.cell, 1 + len(self.methods)
        strip = Image.new("RGB", (cols * c, self.label + c), "white")
        ImageDraw.Draw(strip).text((2, 1), latin1(caption[: cols * c // 6]), fill="black")
        for j, panel in enumerate([to_rgb(image)] + [panels[m] for m in self.methods]):
            tile = Image.fromarray((np.clip(panel, 0, 1) * 255).astype(np.uint8)).resize((c, c), Image.NEAREST)
            strip.paste(tile, (j * c, self.label))
        return np.asarray(strip)

    def band(self, caption: str, image: np.ndarray, panels: dict[str, np.ndarray]) -> Band:
        """One image's row (:meth:`row`), compressed for a page."""
        return compress_band(self.row(caption, image, panels))

    @functools.cached_property
    def header(self) -> Band:
        """The column titles above every page, compressed once."""
        from PIL import Image, ImageDraw

        c = self.cell
        strip = Image.new("RGB", ((1 + len(self.methods)) * c, self.label), "white")
        draw = ImageDraw.Draw(strip)
        for j, title in enumerate(["input", *self.methods]):
            draw.text((j * c + 2, 1), latin1(title[: c // 6]), fill="black")
        return compress_band(np.asarray(strip))

    def add(self, caption: str, image: np.ndarray, panels: dict[str, np.ndarray]) -> dict:
        """Draw and queue one image's row; returns where it lands: {"sheet": file name, "row": index}."""
        return self.add_band(self.band(caption, image, panels))

    def add_band(self, band: Band) -> dict:
        """Queue a row made by :meth:`band`; a full page is written. Returns where the row lands."""
        self.page.append(band)
        where = {"sheet": self.name(self.count // self.rows), "row": len(self.page) - 1}
        self.count += 1
        if len(self.page) == self.rows:
            self.flush()
        return where

    def name(self, page: int) -> str:
        return f"sheet-{page + 1:03d}.png"

    def flush(self) -> str | None:
        """Write the queued rows as a page (the last one may be short); returns its file name."""
        if not self.page:
            return None
        name = self.name((self.count - 1) // self.rows)
        write_bytes(self.out / name, png_from_bands([self.header, *self.page]))
        self.page = []
        return name

    def state(self) -> dict:
        """The rows so far and the unfinished page (tensors and ints, for a checkpoint)."""
        import torch

        return {"count": self.count,
                "page": [{"data": torch.frombuffer(bytearray(b.data), dtype=torch.uint8), "adler": b.adler,
                          "length": b.length, "height": b.height, "width": b.width} for b in self.page]}

    def restore(self, state: dict) -> None:
        self.count = int(state["count"])
        self.page = [Band(bytes(b["data"].numpy().tobytes()), int(b["adler"]), int(b["length"]), int(b["height"]),
                          int(b["width"])) for b in state["page"]]


def latin1(text: str) -> str:
    """Text Pillow's built-in bitmap font can draw."""
    return text.encode("latin-1", "replace").decode("latin-1")
