"""What the pipelines need to know about a model, in one object: the model profile.

A :class:`ModelProfile` holds the input spec (channels, size, value range, image mode), the
preprocessing and its inverse, the class names, the layers for statistics and explanations,
evaluation defaults and the blocks for cascading randomization. The lab network and
EfficientNet-Lite0 are two profiles; any other CNN gets one from ``--profile FILE.json``
or from defaults inferred from the model. No pipeline branches on a model's name.

Profile JSON (every key optional)::

    {"input_size": 224 | [H, W], "channel_order": "RGB" | "BGR" | "L",
     "resize": "crop" | "stretch" | "shorter", "crop_fraction": 0.875,
     "interpolation": "bilinear" | "bicubic" | "nearest",
     "scale": 0.00392156862745098, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
     "class_names": "names.txt" | ["cat", "dog"], "stats_layers": ["layer1", "layer2"],
     "explain_layer": "layer4", "explain_tokens": {"drop_tokens": 1, "grid": [14, 14]}, "name": "my-resnet"}

``explain_tokens`` (``true`` or an object): the explain layer is a token layer (N, T, C); CAM methods read it
as a grid after dropping ``drop_tokens`` leading tokens (default 0), ``grid`` [h, w] unless it is square.
A segmentation model (output (N, C, H, W)) gets ``output_grid`` = (H, W); its C channels are the classes.
A pixel p ∈ [0, 255] becomes ``(p · scale − mean) / std`` per channel.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..errors import ConvlensError

INTERPOLATIONS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}
PROFILE_KEYS = {"input_size", "channel_order", "resize", "crop_fraction", "interpolation", "scale", "mean", "std",
                "class_names", "stats_layers", "explain_layer", "explain_tokens", "name"}


@dataclass(frozen=True)
class Preprocessing:
    """PIL image → model input tensor (C, H, W), and the inverse for display."""

    size: tuple[int, int] = (224, 224)
    channel_order: str = "RGB"
    resize: str = "crop"
    crop_fraction: float = 0.875
    interpolation: str = "bilinear"
    scale: float = 1.0 / 255.0
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)

    def __post_init__(self):
        if self.channel_order not in ("RGB", "BGR", "L"):
            raise ConvlensError(f"channel_order must be RGB, BGR or L, got {self.channel_order!r}")
        if self.resize not in ("crop", "stretch", "shorter"):
            raise ConvlensError(f"resize must be crop, stretch or shorter, got {self.resize!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ConvlensError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {self.interpolation!r}")
        if not 0 < self.crop_fraction <= 1:
            raise ConvlensError(f"crop_fraction must be in (0, 1], got {self.crop_fraction}")
        if min(self.size) <= 0:
            raise ConvlensError(f"input_size must be positive, got {list(self.size)}")
        if any(s == 0 or not math.isfinite(s) for s in self.std) or not math.isfinite(self.scale) or self.scale <= 0:
            raise ConvlensError("std must be non-zero and scale positive")
        for key in ("mean", "std"):
            if len(getattr(self, key)) not in (1, self.channels):
                raise ConvlensError(f"{key} has {len(getattr(self, key))} values for {self.channels} channel(s)")

    @property
    def channels(self) -> int:
        return 1 if self.channel_order == "L" else 3

    @property
    def image_mode(self) -> str:
        return "L" if self.channel_order == "L" else "RGB"

    def _vectors(self) -> tuple[np.ndarray, np.ndarray]:
        mean = np.array(np.broadcast_to(np.asarray(self.mean, np.float32), (self.channels,)))
        std = np.array(np.broadcast_to(np.asarray(self.std, np.float32), (self.channels,)))
        return mean, std

    @property
    def value_range(self) -> tuple[float, float]:
        """Lowest and highest value an input channel can take (black and white pixels)."""
        mean, std = self._vectors()
        ends = np.stack([(0.0 * self.scale - mean) / std, (255.0 * self.scale - mean) / std])
        return float(ends.min()), float(ends.max())

    def resized(self, img: Image.Image) -> Image.Image:
        h, w = self.size
        resample = INTERPOLATIONS[self.interpolation]
        if self.resize == "stretch":
            return img.resize((w, h), resample)
        if self.resize == "shorter":
            factor = max(h / img.size[1], w / img.size[0])
            img = img.resize((max(w, round(img.size[0] * factor)), max(h, round(img.size[1] * factor))), resample)
            left, top = (img.size[0] - w) // 2, (img.size[1] - h) // 2
            return img.crop((left, top, left + w, top + h))
        side = max(1, int(round(min(img.size) * self.crop_fraction)))
        left, top = (img.size[0] - side) // 2, (img.size[1] - side) // 2
        return img.crop((left, top, left + side, top + side)).resize((w, h), resample)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        from ..data.images import to_mode

        arr = np.asarray(self.resized(to_mode(img, self.image_mode)), dtype=np.float32)
        if arr.ndim == 2:
            arr = arr[:, :, None]
        if self.channel_order == "BGR":
            arr = arr[:, :, ::-1]
        mean, std = self._vectors()
        arr = (arr * np.float32(self.scale) - mean) / std if self.scale != 1.0 else (arr - mean) / std
        return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).permute(2, 0, 1).contiguous()

    def deprocess(self, x: torch.Tensor) -> np.ndarray:
        """Model input (C, H, W) → (H, W, 3) RGB or (H, W) grey floats in [0, 1] for display."""
        mean, std = self._vectors()
        arr = x.detach().cpu().float().permute(1, 2, 0).numpy() * std + mean
        arr = arr / self.scale / 255.0
        if self.channel_order == "BGR":
            arr = arr[:, :, ::-1]
        arr = np.clip(arr, 0.0, 1.0)
        return arr[:, :, 0] if self.channel_order == "L" else np.ascontiguousarray(arr)

    def from_unit(self, rgb01: torch.Tensor) -> torch.Tensor:
        """A [0, 1] image batch (N, C, H, W) in display channel order → model input (activation maximization)."""
        mean, std = (torch.as_tensor(v, dtype=rgb01.dtype, device=rgb01.device).view(1, -1, 1, 1)
                     for v in self._vectors())
        x = rgb01.flip(1) if self.channel_order == "BGR" else rgb01
        return (x * 255.0 * self.scale - mean) / std


@dataclass(frozen=True)
class TokenLayout:
    """How a token layer (N, T, C) becomes a grid for the CAM family: the first ``drop_tokens`` tokens
    dropped, the rest in an (h, w) ``grid`` (square when None)."""

    drop_tokens: int = 0
    grid: tuple[int, int] | None = None

    def __post_init__(self):
        if isinstance(self.drop_tokens, bool) or not isinstance(self.drop_tokens, int) or self.drop_tokens < 0:
            raise ConvlensError(f"drop_tokens must be a non-negative integer, got {self.drop_tokens!r}")
        if self.grid is not None and (len(self.grid) != 2 or not all(
                isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in self.grid)):
            raise ConvlensError(f"the token grid must be two positive integers [h, w], got {self.grid!r}")

    def options(self) -> dict[str, Any]:
        """The method options that read the layer this way."""
        return {"reshape": "tokens", "drop_tokens": self.drop_tokens, "grid": self.grid}


def token_layout_from(value: Any) -> TokenLayout | None:
    """A profile's ``explain_tokens``: false/absent → None, true → square grid, {"drop_tokens", "grid"}."""
    if value is None or value is False:
        return None
    if value is True:
        return TokenLayout()
    if not isinstance(value, dict) or set(value) - {"drop_tokens", "grid"}:
        raise ConvlensError(f"profile: 'explain_tokens' must be true or an object with drop_tokens and grid, "
                            f"got {value!r}")
    grid = value.get("grid")
    if grid is not None and not isinstance(grid, list):
        raise ConvlensError(f"profile: 'explain_tokens' grid must be [h, w], got {grid!r}")
    return TokenLayout(value.get("drop_tokens", 0), tuple(grid) if grid is not None else None)


@dataclass(frozen=True)
class EvaluationDefaults:
    """Defaults of ``convlens evaluate`` for a model (small inputs afford more work per image)."""

    steps: int = 16
    sanity_images: int = 2
    smoothgrad_samples: int = 8
    include_scorecam: bool = False


@dataclass
class ModelProfile:
    """Everything the pipelines need to feed, explain and show one model."""

    name: str
    class_names: list[str]
    preprocess: Callable[[Image.Image], torch.Tensor]
    deprocess: Callable[[torch.Tensor], np.ndarray]
    input_shape: tuple[int, int, int]
    value_range: tuple[float, float]
    image_mode: str = "RGB"
    from_unit: Callable[[torch.Tensor], torch.Tensor] | None = None
    stats_layers: list[str] | None = None
    explain_layer: str | None = None
    explain_tokens: TokenLayout | None = None  # the explain layer is a token layer read this way
    output_grid: tuple[int, int] | None = None  # (H, W) of a segmentation output (N, C, H, W); None: (N, classes)
    evaluation: EvaluationDefaults = field(default_factory=EvaluationDefaults)
    randomization_groups: Callable[[nn.Module], list] | None = None
    dataset: str | None = None  # "mnist": the shipped MNIST is this model's data

    @property
    def channels(self) -> int:
        return self.input_shape[0]

    @property
    def size(self) -> tuple[int, int]:
        return self.input_shape[1], self.input_shape[2]

    def example(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """A zero input batch of one, for shape probes."""
        return torch.zeros(1, *self.input_shape, device=device)


# ------------------------------------------------------------------ inference for user models
def first_conv(model: nn.Module) -> nn.Conv2d | None:
    return next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)


def conv_layers(model: nn.Module) -> list[str]:
    """Paths of the model's Conv2d modules, in definition order."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]


SKIPPED_FOR_STATS = (nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
                     nn.AdaptiveMaxPool2d, nn.Dropout, nn.Dropout2d, nn.Identity)


def onnx_helper_types() -> tuple[type, ...]:
    """Element-wise helper nodes of converted ONNX graphs (normalization, padding): not feature layers."""
    try:
        from .onnx_ops import OnnxFunction
    except ImportError:
        return ()
    return (OnnxFunction,)


def block_paths(model: nn.Module) -> set[str]:
    """The model's blocks: its children, with long containers (trunks of more than 4 modules) expanded."""
    paths = set()
    for name, child in model.named_children():
        if isinstance(child, (nn.Sequential, nn.ModuleList)) and len(child) > 4:
            paths.update(f"{name}.{sub}" for sub, _ in child.named_children())
        else:
            paths.add(name)
    return paths


def default_stats_layers(model: nn.Module, example: torch.Tensor, count: int = 3) -> list[str]:
    """Up to ``count`` block outputs spread over the depth (post-activation: convolutions, norms,
    pooling and dropout are skipped when other blocks exist), in execution order."""
    from ..hooks import spatial_layers

    skipped = SKIPPED_FOR_STATS + onnx_helper_types()
    blocks = block_paths(model)
    layers = list(dict.fromkeys(p for p, _, _ in spatial_layers(model, example) if p in blocks))
    kinds = dict(model.named_modules())
    pool = [p for p in layers if not isinstance(kinds[p], skipped)] or layers
    if not pool:
        raise ConvlensError("the model has no layer with a spatial (N, C, H, W) output")
    if len(pool) <= count:
        return pool
    return list(dict.fromkeys(pool[round((i + 1) * len(pool) / count) - 1] for i in range(count)))


def output_classes(model: nn.Module, example: torch.Tensor) -> tuple[int, tuple[int, int] | None]:
    """(number of classes, output grid) from one forward of ``example``: (K, None) for (N, K) scores,
    (C, (H, W)) for a segmentation output (N, C, H, W)."""
    from ..attribution.base import select_output

    with torch.no_grad():
        out = select_output(model(example), None)
    if out.dim() == 4:
        return int(out.shape[1]), (int(out.shape[2]), int(out.shape[3]))
    if out.dim() != 2:
        raise ConvlensError(f"the model returns shape {tuple(out.shape)}: convlens needs (N, classes) scores "
                            "or a segmentation output (N, C, H, W)")
    return int(out.shape[1]), None


def read_class_names(spec: str | Sequence[str], base: Path | None = None) -> list[str]:
    if isinstance(spec, (list, tuple)):
        if not all(isinstance(s, str) for s in spec):
            raise ConvlensError("class_names must be a list of strings or a file")
        return list(spec)
    path = Path(spec)
    if base is not None and not path.is_absolute():
        path = base / path
    if not path.is_file():
        raise ConvlensError(f"class names file {path}: no such file")
    try:
        names = [line.strip() for line in path.read_text("utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise ConvlensError(f"class names file {path}: cannot read it ({exc})") from None
    if not names:
        raise ConvlensError(f"class names file {path} is empty")
    return names


def read_profile_json(path: str | Path) -> dict[str, Any]:
    """A profile file's keys, checked for unknown keys and types."""
    path = Path(path)
    if not path.is_file():
        raise ConvlensError(f"profile {path}: no such file")
    try:
        data = json.loads(path.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConvlensError(f"profile {path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ConvlensError(f"profile {path}: expected a JSON object")
    unknown = sorted(set(data) - PROFILE_KEYS)
    if unknown:
        raise ConvlensError(f"profile {path}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(PROFILE_KEYS))}")
    checks = {"input_size": (int, list), "channel_order": str, "resize": str, "crop_fraction": (int, float),
              "interpolation": str, "scale": (int, float), "mean": (int, float, list), "std": (int, float, list),
              "class_names": (str, list), "stats_layers": list, "explain_layer": str, "explain_tokens": (bool, dict),
              "name": str}
    for key, types in checks.items():
        if key in data and (not isinstance(data[key], types) or (isinstance(data[key], bool) and types != (bool, dict))):
            raise ConvlensError(f"profile {path}: {key!r} has the wrong type ({type(data[key]).__name__})")
    data["_base"] = path.parent
    return data


def _floats(value, key: str) -> tuple[float, ...]:
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise ConvlensError(f"profile: {key!r} must be a number or a list of numbers")
    return tuple(float(v) for v in values)


def _size(value, default: tuple[int, int]) -> tuple[int, int]:
    if value is None:
        return default
    values = value if isinstance(value, list) else [value, value]
    if len(values) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
        raise ConvlensError(f"profile: 'input_size' must be a positive integer or [H, W], got {value!r}")
    return int(values[0]), int(values[1])


def preprocessing_for(model: nn.Module, spec: dict[str, Any]) -> Preprocessing:
    """The profile's preprocessing; missing keys are inferred: channels from the first convolution,
    size from the model's ``input_shape`` (else 224, or 28 for one channel), ImageNet mean/std for
    three channels, [0, 1] for one."""
    declared = getattr(model, "input_shape", None)
    conv = first_conv(model)
    channels = int(declared[0]) if declared is not None else (conv.in_channels if conv is not None else 3)
    order = spec.get("channel_order", "L" if channels == 1 else "RGB")
    default_size = tuple(int(v) for v in declared[1:]) if declared is not None else ((28, 28) if channels == 1 else (224, 224))
    rgb = order != "L"
    return Preprocessing(
        size=_size(spec.get("input_size"), default_size), channel_order=order,
        resize=spec.get("resize", "crop" if rgb else "stretch"),
        crop_fraction=float(spec.get("crop_fraction", 0.875 if rgb else 1.0)),
        interpolation=spec.get("interpolation", "bilinear"),
        scale=float(spec.get("scale", 1.0 / 255.0)),
        mean=_floats(spec.get("mean", [0.485, 0.456, 0.406] if rgb and "scale" not in spec else 0.0), "mean"),
        std=_floats(spec.get("std", [0.229, 0.224, 0.225] if rgb and "scale" not in spec else 1.0), "std"))


def profile_for(model: nn.Module, name: str, spec: dict[str, Any] | None = None) -> ModelProfile:
    """A profile for any CNN: from a profile file's keys (``spec``) and what the model shows."""
    spec = dict(spec or {})
    pre = preprocessing_for(model, spec)
    if pre.channels != (getattr(first_conv(model), "in_channels", pre.channels)):
        raise ConvlensError(f"profile: channel_order {pre.channel_order} gives {pre.channels} channel(s), "
                            f"the model's first convolution takes {first_conv(model).in_channels}")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    example = torch.zeros(1, pre.channels, *pre.size, device=device)
    try:
        classes, grid = output_classes(model, example)
    except ConvlensError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure of a user model's forward
        raise ConvlensError(f"model {name}: a forward pass on a {pre.channels}×{pre.size[0]}×{pre.size[1]} input "
                            f"failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                            "give the input size in --profile") from None
    names = read_class_names(spec["class_names"], spec.get("_base")) if "class_names" in spec else \
        [str(i) for i in range(classes)]
    if len(names) != classes:
        raise ConvlensError(f"{len(names)} class names for a model with {classes} outputs")
    from ..hooks import resolve_layer
    for layer in list(spec.get("stats_layers", [])) + ([spec["explain_layer"]] if "explain_layer" in spec else []):
        resolve_layer(model, layer)
    tokens = token_layout_from(spec.get("explain_tokens"))
    if tokens is not None and "explain_layer" not in spec:
        raise ConvlensError("profile: 'explain_tokens' needs 'explain_layer' (the token layer)")
    return ModelProfile(name=spec.get("name", name), class_names=names, preprocess=pre, deprocess=pre.deprocess,
                        input_shape=(pre.channels, *pre.size), value_range=pre.value_range,
                        image_mode=pre.image_mode, from_unit=pre.from_unit,
                        stats_layers=spec.get("stats_layers") or default_stats_layers(model, example),
                        explain_layer=spec.get("explain_layer"), explain_tokens=tokens, output_grid=grid,
                        evaluation=small_input_defaults(pre.size))


def small_input_defaults(size: tuple[int, int]) -> EvaluationDefaults:
    """Small inputs (≤ 64 px) afford more perturbation steps, sanity images and Score-CAM."""
    if max(size) <= 64:
        return EvaluationDefaults(steps=28, sanity_images=16, smoothgrad_samples=16, include_scorecam=True)
    return EvaluationDefaults()
