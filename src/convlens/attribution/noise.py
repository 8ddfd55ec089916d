"""Noise tunnel over any method: SmoothGrad, SmoothGrad² and VarGrad.

With M_s the method's map of the noisy copy x + ε_s, ε_s ~ N(0, (σ·(max x − min x))²), s = 1..S:

* ``smoothgrad`` (Smilkov et al. 2017): mean_s M_s
* ``smoothgrad-sq`` (Hooker et al. 2019): mean_s M_s²
* ``vargrad`` (Adebayo et al. 2018): mean_s M_s² − (mean_s M_s)²

applied to ``raw`` and to ``maps`` alike. In the registry and the CLI: ``KIND:METHOD``, e.g.
``smoothgrad:gradcam`` or ``vargrad:integrated-gradients``; ``smoothgrad-sq`` and ``vargrad`` alone
wrap the vanilla gradient (as ``smoothgrad`` does).
"""
from __future__ import annotations

from typing import Iterator

import torch

from ..errors import ConvlensError
from .base import Attribution, Method
from .batching import GRADIENT_VALUES, auto_batch_size
from .gradient import Saliency

KINDS = ("smoothgrad", "smoothgrad-sq", "vargrad")
TUNNEL_OPTIONS = ("samples", "sigma", "batch_size", "seed")
POWERS = {"smoothgrad": (1,), "smoothgrad-sq": (2,), "vargrad": (1, 2)}  # Σ_s M_s^p each statistic needs


def image_span(x: torch.Tensor) -> torch.Tensor:
    """max x − min x per image, shaped (N, 1, 1, 1)."""
    flat = x.flatten(1)
    return (flat.max(1).values - flat.min(1).values).view(-1, *([1] * (x.dim() - 1)))


def noise_draws(gen: torch.Generator, k: int, shape: torch.Size) -> torch.Tensor:
    """The next ``k`` standard normal draws of ``shape`` from ``gen``, (k, *shape), one generator call per
    draw: draw s is the same however the draws are split into chunks."""
    return torch.stack([torch.randn(shape, generator=gen) for _ in range(k)])


def noisy_copies(x: torch.Tensor, samples: int, sigma: float, seed: int,
                 per_chunk: int) -> Iterator[tuple[int, torch.Tensor]]:
    """Chunks (k, copies) of the ``samples`` noisy copies x + ε_s, ε_s = σ·(max x − min x)·z_s, copies
    (k·N, C, H, W) stacked copy-major (copy s of image n at row s·N + n), at most ``per_chunk`` copies
    of the batch per chunk. z_s is one (C, H, W) draw per copy from a CPU generator seeded with ``seed``,
    shared by every image of the batch: an image's copies depend neither on its batch companions nor
    on the chunking. σ = 0 gives exact copies of x."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    scale = (sigma * image_span(x))[None]
    for start in range(0, samples, per_chunk):
        k = min(per_chunk, samples - start)
        noise = noise_draws(gen, k, x.shape[1:]).to(x)[:, None] * scale
        yield k, (x[None] + noise).flatten(0, 1)


def copies_per_chunk(x: torch.Tensor, batch_size: int | None) -> int:
    """Copies of the batch per chunk: ``batch_size`` inputs (default by input size, see ``batching``)."""
    return max(1, (batch_size or auto_batch_size(x, GRADIENT_VALUES)) // len(x))


class NoiseTunnel(Method):
    """``kind`` (see the module doc) of ``method`` over ``samples`` noisy copies (:func:`noisy_copies`),
    run in chunks of ``batch_size`` inputs (default: :func:`~convlens.attribution.batching.auto_batch_size`):
    an image's result depends neither on its batch companions nor on the chunking."""

    fast_options = {"samples": 8}

    def __init__(self, method: Method, kind: str = "smoothgrad", samples: int = 25, sigma: float = 0.15,
                 batch_size: int | None = None, seed: int = 0):
        super().__init__(method.model, method.layer, method.output_selector, method.interpolation)
        if kind not in KINDS:
            raise ConvlensError(f"unknown noise tunnel {kind!r}; choose from {', '.join(KINDS)}")
        if samples <= 0 or sigma < 0:
            raise ConvlensError(f"{kind} needs samples > 0 and sigma ≥ 0")
        if batch_size is not None and batch_size <= 0:
            raise ConvlensError("the noise tunnel needs a positive batch size")
        self.method, self.kind, self.samples, self.sigma, self.batch_size, self.seed = \
            method, kind, samples, sigma, batch_size, seed
        self.name = f"{kind}:{method.name}"
        self.needs_layer = method.needs_layer
        self.signed = method.signed and kind == "smoothgrad"

    def compute(self, x, target) -> Attribution:
        resolved = self.method.resolve_before_copies(x, target)
        sums: dict[tuple[str, int], torch.Tensor] = {}
        layer = None
        for k, noisy in noisy_copies(x, self.samples, self.sigma, self.seed, copies_per_chunk(x, self.batch_size)):
            res = self.method.attribute(noisy, resolved.repeat(k))
            layer = res.layer
            for key, value in (("raw", res.raw), ("maps", res.maps)):
                value = value.view(k, len(x), *value.shape[1:])
                for power in POWERS[self.kind]:
                    part = (value if power == 1 else value.pow(power)).sum(0)
                    sums[key, power] = part if (key, power) not in sums else sums[key, power] + part
        raw, maps = (self.statistic(sums.get((key, 1)), sums.get((key, 2))) for key in ("raw", "maps"))
        return Attribution(self.name, raw, maps, resolved, layer)

    def statistic(self, total: torch.Tensor | None, total_sq: torch.Tensor | None) -> torch.Tensor:
        """mean_s M_s, mean_s M_s² or their difference, from Σ_s M_s and Σ_s M_s² (those the kind needs)."""
        if self.kind == "smoothgrad":
            return total / self.samples
        if self.kind == "smoothgrad-sq":
            return total_sq / self.samples
        mean = total / self.samples
        return (total_sq / self.samples - mean.pow(2)).clamp_min(0)


class SmoothGrad(NoiseTunnel):
    """Smilkov et al. 2017: mean of any method's raw map and maps over ``samples`` noisy copies (σ as a
    fraction of each image's range; draws as in :func:`noisy_copies`); the result is named
    ``smoothgrad-<method>``."""

    def __init__(self, method: Method, samples: int = 25, sigma: float = 0.15, batch_size: int | None = None,
                 seed: int = 0):
        super().__init__(method, "smoothgrad", samples, sigma, batch_size, seed)
        self.name = f"smoothgrad-{method.name}"


class _SaliencyTunnel(NoiseTunnel):
    kind = "smoothgrad"

    def __init__(self, model, layer=None, output_selector=None, interpolation="bilinear", **options):
        super().__init__(Saliency(model, layer, output_selector, interpolation), type(self).kind, **options)
        self.name = type(self).name


class SmoothGradSquared(_SaliencyTunnel):
    """SmoothGrad² of the vanilla gradient: mean of the squared maps of noisy copies."""

    name = "smoothgrad-sq"
    kind = "smoothgrad-sq"


class VarGrad(_SaliencyTunnel):
    """VarGrad of the vanilla gradient: variance of the maps of noisy copies."""

    name = "vargrad"
    kind = "vargrad"


def split_tunnel_name(name: str) -> tuple[str, str] | None:
    """'smoothgrad:gradcam' → ('smoothgrad', 'gradcam'); None for a plain name."""
    if ":" not in name:
        return None
    kind, base = name.split(":", 1)
    if kind not in KINDS:
        raise ConvlensError(f"unknown noise tunnel {kind!r} in {name!r}; choose from {', '.join(KINDS)}")
    return kind, base
