"""Per-class filter activation statistics, collected in one streaming pass.

For every conv layer L (output after its ReLU), class c and filter k:

* ``mean_map[c,k,i,j]`` — mean over the samples of class c of A_k(i, j);
* ``score[c,k]`` — the spatial mean of ``mean_map`` (equivalently, the mean per-sample score);
* ``std[c,k]`` — standard deviation over the class's samples of the per-sample score;
* ``max[c,k]`` — the largest activation seen for the class;
* ``win_rate[c,k]`` — how often filter k is the per-pixel winner (argmax over filters),
  over the class's (sample, pixel) positions where some filter is active;
* ``contrast[c,k]`` — ``score[c,k]`` minus the mean score of the other classes;
* ``rank[c,k]`` — 1 for the filter with the highest score of class c (ties: lower index first).

The accumulator holds sums, sums of squares, counts and maxima only, so shards merge
exactly: ``merge`` of the statistics of parts equals one pass over the whole.
The course's own definition was never published; this is a reconstruction (see docs).
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import nn

from .errors import ConvlensError
from .hooks import capture, evaluating, resolve_layer
from .progress import progress as progress_of


@dataclass
class LayerAccumulator:
    sum_map: torch.Tensor      # (C, K, H, W) float64
    sum_score: torch.Tensor    # (C, K)
    sum_score_sq: torch.Tensor  # (C, K)
    max: torch.Tensor          # (C, K)
    wins: torch.Tensor         # (C, K) int64
    active_pixels: torch.Tensor  # (C,) int64

    @classmethod
    def empty(cls, classes: int, shape: Sequence[int]) -> "LayerAccumulator":
        k = shape[0]
        z = torch.zeros
        return cls(z(classes, *shape, dtype=torch.float64), z(classes, k, dtype=torch.float64),
                   z(classes, k, dtype=torch.float64), torch.full((classes, k), -torch.inf, dtype=torch.float64),
                   z(classes, k, dtype=torch.long), z(classes, dtype=torch.long))

    def add(self, acts: torch.Tensor, labels: torch.Tensor) -> None:
        """Add a batch (B, K, H, W) of one layer; per-batch sums in float32, totals in float64."""
        acts = acts.detach().float().cpu()
        classes, k = self.sum_score.shape
        onehot = torch.zeros(classes, len(labels)).index_put_((labels, torch.arange(len(labels))), torch.tensor(1.0))
        self.sum_map += (onehot @ acts.flatten(1)).view_as(self.sum_map)
        scores = acts.mean((2, 3)).double()
        self.sum_score += onehot.double() @ scores
        self.sum_score_sq += onehot.double() @ scores.pow(2)
        self.max.scatter_reduce_(0, labels[:, None].expand(-1, k), acts.amax((2, 3)).double(), "amax")
        peak, winner = acts.max(1)
        active = peak > 0
        slot = (labels[:, None, None] * k + winner).flatten()  # weights instead of a mask: no gather
        self.wins += torch.bincount(slot, weights=active.flatten().double(), minlength=classes * k).view(
            classes, k).long()
        self.active_pixels += torch.bincount(labels, weights=active.flatten(1).sum(1).double(),
                                             minlength=classes).long()

    def merge(self, other: "LayerAccumulator") -> "LayerAccumulator":
        return LayerAccumulator(self.sum_map + other.sum_map, self.sum_score + other.sum_score,
                                self.sum_score_sq + other.sum_score_sq, torch.maximum(self.max, other.max),
                                self.wins + other.wins, self.active_pixels + other.active_pixels)


class FilterStats:
    """Mergeable statistics for several layers; ``counts[c]`` samples seen per class."""

    def __init__(self, shapes: dict[str, Sequence[int]], classes: int):
        self.classes = classes
        self.layers = {name: LayerAccumulator.empty(classes, shape) for name, shape in shapes.items()}
        self.counts = torch.zeros(classes, dtype=torch.long)

    def add(self, outputs: dict[str, torch.Tensor], labels: torch.Tensor) -> None:
        labels = labels.detach().cpu().long()
        if labels.numel() == 0:
            return
        self.counts += torch.bincount(labels, minlength=self.classes)
        for name, acc in self.layers.items():
            acc.add(outputs[name], labels)

    def merge(self, other: "FilterStats") -> "FilterStats":
        if set(self.layers) != set(other.layers) or self.classes != other.classes:
            raise ConvlensError("cannot merge statistics of different layers or classes")
        merged = FilterStats({}, self.classes)
        merged.layers = {n: a.merge(other.layers[n]) for n, a in self.layers.items()}
        merged.counts = self.counts + other.counts
        return merged

    def state(self) -> dict:
        """The raw sums, counts and maxima as a tree of tensors (shared, not copied): what checkpoints
        save and what the distributed all-reduce combines (``max`` by MAX, everything else by SUM)."""
        return {"counts": self.counts,
                "layers": {n: {f.name: getattr(a, f.name) for f in fields(a)} for n, a in self.layers.items()}}

    @classmethod
    def from_state(cls, state: dict) -> "FilterStats":
        stats = cls({}, int(state["counts"].numel()))
        stats.counts = state["counts"]
        stats.layers = {n: LayerAccumulator(**acc) for n, acc in state["layers"].items()}
        return stats

    def layer(self, name: str) -> dict[str, np.ndarray]:
        """Final statistics of one layer (see module docstring), as numpy arrays."""
        acc = self.layers[name]
        n = self.counts.double().clamp_min(1)
        mean_map = acc.sum_map / n[:, None, None, None]
        score = acc.sum_score / n[:, None]
        var = (acc.sum_score_sq / n[:, None] - score ** 2).clamp_min(0)
        others = (score.sum(0, keepdim=True) - score) / max(self.classes - 1, 1)
        win_rate = acc.wins.double() / acc.active_pixels.double().clamp_min(1)[:, None]
        return {"mean_map": mean_map.numpy(), "score": score.numpy(), "std": var.sqrt().numpy(),
                "max": torch.where(torch.isinf(acc.max), torch.zeros_like(acc.max), acc.max).numpy(),
                "win_rate": win_rate.numpy(), "contrast": (score - others).numpy(), "rank": ranks(score.numpy()),
                "count": self.counts.numpy()}


def ranks(score: np.ndarray) -> np.ndarray:
    """Rank of each filter within its class: 1 = highest score; ties keep the lower index first."""
    order = np.argsort(-score, axis=1, kind="stable")
    rank = np.empty_like(order)
    rows = np.arange(score.shape[0])[:, None]
    rank[rows, order] = np.arange(1, score.shape[1] + 1)[None, :]
    return rank


def layer_shapes(model: nn.Module, layers: Sequence[str], example: torch.Tensor) -> dict[str, tuple]:
    """Output shape (K, H, W) of each layer; a non-spatial layer is a clear error."""
    for name in layers:
        resolve_layer(model, name)
    device = next((p.device for p in model.parameters()), example.device)
    with capture(model, layers) as kept, torch.no_grad(), evaluating(model):
        model(example[:1].to(device))
    shapes = {}
    for name in layers:
        out = kept[name]
        if out.dim() != 4:
            raise ConvlensError(f"layer {name!r} has output shape {tuple(out.shape)}: statistics need a "
                                "spatial (N, C, H, W) layer")
        shapes[name] = tuple(out.shape[1:])
    return shapes


def collect(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], layers: Sequence[str],
            classes: int, correct_only: bool = False, progress: bool = False, total: int | None = None,
            class_index: Sequence[int] | None = None, into: FilterStats | None = None) -> FilterStats:
    """One pass over (images, labels) batches → :class:`FilterStats` of ``layers`` (added to ``into``
    when given). Batches go to the model's device.

    ``class_index[c]``: the model output of label ``c`` (for ``correct_only`` when the labels are not
    the model's own class indices, e.g. the class folders of a labelled folder)."""
    stats = into
    for name in layers:
        resolve_layer(model, name)
    device = next((p.device for p in model.parameters()), None)
    with evaluating(model):
        for x, y in progress_of(batches, desc="statistics", enabled=progress, total=total, unit="batch"):
            if stats is None:
                stats = FilterStats(layer_shapes(model, layers, x), classes)
            with capture(model, layers) as kept, torch.no_grad():
                logits = model(x if device is None else x.to(device))
            y = y.to(logits.device)
            expected = y if class_index is None else torch.as_tensor(class_index, device=y.device)[y]
            keep = logits.argmax(1) == expected if correct_only else None
            outputs = {n: kept[n] if keep is None else kept[n][keep] for n in layers}
            stats.add(outputs, y if keep is None else y[keep])
    if stats is None:
        raise ConvlensError("no data to collect statistics from")
    return stats


def tensor_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int = 500):
    for i in range(0, len(x), batch_size):
        yield x[i:i + batch_size], y[i:i + batch_size]


def summary(stats: FilterStats, top: int = 3, class_names: list[str] | None = None) -> dict:
    """JSON-ready summary: per layer and class, the filters by rank with their statistics."""
    names = class_names or [str(c) for c in range(stats.classes)]
    out = {"schema": "convlens.filter-stats/1", "counts": stats.counts.tolist(), "classes": names, "layers": {}}
    for layer in stats.layers:
        s = stats.layer(layer)
        per_class = {}
        for c, name in enumerate(names):
            order = np.argsort(s["rank"][c])
            per_class[name] = {
                "top_filters": order[:top].tolist(),
                "ranked_filters": order.tolist(),
                "score": s["score"][c].tolist(), "rank": s["rank"][c].tolist(),
                "contrast": s["contrast"][c].tolist(), "win_rate": s["win_rate"][c].tolist(),
                "std": s["std"][c].tolist(), "max": s["max"][c].tolist()}
        out["layers"][layer] = {"filters": int(s["score"].shape[1]), "map_shape": list(s["mean_map"].shape[2:]),
                                "per_class": per_class}
    return out


def save(stats: FilterStats, path) -> None:
    """All statistics of every layer in one ``.npz`` (keys ``<layer>/<statistic>``)."""
    from .io import save_npz

    arrays = {f"{layer}/{key}": value for layer in stats.layers for key, value in stats.layer(layer).items()}
    save_npz(path, **arrays)
