"""`convlens predict` and `convlens explain`: images in, predictions and maps out.

A file that cannot be read is reported (one line) and skipped; the other files still run.
"""
from __future__ import annotations

import inspect
import json
import re
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
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
from .io import (NpzStream, check_out_not_input, display, distinct_stems, ensure_dir, move_file, save_torch,
                 unrecorded, write_bytes, write_json)
from .models.profile import TokenLayout
from .models.registry import LoadedModel
from .plots.png import Band
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
class Drawing:
    """An image's figures, drawn where its maps were computed: a contact-sheet row (compressed, see
    :mod:`convlens.plots.png`), or PNG files (name → bytes) with the summary's entry for them."""
    band: Band | None = None
    files: dict[str, bytes] = field(default_factory=dict)
    entry: dict | None = None


@dataclass
class ImageResult:
    """One image's explanation: its place in the whole image list, prediction row, every method's raw
    output and map, and its drawn figures."""
    index: int
    row: dict
    raw: dict[str, np.ndarray]
    maps: dict[str, np.ndarray]
    drawing: Drawing


@dataclass
class BatchResult:
    images: list[ImageResult]
    seconds: dict[str, float]
    layers: dict[str, str | None]


class FigureMaker:
    """Draws one image's figures from its maps: a contact-sheet row past CONTACT_SHEET_THRESHOLD images,
    else its side-by-side figure and the overlays of the methods in ``overlays``. Any rank can draw; the
    result depends only on the image and its maps."""

    def __init__(self, loaded: LoadedModel, paths: list[Path], methods: list[str], overlays: list[str] | None):
        from .plots.attribution import ContactSheets

        self.loaded, self.methods, self.overlays = loaded, methods, overlays or []
        self.names, self.stems = display_names(paths), distinct_stems(paths)
        self.sheets = len(paths) > CONTACT_SHEET_THRESHOLD
        self.rows = ContactSheets(None, methods) if self.sheets else None

    def draw(self, index: int, x: torch.Tensor, raw: dict[str, np.ndarray], maps: dict[str, np.ndarray],
             label: str) -> Drawing:
        from .plots.attribution import method_panel, methods_png, overlay_png, shows_sign

        image = self.loaded.deprocess(x)
        panels = {m: method_panel(m, image, raw[m], maps[m]) for m in self.methods}
        name, stem = self.names[index], self.stems[index]
        if self.rows is not None:
            return Drawing(band=self.rows.band(f"{name}: {label}", image, panels))
        files, entry = {}, {"overlays": {}}
        for m in self.overlays:
            entry["overlays"][m] = f"{stem}_{file_safe(m)}.png"
            files[entry["overlays"][m]] = overlay_png(image, panels[m], f"{m}: {label}", shows_sign(m))
        entry["methods"] = f"{stem}_methods.png"
        files[entry["methods"]] = methods_png(image, panels, f"{name}: {label}")
        return Drawing(files=files, entry=entry)


def explain_batch(loaded: LoadedModel, paths: list[Path], indices: list[int], x: torch.Tensor, methods: list[str],
                  target: int | None | RegionTarget, layer: str | None, figures: FigureMaker,
                  options: dict[str, dict] | None = None) -> BatchResult:
    """Predictions, every method's maps and the drawn figures of the images ``paths[i] for i in indices``
    (stacked in ``x``)."""
    run = run_methods(loaded, x, methods, target, layer, progress=False, options=options)
    rows = prediction_rows(loaded, [paths[i] for i in indices], predict(loaded, x), 5)
    first = run["results"][methods[0]]
    raw = {m: run["results"][m].raw.detach().cpu().numpy() for m in methods}
    maps = {m: run["results"][m].maps.detach().cpu().numpy() for m in methods}
    region = f"{loaded.class_names[int(target.classes[0])]} in region" if isinstance(target, RegionTarget) \
        else "custom target"
    images = []
    for k, (row, i) in enumerate(zip(rows, indices)):
        label = loaded.class_names[int(first.targets[k])] if first.target.is_class else region
        image_raw, image_maps = {m: raw[m][k] for m in methods}, {m: maps[m][k] for m in methods}
        images.append(ImageResult(i, row, image_raw, image_maps, figures.draw(i, x[k].cpu(), image_raw, image_maps,
                                                                             label)))
    return BatchResult(images, run["seconds"], {m: run["results"][m].layer for m in methods})


class HeldReporter(SkipReporter):
    """One process's reporter for the whole job: skip lines wait until an image was read (a run whose
    only image is bad ends in one line); :meth:`close`, not the per-step ``finish``, raises."""

    def finish(self) -> None:
        pass

    def close(self) -> None:
        SkipReporter.finish(self)


class ExplainWriter:
    """Rank 0's side of an explain job: prediction rows, figures and ``maps.npz`` rows, added in dataset
    order. Everything is staged in the job's work folder (``OUT/.convlens-work/explain-<key>``) and
    checkpointed there (``writer.pt``: rows, the unfinished contact sheet, how many map rows are kept),
    so an interrupted run resumes from it; :meth:`close` moves the finished files into ``out``."""

    def __init__(self, out: Path, job, figures: FigureMaker):
        from .plots.attribution import ContactSheets

        self.out, self.job, self.methods = out, job, figures.methods
        self.names, self.stems = figures.names, figures.stems
        self.stage = job.folder()
        self.sheets = ContactSheets(self.stage, self.methods) if figures.sheets else None
        self.store: NpzStream | None = None
        self.saved_at, self.closing = time.monotonic(), False
        self.restore(None)

    @property
    def checkpoint_path(self) -> Path:
        return self.stage / "writer.pt"

    def start(self, step: int) -> tuple[int, int]:
        """(first step to compute, step size): a resumed job's from its checkpoint; else (0, ``step``) on a
        cleared work folder."""
        with unrecorded():
            if self.job.resume and self.checkpoint_path.is_file():
                try:
                    saved = torch.load(self.checkpoint_path, weights_only=True)
                    self.restore(saved)
                    return int(saved["next"]), int(saved["step"])
                except Exception as exc:  # noqa: BLE001 - a damaged checkpoint is recomputed, not fatal
                    print(f"convlens: ignoring damaged checkpoint {display(self.checkpoint_path)}: {exc}",
                          file=sys.stderr)
                    self.restore(None)
            shutil.rmtree(self.stage, ignore_errors=True)
            self.store = NpzStream(self.out / "maps.npz", parts=ensure_dir(self.stage))
        return 0, step

    def add(self, part: tuple[list[BatchResult], list[str]]) -> None:
        """One step's results: its explained batches and the files it could not read."""
        batches, failures = part
        with unrecorded():
            for batch in batches:
                self.add_batch(batch)
        self.failures += failures

    def add_batch(self, batch: BatchResult) -> None:
        for image in batch.images:
            name = self.names[image.index]
            self.rows.append({**image.row, "image": name, "output": self.stems[image.index]})
            self.figures[name] = self.place(image.drawing)
        self.store.append(images=np.array([self.names[image.index] for image in batch.images], dtype="U256"),
                          **{f"{m}_raw": np.stack([image.raw[m] for image in batch.images]) for m in self.methods},
                          **{f"{m}_map": np.stack([image.maps[m] for image in batch.images]) for m in self.methods})
        for m in self.methods:
            self.seconds[m] += batch.seconds[m]
        self.layers.update(batch.layers)

    def place(self, drawing: Drawing) -> dict:
        """Stage an image's figures; returns its entry in the summary."""
        if drawing.band is not None:
            return self.sheets.add_band(drawing.band)
        for file, data in drawing.files.items():
            write_bytes(self.stage / file, data)
            self.files.append(file)
        return drawing.entry

    def state(self, next_step: int) -> dict:
        return {"next": next_step, "step": self.job.step, "rows": self.rows, "figures": self.figures,
                "layers": self.layers, "failures": self.failures, "files": self.files, "seconds": self.seconds,
                "maps": self.store.state(), "sheets": None if self.sheets is None else self.sheets.state()}

    def restore(self, saved: dict | None) -> None:
        """Continue from :meth:`state` (``None``: start empty)."""
        empty = {"rows": [], "figures": {}, "layers": {}, "failures": [], "files": [],
                 "seconds": dict.fromkeys(self.methods, 0.0), "sheets": {"count": 0, "page": []}}
        saved = saved or empty
        if saved is not empty:
            self.store = NpzStream(self.out / "maps.npz", parts=self.stage)
            self.store.restore(saved["maps"])
        self.rows, self.figures, self.layers = saved["rows"], saved["figures"], saved["layers"]
        self.failures, self.files, self.seconds = saved["failures"], saved["files"], saved["seconds"]
        if self.sheets is not None:
            self.sheets.restore(saved["sheets"])

    def after_round(self, next_step: int) -> None:
        """Checkpoint every CONVLENS_CHECKPOINT_SECONDS (rank 0, after a round's results are staged)."""
        from . import distributed

        if self.job.out is None or time.monotonic() - self.saved_at < distributed.checkpoint_seconds():
            return
        with unrecorded():
            save_torch(self.checkpoint_path, self.state(next_step))
        self.saved_at = time.monotonic()

    def close(self) -> None:
        """Join ``maps.npz`` and move the staged figures into ``out``."""
        self.closing = True  # from here on the staged files leave the work folder: no resuming from it
        with unrecorded():
            if self.sheets is not None:
                self.sheets.flush()
        self.store.close()
        pages = -(-self.sheets.count // self.sheets.rows) if self.sheets is not None else 0
        for file in self.files + [self.sheets.name(p) for p in range(pages)]:
            move_file(self.stage / file, self.out / file)

    def abandon(self) -> None:
        """After a failure: keep the work folder for ``--resume`` when it holds a checkpoint (and the final
        writing had not begun), else remove it."""
        if self.closing or not self.checkpoint_path.is_file():
            self.job.cleanup()


def explain(loaded: LoadedModel, items, out: str | Path, methods: list[str] | None = None,
            target: str | None = None, layer: str | None = None, progress: bool = True,
            overlays: list[str] | None = None, batch_size: int | None = None, region: str | None = None,
            tokens: TokenLayout | None = None, resume: bool = False) -> dict | None:
    """Predictions, one side-by-side figure per image (contact sheets past CONTACT_SHEET_THRESHOLD
    images), overlays of the methods in ``overlays`` (default none), and every raw map in ``maps.npz``
    (rows in the order of ``summary["predictions"]``), all in ``out``.

    ``target``: a class index or name; ``region``: for a segmentation model, 'CLASS:MASK.png' or
    'CLASS:x0,y0,x1,y1' (:mod:`convlens.explain_targets`); ``tokens``: how CAM methods read a token layer
    (default: the profile's ``explain_tokens``).

    The images go in steps of ``batch_size`` (default: what fits in memory, at most 32), so memory stays
    flat in the number of images. Under torchrun the steps (at most ⌈n/W⌉ images, so every rank gets
    work) are dealt to the ranks round-robin (``distributed.deal``); each rank computes and draws its
    steps, and after each round rank 0 receives the round's rows, maps and drawn figures in dataset order
    and alone writes them (other ranks return None). Rank 0 checkpoints what it has written (see
    :class:`ExplainWriter`); with ``resume`` an interrupted run's finished steps are not computed again.
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
    figures = FigureMaker(loaded, paths, methods, overlays)
    key = distributed.fingerprint(loaded.model, paths=[str(p) for p in paths], methods=methods, target=target,
                                  region=region, layout=repr(layout), layer=layer, overlays=overlays,
                                  batch_size=batch_size)
    step = max(1, min(plan.batch_size, -(-len(paths) // distributed.world_size())))
    job = distributed.Job("explain", len(paths), step, Path(out), key, resume, progress)
    writer = ExplainWriter(ensure_dir(out), job, figures) if distributed.is_writer() else None
    reporter = HeldReporter() if not distributed.active() else SliceReporter()

    def compute(lo: int, hi: int) -> tuple[list[BatchResult], list[str]]:
        before = len(reporter.failures)
        batches = [explain_batch(loaded, paths, [lo + i for i in indices], x, methods, target_index, layer, figures,
                                 options)
                   for indices, x in iter_image_batches(paths[lo:hi], image_mode(loaded), loaded.preprocess,
                                                        plan.batch_size, reporter)]
        return batches, reporter.failures[before:]

    try:
        first, job.step = distributed.broadcast_object(tuple(writer.start(step)) if writer else None,
                                                          "rank 0's resume point")
        if first and writer is not None and writer.rows:
            reporter.any_read = True
        distributed.deal(job, compute, writer.add if writer else lambda part: None, first,
                         writer.after_round if writer else None)
        if writer is None:
            return None
        if not writer.rows:
            if isinstance(reporter, HeldReporter):
                reporter.close()
            raise ConvlensError(writer.failures[0] if len(writer.failures) == 1 else
                                f"none of the {len(writer.failures)} given images could be read")
        writer.close()
        summary = write_summary(loaded, writer, writer.failures, plan)
    except BaseException:
        if writer is not None:
            writer.abandon()
        raise
    job.cleanup()
    return summary


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
