"""What every attribution method shares: targets, output selection, result maps, normalization."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConvlensError

Target = Union[None, int, Sequence[int], torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]
OutputSelector = Union[None, int, str, Callable[[Any], torch.Tensor]]


@dataclass
class Attribution:
    """Maps of one method for a batch.

    ``raw``: the method's own output (layer resolution (N, h, w) for CAM methods, input
    shape (N, C, H, W) for gradient methods); ``maps``: (N, H, W) at input resolution;
    ``targets``: the class (or -1 for a callable target) each map explains.
    """

    method: str
    raw: torch.Tensor
    maps: torch.Tensor
    targets: torch.Tensor
    layer: str | None = None

    @property
    def normalized(self) -> torch.Tensor:
        """Per-sample min-max scaling to [0, 1]; a flat map becomes zeros (with a warning)."""
        return normalize_maps(self.maps)


def normalize_maps(maps: torch.Tensor) -> torch.Tensor:
    flat = maps.flatten(1)
    lo, hi = flat.min(1).values, flat.max(1).values
    span = hi - lo
    is_flat = ~(span > 0) | ~torch.isfinite(span)
    if bool(is_flat.any()):
        warnings.warn(f"{int(is_flat.sum())} flat attribution map(s): normalized to zeros", stacklevel=2)
    scale = torch.where(is_flat, torch.zeros_like(span), 1.0 / torch.where(is_flat, torch.ones_like(span), span))
    out = (flat - lo[:, None]) * scale[:, None]
    return torch.nan_to_num(out, nan=0.0).view_as(maps)


def select_output(output: Any, selector: OutputSelector) -> torch.Tensor:
    """The (N, classes) score tensor out of a model output (tensor, tuple, dict…)."""
    if selector is None:
        if isinstance(output, torch.Tensor):
            return output
        if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
            return output[0]
        if isinstance(output, dict) and "logits" in output:
            return output["logits"]
        raise ConvlensError(f"model output of type {type(output).__name__}: give an output selector")
    if callable(selector):
        return selector(output)
    return output[selector]


def resolve_targets(scores: torch.Tensor, target: Target) -> torch.Tensor:
    """Per-sample class indices (N,) from None (predicted), an int, a sequence or a tensor."""
    n, classes = scores.shape[0], scores.shape[1]
    if target is None:
        t = scores.detach().argmax(1)
    elif isinstance(target, int):
        t = torch.full((n,), target, dtype=torch.long, device=scores.device)
    else:
        t = torch.as_tensor(target, dtype=torch.long, device=scores.device).flatten()
        if t.numel() == 1:
            t = t.expand(n)
        if t.numel() != n:
            raise ConvlensError(f"{t.numel()} targets for {n} inputs")
    if bool(((t < 0) | (t >= classes)).any()):
        raise ConvlensError(f"target class out of range 0..{classes - 1}: {t.tolist()}")
    return t


def target_scores(scores: torch.Tensor, target: Target) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-sample score to explain (N,), target indices (N,)); a callable target gives scores itself."""
    if callable(target) and not isinstance(target, torch.Tensor):
        s = target(scores)
        return s.reshape(scores.shape[0]), torch.full((scores.shape[0],), -1, dtype=torch.long)
    t = resolve_targets(scores, target)
    return scores.gather(1, t[:, None]).squeeze(1), t


def upsample(maps: torch.Tensor, size: Sequence[int], mode: str = "bilinear") -> torch.Tensor:
    """(N, h, w) → (N, H, W) with bilinear (default) or bicubic interpolation."""
    if mode not in ("bilinear", "bicubic", "nearest"):
        raise ConvlensError(f"unknown upsampling {mode!r}; use bilinear, bicubic or nearest")
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    kwargs = {} if mode == "nearest" else {"align_corners": False}
    return F.interpolate(maps[:, None], size=tuple(size), mode=mode, **kwargs)[:, 0]


def expected_channels(model: nn.Module) -> int | None:
    """Input channels: the model's ``input_shape`` if it declares one, else its first Conv2d's."""
    shape = getattr(model, "input_shape", None)
    if shape is not None:
        return int(shape[0])
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return first.in_channels if first is not None else None


def check_input(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Inputs must be a float (N, C, H, W) batch with the channels the model expects."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ConvlensError(f"inputs must be a (N, C, H, W) tensor, got shape {tuple(getattr(x, 'shape', ()))}")
    channels = expected_channels(model)
    if channels is not None and x.shape[1] != channels:
        raise ConvlensError(f"the model expects {channels} input channel(s), got {x.shape[1]}")
    return x.detach().float() if not x.is_floating_point() else x.detach()


class Method:
    """Base of every method: ``Method(model, layer=None, **options).attribute(inputs, target=None)``."""

    name = "method"
    needs_layer = False  # True for methods that read a layer (see uses_layer)
    signed = False              # maps carry meaningful negative values
    gradient_image = False      # raw is an input-shaped gradient worth showing as an image

    def __init__(self, model: nn.Module, layer: str | nn.Module | None = None,
                 output_selector: OutputSelector = None, interpolation: str = "bilinear"):
        self.model = model
        self.layer = layer
        self.output_selector = output_selector
        self.interpolation = interpolation

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        return select_output(self.model(x), self.output_selector)

    def attribute(self, inputs: torch.Tensor, target: Target = None) -> Attribution:  # pragma: no cover
        raise NotImplementedError

    def __call__(self, inputs: torch.Tensor, target: Target = None) -> Attribution:
        return self.attribute(inputs, target)
