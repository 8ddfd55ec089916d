"""The CAM family: maps built from a layer's activations A (N, K, h, w) and channel weights.

Each method overrides only how it weighs the channels. Gradients are taken with respect to
the captured layer output, and backpropagation stops there (``capture(cut=True)``), so a
Grad-CAM costs one forward and a partial backward, with parameters frozen.

**Token layers** (transformer-style, output (N, T, C)): every CAM method takes ``reshape="tokens"``
(with ``drop_tokens=1`` for a class token first, and ``grid=(h, w)``, else a square h = w = √(T − drop))
or ``reshape=fn`` (any rearrangement (layer output) → (N, C, h, w)). The activations and their
gradients are rearranged alike when the :class:`LayerPass` is built: token ``drop + i·w + j`` → cell
(i, j), channel c → channel c. Ablation-CAM rewrites the layer output itself and refuses a reshape.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConvlensError
from ..hooks import auto_layer, capture, frozen, relu_rule, resolve_layer
from ..runtime import channels_last, channels_last_weights
from .base import Attribution, Method, Target, input_size_errors, minmax_scale, upsample

Reshape = Union[None, str, Callable[[torch.Tensor], torch.Tensor]]


def tokens_to_grid(tokens: torch.Tensor, drop_tokens: int = 0, grid: tuple[int, int] | None = None) -> torch.Tensor:
    """(N, T, C) → (N, C, h, w): the first ``drop_tokens`` dropped, token ``drop + i·w + j`` at cell (i, j);
    h·w = T − drop, square unless ``grid`` is given."""
    if tokens.dim() != 3:
        raise ConvlensError(f"reshape='tokens' needs a (N, tokens, C) layer output (name the token layer with "
                            f"layer=), got shape {tuple(tokens.shape)}")
    kept = tokens.shape[1] - drop_tokens
    if grid is None:
        side = math.isqrt(max(kept, 0))
        if kept <= 0 or side * side != kept:
            raise ConvlensError(f"{kept} tokens (of {tokens.shape[1]}, {drop_tokens} dropped) do not form a square "
                                "grid: give grid=(h, w) or drop_tokens")
        grid = (side, side)
    if len(grid) != 2:
        raise ConvlensError(f"grid must be (h, w), got {grid!r}")
    h, w = int(grid[0]), int(grid[1])
    if h <= 0 or w <= 0 or h * w != kept:
        raise ConvlensError(f"grid {h}×{w} does not hold the {kept} tokens (of {tokens.shape[1]}, "
                            f"{drop_tokens} dropped)")
    return tokens[:, drop_tokens:].transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w)


@dataclass
class LayerPass:
    """One forward (and partial backward) with the layer captured: what ``weights(p)`` reads.

    ``acts`` A (N, K, h, w) (a token layer already rearranged, see the module doc); ``grads`` ∂y/∂A
    (None for gradient-free methods), rearranged alike; ``explained`` y (N,);
    ``target`` the resolved target; ``x`` the input; ``layer`` its path; ``scores`` the model scores.
    """

    acts: torch.Tensor
    grads: torch.Tensor | None
    explained: torch.Tensor
    target: Target
    x: torch.Tensor
    layer: str
    scores: torch.Tensor


class CamMethod(Method):
    """Template: one forward with the layer captured, gradients to the layer if needed, weights.

    ``reshape``, ``drop_tokens``, ``grid``: how a token layer (N, T, C) becomes (N, C, h, w) (module doc).
    """

    needs_layer = True
    needs_grad = True
    kerasvis_layer = False
    relu_rule: str | None = None

    def __init__(self, model, layer=None, output_selector=None, interpolation="bilinear", *,
                 reshape: Reshape = None, drop_tokens: int = 0, grid: tuple[int, int] | None = None):
        super().__init__(model, layer, output_selector, interpolation)
        if not (reshape is None or reshape == "tokens" or callable(reshape)):
            raise ConvlensError(f"reshape must be None, 'tokens' or a function, not {reshape!r}")
        if reshape != "tokens" and (drop_tokens or grid is not None):
            raise ConvlensError("drop_tokens and grid apply only with reshape='tokens'")
        if isinstance(drop_tokens, bool) or not isinstance(drop_tokens, int) or drop_tokens < 0:
            raise ConvlensError(f"drop_tokens must be a non-negative integer, not {drop_tokens!r}")
        self.reshape, self.drop_tokens, self.grid = reshape, drop_tokens, grid

    def spatial(self, out: torch.Tensor, layer: str) -> torch.Tensor:
        """The layer output (or its gradient) as (N, C, h, w), rearranged by ``reshape``."""
        if self.reshape == "tokens":
            out = tokens_to_grid(out, self.drop_tokens, self.grid)
        elif self.reshape is not None:
            out = self.reshape(out)
        if not isinstance(out, torch.Tensor) or out.dim() != 4:
            hint = " (a token layer (N, T, C): give reshape='tokens')" if self.reshape is None else ""
            raise ConvlensError(f"layer {layer!r} gives shape {tuple(getattr(out, 'shape', ()))}: "
                                f"CAM methods need a spatial (N, C, H, W) layer{hint}")
        return out

    def layer_name(self, x: torch.Tensor) -> str:
        """The given layer, or the automatic choice (``hooks.auto_layer``: found once per model and input shape)."""
        if self.layer is not None:
            return resolve_layer(self.model, self.layer)[0]
        with input_size_errors(x):
            return auto_layer(self.model, x, kerasvis=self.kerasvis_layer)

    def layer_pass(self, x: torch.Tensor, target, layer: str) -> LayerPass:
        """Activations, their gradients (or None), the explained scores and the resolved target."""
        rule = relu_rule(self.relu_rule) if self.relu_rule else contextlib.nullcontext()
        with frozen(self.model), channels_last_weights(self.model), capture(self.model, [layer], cut=True) as kept, \
                rule:
            with torch.set_grad_enabled(self.needs_grad):  # also inside a caller's torch.no_grad()
                scores = self.scores(channels_last(x))
                resolved = self.resolve_target(target, scores)
                explained = resolved.explained(scores)
                acts = self.spatial(kept[layer], layer)
                grads = self.spatial(torch.autograd.grad(explained.sum(), kept[layer])[0], layer) \
                    if self.needs_grad else None
        return LayerPass(acts.detach(), grads, explained.detach(), resolved, x, layer, scores.detach())

    def weights(self, p: LayerPass) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def combine(self, p: LayerPass, weights: torch.Tensor) -> torch.Tensor:
        return F.relu((weights[:, :, None, None] * p.acts).sum(1))

    def result(self, p: LayerPass, raw: torch.Tensor) -> Attribution:
        return Attribution(self.name, raw, upsample(raw, p.x.shape[-2:], self.interpolation), p.target, p.layer)

    def compute(self, x: torch.Tensor, target) -> Attribution:
        p = self.layer_pass(x, target, self.layer_name(x))
        return self.result(p, self.combine(p, self.weights(p)))


class GradCAM(CamMethod):
    """Selvaraju et al. 2017: α_k = spatial mean of ∂y^c/∂A_k; ReLU(Σ α_k A_k)."""

    name = "gradcam"

    def weights(self, p):
        return p.grads.mean((2, 3))


class GradCAMPlusPlus(CamMethod):
    """Chattopadhay et al. 2018, closed form with the exponential output.

    α = g² / (2g² + Σ_ab A_ab g³); w_k = Σ_ij α ReLU(g). The paper's factor exp(S^c) is a
    positive constant per sample; it is left out of ``raw`` to avoid overflow (the
    normalized map is unchanged).
    """

    name = "gradcam++"

    def weights(self, p):
        grads = p.grads
        g2, g3 = grads.pow(2), grads.pow(3)
        denom = 2 * g2 + p.acts.sum((2, 3), keepdim=True) * g3
        alpha = torch.where(grads != 0, g2 / torch.where(denom != 0, denom, torch.ones_like(denom)),
                            torch.zeros_like(g2))
        return (alpha * F.relu(grads)).sum((2, 3))


class XGradCAM(CamMethod):
    """Fu et al. 2020: w_k = Σ_ij (A_k(i,j) / Σ A_k) ∂y^c/∂A_k(i,j)."""

    name = "xgradcam"

    def weights(self, p):
        total = p.acts.sum((2, 3), keepdim=True)
        share = p.acts / torch.where(total != 0, total, torch.ones_like(total))
        return (share * p.grads).sum((2, 3))


class LayerCAM(CamMethod):
    """Jiang et al. 2021: ReLU(Σ_k ReLU(g_k) ⊙ A_k), an element-wise weighting."""

    name = "layercam"

    def weights(self, p):
        return F.relu(p.grads)

    def combine(self, p, weights):
        return F.relu((weights * p.acts).sum(1))


class KerasVisGradCAM(CamMethod):
    """keras-vis 0.4.1 ``visualize_cam`` with ``backprop_modifier='guided'``: Grad-CAM on guided gradients.

    Layer: the nearest conv or pooling layer before the output. keras-vis turns every activation,
    the output layer's included, into a guided ReLU, so it explains ReLU(y^c): the map is all zero
    when the target logit y^c ≤ 0. g = ∂ReLU(y^c)/∂A / (max g + 1e-7); w_k = mean_ij g_k;
    ReLU(Σ_k w_k A_k); PIL bicubic upsampling. Not the paper's guided Grad-CAM.
    Remaining differences from keras-vis: docs/keras-vis.md.
    """

    name = "kerasvis-guided-gradcam"
    kerasvis_layer = True
    relu_rule = "guided"

    def __init__(self, model, layer=None, output_selector=None, interpolation="pil-bicubic", **layer_options):
        super().__init__(model, layer, output_selector, interpolation, **layer_options)

    def weights(self, p):
        grads = p.grads * (p.explained > 0).to(p.grads)[:, None, None, None]  # the guided ReLU on the output
        peak = grads.flatten(1).max(1).values
        return (grads / (peak + 1e-7)[:, None, None, None]).mean((2, 3))


class CAM(CamMethod):
    """Zhou et al. 2016 for a global-average-pooling → linear head: M_c = Σ_k w_k^c A_k.

    The linear head is found automatically: the ``nn.Linear`` whose output, fed with the
    spatial mean of the layer, reproduces the model's scores.
    """

    name = "cam"
    needs_grad = False
    signed = True  # Σ_k w_k A_k without a ReLU
    needs_class_target = True

    def __init__(self, model, layer=None, output_selector=None, interpolation="bilinear", fc: nn.Linear | None = None,
                 **layer_options):
        super().__init__(model, layer, output_selector, interpolation, **layer_options)
        self.fc = fc

    def find_head(self, acts: torch.Tensor, scores: torch.Tensor) -> nn.Linear:
        pooled = acts.mean((2, 3))
        candidates = [self.fc] if self.fc is not None else [m for m in self.model.modules() if isinstance(m, nn.Linear)]
        for fc in reversed(candidates):
            if fc.in_features == pooled.shape[1] and fc.out_features == scores.shape[1]:
                with torch.no_grad():
                    if torch.allclose(fc(pooled), scores, rtol=1e-3, atol=1e-4):
                        return fc
        raise ConvlensError("CAM needs a global-average-pooling → linear head after the chosen layer; "
                            "this model has none (use gradcam)")

    def weights(self, p):
        return self.find_head(p.acts, p.scores).weight.detach()[p.target.classes]

    def combine(self, p, weights):
        return (weights[:, :, None, None] * p.acts).sum(1)


class ScoreCAM(CamMethod):
    """Wang et al. 2020: α_k = softmax(f(X ⊙ minmax(upsample(A_k))))_c; ReLU(Σ α_k A_k).

    Masked forwards run in batches of ``batch_size`` (8 was fastest on a 2-core CPU), channels-last, in
    inference mode. A channel whose activation is all zero
    adds α_k·0 whatever α_k is, so it is skipped: exact, and often half the channels.
    """

    name = "scorecam"
    needs_grad = False
    needs_class_target = True

    def __init__(self, model, layer=None, output_selector=None, interpolation="bilinear", batch_size: int = 8,
                 **layer_options):
        super().__init__(model, layer, output_selector, interpolation, **layer_options)
        if batch_size <= 0:
            raise ConvlensError("Score-CAM batch size must be positive")
        self.batch_size = batch_size

    def weights(self, p):
        n, k = p.acts.shape[:2]
        alpha = torch.zeros(n, k, dtype=p.acts.dtype, device=p.acts.device)
        with torch.inference_mode(), channels_last_weights(self.model):
            for i in range(n):
                alpha[i] = self.sample_weights(p.acts[i], p.x[i], int(p.target.classes[i]))
        return alpha

    def sample_weights(self, act: torch.Tensor, image: torch.Tensor, target: int) -> torch.Tensor:
        k = act.shape[0]
        alpha = torch.zeros(k, dtype=act.dtype, device=act.device)
        live = (act.flatten(1) != 0).any(1).nonzero().flatten()
        for start in range(0, len(live), self.batch_size):
            idx = live[start:start + self.batch_size]
            masks = minmax_scale(upsample(act[idx], image.shape[-2:], "bilinear"))[0]
            masked = channels_last(image[None] * masks[:, None])
            probs = F.softmax(self.scores(masked), dim=1)
            alpha[idx] = probs[:, target]
        return alpha
