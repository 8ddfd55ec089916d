"""The gradient family: maps from ∂y^c/∂x, optionally with guided / deconvnet ReLU rules."""
from __future__ import annotations

import contextlib

import torch

from ..blur import blur
from ..errors import ConvlensError
from ..hooks import frozen, relu_rule
from ..runtime import channels_last_weights
from .base import Attribution, Method, Target
from .cam import GradCAM


def reduce_channels(raw: torch.Tensor, how: str) -> torch.Tensor:
    """(N, C, H, W) → (N, H, W): 'absmax' (max |·| over channels), 'sum', or 'max'."""
    if how == "absmax":
        return raw.abs().amax(1)
    if how == "sum":
        return raw.sum(1)
    if how == "max":
        return raw.amax(1)
    raise ConvlensError(f"unknown channel reduction {how!r}")


class GradientMethod(Method):
    """Gradient of the explained score with respect to the input, in one batched backward."""

    rule: str | None = None
    reduction = "absmax"

    def __init__(self, model, layer=None, output_selector=None, interpolation="bilinear",
                 reduction: str | None = None):
        super().__init__(model, layer, output_selector, interpolation)
        if reduction is not None:
            self.reduction = reduction

    def input_gradients(self, x: torch.Tensor, target) -> tuple[torch.Tensor, torch.Tensor, Target]:
        """(∂score/∂x, explained scores, resolved target) with parameters frozen."""
        rule = relu_rule(self.rule) if self.rule else contextlib.nullcontext()
        x = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_(True)
        with frozen(self.model), channels_last_weights(self.model), rule, torch.enable_grad():
            scores = self.scores(x)
            resolved = self.resolve_target(target, scores)
            explained = resolved.explained(scores)
            grad = torch.autograd.grad(explained.sum(), x)[0]
        return grad.contiguous(), explained.detach(), resolved

    def raw_map(self, x: torch.Tensor, target) -> tuple[torch.Tensor, Target]:
        grad, _, resolved = self.input_gradients(x, target)
        return grad, resolved

    def compute(self, x, target) -> Attribution:
        raw, resolved = self.raw_map(x, target)
        return Attribution(self.name, raw, reduce_channels(raw, self.reduction), resolved)


class Saliency(GradientMethod):
    """Simonyan et al. 2014: the vanilla gradient; map = max over channels of |∂y/∂x|."""

    name = "saliency"


class GuidedBackprop(GradientMethod):
    """Springenberg et al. 2015: ReLU backward keeps (x>0)·(g>0)·g; ReLU6 also needs x<6."""

    name = "guided-backprop"
    rule = "guided"
    gradient_image = True


class Deconvnet(GradientMethod):
    """Zeiler & Fergus 2014: ReLU backward keeps (g>0)·g, ignoring the forward input."""

    name = "deconvnet"
    rule = "deconvnet"
    gradient_image = True


class InputXGradient(GradientMethod):
    """Shrikumar et al. 2016: x ⊙ ∂y/∂x; map = sum over channels (signed)."""

    name = "input-x-gradient"
    reduction = "sum"
    signed = True

    def raw_map(self, x, target):
        grad, _, resolved = self.input_gradients(x, target)
        return x * grad, resolved


class GuidedGradCAM(GradientMethod):
    """Selvaraju et al. 2017, as in the paper: guided backprop ⊙ upsampled Grad-CAM."""

    name = "guided-gradcam"
    reduction = "absmax"
    needs_layer = True
    gradient_image = True

    def compute(self, x, target) -> Attribution:
        cam = GradCAM(self.model, self.layer, self.output_selector, self.interpolation).attribute(x, target)
        guided, _, _ = GuidedBackprop(self.model, output_selector=self.output_selector).input_gradients(
            x, cam.target)
        raw = guided * cam.maps[:, None]
        return Attribution(self.name, raw, reduce_channels(raw, self.reduction), cam.target, cam.layer)


class IntegratedGradients(GradientMethod):
    """Sundararajan et al. 2017: (x − x0) ⊙ mean of ∂y/∂x along the straight path x0 → x.

    Uses ``steps`` midpoint-rule points, evaluated in batches of ``batch_size`` inputs.
    Baselines: 'zero', 'min' (the lowest input value, black), 'blur', or a tensor.
    """

    name = "integrated-gradients"
    reduction = "sum"
    signed = True

    def __init__(self, model, layer=None, output_selector=None, interpolation="bilinear", reduction=None,
                 steps: int = 64, baseline="zero", batch_size: int = 256, input_min: float = 0.0):
        super().__init__(model, layer, output_selector, interpolation, reduction)
        if steps <= 0 or batch_size <= 0:
            raise ConvlensError("integrated gradients needs positive steps and batch size")
        self.steps, self.baseline, self.batch_size, self.input_min = steps, baseline, batch_size, input_min

    def make_baseline(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.baseline, torch.Tensor):
            return self.baseline.to(x).expand_as(x)
        if self.baseline == "zero":
            return torch.zeros_like(x)
        if self.baseline == "min":
            return torch.full_like(x, self.input_min)
        if self.baseline == "blur":
            return blur(x)
        raise ConvlensError(f"unknown baseline {self.baseline!r}; use zero, min, blur or a tensor")

    def raw_map(self, x, target):
        x0 = self.make_baseline(x)
        with torch.no_grad():
            resolved = self.resolve_target(target, self.scores(x))
        alphas = (torch.arange(self.steps, dtype=x.dtype, device=x.device) + 0.5) / self.steps
        total = torch.zeros_like(x)
        per_chunk = max(1, self.batch_size // len(x))
        for start in range(0, self.steps, per_chunk):
            a = alphas[start:start + per_chunk]
            points = (x0[None] + a[:, None, None, None, None] * (x - x0)[None]).flatten(0, 1)
            grad, _, _ = self.input_gradients(points, resolved.repeat(len(a)))
            total += grad.view(len(a), *x.shape).sum(0)
        return (x - x0) * total / self.steps, resolved


class SmoothGrad(Method):
    """Smilkov et al. 2017: mean of any method's raw map over ``samples`` noisy copies (σ as a fraction
    of the input range); noisy copies run as one batch (in chunks of ``batch_size``)."""

    def __init__(self, method: Method, samples: int = 25, sigma: float = 0.15, batch_size: int = 256,
                 seed: int = 0):
        super().__init__(method.model, method.layer, method.output_selector, method.interpolation)
        if samples <= 0 or sigma < 0:
            raise ConvlensError("SmoothGrad needs samples > 0 and sigma ≥ 0")
        self.method, self.samples, self.sigma, self.batch_size, self.seed = method, samples, sigma, batch_size, seed
        self.name = f"smoothgrad-{method.name}"

    def compute(self, x, target) -> Attribution:
        with torch.no_grad():
            resolved = self.method.resolve_target(target, self.scores(x))
        gen = torch.Generator(device="cpu").manual_seed(self.seed)
        span = (x.flatten(1).max(1).values - x.flatten(1).min(1).values).view(-1, 1, 1, 1)
        raw_sum, maps_sum = None, None
        per_chunk = max(1, self.batch_size // len(x))
        for start in range(0, self.samples, per_chunk):
            k = min(per_chunk, self.samples - start)
            noise = torch.randn((k, *x.shape), generator=gen).to(x) * (self.sigma * span)[None]
            noisy = (x[None] + noise).flatten(0, 1)
            res = self.method.attribute(noisy, resolved.repeat(k))
            raw = res.raw.view(k, len(x), *res.raw.shape[1:]).sum(0)
            maps = res.maps.view(k, len(x), *res.maps.shape[1:]).sum(0)
            raw_sum = raw if raw_sum is None else raw_sum + raw
            maps_sum = maps if maps_sum is None else maps_sum + maps
        return Attribution(self.name, raw_sum / self.samples, maps_sum / self.samples, resolved,
                           getattr(self.method, "layer", None) if isinstance(self.method.layer, str) else None)
