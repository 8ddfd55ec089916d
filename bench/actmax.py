"""The lab's activation-maximization sweep (10 classes × 8 tv weights, 200 steps) in one batch,
against the same 80 images one at a time with the same code and a plain batched Adam + TV loop.

    python bench/actmax.py [--model RUN] [--threads 2]       targets: speed-up ≥ 5×, engine ≤ plain loop
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
    x = (0.2 + 0.1 * torch.randn(len(classes), 1, 28, 28)).clamp(0, 1).requires_grad_(True)
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=200)
    args = ap.parse_args()
    setup(args.threads)
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
