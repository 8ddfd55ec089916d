"""Attribution methods, one call shape: ``Method(model, layer=None, **options).attribute(x, target)``.

Functional form: ``attribute("gradcam", model, x, target=None, layer=None, **options)``.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..errors import ConvlensError
from .base import Attribution, Method, Target, normalize_maps, upsample  # noqa: F401
from .cam import CAM, GradCAM, GradCAMPlusPlus, KerasVisGradCAM, LayerCAM, ScoreCAM, XGradCAM
from .gradient import (Deconvnet, GuidedBackprop, GuidedGradCAM, InputXGradient, IntegratedGradients,
                       Saliency, SmoothGrad)

METHODS: dict[str, Callable[..., Method]] = {
    cls.name: cls for cls in (CAM, GradCAM, GradCAMPlusPlus, ScoreCAM, LayerCAM, XGradCAM, Saliency,
                              GuidedBackprop, Deconvnet, GuidedGradCAM, KerasVisGradCAM,
                              IntegratedGradients, InputXGradient)
}
METHODS["smoothgrad"] = lambda model, layer=None, **kw: SmoothGrad(Saliency(model, layer), **kw)


def uses_layer(name: str) -> bool:
    """Whether the method reads a layer (CAM family, guided Grad-CAM): ``--layer`` applies to it."""
    return bool(getattr(METHODS.get(name), "needs_layer", False))


def make_method(name: str, model: nn.Module, layer=None, **options) -> Method:
    """A method instance by name (see ``METHODS``)."""
    if name not in METHODS:
        raise ConvlensError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    return METHODS[name](model, layer=layer, **options)


def attribute(name: str, model: nn.Module, inputs: torch.Tensor, target=None, layer=None, **options) -> Attribution:
    """Functional form of every method."""
    return make_method(name, model, layer, **options).attribute(inputs, target)
