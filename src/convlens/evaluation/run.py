"""`convlens evaluate`: a methods × metrics table, deletion/insertion curves, sanity checks."""
from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .. import distributed
from ..attribution import METHODS, method_info
from ..batching import SliceReporter, iter_image_batches
from ..data.mnist import load_mnist
from ..errors import ConvlensError
from ..explain import has_cam_head, method_for
from ..io import ensure_dir, write_json
from ..attribution.base import select_output
from ..hooks import evaluating
from ..models.registry import LoadedModel, load_model
from . import perturbation, sanity

FAST_METHODS = ["gradcam", "gradcam++", "layercam", "xgradcam", "saliency", "guided-backprop", "deconvnet",
                "guided-gradcam", "input-x-gradient", "integrated-gradients", "smoothgrad"]
SANITY_METHODS = ["gradcam", "saliency", "guided-backprop", "guided-gradcam", "integrated-gradients"]


def resolve_methods(names: list[str] | None, loaded: LoadedModel) -> list[str]:
    if not names:
        return FAST_METHODS + (["scorecam"] if loaded.profile.evaluation.include_scorecam else [])
    if names == ["all"]:
        return [m for m in METHODS if m != "cam" or has_cam_head(loaded)]
    for name in names:
        method_info(name)  # an unknown name (or noise tunnel over one) is a ConvlensError naming the choices
    return names


def method_options(name: str, loaded: LoadedModel) -> dict:
    """Options beyond the method's fast defaults: the profile's SmoothGrad sample count."""
    return {"samples": loaded.profile.evaluation.smoothgrad_samples} if name == "smoothgrad" else {}


def evaluated_method(name: str, loaded: LoadedModel, model=None):
    return method_for(loaded, name, model=model, **method_options(name, loaded))


def random_label_model(loaded: LoadedModel, seed: int, progress: bool) -> LoadedModel:
    """The lab network retrained briefly on permuted labels (the data-randomization test)."""
    from ..training import make_recipe, train

    with tempfile.TemporaryDirectory() as tmp:
        train(tmp, make_recipe("lab", epochs=3), seed=seed, progress=progress, subset=12000, random_labels=True)
        return load_model(str(Path(tmp) / "model.pt"))


EVAL_CHUNK = 16  # images per step: fixed, so that every world size computes the very same batches


@dataclass
class Inputs:
    """The images to evaluate, read by item range: ``load(lo, hi)`` → (batch or None, names of the readable
    ones, messages of the unreadable ones)."""
    count: int
    load: Callable[[int, int], tuple[torch.Tensor | None, list[str], list[str]]]
    describe: list[str]


def evaluation_inputs(loaded: LoadedModel, images, mnist_test: int) -> Inputs:
    """The images to evaluate: given files/folders, else MNIST test images (lab network) or the shipped
    photos (three-channel models)."""
    if not images and loaded.profile.dataset == "mnist":
        if mnist_test <= 0:
            raise ConvlensError("--mnist-test must be positive")
        data = load_mnist("test")

        def mnist_slice(lo: int, hi: int):  # floats in [0, 1] as MnistSplit.tensors() makes them
            x = torch.from_numpy(np.array(data.images[lo:hi])).unsqueeze(1).float().div_(255.0)
            return x, [f"test{i}" for i in range(lo, hi)], []
        return Inputs(min(mnist_test, len(data.labels)), mnist_slice, [f"mnist-test:{mnist_test}"])
    if not images:
        if loaded.profile.channels != 3:
            raise ConvlensError("give the images to evaluate with --images (files or folders)")
        from ..data.images import sample_photo_paths
        images = sample_photo_paths()[:5]
    from ..data.images import expand_image_paths
    from ..explain import display_names, image_mode
    paths = expand_image_paths(images)
    names = display_names(paths)

    def files_slice(lo: int, hi: int):
        reporter = SliceReporter()
        batches = list(iter_image_batches(paths[lo:hi], image_mode(loaded), loaded.preprocess, max(1, hi - lo),
                                          reporter))
        if not batches:
            return None, [], reporter.failures
        indices, x = batches[0]
        return x, [names[lo + i] for i in indices], reporter.failures
    return Inputs(len(paths), files_slice, [str(p) for p in paths])


def evaluate_chunk(loaded: LoadedModel, methods: list[str], x: torch.Tensor | None, names: list[str],
                   skipped: list[str], steps: int) -> dict:
    """Per-image results of one slice: predicted targets, and per method the deletion / insertion curves,
    the confidence drop and increase (Average Drop / Increase in Confidence) and the seconds taken."""
    part = {"names": names, "skipped": skipped, "targets": torch.zeros(0, dtype=torch.long), "methods": {},
            "seconds": {"maps": 0.0, "deletion_insertion": 0.0}}
    if x is None or not len(x):
        return part
    x = x.to(loaded.device)
    with torch.no_grad(), evaluating(loaded.model):
        targets = select_output(loaded.model(x), None).argmax(1)
    part["targets"] = targets.cpu()
    for name in methods:
        method = evaluated_method(name, loaded)
        start = time.perf_counter()
        result = method.attribute(x, targets)
        map_seconds = time.perf_counter() - start
        start = time.perf_counter()
        c = perturbation.deletion_insertion(loaded.model, x, result.maps, targets, steps=steps)
        adic = perturbation.average_drop_increase(loaded.model, x, result.normalized, targets)
        part["seconds"]["maps"] += map_seconds
        part["seconds"]["deletion_insertion"] += time.perf_counter() - start
        part["methods"][name] = {"deletion": c.deletion, "insertion": c.insertion, "fractions": c.fractions,
                                 "drop": torch.tensor(adic["per_image_drop"]),
                                 "increase": torch.tensor(adic["per_image_increase"]), "seconds": map_seconds}
    return part


def merge_chunks(parts: list[dict], methods: list[str]) -> tuple[list[str], torch.Tensor, dict, dict, dict]:
    """Per-image results of all slices (in dataset order) → names, targets, metrics table, mean curves, timings."""
    parts = [p for p in parts if p["names"]]
    if not parts:
        raise ConvlensError("none of the given images could be read")
    names = [n for p in parts for n in p["names"]]
    table, curves = {}, {}
    for name in methods:
        rows = [p["methods"][name] for p in parts]
        deletion, insertion = torch.cat([r["deletion"] for r in rows]), torch.cat([r["insertion"] for r in rows])
        drop, increase = torch.cat([r["drop"] for r in rows]), torch.cat([r["increase"] for r in rows])
        table[name] = {"deletion_auc": float(perturbation.auc(deletion).mean()),
                       "insertion_auc": float(perturbation.auc(insertion).mean()),
                       "average_drop": float(drop.mean()), "increase_in_confidence": float(increase.float().mean() * 100),
                       "seconds_per_image": sum(r["seconds"] for r in rows) / len(names)}
        curves[name] = {"fractions": rows[0]["fractions"].tolist(), "deletion_mean": deletion.mean(0).tolist(),
                        "insertion_mean": insertion.mean(0).tolist(),
                        "deletion_auc": table[name]["deletion_auc"], "insertion_auc": table[name]["insertion_auc"]}
    timings = {k: sum(p["seconds"][k] for p in parts) for k in ("maps", "deletion_insertion")}
    return names, torch.cat([p["targets"] for p in parts]), table, curves, timings


def first_images(inputs: Inputs, k: int) -> torch.Tensor:
    """The first ``k`` readable images (the sanity checks' inputs)."""
    xs, lo = [], 0
    while sum(len(x) for x in xs) < k and lo < inputs.count:
        x, _, _ = inputs.load(lo, min(inputs.count, lo + k))
        xs += [] if x is None else [x]
        lo += k
    return torch.cat(xs)[:k]


def evaluate(loaded: LoadedModel, out, methods: list[str] | None = None, images=None, mnist_test: int = 100,
             steps: int | None = None, sanity_images: int | None = None, data_randomization: bool = True,
             seed: int = 0, progress: bool = True, resume: bool = False) -> dict | None:
    """Metrics table, curves and sanity checks into ``out``. Under torchrun each rank evaluates a shard of
    the images; rank 0 gathers the per-image results, runs the sanity checks and writes (others: None)."""
    methods = resolve_methods(methods, loaded)
    inputs = evaluation_inputs(loaded, images, mnist_test)
    if distributed.is_writer():
        out = ensure_dir(out)
    steps = steps or loaded.profile.evaluation.steps
    key = distributed.fingerprint(loaded.model, inputs=inputs.describe, count=inputs.count, methods=methods,
                                  steps=steps, chunk=EVAL_CHUNK)
    job = distributed.Job("evaluation", inputs.count, EVAL_CHUNK, Path(out), key, resume, progress)
    parts = distributed.fold(job, lambda lo, hi: evaluate_chunk(loaded, methods, *inputs.load(lo, hi), steps),
                             lambda done, part: done + [part], [])
    parts = distributed.gather_ordered(job.units().start, parts)
    if not distributed.is_writer():
        return None
    names, targets, table, curves, timings = merge_chunks(parts, methods)
    skipped = [message for p in parts for message in p["skipped"]]

    from ..plots import evaluation as eplots
    figures = {"metrics": eplots.plot_metric_table(table, out / "metrics.png").name,
               "curves": eplots.plot_curves(curves, out / "deletion_insertion.png").name}
    summary = {"model": loaded.name, "images": names, "skipped": skipped, "targets": targets.tolist(), "methods": methods,
               "steps": steps, "table": table, "curves": curves, "figures": figures}

    k = sanity_images if sanity_images is not None else loaded.profile.evaluation.sanity_images
    if k > 0:
        start = time.perf_counter()
        xs = first_images(inputs, k).to(loaded.device)
        ts = targets[:len(xs)].to(loaded.device)
        sane = [m for m in SANITY_METHODS if m in methods] or methods[:3]
        sane_methods = {m: evaluated_method(m, loaded) for m in sane}
        groups = loaded.profile.randomization_groups(loaded.model) if loaded.profile.randomization_groups else None
        summary["sanity"] = {
            "cascading": sanity.cascading_randomization(loaded.model, sane_methods, xs, ts, False, seed, groups),
            "independent": sanity.cascading_randomization(loaded.model, sane_methods, xs, ts, True, seed, groups)}
        figures["sanity_cascading"] = eplots.plot_sanity(summary["sanity"]["cascading"],
                                                         out / "sanity_cascading.png").name
        figures["sanity_independent"] = eplots.plot_sanity(summary["sanity"]["independent"],
                                                           out / "sanity_independent.png").name
        if data_randomization and loaded.profile.dataset == "mnist":
            rand = random_label_model(loaded, seed, progress)
            row = {}
            for m in sane:
                orig = sane_methods[m].attribute(xs, ts).maps
                other = evaluated_method(m, loaded, rand.model).attribute(xs, ts).maps
                row[m] = sanity.similarity(orig, other)
            summary["sanity"]["data_randomization"] = row
        timings["sanity"] = time.perf_counter() - start
    summary["seconds"] = timings
    write_json(out / "evaluation.json", summary)
    job.cleanup()
    return summary
