"""More of the CAM family, each a small override of the CAM template (see ``cam.py``).

HiResCAM, element-wise Grad-CAM, EigenCAM, EigenGradCAM, Ablation-CAM, SmoothGrad-CAM++,
SS-CAM, IS-CAM, FullGrad and CAMs fused over several layers.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConvlensError
from ..hooks import POOLING, capture, frozen, resolve_layer, rewrite_outputs, spatial_layers
from ..runtime import channels_last, channels_last_weights
from .base import Attribution, Method, Target, input_size_errors, minmax_scale, upsample
from .batching import auto_batch_size
from .cam import CamMethod, GradCAMPlusPlus, ScoreCAM
from .noise import copies_per_chunk, noisy_copies


# ------------------------------------------------------------------ weight formulas
def first_component_projection(matrix: torch.Tensor) -> torch.Tensor:
    """Per sample, project the centred (K, h, w) maps on their first principal component → (h, w).

    With M = (A reshaped to (h·w, K)) − its column means and v₁ the first right singular
    vector of M, the map is M v₁. The sign of v₁ is fixed so that the map agrees with the
    centred channel sum (a singular vector's sign is otherwise arbitrary).
    """
    n, k, h, w = matrix.shape
    m = matrix.flatten(2).transpose(1, 2).double()            # (N, hw, K)
    m = m - m.mean(1, keepdim=True)
    _, _, vh = torch.linalg.svd(m, full_matrices=False)
    proj = m @ vh[:, 0, :, None]                              # (N, hw, 1)
    sign = torch.sign((proj[..., 0] * m.sum(2)).sum(1))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return (proj[..., 0] * sign[:, None]).view(n, h, w).to(matrix.dtype)


def scored_channels(act: torch.Tensor, max_channels: int | None) -> torch.Tensor:
    """Indices of the channels of one sample's (K, h, w) activation worth a forward: those not all zero
    (an all-zero channel adds w·0 whatever w is), limited to the ``max_channels`` with the largest mean
    activation when given (an approximation: the others weigh 0)."""
    live = (act.flatten(1) != 0).any(1).nonzero().flatten()
    if max_channels is not None and len(live) > max_channels:
        live = live[act[live].mean((1, 2)).topk(max_channels).indices.sort().values]
    return live


def check_max_channels(max_channels: int | None) -> None:
    if max_channels is not None and max_channels <= 0:
        raise ConvlensError("max_channels must be positive (or None for every channel)")


def minmax_masks(acts: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Score-CAM masks: each channel upsampled (bilinear) and scaled to [0, 1]; a flat channel → 0."""
    return minmax_scale(upsample(acts, size, "bilinear"))[0]


# ------------------------------------------------------------------ gradient CAMs
class HiResCAM(CamMethod):
    """Draelos & Carin 2020: L = Σ_k ∂y^c/∂A_k ⊙ A_k (element-wise, then summed; no ReLU, signed).

    On a GAP → linear head the gradient is spatially constant, so HiResCAM equals Grad-CAM there.
    """

    name = "hirescam"
    signed = True

    def weights(self, p):
        return p.grads

    def combine(self, p, weights):
        return (weights * p.acts).sum(1)


class GradCAMElementWise(CamMethod):
    """pytorch-grad-cam's element-wise Grad-CAM: L = Σ_k ReLU(∂y^c/∂A_k ⊙ A_k)."""

    name = "gradcam-elementwise"

    def weights(self, p):
        return p.grads

    def combine(self, p, weights):
        return F.relu(weights * p.acts).sum(1)


class EigenCAM(CamMethod):
    """Muhammad & Yeasin 2020: ReLU of the activations' first principal component (class-agnostic)."""

    name = "eigencam"
    needs_grad = False

    def weights(self, p):
        return p.acts

    def combine(self, p, weights):
        return F.relu(first_component_projection(weights))


class EigenGradCAM(EigenCAM):
    """EigenCAM of ∂y^c/∂A ⊙ A: the first principal component of the gradient-weighted activations."""

    name = "eigengradcam"
    needs_grad = True

    def weights(self, p):
        return p.grads * p.acts


class AblationCAM(CamMethod):
    """Desai & Ramaswamy 2020: w_k = (y^c − y^c_k) / y^c, y^c_k the score with channel k zeroed.

    One forward per live channel (the layer's output is rewritten in place of channel k), in batches of
    ``batch_size``; a channel that is already all zero gives y^c_k = y^c, so it is skipped (w_k = 0).
    ``max_channels`` (the CLI's quick setting: 32) scores only the most active channels.
    """

    name = "ablationcam"
    needs_grad = False
    fast_options = {"max_channels": 32}

    def __init__(self, model, layer=None, output_selector=None, interpolation="bilinear", batch_size: int = 64,
                 max_channels: int | None = None, **layer_options):
        super().__init__(model, layer, output_selector, interpolation, **layer_options)
        if self.reshape is not None:
            raise ConvlensError("Ablation-CAM zeroes channels of the layer output itself: it takes no reshape")
        if batch_size <= 0:
            raise ConvlensError("Ablation-CAM batch size must be positive")
        check_max_channels(max_channels)
        self.batch_size, self.max_channels = batch_size, max_channels

    def weights(self, p):
        n, k = p.acts.shape[:2]
        w = torch.zeros(n, k, dtype=p.acts.dtype, device=p.acts.device)
        for i in range(n):
            live = scored_channels(p.acts[i], self.max_channels)
            one = p.target.select(torch.tensor([i]))
            for start in range(0, len(live), self.batch_size):
                idx = live[start:start + self.batch_size]
                ablated = self.ablated_scores(p.x[i], idx, one.repeat(len(idx)), p.layer)
                y = p.explained[i]
                w[i, idx] = (y - ablated) / (y if y != 0 else torch.ones_like(y))
        return w

    def ablated_scores(self, image: torch.Tensor, channels: torch.Tensor, target: Target, layer: str) -> torch.Tensor:
        """The explained score of ``image`` with each of ``channels`` zeroed, one copy per channel."""
        rows = torch.arange(len(channels), device=channels.device)

        def zero_channel(out: torch.Tensor) -> torch.Tensor:
            out = out.clone()
            out[rows, channels] = 0
            return out

        batch = channels_last(image[None].expand(len(channels), *image.shape))
        with torch.inference_mode(), channels_last_weights(self.model), \
                rewrite_outputs(self.model, {layer: zero_channel}):
            return target.explained(self.scores(batch))


class SmoothGradCAMPlusPlus(GradCAMPlusPlus):
    """Omeiza et al. 2019: Grad-CAM++ with the 1st, 2nd and 3rd gradient powers averaged over noisy copies.

    D^p = mean over ``samples`` copies x + N(0, (σ·(max x − min x))²) of (∂y^c/∂A)^p (the noise tunnel's
    copies, ``noise.noisy_copies``: draw s shared by the batch, scaled per image);
    α = D² / (2 D² + Σ_ab A_ab D³); w_k = Σ_ij α ReLU(D¹); A from the clean input.
    """

    name = "smoothgradcam++"

    def __init__(self, model, layer=None, output_selector=None, interpolation="bilinear", samples: int = 8,
                 sigma: float = 0.15, seed: int = 0, batch_size: int | None = None, **layer_options):
        super().__init__(model, layer, output_selector, interpolation, **layer_options)
        if samples <= 0 or sigma < 0 or (batch_size is not None and batch_size <= 0):
            raise ConvlensError("SmoothGrad-CAM++ needs samples > 0, sigma ≥ 0 and a positive batch size")
        self.samples, self.sigma, self.seed, self.batch_size = samples, sigma, seed, batch_size

    def noisy_gradient_powers(self, x: torch.Tensor, target: Target, layer: str) -> tuple[torch.Tensor, ...]:
        sums = None
        for k, noisy in noisy_copies(x, self.samples, self.sigma, self.seed, copies_per_chunk(x, self.batch_size)):
            g = self.layer_pass(noisy, target.repeat(k), layer).grads
            g = g.view(k, len(x), *g.shape[1:])
            powers = (g.sum(0), g.pow(2).sum(0), g.pow(3).sum(0))
            sums = powers if sums is None else tuple(a + b for a, b in zip(sums, powers))
        return tuple(s / self.samples for s in sums)

    def weights(self, p):
        d1, d2, d3 = self.noisy_gradient_powers(p.x, p.target, p.layer)
        denom = 2 * d2 + (p.acts * d3).sum((2, 3), keepdim=True)
        alpha = torch.where(denom != 0, d2 / torch.where(denom != 0, denom, torch.ones_like(denom)),
                            torch.zeros_like(d2))
        return (alpha * F.relu(d1)).sum((2, 3))


class _MaskScoreCAM(ScoreCAM):
    """Score-CAM whose channel score averages softmax(f(X ⊙ m))_c over several variants m of each mask.

    A score-function target is applied to the softmax probabilities. ``max_channels`` (the CLI's quick
    setting) scores only the most active channels; the others weigh 0. Masked inputs of several samples
    share a forward (``batch_size`` inputs; default by input size).
    """

    needs_class_target = False

    def mask_variants(self, masks: torch.Tensor, gen: torch.Generator) -> torch.Tensor:  # pragma: no cover
        """(k, H, W) → (variants, k, H, W)."""
        raise NotImplementedError

    def weights(self, p):
        acts, x = p.acts, p.x
        alpha = torch.zeros(acts.shape[:2], dtype=acts.dtype, device=acts.device)
        batch = self.masked_batch or auto_batch_size(x, most=256)
        pending: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (sample, live channels, (V, L, H, W) masks)

        def flush():
            masks = torch.cat([m.flatten(0, 1) for _, _, m in pending])
            rows = torch.cat([torch.full((m.shape[0] * m.shape[1],), i, dtype=torch.long) for i, _, m in pending])
            probs = torch.cat([p.target.select(rows[a:a + batch]).explained(F.softmax(self.scores(channels_last(
                x[rows[a:a + batch].to(x.device)] * masks[a:a + batch, None])), 1))
                for a in range(0, len(rows), batch)])
            start = 0
            for i, live, m in pending:
                alpha[i, live] = probs[start:start + m.shape[0] * m.shape[1]].view(m.shape[:2]).mean(0)
                start += m.shape[0] * m.shape[1]
            pending.clear()

        with torch.inference_mode(), channels_last_weights(self.model):
            for i in range(len(x)):  # masks of several samples share a forward
                gen = torch.Generator(device="cpu").manual_seed(getattr(self, "seed", 0))
                live = scored_channels(acts[i], self.max_channels)
                pending.append((i, live, self.mask_variants(minmax_masks(acts[i, live], x.shape[-2:]), gen)))
                if sum(m.shape[0] * m.shape[1] for _, _, m in pending) >= batch:
                    flush()
            if pending:
                flush()
        return alpha


class SSCAM(_MaskScoreCAM):
    """Wang et al. 2020 (SS-CAM): α_k = mean over ``samples`` draws of softmax(f(X ⊙ (H_k + N(0, σ²))))_c.

    H_k: the Score-CAM mask of channel k (upsampled, min-max scaled); the noise is on the mask.
    """

    name = "sscam"
    fast_options = {"max_channels": 16, "samples": 2}

    def __init__(self, model, layer=None, output_selector=None, interpolation="bilinear",
                 batch_size: int | None = None, samples: int = 4, sigma: float = 0.2, seed: int = 0,
                 max_channels: int | None = None, **layer_options):
        super().__init__(model, layer, output_selector, interpolation, batch_size or 8, **layer_options)
        self.masked_batch = batch_size
        check_max_channels(max_channels)
        self.max_channels = max_channels
        if samples <= 0 or sigma < 0:
            raise ConvlensError("SS-CAM needs samples > 0 and sigma ≥ 0")
        self.samples, self.sigma, self.seed = samples, sigma, seed

    def mask_variants(self, masks, gen):
        noise = torch.randn((self.samples, *masks.shape), generator=gen).to(masks) * self.sigma
        return masks[None] + noise


class ISCAM(_MaskScoreCAM):
    """Naidu et al. 2020 (IS-CAM): α_k = (1/N) Σ_{i=1..N} softmax(f(X ⊙ (i/N)·H_k))_c.

    The Score-CAM score integrated along the mask scale 0 → 1 (right Riemann sum, N = ``samples``).
    TorchCAM instead accumulates the coefficients (Σ_{j≤i} j/N) and takes a softmax over channels.
    """

    name = "iscam"
    fast_options = {"max_channels": 16, "samples": 2}

    def __init__(self, model, layer=None, output_selector=None, interpolation="bilinear",
                 batch_size: int | None = None, samples: int = 4, max_channels: int | None = None,
                 **layer_options):
        super().__init__(model, layer, output_selector, interpolation, batch_size or 8, **layer_options)
        self.masked_batch = batch_size
        check_max_channels(max_channels)
        self.max_channels = max_channels
        if samples <= 0:
            raise ConvlensError("IS-CAM needs samples > 0")
        self.samples = samples

    def mask_variants(self, masks, gen):
        scale = torch.arange(1, self.samples + 1, dtype=masks.dtype, device=masks.device) / self.samples
        return scale[:, None, None, None] * masks[None]


# ------------------------------------------------------------------ FullGrad
def bias_of(module: nn.Module) -> torch.Tensor | None:
    """The per-channel bias a layer adds: a conv's bias, a batch norm's β − μ·γ/√(σ²+ε) (eval mode)."""
    if isinstance(module, nn.Conv2d):
        return module.bias.detach() if module.bias is not None else None
    if isinstance(module, nn.BatchNorm2d) and module.running_mean is not None:
        scale = module.weight.detach() / torch.sqrt(module.running_var + module.eps) if module.affine else \
            1 / torch.sqrt(module.running_var + module.eps)
        shift = module.bias.detach() if module.affine else 0
        return shift - module.running_mean * scale
    return None


def fullgrad_rescale(t: torch.Tensor) -> torch.Tensor:
    """FullGrad's ψ before upsampling: |t| shifted to minimum 0 and divided by (its maximum + 1e-6), per sample."""
    t = t.abs()
    flat = t.flatten(1)
    t = t - flat.min(1).values.view(-1, *([1] * (t.dim() - 1)))
    return t / (t.flatten(1).max(1).values.view(-1, *([1] * (t.dim() - 1))) + 1e-6)


class FullGrad(Method):
    """Srinivas & Fleuret 2019: S = Σ_c ψ(∇_x y^c ⊙ x) + Σ_layers Σ_c ψ(∇_z y^c ⊙ b).

    z: the output of each conv / batch norm with a bias b (batch norm: its effective bias); ψ:
    |·| min-max rescaled per sample, upsampled bilinearly (align_corners=True) to the input.
    ``decompose`` returns the unrescaled parts; for piecewise-linear networks they sum to y^c
    together with the linear layers' bias terms (the completeness the paper proves).
    """

    name = "fullgrad"

    def decompose(self, x: torch.Tensor, target):
        """(∇_x y ⊙ x, {layer: ∇_z y ⊙ b}, explained scores, resolved target) for every biased layer."""
        named = dict(self.model.named_modules())
        biased = [(name, b) for name, m in named.items() if name and (b := bias_of(m)) is not None]
        biased += [(name, m.bias.detach()) for name, m in named.items()
                   if isinstance(m, nn.Linear) and m.bias is not None]
        x = x.detach().clone().requires_grad_(True)
        with frozen(self.model), capture(self.model, [n for n, _ in biased]) as kept, torch.enable_grad():
            scores = self.scores(x)
            resolved = self.resolve_target(target, scores)
            explained = resolved.explained(scores)
            ran = [(n, b) for n, b in biased if n in kept.outputs]
            grads = torch.autograd.grad(explained.sum(), [x] + [kept[n] for n, _ in ran], allow_unused=True)
        parts = {}
        for (n, b), g in zip(ran, grads[1:]):
            if g is None:
                continue
            # a linear layer adds its bias along the last axis (also on (N, tokens, features)); conv and
            # batch norm along the channel axis 1
            parts[n] = g * b if isinstance(named[n], nn.Linear) else g * b.view([1, -1] + [1] * (g.dim() - 2))
        return grads[0] * x.detach(), parts, explained.detach(), resolved

    def compute(self, x, target) -> Attribution:
        input_part, parts, _, resolved = self.decompose(x, target)
        total = fullgrad_rescale(input_part).sum(1)
        for part in parts.values():
            if part.dim() == 4:
                # the channel sum commutes with (linear) interpolation: one map per layer is upsampled
                total = total + F.interpolate(fullgrad_rescale(part).sum(1)[None], size=x.shape[-2:],  # as upsample
                                              mode="bilinear", align_corners=True)[0]
        return Attribution(self.name, total, total, resolved)


# ------------------------------------------------------------------ several layers
def default_fusion_layers(model: nn.Module, x: torch.Tensor, count: int = 3) -> list[str]:
    """The last non-pooling spatial layer of each of the ``count`` deepest resolutions."""
    with input_size_errors(x):
        found = spatial_layers(model, x)
    layers = [(p, s) for p, s, m in found if not isinstance(m, POOLING)]
    chosen: dict[tuple[int, int], str] = {}
    for path, shape in layers:
        chosen[tuple(shape[-2:])] = path
    ordered = sorted(chosen.values(), key=[p for p, _ in layers].index)
    if not ordered:
        raise ConvlensError("the model has no layer with a spatial (N, C, H, W) output: CAM methods need one")
    return ordered[-count:]


class FusedCAM(Method):
    """A CAM computed at several layers, each upsampled and min-max scaled to [0, 1], then averaged.

    ``layer``: a list or a comma-separated string of module paths (default: the deepest layer of each
    of the three deepest resolutions); ``base``: the CAM method applied at each layer; ``layer_options``
    (``reshape``, ``drop_tokens``, ``grid``): passed to it at every layer.
    """

    name = "fusedcam"
    needs_layer = True

    def __init__(self, model, layer=None, output_selector=None, interpolation="bilinear", base: str = "gradcam",
                 **layer_options):
        super().__init__(model, layer, output_selector, interpolation)
        self.layer_options = layer_options
        from . import METHODS

        base_cls = METHODS.get(base)
        if not (isinstance(base_cls, type) and issubclass(base_cls, CamMethod)):
            raise ConvlensError(f"fused CAM needs a CAM-family base method, not {base!r}")
        self.base_cls = base_cls

    def layers(self, x: torch.Tensor) -> list[str]:
        if self.layer is None:
            return default_fusion_layers(self.model, x)
        names = self.layer.split(",") if isinstance(self.layer, str) else list(self.layer)
        return [resolve_layer(self.model, n.strip() if isinstance(n, str) else n)[0] for n in names]

    def compute(self, x, target) -> Attribution:
        layers = self.layers(x)
        per_layer = []
        for layer in layers:
            res = self.base_cls(self.model, layer, self.output_selector, self.interpolation,
                                **self.layer_options).attribute(x, target)
            target = res.target  # resolved once, on the first layer's pass
            per_layer.append(minmax_scale(res.maps)[0])
        fused = torch.stack(per_layer).mean(0)
        return Attribution(self.name, fused, fused, target, ",".join(layers))
