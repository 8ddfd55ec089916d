"""`convlens actmax`: the lab's tv-weight sweep, the chosen weight, pairs of classes, channel grids."""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
import torch

from ..errors import ConvlensError
from ..hooks import resolve_layer
from ..io import ensure_dir, write_json
from ..models.registry import LoadedModel
from .objectives import LOGITS, Objective, channel, class_logit, soft_min, strongest_other_logit
from .judge import CLASSIFIERS, judge_images, load_judge
from .optimize import ActMaxConfig, ActMaxResult, maximize

LAB_TV_WEIGHTS = [0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0]
LAB_PAIRS = [(1, 7), (4, 9), (0, 1), (7, 8)]
PRIORS = ("default", "generator")
CHOICE_PROBABILITY = 0.9
CRITERION_JUDGE = (f"among the tv weights at which every class image is classified as its target by the network with "
                   f"probability ≥ {CHOICE_PROBABILITY}, the one at which an independent judge (two classifiers of other "
                   f"shapes trained on the same data) recognizes the most class images; ties go to the "
                   f"higher mean judge probability, then to the smaller weight")
PAIR_CRITERION = ("per pair, among the tv weights at which the network puts both targets in its top two (all "
                  "weights if at none), the one whose image the judge recognizes; ties go to the higher judge "
                  "probability, then to the smaller weight")
CRITERION_OWN = (f"the largest tv weight at which every class image is classified as its target with "
                 f"probability ≥ {CHOICE_PROBABILITY} (else the weight with the best worst-case probability)")
# Small grayscale networks (measured with bench/actmax.py --realism, docs/activation-maximization.md): start
# from the training mean image with little noise, L2 decay outside the central 20×20 box, 3-px zero-padded jitter.
GRAYSCALE_BORDER_DECAY = 200.0
GRAYSCALE_DECAY = 20.0
GRAYSCALE_INIT_NOISE = 0.05
GENERATOR_RESTARTS = 4
PAIR_START_TOP = 32  # default mode: pairs start from the mean of the network's 32 most pair-like training images
PAIR_START_POOL = 20000  # … of the first 20000 (a forward pass: 2.7 s CPU on one core, MNIST loading included)
PAIR_RESTARTS = 1  # default and kerasvis modes
PAIR_STEPS_FACTOR = 2
# in the lab's cache key: a lab folder made with another pair method redoes its actmax stage
PAIR_METHOD = "margin objective, start from the 32 most pair-like training images, per-pair tv weight by the judge"


def pair_objective(a: int, b: int, mode: str) -> Objective:
    """keras-vis maximizes the sum of both logits, z_a + z_b. The default mode maximizes the margin

        softmin(z_a, z_b) − max_{c ∉ {a, b}} z_c,   softmin(u, v) = −log(e^−u + e^−v),

    so the easier class cannot win alone (the smooth minimum, measured better than that of the
    log-probabilities) and no third class may rise with them (measured: docs/activation-maximization.md)."""
    if mode == "kerasvis":
        return class_logit(a) + class_logit(b)
    return soft_min(class_logit(a), class_logit(b), temperature=1.0) - strongest_other_logit((a, b))


def choose_pair_weight(tv_weights: Sequence[float], both_top2: Sequence[bool], recognized: Sequence[bool],
                       judge_probability: Sequence[float]) -> tuple[int, str]:
    """One pair's tv weight (its index) and why: among the weights at which the network puts both targets in
    its top two (all weights if at none), the one whose image the judge recognizes; ties go to the higher
    judge probability, then to the smaller weight.

    A weight's key depends only on that weight's image, so adding weights that are not better never moves
    the choice."""
    eligible = [i for i, ok in enumerate(both_top2) if ok] or list(range(len(tv_weights)))
    i = min(eligible, key=lambda j: (not recognized[j], -judge_probability[j], tv_weights[j]))
    network = ("the network puts both in its top two" if both_top2[i]
               else "the network puts both in its top two at no weight")
    verdict = "recognized" if recognized[i] else "not recognized"
    return i, (f"{network}; the judge: {verdict} at {sum(map(bool, recognized))} of {len(tv_weights)} weights, "
               f"probability {judge_probability[i]:.3f} at this one")


def choose_by_own_probability(tv_weights: Sequence[float], probs: np.ndarray) -> tuple[float, str]:
    """``probs[i, j]``: probability of class j's target on its image at ``tv_weights[i]``."""
    worst = probs.min(1)
    ok = [i for i in range(len(tv_weights)) if worst[i] >= CHOICE_PROBABILITY]
    if ok:
        i = max(ok, key=lambda j: tv_weights[j])
        return tv_weights[i], f"largest weight with every class ≥ {CHOICE_PROBABILITY} (worst {worst[i]:.3f})"
    i = int(worst.argmax())
    return tv_weights[i], f"no weight reached {CHOICE_PROBABILITY} for every class; best worst case {worst[i]:.3f}"


def choose_by_judge(tv_weights: Sequence[float], probs: np.ndarray, counts: Sequence[int],
                    judge_means: Sequence[float]) -> tuple[float, str]:
    """The most judge-recognized images among the weights where the network's own worst target probability is
    ≥ CHOICE_PROBABILITY (all weights if none is); ties: higher mean judge probability, then smaller weight.

    The key of a weight depends only on that weight's images, so adding weights that are not better never
    moves the choice."""
    worst = probs.min(1)
    eligible = [i for i in range(len(tv_weights)) if worst[i] >= CHOICE_PROBABILITY] or list(range(len(tv_weights)))
    i = min(eligible, key=lambda j: (-counts[j], -judge_means[j], tv_weights[j]))
    note = "" if worst[i] >= CHOICE_PROBABILITY else f"; no weight reached {CHOICE_PROBABILITY} for every class"
    return tv_weights[i], (f"judge recognizes {counts[i]}/{probs.shape[1]} class images (mean probability "
                           f"{judge_means[i]:.3f}); the network's worst target probability {worst[i]:.3f}{note}")


def dataset_of(loaded: LoadedModel) -> str | None:
    """The training data set of the model when convlens has it ("mnist"), from the model profile."""
    return loaded.profile.dataset


def repeat_per_image(init: torch.Tensor | None, n: int, dims: int, times: int) -> torch.Tensor | None:
    """One start image per objective, (n, C, H, W), repeated ``times`` each; a shared start stays as it is."""
    if init is None or init.dim() == dims or init.shape[0] == 1 or init.shape[0] != n:
        return init
    return init.repeat_interleave(times, dim=0)


def pair_start_images(loaded: LoadedModel, objectives: list[Objective], k: int | None = None,
                      pool: int | None = None) -> torch.Tensor:
    """Per pair objective, the mean of the ``k`` images among the first ``pool`` MNIST training images that the
    network scores highest on it (the network's own most pair-like digits), in the model's input range:
    the pairs' data-informed start, as the training mean is the class images'. Shape (len(objectives), C, H, W)."""
    from ..data.mnist import load_mnist

    k, pool = k or PAIR_START_TOP, pool or PAIR_START_POOL
    x, _ = load_mnist("train").tensors()
    lo, hi = loaded.input_range
    x = lo + (hi - lo) * x[:pool]
    device = loaded.device
    with torch.no_grad():
        logits = torch.cat([loaded.model(x[i:i + 2000].to(device)) for i in range(0, len(x), 2000)])
    starts = [x[objective({LOGITS: logits}).topk(min(k, len(x))).indices.cpu()].mean(0) for objective in objectives]
    return torch.stack(starts)


def training_mean_image(loaded: LoadedModel) -> torch.Tensor:
    """The mean MNIST training image, mapped into the model's input range."""
    from ..data.mnist import load_mnist

    x, _ = load_mnist("train").tensors()
    lo, hi = loaded.input_range
    return lo + (hi - lo) * x.mean(0)


def base_config(loaded: LoadedModel, steps: int, mode: str, seed: int, param: str, prior: str,
                progress: bool) -> ActMaxConfig:
    """The engine's settings for this model: the grayscale recipe, the colour mapping or the generator prior."""
    shape = tuple(loaded.profile.input_shape)
    cfg = ActMaxConfig(steps=steps, mode=mode, seed=seed, input_range=loaded.input_range, progress=progress,
                       param=param, to_input=loaded.profile.from_unit)
    if mode == "kerasvis":
        return cfg
    if prior == "generator":
        from .generator import load_decoder

        decoder, _ = load_decoder()
        device = next(loaded.model.parameters()).device
        return replace(cfg, decoder=decoder.to(device), param="pixel")
    if shape[0] == 1 and param == "pixel":
        init = training_mean_image(loaded) if dataset_of(loaded) == "mnist" else None
        return replace(cfg, init=init, init_noise=GRAYSCALE_INIT_NOISE, decay=GRAYSCALE_DECAY,
                       border_decay=GRAYSCALE_BORDER_DECAY)
    return cfg


def maximize_with_restarts(model, objectives: list[Objective], shape, cfg: ActMaxConfig,
                           restarts: int) -> ActMaxResult:
    """``restarts`` random starts per objective (seeds seed·1000 + r) in one batch; per objective the start
    whose final objective value is the highest is kept."""
    if restarts <= 1:
        return maximize(model, objectives, shape, cfg)
    n = len(objectives)
    tv = per_image(cfg.tv_weight, n)
    seed = int(cfg.seed) if isinstance(cfg.seed, (int, float)) else None
    if seed is None:
        raise ConvlensError("restarts take one seed for all images")
    batch = maximize(model, [o for o in objectives for _ in range(restarts)], shape,
                     replace(cfg, tv_weight=[w for w in tv for _ in range(restarts)],
                             seed=[seed * 1000 + r for _ in range(n) for r in range(restarts)],
                             init=repeat_per_image(cfg.init, n, len(shape), restarts)))
    best = batch.objective.view(n, restarts).argmax(1) + torch.arange(n, device=batch.objective.device) * restarts
    return ActMaxResult(batch.images[best], batch.display[best], batch.objective[best], batch.tv[best],
                        batch.probabilities[best], batch.history)


@dataclass
class PairRun:
    """Every pair optimized at every weight of ``tv_weights``; per pair, the image at its chosen weight."""
    tv_weights: list[float]
    sweep: ActMaxResult          # image i·P + j: pair j at weight i (P pairs)
    sweep_records: list[dict]    # the same order
    chosen_rows: list[int]       # per pair, its row in ``sweep``
    records: list[dict]          # per pair, the record of the chosen image with the per-weight summary

    @property
    def images(self) -> torch.Tensor:
        return self.sweep.display[self.chosen_rows]

    def judge_counts(self) -> list[int]:
        """Per weight: how many pairs the judge recognizes."""
        p = len(self.records)
        return [sum(r["judge_recognized"] for r in self.sweep_records[i * p:(i + 1) * p])
                for i in range(len(self.tv_weights))]


def pair_restarts(prior: str, restarts: int | None) -> int:
    """Random starts per pair image: ``--restarts`` when given, else the mode's default for pairs."""
    if restarts is not None:
        return restarts
    return GENERATOR_RESTARTS if prior == "generator" else PAIR_RESTARTS


def optimize_pairs(model, objectives: list[Objective], tv_weights: list[float], shape, cfg: ActMaxConfig,
                   restarts: int) -> ActMaxResult:
    """Every pair objective at every weight in one batch (weight-major), with PAIR_STEPS_FACTOR × the steps:
    two classes must both win. Per image the start the network scores highest is kept."""
    objs = [o for _ in tv_weights for o in objectives]
    tvs = [w for w in tv_weights for _ in objectives]
    return maximize_with_restarts(model, objs, shape,
                                  replace(cfg, tv_weight=tvs, steps=PAIR_STEPS_FACTOR * cfg.steps), restarts)


def sweep_entry(record: dict) -> dict:
    """What ``actmax.json`` keeps of a pair image at one weight of the sweep."""
    keys = ("tv_weight", "target_probabilities", "top2", "both_top2", "judge_recognized", "judge_probability",
            "judge_top_by", "judge_recognized_by")
    return {k: record[k] for k in keys if k in record}


def run_pairs(loaded: LoadedModel, pairs: list[tuple[int, int]], mode: str, tv_weights: list[float],
              cfg: ActMaxConfig, restarts: int, judge) -> PairRun:
    """Optimize the pairs at every weight and choose each pair's weight (``choose_pair_weight``; without a
    judge ``tv_weights`` holds one weight)."""
    objectives = [pair_objective(a, b, mode) for a, b in pairs]
    starts = None
    if cfg.init is not None and cfg.decoder is None and mode == "default":  # the grayscale recipe's mean start
        starts = pair_start_images(loaded, objectives)
        cfg = replace(cfg, init=starts.repeat(len(tv_weights), 1, 1, 1))
    sweep = optimize_pairs(loaded.model, objectives, tv_weights, loaded.profile.input_shape, cfg, restarts)
    targets = [list(p) for _ in tv_weights for p in pairs]
    records = image_records(sweep, [o for _ in tv_weights for o in objectives], targets,
                            [w for w in tv_weights for _ in pairs],
                            [f"pair{a}+{b}_tv{w:g}" for w in tv_weights for a, b in pairs], loaded.class_names)
    for rec in records:
        rec["both_top2"] = both_in_top2(rec, loaded.class_names)
    if judge is not None:
        add_verdicts(records, judge_images(judge, sweep.display, targets), loaded.class_names)
    chosen_rows, kept = [], []
    for j, (a, b) in enumerate(pairs):
        rows = [i * len(pairs) + j for i in range(len(tv_weights))]
        if judge is None:
            i, why = 0, "the class images' tv weight (no judge for this model)"
        else:
            i, why = choose_pair_weight(tv_weights, [records[r]["both_top2"] for r in rows],
                                        [records[r]["judge_recognized"] for r in rows],
                                        [records[r]["judge_probability"] for r in rows])
        chosen_rows.append(rows[i])
        kept.append({**records[rows[i]], "name": f"pair{a}+{b}", "tv_choice": why,
                     "sweep": [sweep_entry(records[r]) for r in rows]})
    if starts is not None and judge is not None:  # how much of the verdict the start alone would get
        lo, hi = loaded.input_range
        start_verdict = judge_images(judge, (starts - lo) / (hi - lo), [list(p) for p in pairs])
        for rec, ok in zip(kept, start_verdict.recognized):
            rec["start_judge_recognized"] = ok
    return PairRun(list(tv_weights), sweep, records, chosen_rows, kept)


def both_in_top2(record: dict, class_names: list[str]) -> bool:
    return sorted(record["top2"]) == sorted(class_names[t] for t in record["targets"])


def per_image(weights, n: int) -> list[float]:
    values = [float(weights)] * n if isinstance(weights, (int, float)) else [float(w) for w in weights]
    if len(values) != n:
        raise ConvlensError(f"{len(values)} tv weights for {n} images")
    return values


def validate(loaded: LoadedModel, classes, pairs, layer, channels, tv_weights, steps, prior="default",
             mode="default", restarts=None) -> None:
    n = len(loaded.class_names)
    if restarts is not None and restarts < 1:
        raise ConvlensError(f"--restarts must be at least 1, got {restarts}")
    if prior not in PRIORS:
        raise ConvlensError(f"unknown prior {prior!r}; use {' or '.join(PRIORS)}")
    if prior == "generator" and (mode != "default" or dataset_of(loaded) != "mnist"):
        raise ConvlensError("--prior generator needs the default mode and an MNIST model (the generator is an MNIST VAE)")
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
           seed: int = 0, param: str = "pixel", progress: bool = True, prior: str = "default",
           restarts: int | None = None) -> dict:
    """Run the sweep (classes × tv weights), pairs and channels; write figures and JSON into ``out``.

    For MNIST models an independent judge (``judge.py``) scores every image and chooses the tv weight.
    """
    from ..plots import actmax as aplots

    out = ensure_dir(out)
    classes, tv_weights, pairs, channels = list(classes), list(tv_weights), list(pairs), list(channels)
    validate(loaded, classes, pairs, layer, channels, tv_weights, steps, prior, mode, restarts)
    shape = loaded.profile.input_shape
    base = base_config(loaded, steps, mode, seed, param, prior, progress)
    pair_starts = pair_restarts(prior, restarts)
    restarts = (GENERATOR_RESTARTS if prior == "generator" else 1) if restarts is None else restarts
    judge = load_judge()[0] if dataset_of(loaded) == "mnist" else None
    timings = {}

    start = time.perf_counter()
    sweep_objs = [class_logit(c) for _ in tv_weights for c in classes]
    sweep_tvs = [w for w in tv_weights for _ in classes]
    sweep = maximize_with_restarts(loaded.model, sweep_objs, shape, replace(base, tv_weight=sweep_tvs), restarts)
    timings["sweep"] = time.perf_counter() - start
    k = len(classes)
    probs = np.array([[float(sweep.probabilities[i * k + j, c]) for j, c in enumerate(classes)]
                      for i in range(len(tv_weights))])
    records = image_records(sweep, sweep_objs, [[c] for _ in tv_weights for c in classes], sweep_tvs,
                            [f"class{c}_tv{w:g}" for w in tv_weights for c in classes], loaded.class_names)
    judged = None
    if judge is not None:
        verdict = judge_images(judge, sweep.display, [[c] for _ in tv_weights for c in classes])
        add_verdicts(records, verdict, loaded.class_names)
        judged = {"counts": [sum(verdict.recognized[i * k:(i + 1) * k]) for i in range(len(tv_weights))],
                  "mean_probability": [float(np.mean(verdict.probabilities[i * k:(i + 1) * k]))
                                       for i in range(len(tv_weights))]}
        chosen, why = choose_by_judge(tv_weights, probs, judged["counts"], judged["mean_probability"])
    else:
        chosen, why = choose_by_own_probability(tv_weights, probs)

    pair_run = None
    if pairs:
        start = time.perf_counter()
        # with a judge every pair gets its own weight from the sweep; without one, the class images' weight
        pair_run = run_pairs(loaded, pairs, mode, tv_weights if judge is not None else [chosen], base,
                             pair_starts, judge)
        timings["pairs"] = time.perf_counter() - start
    pair_records = pair_run.records if pair_run else []

    chan_result, chan_records = None, []
    if layer is not None and channels:
        start = time.perf_counter()
        chan_objs = [channel(layer, k) for k in channels]
        chan_result = maximize_with_restarts(loaded.model, chan_objs, shape, replace(base, tv_weight=chosen), restarts)
        timings["channels"] = time.perf_counter() - start
        chan_records = image_records(chan_result, chan_objs, [[] for _ in channels], [chosen] * len(channels),
                                     [f"{layer}_ch{k}" for k in channels], loaded.class_names)

    label = PRIOR_LABELS[prior if mode == "default" else "kerasvis"]
    counts = judged["counts"] if judged else None
    pair_counts = pair_run.judge_counts() if pair_run and judge is not None else None
    figures = {"sweep": aplots.plot_sweep(sweep.display, classes, tv_weights, chosen, probs, loaded,
                                          out / "sweep.png", counts=counts, label=label,
                                          pair_counts=pair_counts).name}
    row = tv_weights.index(chosen)
    chosen_images = sweep.display[row * k:(row + 1) * k]
    figures["chosen"] = aplots.plot_row(chosen_images, [f"{loaded.class_names[c]}\np={probs[row, j]:.2f}"
                                                        for j, c in enumerate(classes)],
                                        f"{label}: class images at the chosen tv weight {chosen:g}",
                                        out / "chosen.png").name
    if pair_run is not None:
        for rec, img in zip(pair_records, pair_run.images):
            figures[rec["name"]] = aplots.plot_pair(img, rec, loaded, out / f"{rec['name']}.png").name
        if len(pair_run.tv_weights) > 1:
            figures["pair_sweep"] = aplots.plot_pair_sweep(pair_run.sweep.display, pairs, pair_run.tv_weights,
                                                           pair_run.chosen_rows, pair_run.sweep_records, loaded,
                                                           out / "pair_sweep.png", label=label).name
    if chan_result is not None:
        figures["channels"] = aplots.plot_row(chan_result.display, [f"{layer}[{k}]" for k in channels],
                                              f"{layer}: images maximizing each channel (tv {chosen:g})",
                                              out / f"channels_{layer}.png").name
    images_dir = ensure_dir(out / "images")
    for rec, img in zip(records + pair_records + chan_records,
                        torch.cat([sweep.display] + ([pair_run.images] if pair_run else [])
                                  + ([chan_result.display] if chan_result is not None else []))):
        rec["image"] = "images/" + aplots.save_image(img, loaded, images_dir / f"{rec['name']}.png").name
        write_json(images_dir / f"{rec['name']}.json", rec)
    summary = {"mode": mode, "prior": prior, "label": label, "steps": steps, "seed": seed, "restarts": restarts,
               "pair_restarts": pair_starts,
               "pair_steps": PAIR_STEPS_FACTOR * steps, "pair_criterion": PAIR_CRITERION if judge is not None else None,
               "pair_tv_weights": pair_run.tv_weights if pair_run else [],
               "classes": classes, "tv_weights": tv_weights, "chosen_tv_weight": chosen, "choice": why,
               "criterion": CRITERION_JUDGE if judge is not None else CRITERION_OWN,
               "probabilities": probs.tolist(), "images": records, "pairs": pair_records,
               "channels": chan_records, "figures": figures, "seconds": timings}
    if judged is not None:
        summary["judge"] = {**judged, "description": JUDGE_DESCRIPTION, "test_accuracy": load_judge()[1]["test_accuracy"],
                            "pairs_recognized": sum(r["judge_recognized"] for r in pair_records),
                            "pair_counts": pair_counts,
                            "pairs_recognized_by": {name: sum(r["judge_recognized_by"][name] for r in pair_records)
                                                    for name in CLASSIFIERS}}
    write_json(out / "actmax.json", summary)
    return summary


PRIOR_LABELS = {"default": "Activation maximization (pixels, mean-image start)",
                "kerasvis": "Activation maximization (keras-vis 0.4.1 reproduction)",
                "generator": "What the network accepts as the class (generator prior)"}
JUDGE_DESCRIPTION = ("two classifiers of other shapes than the network (a strided CNN without max-pooling and a "
                     "one-hidden-layer MLP), trained once on the same MNIST training set; an image counts as "
                     "recognized when both put its target first (a pair: both targets in both top twos)")


def add_verdicts(records: list[dict], verdict, class_names: list[str]) -> None:
    for rec, ok, p, top, each, tops in zip(records, verdict.recognized, verdict.probabilities, verdict.top,
                                           verdict.by_classifier, verdict.top_by_classifier):
        rec.update(judge_recognized=ok, judge_probability=p, judge_top=[class_names[t] for t in top],
                   judge_recognized_by=each,
                   judge_top_by={name: [class_names[t] for t in top_classes] for name, top_classes in tops.items()})

