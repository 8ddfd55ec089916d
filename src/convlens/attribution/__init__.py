"""Attribution methods, one call shape: ``Method(model, layer=None, **options).attribute(x, target)``.

Functional form: ``attribute("gradcam", model, x, target=None, layer=None, **options)``. Targets and
the per-method attributes are described in :mod:`convlens.attribution.base`; read them by name with
:func:`method_info`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import ConvlensError
from .base import (Attribution, Method, RegionTarget, Target, normalize_maps, region_target,  # noqa: F401
                   upsample)
from .cam import (CAM, GradCAM, GradCAMPlusPlus, KerasVisGradCAM, LayerCAM, ScoreCAM, XGradCAM,  # noqa: F401
                  tokens_to_grid)
from .backprop import DeepLift, GradientSHAP
from .cam_variants import (AblationCAM, EigenCAM, EigenGradCAM, FullGrad, FusedCAM, GradCAMElementWise, HiResCAM,
                           ISCAM, SSCAM, SmoothGradCAMPlusPlus)
from .lrp import LRP
from .noise import TUNNEL_OPTIONS, NoiseTunnel, SmoothGrad, SmoothGradSquared, VarGrad, split_tunnel_name
from .perturbation import LIME, RISE, FeatureAblation, KernelSHAP, Occlusion, ShapleySampling
from .gradient import (Deconvnet, GuidedBackprop, GuidedGradCAM, InputXGradient, IntegratedGradients,
                       Saliency)


class SmoothGradSaliency(SmoothGrad):
    """The registry's ``smoothgrad``: SmoothGrad over the vanilla gradient (options: samples, sigma, seed…)."""

    name = "smoothgrad"

    def __init__(self, model: nn.Module, layer=None, output_selector=None, interpolation="bilinear", **options):
        super().__init__(Saliency(model, layer, output_selector, interpolation), **options)


METHODS: dict[str, type[Method]] = {
    cls.name: cls for cls in (CAM, GradCAM, GradCAMPlusPlus, ScoreCAM, LayerCAM, XGradCAM, Saliency,
                              GuidedBackprop, Deconvnet, GuidedGradCAM, KerasVisGradCAM,
                              IntegratedGradients, InputXGradient, SmoothGradSaliency,
                              HiResCAM, GradCAMElementWise, EigenCAM, EigenGradCAM, AblationCAM,
                              SmoothGradCAMPlusPlus, SSCAM, ISCAM, FullGrad, FusedCAM,
                              Occlusion, FeatureAblation, RISE, ShapleySampling, KernelSHAP, LIME,
                              DeepLift, GradientSHAP, LRP, SmoothGradSquared, VarGrad)
}


@dataclass(frozen=True)
class MethodInfo:
    """What callers (CLI, plots, report, evaluation) need to know about a method, from its class."""

    name: str
    needs_layer: bool         # reads a layer: --layer applies
    needs_class_target: bool  # refuses a score-function target
    signed: bool              # maps carry meaningful negative values
    gradient_image: bool      # raw is an input-shaped gradient worth showing as an image
    fast_options: dict[str, Any]  # options for a quick run (CLI explain / evaluate)


def method_info(name: str) -> MethodInfo:
    """The :class:`MethodInfo` of a registered method or a noise tunnel over one ('vargrad:gradcam');
    an unknown name is a ConvlensError."""
    tunnel = split_tunnel_name(name)
    if tunnel is not None:
        base = method_info(tunnel[1])
        return MethodInfo(name, base.needs_layer, base.needs_class_target, base.signed and tunnel[0] == "smoothgrad",
                          base.gradient_image, {**base.fast_options, **NoiseTunnel.fast_options})
    if name not in METHODS:
        raise ConvlensError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    cls = METHODS[name]
    return MethodInfo(name, cls.needs_layer, cls.needs_class_target, cls.signed, cls.gradient_image,
                      dict(cls.fast_options))


def uses_layer(name: str) -> bool:
    """Whether the method reads a layer (CAM family, guided Grad-CAM): ``--layer`` applies to it."""
    return (name in METHODS or split_tunnel_name(name) is not None) and method_info(name).needs_layer


def make_method(name: str, model: nn.Module, layer=None, **options) -> Method:
    """A method instance by name (see ``METHODS``)."""
    method_info(name)  # validates the name
    tunnel = split_tunnel_name(name)
    if tunnel is not None:
        outer = {k: v for k, v in options.items() if k in TUNNEL_OPTIONS}
        inner = {k: v for k, v in options.items() if k not in TUNNEL_OPTIONS}
        return NoiseTunnel(make_method(tunnel[1], model, layer, **inner), tunnel[0], **outer)
    return METHODS[name](model, layer=layer, **options)


def attribute(name: str, model: nn.Module, inputs: torch.Tensor, target=None, layer=None, **options) -> Attribution:
    """Functional form of every method."""
    return make_method(name, model, layer, **options).attribute(inputs, target)
