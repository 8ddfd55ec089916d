"""Training speed: convlens's epoch against a minimal plain-PyTorch loop (same net, batch, optimizer).

    python bench/train.py [--threads 2] [--epochs 3] [--full] [--seeds 0,1,2]

--full also trains the default recipe to the end for each seed and prints its test accuracy, its time, and
that time in plain-loop epochs measured in the same run (the machine-independent figure: a quiet 2-core
machine runs a plain epoch in about 5.2 s, GUIDE §8, so 3 minutes ≈ 35 plain epochs).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from common import setup  # noqa: E402
from convlens.models import LabNet  # noqa: E402
from convlens.training import RECIPES, make_recipe, prepare_data, train, train_one_epoch  # noqa: E402


def plain_epoch(model, opt, x, y, batch_size, gen):
    model.train()
    perm = torch.randperm(len(x), generator=gen)
    for i in range(0, len(x), batch_size):
        idx = perm[i:i + batch_size]
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--seeds", default="0", help="seeds for --full, e.g. 0,1,2")
    ap.add_argument("--recipe", default="best")
    args = ap.parse_args()
    setup(args.threads)
    (xtr, ytr), _, _ = prepare_data(0)
    recipe = RECIPES["lab"]
    ours, plain = LabNet().to(memory_format=torch.channels_last), LabNet()
    opt_ours = torch.optim.Adam(ours.parameters(), lr=recipe.lr)
    opt_plain = torch.optim.Adam(plain.parameters(), lr=recipe.lr)
    t_ours, t_plain = [], []
    for epoch in range(args.epochs):  # alternate, so machine noise hits both alike
        start = time.perf_counter()
        train_one_epoch(ours, opt_ours, xtr, ytr, recipe, epoch, 0, progress=False)
        t_ours.append(time.perf_counter() - start)
        start = time.perf_counter()
        plain_epoch(plain, opt_plain, xtr, ytr, recipe.batch_size, torch.Generator().manual_seed(epoch))
        t_plain.append(time.perf_counter() - start)
    med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    print(f"threads {args.threads}, {len(xtr):,} training images, batch {recipe.batch_size}, Adam {recipe.lr}")
    print(f"convlens epoch (lab recipe): {med(t_ours):.2f} s   plain loop: {med(t_plain):.2f} s   "
          f"ratio {med(t_ours) / med(t_plain):.2f} (target ≤ 1.0)")
    if args.full:
        recipe = make_recipe(args.recipe)
        for seed in [int(v) for v in args.seeds.split(",")]:
            with tempfile.TemporaryDirectory() as tmp:
                start = time.perf_counter()
                m = train(tmp, recipe, seed=seed, progress=False)
                seconds = time.perf_counter() - start
            start = time.perf_counter()  # the reference, right after: the same machine load
            reference = LabNet()
            plain_epoch(reference, torch.optim.Adam(reference.parameters()), xtr, ytr, 256,
                        torch.Generator().manual_seed(seed))
            plain = time.perf_counter() - start
            print(f"recipe {recipe.name} seed {seed}: test accuracy {m['test_accuracy']:.4f}, test loss "
                  f"{m['test_loss']:.4f}, {seconds:.0f} s = {seconds / plain:.1f} plain epochs "
                  f"(≈ {seconds / plain * 5.2 / 60:.1f} min on a quiet 2-core machine)", flush=True)


if __name__ == "__main__":
    main()
