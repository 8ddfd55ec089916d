"""The lab pipeline: stages run in order, each cached in its own folder of the output directory.

A stage is reused when its folder holds ``stage.json`` with the same key (stage options and the
SHA-256 of the trained model); an interrupted run starts again where it stopped.
"""
from __future__ import annotations

import hashlib
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .. import __version__, distributed
from ..errors import ConvlensError
from ..io import ensure_dir, read_json
from . import stages

LAB_EXPLAIN_METHODS = ["gradcam", "guided-gradcam", "kerasvis-guided-gradcam", "gradcam++", "layercam",
                       "xgradcam", "saliency", "guided-backprop"]


@dataclass
class LabOptions:
    out: Path
    retrain: bool = False
    fast: bool = False
    seed: int = 0
    progress: bool = True


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def run_stage(opts: LabOptions, name: str, key: dict, work: Callable[[Path], dict | None], timings: dict,
              sharded: bool = True) -> dict | None:
    """A cached stage of the lab (see :func:`convlens.report.stages.run_stage`)."""
    return stages.run_stage(opts.out, name, key, work, timings, sharded)


def lab_model(opts: LabOptions):
    """The trained lab network of ``OUT/train``. Under torchrun rank 0 reads it and the other ranks
    receive its checkpoint (so they wait here for rank 0's training and need no shared folder)."""
    from ..models.registry import load_checkpoint, loaded_from_checkpoint

    path = opts.out / "train" / "model.pt"
    ckpt = load_checkpoint(path) if distributed.is_writer() else None
    return loaded_from_checkpoint(distributed.broadcast_object(ckpt, "rank 0's trained lab network"), path)


def stage_train(opts: LabOptions, timings: dict) -> tuple[dict | None, str | None]:
    """Training, on rank 0 alone (the other ranks get (None, None))."""
    from ..training import ResumeMismatch, make_recipe, train

    if not distributed.is_writer():
        return None, None
    folder = opts.out / "train"
    model_path = folder / "model.pt"
    key = {"seed": opts.seed, "fast": opts.fast}
    if opts.retrain and (folder / "stage.json").exists():
        (folder / "stage.json").unlink()
    if opts.retrain and (folder / "checkpoint.pt").exists():
        (folder / "checkpoint.pt").unlink()

    def work(dest: Path) -> dict:
        recipe = make_recipe("best", epochs=2 if opts.fast else None)
        try:
            return train(dest, recipe, seed=opts.seed, resume=True, progress=opts.progress,
                         subset=4000 if opts.fast else None)
        except ResumeMismatch:
            raise ConvlensError(f"{dest / 'checkpoint.pt'}: an unfinished training with another seed or "
                                "--fast setting; run again with --retrain") from None

    metrics = run_stage(opts, "train", key, work, timings, sharded=False)
    if not model_path.exists():
        raise ConvlensError(f"{model_path} is missing; run again with --retrain")
    return metrics, file_digest(model_path)


def stage_exercise1(opts: LabOptions, model_key: str, timings: dict) -> dict:
    from ..analysis import featuremaps, statistics
    from ..models import summary_rows

    loaded = lab_model(opts)
    key = {"model": model_key, "fast": opts.fast}
    fm = run_stage(opts, "featuremaps", key, lambda d: featuremaps(loaded, d, digit=7), timings, sharded=False)
    st = run_stage(opts, "stats", key, lambda d: statistics(loaded, d, limit=1000 if opts.fast else None,
                                                             progress=opts.progress), timings)
    return {"summary_rows": summary_rows(loaded.model), "featuremaps": fm, "stats": st}


def stage_exercise2(opts: LabOptions, model_key: str, timings: dict) -> dict:
    from ..featvis.judge import JUDGE_VERSION
    from ..featvis.run import PAIR_METHOD, actmax
    from ..models import load_model

    steps = 30 if opts.fast else 200
    # the judge's version and the pair method in the key: a lab folder made before them is redone
    return run_stage(opts, "actmax", {"model": model_key, "steps": steps, "seed": opts.seed, "judge": JUDGE_VERSION,
                                      "pairs": PAIR_METHOD},
                     lambda d: actmax(load_model(str(opts.out / "train")), d, steps=steps, seed=opts.seed,
                                      progress=opts.progress), timings, sharded=False)


SPILL_CENTRE = 2 / 3  # side of the central box, as a fraction of the image side (44 % of the area)


def spill_fraction(maps: np.ndarray, centre: float = SPILL_CENTRE) -> float:
    """Share of a normalized map's mass outside the central box covering ``centre`` of each side."""
    h, w = maps.shape
    top, left = int(h * (1 - centre) / 2), int(w * (1 - centre) / 2)
    total = float(maps.sum())
    inside = float(maps[top:h - top, left:w - left].sum())
    return 0.0 if total <= 0 else 1.0 - inside / total


def stage_exercise3(opts: LabOptions, timings: dict) -> dict:
    from ..data.images import sample_photo_paths
    from ..explain import explain
    from ..models import load_model

    photos = sample_photo_paths()[2:3] if opts.fast else sample_photo_paths()

    def work(folder: Path) -> dict:
        loaded = load_model("efficientnet-lite0")
        summary = explain(loaded, photos, folder, LAB_EXPLAIN_METHODS, progress=opts.progress,
                          overlays=["gradcam", "guided-gradcam"])
        if summary is None:  # not the writing rank of a distributed run
            return None
        spill = {}
        data = np.load(folder / summary["maps"])
        for row, cam in zip(summary["predictions"], data["gradcam_map"]):
            span = cam.max() - cam.min()
            spill[row["image"]] = spill_fraction((cam - cam.min()) / span if span > 0 else np.zeros_like(cam))
        summary["spill_outside_centre"] = spill
        return summary

    return run_stage(opts, "explain", {"photos": [p.name for p in photos], "methods": LAB_EXPLAIN_METHODS,
                                       "spill_centre": SPILL_CENTRE},
                     work, timings)


def stage_faithfulness(opts: LabOptions, model_key: str, timings: dict) -> dict:
    from ..evaluation.run import evaluate

    loaded = lab_model(opts)
    n, sanity_n = (20, 3) if opts.fast else (100, 8)
    return run_stage(opts, "evaluate", {"model": model_key, "n": n, "sanity": sanity_n, "seed": opts.seed},
                     lambda d: evaluate(loaded, d, mnist_test=n, sanity_images=sanity_n,
                                        data_randomization=not opts.fast, seed=opts.seed, progress=opts.progress),
                     timings)


def run_record(opts: LabOptions, timings: dict) -> dict:
    import matplotlib
    return {"convlens": __version__, "torch": str(torch.__version__), "numpy": np.__version__,
            "matplotlib": matplotlib.__version__, "python": platform.python_version(),
            "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs",
            "threads": torch.get_num_threads(), "seed": opts.seed, "fast": opts.fast, "timings": timings,
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def run_lab(opts: LabOptions) -> Path | None:
    """All stages, then ``index.html`` and ``summary.json``; returns the report's path.

    Under torchrun rank 0 trains while the other ranks wait (:func:`lab_model`); the statistics, the
    explanations and the faithfulness evaluation are split across the ranks; feature maps, activation
    maximization and the page are rank 0's. Rank 0 alone writes; the other ranks return None."""
    from ..progress import progress
    from .html import render_report

    writer = distributed.is_writer()
    opts.out = ensure_dir(opts.out) if writer else Path(opts.out)
    timings: dict = {}
    start = time.perf_counter()
    bar = progress(desc="lab", total=6, unit="stage", enabled=opts.progress and writer, per_item=True)

    def step(label: str):
        bar.set_description(f"lab: {label}")

    step("training")
    metrics, model_key = stage_train(opts, timings)
    bar.update()
    step("feature maps and filter statistics")
    ex1 = stage_exercise1(opts, model_key, timings)
    bar.update()
    step("activation maximization")
    ex2 = stage_exercise2(opts, model_key, timings)
    bar.update()
    step("class activation maps (EfficientNet-Lite0)")
    ex3 = stage_exercise3(opts, timings)
    bar.update()
    step("faithfulness")
    faith = stage_faithfulness(opts, model_key, timings)
    bar.update()
    if not writer:
        bar.close()
        return None
    step("report")
    history = read_json(opts.out / "train" / "history.json")
    timings["total"] = {"seconds": time.perf_counter() - start}
    record = run_record(opts, timings)
    path = render_report(opts.out, metrics, history, ex1, ex2, ex3, faith, record)
    bar.update()
    bar.close()
    return path
