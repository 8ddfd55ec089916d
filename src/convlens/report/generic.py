"""`convlens report`: the PW-11 lab's whole study of any CNN on a labelled image folder.

Stages (each cached in its own folder, keyed by the model's digest and the options): accuracy and
confusion on the folder, per-class filter statistics, activation maximization of a few classes,
explanations of a few images per class, faithfulness and sanity checks. Then one self-contained
``index.html`` (images inlined) and ``summary.json``.
"""
from __future__ import annotations

import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import __version__, distributed
from ..attribution import method_info
from ..data.folders import scan_labelled_folder, stream_batches
from ..errors import ConvlensError
from ..io import ensure_dir, write_json, write_text
from ..models.registry import LoadedModel
from .page import document, esc, fig, table
from .stages import model_digest, run_stage

DEFAULT_METHODS = ["gradcam", "guided-gradcam", "gradcam++", "layercam", "saliency", "guided-backprop",
                   "integrated-gradients"]
EVALUATION_METHODS = ["gradcam", "gradcam++", "layercam", "saliency", "guided-backprop", "integrated-gradients"]
ACTMAX_CLASSES = 4
EVALUATION_IMAGES = 16


@dataclass
class ReportOptions:
    out: Path
    data: Path
    methods: list[str] | None = None
    per_class: int = 2
    seed: int = 0
    progress: bool = True
    limit: int | None = None


def check_options(opts: ReportOptions) -> None:
    if opts.per_class <= 0:
        raise ConvlensError(f"--per-class must be positive, got {opts.per_class}")
    if opts.limit is not None and opts.limit <= 0:
        raise ConvlensError(f"--limit must be positive, got {opts.limit}")
    if opts.out.resolve() == opts.data.resolve() or opts.data.resolve() in opts.out.resolve().parents:
        raise ConvlensError(f"--out {opts.out} lies inside the data folder {opts.data}: choose another folder")


ACCURACY_BATCH, ACCURACY_STEP = 64, 256  # fixed: every world size predicts the very same batches


def stage_accuracy(loaded: LoadedModel, folder, names: list[str], items, out: Path, progress: bool) -> dict | None:
    """Predictions on every image of the folder (streamed): accuracy, confusion over the folder's
    classes (last column: any other class), per-image rows.

    The images go in steps of ACCURACY_STEP (``distributed.fold``): under torchrun each rank predicts
    its shard of steps, the confusion counts are all-reduced and the rows and skipped files gathered to
    rank 0 in folder order; rank 0 returns the result, the other ranks None."""
    from ..explain import predict
    from ..plots.training import plot_confusion

    k = len(folder.classes)
    to_folder = {m: c for c, m in enumerate(folder.model_index)}

    def predict_step(lo: int, hi: int) -> dict:
        part = {"confusion": torch.zeros(k, k + 1, dtype=torch.long), "rows": [], "skipped": []}
        for x, y, idx in stream_batches(items[lo:hi], loaded.preprocess, loaded.profile.image_mode, ACCURACY_BATCH,
                                        skipped=part["skipped"]):
            p, pred = predict(loaded, x).max(1)
            for yi, pi, predi, i in zip(y.tolist(), p.tolist(), pred.tolist(), idx.tolist()):
                part["confusion"][yi, to_folder.get(predi, k)] += 1
                part["rows"].append({"path": str(items[lo + i][0]), "class": yi, "predicted": names[predi],
                                     "probability": pi, "ok": predi == folder.model_index[yi]})
        return part

    def combine(state: dict, part: dict) -> dict:
        state["confusion"] += part["confusion"]
        state["rows"] += part["rows"]
        state["skipped"] += part["skipped"]
        return state

    job = distributed.Job("accuracy", len(items), ACCURACY_STEP, progress=progress)
    state = distributed.fold(job, predict_step, combine,
                             {"confusion": torch.zeros(k, k + 1, dtype=torch.long), "rows": [], "skipped": []})
    rows, skipped = (distributed.gather_ordered(job.units().start, state[key]) for key in ("rows", "skipped"))
    cm = distributed.all_reduce_tree({"confusion": state["confusion"]})["confusion"].numpy()
    if not distributed.is_writer():
        return None
    if not rows:
        raise ConvlensError(f"{folder.root}: none of its images could be read")
    labels = [names[m] for m in folder.model_index]
    plot_confusion(cm[:, :k], out / "confusion_matrix.png", labels)
    accuracy = float(np.mean([r["ok"] for r in rows]))
    return {"accuracy": accuracy, "images": len(rows), "confusion": cm.tolist(), "classes": labels,
            "other_column": int(cm[:, k].sum()), "rows": rows, "skipped": skipped,
            "figures": {"confusion": "confusion_matrix.png"}}


def chosen_images(accuracy: dict, per_class: int, classes: int) -> list[str]:
    """The first ``per_class`` readable images of every class, in folder order."""
    picked: dict[int, list[str]] = {c: [] for c in range(classes)}
    for r in accuracy["rows"]:
        if len(picked[r["class"]]) < per_class:
            picked[r["class"]].append(r["path"])
    return [p for c in range(classes) for p in picked[c]]


def evaluation_sample(accuracy: dict, classes: int, count: int) -> list[str]:
    """Up to ``count`` images spread over the classes (round robin)."""
    per = {c: [r["path"] for r in accuracy["rows"] if r["class"] == c] for c in range(classes)}
    out: list[str] = []
    while len(out) < count and any(per.values()):
        for c in range(classes):
            if per[c] and len(out) < count:
                out.append(per[c].pop(0))
    return out


def run_report(loaded: LoadedModel, opts: ReportOptions) -> Path | None:
    """Every stage, then ``index.html`` and ``summary.json`` in ``opts.out``; returns the page's path.

    Under torchrun the dataset-scale stages (accuracy, statistics, explanations, faithfulness) are
    split across the ranks; activation maximization and the page are rank 0's. Rank 0 alone reads the
    stage cache and writes; the other ranks return None."""
    from ..analysis import statistics
    from ..evaluation.run import evaluate
    from ..explain import explain
    from ..featvis.run import actmax

    check_options(opts)
    folder, names = scan_labelled_folder(opts.data, loaded.class_names)
    items = folder.items[:opts.limit] if opts.limit else folder.items
    for name in opts.methods or []:
        method_info(name)  # an unknown name fails before any work
    out = ensure_dir(opts.out) if distributed.is_writer() else Path(opts.out)
    timings: dict = {}
    start = time.perf_counter()
    base = {"model": model_digest(loaded.model), "data": str(Path(opts.data).resolve()), "images": len(items),
            "profile": [loaded.profile.name, list(loaded.profile.input_shape), loaded.class_names[:50]]}
    acc = run_stage(out, "accuracy", base, lambda d: stage_accuracy(loaded, folder, names, items, d, opts.progress),
                    timings)
    explained, sample = distributed.broadcast_object(
        None if acc is None else (chosen_images(acc, opts.per_class, len(folder.classes)),
                                  evaluation_sample(acc, len(folder.classes), EVALUATION_IMAGES)),
        "rank 0's choice of images")
    stats = run_stage(out, "stats", base, lambda d: statistics(loaded, d, data=str(opts.data), limit=opts.limit,
                                                               progress=opts.progress), timings)
    classes = folder.model_index[:ACTMAX_CLASSES]
    param = "fourier" if loaded.profile.channels == 3 else "pixel"
    am = run_stage(out, "actmax", {**base, "classes": classes, "seed": opts.seed, "param": param},
                   lambda d: actmax(loaded, d, classes=classes, tv_weights=[1.0, 4.0, 16.0], pairs=[],
                                    steps=100, seed=opts.seed, param=param, progress=opts.progress), timings,
                   sharded=False)
    methods = opts.methods or DEFAULT_METHODS
    overlays = [m for m in ("gradcam", "guided-gradcam") if m in methods] or methods[:1]
    ex = run_stage(out, "explain", {**base, "methods": methods, "images": explained},
                   lambda d: explain(loaded, explained, d, methods, progress=opts.progress, overlays=overlays),
                   timings)
    ev_methods = [m for m in EVALUATION_METHODS if m in methods] or methods[:3]
    ev = run_stage(out, "evaluate", {**base, "methods": ev_methods, "images": sample, "seed": opts.seed},
                   lambda d: evaluate(loaded, d, ev_methods, sample, sanity_images=min(4, len(sample)),
                                      data_randomization=False, seed=opts.seed, progress=opts.progress), timings)
    if not distributed.is_writer():
        return None
    timings["total"] = {"seconds": time.perf_counter() - start}
    return render(out, loaded, folder, acc, stats, am, ex, ev, timings, opts)


# ------------------------------------------------------------------ the page
def section_data(loaded: LoadedModel, acc: dict) -> str:
    cm = np.array(acc["confusion"])
    labels = acc["classes"]
    off = cm[:, :len(labels)].copy()
    np.fill_diagonal(off, 0)
    order = np.argsort(-off, axis=None, kind="stable")[:3]
    pairs = [f"{esc(labels[i // off.shape[1]])} read as {esc(labels[i % off.shape[1]])} ({int(off.flat[i])}×)"
             for i in order if off.flat[i] > 0]
    p = loaded.profile
    skipped = f" {len(acc['skipped'])} unreadable file(s) skipped." if acc["skipped"] else ""
    return f"""
<section id="data"><h2>The model on your data</h2>
<div class="cards"><div class="card">accuracy<b>{acc['accuracy']:.4f}</b>{acc['images']:,} images</div>
<div class="card">classes<b>{len(labels)}</b>of {len(loaded.class_names)} model outputs</div>
<div class="card">input<b>{p.channels}×{p.size[0]}×{p.size[1]}</b>{esc(p.image_mode)}</div>
<div class="card">parameters<b>{sum(t.numel() for t in loaded.model.parameters()):,}</b>{esc(p.name)}</div></div>
{fig("accuracy/" + acc['figures']['confusion'], "Confusion matrix on the folder (rows: the class folder; columns: the predicted class among the folder's classes).")}
<div class="obs">Most confused pairs: {"; ".join(pairs) or "none"}. Predictions outside the folder's classes: {acc['other_column']}.{skipped}</div>
</section>"""


def section_stats(stats: dict) -> str:
    figs = stats.get("figures", {})
    rows = [[esc(layer), esc(cls), ", ".join(f"f{k}" for k in e["top_filters"]), f"{max(e['score']):.3f}"]
            for layer, info in stats["layers"].items() for cls, e in info["per_class"].items()]
    ranked = "".join(fig("stats/" + figs[f"ranked_maps_{layer}"], f"{esc(layer)}: each filter's class-mean map, by rank.")
                     for layer in stats["layers"] if f"ranked_maps_{layer}" in figs)
    return f"""
<section id="stats"><h2>Filter activation statistics</h2>
<p class="note">Per class and filter: the mean activation map over the class's images and its spatial mean (score);
filters ranked per class (a reconstruction of the course's tool, see docs/filter-statistics.md). Layers:
{esc(", ".join(stats["layers"]))}; {sum(stats["counts"]):,} images.</p>
{fig("stats/" + figs["rank_overlay"], "Dominant filter per pixel, coloured by its rank for the class (red: rank 1), over the class-mean image.") if "rank_overlay" in figs else ""}
{fig("stats/" + figs["score_heatmaps"], "Score of every filter for every class.") if "score_heatmaps" in figs else ""}
{ranked}
<details><summary>Top filters of every class and layer</summary>{table(["layer", "class", "top 3 filters", "best score"], rows)}</details>
</section>"""


def section_actmax(am: dict) -> str:
    chosen = am["chosen_tv_weight"]
    return f"""
<section id="actmax"><h2>Activation maximization</h2>
<p>Inputs that maximize the logits of {len(am['classes'])} classes, at {len(am['tv_weights'])} total-variation
weights ({am['steps']} steps, seed {am['seed']}). Chosen weight {chosen:g}: {esc(am['choice'])}.</p>
{fig("actmax/" + am['figures']['sweep'], "Rows: tv weight; columns: class; p = the model's probability of the target.")}
{fig("actmax/" + am['figures']['chosen'], f"The class images at tv weight {chosen:g}.")}
</section>"""


def section_explain(ex: dict) -> str:
    rows, per_image, sheets = [], [], []
    for r in ex["predictions"]:
        ok = "" if r["ok"] is None else ('<span class="ok">TRUE</span>' if r["ok"] else '<span class="bad">FALSE</span>')
        rows.append([esc(r["image"]), esc(r["expected"] or "–"), esc(r["predicted"]), f"{r['probability']:.3f}", ok])
        f = ex["figures"][r["image"]]
        if "methods" in f:
            per_image.append(fig("explain/" + f["methods"], f"{esc(r['image'])}: every method side by side "
                                                             f"(explaining {esc(r['predicted'])})."))
        elif f["sheet"] not in sheets:  # many images: contact sheets, one row per image
            sheets.append(f["sheet"])
            per_image.append(fig("explain/" + f["sheet"], "Every method side by side, one image per row."))
    return f"""
<section id="explain"><h2>Why it decides: class activation maps and gradients</h2>
{table(["image", "class folder", "predicted", "probability", "OK"], rows, {3})}
{"".join(per_image)}
</section>"""


def section_faithfulness(ev: dict) -> str:
    t = ev["table"]
    rows = [[esc(m), f"{r['deletion_auc']:.3f}", f"{r['insertion_auc']:.3f}", f"{r['average_drop']:.1f}",
             f"{r['increase_in_confidence']:.1f}"] for m, r in t.items()]
    figs = ev["figures"]
    sanity = ""
    if "sanity" in ev:
        steps = ev["sanity"]["cascading"]["steps"]
        methods = [k for k in steps[-1] if k != "randomized"]
        finding = "; ".join(f"{esc(m)} ρ={steps[0][m]['spearman_abs']:.2f} → {steps[-1][m]['spearman_abs']:.2f}"
                            for m in methods)
        sanity = (fig("evaluate/" + figs["sanity_cascading"], "Cascading randomization from the top layer down "
                      "(Adebayo et al. 2018): similarity of each map with the original.")
                  + f"<div class='obs'>Rank correlation of |map| after the first and the last randomization step: {finding}. "
                  "A map that barely changes does not depend on what the model learned.</div>")
    return f"""
<section id="faith"><h2>Faithfulness — which map should you trust?</h2>
<p>{len(ev['images'])} images, target = predicted class; deletion/insertion over {ev['steps']} steps.</p>
{table(["method", "deletion AUC ↓", "insertion AUC ↑", "Average Drop % ↓", "Increase in Confidence % ↑"], rows, {1, 2, 3, 4})}
{fig("evaluate/" + figs['curves'], "Mean deletion and insertion curves per method.")}
{sanity}
</section>"""


def render(out: Path, loaded: LoadedModel, folder, acc, stats, am, ex, ev, timings: dict, opts: ReportOptions) -> Path:
    record = {"convlens": __version__, "torch": str(torch.__version__), "python": platform.python_version(),
              "model": loaded.profile.name, "data": str(opts.data), "seed": opts.seed, "timings": timings,
              "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    timing_rows = [[esc(k), f"{v['seconds']:.1f}", "cached" if v.get("cached") else ""] for k, v in timings.items()]
    body = (section_data(loaded, acc) + section_stats(stats) + section_actmax(am) + section_explain(ex)
            + section_faithfulness(ev)
            + f"<section id='record'><h2>Run record</h2>{table(['stage', 'seconds', ''], timing_rows, {1})}</section>")
    page = document(f"convlens — {loaded.profile.name}", f"What {loaded.profile.name} has learned, and why it decides",
                    f"{acc['images']:,} images of {folder.root.name}: accuracy, filter statistics, activation "
                    "maximization, explanations and their faithfulness.",
                    [("data", "Accuracy"), ("stats", "Statistics"), ("actmax", "Activation maximization"),
                     ("explain", "Explanations"), ("faith", "Faithfulness"), ("record", "Run record")], body, out)
    summary = {"model": loaded.profile.name, "accuracy": acc["accuracy"], "images": acc["images"],
               "confusion": acc["confusion"], "classes": acc["classes"],
               "top_filters": {layer: {c: e["top_filters"] for c, e in info["per_class"].items()}
                               for layer, info in stats["layers"].items()},
               "actmax": {"chosen_tv_weight": am["chosen_tv_weight"], "probabilities": am["probabilities"]},
               "faithfulness": ev["table"], "run": record}
    write_json(out / "summary.json", summary)
    return write_text(out / "index.html", page)
