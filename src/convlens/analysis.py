"""Exercise 1 pipelines: `convlens featuremaps` and `convlens stats` (figures + JSON into a folder)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from . import stats as fstats
from .data.folders import scan_labelled_folder, stream_batches
from .data.images import open_image
from .data.mnist import load_mnist
from .errors import ConvlensError
from .hooks import capture
from .io import ensure_dir, write_json
from .models.registry import LoadedModel
from .plots import stats as splots

BATCH = 500


def representative_indices(labels: torch.Tensor, classes: int) -> list[int]:
    """The first test image of every class."""
    return [int((labels == c).nonzero()[0]) for c in range(classes)]


def layer_outputs(model, x: torch.Tensor, layers: list[str]) -> dict[str, np.ndarray]:
    with capture(model, layers) as kept, torch.no_grad():
        model(x)
    return {name: kept[name].cpu().numpy() for name in layers}


def default_layers(loaded: LoadedModel) -> list[str]:
    if not loaded.profile.stats_layers:
        raise ConvlensError("this model's profile names no layers: give --layers")
    return list(loaded.profile.stats_layers)


def single_input(loaded: LoadedModel, digit: int | None, index: int | None, image: str | None):
    """(input batch of one, its label): an image file, or a test digit of MNIST (lab network)."""
    if image is not None:
        return loaded.preprocess(open_image(image, loaded.profile.image_mode))[None], Path(image).name
    if loaded.profile.dataset != "mnist":
        raise ConvlensError("featuremaps of this model need --image (digits come from MNIST, for the lab network)")
    x_test, y_test = load_mnist("test").tensors()
    if index is None:
        if digit is not None and not 0 <= digit <= 9:
            raise ConvlensError(f"--digit must be 0..9, got {digit}")
        index = representative_indices(y_test, 10)[7 if digit is None else digit]
    if not 0 <= index < len(x_test):
        raise ConvlensError(f"--index must be 0..{len(x_test) - 1}, got {index}")
    return x_test[index:index + 1], f"test image {index} (digit {int(y_test[index])})"


def featuremaps(loaded: LoadedModel, out, layers=None, digit: int | None = None, index: int | None = None,
                image: str | None = None) -> dict:
    """Feature maps of one input per layer, of one digit per class (MNIST), and the first layer's kernels."""
    layers = layers or default_layers(loaded)
    x, label = single_input(loaded, digit, index, image)
    x = x.to(loaded.device)
    out = ensure_dir(out)
    acts = layer_outputs(loaded.model, x, layers)
    files: dict = {"single": {}}
    shown = loaded.deprocess(x[0])
    for layer in layers:
        if acts[layer].ndim != 4:
            raise ConvlensError(f"layer {layer!r} has no spatial output")
        files["single"][layer] = splots.plot_feature_maps(shown, acts[layer][0], layer,
                                                          out / f"featuremaps_{layer}.png", f"{layer}: {label}").name
    if loaded.profile.dataset == "mnist":
        x_test, y_test = load_mnist("test").tensors()
        xr = x_test[representative_indices(y_test, 10)].to(loaded.device)
        acts_all = layer_outputs(loaded.model, xr, layers)
        files["all_digits"] = {layer: splots.plot_all_digits(xr[:, 0].cpu().numpy(), acts_all[layer], layer,
                                                             out / f"featuremaps_all_{layer}.png",
                                                             loaded.class_names).name for layer in layers}
    return finish_featuremaps(loaded, x, label, layers, files, out)


def finish_featuremaps(loaded: LoadedModel, x: torch.Tensor, label: str, layers: list[str], files: dict,
                       out: Path) -> dict:
    """The first layer's kernels, the prediction and featuremaps.json."""
    first = next((m for m in loaded.model.modules() if isinstance(m, torch.nn.Conv2d)), None)
    if first is not None and first.in_channels == 1:
        files["kernels"] = splots.plot_kernels(first.weight.detach().cpu().numpy(), out / "kernels_l1.png").name
    with torch.no_grad():
        probs = loaded.model(x).softmax(1)[0]
    result = {"input": label, "predicted": int(probs.argmax()), "probability": float(probs.max()),
              "layers": layers, "files": files}
    write_json(out / "featuremaps.json", result)
    return result


class ClassMeans:
    """Running per-class mean of the input images as displayed (grey, [0, 1]), for the rank overlays."""

    def __init__(self, classes: int, deprocess):
        self.classes, self.deprocess = classes, deprocess
        self.sum, self.count = None, torch.zeros(classes, dtype=torch.float64)

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        shown = [np.asarray(self.deprocess(xi), dtype=np.float64) for xi in x]
        grey = torch.from_numpy(np.stack([a.mean(-1) if a.ndim == 3 else a for a in shown]))
        if self.sum is None:
            self.sum = torch.zeros(self.classes, *grey.shape[1:], dtype=torch.float64)
        self.sum.index_add_(0, y.cpu(), grey)
        self.count += torch.bincount(y.cpu(), minlength=self.classes).double()

    def images(self) -> np.ndarray:
        return (self.sum / self.count.clamp_min(1)[:, None, None]).float().numpy()


def tallied(batches, means: ClassMeans):
    """Pass (x, y) batches through, adding each to the running class means."""
    for x, y, *_ in batches:
        means.add(x, y)
        yield x, y


def data_source(loaded: LoadedModel, split: str, data: str | None, limit: int | None, skipped: list[str]):
    """(batches, total batches, class names, output index per class, description) for statistics."""
    if limit is not None and limit <= 0:
        raise ConvlensError(f"--limit must be positive, got {limit}")
    if data is not None:
        folder, names = scan_labelled_folder(data, loaded.class_names)
        items = folder.items[:limit] if limit else folder.items
        batches = stream_batches(items, loaded.preprocess, loaded.profile.image_mode, 64, skipped=skipped)
        shown = [names[i] for i in folder.model_index]
        return batches, -(-len(items) // 64), shown, folder.model_index, str(data)
    if loaded.profile.dataset != "mnist":
        raise ConvlensError("statistics of this model need a labelled image folder: give --data FOLDER")
    x, y = load_mnist(split).tensors()
    if limit:
        x, y = x[:limit], y[:limit]
    return fstats.tensor_batches(x, y, BATCH), -(-len(x) // BATCH), loaded.class_names, None, split
def statistics(loaded: LoadedModel, out, layers=None, split: str = "test", correct_only: bool = False,
               data: str | None = None, limit: int | None = None, progress: bool = True) -> dict:
    """Collect the statistics in one streaming pass and write stats.npz, stats.json and the figures."""
    layers = layers or default_layers(loaded)
    skipped: list[str] = []
    batches, total, names, class_index, source = data_source(loaded, split, data, limit, skipped)
    out = ensure_dir(out)
    means = ClassMeans(len(names), loaded.deprocess)
    device = loaded.device
    moved = ((x.to(device), y.to(device)) for x, y in tallied(batches, means))
    result = fstats.collect(loaded.model, moved, layers, len(names), correct_only, progress, total,
                            class_index=class_index)
    fstats.save(result, out / "stats.npz")
    summary = fstats.summary(result, class_names=names)
    summary.update(split=source, correct_only=correct_only, skipped=skipped,
                   definition="reconstruction (docs/filter-statistics.md): the course's exact definition is unpublished")
    per_layer = {layer: result.layer(layer) for layer in layers}
    if all(per_layer[layer]["mean_map"].ndim == 4 for layer in layers):
        imgs = means.images()
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
