"""What ``convlens explain`` explains beyond one class of a classifier.

* ``--target-region CLASS:MASK.png`` or ``CLASS:x0,y0,x1,y1``: for a segmentation model (output
  (N, C, H, W)), the class logits summed over a region of the output grid,
  y = Σ_{h,w} M[h, w] · out[n, CLASS, h, w] (:func:`convlens.attribution.region_target`). A mask image is
  read as grey, resized to the output's H×W with nearest-neighbour sampling, and nonzero pixels are the
  region; it covers the model's input as fed (after the profile's crop and resize). A box is in output
  pixels, x0 ≤ x < x1, y0 ≤ y < y1 (PIL's box convention).
* ``--tokens [--drop-tokens K] [--grid HxW]`` (or ``explain_tokens`` in the profile): the CAM family on a
  token layer (N, T, C), rearranged to (N, C, h, w) (``reshape="tokens"``).

Everything here is checked before any image is processed; a bad value is one :class:`ConvlensError` line.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .attribution import RegionTarget, region_target
from .errors import ConvlensError
from .hooks import capture, evaluating, resolve_layer
from .io import check_input_file, display
from .models.profile import TokenLayout
from .models.registry import LoadedModel

BOX = re.compile(r"^\s*(-?\d+)\s*,\s*(-?\d+)\s*,\s*(-?\d+)\s*,\s*(-?\d+)\s*$")
GRID = re.compile(r"^\s*(\d+)\s*[x×X]\s*(\d+)\s*$")


@dataclass(frozen=True)
class RegionSpec:
    """``--target-region`` as given: the class (an index or a name) and a mask file or a box."""

    cls: str
    mask: Path | None = None
    box: tuple[int, int, int, int] | None = None  # x0, y0, x1, y1 in output pixels, x1 and y1 excluded


def parse_region(text: str) -> RegionSpec:
    """'CLASS:MASK.png' or 'CLASS:x0,y0,x1,y1' → :class:`RegionSpec` (split at the first colon)."""
    cls, sep, where = text.partition(":")
    if not sep or not cls.strip() or not where.strip():
        raise ConvlensError(f"--target-region {text!r}: give CLASS:MASK.png or CLASS:x0,y0,x1,y1")
    box = BOX.match(where)
    if box:
        return RegionSpec(cls.strip(), box=tuple(int(v) for v in box.groups()))
    return RegionSpec(cls.strip(), mask=Path(where))


def parse_grid(text: str) -> tuple[int, int]:
    """'14x14' → (14, 14); both sides positive."""
    match = GRID.match(text)
    if not match or min(int(v) for v in match.groups()) <= 0:
        raise ConvlensError(f"--grid {text!r}: give the token grid as HxW, e.g. 14x14")
    return int(match.group(1)), int(match.group(2))


def class_index(text: str, class_names: list[str], option: str) -> int:
    """A class index or a class name (case-insensitive) → its index, checked against the model's classes."""
    if text.lstrip("-").isdigit():
        value = int(text)
        if not 0 <= value < len(class_names):
            raise ConvlensError(f"{option} {value}: out of range 0..{len(class_names) - 1}")
        return value
    matches = [i for i, name in enumerate(class_names) if name.lower() == text.lower()]
    if not matches:
        raise ConvlensError(f"{option} {text!r}: unknown class name or index")
    return matches[0]


def box_mask(box: tuple[int, int, int, int], grid: tuple[int, int]) -> torch.Tensor:
    """(H, W) bool mask of x0 ≤ x < x1, y0 ≤ y < y1; the box must lie inside the grid and not be empty."""
    x0, y0, x1, y1 = box
    h, w = grid
    if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
        raise ConvlensError(f"--target-region box {x0},{y0},{x1},{y1} is empty or outside the model's {h}×{w} "
                            f"output grid (0 ≤ x0 < x1 ≤ {w}, 0 ≤ y0 < y1 ≤ {h})")
    mask = torch.zeros(h, w, dtype=torch.bool)
    mask[y0:y1, x0:x1] = True
    return mask


def read_mask(path: Path, grid: tuple[int, int]) -> torch.Tensor:
    """A mask image → (H, W) bool on the output grid: grey, nearest-neighbour resize, nonzero = in."""
    from PIL import Image, UnidentifiedImageError

    try:
        check_input_file(path, "mask file")
    except ConvlensError as exc:
        raise ConvlensError(f"--target-region mask {exc}") from None
    try:
        with Image.open(path) as img:
            grey = img.convert("L").resize((grid[1], grid[0]), Image.NEAREST)
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise ConvlensError(f"--target-region mask {display(path)}: not a readable image ({exc})") from None
    return torch.frombuffer(bytearray(grey.tobytes()), dtype=torch.uint8).view(grid) > 0


def region_for(loaded: LoadedModel, spec: RegionSpec) -> RegionTarget:
    """The :class:`RegionTarget` of ``spec`` on the model's output grid."""
    grid = loaded.profile.output_grid
    if grid is None:
        raise ConvlensError("--target-region needs a segmentation model (output (N, C, H, W)); this model "
                            "returns (N, classes) scores: use --target")
    cls = class_index(spec.cls, loaded.class_names, "--target-region class")
    mask = box_mask(spec.box, grid) if spec.box is not None else read_mask(spec.mask, grid)
    if not bool(mask.any()):
        raise ConvlensError(f"--target-region: the region is empty on the model's {grid[0]}×{grid[1]} output grid")
    return region_target(cls, mask)


def token_layout(loaded: LoadedModel, layer: str | None, flags: TokenLayout | None) -> TokenLayout | None:
    """The token rearrangement for the explained layer: the command line's, else the profile's (which
    belongs to the profile's ``explain_layer`` and applies only when ``--layer`` names no other layer)."""
    if flags is not None:
        return flags
    profile = loaded.profile
    if profile.explain_tokens is not None and layer in (None, profile.explain_layer):
        return profile.explain_tokens
    return None


def check_token_layer(loaded: LoadedModel, layer: str | None, layout: TokenLayout | None) -> None:
    """Before any work: a token layout needs a named token layer (N, T, C) whose tokens fill the grid;
    a token layer read without one is refused with the flag to add. One forward of a blank input."""
    name = layer or loaded.profile.explain_layer
    if name is None:
        if layout is not None:
            raise ConvlensError("--tokens needs the token layer: name it with --layer (or explain_layer in the "
                                "profile)")
        return
    path = resolve_layer(loaded.model, name)[0]
    with torch.no_grad(), evaluating(loaded.model), capture(loaded.model, [path]) as kept:
        loaded.model(loaded.profile.example(loaded.device))
    shape = tuple(kept[path].shape)
    if layout is None:
        if len(shape) == 3:
            raise ConvlensError(f"layer {name!r} gives tokens {shape} (N, T, C): add --tokens (with --drop-tokens "
                                "K for K leading class tokens, --grid HxW unless the grid is square)")
        return
    if len(shape) != 3:
        raise ConvlensError(f"--tokens: layer {name!r} gives shape {shape}, not tokens (N, T, C)")
    kept_tokens = shape[1] - layout.drop_tokens
    h, w = layout.grid if layout.grid is not None else (round(max(kept_tokens, 0) ** 0.5),) * 2
    if kept_tokens <= 0 or h * w != kept_tokens:
        given = f"--grid {h}x{w}" if layout.grid is not None else "a square grid"
        raise ConvlensError(f"--tokens: layer {name!r} has {shape[1]} tokens, {kept_tokens} after dropping "
                            f"{layout.drop_tokens}: {given} does not hold them (set --drop-tokens / --grid)")
