"""What every attribution method shares: targets, output selection, result maps, normalization.

Call shape of every method::

    res = GradCAM(model, layer=None).attribute(x, target)   # x: float (N, C, H, W)
    res.maps, res.normalized, res.targets                    # (N, H, W), (N, H, W) in [0, 1], (N,)

**Targets.** ``target`` may be ``None`` (the predicted class), an ``int`` (one class for the whole
batch), a sequence or integer tensor of N classes, a callable ``scores (N, K) → (N,)`` (any
differentiable score, e.g. ``lambda s: s[:, 3] - s[:, 5]``), or a :class:`Target`. Floats, strings
and booleans are refused with a :class:`ConvlensError`. Every method resolves it exactly once into a
:class:`Target` with ``Target.resolve(target, scores)``; a wrapper (SmoothGrad, integrated gradients,
guided Grad-CAM) resolves on the clean input and hands the :class:`Target` on (``target.repeat(k)``
for k stacked copies of the batch, ``target.select(index)`` for a subset), so ``None`` means the
prediction on the clean image everywhere.
A segmentation model's output (N, C, H, W) takes a score function only, typically
:func:`region_target` (one class's logits summed over a region); a class target on it is refused. A
score function with per-sample state (a :class:`RegionTarget`) has ``repeat(k)`` / ``select(index)``,
which :class:`Target` calls so that wrappers keep it aligned.
A method that needs class indices sets ``needs_class_target = True``.

**Writing a method.** Subclass :class:`Method` and implement ``compute(x, target) -> Attribution``:
``attribute`` has already checked ``x`` (a finite, non-empty float batch of the model's dtype) and put
the model in eval mode. Resolve the target with ``self.resolve_target(target, scores)`` (it accepts a
:class:`Target` from a wrapper) and score with ``resolved.explained(scores)``. A CAM variant subclasses
``cam.CamMethod`` and implements only ``weights(p)`` (and ``combine(p, w)`` if not Σ_k w_k A_k), where
``p`` is a ``cam.LayerPass`` (``acts``, ``grads``, ``explained``, ``target``, ``x``, ``layer``,
``scores``). Register the class in ``convlens.attribution.METHODS``.

**Per-method knowledge** lives on the class (read with :func:`convlens.attribution.method_info`):
``needs_layer`` (reads a layer: ``--layer`` applies), ``signed`` (``maps`` has meaningful negative
values), ``gradient_image`` (``raw`` is an input-shaped gradient worth showing as an image),
``fast_options`` (options the CLI uses for a quick run).
"""
from __future__ import annotations

import contextlib
import numbers
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConvlensError
from ..hooks import evaluating

ScoreFn = Callable[[torch.Tensor], torch.Tensor]
TargetLike = Union[None, int, Sequence[int], torch.Tensor, ScoreFn, "Target"]
OutputSelector = Union[None, int, str, Callable[[Any], torch.Tensor]]


@dataclass(frozen=True)
class Target:
    """What the maps of a batch of ``size`` inputs explain: class indices or a score function.

    ``classes`` (N,) long: the explained score is ``scores[i, classes[i]]``; ``fn``: it is ``fn(scores)``.
    Exactly one of the two is set. Build with :meth:`resolve`.
    """

    classes: torch.Tensor | None
    fn: ScoreFn | None
    size: int

    @property
    def is_class(self) -> bool:
        return self.classes is not None

    @staticmethod
    def resolve(target: TargetLike, scores: torch.Tensor) -> "Target":
        """The :class:`Target` for a batch with model scores ``scores`` (N, K) (see the module doc)."""
        n, classes = scores.shape[0], scores.shape[1]
        if isinstance(target, Target):
            if target.size != n:
                raise ConvlensError(f"target resolved for {target.size} inputs used on {n}")
            return target
        if callable(target) and not isinstance(target, torch.Tensor):
            return Target(None, target, n)
        if scores.dim() != 2:
            raise ConvlensError(f"the model output has shape {tuple(scores.shape)}: a class target needs "
                                "(N, classes) scores; for a (N, C, H, W) segmentation output give "
                                "region_target(cls, mask)")
        if target is None:
            t = scores.detach().argmax(1)
        else:
            t = class_indices(target).to(scores.device)
            if t.numel() == 1:
                t = t.expand(n)
            if t.numel() != n:
                raise ConvlensError(f"{t.numel()} targets for {n} inputs")
        if bool(((t < 0) | (t >= classes)).any()):
            raise ConvlensError(f"target class out of range 0..{classes - 1}: {t.tolist()}")
        return Target(t, None, n)

    def explained(self, scores: torch.Tensor) -> torch.Tensor:
        """The score each map explains, (N,)."""
        if self.fn is None:
            return scores.gather(1, self.classes.to(scores.device)[:, None]).squeeze(1)
        out = self.fn(scores)
        if not isinstance(out, torch.Tensor) or out.numel() != scores.shape[0]:
            raise ConvlensError(f"a target function must return one score per input ({scores.shape[0]}), "
                                f"got shape {tuple(getattr(out, 'shape', ()))}")
        return out.reshape(scores.shape[0])

    def repeat(self, k: int) -> "Target":
        """The same target for ``k`` copies of the batch stacked along the batch axis."""
        if self.classes is None:
            fn = self.fn.repeat(k) if hasattr(self.fn, "repeat") else self.fn
            return Target(None, fn, self.size * k)
        return Target(self.classes.repeat(k), None, self.size * k)

    def select(self, index: torch.Tensor) -> "Target":
        """The target of the inputs at ``index`` (a 1-D index tensor)."""
        if self.classes is None:
            fn = self.fn.select(index) if hasattr(self.fn, "select") else self.fn
            return Target(None, fn, len(index))
        return Target(self.classes[index.to(self.classes.device)], None, len(index))

    def labels(self) -> torch.Tensor:
        """Class indices on the CPU (N,), -1 where a score function was explained."""
        if self.classes is None:
            return torch.full((self.size,), -1, dtype=torch.long)
        return self.classes.detach().cpu()


@dataclass(frozen=True, eq=False)  # tensors: compared by identity
class RegionTarget:
    """Seg-Grad-CAM score of a (N, C, H, W) output: y_n = Σ_{h,w} M_n[h, w] · out[n, c_n, h, w].

    ``classes``: (1,) for one class or (N,) per sample; ``mask``: (1, H, W) or (N, H, W) float weights over
    the output grid. Build with :func:`region_target`.
    """

    classes: torch.Tensor
    mask: torch.Tensor

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        if scores.dim() != 4:
            raise ConvlensError(f"region_target needs a (N, C, H, W) model output, got shape {tuple(scores.shape)}")
        n, k, h, w = scores.shape
        if tuple(self.mask.shape[-2:]) != (h, w) or self.mask.shape[0] not in (1, n):
            raise ConvlensError(f"region mask of shape {tuple(self.mask.shape)} does not fit the model output "
                                f"{tuple(scores.shape)}: give (H, W) = {(h, w)} or (N, H, W) = {(n, h, w)}")
        if self.classes.numel() not in (1, n):
            raise ConvlensError(f"{self.classes.numel()} region target classes for {n} inputs")
        if bool(((self.classes < 0) | (self.classes >= k)).any()):
            raise ConvlensError(f"target class out of range 0..{k - 1}: {self.classes.tolist()}")
        index = self.classes.to(scores.device).expand(n)[:, None, None, None].expand(n, 1, h, w)
        logits = scores.gather(1, index)[:, 0]
        return (self.mask.to(scores) * logits).sum((1, 2))

    def repeat(self, k: int) -> "RegionTarget":
        """The same regions for ``k`` stacked copies of the batch."""
        return RegionTarget(self.classes.repeat(k) if self.classes.numel() > 1 else self.classes,
                            self.mask.repeat(k, 1, 1) if self.mask.shape[0] > 1 else self.mask)

    def select(self, index: torch.Tensor) -> "RegionTarget":
        """The regions of the inputs at ``index``."""
        classes = self.classes[index.to(self.classes.device)] if self.classes.numel() > 1 else self.classes
        mask = self.mask[index.to(self.mask.device)] if self.mask.shape[0] > 1 else self.mask
        return RegionTarget(classes, mask)


def region_target(cls: int | Sequence[int] | torch.Tensor, mask: torch.Tensor) -> RegionTarget:
    """A score-function target for segmentation outputs (N, C, H, W), the Seg-Grad-CAM convention
    (Vinogradova et al. 2020): y_n = Σ_{h,w} mask[h, w] · out[n, cls_n, h, w], the class logits summed
    over the region. ``cls``: one class or one per sample; ``mask``: bool or float, (H, W) or (N, H, W)
    over the output grid (checked against the output when scored)."""
    if not isinstance(mask, torch.Tensor) or mask.dim() not in (2, 3):
        raise ConvlensError(f"a region mask must be a (H, W) or (N, H, W) tensor, got shape "
                            f"{tuple(getattr(mask, 'shape', ()))}")
    if mask.is_complex() or not (mask.dtype == torch.bool or mask.is_floating_point()):
        raise ConvlensError(f"a region mask must be bool or float, got {mask.dtype}")
    weights = mask.float() if mask.dtype == torch.bool else mask
    return RegionTarget(class_indices(cls), weights.detach().reshape(-1, *mask.shape[-2:]))


def class_indices(target) -> torch.Tensor:
    """An int, a sequence of ints or an integer tensor → a flat long tensor; anything else is refused."""
    if isinstance(target, (bool, float, str, bytes)) or (
            isinstance(target, numbers.Number) and not isinstance(target, numbers.Integral)):
        raise ConvlensError(f"target must be a class index, a sequence of indices or a score function, "
                            f"not {type(target).__name__} {target!r}")
    try:
        t = torch.as_tensor(target)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ConvlensError(f"target must be class indices, got {type(target).__name__}: {exc}") from None
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise ConvlensError(f"target class indices must be integers, got {t.dtype} "
                            "(a float target would be truncated)")
    return t.long().flatten()


@dataclass
class Attribution:
    """Maps of one method for a batch.

    ``raw``: the method's own output (layer resolution (N, h, w) for CAM methods, input
    shape (N, C, H, W) for gradient methods); ``maps``: (N, H, W) at input resolution;
    ``target``: what the maps explain; ``extras``: method-specific diagnostics (e.g. the
    completeness gap of integrated gradients).
    """

    method: str
    raw: torch.Tensor
    maps: torch.Tensor
    target: Target
    layer: str | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def targets(self) -> torch.Tensor:
        """Class index per map (CPU, (N,)); -1 where a score function was explained."""
        return self.target.labels()

    @property
    def normalized(self) -> torch.Tensor:
        """Per-sample min-max scaling to [0, 1]; a flat map becomes zeros (with a warning)."""
        return normalize_maps(self.maps)


def minmax_scale(maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample (m − min)/(max − min) of (N, …) maps; a flat (or non-finite) map becomes zeros.
    Returns (scaled maps, which were flat)."""
    flat = maps.flatten(1)
    lo, hi = flat.min(1).values, flat.max(1).values
    span = hi - lo
    is_flat = ~(span > 0) | ~torch.isfinite(span)
    scale = torch.where(is_flat, torch.zeros_like(span), 1.0 / torch.where(is_flat, torch.ones_like(span), span))
    out = (flat - lo[:, None]) * scale[:, None]
    return torch.nan_to_num(out, nan=0.0).view_as(maps), is_flat


def normalize_maps(maps: torch.Tensor) -> torch.Tensor:
    """:func:`minmax_scale` with a warning for flat maps."""
    out, is_flat = minmax_scale(maps)
    if bool(is_flat.any()):
        warnings.warn(f"{int(is_flat.sum())} flat attribution map(s): normalized to zeros", stacklevel=2)
    return out


def select_output(output: Any, selector: OutputSelector) -> torch.Tensor:
    """The score tensor out of a model output (tensor, tuple, dict…): (N, classes), or (N, C, H, W)
    for a segmentation model (explained with a score function such as :func:`region_target`)."""
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


UPSAMPLING = ("bilinear", "bicubic", "nearest", "pil-bicubic")


def upsample(maps: torch.Tensor, size: Sequence[int], mode: str = "bilinear") -> torch.Tensor:
    """(N, h, w) → (N, H, W): torch's bilinear (default), bicubic (a = −0.75, borders replicated) or
    nearest; ``"pil-bicubic"``: PIL's bicubic on float images (a = −0.5, weights renormalized at the
    borders), the upsampling of keras-vis (``scipy.misc.imresize(interp='bicubic', mode='F')``)."""
    if mode not in UPSAMPLING:
        raise ConvlensError(f"unknown upsampling {mode!r}; use {', '.join(UPSAMPLING)}")
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    if mode == "pil-bicubic":
        return pil_bicubic(maps, size)
    kwargs = {} if mode == "nearest" else {"align_corners": False}
    # the N maps as the channels of one image: as (N, 1, h, w) they count as channels-last (one channel) and
    # torch resizes them with its channels-last kernel, map by map, several times slower for small maps
    return F.interpolate(maps[None], size=tuple(size), mode=mode, **kwargs)[0]


def pil_bicubic(maps: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Each (h, w) map resized to ``size`` by PIL in mode "F" (float32), on the CPU."""
    from PIL import Image

    height, width = int(size[0]), int(size[1])
    arrays = maps.detach().float().cpu().numpy()
    out = [np.asarray(Image.fromarray(a, mode="F").resize((width, height), Image.BICUBIC)) for a in arrays]
    return torch.from_numpy(np.stack(out)).to(device=maps.device, dtype=maps.dtype)


def expected_channels(model: nn.Module) -> int | None:
    """Input channels: the model's ``input_shape`` if it declares one, else its first Conv2d's."""
    shape = getattr(model, "input_shape", None)
    if shape is not None:
        return int(shape[0])
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return first.in_channels if first is not None else None


def model_dtype(model: nn.Module) -> torch.dtype | None:
    first = next(iter(model.parameters()), None)
    return first.dtype if first is not None else None


def all_finite(x: torch.Tensor) -> bool:
    """Whether every value of ``x`` is finite, from its minimum and maximum (one pass, no mask): a NaN
    makes both NaN, an infinity makes one of them infinite."""
    if x.numel() == 0:
        return True
    lo, hi = torch.aminmax(x)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def check_input(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A non-empty, finite (N, C, H, W) batch of the model's float dtype and input channels, detached."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ConvlensError(f"inputs must be a (N, C, H, W) tensor, got shape {tuple(getattr(x, 'shape', ()))}")
    if x.shape[0] == 0:
        raise ConvlensError("inputs are an empty batch (N = 0): give at least one image")
    channels = expected_channels(model)
    if channels is not None and x.shape[1] != channels:
        raise ConvlensError(f"the model expects {channels} input channel(s), got {x.shape[1]}")
    dtype = model_dtype(model) or torch.float32
    if x.dtype != dtype:
        raise ConvlensError(f"inputs are {str(x.dtype).removeprefix('torch.')} but the model's weights are "
                            f"{str(dtype).removeprefix('torch.')}: convert the inputs (x.to({dtype}))")
    if not all_finite(x):
        raise ConvlensError(f"inputs contain {int((~torch.isfinite(x)).sum())} NaN or infinite value(s)")
    return x.detach()


SHAPE_ERRORS = re.compile(r"too small|greater than (the )?actual input size|cannot be multiplied|size mismatch|"
                          r"Padding size should be less|non-empty|must match the size|Expected size", re.I)


@contextlib.contextmanager
def input_size_errors(x: torch.Tensor) -> Iterator[None]:
    """A forward that fails on the input's size becomes one ConvlensError naming that size."""
    try:
        yield
    except RuntimeError as exc:
        if not SHAPE_ERRORS.search(str(exc)):
            raise
        first = str(exc).strip().splitlines()[0]
        raise ConvlensError(f"the model cannot run on inputs of size {x.shape[-2]}×{x.shape[-1]} "
                            f"(shape {tuple(x.shape)}): {first}") from None


class Method:
    """Base of every method: ``Method(model, layer=None, **options).attribute(inputs, target=None)``.

    Subclasses implement :meth:`compute` (checked inputs, model in eval mode); :meth:`attribute`
    checks the inputs, puts every module in eval mode and restores each module's flag afterwards.
    Gradient-based work enables gradients itself, so methods also run inside ``torch.no_grad()``.
    """

    name = "method"
    needs_layer = False         # reads a layer: --layer applies (CAM family, guided Grad-CAM)
    needs_class_target = False  # refuses a score-function target (CAM, Score-CAM)
    signed = False              # maps carry meaningful negative values
    gradient_image = False      # raw is an input-shaped gradient worth showing as an image
    fast_options: dict[str, Any] = {}  # options for a quick run (CLI explain / evaluate)

    def __init__(self, model: nn.Module, layer: str | nn.Module | None = None,
                 output_selector: OutputSelector = None, interpolation: str = "bilinear"):
        self.model = model
        self.layer = layer
        self.output_selector = output_selector
        self.interpolation = interpolation

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        with input_size_errors(x):
            return select_output(self.model(x), self.output_selector)

    def resolve_target(self, target: TargetLike, scores: torch.Tensor) -> Target:
        resolved = Target.resolve(target, scores)
        if self.needs_class_target and not resolved.is_class:
            raise ConvlensError(f"{self.name} needs class targets, not a score function")
        return resolved

    def resolve_before_copies(self, x: torch.Tensor, target: TargetLike) -> Target:
        """The target of a method that runs copies of ``x`` (noise tunnel, GradientSHAP), resolved on the
        clean batch before any copy runs. Class indices need only the class count: one image's forward;
        the prediction (None) needs the batch's scores, on which a score function is also tried, so a bad
        one fails here."""
        explicit = target is not None and not isinstance(target, Target) and (
            isinstance(target, torch.Tensor) or not callable(target))
        with torch.no_grad():
            scores = self.scores(x[:1] if explicit else x)
            if explicit:
                scores = scores.expand(len(x), *scores.shape[1:])
            resolved = self.resolve_target(target, scores)
            resolved.explained(scores)
        return resolved

    def attribute(self, inputs: torch.Tensor, target: TargetLike = None) -> Attribution:
        """Maps of ``inputs`` (N, C, H, W) for ``target`` (see the module doc)."""
        x = check_input(self.model, inputs)
        with torch.inference_mode(False), evaluating(self.model):  # gradients also under a caller's
            return self.compute(x.clone() if x.is_inference() else x, target)  # no_grad / inference_mode

    def compute(self, x: torch.Tensor, target: TargetLike) -> Attribution:  # pragma: no cover
        raise NotImplementedError

    def __call__(self, inputs: torch.Tensor, target: TargetLike = None) -> Attribution:
        return self.attribute(inputs, target)
