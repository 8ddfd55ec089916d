"""Reference inputs ("baselines") for integrated gradients and the perturbation metrics, and the blur."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import ConvlensError


def gaussian_kernel(size: int, sigma: float) -> torch.Tensor:
    """Normalized 1-D Gaussian: k_i ∝ exp(−(i − (size−1)/2)² / 2σ²)."""
    ax = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    k = torch.exp(-ax ** 2 / (2 * sigma ** 2))
    return k / k.sum()


def blur(x: torch.Tensor, size: int = 11, sigma: float = 5.0) -> torch.Tensor:
    """Separable Gaussian blur of a (N, C, H, W) batch (reflect padding)."""
    k = gaussian_kernel(size, sigma).to(x)
    c = x.shape[1]
    pad = size // 2
    mode = "reflect" if min(x.shape[-2:]) > pad else "replicate"
    y = F.conv2d(F.pad(x, (pad, pad, 0, 0), mode=mode), k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(F.pad(y, (0, 0, pad, pad), mode=mode), k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def make_baseline(x: torch.Tensor, kind: str | float | torch.Tensor) -> torch.Tensor:
    """A baseline like ``x``: "zero"; "mean" (each image's per-channel mean); "blur"; a number (every
    value); or a tensor broadcast to ``x``."""
    if isinstance(kind, torch.Tensor):
        return kind.to(x).expand_as(x)
    if isinstance(kind, (int, float)) and not isinstance(kind, bool):
        return torch.full_like(x, float(kind))
    if kind == "zero":
        return torch.zeros_like(x)
    if kind == "mean":
        return x.mean((2, 3), keepdim=True).expand_as(x).clone()
    if kind == "blur":
        return blur(x)
    raise ConvlensError(f"unknown baseline {kind!r}; use zero, mean, blur, a number or a tensor")
