"""`convlens predict` and `convlens explain`: images in, predictions and maps out.

A file that cannot be read is reported (one line) and skipped; the other files still run.
"""
from __future__ import annotations

import inspect
import json
import re
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .attribution import METHODS, RegionTarget, make_method, method_info, uses_layer
from .batching import (MAX_BATCH, BatchPlan, SkipReporter, SliceReporter, activation_bytes, available_bytes,
                       iter_image_batches, plan_batch_size)
from .data.images import expand_image_paths, package_photos_dir
from .errors import ConvlensError
from .attribution.base import select_output
from .explain_targets import check_token_layer, class_index, parse_region, region_for, token_layout
from .hooks import evaluating, resolve_layer
from .io import NpzStream, check_out_not_input, display, distinct_stems, ensure_dir, write_json
from .models.profile import TokenLayout
from .models.registry import LoadedModel
from .progress import progress as progress_of

# Score-CAM is left out of the default set: ~15 s per photo on EfficientNet-Lite0 on 2 cores.
DEFAULT_METHODS = ["gradcam", "guided-gradcam", "gradcam++", "layercam", "xgradcam", "saliency",
                   "guided-backprop", "integrated-gradients"]


@dataclass
class Batch:
    paths: list[Path]
    x: torch.Tensor
    failures: list[str]


def image_mode(loaded: LoadedModel) -> str:
    return loaded.profile.image_mode


def load_batch(items, loaded: LoadedModel) -> Batch:
    """Preprocess every readable image into one tensor; unreadable ones are listed in ``failures``."""
    paths = expand_image_paths(items)
    reporter = SkipReporter()
    batches = list(iter_image_batches(paths, image_mode(loaded), loaded.preprocess, len(paths), reporter))
    indices, x = batches[0]
    return Batch([paths[i] for i in indices], x, reporter.failures)


def predict_files(loaded: LoadedModel, items, top: int, batch_size: int = MAX_BATCH,
                  reporter: SkipReporter | None = None) -> tuple[list[dict], list[str]]:
    """Prediction rows of every readable image, read ``batch_size`` at a time; and the failures."""
    paths = expand_image_paths(items)
    names = display_names(paths)
    reporter = reporter or SkipReporter()
    rows = []
    for indices, x in iter_image_batches(paths, image_mode(loaded), loaded.preprocess, batch_size, reporter):
        batch_rows = prediction_rows(loaded, [paths[i] for i in indices], predict(loaded, x), top)
        for row, i in zip(batch_rows, indices):
            row["image"] = names[i]
        rows += batch_rows
    return rows, reporter.failures


def sharded_predictions(loaded: LoadedModel, items, top: int) -> tuple[list[dict], list[str]] | None:
    """:func:`predict_files` under torchrun: each rank predicts its block of the files and rank 0 gets
    every row and failure in order (the other ranks get None). One process: the same as predict_files."""
    from . import distributed

    if not distributed.active():
        return predict_files(loaded, items, top)
    paths = expand_image_paths(items)
    block = distributed.shard(len(paths))
    rows, failures = predict_files(loaded, paths[block.start:block.stop], top, reporter=SliceReporter()) \
        if len(block) else ([], [])
    rows, failures = (distributed.gather_ordered(block.start, part) for part in (rows, failures))
    if not distributed.is_writer():
        return None
    if not rows:
        raise ConvlensError("none of the given images could be read")
    return rows, failures


def display_names(paths: list[Path]) -> list[str]:
    """File names as printable text; the whole given path where two inputs share a name."""
    names = [display(p.name) for p in paths]
    counts = Counter(names)
    return [name if counts[name] == 1 else display(path) for name, path in zip(names, paths)]


def shipped_expectations() -> dict:
    """Expected labels of the shipped photos: {file: {"label": str, "classes": [accepted names]}}."""
    return json.loads((package_photos_dir() / "expected.json").read_text("utf-8"))


def expected_for(path: Path, class_names: list[str]) -> dict | None:
    """The expectation for an image: a shipped photo's (when its classes are the model's), the name of a
    class folder it lies in, or a class name in the file name ('espresso_1.jpg')."""
    shipped = shipped_expectations()
    if path.name in shipped and path.parent == package_photos_dir() and \
            set(shipped[path.name]["classes"]) <= set(class_names):
        return shipped[path.name]
    by_folder = {name.lower(): name for name in class_names}.get(path.parent.name.lower())
    if by_folder is not None:
        return {"label": by_folder, "classes": [by_folder]}
    stem = re.sub(r"[_\-\d]+", " ", path.stem).strip().lower()
    lowered = {name.lower(): name for name in class_names}
    return {"label": lowered[stem], "classes": [lowered[stem]]} if stem in lowered else None


@torch.no_grad()
def predict(loaded: LoadedModel, x: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """Class probabilities (N, classes) on the CPU, computed in batches on the model's device; for a
    segmentation output (N, C, H, W) the per-pixel class probabilities averaged over the grid (the
    expected share of the pixels each class covers)."""
    def probabilities(out: torch.Tensor) -> torch.Tensor:
        p = out.softmax(1)
        return p.mean((2, 3)) if p.dim() == 4 else p

    with evaluating(loaded.model):
        return torch.cat([probabilities(select_output(loaded.model(x[i:i + batch_size].to(loaded.device)), None)).cpu()
                          for i in range(0, len(x), batch_size)])


def prediction_rows(loaded: LoadedModel, paths: list[Path], probs: torch.Tensor, top: int) -> list[dict]:
    rows = []
    for path, p in zip(paths, probs):
        values, indices = p.topk(min(top, p.numel()))
        exp = expected_for(path, loaded.class_names)
        best = loaded.class_names[int(indices[0])]
        ok = None if not exp or not exp["classes"] else best in exp["classes"]
        rows.append({"image": path.name, "path": str(path), "expected": exp["label"] if exp else None,
                     "predicted": best, "class_index": int(indices[0]), "probability": float(values[0]),
                     "ok": ok,
                     "top": [{"class": loaded.class_names[int(i)], "index": int(i), "probability": float(v)}
                             for v, i in zip(values, indices)]})
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [f"{'image':<22}{'expected':<18}{'predicted':<24}{'prob':>7}  OK"]
    for r in rows:
        ok = "" if r["ok"] is None else ("TRUE" if r["ok"] else "FALSE")
        lines.append(f"{r['image'][:21]:<22}{(r['expected'] or '-')[:17]:<18}{r['predicted'][:23]:<24}"
                     f"{r['probability']:>7.3f}  {ok}")
    return "\n".join(lines)


def parse_target(text: str | None, loaded: LoadedModel) -> int | None:
    """--target: None for the predicted class, else a class index (an index or a class name)."""
    if text is None or text == "predicted":
        return None
    return class_index(text, loaded.class_names, "--target")


def resolve_explain_target(loaded: LoadedModel, target: str | None, region: str | None) -> int | None | RegionTarget:
    """What the maps explain: a region of a segmentation output (``--target-region``) or a class; a class
    target on a segmentation model is refused."""
    if region is not None:
        return region_for(loaded, parse_region(region))
    if loaded.profile.output_grid is not None:
        raise ConvlensError("the model returns a segmentation output (N, C, H, W): explain it with --target-region "
                            "CLASS:MASK.png or CLASS:x0,y0,x1,y1 (--target is for a classifier's class)")
    return parse_target(target, loaded)


def method_for(loaded: LoadedModel, name: str, layer: str | None = None, model=None, **options):
    """A method configured for this model: the profile's layer (unless ``layer``), the method's fast options,
    and the input range for methods that take one (integrated gradients' black baseline)."""
    method_layer = (layer or loaded.profile.explain_layer) if uses_layer(name) else None
    options = {**method_info(name).fast_options, **options}
    base = name.split(":", 1)[-1]  # a noise tunnel passes the base method's options on
    if base in METHODS and "input_range" in inspect.signature(METHODS[base]).parameters:
        options.setdefault("input_range", loaded.input_range)
    return make_method(name, model if model is not None else loaded.model, layer=method_layer, **options)


def run_methods(loaded: LoadedModel, x: torch.Tensor, methods: list[str], target, layer: str | None = None,
                progress: bool = True, options: dict[str, dict] | None = None, desc: str = "methods") -> dict:
    """{method: Attribution} for the whole batch, with the seconds each took."""
    results, seconds = {}, {}
    for name in progress_of(methods, desc=desc, unit="method", enabled=progress):
        method = method_for(loaded, name, layer, **(options or {}).get(name, {}))
        start = time.perf_counter()
        results[name] = method.attribute(x.to(loaded.device), target)
        seconds[name] = time.perf_counter() - start
    return {"results": results, "seconds": seconds}


def has_cam_head(loaded: LoadedModel) -> bool:
    """Whether CAM applies: a global-average-pooling → linear head after the explain layer."""
    try:
        make_method("cam", loaded.model, layer=loaded.profile.explain_layer).attribute(
            loaded.profile.example(loaded.device).requires_grad_(False), 0)
        return True
    except ConvlensError:
        return False


def expand_methods(methods: list[str] | None, loaded: LoadedModel, layout: TokenLayout | None = None,
                   class_target: bool = True) -> list[str]:
    """The method names to run: the defaults, the given ones, or for ['all'] every registered method that
    applies to the model and target (CAM only with a global-average-pooling → linear head; no class-only
    method for a region target; only methods that read a token layer when ``layout`` is given)."""
    if not methods:
        return list(DEFAULT_METHODS)
    if methods != ["all"]:
        return methods

    def applies(name: str) -> bool:
        if not class_target and method_info(name).needs_class_target:
            return False
        try:
            make_method(name, loaded.model, **layer_options(name, layout))
        except ConvlensError:
            return False
        return name != "cam" or has_cam_head(loaded)

    return [m for m in METHODS if applies(m)]


def layer_options(name: str, layout: TokenLayout | None) -> dict:
    """Options of a method that reads the layer: how to read a token layer (none for a spatial one)."""
    return layout.options() if layout is not None and uses_layer(name) else {}


def method_options(loaded: LoadedModel, methods: list[str], layout: TokenLayout | None, layer: str | None,
                   class_target: bool) -> dict[str, dict]:
    """Per-method options, after checking before any work that every method can run as asked: names,
    class-only methods with a region target, and the token layer (see ``check_token_layer``)."""
    options = {name: layer_options(name, layout) for name in methods}
    for name in methods:
        if not class_target and method_info(name).needs_class_target:
            raise ConvlensError(f"{name} needs a class target; --target-region explains a score (the class "
                                "summed over a region)")
        try:
            make_method(name, loaded.model, **options[name])  # validates the name and options
        except ConvlensError as exc:
            if not options[name]:
                raise
            raise ConvlensError(f"{name} cannot read a token layer (--tokens): {exc}") from None
    if layout is not None and not any(uses_layer(m) for m in methods):
        raise ConvlensError(f"--tokens applies to methods that read a layer (the CAM family); none of "
                            f"{', '.join(methods)} does")
    if any(uses_layer(m) for m in methods):
        check_token_layer(loaded, layer, layout)
    return options


def file_safe(name: str) -> str:
    """A method name usable in a file name ('smoothgrad:gradcam' → 'smoothgrad-gradcam')."""
    return name.replace(":", "-")


# more images than this: contact sheets (20 images a page) instead of one matplotlib figure per image
# (~1-2 s each on 2 cores: 100 images took 227 s, 1,000 images on sheets 124 s, bench/explain_memory.py)
CONTACT_SHEET_THRESHOLD = 24


@dataclass
class ImageResult:
    """One image's explanation: its prediction row, input, every method's raw output and map, and the
    class its maps explain (as a caption); ``index`` is its place in the whole image list."""
    index: int
    row: dict
    x: torch.Tensor
    raw: dict[str, np.ndarray]
    maps: dict[str, np.ndarray]
    label: str


@dataclass
class BatchResult:
    images: list[ImageResult]
    seconds: dict[str, float]
    layers: dict[str, str | None]


def explain_batch(loaded: LoadedModel, paths: list[Path], indices: list[int], x: torch.Tensor, methods: list[str],
                  target: int | None | RegionTarget, layer: str | None, options: dict[str, dict] | None = None
                  ) -> BatchResult:
    """Predictions and every method's maps for the images ``paths[i] for i in indices`` (stacked in ``x``)."""
    run = run_methods(loaded, x, methods, target, layer, progress=False, options=options)
    rows = prediction_rows(loaded, [paths[i] for i in indices], predict(loaded, x), 5)
    first = run["results"][methods[0]]
    raw = {m: run["results"][m].raw.detach().cpu().numpy() for m in methods}
    maps = {m: run["results"][m].maps.detach().cpu().numpy() for m in methods}
    region = f"{loaded.class_names[int(target.classes[0])]} in region" if isinstance(target, RegionTarget) \
        else "custom target"
    images = [ImageResult(i, row, x[k].cpu(), {m: raw[m][k] for m in methods}, {m: maps[m][k] for m in methods},
                          loaded.class_names[int(first.targets[k])] if first.target.is_class else region)
              for k, (row, i) in enumerate(zip(rows, indices))]
    return BatchResult(images, run["seconds"], {m: run["results"][m].layer for m in methods})


class ExplainWriter:
    """Writes explained batches in dataset order: rows, figures (contact sheets past
    CONTACT_SHEET_THRESHOLD images) and ``maps.npz`` streamed batch by batch."""

    def __init__(self, loaded: LoadedModel, out: Path, paths: list[Path], methods: list[str],
                 overlays: list[str] | None):
        from .plots.attribution import ContactSheets

        self.loaded, self.out, self.methods, self.overlays = loaded, out, methods, overlays
        self.names, self.stems = display_names(paths), distinct_stems(paths)
        self.sheets = ContactSheets(out, methods) if len(paths) > CONTACT_SHEET_THRESHOLD else None
        self.store = NpzStream(out / "maps.npz")
        self.rows, self.figures, self.layers = [], {}, {}
        self.seconds = dict.fromkeys(methods, 0.0)

    def add(self, batch: BatchResult) -> None:
        for image in batch.images:
            name, stem = self.names[image.index], self.stems[image.index]
            self.rows.append({**image.row, "image": name, "output": stem})
            self.figures[name] = image_figures(self.loaded, image, self.methods, self.overlays, self.sheets,
                                               self.out, name, stem)
        self.store.append(images=np.array([self.names[image.index] for image in batch.images], dtype="U256"),
                          **{f"{m}_raw": np.stack([image.raw[m] for image in batch.images]) for m in self.methods},
                          **{f"{m}_map": np.stack([image.maps[m] for image in batch.images]) for m in self.methods})
        for m in self.methods:
            self.seconds[m] += batch.seconds[m]
        self.layers.update(batch.layers)

    def close(self) -> None:
        if self.sheets is not None:
            self.sheets.flush()
        self.store.close()

    def discard(self) -> None:
        self.store.discard()


def explain(loaded: LoadedModel, items, out: str | Path, methods: list[str] | None = None,
            target: str | None = None, layer: str | None = None, progress: bool = True,
            overlays: list[str] | None = None, batch_size: int | None = None, region: str | None = None,
            tokens: TokenLayout | None = None) -> dict | None:
    """Predictions, one side-by-side figure per image (contact sheets past CONTACT_SHEET_THRESHOLD
    images), overlays of the methods in ``overlays`` (default none), and every raw map in ``maps.npz``
    (rows in the order of ``summary["predictions"]``), all in ``out``.

    Images go through in batches of ``batch_size`` (default: what fits in memory, at most 32), so
    memory stays flat in the number of images. ``target``: a class index or name; ``region``: for a
    segmentation model, 'CLASS:MASK.png' or 'CLASS:x0,y0,x1,y1' (:mod:`convlens.explain_targets`);
    ``tokens``: how CAM methods read a token layer (default: the profile's ``explain_tokens``). Under torchrun each rank explains a contiguous block
    of the images and rank 0 writes everything (:func:`sharded_explain`; other ranks return None).
    """
    from . import distributed

    if layer is not None:
        resolve_layer(loaded.model, layer)
    target_index = resolve_explain_target(loaded, target, region)
    class_target = not isinstance(target_index, RegionTarget)
    layout = token_layout(loaded, layer, tokens)
    methods = expand_methods(methods, loaded, layout, class_target)
    options = method_options(loaded, methods, layout, layer, class_target)  # every check before any work
    paths = expand_image_paths(items)
    check_out_not_input(out, items)
    plan = explain_plan(loaded, methods, batch_size)
    if distributed.active():
        return sharded_explain(loaded, paths, out, methods, target_index, layer, progress, overlays, plan, options)
    writer = ExplainWriter(loaded, ensure_dir(out), paths, methods, overlays)
    reporter = SkipReporter()
    bar = progress_of(desc="images", total=len(paths), unit="image", enabled=progress)
    try:
        for indices, x in iter_image_batches(paths, image_mode(loaded), loaded.preprocess, plan.batch_size,
                                             reporter):
            writer.add(explain_batch(loaded, paths, indices, x, methods, target_index, layer, options))
            bar.update(len(indices))
        writer.close()
    finally:
        writer.discard()
        bar.close()
    return write_summary(loaded, writer, reporter.failures, plan)


def sharded_explain(loaded: LoadedModel, paths: list[Path], out: str | Path, methods: list[str],
                    target: int | None | RegionTarget, layer: str | None, progress: bool,
                    overlays: list[str] | None, plan: BatchPlan, options: dict[str, dict] | None = None
                    ) -> dict | None:
    """:func:`explain` under torchrun: the images go in steps of ≤ ``plan.batch_size`` (at most ⌈n/W⌉, so
    every rank gets work), dealt to the ranks round-robin (``distributed.deal``: fault hook, peer checks,
    one progress bar); after each round rank 0 receives the round's per-image results in dataset order
    and alone draws and writes them, so memory stays flat on every rank. Other ranks return None."""
    from . import distributed

    step = max(1, min(plan.batch_size, -(-len(paths) // distributed.world_size())))
    job = distributed.Job("explain", len(paths), step, progress=progress)
    writer = ExplainWriter(loaded, ensure_dir(out), paths, methods, overlays) if distributed.is_writer() else None
    failures: list[str] = []

    def compute(lo: int, hi: int) -> tuple[list[BatchResult], list[str]]:
        reporter = SliceReporter()
        batches = [explain_batch(loaded, paths, [lo + i for i in indices], x, methods, target, layer, options)
                   for indices, x in iter_image_batches(paths[lo:hi], image_mode(loaded), loaded.preprocess,
                                                        plan.batch_size, reporter)]
        return batches, reporter.failures

    def emit(part: tuple[list[BatchResult], list[str]]) -> None:
        for batch in part[0]:
            writer.add(batch)
        failures.extend(part[1])

    try:
        distributed.deal(job, compute, emit)
        if writer is None:
            return None
        if not writer.rows:
            raise ConvlensError(failures[0] if len(failures) == 1 else
                                f"none of the {len(failures)} given images could be read")
        writer.close()
    finally:
        if writer is not None:
            writer.discard()
    return write_summary(loaded, writer, failures, plan)


def write_summary(loaded: LoadedModel, writer: ExplainWriter, failures: list[str], plan: BatchPlan) -> dict:
    summary = {"model": loaded.name, "methods": writer.methods, "predictions": writer.rows, "figures": writer.figures,
               "maps": "maps.npz", "seconds": writer.seconds, "skipped": failures, "layers": writer.layers,
               "batch_size": plan.batch_size}
    write_json(writer.out / "predictions.json", summary)
    return summary


def explain_plan(loaded: LoadedModel, methods: list[str], batch_size: int | None) -> BatchPlan:
    """How many images per batch, from the model's activation size on a blank input."""
    from PIL import Image

    sample = loaded.preprocess(Image.new(image_mode(loaded), (256, 256)))
    pixels = sample.shape[-1] * sample.shape[-2]
    result_bytes = len(methods) * 4 * pixels * (sample.shape[0] + 2)  # raw (≤ C×H×W) + map + normalized
    inner = max([method_info(m).fast_options.get("batch_size", 0) for m in methods] + [0])
    return plan_batch_size(activation_bytes(loaded.model, sample.to(loaded.device)), result_bytes, inner, batch_size,
                           available_bytes())


def image_figures(loaded: LoadedModel, image_result: ImageResult, methods: list[str], overlays: list[str] | None,
                  sheets, out: Path, name: str, stem: str) -> dict:
    """Figures of one image: its side-by-side figure (or contact-sheet row) and overlays."""
    from .plots.attribution import method_panel, plot_methods, plot_overlay, shows_sign

    image = loaded.deprocess(image_result.x)
    label = image_result.label
    panels = {m: method_panel(m, image, image_result.raw[m], image_result.maps[m]) for m in methods}
    if sheets is not None:
        return sheets.add(f"{name}: {label}", image, panels)
    figure = {"overlays": {}}
    for m in overlays or []:
        figure["overlays"][m] = plot_overlay(image, panels[m], f"{m}: {label}", out / f"{stem}_{file_safe(m)}.png",
                                             shows_sign(m)).name
    figure["methods"] = plot_methods(image, panels, f"{name}: {label}", out / f"{stem}_methods.png").name
    return figure
