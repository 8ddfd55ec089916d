"""Cached pipeline stages: a stage's folder holds ``stage.json`` with the key it was computed for."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable

from torch import nn

from .. import distributed
from ..errors import ConvlensError
from ..integrity import tensor_digest
from ..io import check_input_file, check_output_file, ensure_dir, rollback_on_error, write_json


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


def run_stage(out: Path, name: str, key: dict, work: Callable[[Path], dict | None], timings: dict,
              sharded: bool = True) -> dict | None:
    """Run ``work(folder)`` unless ``out/name`` already holds a result for the same key (a damaged
    marker is computed again). The stage's files appear with its marker or not at all: when ``work``
    fails, what it wrote is removed (checkpoints written ``unrecorded`` stay for the next run).

    Under torchrun rank 0 alone reads and writes the folder: it tells the other ranks whether the stage
    is cached; a ``sharded`` stage's work then runs on every rank (it returns its result on rank 0 and
    None elsewhere), an unsharded one on rank 0 alone. The other ranks return None.
    """
    writer = distributed.is_writer()
    cached = read_marker(ensure_dir(out / name) / "stage.json") if writer else None
    hit = cached is not None and cached["key"] == key
    if sharded:
        hit = distributed.broadcast_object(hit, f"rank 0 to look up the cached {name} stage")
    if not writer:
        if sharded and not hit:
            work(out / name)
        return None
    if hit:
        timings[name] = {"seconds": 0.0, "cached": True, "original_seconds": cached.get("seconds")}
        return cached["result"]
    start = time.perf_counter()
    with rollback_on_error():
        result = work(out / name)
    seconds = time.perf_counter() - start
    write_json(out / name / "stage.json", {"key": key, "seconds": seconds, "result": result})
    timings[name] = {"seconds": seconds, "cached": False}
    return result


def model_digest(model: nn.Module) -> str:
    """SHA-256 (16 hex digits) of the model's state (see :func:`convlens.integrity.tensor_digest`)."""
    return tensor_digest(model.state_dict())[:16]
