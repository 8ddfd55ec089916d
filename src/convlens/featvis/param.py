"""Image parameterizations and robustness transforms."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Lucid's colour decorrelation (square root of ImageNet's colour covariance), a fact carried over.
COLOR_CORRELATION_SVD_SQRT = torch.tensor([[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]])
MAX_NORM_SVD_SQRT = float(COLOR_CORRELATION_SVD_SQRT.norm(dim=0).max())


class PixelParam:
    """The image itself is optimized (clipped to the input range by the optimizer)."""

    def __init__(self, init: torch.Tensor):
        self.x = init.clone().requires_grad_(True)

    def parameters(self) -> list[torch.Tensor]:
        return [self.x]

    def image(self) -> torch.Tensor:
        return self.x


class FourierColorParam:
    """Lucid-style: a scaled Fourier spectrum and decorrelated colours, squashed by a sigmoid into [0, 1].

    ``image()`` returns RGB in [0, 1]; the caller maps it to the model's input space.
    """

    def __init__(self, batch: int, size: tuple[int, int], gen: torch.Generator, decay: float = 1.0,
                 sd: float = 0.01, device: torch.device | str = "cpu"):
        h, w = size
        fy = torch.fft.fftfreq(h)[:, None]
        fx = torch.fft.rfftfreq(w)[None, :]
        freqs = torch.sqrt(fx * fx + fy * fy)
        self.scale = ((1.0 / torch.clamp(freqs, min=1.0 / max(h, w)) ** decay) * math.sqrt(h * w)).to(device)
        self.size = size
        self.spectrum = (torch.randn(batch, 3, h, w // 2 + 1, 2, generator=gen) * sd).to(device).requires_grad_(True)

    def parameters(self) -> list[torch.Tensor]:
        return [self.spectrum]

    def image(self) -> torch.Tensor:
        spec = torch.view_as_complex(self.spectrum) * self.scale
        img = torch.fft.irfftn(spec, s=self.size, norm="ortho") / 4.0
        flat = img.permute(0, 2, 3, 1) @ (COLOR_CORRELATION_SVD_SQRT / MAX_NORM_SVD_SQRT).T.to(img)
        return torch.sigmoid(flat.permute(0, 3, 1, 2))


def jitter(x: torch.Tensor, pixels: int, gen: torch.Generator) -> torch.Tensor:
    """Random translation of the whole batch by up to ``pixels`` (circular)."""
    if pixels <= 0:
        return x
    dy, dx = (torch.randint(-pixels, pixels + 1, (2,), generator=gen)).tolist()
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3))


def rotate_scale(x: torch.Tensor, degrees: float, scale: float, gen: torch.Generator) -> torch.Tensor:
    """Random small rotation and scaling, one per sample (bilinear, border padding)."""
    if degrees <= 0 and scale <= 0:
        return x
    n = x.shape[0]
    angle = (torch.rand(n, generator=gen) * 2 - 1) * math.radians(degrees)
    zoom = 1 + (torch.rand(n, generator=gen) * 2 - 1) * scale
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    zeros = torch.zeros(n)
    theta = torch.stack([torch.stack([cos, -sin, zeros], 1), torch.stack([sin, cos, zeros], 1)], 1).to(x)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, padding_mode="border", align_corners=False)
