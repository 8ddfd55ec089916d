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

    def __init__(self, generators: list[torch.Generator], size: tuple[int, int], decay: float = 1.0,
                 sd: float = 0.01, device: torch.device | str = "cpu"):
        h, w = size
        fy = torch.fft.fftfreq(h)[:, None]
        fx = torch.fft.rfftfreq(w)[None, :]
        freqs = torch.sqrt(fx * fx + fy * fy)
        self.scale = ((1.0 / torch.clamp(freqs, min=1.0 / max(h, w)) ** decay) * math.sqrt(h * w)).to(device)
        self.size = size
        spectra = [torch.randn(3, h, w // 2 + 1, 2, generator=g) for g in generators]  # one generator per image
        self.spectrum = (torch.stack(spectra) * sd).to(device).requires_grad_(True)

    def parameters(self) -> list[torch.Tensor]:
        return [self.spectrum]

    def image(self) -> torch.Tensor:
        spec = torch.view_as_complex(self.spectrum) * self.scale
        img = torch.fft.irfftn(spec, s=self.size, norm="ortho") / 4.0
        flat = img.permute(0, 2, 3, 1) @ (COLOR_CORRELATION_SVD_SQRT / MAX_NORM_SVD_SQRT).T.to(img)
        return torch.sigmoid(flat.permute(0, 3, 1, 2))


class RandomPlan:
    """Every random draw of an optimization, made up front from one generator per image.

    Image ``i`` draws its start, then its shifts, rotations and zooms for every step from
    ``torch.Generator().manual_seed(seeds[i])``, so an image depends only on its own seed:
    not on its batch companions, their number or their order.
    """

    def __init__(self, seeds: list[int], steps: int, jitter: int, degrees: float, scale: float):
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.steps, self.jitter, self.degrees, self.scale = steps, jitter, degrees, scale
        self.shifts: torch.Tensor | None = None  # (steps, n, 2) integer offsets (dy, dx)
        self.angles: torch.Tensor | None = None  # (steps, n) radians
        self.zooms: torch.Tensor | None = None   # (steps, n)

    def draw(self, fn) -> torch.Tensor:
        """``fn(generator)`` for every image, stacked along a new first axis."""
        return torch.stack([fn(g) for g in self.generators])

    def draw_transforms(self) -> None:
        """Shifts, then angles and zooms (after the start, so that adding jitter never changes the start)."""
        p, t = self.jitter, self.steps
        if p > 0:
            self.shifts = self.draw(lambda g: torch.randint(-p, p + 1, (t, 2), generator=g)).transpose(0, 1)
        if self.degrees > 0 or self.scale > 0:
            u = self.draw(lambda g: torch.rand(t, 2, generator=g) * 2 - 1).transpose(0, 1)
            self.angles = u[..., 0] * math.radians(self.degrees)
            self.zooms = 1 + u[..., 1] * self.scale

    def transform(self, x: torch.Tensor, step: int, padding: str, fill: float) -> torch.Tensor:
        """Step ``step``'s jitter, then rotation and scaling, each image by its own draw."""
        if self.shifts is not None:
            x = shift(x, self.shifts[step].to(x.device), padding, fill)
        if self.angles is not None:
            x = rotate_scale(x, self.angles[step], self.zooms[step])
        return x


def shift(x: torch.Tensor, offsets: torch.Tensor, padding: str = "zero", fill: float = 0.0) -> torch.Tensor:
    """Translate image ``i`` by ``offsets[i] = (dy, dx)`` pixels (content moves down/right for positive offsets).

    ``padding="zero"``: what enters at the border is ``fill`` (the darkest input, like MNIST's background);
    ``"circular"``: what leaves on one side enters on the other (``torch.roll``, as keras-vis' jitter).
    """
    n, _, h, w = x.shape
    p = int(offsets.abs().max()) if offsets.numel() else 0
    if p == 0:
        return x
    rows = torch.arange(h, device=x.device)[None, :] - offsets[:, :1]
    cols = torch.arange(w, device=x.device)[None, :] - offsets[:, 1:]
    if padding == "zero":
        x = F.pad(x, (p, p, p, p), value=fill)
        rows, cols = rows + p, cols + p
    else:
        rows, cols = rows % h, cols % w
    batch = torch.arange(n, device=x.device)[:, None, None]
    return x[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def rotate_scale(x: torch.Tensor, angles: torch.Tensor, zooms: torch.Tensor) -> torch.Tensor:
    """Rotate image ``i`` by ``angles[i]`` radians and scale it by ``zooms[i]`` (bilinear, border padding)."""
    cos, sin = torch.cos(angles) / zooms, torch.sin(angles) / zooms
    zeros = torch.zeros_like(cos)
    theta = torch.stack([torch.stack([cos, -sin, zeros], 1), torch.stack([sin, cos, zeros], 1)], 1).to(x)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, padding_mode="border", align_corners=False)
