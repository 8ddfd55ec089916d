"""Cached pipeline stages: a stage's folder holds ``stage.json`` with the key it was computed for."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable

from torch import nn

from ..errors import ConvlensError
from ..integrity import tensor_digest
from ..io import check_input_file, check_output_file, ensure_dir, write_json


def read_marker(marker: Path) -> dict | None:
    """A stage's ``stage.json`` when it is intact ({"key", "result"}); None when missing or damaged
    (the stage then runs again and rewrites it). A folder or special file in its place is an error."""
    if not os.path.lexists(marker):
        return None
    check_output_file(marker)
    try:
        check_input_file(marker, "stage marker")
        cached = json.loads(marker.read_text("utf-8"))
    except (OSError, ValueError, ConvlensError):
        return None
    if not isinstance(cached, dict) or "key" not in cached or "result" not in cached:
        return None
    return cached


def run_stage(out: Path, name: str, key: dict, work: Callable[[Path], dict], timings: dict) -> dict:
    """Run ``work(folder)`` unless ``out/name`` already holds a result for the same key (a damaged
    marker is computed again)."""
    folder = ensure_dir(out / name)
    marker = folder / "stage.json"
    cached = read_marker(marker)
    if cached is not None and cached["key"] == key:
        timings[name] = {"seconds": 0.0, "cached": True, "original_seconds": cached.get("seconds")}
        return cached["result"]
    start = time.perf_counter()
    result = work(folder)
    seconds = time.perf_counter() - start
    write_json(marker, {"key": key, "seconds": seconds, "result": result})
    timings[name] = {"seconds": seconds, "cached": False}
    return result


def model_digest(model: nn.Module) -> str:
    """SHA-256 (16 hex digits) of the model's state (see :func:`convlens.integrity.tensor_digest`)."""
    return tensor_digest(model.state_dict())[:16]
