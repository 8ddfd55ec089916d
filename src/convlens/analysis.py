"""Exercise 1 pipelines: `convlens featuremaps` and `convlens stats` (figures + JSON into a folder)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from . import stats as fstats
from .data.images import IMAGE_SUFFIXES, open_image
from .data.mnist import load_mnist
from .errors import ConvlensError
from .hooks import capture
from .io import ensure_dir, write_json
from .models.registry import LoadedModel
from .plots import stats as splots

DEFAULT_LAYERS = ["l1", "l2", "l3"]


def representative_indices(labels: torch.Tensor, classes: int) -> list[int]:
    """The first test image of every class."""
    return [int((labels == c).nonzero()[0]) for c in range(classes)]


def layer_outputs(model, x: torch.Tensor, layers: list[str]) -> dict[str, np.ndarray]:
    with capture(model, layers) as kept, torch.no_grad():
        model(x)
    return {name: kept[name].numpy() for name in layers}


def featuremaps(loaded: LoadedModel, out, layers=None, digit: int | None = None, index: int | None = None,
                image: str | None = None) -> dict:
    """Feature maps of one input per layer, of one digit per class, and the first layer's kernels."""
    out = ensure_dir(out)
    layers = layers or DEFAULT_LAYERS
    x_test, y_test = load_mnist("test").tensors()
    if image is not None:
        x, label = loaded.preprocess(open_image(image, "L"))[None], Path(image).name
    else:
        if index is None:
            if digit is not None and not 0 <= digit <= 9:
                raise ConvlensError(f"--digit must be 0..9, got {digit}")
            index = representative_indices(y_test, 10)[7 if digit is None else digit]
        if not 0 <= index < len(x_test):
            raise ConvlensError(f"--index must be 0..{len(x_test) - 1}, got {index}")
        x, label = x_test[index:index + 1], f"test image {index} (digit {int(y_test[index])})"
    acts = layer_outputs(loaded.model, x, layers)
    files = {"single": {}, "all_digits": {}}
    for layer in layers:
        if acts[layer].ndim != 4:
            raise ConvlensError(f"layer {layer!r} has no spatial output")
        files["single"][layer] = splots.plot_feature_maps(x[0, 0].numpy(), acts[layer][0], layer,
                                                          out / f"featuremaps_{layer}.png", f"{layer}: {label}").name
    reps = representative_indices(y_test, 10)
    xr = x_test[reps]
    acts_all = layer_outputs(loaded.model, xr, layers)
    for layer in layers:
        files["all_digits"][layer] = splots.plot_all_digits(xr[:, 0].numpy(), acts_all[layer], layer,
                                                            out / f"featuremaps_all_{layer}.png",
                                                            loaded.class_names).name
    first = next((m for m in loaded.model.modules() if isinstance(m, torch.nn.Conv2d)), None)
    if first is not None:
        files["kernels"] = splots.plot_kernels(first.weight.detach().numpy(), out / "kernels_l1.png").name
    with torch.no_grad():
        probs = loaded.model(x).softmax(1)[0]
    result = {"input": label, "predicted": int(probs.argmax()), "probability": float(probs.max()),
              "layers": layers, "files": files}
    write_json(out / "featuremaps.json", result)
    return result


def folder_dataset(folder: str | Path, loaded: LoadedModel) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """A labelled image folder (one sub-folder per class) as tensors."""
    folder = Path(folder)
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
    if not classes:
        raise ConvlensError(f"{folder}: expected one sub-folder per class")
    xs, ys = [], []
    mode = "L" if loaded.kind == "mnist" else "RGB"
    for c, name in enumerate(classes):
        for path in sorted((folder / name).iterdir()):
            if path.suffix.lower() in IMAGE_SUFFIXES:
                xs.append(loaded.preprocess(open_image(path, mode)))
                ys.append(c)
    if not xs:
        raise ConvlensError(f"{folder}: no images found")
    return torch.stack(xs), torch.tensor(ys), classes


def class_means(x: torch.Tensor, y: torch.Tensor, classes: int) -> np.ndarray:
    return np.stack([x[y == c].mean(0)[0].numpy() if (y == c).any() else np.zeros(x.shape[-2:])
                     for c in range(classes)])


def statistics(loaded: LoadedModel, out, layers=None, split: str = "test", correct_only: bool = False,
               data: str | None = None, limit: int | None = None, progress: bool = True) -> dict:
    """Collect the statistics in one pass and write stats.npz, stats.json and the figures."""
    out = ensure_dir(out)
    layers = layers or DEFAULT_LAYERS
    if data is not None:
        x, y, names = folder_dataset(data, loaded)
    else:
        x, y = load_mnist(split).tensors()
        names = loaded.class_names
    if limit:
        x, y = x[:limit], y[:limit]
    batches = list(fstats.tensor_batches(x, y, 500))
    result = fstats.collect(loaded.model, batches, layers, len(names), correct_only, progress, len(batches))
    fstats.save(result, out / "stats.npz")
    summary = fstats.summary(result, class_names=names)
    summary.update(split=split if data is None else str(data), correct_only=correct_only,
                   definition="reconstruction (GUIDE §2): the course's exact definition is unpublished")
    per_layer = {layer: result.layer(layer) for layer in layers}
    if all(per_layer[layer]["mean_map"].ndim == 4 for layer in layers):
        imgs = class_means(x, y, len(names)) if x.shape[1] == 1 else class_means(x.mean(1, keepdim=True), y, len(names))
        figures = {"rank_overlay": splots.plot_rank_overlay(per_layer, imgs, out / "rank_overlay.png", names).name,
                   "score_heatmaps": splots.plot_score_heatmaps(per_layer, out / "score_heatmaps.png", names).name,
                   "class_probability": splots.plot_class_probability(per_layer, out / "class_probability.png",
                                                                      names).name}
        for layer in layers:
            figures[f"score_bars_{layer}"] = splots.plot_score_bars(per_layer[layer], layer,
                                                                    out / f"score_bars_{layer}.png", names).name
            figures[f"ranked_maps_{layer}"] = splots.plot_ranked_maps(per_layer[layer], layer,
                                                                      out / f"ranked_maps_{layer}.png", names).name
        summary["figures"] = figures
    write_json(out / "stats.json", summary)
    return summary
