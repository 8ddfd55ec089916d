"""Image priors, each returning one value per sample (weights may differ per sample)."""
from __future__ import annotations

import torch


def total_variation(x: torch.Tensor, beta: float = 2.0) -> torch.Tensor:
    """keras-vis TV: Σ over the (H−1)×(W−1) grid of (dx² + dy²)^(β/2), divided by N = C·H·W."""
    dy = x[:, :, 1:, :-1] - x[:, :, :-1, :-1]
    dx = x[:, :, :-1, 1:] - x[:, :, :-1, :-1]
    sq = dx * dx + dy * dy
    # the gradient of sqrt-like powers is infinite at 0: a tiny epsilon keeps it finite
    tv = sq if beta == 2.0 else (sq + 1e-12).pow(beta / 2)
    return tv.flatten(1).sum(1) / x[0].numel()


def lp_norm(x: torch.Tensor, p: float = 6.0) -> torch.Tensor:
    """keras-vis Lp norm: (Σ|x|^p)^(1/p) / N."""
    return (x.abs().pow(p).flatten(1).sum(1) + 1e-12).pow(1.0 / p) / x[0].numel()


def l2_decay(x: torch.Tensor) -> torch.Tensor:
    return x.pow(2).flatten(1).mean(1)


def border_decay(x: torch.Tensor, box: int, background: float = 0.0) -> torch.Tensor:
    """Σ over the pixels outside the central ``box``×``box`` square of (x − background)², divided by N = C·H·W."""
    h, w = x.shape[-2:]
    top, left = max(0, (h - box) // 2), max(0, (w - box) // 2)
    outside = torch.ones(h, w, dtype=x.dtype, device=x.device)
    outside[top:top + box, left:left + box] = 0
    return ((x - background).pow(2) * outside).flatten(1).sum(1) / x[0].numel()
