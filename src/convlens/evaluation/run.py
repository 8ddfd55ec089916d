"""`convlens evaluate`: a methods × metrics table, deletion/insertion curves, sanity checks."""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from ..attribution import METHODS, method_info
from ..data.mnist import load_mnist
from ..errors import ConvlensError
from ..explain import has_cam_head, load_batch, method_for, run_methods
from ..io import ensure_dir, write_json
from ..attribution.base import select_output
from ..hooks import evaluating
from ..models.registry import LoadedModel, load_model
from ..progress import progress as progress_of
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


def compute_maps(loaded: LoadedModel, methods: list[str], x: torch.Tensor, targets: torch.Tensor, progress: bool):
    run = run_methods(loaded, x, methods, targets, progress=progress,
                      options={m: method_options(m, loaded) for m in methods}, desc="maps")
    return run["results"], {name: s / len(x) for name, s in run["seconds"].items()}


def random_label_model(loaded: LoadedModel, seed: int, progress: bool) -> LoadedModel:
    """The lab network retrained briefly on permuted labels (the data-randomization test)."""
    from ..training import make_recipe, train

    with tempfile.TemporaryDirectory() as tmp:
        train(tmp, make_recipe("lab", epochs=3), seed=seed, progress=progress, subset=12000, random_labels=True)
        return load_model(str(Path(tmp) / "model.pt"))


def evaluation_inputs(loaded: LoadedModel, images, mnist_test: int) -> tuple[torch.Tensor, list[str], list[str]]:
    """The images to evaluate: given files/folders, else MNIST test images (lab network) or the shipped
    photos (three-channel models)."""
    if not images and loaded.profile.dataset == "mnist":
        if mnist_test <= 0:
            raise ConvlensError("--mnist-test must be positive")
        x = load_mnist("test").tensors()[0][:mnist_test]
        return x, [f"test{i}" for i in range(len(x))], []
    if not images:
        if loaded.profile.channels != 3:
            raise ConvlensError("give the images to evaluate with --images (files or folders)")
        from ..data.images import sample_photo_paths
        images = sample_photo_paths()[:5]
    batch = load_batch(images, loaded)
    return batch.x, [p.name for p in batch.paths], batch.failures


def evaluate(loaded: LoadedModel, out, methods: list[str] | None = None, images=None, mnist_test: int = 100,
             steps: int | None = None, sanity_images: int | None = None, data_randomization: bool = True,
             seed: int = 0, progress: bool = True) -> dict:
    out = ensure_dir(out)
    methods = resolve_methods(methods, loaded)
    x, names, skipped = evaluation_inputs(loaded, images, mnist_test)
    x = x.to(loaded.device)
    with torch.no_grad(), evaluating(loaded.model):
        targets = select_output(loaded.model(x), None).argmax(1)
    timings = {}
    start = time.perf_counter()
    results, per_image_seconds = compute_maps(loaded, methods, x, targets, progress)
    timings["maps"] = time.perf_counter() - start
    steps = steps or loaded.profile.evaluation.steps
    table, curves = {}, {}
    start = time.perf_counter()
    for name in progress_of(methods, desc="deletion/insertion", unit="method", enabled=progress):
        maps = results[name].maps
        c = perturbation.deletion_insertion(loaded.model, x, maps, targets, steps=steps)
        adic = perturbation.average_drop_increase(loaded.model, x, results[name].normalized, targets)
        table[name] = {"deletion_auc": float(c.deletion_auc.mean()), "insertion_auc": float(c.insertion_auc.mean()),
                       "average_drop": adic["average_drop"], "increase_in_confidence": adic["increase_in_confidence"],
                       "seconds_per_image": per_image_seconds[name]}
        curves[name] = {"fractions": c.fractions.tolist(), "deletion_mean": c.deletion.mean(0).tolist(),
                        "insertion_mean": c.insertion.mean(0).tolist(),
                        "deletion_auc": table[name]["deletion_auc"], "insertion_auc": table[name]["insertion_auc"]}
    timings["deletion_insertion"] = time.perf_counter() - start

    from ..plots import evaluation as eplots
    figures = {"metrics": eplots.plot_metric_table(table, out / "metrics.png").name,
               "curves": eplots.plot_curves(curves, out / "deletion_insertion.png").name}
    summary = {"model": loaded.name, "images": names, "skipped": skipped, "targets": targets.tolist(), "methods": methods,
               "steps": steps, "table": table, "curves": curves, "figures": figures}

    k = sanity_images if sanity_images is not None else loaded.profile.evaluation.sanity_images
    if k > 0:
        start = time.perf_counter()
        sane = [m for m in SANITY_METHODS if m in methods] or methods[:3]
        sane_methods = {m: evaluated_method(m, loaded) for m in sane}
        groups = loaded.profile.randomization_groups(loaded.model) if loaded.profile.randomization_groups else None
        xs, ts = x[:k], targets[:k]
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
    return summary
