"""Sanity checks (Adebayo et al. 2018): do maps change when the model's weights are randomized?

Cascading randomization re-initializes parameter groups from the output down; independent
randomization one group at a time. Each map is compared with the original by Spearman rank
correlation (of |map| and of the signed map), SSIM, and a histogram-of-gradients similarity.
Weights are restored exactly afterwards, also after an exception.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..attribution.base import Attribution, Method, normalize_maps
from ..baselines import gaussian_kernel
from ..hooks import evaluating

MapFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def as_map_fn(method: Method | MapFn) -> MapFn:
    """A method of the engine, or any callable (inputs, targets) → maps (N, H, W) or Attribution."""
    def fn(x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        out = method.attribute(x, targets) if isinstance(method, Method) else method(x, targets)
        return out.maps if isinstance(out, Attribution) else out
    return fn


def randomization_groups(model: nn.Module) -> list[tuple[str, list[nn.Module]]]:
    """Parameterized blocks from the output to the input (children; lists expanded one level)."""
    groups = []

    def visit(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            path = f"{prefix}{name}"
            if isinstance(child, (nn.ModuleList, nn.Sequential)) and len(child) > 1:
                visit(path + ".", child)
            elif any(True for _ in child.parameters()):
                groups.append((path, [m for m in child.modules() if hasattr(m, "reset_parameters")]))
    visit("", model)
    return groups[::-1]


@contextlib.contextmanager
def randomized(model: nn.Module, groups: Sequence[tuple[str, list[nn.Module]]], seed: int = 0) -> Iterator[nn.Module]:
    """Re-initialize the given groups (default initializers, seeded); restore every tensor afterwards."""
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for _, modules in groups:
                for m in modules:
                    m.reset_parameters()
        yield model
    finally:
        model.load_state_dict(saved)


def average_ranks(a: np.ndarray) -> np.ndarray:
    """Ranks with ties sharing their average rank (as Spearman's ρ requires)."""
    order = np.argsort(a, kind="stable")
    sorted_a = a[order]
    _, first, counts = np.unique(sorted_a, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0
    ranks_sorted = np.repeat(avg, counts)
    ranks = np.empty(len(a))
    ranks[order] = ranks_sorted
    return ranks


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denom) if denom > 0 else 0.0


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    a_np, b_np = a.detach().double().flatten().numpy(), b.detach().double().flatten().numpy()
    return pearson(average_ranks(a_np), average_ranks(b_np))


def ssim(a: torch.Tensor, b: torch.Tensor, size: int = 11, sigma: float = 1.5) -> float:
    """Mean SSIM of two maps after min-max normalization (Gaussian window; data range 1)."""
    x, y = normalize_maps(torch.stack([a, b]).float())[:, None]
    x, y = x[None], y[None]
    side = min(a.shape[-2:])
    k = gaussian_kernel(min(size, side if side % 2 else side - 1), sigma)  # odd, at most the map's side
    win = (k[:, None] * k[None, :])[None, None]
    mu_x, mu_y = F.conv2d(x, win), F.conv2d(y, win)
    sxx = F.conv2d(x * x, win) - mu_x ** 2
    syy = F.conv2d(y * y, win) - mu_y ** 2
    sxy = F.conv2d(x * y, win) - mu_x * mu_y
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (sxx + syy + c2))
    return float(s.mean())


def hog_features(m: torch.Tensor, cells: int = 7, bins: int = 9) -> np.ndarray:
    """Histogram of oriented gradients (unsigned, magnitude-weighted, per-cell L2 normalized)."""
    x = normalize_maps(m[None].float())[0][None, None]
    gy = F.conv2d(F.pad(x, (0, 0, 1, 1), mode="replicate"), torch.tensor([[[[-1.0], [0.0], [1.0]]]]))
    gx = F.conv2d(F.pad(x, (1, 1, 0, 0), mode="replicate"), torch.tensor([[[[-1.0, 0.0, 1.0]]]]))
    mag = torch.sqrt(gx ** 2 + gy ** 2)[0, 0]
    ang = torch.remainder(torch.atan2(gy, gx)[0, 0], np.pi)
    b = torch.clamp((ang / np.pi * bins).long(), max=bins - 1)
    h, w = mag.shape
    cy = torch.clamp(torch.arange(h) * cells // h, max=cells - 1)[:, None].expand(h, w)
    cx = torch.clamp(torch.arange(w) * cells // w, max=cells - 1)[None, :].expand(h, w)
    idx = (cy * cells + cx) * bins + b
    hist = torch.bincount(idx.flatten(), weights=mag.flatten().double(), minlength=cells * cells * bins)
    hist = hist.view(cells * cells, bins)
    hist = hist / hist.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return hist.flatten().numpy()


def similarity(original: torch.Tensor, other: torch.Tensor) -> dict[str, float]:
    """Mean over images of the four similarity measures (a flat map, common after randomization, scores 0)."""
    original, other = original.detach().cpu(), other.detach().cpu()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rows = [similarity_one(a, b) for a, b in zip(original, other)]
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


def similarity_one(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    return {"spearman_abs": spearman(a.abs(), b.abs()), "spearman": spearman(a, b),
            "ssim": ssim(a, b), "hog": pearson(hog_features(a), hog_features(b))}


def cascading_randomization(model: nn.Module, methods: dict[str, Method | MapFn], x: torch.Tensor,
                            targets: torch.Tensor, independent: bool = False, seed: int = 0,
                            groups: Sequence[tuple[str, list[nn.Module]]] | None = None) -> dict:
    """Similarity to the original maps after randomizing the top k groups (or only group k)."""
    groups = list(groups or randomization_groups(model))
    fns = {name: as_map_fn(m) for name, m in methods.items()}
    steps = []
    with evaluating(model):
        original = {name: fn(x, targets).detach() for name, fn in fns.items()}
        for k in range(1, len(groups) + 1):
            chosen = [groups[k - 1]] if independent else groups[:k]
            with randomized(model, chosen, seed):
                row = {"randomized": [g[0] for g in chosen]}
                for name, fn in fns.items():
                    row[name] = similarity(original[name], fn(x, targets).detach())
            steps.append(row)
    return {"groups": [g[0] for g in groups], "mode": "independent" if independent else "cascading", "steps": steps}
