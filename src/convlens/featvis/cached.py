"""Small helper networks trained once on the data set and cached on disk (judge, generator prior).

The cache lives in ``$CONVLENS_CACHE_DIR`` or ``$XDG_CACHE_HOME/convlens`` (``~/.cache/convlens``).
Each file is named by the network's name and a version string that changes whenever its
architecture or training recipe changes, so a stale file is never read.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..errors import ConvlensError
from ..io import save_torch

FORMAT = "convlens-helper-net"


def cache_dir() -> Path:
    explicit = os.environ.get("CONVLENS_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "convlens"


def cached_network(name: str, version: str, build: Callable[[], nn.Module],
                   fit: Callable[[nn.Module], dict], folder: str | os.PathLike | None = None) -> tuple[nn.Module, dict]:
    """``build()`` a network and load its cached weights, or ``fit`` it (returning metadata) and cache it.

    Returns the network in eval mode with frozen parameters, and the metadata of its training.
    """
    path = Path(folder or cache_dir()) / f"{name}-{version}.pt"
    net = build()
    if path.is_file():
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            if saved.get("format") == FORMAT and saved.get("version") == version:
                net.load_state_dict(saved["state_dict"])
                return freeze(net), saved["meta"]
        except Exception:  # noqa: BLE001 - a damaged cache file is simply rebuilt
            pass
    meta = fit(net)
    try:
        save_torch(path, {"format": FORMAT, "version": version, "meta": meta,
                          "state_dict": {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}})
    except (ConvlensError, OSError):  # a read-only cache: the network is still usable, only not kept
        pass
    return freeze(net), meta


def freeze(net: nn.Module) -> nn.Module:
    for p in net.parameters():
        p.requires_grad_(False)
    return net.eval()
