"""The lab's activation-maximization sweep (10 classes × 8 tv weights, 200 steps) in one batch,
against the same 80 images one at a time with the same code and a plain batched Adam + TV loop.

    python bench/actmax.py [--model RUN] [--threads 2]       targets: speed-up ≥ 5×, engine ≤ plain loop
    python bench/actmax.py --realism --model RUN[,RUN2,...] [--modes default,kerasvis,generator] [--seeds 0]
    python bench/actmax.py --pair-ceiling

--pair-ceiling asks what the judge accepts as a pair at all: real training images of either class, and 200
overlays (pixel maximum) of a real image of each class, counted as the pair verdict counts them.

--realism runs `convlens actmax` as a user would, for each network, mode (prior) and seed, and prints what
the independent judge recognizes per tv weight (class images and pairs), the chosen weight, each pair's
weight and verdict, and the seconds (targets, default mode and generator prior: ≥ 9 of 10 class images at
the chosen weight, ≥ 3 of 4 pairs with both digits in the judge's top two).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import torch  # noqa: E402

from common import setup  # noqa: E402
from convlens.featvis import ActMaxConfig, class_logit, maximize  # noqa: E402
from convlens.featvis.regularizers import total_variation  # noqa: E402
from convlens.featvis.run import LAB_TV_WEIGHTS  # noqa: E402
from convlens.models import LabNet, load_model  # noqa: E402


def plain_loop(model, classes, weights, steps):
    for p in model.parameters():
        p.requires_grad_(False)
    x = (0.2 + 0.1 * torch.randn(len(classes), 1, 28, 28)).clamp(0, 1).requires_grad_(True)  # old start
    opt = torch.optim.Adam([x], lr=0.05)
    for _ in range(steps):
        loss = (-model(x).gather(1, classes[:, None])[:, 0] + weights * 28 * total_variation(x)
                + 20 * x.pow(2).flatten(1).mean(1)).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            x.clamp_(0, 1)
    for p in model.parameters():
        p.requires_grad_(True)


def realism_lines(name: str, model: str, seed: int, s: dict) -> list[str]:
    """One mode on one network: the judge's counts per tv weight (class images, pairs), the chosen weight,
    each pair's weight and verdict, the seconds."""
    judge = s["judge"]
    counts = "  ".join(f"{w:g}:{c}" for w, c in zip(s["tv_weights"], judge["counts"]))
    pair_counts = "  ".join(f"{w:g}:{c}" for w, c in zip(s["pair_tv_weights"], judge.get("pair_counts") or []))
    pairs = [f"{r['targets'][0]}&{r['targets'][1]}@{r['tv_weight']:g}:{'yes' if r['judge_recognized'] else 'no'}"
             f"({'/'.join(','.join(t) for t in r['judge_top_by'].values())})" for r in s["pairs"]]
    k = s["tv_weights"].index(s["chosen_tv_weight"])
    return [f"{name:9s} {model} seed {seed}: class images the judge recognizes per tv weight  {counts}",
            f"{'':10s}chosen tv {s['chosen_tv_weight']:g} → {judge['counts'][k]}/{len(s['classes'])}",
            f"{'':10s}pairs the judge recognizes per tv weight  {pair_counts}",
            f"{'':10s}pairs, both in the judge's top two (CNN/MLP): {judge['pairs_recognized']}/{len(pairs)}  "
            f"{' '.join(pairs)}",
            f"{'':10s}seconds: sweep {s['seconds']['sweep']:.1f}, pairs {s['seconds'].get('pairs', 0):.1f}"]


def realism(models: list[str], modes: list[str], seeds: list[int], steps: int) -> None:
    """Run `convlens actmax` as a user would for every network, mode and seed; print the judge's verdicts and a
    closing table (class images at the chosen weight, pairs, seconds)."""
    import tempfile

    from convlens.featvis.run import actmax

    table = []
    for model in models:
        loaded = load_model(model)
        for name in modes:
            mode, prior = ("kerasvis", "default") if name == "kerasvis" else ("default", name)
            for seed in seeds:
                with tempfile.TemporaryDirectory() as tmp:
                    s = actmax(loaded, tmp, steps=steps, mode=mode, prior=prior, seed=seed, progress=False)
                print("\n".join(realism_lines(name, model, seed, s)), flush=True)
                k = s["tv_weights"].index(s["chosen_tv_weight"])
                table.append((model, name, seed, s["chosen_tv_weight"], s["judge"]["counts"][k],
                              s["judge"]["pairs_recognized"], s["seconds"]["sweep"], s["seconds"].get("pairs", 0)))
    print("\nnetwork | mode | seed | chosen tv | class images recognized | pairs recognized (of 4) | seconds sweep | "
          "seconds pairs")
    for row in table:
        print("{} | {} | {} | {:g} | {} | {} | {:.1f} | {:.1f}".format(*row))


def pair_ceiling(overlays: int = 200) -> None:
    """How many real images, and overlays of two real images, the judge reads as each lab pair."""
    from convlens.data.mnist import load_mnist
    from convlens.featvis.judge import judge_images, load_judge
    from convlens.featvis.run import LAB_PAIRS

    x, y = load_mnist("train").tensors()
    judge = load_judge()[0]
    gen = torch.Generator().manual_seed(0)
    for a, b in LAB_PAIRS:
        either = (y == a) | (y == b)
        real = judge_images(judge, x[either], [[a, b]] * int(either.sum())).count
        xa, xb = (x[y == c][torch.randperm(int((y == c).sum()), generator=gen)[:overlays]] for c in (a, b))
        mixed = judge_images(judge, torch.maximum(xa, xb), [[a, b]] * overlays)
        by = {k: sum(e[k] for e in mixed.by_classifier) for k in ("cnn", "mlp")}
        print(f"{a}&{b}: real images of either class read as the pair {real} of {int(either.sum())}; "
              f"overlays {mixed.count} of {overlays} (cnn {by['cnn']}, mlp {by['mlp']})")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="a run folder; --realism: several, comma-separated")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--realism", action="store_true")
    ap.add_argument("--modes", default="default,kerasvis,generator")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--pair-ceiling", action="store_true")
    args = ap.parse_args()
    setup(args.threads)
    if args.pair_ceiling:
        pair_ceiling()
        return
    if args.realism:
        realism((args.model or "convlens-out/train").split(","), args.modes.split(","),
                [int(v) for v in args.seeds.split(",")], args.steps)
        return
    model = load_model(args.model).model if args.model else LabNet().eval()
    objs = [class_logit(c) for _ in LAB_TV_WEIGHTS for c in range(10)]
    tvs = [w for w in LAB_TV_WEIGHTS for _ in range(10)]
    cfg = ActMaxConfig(steps=args.steps, tv_weight=tvs)
    maximize(model, objs[:2], (1, 28, 28), ActMaxConfig(steps=5, tv_weight=tvs[:2]))  # warm-up

    times = {"batched": [], "plain": []}
    for _ in range(3):
        start = time.perf_counter()
        maximize(model, objs, (1, 28, 28), cfg)
        times["batched"].append(time.perf_counter() - start)
        start = time.perf_counter()
        plain_loop(model, torch.arange(10).repeat(8), torch.tensor(tvs), args.steps)
        times["plain"].append(time.perf_counter() - start)
    start = time.perf_counter()
    for obj, w in zip(objs, tvs):
        maximize(model, [obj], (1, 28, 28), ActMaxConfig(steps=args.steps, tv_weight=w))
    one_by_one = time.perf_counter() - start
    med = {k: sorted(v)[1] for k, v in times.items()}
    print(f"80 images × {args.steps} steps, {args.threads} threads")
    print(f"batched engine {med['batched']:.2f} s (target ≤ 3 s on a quiet 2-core machine), "
          f"plain batched loop {med['plain']:.2f} s (engine/plain {med['batched'] / med['plain']:.2f}), "
          f"one at a time {one_by_one:.2f} s → speed-up {one_by_one / med['batched']:.1f}× (target ≥ 5×)")


if __name__ == "__main__":
    main()
