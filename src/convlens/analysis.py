"""Exercise 1 pipelines: `convlens featuremaps` and `convlens stats` (figures + JSON into a folder)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from . import distributed
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
    """Running per-class mean of the input images as displayed (grey, [0, 1]), for the rank overlays.
    ``sum`` and ``count`` are updated in place (so they can live in a checkpointed, all-reduced state)."""

    def __init__(self, classes: int, deprocess, sum: torch.Tensor | None = None, count: torch.Tensor | None = None):
        self.classes, self.deprocess = classes, deprocess
        self.sum = sum
        self.count = torch.zeros(classes, dtype=torch.float64) if count is None else count

    def grey(self, x: torch.Tensor) -> torch.Tensor:
        shown = [np.asarray(self.deprocess(xi), dtype=np.float64) for xi in x]
        return torch.from_numpy(np.stack([a.mean(-1) if a.ndim == 3 else a for a in shown]))

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        grey = self.grey(x)
        if self.sum is None:
            self.sum = torch.zeros(self.classes, *grey.shape[1:], dtype=torch.float64)
        self.sum.index_add_(0, y.cpu(), grey)
        self.count += torch.bincount(y.cpu(), minlength=self.classes).double()

    def images(self) -> np.ndarray:
        return (self.sum / self.count.clamp_min(1)[:, None, None]).float().numpy()


FOLDER_BATCH, FOLDER_STEP = 64, 256


@dataclass
class Source:
    """A labelled dataset read by item range: ``batches(lo, hi, skipped)`` yields (images, labels) of the
    readable items in [lo, hi) (unreadable ones named on stderr and appended to ``skipped``)."""
    count: int
    step: int
    batches: Callable[[int, int, list], Iterator[tuple[torch.Tensor, torch.Tensor]]]
    example: Callable[[], torch.Tensor]
    names: list[str]
    class_index: list[int] | None
    describe: str


def data_source(loaded: LoadedModel, split: str, data: str | None, limit: int | None) -> Source:
    """The statistics' data: a labelled folder (streamed), or an MNIST split (lab network)."""
    if limit is not None and limit <= 0:
        raise ConvlensError(f"--limit must be positive, got {limit}")
    if data is not None:
        folder, names = scan_labelled_folder(data, loaded.class_names)
        items = folder.items[:limit] if limit else folder.items
        mode = loaded.profile.image_mode

        def folder_batches(lo: int, hi: int, skipped: list):
            for x, y, _ in stream_batches(items[lo:hi], loaded.preprocess, mode, FOLDER_BATCH, skipped=skipped):
                yield x, y

        def first_readable() -> torch.Tensor:
            for path, _ in items:
                try:
                    return loaded.preprocess(open_image(path, mode))[None]
                except ConvlensError:
                    continue
            raise ConvlensError(f"{data}: none of its images could be read")
        shown = [names[i] for i in folder.model_index]
        return Source(len(items), FOLDER_STEP, folder_batches, first_readable, shown, folder.model_index, str(data))
    if loaded.profile.dataset != "mnist":
        raise ConvlensError("statistics of this model need a labelled image folder: give --data FOLDER")
    mnist = load_mnist(split)

    def mnist_slice(lo: int, hi: int, skipped: list):  # floats in [0, 1] as MnistSplit.tensors() makes them
        x = torch.from_numpy(np.array(mnist.images[lo:hi])).unsqueeze(1).float().div_(255.0)
        yield x, torch.from_numpy(np.array(mnist.labels[lo:hi])).long()
    count = min(len(mnist.labels), limit or len(mnist.labels))
    return Source(count, BATCH, mnist_slice, lambda: next(mnist_slice(0, 1, []))[0], loaded.class_names, None,
                  split)


def collect_shards(loaded: LoadedModel, source: Source, layers: list[str], correct_only: bool,
                   job: distributed.Job) -> tuple[fstats.FilterStats, ClassMeans, list[str]]:
    """Statistics, class-mean images and skipped files over the whole source: each rank folds its shard
    of steps, then sums, counts and maxima are all-reduced (every rank gets the totals) and the skipped
    files gathered (rank 0 gets them, in dataset order)."""
    classes = len(source.names)
    example = source.example()
    means = ClassMeans(classes, loaded.deprocess)
    state = {"stats": fstats.FilterStats(fstats.layer_shapes(loaded.model, layers, example), classes).state(),
             "image_sum": torch.zeros(classes, *means.grey(example).shape[1:], dtype=torch.float64),
             "image_count": means.count, "skipped": []}

    def add(state: dict, lo_hi: tuple[int, int]) -> dict:
        stats = fstats.FilterStats.from_state(state["stats"])
        means = ClassMeans(classes, loaded.deprocess, state["image_sum"], state["image_count"])
        for x, y in source.batches(*lo_hi, state["skipped"]):
            means.add(x, y)
            fstats.collect(loaded.model, [(x, y)], layers, classes, correct_only,
                           class_index=source.class_index, into=stats)
        return state

    state = distributed.fold(job, lambda lo, hi: (lo, hi), add, state)
    skipped = distributed.gather_ordered(job.units().start, state.pop("skipped"))
    distributed.all_reduce_tree(state, loaded.device)
    means = ClassMeans(classes, loaded.deprocess, state["image_sum"], state["image_count"])
    return fstats.FilterStats.from_state(state["stats"]), means, skipped or []


def statistics(loaded: LoadedModel, out, layers=None, split: str = "test", correct_only: bool = False,
               data: str | None = None, limit: int | None = None, progress: bool = True,
               resume: bool = False) -> dict | None:
    """Collect the statistics in one streaming pass and write stats.npz, stats.json and the figures.

    Under torchrun each rank takes a shard; rank 0 alone writes (other ranks return None)."""
    layers = layers or default_layers(loaded)
    source = data_source(loaded, split, data, limit)
    if distributed.is_writer():
        out = ensure_dir(out)
    key = distributed.fingerprint(loaded.model, source=source.describe, count=source.count, layers=layers,
                                  correct_only=correct_only, step=source.step)
    job = distributed.Job("statistics", source.count, source.step, Path(out), key, resume, progress)
    result, means, skipped = collect_shards(loaded, source, layers, correct_only, job)
    if not distributed.is_writer():
        return None
    names = source.names
    fstats.save(result, out / "stats.npz")
    summary = fstats.summary(result, class_names=names)
    summary.update(split=source.describe, correct_only=correct_only, skipped=skipped,
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
    job.cleanup()
    return summary
