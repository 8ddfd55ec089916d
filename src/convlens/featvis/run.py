"""`convlens actmax`: the lab's tv-weight sweep, the chosen weight, pairs of classes, channel grids."""
from __future__ import annotations

import time
from dataclasses import replace
from typing import Sequence

import numpy as np
import torch

from ..errors import ConvlensError
from ..hooks import resolve_layer
from ..io import ensure_dir, write_json
from ..models.registry import LoadedModel
from .objectives import Objective, channel, class_log_probability, class_logit, soft_min
from .optimize import ActMaxConfig, ActMaxResult, maximize

LAB_TV_WEIGHTS = [0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0]
LAB_PAIRS = [(1, 7), (4, 9), (0, 1), (7, 8)]
CHOICE_PROBABILITY = 0.9
CRITERION = (f"the largest tv weight at which every class image is classified as its target with "
             f"probability ≥ {CHOICE_PROBABILITY} (else the weight with the best worst-case probability)")


def pair_objective(a: int, b: int, mode: str) -> Objective:
    """keras-vis maximizes the sum of both logits. The default mode maximizes the smooth minimum of both
    log-probabilities, so the easier class cannot win alone and no third class creeps in."""
    if mode == "kerasvis":
        return class_logit(a) + class_logit(b)
    return soft_min(class_log_probability(a), class_log_probability(b), temperature=0.5)


def choose_tv_weight(tv_weights: Sequence[float], probs: np.ndarray) -> tuple[float, str]:
    """``probs[i, j]``: probability of class j's target on its image at ``tv_weights[i]``."""
    worst = probs.min(1)
    ok = [i for i in range(len(tv_weights)) if worst[i] >= CHOICE_PROBABILITY]
    if ok:
        i = max(ok, key=lambda j: tv_weights[j])
        return tv_weights[i], f"largest weight with every class ≥ {CHOICE_PROBABILITY} (worst {worst[i]:.3f})"
    i = int(worst.argmax())
    return tv_weights[i], f"no weight reached {CHOICE_PROBABILITY} for every class; best worst case {worst[i]:.3f}"


def validate(loaded: LoadedModel, classes, pairs, layer, channels, tv_weights, steps) -> None:
    n = len(loaded.class_names)
    for c in list(classes) + [c for p in pairs for c in p]:
        if not 0 <= c < n:
            raise ConvlensError(f"class {c} out of range 0..{n - 1}")
    if steps <= 0:
        raise ConvlensError(f"--steps must be positive, got {steps}")
    if not tv_weights or any(not np.isfinite(w) or w < 0 for w in tv_weights):
        raise ConvlensError(f"tv weights must be finite and non-negative, got {tv_weights}")
    if layer is not None:
        _, module = resolve_layer(loaded.model, layer)
        count = getattr(module, "out_channels", None) or getattr(getattr(module, "conv", None), "out_channels", None)
        if count is not None and any(not 0 <= c < count for c in channels):
            raise ConvlensError(f"channel out of range 0..{count - 1} for layer {layer!r}")


def image_records(result: ActMaxResult, objectives: list[Objective], targets: list[list[int]], tvs: list[float],
                  names: list[str], class_names: list[str]) -> list[dict]:
    records = []
    for i, obj in enumerate(objectives):
        p = result.probabilities[i]
        top = p.topk(2).indices.tolist()
        records.append({"name": names[i], "objective": str(obj), "objective_value": float(result.objective[i]),
                        "tv_weight": tvs[i], "total_variation": float(result.tv[i]),
                        "targets": targets[i], "target_probabilities": [float(p[t]) for t in targets[i]],
                        "top2": [class_names[t] for t in top]})
    return records


def actmax(loaded: LoadedModel, out, classes=range(10), tv_weights=LAB_TV_WEIGHTS, pairs=LAB_PAIRS,
           layer: str | None = None, channels: Sequence[int] = (), steps: int = 200, mode: str = "default",
           seed: int = 0, param: str = "pixel", progress: bool = True) -> dict:
    """Run the sweep (classes × tv weights), pairs and channels; write figures and JSON into ``out``."""
    from ..plots import actmax as aplots

    out = ensure_dir(out)
    classes, tv_weights, pairs, channels = list(classes), list(tv_weights), list(pairs), list(channels)
    validate(loaded, classes, pairs, layer, channels, tv_weights, steps)
    shape = loaded.profile.input_shape
    base = ActMaxConfig(steps=steps, mode=mode, seed=seed, input_range=loaded.input_range, progress=progress,
                        param=param, to_input=loaded.profile.from_unit)
    timings = {}

    start = time.perf_counter()
    sweep_objs = [class_logit(c) for _ in tv_weights for c in classes]
    sweep_tvs = [w for w in tv_weights for _ in classes]
    sweep = maximize(loaded.model, sweep_objs, shape, replace(base, tv_weight=sweep_tvs))
    timings["sweep"] = time.perf_counter() - start
    probs = np.array([[float(sweep.probabilities[i * len(classes) + j, c]) for j, c in enumerate(classes)]
                      for i in range(len(tv_weights))])
    chosen, why = choose_tv_weight(tv_weights, probs)
    records = image_records(sweep, sweep_objs, [[c] for _ in tv_weights for c in classes], sweep_tvs,
                            [f"class{c}_tv{w:g}" for w in tv_weights for c in classes], loaded.class_names)

    pair_result, pair_records = None, []
    if pairs:
        start = time.perf_counter()
        pair_objs = [pair_objective(a, b, mode) for a, b in pairs]
        # pairs are few and harder (two classes must both win): twice the steps, measured to be needed
        pair_result = maximize(loaded.model, pair_objs, shape, replace(base, tv_weight=chosen, steps=2 * steps))
        timings["pairs"] = time.perf_counter() - start
        pair_records = image_records(pair_result, pair_objs, [list(p) for p in pairs], [chosen] * len(pairs),
                                     [f"pair{a}+{b}" for a, b in pairs], loaded.class_names)
        for rec in pair_records:
            rec["both_top2"] = sorted(rec["top2"]) == sorted(loaded.class_names[t] for t in rec["targets"])

    chan_result, chan_records = None, []
    if layer is not None and channels:
        start = time.perf_counter()
        chan_objs = [channel(layer, k) for k in channels]
        chan_result = maximize(loaded.model, chan_objs, shape, replace(base, tv_weight=chosen))
        timings["channels"] = time.perf_counter() - start
        chan_records = image_records(chan_result, chan_objs, [[] for _ in channels], [chosen] * len(channels),
                                     [f"{layer}_ch{k}" for k in channels], loaded.class_names)

    figures = {"sweep": aplots.plot_sweep(sweep.display, classes, tv_weights, chosen, probs, loaded,
                                          out / "sweep.png").name}
    row = tv_weights.index(chosen)
    chosen_images = sweep.display[row * len(classes):(row + 1) * len(classes)]
    figures["chosen"] = aplots.plot_row(chosen_images, [f"{loaded.class_names[c]}\np={probs[row, j]:.2f}"
                                                        for j, c in enumerate(classes)],
                                        f"Class images at the chosen tv weight {chosen:g}", out / "chosen.png").name
    for rec, img in zip(pair_records, pair_result.display if pair_result is not None else []):
        figures[rec["name"]] = aplots.plot_pair(img, rec, loaded, out / f"{rec['name']}.png").name
    if chan_result is not None:
        figures["channels"] = aplots.plot_row(chan_result.display, [f"{layer}[{k}]" for k in channels],
                                              f"{layer}: images maximizing each channel (tv {chosen:g})",
                                              out / f"channels_{layer}.png").name
    images_dir = ensure_dir(out / "images")
    for rec, img in zip(records + pair_records + chan_records,
                        torch.cat([r.display for r in (sweep, pair_result, chan_result) if r is not None])):
        rec["image"] = "images/" + aplots.save_image(img, loaded, images_dir / f"{rec['name']}.png").name
        write_json(images_dir / f"{rec['name']}.json", rec)
    summary = {"mode": mode, "steps": steps, "seed": seed, "classes": classes, "tv_weights": tv_weights,
               "chosen_tv_weight": chosen, "choice": why, "criterion": CRITERION,
               "probabilities": probs.tolist(), "images": records, "pairs": pair_records,
               "channels": chan_records, "figures": figures, "seconds": timings}
    write_json(out / "actmax.json", summary)
    return summary

