"""Reference-based backpropagation: DeepLIFT (rescale rule) and GradientSHAP."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..baselines import make_baseline
from ..errors import ConvlensError
from ..hooks import frozen, relu_calls, relu_rule
from ..runtime import channels_last, channels_last_weights
from .base import Attribution, Method
from .gradient import Saliency, reduce_channels
from .noise import copies_per_chunk, image_span, noise_draws


def rescale_rule(x: torch.Tensor, y: torch.Tensor, grad: torch.Tensor, upper) -> torch.Tensor:
    """DeepLIFT's rescale rule for a batch [inputs; references] (the halves of the batch): grad · Δy/Δx."""
    n = len(x) // 2
    dx = x[:n] - x[n:]
    return grad * rescale_multiplier(torch.cat([dx, -dx]), y, torch.cat([y[n:], y[:n]]), upper)


def rescale_multiplier(dx: torch.Tensor, y: torch.Tensor, ref_out: torch.Tensor, upper) -> torch.Tensor:
    """m = Δy/Δx of a ReLU-family unit y = clamp(x, 0, upper), from Δx = x − x_ref, y and y_ref; where
    |Δx| < 1e-10 the unit's own derivative [0 < x (< upper)] (as Captum does), read from y (the same
    condition) by torch's fused ReLU / hardtanh backward."""
    m = torch.sub(y, ref_out).div_(dx)  # inf or nan where Δx = 0: replaced below
    ones = torch.ones((), dtype=y.dtype, device=y.device).expand_as(y)
    local = torch.ops.aten.threshold_backward(ones, y, 0) if upper is None else \
        torch.ops.aten.hardtanh_backward(ones, y, 0, upper)
    return torch.where(dx.abs() < 1e-10, local, m)


class _RescaleReLU(torch.autograd.Function):
    """y = clamp(x, 0, upper) (in place when asked); backward: grad_out · Δy/Δx against the unit's input
    ``ref`` and output ``ref_out`` on the reference (:func:`rescale_multiplier`, computed here; only the
    multiplier is kept)."""

    @staticmethod
    def forward(ctx, x, ref, ref_out, upper, inplace):
        dx = x - ref
        if inplace:
            out = x.clamp_(0, upper) if upper is not None else x.clamp_min_(0)
            ctx.mark_dirty(x)
        else:
            out = x.clamp(0, upper) if upper is not None else x.clamp_min(0)
        ctx.save_for_backward(rescale_multiplier(dx, out, ref_out, upper))
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (m,) = ctx.saved_tensors
        return grad_out * m, None, None, None, None


class _ReferenceMismatch(Exception):
    """The input's forward ran other ReLU-family calls than the reference's (data-dependent control flow)."""


@dataclass
class _Unit:
    """A ReLU-family call of the reference forward: its input and output with their version counters."""

    ref: torch.Tensor
    ref_version: int
    out: torch.Tensor
    out_version: int


class _ReferenceUnits:
    """DeepLIFT's two passes: :meth:`record` keeps the input and output of every ReLU-family call of the
    reference forward, in call order; :meth:`replay` gives the i-th call of the input's forward the rescale
    rule against the i-th kept unit."""

    def __init__(self):
        self.kept: list[_Unit] = []
        self.used = 0

    def record(self, func, args, kwargs, x, upper, inplace):
        ref = x.clone() if inplace else x
        out = func(*args, **kwargs)
        self.kept.append(_Unit(ref, ref._version, out, out._version))
        return out

    def replay(self, func, args, kwargs, x, upper, inplace):
        if self.used >= len(self.kept):
            raise _ReferenceMismatch
        unit = self.kept[self.used]
        self.used += 1
        if unit.ref.shape != x.shape or unit.ref._version != unit.ref_version:  # another call, or a changed input
            raise _ReferenceMismatch
        if not x.requires_grad:
            return func(*args, **kwargs)
        ref_out = unit.out if unit.out._version == unit.out_version else (  # the model changed it in place
            unit.ref.clamp(0, upper) if upper is not None else unit.ref.clamp_min(0))
        return _RescaleReLU.apply(x, unit.ref, ref_out, upper, inplace)


class DeepLift(Method):
    """Shrikumar et al. 2017, rescale rule: φ = (x − x0) ⊙ m, m the gradient with every ReLU-family unit's
    derivative replaced by Δy/Δx between the input and the reference ``baseline``.

    The reference runs first, without gradients, keeping each ReLU-family unit's input; the input's
    forward and backward then apply the rule unit by unit (a model whose two forwards run different
    ReLU-family calls, by data-dependent control flow, is run instead as one batch [inputs; references]).
    For networks of linear maps and ReLU-family units Σφ = y(x) − y(x0) (summation to delta, reported in
    ``extras["delta_gap"]``); other non-linearities (max pooling, sigmoid…) keep their gradient.
    """

    name = "deeplift"
    signed = True

    def __init__(self, model, layer=None, output_selector=None, interpolation="bilinear", baseline="zero"):
        super().__init__(model, layer, output_selector, interpolation)
        self.baseline = baseline

    def compute(self, x, target) -> Attribution:
        x0 = make_baseline(x, self.baseline)
        with frozen(self.model), channels_last_weights(self.model):
            try:
                grad, explained, ref_explained, resolved = self.reference_passes(x, x0, target)
            except _ReferenceMismatch:
                grad, explained, ref_explained, resolved = self.joint_pass(x, x0, target)
        delta = explained - ref_explained
        raw = (x - x0) * grad.contiguous()
        gap = (raw.flatten(1).sum(1) - delta).abs()
        return Attribution(self.name, raw, reduce_channels(raw, "sum"), resolved,
                           extras={"delta": delta.cpu(), "delta_gap": gap.cpu()})

    def reference_passes(self, x, x0, target):
        """(m, y(x), y(x0), target): the reference forward without gradients, then the input's with the rule."""
        units = _ReferenceUnits()
        with relu_calls(units.record), torch.no_grad():
            ref_scores = self.scores(channels_last(x0))
        inputs = channels_last(x).requires_grad_(True)
        with relu_calls(units.replay), torch.enable_grad():
            scores = self.scores(inputs)
            if units.used != len(units.kept):
                raise _ReferenceMismatch
            resolved = self.resolve_target(target, scores.detach())
            explained = resolved.explained(scores)
            grad = torch.autograd.grad(explained.sum(), inputs)[0]
        return grad, explained.detach(), resolved.explained(ref_scores), resolved

    def joint_pass(self, x, x0, target):
        """(m, y(x), y(x0), target) from one batch [inputs; references]: each unit sees both halves."""
        n = len(x)
        both = channels_last(torch.cat([x, x0])).requires_grad_(True)
        with relu_rule(rescale_rule), torch.enable_grad():
            scores = self.scores(both)
            resolved = self.resolve_target(target, scores[:n].detach())
            explained = resolved.explained(scores[:n])
            grad = torch.autograd.grad(explained.sum(), both)[0][:n]
        return grad, explained.detach(), resolved.explained(scores[n:].detach()), resolved


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
        noise = noise_draws(gen, self.samples, x.shape[1:]).to(x)[:, None] * (self.sigma * image_span(x))[None]
        return index.to(x.device), alpha.to(x), noise

    def compute(self, x, target) -> Attribution:
        pool = self.baseline_pool(x)
        index, alpha, noise = self.draws(x)
        resolved = self.resolve_before_copies(x, target)
        n = len(x)
        total = torch.zeros_like(x)
        per_chunk = copies_per_chunk(x, self.batch_size)
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

