"""`convlens predict` and `convlens explain`: images in, predictions and maps out.

A file that cannot be read is reported (one line) and skipped; the other files still run.
"""
from __future__ import annotations

import inspect
import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .attribution import METHODS, make_method, method_info, uses_layer
from .data.images import expand_image_paths, open_image, package_photos_dir
from .errors import ConvlensError
from .attribution.base import select_output
from .hooks import evaluating, resolve_layer
from .io import ensure_dir, save_npz, write_json
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


def load_batch(items, loaded: LoadedModel) -> Batch:
    """Preprocess every readable image; unreadable ones are listed in ``failures``."""
    paths, tensors, failures = [], [], []
    for path in expand_image_paths(items):
        try:
            tensors.append(loaded.preprocess(open_image(path, loaded.profile.image_mode)))
            paths.append(path)
        except ConvlensError as exc:
            failures.append(str(exc))
            print(f"convlens: skipped: {exc}", file=sys.stderr)
    if not tensors:
        raise ConvlensError("none of the given images could be read")
    return Batch(paths, torch.stack(tensors), failures)


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
    """Class probabilities (N, classes) on the CPU, computed in batches on the model's device."""
    with evaluating(loaded.model):
        return torch.cat([select_output(loaded.model(x[i:i + batch_size].to(loaded.device)), None).softmax(1).cpu()
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
    if text is None or text == "predicted":
        return None
    if text.lstrip("-").isdigit():
        value = int(text)
        if not 0 <= value < len(loaded.class_names):
            raise ConvlensError(f"target {value} out of range 0..{len(loaded.class_names) - 1}")
        return value
    matches = [i for i, name in enumerate(loaded.class_names) if name.lower() == text.lower()]
    if not matches:
        raise ConvlensError(f"unknown target class {text!r}")
    return matches[0]


def method_for(loaded: LoadedModel, name: str, layer: str | None = None, model=None, **options):
    """A method configured for this model: the profile's layer (unless ``layer``), the method's fast options,
    and the input range for methods that take one (integrated gradients' black baseline)."""
    method_layer = (layer or loaded.profile.explain_layer) if uses_layer(name) else None
    options = {**method_info(name).fast_options, **options}
    if "input_range" in inspect.signature(METHODS[name]).parameters:
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


def explain(loaded: LoadedModel, items, out: str | Path, methods: list[str] | None = None,
            target: str | None = None, layer: str | None = None, progress: bool = True,
            overlays: list[str] | None = None) -> dict:
    """Predictions, per-image overlays (of ``overlays``, default every method), side-by-side figures and
    raw maps into ``out``."""
    from .plots.attribution import method_panel, plot_methods, plot_overlay, shows_sign

    out = ensure_dir(out)
    methods = methods or DEFAULT_METHODS
    for name in methods:
        make_method(name, loaded.model)  # validate names before any work
    if layer is not None:
        resolve_layer(loaded.model, layer)
    batch = load_batch(items, loaded)
    target_index = parse_target(target, loaded)
    probs = predict(loaded, batch.x)
    rows = prediction_rows(loaded, batch.paths, probs, 5)
    run = run_methods(loaded, batch.x, methods, target_index, layer, progress)
    figures = {}
    for i, path in enumerate(progress_of(batch.paths, desc="figures", unit="image", enabled=progress)):
        image = loaded.deprocess(batch.x[i])
        stem = path.stem
        first = run["results"][methods[0]]
        label = loaded.class_names[int(first.targets[i])] if first.target.is_class else "custom target"
        raws = {name: res.raw[i].cpu().numpy() for name, res in run["results"].items()}
        panels = {name: method_panel(name, image, raws[name], res.maps[i].cpu().numpy())
                  for name, res in run["results"].items()}
        figures[path.name] = {"overlays": {}}
        for name in overlays or methods:
            figures[path.name]["overlays"][name] = str(plot_overlay(
                image, panels[name], f"{name}: {label}", out / f"{stem}_{name}.png", shows_sign(name)).name)
        figures[path.name]["methods"] = plot_methods(image, panels, f"{path.name}: {label}",
                                                     out / f"{stem}_methods.png").name
        save_npz(out / f"{stem}_maps.npz", **{f"{name}_raw": raws[name] for name in methods},
                 **{f"{name}_map": run["results"][name].maps[i].cpu().numpy() for name in methods})
    summary = {"model": loaded.name, "methods": methods, "predictions": rows, "figures": figures,
               "seconds": run["seconds"], "skipped": batch.failures,
               "layers": {n: r.layer for n, r in run["results"].items()}}
    write_json(out / "predictions.json", summary)
    return summary
