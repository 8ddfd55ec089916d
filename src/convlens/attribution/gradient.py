"""The gradient family: maps from ∂y^c/∂x, optionally with guided / deconvnet ReLU rules."""
from __future__ import annotations

import contextlib
import warnings

import torch

from ..baselines import make_baseline
from ..errors import ConvlensError
from ..hooks import frozen, relu_rule
from ..runtime import channels_last, channels_last_weights
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
        x = channels_last(x.detach()).requires_grad_(True)
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
    """Selvaraju et al. 2017, as in the paper: guided backprop ⊙ upsampled Grad-CAM.

    ``layer_options`` (``reshape``, ``drop_tokens``, ``grid``) go to the Grad-CAM (see ``cam``)."""

    name = "guided-gradcam"
    reduction = "absmax"
    needs_layer = True
    gradient_image = True

    def __init__(self, model, layer=None, output_selector=None, interpolation="bilinear",
                 reduction: str | None = None, **layer_options):
        super().__init__(model, layer, output_selector, interpolation, reduction)
        self.gradcam = GradCAM(model, layer, output_selector, interpolation, **layer_options)

    def compute(self, x, target) -> Attribution:
        cam = self.gradcam.attribute(x, target)
        guided, _, _ = GuidedBackprop(self.model, output_selector=self.output_selector).input_gradients(
            x, cam.target)
        raw = guided * cam.maps[:, None]
        return Attribution(self.name, raw, reduce_channels(raw, self.reduction), cam.target, cam.layer)


def midpoints(steps: int, dtype, device, new_only: bool = False) -> torch.Tensor:
    """α_i = (i + ½)/steps. ``new_only``: leave out i ≡ 1 (mod 3), exactly the midpoints of the grid of
    steps/3 — a tripled grid reuses every point already evaluated."""
    i = torch.arange(steps, device=device)
    if new_only:
        i = i[i % 3 != 1]
    return (i.to(dtype) + 0.5) / steps


class IntegratedGradients(GradientMethod):
    """Sundararajan et al. 2017: IG_i = (x_i − x0_i) · ∫₀¹ ∂y/∂x_i (x0 + α(x − x0)) dα.

    The integral is the midpoint rule over ``steps`` points, in batches of ``batch_size`` inputs.
    Completeness says Σ_i IG_i = y(x) − y(x0); ``extras["completeness_gap"]`` reports, per input,
    |Σ IG − (y(x) − y(x0))| / |y(x) − y(x0)| (also ``extras["delta"]``, ``extras["steps"]``), and a
    warning names the inputs whose gap exceeds ``tolerance`` (default 5 %).

    ``steps=None`` (default) chooses the steps by that gap: 32 points, then 96, then 288 for the
    inputs still above ``tolerance`` (tripling the midpoint grid reuses every point already evaluated).
    On EfficientNet-Lite0 (ReLU6 kinks make the integrand rough) the gap of two shipped photos with the
    zero baseline was 10 % and 31 % at 32 steps, 18 % and 16 % at 96, 1.7 % and 4.7 % at 288
    (``bench/ig_completeness.py``); the gap is not monotone in the steps, so it is measured, not assumed.

    Baselines: ``"zero"``; ``"min"`` — the lowest input value (black), from ``input_min`` or else the
    lower end of ``input_range`` (e.g. ``LoadedModel.input_range``; refused when neither is given);
    ``"blur"``, ``"mean"``, a number or a tensor (:func:`convlens.baselines.make_baseline`).

    >>> ig = IntegratedGradients(model, baseline="min", input_range=loaded.input_range)
    >>> res = ig.attribute(x, target=3); res.extras["completeness_gap"]
    """

    name = "integrated-gradients"
    reduction = "sum"
    signed = True
    auto_steps = (32, 96, 288)  # each 3× the previous: the finer midpoint grid contains the coarser one
    fast_options = {"batch_size": 64}  # steps chosen by the completeness gap

    def __init__(self, model, layer=None, output_selector=None, interpolation="bilinear", reduction=None,
                 steps: int | None = None, baseline="zero", batch_size: int = 256,
                 input_range: tuple[float, float] | None = None, input_min: float | None = None,
                 tolerance: float = 0.05):
        super().__init__(model, layer, output_selector, interpolation, reduction)
        if (steps is not None and steps <= 0) or batch_size <= 0:
            raise ConvlensError("integrated gradients needs positive steps and batch size")
        if tolerance <= 0:
            raise ConvlensError("integrated gradients needs a positive completeness tolerance")
        self.steps, self.baseline, self.batch_size, self.tolerance = steps, baseline, batch_size, tolerance
        self.input_min = input_min if input_min is not None else (
            float(input_range[0]) if input_range is not None else None)

    def make_baseline(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.baseline, str) and self.baseline == "min":
            if self.input_min is None:
                raise ConvlensError("baseline 'min' needs the input range: pass input_range=(low, high) "
                                    "(LoadedModel.input_range) or input_min")
            return make_baseline(x, self.input_min)
        return make_baseline(x, self.baseline)

    def path_gradient_sum(self, x: torch.Tensor, x0: torch.Tensor, target, alphas: torch.Tensor) -> torch.Tensor:
        """Σ_α ∂y/∂x at x0 + α(x − x0), in chunks of about ``batch_size`` inputs."""
        total = torch.zeros_like(x)
        per_chunk = max(1, self.batch_size // len(x))
        for start in range(0, len(alphas), per_chunk):
            a = alphas[start:start + per_chunk]
            points = (x0[None] + a[:, None, None, None, None] * (x - x0)[None]).flatten(0, 1)
            grad, _, _ = self.input_gradients(points, target.repeat(len(a)))
            total += grad.view(len(a), *x.shape).sum(0)
        return total

    def raw_map(self, x, target):
        raw, resolved, _ = self.integrate(x, target)
        return raw, resolved

    def integrate(self, x, target):
        """(IG, resolved target, extras)."""
        x0 = self.make_baseline(x)
        with torch.no_grad():
            scores = self.scores(x)
            resolved = self.resolve_target(target, scores)
            delta = resolved.explained(scores) - resolved.explained(self.scores(x0))
        steps = self.steps or self.auto_steps[0]
        grad_sum = self.path_gradient_sum(x, x0, resolved, midpoints(steps, x.dtype, x.device))
        used = torch.full((len(x),), steps, dtype=torch.long)
        raw = (x - x0) * grad_sum / steps
        gap = completeness_gap(raw, delta)
        for finer in (self.auto_steps[1:] if self.steps is None else ()):
            todo = (gap > self.tolerance).nonzero().flatten()
            if len(todo) == 0:
                break
            alphas = midpoints(finer, x.dtype, x.device, new_only=True)
            grad_sum[todo] += self.path_gradient_sum(x[todo], x0[todo], resolved.select(todo), alphas)
            used[todo.cpu()] = finer
            raw[todo] = (x - x0)[todo] * grad_sum[todo] / finer
            gap[todo] = completeness_gap(raw[todo], delta[todo])
        warn_completeness(gap, self.tolerance, used)
        return raw, resolved, {"completeness_gap": gap.cpu(), "delta": delta.cpu(), "steps": used}

    def compute(self, x, target) -> Attribution:
        raw, resolved, extras = self.integrate(x, target)
        return Attribution(self.name, raw, reduce_channels(raw, self.reduction), resolved, extras=extras)


def completeness_gap(raw: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """|Σ attributions − Δ| / |Δ| per input (Δ = y(x) − y(x0); |Δ| floored at 1e-6)."""
    return (raw.flatten(1).sum(1) - delta).abs() / delta.abs().clamp_min(1e-6)


def warn_completeness(gap: torch.Tensor, tolerance: float, steps: torch.Tensor) -> None:
    bad = (gap > tolerance).nonzero().flatten().tolist()
    if bad:
        warnings.warn(f"integrated gradients: completeness gap above {tolerance:.0%} for input(s) {bad} "
                      f"(worst {float(gap.max()):.1%} at {int(steps.max())} steps): raise steps", stacklevel=3)

