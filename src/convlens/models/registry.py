"""Resolve ``--model``: a built-in name, a training run or checkpoint, a Python factory, or an ONNX file.

Every loaded model comes with its :class:`~convlens.models.profile.ModelProfile`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..data.images import mnist_deprocess, mnist_preprocess
from ..errors import ConvlensError
from ..integrity import verify_checkpoint
from ..io import check_input_file, stat_input
from .efficientnet_lite import IMAGE_SIZE, efficientnet_lite0, stage_groups
from .labnet import LabNet
from .profile import EvaluationDefaults, ModelProfile, Preprocessing, profile_for, read_profile_json

CHECKPOINT_FORMAT = "convlens-checkpoint"
DEFAULT_RUN = "convlens-out/train"
IMAGENET_NAMES = ("efficientnet-lite0", "imagenet")
LAB_LAYERS = ["l1", "l2", "l3"]


@dataclass
class LoadedModel:
    """A model in eval mode with its profile (what is needed to feed it, explain it and show its inputs)."""

    model: nn.Module
    profile: ModelProfile
    meta: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.profile.name

    @property
    def class_names(self) -> list[str]:
        return self.profile.class_names

    def preprocess(self, img: Image.Image) -> torch.Tensor:
        return self.profile.preprocess(img)

    def deprocess(self, x: torch.Tensor) -> np.ndarray:
        return self.profile.deprocess(x)

    @property
    def input_range(self) -> tuple[float, float]:
        return self.profile.value_range

    @property
    def device(self) -> torch.device:
        return next((p.device for p in self.model.parameters()), torch.device("cpu"))


def imagenet_class_names() -> list[str]:
    text = (resources.files("convlens.data") / "files" / "imagenet_classes.txt").read_text("utf-8")
    return text.splitlines()


# ------------------------------------------------------------------ built-in profiles
def lab_profile(name: str) -> ModelProfile:
    """The PW-11 lab network on MNIST: 28×28 grey digits in [0, 1]."""
    return ModelProfile(name=name, class_names=[str(i) for i in range(10)], preprocess=mnist_preprocess,
                        deprocess=mnist_deprocess, input_shape=(1, 28, 28), value_range=(0.0, 1.0), image_mode="L",
                        from_unit=None, stats_layers=list(LAB_LAYERS), explain_layer=None,
                        evaluation=EvaluationDefaults(steps=28, sanity_images=16, smoothgrad_samples=16,
                                                      include_scorecam=True),
                        dataset="mnist")


LITE0_PREPROCESSING = Preprocessing(size=(IMAGE_SIZE, IMAGE_SIZE), channel_order="RGB", resize="crop",
                                    crop_fraction=0.875, interpolation="bicubic", scale=1.0, mean=(127.0,),
                                    std=(128.0,))


def lite0_profile() -> ModelProfile:
    """EfficientNet-Lite0: RGB, centre crop 0.875, bicubic 224, (x − 127)/128."""
    pre = LITE0_PREPROCESSING
    return ModelProfile(name="efficientnet-lite0", class_names=imagenet_class_names(), preprocess=pre,
                        deprocess=pre.deprocess, input_shape=(3, IMAGE_SIZE, IMAGE_SIZE),
                        value_range=pre.value_range, image_mode="RGB", from_unit=pre.from_unit,
                        stats_layers=["_blocks.4", "_blocks.10", "_head_act"], explain_layer=None,
                        evaluation=EvaluationDefaults(), randomization_groups=stage_groups)


# ------------------------------------------------------------------ checkpoints of the lab network
def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a convlens checkpoint safely (``weights_only=True``) and check its format."""
    path = check_input_file(path, "checkpoint file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConvlensError(f"{path}: no such checkpoint") from None
    except Exception as exc:  # noqa: BLE001 - pickle/zip errors of every kind
        raise ConvlensError(f"{path}: not a convlens checkpoint ({type(exc).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT or "state_dict" not in ckpt:
        raise ConvlensError(f"{path}: not a convlens checkpoint")
    verify_checkpoint(ckpt, str(path))
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


def checkpoint_path_for(spec: str) -> Path:
    path = Path(spec)
    if path.is_dir():
        path = path / "model.pt"
        if not path.is_file():
            raise ConvlensError(f"{spec}: no model.pt in this folder (train one with `convlens train --out {spec}`)")
    elif not path.exists():
        if os.path.islink(path):
            stat_input(path)  # a dangling or looping link, worded like every other input
        hint = " (train one first: `convlens train`)" if spec == DEFAULT_RUN else ""
        raise ConvlensError(f"model {spec!r}: no such run folder, checkpoint, factory or ONNX file{hint}")
    return path


# ------------------------------------------------------------------ the one entry point
def load_model(spec: str | None = None, device: str | torch.device = "cpu", weights: str | None = None,
               profile: str | os.PathLike | dict | None = None) -> LoadedModel:
    """``--model`` → :class:`LoadedModel`.

    ``spec``: ``efficientnet-lite0``; a run folder (its ``model.pt``) or convlens checkpoint; a
    factory ``path/to/file.py:name`` or ``package.module:name`` (with ``weights``: a state_dict
    ``.pt``/``.pth`` or ``.safetensors``); an ``.onnx`` file. ``profile``: a profile JSON path or dict
    (input size, preprocessing, class names, layers) for models other than the built-in ones.
    """
    from .user import is_factory_spec, load_factory, load_onnx_model

    spec = spec or DEFAULT_RUN
    spec_profile = read_profile_json(profile) if isinstance(profile, (str, os.PathLike)) else dict(profile or {})
    if spec in IMAGENET_NAMES:
        reject_extras(spec, weights, spec_profile)
        return LoadedModel(efficientnet_lite0().to(device), lite0_profile())
    if is_factory_spec(spec):
        model = load_factory(spec, weights).to(device).eval()
        return LoadedModel(model, profile_for(model, spec_profile.get("name", spec.rpartition(":")[2]), spec_profile),
                           {"source": spec, "weights": weights})
    if spec.lower().endswith(".onnx"):
        if weights:
            raise ConvlensError("--weights does not apply to an ONNX file (its weights are inside it)")
        model = load_onnx_model(spec).to(device).eval()
        return LoadedModel(model, profile_for(model, spec_profile.get("name", Path(spec).stem), spec_profile),
                           {"source": spec})
    reject_extras(spec, weights, spec_profile)
    path = checkpoint_path_for(spec)
    return loaded_from_checkpoint(load_checkpoint(path), path, device)


def loaded_from_checkpoint(ckpt: dict, path: str | os.PathLike, device: str | torch.device = "cpu") -> LoadedModel:
    """The lab network of a checkpoint read by :func:`load_checkpoint` from ``path``."""
    model = labnet_from_checkpoint(ckpt, str(path)).to(device)
    return LoadedModel(model, lab_profile(str(path)), ckpt.get("meta", {}))


def reject_extras(spec: str, weights: Any, spec_profile: dict) -> None:
    if weights:
        raise ConvlensError(f"--weights applies to a factory (file.py:name), not to {spec!r}")
    if spec_profile:
        raise ConvlensError(f"--profile applies to your own models, not to {spec!r} (it has its own profile)")
