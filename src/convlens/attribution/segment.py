"""Feature maps for perturbation methods: integer labels (N, H, W) that group pixels into features.

* :func:`grid_labels` — ``cells × cells`` rectangular cells (the same for every image).
* :func:`slic_labels` — SLIC-like superpixels (Achanta et al. 2012): k-means in (colour, position)
  space from a regular grid of centres, distance d² = ‖c_p − c_k‖² + (m/S)²‖p − k‖², written here in
  torch (no scikit-image: it would pull SciPy and friends for one function). Connectivity is not
  enforced; labels are renumbered 0..F−1 per image.
"""
from __future__ import annotations

import math

import torch

from ..errors import ConvlensError


def grid_labels(n: int, height: int, width: int, cells: int, device=None) -> torch.Tensor:
    """(N, H, W) labels of a ``cells × cells`` grid, row-major; each cell spans ⌈H/cells⌉ × ⌈W/cells⌉ pixels."""
    if cells <= 0:
        raise ConvlensError("grid cells must be positive")
    cells_h, cells_w = min(cells, height), min(cells, width)
    rows = torch.arange(height, device=device) * cells_h // height
    cols = torch.arange(width, device=device) * cells_w // width
    labels = rows[:, None] * cells_w + cols[None, :]
    return labels.expand(n, height, width).clone()


def slic_labels(x: torch.Tensor, segments: int = 25, compactness: float = 10.0, iterations: int = 8) -> torch.Tensor:
    """(N, C, H, W) images → (N, H, W) superpixel labels (about ``segments`` per image).

    Computed on the CPU in float64 and moved to the images' device, so the same image gets the same
    superpixels on every device (float32 ties on a GPU moved pixels between segments)."""
    if segments <= 0 or iterations <= 0:
        raise ConvlensError("superpixels need segments > 0 and iterations > 0")
    cpu = x.detach().to("cpu", torch.float64)
    return torch.stack([_slic_one(img, segments, compactness, iterations) for img in cpu]).to(x.device)


def _slic_one(img: torch.Tensor, segments: int, compactness: float, iterations: int) -> torch.Tensor:
    c, h, w = img.shape
    lo, hi = img.amin((1, 2), keepdim=True), img.amax((1, 2), keepdim=True)
    colour = ((img - lo) / torch.where(hi > lo, hi - lo, torch.ones_like(hi))).flatten(1).T.double()  # (HW, C)
    ys, xs = torch.meshgrid(torch.arange(h, device=img.device), torch.arange(w, device=img.device), indexing="ij")
    pos = torch.stack([ys.flatten(), xs.flatten()], 1).double()                                     # (HW, 2)
    step = math.sqrt(h * w / segments)
    grid_y = torch.arange(step / 2, h, step, device=img.device)
    grid_x = torch.arange(step / 2, w, step, device=img.device)
    centres_pos = torch.cartesian_prod(grid_y, grid_x).double()
    idx = centres_pos.round().long()
    centres_col = colour.view(h, w, c)[idx[:, 0].clamp(max=h - 1), idx[:, 1].clamp(max=w - 1)]
    weight = (compactness / 10.0 / step) ** 2  # colours live in [0, 1]: m = 10 ↔ one colour unit per S pixels
    for _ in range(iterations):
        dist = torch.cdist(colour, centres_col).pow(2) + weight * torch.cdist(pos, centres_pos).pow(2)
        assign = dist.argmin(1)
        count = torch.zeros(len(centres_pos), dtype=torch.double, device=img.device).index_add_(
            0, assign, torch.ones_like(assign, dtype=torch.double))
        keep = count > 0
        sums_col = torch.zeros_like(centres_col).index_add_(0, assign, colour)
        sums_pos = torch.zeros_like(centres_pos).index_add_(0, assign, pos)
        centres_col = (sums_col[keep] / count[keep, None])
        centres_pos = (sums_pos[keep] / count[keep, None])
    assign = (torch.cdist(colour, centres_col).pow(2) + weight * torch.cdist(pos, centres_pos).pow(2)).argmin(1)
    return torch.unique(assign, return_inverse=True)[1].view(h, w)


def feature_labels(features, x: torch.Tensor, cells: int, segments: int) -> torch.Tensor:
    """Labels from ``features``: 'grid', 'slic', or a given (H, W) / (N, H, W) integer tensor."""
    n, _, h, w = x.shape
    if isinstance(features, torch.Tensor):
        labels = features.to(x.device).long()
        if labels.dim() == 2 and tuple(labels.shape) == (h, w):
            labels = labels.expand(n, h, w)
        if tuple(labels.shape) != (n, h, w):
            raise ConvlensError(f"feature labels of shape {tuple(features.shape)} for inputs of shape {tuple(x.shape)}")
        return torch.stack([torch.unique(lab, return_inverse=True)[1] for lab in labels])
    if features == "grid":
        return grid_labels(n, h, w, cells, x.device)
    if features == "slic":
        return slic_labels(x, segments)
    raise ConvlensError(f"unknown features {features!r}; use grid, slic or a label tensor")
