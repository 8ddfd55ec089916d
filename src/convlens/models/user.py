"""Your own network: a Python factory with a weights file, or an ONNX file.

A factory is ``path/to/file.py:name`` or ``package.module:name``; ``name`` is a module-level
``nn.Module`` instance, an ``nn.Module`` class, or a function returning a module, called without
arguments. **A factory file is code that runs**: load only files you trust. Weights are read with
``torch.load(..., weights_only=True)`` (``.pt``/``.pth``: a state_dict, or a dict holding one under
``state_dict`` / ``model``) or with safetensors (``.safetensors``), and loaded strictly.
"""
from __future__ import annotations

import importlib
import importlib.util
import re
import sys
from pathlib import Path

import torch
from torch import nn

from ..errors import ConvlensError

_MODULE_NAME = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")


def is_factory_spec(spec: str) -> bool:
    """``file.py:name`` or ``package.module:name`` (a Windows drive letter is not a factory)."""
    source, sep, name = spec.rpartition(":")
    if not sep or not name.isidentifier() or len(source) <= 1:
        return False
    return source.endswith(".py") or bool(_MODULE_NAME.match(source))


def _import_source(source: str):
    if source.endswith(".py"):
        path = Path(source)
        if not path.is_file():
            raise ConvlensError(f"factory file {source}: no such file")
        module_name = f"convlens_user_{abs(hash(str(path.resolve())))}"
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:  # noqa: BLE001 - the user's code may raise anything
            sys.modules.pop(module_name, None)
            raise ConvlensError(f"factory file {source} raised {type(exc).__name__}: {first_line(exc)}") from None
        return module
    try:
        return importlib.import_module(source)
    except Exception as exc:  # noqa: BLE001
        raise ConvlensError(f"cannot import {source!r} ({type(exc).__name__}: {first_line(exc)})") from None


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def load_factory(spec: str, weights: str | None = None) -> nn.Module:
    """Build the model named by ``spec`` and load ``weights`` into it (strictly)."""
    source, _, name = spec.rpartition(":")
    module = _import_source(source)
    if not hasattr(module, name):
        raise ConvlensError(f"{source} has no {name!r}")
    obj = getattr(module, name)
    if not isinstance(obj, nn.Module):
        if not callable(obj):
            raise ConvlensError(f"{spec}: {name!r} is neither an nn.Module nor a callable returning one")
        try:
            obj = obj()
        except Exception as exc:  # noqa: BLE001
            raise ConvlensError(f"{spec}: calling {name}() raised {type(exc).__name__}: {first_line(exc)}") from None
    if not isinstance(obj, nn.Module):
        raise ConvlensError(f"{spec}: {name}() returned {type(obj).__name__}, not an nn.Module")
    if weights:
        load_weights(obj, weights)
    return obj.eval()


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A state_dict from ``.pt``/``.pth`` (weights only) or ``.safetensors``."""
    p = Path(path)
    if not p.is_file():
        raise ConvlensError(f"weights {path}: no such file")
    if p.suffix.lower() == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ConvlensError("reading .safetensors needs the safetensors package (pip install safetensors)") from None
        try:
            return load_file(str(p))
        except Exception as exc:  # noqa: BLE001
            raise ConvlensError(f"weights {path}: not a readable safetensors file ({first_line(exc)})") from None
    try:
        data = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickle/zip errors of every kind
        raise ConvlensError(f"weights {path}: not a weights-only PyTorch file ({type(exc).__name__})") from None
    if isinstance(data, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(data.get(key), dict):
                data = data[key]
                break
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise ConvlensError(f"weights {path}: expected a state_dict (a dict of tensors)")
    return {k.removeprefix("module."): v for k, v in data.items()}


def load_weights(model: nn.Module, path: str) -> None:
    state = read_state_dict(path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        text = str(exc)
        missing = re.search(r"Missing key\(s\) in state_dict: ([^\n]*)", text)
        unexpected = re.search(r"Unexpected key\(s\) in state_dict: ([^\n]*)", text)
        shape = re.search(r"size mismatch for ([^:]+):", text)
        detail = (f"missing {missing.group(1)[:120]}" if missing else
                  f"unexpected {unexpected.group(1)[:120]}" if unexpected else
                  f"shape mismatch for {shape.group(1)}" if shape else first_line(exc)[:160])
        raise ConvlensError(f"weights {path} do not fit the model ({detail})") from None


def load_onnx_model(path: str) -> nn.Module:
    """An ONNX file as a torch module with named layers (see :mod:`convlens.models.onnx_import`)."""
    p = Path(path)
    if not p.is_file():
        raise ConvlensError(f"ONNX file {path}: no such file")
    try:
        from .onnx_import import load_onnx
    except ImportError as exc:
        raise ConvlensError(f"loading ONNX files needs the onnx extra (pip install 'convlens[onnx]'): {exc}") from None
    return load_onnx(p)
