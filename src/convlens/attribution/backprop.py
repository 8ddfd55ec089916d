"""Reference-based backpropagation: DeepLIFT (rescale rule) and GradientSHAP."""
from __future__ import annotations

import torch

from ..baselines import make_baseline
from ..errors import ConvlensError
from ..hooks import frozen, relu_rule
from ..runtime import channels_last_weights
from .base import Attribution, Method
from .batching import GRADIENT_VALUES, auto_batch_size
from .gradient import Saliency, reduce_channels


def rescale_rule(x: torch.Tensor, y: torch.Tensor, grad: torch.Tensor, upper) -> torch.Tensor:
    """DeepLIFT's rescale multiplier Δy/Δx for a batch [inputs; references] (the halves of the batch);
    where |Δx| < 1e-10 the unit's own gradient is used (as Captum does)."""
    n = len(x) // 2
    dx, dy = x[:n] - x[n:], y[:n] - y[n:]
    inside = x > 0 if upper is None else (x > 0) & (x < upper)
    local = inside.to(grad.dtype) * grad
    m = dy / torch.where(dx.abs() < 1e-10, torch.ones_like(dx), dx)
    m = torch.cat([m, m])
    small = torch.cat([dx.abs() < 1e-10] * 2)
    return torch.where(small, local, grad * m)


class DeepLift(Method):
    """Shrikumar et al. 2017, rescale rule: φ = (x − x0) ⊙ m, m the gradient with every ReLU-family unit's
    derivative replaced by Δy/Δx between the input and the reference ``baseline``.

    Inputs and references run as one batch (each unit sees both). For networks of linear maps and
    ReLU-family units Σφ = y(x) − y(x0) (summation to delta, reported in ``extras["delta_gap"]``);
    other non-linearities (max pooling, sigmoid…) keep their gradient.
    """

    name = "deeplift"
    signed = True

    def __init__(self, model, layer=None, output_selector=None, interpolation="bilinear", baseline="zero"):
        super().__init__(model, layer, output_selector, interpolation)
        self.baseline = baseline

    def compute(self, x, target) -> Attribution:
        x0 = make_baseline(x, self.baseline)
        n = len(x)
        both = torch.cat([x, x0]).contiguous(memory_format=torch.channels_last).requires_grad_(True)
        with frozen(self.model), channels_last_weights(self.model), relu_rule(rescale_rule), torch.enable_grad():
            scores = self.scores(both)
            resolved = self.resolve_target(target, scores[:n].detach())
            explained = resolved.explained(scores[:n])
            grad = torch.autograd.grad(explained.sum(), both)[0][:n]
            delta = explained.detach() - resolved.explained(scores[n:].detach())
        raw = (x - x0) * grad.contiguous()
        gap = (raw.flatten(1).sum(1) - delta).abs()
        return Attribution(self.name, raw, reduce_channels(raw, "sum"), resolved,
                           extras={"delta": delta.cpu(), "delta_gap": gap.cpu()})


class GradientSHAP(Method):
    """Lundberg & Lee 2017 (expected gradients): φ = E[(x̃ − b) ⊙ ∂y/∂x (b + α(x̃ − b))] over
    ``samples`` draws of a baseline b from ``baselines`` (a (B, C, H, W) tensor, or one baseline as
    in :func:`convlens.baselines.make_baseline`), α ~ U(0, 1) and x̃ = x + N(0, (σ·(max x − min x))²).

    Draws come from a generator seeded with ``seed`` (see :meth:`draws`) and are shared by every image
    of the batch (noise scaled by each image's range), so an image's result does not depend on its
    batch companions; copies run in batches of ``batch_size`` inputs (default: by input size).
    """

    name = "gradient-shap"
    signed = True
    fast_options = {"samples": 8}

    def __init__(self, model, layer=None, output_selector=None, interpolation="bilinear", baselines="zero",
                 samples: int = 16, sigma: float = 0.1, seed: int = 0, batch_size: int | None = None):
        super().__init__(model, layer, output_selector, interpolation)
        if samples <= 0 or sigma < 0 or (batch_size is not None and batch_size <= 0):
            raise ConvlensError("GradientSHAP needs samples > 0, sigma ≥ 0 and a positive batch size")
        self.baselines, self.samples, self.sigma, self.seed, self.batch_size = baselines, samples, sigma, seed, \
            batch_size

    def baseline_pool(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C, H, W): the candidate baselines for each input."""
        if isinstance(self.baselines, torch.Tensor) and self.baselines.dim() == 4 and \
                self.baselines.shape[1:] == x.shape[1:]:
            return self.baselines.to(x)[:, None].expand(-1, *x.shape)
        return make_baseline(x, self.baselines)[None]

    def draws(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(baseline index (S, N), α (S, N), noise (S, N, C, H, W)) for ``samples`` draws, the same for
        every image but the noise's scale."""
        gen = torch.Generator(device="cpu").manual_seed(self.seed)
        pool = len(self.baseline_pool(x[:1]))
        index = torch.randint(0, pool, (self.samples,), generator=gen)[:, None].expand(-1, len(x))
        alpha = torch.rand(self.samples, generator=gen)[:, None].expand(-1, len(x))
        span = (x.flatten(1).max(1).values - x.flatten(1).min(1).values).view(1, -1, 1, 1, 1)
        noise = torch.randn((self.samples, 1, *x.shape[1:]), generator=gen).to(x) * (self.sigma * span)
        return index.to(x.device), alpha.to(x), noise

    def compute(self, x, target) -> Attribution:
        pool = self.baseline_pool(x)
        index, alpha, noise = self.draws(x)
        with torch.no_grad():
            scores = self.scores(x)
            resolved = self.resolve_target(target, scores)
            resolved.explained(scores)  # a bad score function fails here, before the sampled copies
        n = len(x)
        total = torch.zeros_like(x)
        per_chunk = max(1, (self.batch_size or auto_batch_size(x, GRADIENT_VALUES)) // n)
        rows = torch.arange(n, device=x.device)
        gradient = Saliency(self.model, output_selector=self.output_selector)
        for start in range(0, self.samples, per_chunk):
            k = min(per_chunk, self.samples - start)
            b = torch.stack([pool[index[s], rows] for s in range(start, start + k)])      # (k, N, C, H, W)
            noisy = x[None] + noise[start:start + k]
            a = alpha[start:start + k, :, None, None, None]
            points = (b + a * (noisy - b)).flatten(0, 1)
            grad = gradient.input_gradients(points, resolved.repeat(k))[0].view(k, *x.shape)
            total += ((noisy - b) * grad).sum(0)
        raw = total / self.samples
        return Attribution(self.name, raw, reduce_channels(raw, "sum"), resolved)

