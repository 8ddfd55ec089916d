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

import torch

from ..errors import ConvlensError
from .base import Attribution, Method
from .batching import GRADIENT_VALUES, auto_batch_size
from .gradient import Saliency, SmoothGrad

KINDS = ("smoothgrad", "smoothgrad-sq", "vargrad")
TUNNEL_OPTIONS = ("samples", "sigma", "batch_size", "seed")


class NoiseTunnel(SmoothGrad):
    """``kind`` (see the module doc) of ``method`` over ``samples`` noisy copies, run in chunks of
    ``batch_size`` inputs (default: :func:`~convlens.attribution.batching.auto_batch_size`). Noise s is one (C, H, W) draw from a generator seeded with ``seed``, shared by
    every image of the batch (scaled by each image's range): an image's result depends neither on its
    batch companions nor on the chunking."""

    fast_options = {"samples": 8}

    def __init__(self, method: Method, kind: str = "smoothgrad", samples: int = 25, sigma: float = 0.15,
                 batch_size: int | None = None, seed: int = 0):
        if kind not in KINDS:
            raise ConvlensError(f"unknown noise tunnel {kind!r}; choose from {', '.join(KINDS)}")
        if batch_size is not None and batch_size <= 0:
            raise ConvlensError("the noise tunnel needs a positive batch size")
        super().__init__(method, samples, sigma, batch_size or 1, seed)
        self.batch_size = batch_size
        self.kind = kind
        self.name = f"{kind}:{method.name}"
        self.needs_layer = method.needs_layer
        self.signed = method.signed and kind == "smoothgrad"

    def compute(self, x, target) -> Attribution:
        with torch.no_grad():
            scores = self.scores(x)
            resolved = self.method.resolve_target(target, scores)
            resolved.explained(scores)  # a bad score function fails here, before any noisy copy runs
        gen = torch.Generator(device="cpu").manual_seed(self.seed)
        span = (x.flatten(1).max(1).values - x.flatten(1).min(1).values).view(-1, 1, 1, 1)
        sums: dict[str, torch.Tensor] = {}
        layer = None
        per_chunk = max(1, (self.batch_size or auto_batch_size(x, GRADIENT_VALUES)) // len(x))
        for start in range(0, self.samples, per_chunk):
            k = min(per_chunk, self.samples - start)
            draws = torch.stack([torch.randn(x.shape[1:], generator=gen) for _ in range(k)]).to(x)
            noise = draws[:, None] * (self.sigma * span)[None]
            res = self.method.attribute((x[None] + noise).flatten(0, 1), resolved.repeat(k))
            layer = res.layer
            for key, value in (("raw", res.raw), ("maps", res.maps)):
                value = value.view(k, len(x), *value.shape[1:])
                for power in (1, 2):
                    name = f"{key}{power}"
                    part = value.pow(power).sum(0)
                    sums[name] = part if name not in sums else sums[name] + part
        raw, maps = (self.statistic(sums[f"{key}1"], sums[f"{key}2"]) for key in ("raw", "maps"))
        return Attribution(self.name, raw, maps, resolved, layer)

    def statistic(self, total: torch.Tensor, total_sq: torch.Tensor) -> torch.Tensor:
        mean, mean_sq = total / self.samples, total_sq / self.samples
        if self.kind == "smoothgrad":
            return mean
        if self.kind == "smoothgrad-sq":
            return mean_sq
        return (mean_sq - mean.pow(2)).clamp_min(0)


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
