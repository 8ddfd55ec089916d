"""Resolve a model name: ``efficientnet-lite0``, a training run folder, or a checkpoint file."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..data.images import imagenet_deprocess, imagenet_preprocess, mnist_deprocess, mnist_preprocess
from ..errors import ConvlensError
from .efficientnet_lite import efficientnet_lite0
from .labnet import LabNet

CHECKPOINT_FORMAT = "convlens-checkpoint"
DEFAULT_RUN = "convlens-out/train"
IMAGENET_NAMES = ("efficientnet-lite0", "imagenet")


@dataclass
class LoadedModel:
    """A model in eval mode with what is needed to feed it and show its inputs."""

    model: nn.Module
    name: str
    kind: str  # "mnist" or "imagenet"
    class_names: list[str]
    preprocess: Callable[[Image.Image], torch.Tensor]
    deprocess: Callable[[torch.Tensor], np.ndarray]
    input_range: tuple[float, float]
    meta: dict = field(default_factory=dict)


def imagenet_class_names() -> list[str]:
    text = (resources.files("convlens.data") / "files" / "imagenet_classes.txt").read_text("utf-8")
    return text.splitlines()


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a convlens checkpoint safely (``weights_only=True``) and check its format."""
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConvlensError(f"{path}: no such checkpoint") from None
    except Exception as exc:  # noqa: BLE001 - pickle/zip errors of every kind
        raise ConvlensError(f"{path}: not a convlens checkpoint ({type(exc).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT or "state_dict" not in ckpt:
        raise ConvlensError(f"{path}: not a convlens checkpoint")
    return ckpt


def labnet_from_checkpoint(ckpt: dict, source: str) -> LabNet:
    if ckpt.get("arch") != "labnet":
        raise ConvlensError(f"{source}: checkpoint of architecture {ckpt.get('arch')!r}, expected 'labnet'")
    model = LabNet()
    try:
        model.load_state_dict(ckpt["state_dict"], strict=True)
    except (RuntimeError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise ConvlensError(f"{source}: weights do not fit the lab network ({first})") from None
    return model.eval()


def mnist_loaded(model: LabNet, name: str, meta: dict | None = None) -> LoadedModel:
    return LoadedModel(model=model, name=name, kind="mnist", class_names=[str(i) for i in range(10)],
                       preprocess=mnist_preprocess, deprocess=mnist_deprocess, input_range=(0.0, 1.0),
                       meta=meta or {})


def checkpoint_path_for(spec: str) -> Path:
    path = Path(spec)
    if path.is_dir():
        path = path / "model.pt"
        if not path.is_file():
            raise ConvlensError(f"{spec}: no model.pt in this folder (train one with `convlens train --out {spec}`)")
    elif not path.exists():
        hint = " (train one first: `convlens train`)" if spec == DEFAULT_RUN else ""
        raise ConvlensError(f"model {spec!r}: no such run folder or checkpoint{hint}")
    return path


def load_model(spec: str | None = None, device: str | torch.device = "cpu") -> LoadedModel:
    """``efficientnet-lite0``, a run folder (its ``model.pt``) or a checkpoint path → LoadedModel."""
    spec = spec or DEFAULT_RUN
    if spec in IMAGENET_NAMES:
        model = efficientnet_lite0().to(device)
        return LoadedModel(model=model, name="efficientnet-lite0", kind="imagenet",
                           class_names=imagenet_class_names(), preprocess=imagenet_preprocess,
                           deprocess=imagenet_deprocess, input_range=(-127.0 / 128.0, 1.0))
    path = checkpoint_path_for(spec)
    ckpt = load_checkpoint(path)
    model = labnet_from_checkpoint(ckpt, str(path)).to(device)
    return mnist_loaded(model, str(path), ckpt.get("meta", {}))
