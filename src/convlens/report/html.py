"""Render the lab's results as one self-contained page (inline CSS and images, no scripts)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..io import write_json, write_text
from .page import document, esc, fig, table

REPORT_SCORE = {"test_loss": 0.0649, "test_accuracy": 0.9792}

def confused_pairs(cm: np.ndarray, top: int = 3) -> list[tuple[int, int, int]]:
    off = cm.copy()
    np.fill_diagonal(off, 0)
    order = np.argsort(-off, axis=None, kind="stable")[:top]
    return [(int(i // cm.shape[1]), int(i % cm.shape[1]), int(off.flat[i])) for i in order if off.flat[i] > 0]


def section_exercise1(metrics: dict, history: list, ex1: dict) -> tuple[str, dict]:
    cm = np.array(metrics["confusion_matrix"])
    pairs = confused_pairs(cm)
    acc, loss = metrics["test_accuracy"], metrics["test_loss"]
    arch = table(["layer (type)", "output shape", "parameters"],
                 [[f"{r['layer']} ({r['type']})", r["output_shape"], r["params"]] for r in ex1["summary_rows"]], {2})
    total = sum(r["params"] for r in ex1["summary_rows"])
    stats = ex1["stats"]
    top_rows = []
    for layer, info in stats["layers"].items():
        for cls, entry in info["per_class"].items():
            top_rows.append([layer, cls, ", ".join(f"f{k}" for k in entry["top_filters"]),
                             f"{max(entry['score']):.3f}", f"f{int(np.argmax(entry['contrast']))}"])
    figs = stats.get("figures", {})
    fm = ex1["featuremaps"]
    confusion_text = "; ".join(f"{t} read as {p} ({n}×)" for t, p, n in pairs) or "none"
    body = f"""
<section id="ex1"><h2>Exercise 1 — the MNIST network and its filter activation statistics</h2>
<div class="cards"><div class="card">test accuracy<b>{acc:.4f}</b>report: {REPORT_SCORE['test_accuracy']}</div>
<div class="card">test loss<b>{loss:.4f}</b>report: {REPORT_SCORE['test_loss']}</div>
<div class="card">parameters<b>{total:,}</b>as in the report</div>
<div class="card">epochs<b>{len(history)}</b>selected: {metrics.get('selected_epoch')}</div></div>
<h3>Architecture</h3>{arch}
{fig("train/learning_curves.png", f"Training and validation loss and accuracy by epoch; the epoch with the best validation accuracy ({metrics.get('selected_epoch')}) is kept. Test accuracy {acc:.4f} against the report's {REPORT_SCORE['test_accuracy']}.")}
{fig("train/confusion_matrix.png", f"Confusion matrix on the {metrics['test_size']:,} test images (rows: true digit).")}
<div class="obs">Most confused pairs: {esc(confusion_text)}.</div>
<h3>Feature maps</h3>
{"".join(fig("featuremaps/" + name, f"{esc(layer)}: every filter's activation for {esc(fm['input'])} (predicted {fm['predicted']}, p = {fm['probability']:.3f}).") for layer, name in fm['files']['single'].items())}
{"".join(fig("featuremaps/" + name, f"{esc(layer)}: activation maps for one test image of every digit.") for layer, name in fm['files']['all_digits'].items())}
{fig("featuremaps/" + fm['files']['kernels'], "The nine 5×5 kernels of l1.") if 'kernels' in fm['files'] else ''}
<h3>Filter activation statistics</h3>
<p class="note">The course's exact definition was never published; convlens computes a documented reconstruction
(mean activation map per class and filter, its spatial mean as score, filters ranked per class). Statistics over
{sum(stats['counts']):,} images of the {esc(stats['split'])} split, one streaming pass.</p>
{fig("stats/" + figs['rank_overlay'], "Dominant filter per pixel, coloured by its rank for the class (red: rank 1, most important; blue: last). Rows: l1, l2, l3; columns: digits. l1 stays readable per digit, l3 is a coarse mosaic, as in the report.") if 'rank_overlay' in figs else ''}
{fig("stats/" + figs['score_heatmaps'], "Mean activation (score) of every filter for every class.") if 'score_heatmaps' in figs else ''}
{fig("stats/" + figs['class_probability'], "Second reading: per-pixel probability of the class given that its rank-1 filter is active there.") if 'class_probability' in figs else ''}
{"".join(fig("stats/" + figs[f'ranked_maps_{l}'], f"Third reading, {esc(l)}: each filter's class-mean map, ordered by rank.") for l in stats['layers'] if f'ranked_maps_{l}' in figs)}
{"".join(fig("stats/" + figs[f'score_bars_{l}'], f"{esc(l)}: filter scores sorted by rank for each class.") for l in stats['layers'] if f'score_bars_{l}' in figs)}
<details><summary>Top filters of every class and layer</summary>{table(["layer", "class", "top 3 filters (by score)", "best score", "most class-specific filter (contrast)"], top_rows)}</details>
</section>"""
    key = {"test_accuracy": acc, "test_loss": loss, "parameters": total, "most_confused": pairs,
           "top_filters": {layer: {cls: e["top_filters"] for cls, e in info["per_class"].items()}
                           for layer, info in stats["layers"].items()}}
    return body, key


def yes_no(ok) -> str:
    return '<span class="ok">yes</span>' if ok else '<span class="bad">no</span>'


def pair_section(ex2: dict, judge: dict | None) -> str:
    """The pairs: per pair its tv weight (chosen per pair by the judge when there is one), the network's and the
    judge's top two; the pair sweep figure and the chosen images."""
    figs = ex2["figures"]
    rows = []
    for rec in ex2["pairs"]:
        a, b = rec["targets"]
        row = [f"{a} & {b}", f"{rec['tv_weight']:g}", f"{rec['target_probabilities'][0]:.3f}",
               f"{rec['target_probabilities'][1]:.3f}", esc(", ".join(rec["top2"])), yes_no(rec.get("both_top2"))]
        if judge:
            tops = "; ".join(f"{name} {', '.join(top)}" for name, top in rec.get("judge_top_by", {}).items())
            row += [esc(tops), yes_no(rec.get("judge_recognized"))]
        rows.append(row)
    headers = ["pair", "tv weight", "p(first)", "p(second)", "top two classes", "both on top"]
    if judge:
        headers += ["judge's top two", "judge: both on top"]
    pair_figs = "".join(fig("actmax/" + figs[rec["name"]], f"{rec['targets'][0]} and {rec['targets'][1]} at once.")
                        for rec in ex2["pairs"] if rec["name"] in figs)
    sweep = ""
    if "pair_sweep" in figs:
        sweep = (f'<div class="obs">Each pair\'s tv weight: {esc(ex2["pair_criterion"])}. The judge puts both '
                 f'digits on top for {judge["pairs_recognized"]} of {len(ex2["pairs"])} pairs.</div>\n'
                 + fig("actmax/" + figs["pair_sweep"], "Rows: tv weight; columns: pair; framed: the weight chosen "
                       "for the pair; ✓: both digits in the judge's top two; N: in the network's."))
    return f"""<h3>Two outputs at once</h3>
{table(headers, rows, {1, 2, 3})}
{sweep}
<div class="grid2">{pair_figs}</div>"""


def section_exercise2(ex2: dict) -> tuple[str, dict]:
    chosen = ex2["chosen_tv_weight"]
    figs = ex2["figures"]
    judge = ex2.get("judge")
    row = ex2["tv_weights"].index(chosen)
    probs = ex2["probabilities"][row]
    n = len(ex2["classes"])
    judge_html = ""
    if judge:
        pair_counts = judge.get("pair_counts") or []
        rows = [[f"{w:g}" + (" ◀" if w == chosen else ""), f"{c}/{n}", f"{m:.3f}", f"{min(p):.3f}"]
                + ([f"{pair_counts[i]}/{len(ex2['pairs'])}"] if pair_counts else [])
                for i, (w, c, m, p) in enumerate(zip(ex2["tv_weights"], judge["counts"], judge["mean_probability"],
                                                     ex2["probabilities"]))]
        headers = ["tv weight", "judge recognizes", "judge mean p", "network's worst p"]
        judge_html = f"""<p>Judge: {esc(judge["description"])}.</p>
{table(headers + (["pairs the judge recognizes"] if pair_counts else []), rows, {1, 2, 3, 4})}"""
    label = ex2.get("label", "Activation maximization")
    body = f"""
<section id="ex2"><h2>Exercise 2 — activation maximization</h2>
<p>{esc(label)}: {n} classes × {len(ex2['tv_weights'])} tv weights optimized together in one batch
({ex2['steps']} steps, mode <code>{esc(ex2['mode'])}</code>, seed {ex2['seed']}) in {ex2['seconds']['sweep']:.1f} s.</p>
{fig("actmax/" + figs['sweep'], f"Rows: tv weight; columns: class; p = softmax probability of the target. The chosen weight ({chosen:g}) is framed in red.")}
<div class="obs">Chosen tv weight: <b>{chosen:g}</b> — {esc(ex2['choice'])}. Criterion: {esc(ex2['criterion'])}.
At this weight the class images are classified as their target with probability {min(probs):.3f} to {max(probs):.3f}.</div>
{judge_html}
{fig("actmax/" + figs['chosen'], f"The ten class images at tv weight {chosen:g}.")}
{pair_section(ex2, judge)}
</section>"""
    key = {"chosen_tv_weight": chosen, "class_probabilities_at_chosen": probs,
           "pairs": {f"{r['targets'][0]}+{r['targets'][1]}": r["target_probabilities"] for r in ex2["pairs"]}}
    if judge:
        key["judge_counts"] = dict(zip(map(str, ex2["tv_weights"]), judge["counts"]))
        key["pairs_judge_recognized"] = judge.get("pairs_recognized")
    return body, key


def section_exercise3(ex3: dict) -> tuple[str, dict]:
    rows = []
    for r in ex3["predictions"]:
        ok = "" if r["ok"] is None else ('<span class="ok">TRUE</span>' if r["ok"] else '<span class="bad">FALSE</span>')
        rows.append([esc(r["image"]), esc(r["expected"] or "–"), esc(r["predicted"]), f"{r['probability']:.3f}", ok,
                     esc(", ".join(f"{t['class']} {t['probability']:.2f}" for t in r["top"][1:3]))])
    spill = ex3["spill_outside_centre"]
    spilling = [name for name, v in spill.items() if v > 0.5]
    per_photo = []
    for r in ex3["predictions"]:
        f = ex3["figures"][r["image"]]
        cam_caption = (f"Grad-CAM (layer {esc(ex3['layers']['gradcam'])}); {spill[r['image']] * 100:.0f}% of its "
                       "mass lies outside the central box.")
        per_photo.append(f"<h3>{esc(r['image'])}: {esc(r['predicted'])} ({r['probability']:.2f})</h3>"
                         f"<div class='grid2'>{fig('explain/' + f['overlays']['gradcam'], cam_caption)}"
                         f"{fig('explain/' + f['overlays']['guided-gradcam'], 'Guided Grad-CAM as in the paper: guided backprop ⊙ Grad-CAM.')}</div>"
                         f"{fig('explain/' + f['methods'], 'Every method side by side.')}")
    spill_text = (", ".join(f"{esc(n)} ({spill[n] * 100:.0f}%)" for n in spilling) if spilling else "none")
    seconds = ", ".join(f"{esc(k)} {v:.2f} s" for k, v in ex3["seconds"].items())
    body = f"""
<section id="ex3"><h2>Exercise 3 — class activation maps on EfficientNet-Lite0 (ImageNet)</h2>
{table(["image", "expected", "predicted", "probability", "OK", "next two"], rows, {3})}
<div class="obs">Photos whose Grad-CAM puts more than half of its mass outside the central box (2/3 of each side,
44 % of the area, where the object usually is): {spill_text}. Time per method for the whole batch: {seconds}.</div>
<p class="note">Guided backprop here applies the guided rule to every ReLU6 (gradient kept only where 0 &lt; x &lt; 6 and
positive); libraries that only override nn.ReLU return the vanilla gradient on this network. The keras-vis
"guided Grad-CAM" (Grad-CAM on guided gradients) is shown under its own name.</p>
{"".join(per_photo)}
</section>"""
    return body, {"predictions": [{k: r[k] for k in ("image", "expected", "predicted", "probability", "ok")}
                                  for r in ex3["predictions"]], "spill_outside_centre": spill}


def section_faithfulness(faith: dict) -> tuple[str, dict]:
    t = faith["table"]
    rows = [[esc(m), f"{r['deletion_auc']:.3f}", f"{r['insertion_auc']:.3f}", f"{r['average_drop']:.1f}",
             f"{r['increase_in_confidence']:.1f}", f"{r['seconds_per_image'] * 1000:.1f}"] for m, r in t.items()]
    best_del = min(t, key=lambda m: t[m]["deletion_auc"])
    best_ins = max(t, key=lambda m: t[m]["insertion_auc"])
    figs = faith["figures"]
    sanity_html, finding = "", ""
    if "sanity" in faith:
        last = faith["sanity"]["cascading"]["steps"][-1]
        first = faith["sanity"]["cascading"]["steps"][0]
        methods = [k for k in last if k != "randomized"]
        finding = "; ".join(f"{esc(m)} ρ={first[m]['spearman_abs']:.2f} after the top layer, {last[m]['spearman_abs']:.2f} after all"
                            for m in methods)
        data_rand = faith["sanity"].get("data_randomization")
        dr = ("; ".join(f"{esc(m)} ρ={v['spearman_abs']:.2f}" for m, v in data_rand.items()) if data_rand else "")
        sanity_html = (fig("evaluate/" + figs["sanity_cascading"], "Cascading randomization (Adebayo et al. 2018): "
                           "rank correlation of |map| and SSIM with the original, as the weights are re-initialized from the top layer down.")
                       + fig("evaluate/" + figs["sanity_independent"], "Independent randomization: one layer at a time.")
                       + f"<div class='obs'>Cascading randomization, Spearman ρ of |map| with the original: {finding}. "
                       + (f"Model trained on permuted labels vs the real one: {dr}." if dr else "") + "</div>")
    body = f"""
<section id="faith"><h2>Faithfulness — which map should you trust?</h2>
<p>{len(faith['images'])} MNIST test images, target = predicted class. Deletion/insertion (RISE protocol, {faith['steps']} steps,
zero baseline for deletion, blurred image for insertion) and Average Drop / Increase in Confidence (Grad-CAM++ protocol).</p>
{table(["method", "deletion AUC ↓", "insertion AUC ↑", "Average Drop % ↓", "Increase in Confidence % ↑", "ms / image"], rows, {1, 2, 3, 4, 5})}
<div class="obs">Lowest deletion AUC: <b>{esc(best_del)}</b>; highest insertion AUC: <b>{esc(best_ins)}</b>.</div>
{fig("evaluate/" + figs['metrics'], "The table as bars.")}
{fig("evaluate/" + figs['curves'], "Mean deletion and insertion curves per method.")}
{sanity_html}
</section>"""
    return body, {"table": t, "best_deletion": best_del, "best_insertion": best_ins}


def section_record(record: dict) -> str:
    rows = [[esc(k), f"{v['seconds']:.1f}", "cached" if v.get("cached") else ""] for k, v in record["timings"].items()]
    info = ", ".join(f"{k} {esc(record[k])}" for k in ("convlens", "torch", "numpy", "matplotlib", "python"))
    return f"""
<section id="record"><h2>Run record</h2>
<p>{info}. Machine: {esc(record['machine'])}, {record['threads']} torch threads. Seed {record['seed']}{' (fast mode)' if record['fast'] else ''}. {esc(record['date'])}.</p>
{table(["stage", "seconds", ""], rows, {1})}
</section>"""


def render_report(out: Path, metrics, history, ex1, ex2, ex3, faith, record) -> Path:
    s1, k1 = section_exercise1(metrics, history, ex1)
    s2, k2 = section_exercise2(ex2)
    s3, k3 = section_exercise3(ex3)
    s4, k4 = section_faithfulness(faith)
    body = f"{s1}{s2}{s3}{s4}{section_record(record)}"
    page = document("convlens — PW-11 lab report", "Understanding a CNN — the PW-11 lab, reproduced by convlens",
                    "Filter activation statistics, activation maximization and class activation maps, measured and "
                    "explained.", [("ex1", "1 · Statistics"), ("ex2", "2 · Activation maximization"),
                                   ("ex3", "3 · Class activation maps"), ("faith", "Faithfulness"),
                                   ("record", "Run record")], body, out)
    summary = {"exercise1": k1, "exercise2": k2, "exercise3": k3, "faithfulness": k4, "run": record}
    write_json(out / "summary.json", summary)
    return write_text(out / "index.html", page)
