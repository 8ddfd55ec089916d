"""What the `convlens serve` page computes, as plain functions of arrays (no Gradio, testable headless).

Every function takes inputs (a drawing, an uploaded file, a class…) and returns arrays and numbers;
``app.py`` only wires them to widgets. A model is used by one request at a time (``Session.lock``):
attribution methods and feature captures put hooks on the shared model, so two requests must never
overlap on it.
"""
from __future__ import annotations

import functools
import os
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

from .. import stats as fstats
from ..attribution import METHODS
from ..data.images import package_photos_dir, to_mode
from ..errors import ConvlensError
from ..explain import method_for
from ..hooks import auto_layer, capture
from ..models.registry import LoadedModel
from ..plots.stats import STRENGTH_THRESHOLD, mosaic, upsample_nearest

DRAW_METHODS = ["gradcam", "guided-gradcam", "saliency"]
PHOTO_METHODS = ["gradcam", "guided-gradcam"]
# Methods too slow for an interactive page (seconds per photo on 2 cores); still selectable on the lab network.
SLOW_METHODS = {"scorecam", "integrated-gradients", "smoothgrad"}
DRAW_LAYERS = ["l1", "l2", "l3"]
MNIST_SIZE, MNIST_BOX = 28, 20
INK_THRESHOLD = 0.02  # anti-aliasing fringes below this are not ink
MAX_UPLOAD_BYTES = 10_000_000
MAX_UPLOAD_PIXELS = 25_000_000
TOP_K = 5


# ------------------------------------------------------------------ drawing → MNIST input
def ink_from_drawing(drawing: np.ndarray) -> np.ndarray:
    """A sketch (H, W), (H, W, 3) or (H, W, 4) uint8, dark strokes on light or transparent → ink (H, W) in [0, 1].

    The sketch is composited over white (transparent = paper) and inverted: ink = 1 − luminance (ITU-R 601-2).
    """
    arr = np.ascontiguousarray(np.asarray(drawing, dtype=np.uint8))
    if arr.ndim == 3 and arr.shape[-1] == 4:
        img = Image.alpha_composite(Image.new("RGBA", arr.shape[1::-1], (255, 255, 255, 255)),
                                    Image.fromarray(arr, "RGBA")).convert("L")
    elif arr.ndim == 3:
        img = Image.fromarray(arr[..., :3], "RGB").convert("L")
    else:
        img = Image.fromarray(arr, "L")
    return 1.0 - np.asarray(img, dtype=np.float32) / 255.0


def centre_of_mass(image: np.ndarray) -> tuple[float, float]:
    """(row, col) = Σ p·(i, j) / Σ p in pixel-index coordinates."""
    total = float(image.sum())
    if total <= 0:
        raise ConvlensError("no ink: the image is empty")
    rows, cols = np.indices(image.shape)
    return float((rows * image).sum() / total), float((cols * image).sum() / total)


def mnist_from_ink(ink: np.ndarray, size: int = MNIST_SIZE, box: int = MNIST_BOX) -> np.ndarray | None:
    """MNIST's own normalization of a digit (LeCun et al.): the ink's bounding box scaled, aspect kept,
    so that its longer side is ``box`` px (anti-aliased), then placed in a ``size``×``size`` field so that
    its centre of mass lies at the field's centre ((size − 1)/2 in index coordinates), shifted by whole
    pixels and kept inside the field. ``None`` when there is no ink."""
    mask = ink > INK_THRESHOLD
    if not mask.any():
        return None
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    crop = ink[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    h, w = crop.shape
    scale = box / max(h, w)
    new_h, new_w = max(1, round(h * scale)), max(1, round(w * scale))
    patch = Image.fromarray((np.clip(crop, 0, 1) * 255).astype(np.uint8), "L").resize((new_w, new_h), Image.LANCZOS)
    patch = np.asarray(patch, dtype=np.float32) / 255.0
    if patch.sum() <= 0:
        return None
    com_r, com_c = centre_of_mass(patch)
    centre = (size - 1) / 2.0
    top = int(np.clip(round(centre - com_r), 0, size - new_h))
    left = int(np.clip(round(centre - com_c), 0, size - new_w))
    out = np.zeros((size, size), dtype=np.float32)
    out[top:top + new_h, left:left + new_w] = patch
    return out


# ------------------------------------------------------------------ pictures as arrays (fast, no figures)
def to_uint8(rgb: np.ndarray) -> np.ndarray:
    return (np.clip(rgb, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def enlarge(arr: np.ndarray, height: int) -> np.ndarray:
    """Nearest-neighbour enlargement of (H, W[, C]) by the integer factor that brings H closest to ``height``
    (crisp pixels; Gradio shows small images at their own size)."""
    factor = max(1, round(height / arr.shape[0]))
    return arr if factor == 1 else arr.repeat(factor, axis=0).repeat(factor, axis=1)


@functools.lru_cache(maxsize=8)
def colour_table(name: str) -> np.ndarray:
    """The colormap sampled at 256 levels, (256, 3) floats."""
    import matplotlib

    return matplotlib.colormaps[name](np.linspace(0.0, 1.0, 256))[:, :3]


def colormap(values: np.ndarray, name: str = "viridis", bad: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> np.ndarray:
    """Values in [0, 1] (NaN = no value, shown as ``bad``) → RGB floats, by table look-up."""
    index = (np.clip(np.nan_to_num(values), 0.0, 1.0) * 255.0 + 0.5).astype(np.intp)
    rgb = colour_table(name)[index]
    rgb[np.isnan(values)] = bad
    return rgb


def feature_map_mosaic(acts: np.ndarray, cols: int = 9, peak: float | None = None) -> np.ndarray:
    """(K, h, w) activations → one RGB picture at their own resolution (the page scales it up), tiles in rows
    of ``cols`` with 1-px gaps, all on one scale: ``peak`` (default the largest activation shown)."""
    k, h, w = acts.shape
    peak = float(acts.max()) if peak is None else float(peak)
    scaled = acts / peak if peak > 0 else np.zeros_like(acts)
    rows = -(-k // cols)
    tiles = np.full((rows * cols, h, w), np.nan)
    tiles[:k] = scaled
    return to_uint8(colormap(mosaic(tiles.reshape(rows, cols, h, w), pad=1)))


def live_rank_map(acts: np.ndarray, stat: dict, cls: int, threshold: float = STRENGTH_THRESHOLD) -> np.ndarray:
    """Per pixel of one input's activations A (K, h, w): the rank, for class ``cls``, of the dominant filter.

    The statistics' reading applied to a live input: winner k* = argmax_k A_k(i, j) / P_k with P_k the
    largest class-mean activation of filter k (over classes and space); NaN where A_k*/P_k* < threshold.
    """
    peak = stat["mean_map"].max(axis=(0, 2, 3))
    norm = acts / np.where(peak > 0, peak, 1.0)[:, None, None]
    winner = norm.argmax(0)
    rank = stat["rank"][cls][winner].astype(float)
    rank[norm.max(0) < threshold] = np.nan
    return rank


def rank_overlay_image(image28: np.ndarray, rank: np.ndarray, filters: int, alpha: float = 0.75) -> np.ndarray:
    """The rank map (nearest-upsampled to the input) in jet_r colours (red = rank 1) over the grey input."""
    up = upsample_nearest(rank, image28.shape[-1])
    colours = colormap((up - 1) / max(filters - 1, 1), "jet_r", bad=(0, 0, 0))
    weight = np.where(np.isnan(up), 0.0, alpha)[..., None]
    return to_uint8((1 - weight) * image28[..., None] + weight * colours)


def map_overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """A normalized map (H, W) in [0, 1] blended over the image ((H, W) grey or (H, W, 3)), jet colours."""
    base = image[..., None] if image.ndim == 2 else image
    return to_uint8((1 - alpha) * base + alpha * colormap(heat, "jet"))


# ------------------------------------------------------------------ a model served to the page
@dataclass
class Session:
    """One loaded model, its lock, and (for the lab network) its per-class filter statistics."""

    loaded: LoadedModel
    layers: list[str] = field(default_factory=list)
    stats: dict[str, dict] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def channels(self) -> int:
        return self.loaded.profile.channels

    @property
    def device(self) -> torch.device:
        return self.loaded.device

    @functools.cached_property
    def cam_layer(self) -> str:
        """The layer CAM methods read: the profile's, else the automatic choice, found once (it costs a forward)."""
        profile = self.loaded.profile
        return profile.explain_layer or auto_layer(self.loaded.model, profile.example(self.device))


def draw_session(loaded: LoadedModel, layers: Sequence[str] | None = None,
                 data: tuple[torch.Tensor, torch.Tensor] | None = None) -> Session:
    """A 1-channel model with the filter statistics of ``layers`` (default: its profile's) on ``data``
    (default: the MNIST test set, for a model whose profile says MNIST is its data)."""
    from ..data.mnist import load_mnist

    profile = loaded.profile
    if profile.channels != 1:
        raise ConvlensError(f"model {loaded.name}: the Draw tab needs a 1-channel (MNIST-like) model")
    if data is None and profile.dataset != "mnist":
        raise ConvlensError(f"model {loaded.name}: the Draw tab needs the model's data for its statistics "
                            "(only MNIST models for now)")
    layers = list(layers or profile.stats_layers or DRAW_LAYERS)
    x, y = data if data is not None else load_mnist("test").tensors()
    device = loaded.device
    batches = ((xb.to(device), yb.to(device)) for xb, yb in fstats.tensor_batches(x, y, 500))
    result = fstats.collect(loaded.model, batches, list(layers), len(loaded.class_names))
    return Session(loaded, list(layers), {layer: result.layer(layer) for layer in layers})


def check_methods(methods: Sequence[str]) -> list[str]:
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConvlensError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    return list(methods)


def run_methods(session: Session, x: torch.Tensor, target: int, methods: Sequence[str]) -> tuple[dict, dict]:
    """({method: Attribution}, {method: one-line error}) for one input; a failing method never stops the others."""
    results, errors = {}, {}
    for name in check_methods(methods):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a flat map is shown as such, no warning needed
                results[name] = method_for(session.loaded, name, session.cam_layer).attribute(x, target)
        except Exception as exc:  # noqa: BLE001 - the page shows any method's failure and keeps going
            errors[name] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    return results, errors


@dataclass
class DrawResult:
    image28: np.ndarray                  # the model's input (28, 28) in [0, 1]
    probabilities: dict[str, float]      # class name → softmax probability
    predicted: int
    feature_maps: dict[str, np.ndarray]  # layer → RGB mosaic of every filter
    rank_overlays: dict[str, np.ndarray]  # layer → RGB rank map for the predicted class
    method_maps: dict[str, np.ndarray]   # method → RGB overlay
    errors: dict[str, str]


def draw_update(session: Session, drawing: np.ndarray | None, methods: Sequence[str] = DRAW_METHODS) -> DrawResult | None:
    """Everything the Draw tab shows for one sketch; ``None`` for an empty canvas."""
    if drawing is None:
        return None
    image28 = mnist_from_ink(ink_from_drawing(drawing))
    if image28 is None:
        return None
    loaded = session.loaded
    x = torch.from_numpy(image28)[None, None].to(session.device)
    with session.lock:
        with capture(loaded.model, session.layers) as kept, torch.no_grad():
            probs = loaded.model(x).softmax(1)[0].cpu()
        acts = {layer: kept[layer][0].cpu().numpy() for layer in session.layers}
        predicted = int(probs.argmax())
        results, errors = run_methods(session, x, predicted, methods)
    maps = {name: map_overlay(image28, res.normalized[0].cpu().numpy()) for name, res in results.items()}
    return DrawResult(
        image28=image28,
        probabilities={name: float(p) for name, p in zip(loaded.class_names, probs)},
        predicted=predicted,
        feature_maps={layer: feature_map_mosaic(a) for layer, a in acts.items()},
        rank_overlays={layer: rank_overlay_image(image28, live_rank_map(a, session.stats[layer], predicted),
                                                 a.shape[0]) for layer, a in acts.items()},
        method_maps=maps, errors=errors)


# ------------------------------------------------------------------ photos
def shipped_photos() -> dict[str, Path]:
    """Name → path of the photos shipped with convlens (the page picks by name, never by path)."""
    folder = package_photos_dir()
    return {p.name: p for p in sorted(folder.iterdir()) if p.suffix.lower() in {".png", ".jpg", ".jpeg"}}


def read_upload(path: str | os.PathLike, mode: str, max_bytes: int = MAX_UPLOAD_BYTES,
                max_pixels: int = MAX_UPLOAD_PIXELS) -> Image.Image:
    """An uploaded image within the byte and pixel limits; the size is read from the header before any
    pixel is decoded, so a decompression bomb is refused without being unpacked."""
    size = os.path.getsize(path)
    if size > max_bytes:
        raise ConvlensError(f"upload too large: {size / 1e6:.1f} MB (limit {max_bytes / 1e6:.1f} MB)")
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # our own limit below, on the header, replaces Pillow's
    try:
        with Image.open(path) as img:
            w, h = img.size
            if w * h > max_pixels:
                raise ConvlensError(f"image too large: {w}×{h} = {w * h / 1e6:.1f} megapixels "
                                    f"(limit {max_pixels / 1e6:.0f}); refused without decoding")
            img.load()
            return to_mode(ImageOps.exif_transpose(img), mode)
    except ConvlensError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ConvlensError(f"not a readable image ({type(exc).__name__})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = old


@dataclass
class PhotoState:
    """A preprocessed photo and its prediction (kept per browser tab)."""

    x: torch.Tensor
    probabilities: np.ndarray
    top: list[tuple[int, str, float]]  # (class index, name, probability), best first


def image_mode(session: Session) -> str:
    return session.loaded.profile.image_mode


def photo_predict(session: Session, image: Image.Image, k: int = TOP_K) -> PhotoState:
    loaded = session.loaded
    x = loaded.preprocess(image)[None].to(session.device)
    with session.lock, torch.no_grad():
        probs = loaded.model(x).softmax(1)[0].cpu()
    values, indices = probs.topk(min(k, probs.numel()))
    top = [(int(i), loaded.class_names[int(i)], float(v)) for v, i in zip(values, indices)]
    return PhotoState(x, probs.numpy(), top)


@dataclass
class PhotoExplanation:
    target: int
    overlays: dict[str, np.ndarray]  # method → RGB overlay at input resolution
    raw: dict[str, np.ndarray]       # method → the method's own output (layer or input resolution)
    maps: dict[str, np.ndarray]      # method → (H, W) map at input resolution
    errors: dict[str, str]


def photo_explain(session: Session, state: PhotoState, target: int, methods: Sequence[str]) -> PhotoExplanation:
    """Maps of ``methods`` for class ``target`` of the photo in ``state``."""
    n = len(session.loaded.class_names)
    if not 0 <= target < n:
        raise ConvlensError(f"class {target} out of range 0..{n - 1}")
    with session.lock:
        results, errors = run_methods(session, state.x, target, methods)
    image = session.loaded.deprocess(state.x[0])
    return PhotoExplanation(
        target=target,
        overlays={name: map_overlay(image, r.normalized[0].cpu().numpy()) for name, r in results.items()},
        raw={name: r.raw[0].cpu().numpy() for name, r in results.items()},
        maps={name: r.maps[0].cpu().numpy() for name, r in results.items()},
        errors=errors)


def maps_npz_bytes(explanation: PhotoExplanation, class_name: str) -> bytes:
    """The raw maps as an .npz (uncompressed: fast): ``<method>_raw``, ``<method>_map``, ``target``, ``target_name``."""
    import io

    buf = io.BytesIO()
    np.savez(buf, target=np.array(explanation.target), target_name=np.array(class_name),
                        **{f"{m}_raw": a for m, a in explanation.raw.items()},
                        **{f"{m}_map": a for m, a in explanation.maps.items()})
    return buf.getvalue()


# ------------------------------------------------------------------ statistics
def stats_view(session: Session, layer: str, cls: int) -> tuple[np.ndarray, list[list]]:
    """For one layer and class: the class-mean map of every filter ordered by rank (left = rank 1), and the
    table rows (rank, filter, score, std, contrast, win rate, max)."""
    if layer not in session.stats:
        raise ConvlensError(f"no statistics for layer {layer!r}; choose from {', '.join(session.stats)}")
    stat = session.stats[layer]
    if not 0 <= cls < stat["score"].shape[0]:
        raise ConvlensError(f"class {cls} out of range")
    order = np.argsort(stat["rank"][cls], kind="stable")
    m = stat["mean_map"]
    picture = feature_map_mosaic(m[cls, order], cols=min(len(order), 9), peak=float(m.max()))  # one scale
    rows = [[int(stat["rank"][cls][k]), int(k), round(float(stat["score"][cls][k]), 4),
             round(float(stat["std"][cls][k]), 4), round(float(stat["contrast"][cls][k]), 4),
             round(float(stat["win_rate"][cls][k]), 4), round(float(stat["max"][cls][k]), 4)] for k in order]
    return picture, rows


STATS_COLUMNS = ["rank", "filter", "score", "std", "contrast", "win rate", "max"]


# ------------------------------------------------------------------ activation maximization
@dataclass
class ActMaxCache:
    """Images of activation maximization, computed on demand and kept: a class request computes the
    whole class sweep at that tv weight in one batch (as cheap as one image), so later picks are instant."""

    steps: int = 200
    seed: int = 0
    images: dict[tuple, tuple[np.ndarray, float]] = field(default_factory=dict)

    def image(self, session: Session, kind: str, a: int, b: int, tv: float,
              layer: str | None = None, progress: bool = False) -> tuple[np.ndarray, float, bool]:
        """(display image (H, W[, 3]) in [0, 1], target probability or objective value, cached?) for
        ``kind`` 'class' (class a), 'pair' (classes a and b) or 'channel' (channel a of ``layer``)."""
        from ..featvis import ActMaxConfig, maximize
        from ..featvis.objectives import channel, class_logit
        from ..featvis.run import pair_objective

        if not np.isfinite(tv) or tv < 0:
            raise ConvlensError(f"tv weight must be finite and non-negative, got {tv}")
        n = len(session.loaded.class_names)
        key = (kind, a, b if kind == "pair" else None, layer if kind == "channel" else None, float(tv))
        if key in self.images:
            image, score = self.images[key]
            return image, score, True
        if kind == "class":
            if not 0 <= a < n:
                raise ConvlensError(f"class {a} out of range 0..{n - 1}")
            targets = list(range(n)) if n <= 10 else [a]
            objectives, keys = [class_logit(c) for c in targets], [("class", c, None, None, float(tv)) for c in targets]
        elif kind == "pair":
            if not (0 <= a < n and 0 <= b < n) or a == b:
                raise ConvlensError(f"a pair needs two different classes in 0..{n - 1}")
            objectives, keys, targets = [pair_objective(a, b, "default")], [key], [a]
        elif kind == "channel":
            if layer not in session.layers:
                raise ConvlensError(f"channel images need a layer of {', '.join(session.layers)}")
            count = session.stats[layer]["score"].shape[1]
            if not 0 <= a < count:
                raise ConvlensError(f"channel {a} out of range 0..{count - 1} for {layer}")
            objectives, keys, targets = [channel(layer, a)], [key], [None]
        else:
            raise ConvlensError(f"unknown kind {kind!r}: class, pair or channel")
        profile = session.loaded.profile
        config = ActMaxConfig(steps=self.steps, tv_weight=float(tv), seed=self.seed, progress=progress,
                              input_range=profile.value_range, to_input=profile.from_unit)
        with session.lock:
            result = maximize(session.loaded.model, objectives, tuple(profile.input_shape), config)
        for i, k in enumerate(keys):
            img = result.display[i].detach().cpu().numpy()
            img = img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)
            score = float(result.probabilities[i, targets[i]]) if targets[i] is not None else float(result.objective[i])
            if kind == "pair":
                score = float(result.probabilities[i, a] + result.probabilities[i, b])
            self.images[k] = (img, score)
        image, score = self.images[key]
        return image, score, False


def photo_input(choice: str | None, upload_path: str | None, session: Session, max_bytes: int, max_pixels: int,
                photos: Callable[[], dict[str, Path]] = shipped_photos) -> Image.Image:
    """The uploaded file when there is one, else the shipped photo picked by name (never a path from the page)."""
    mode = image_mode(session)
    if upload_path:
        return read_upload(upload_path, mode, max_bytes, max_pixels)
    known = photos()
    if choice not in known:
        raise ConvlensError(f"no shipped photo named {choice!r}")
    return read_upload(known[choice], mode, max_bytes, max_pixels)
