"""Filter statistics: one pass over the 10,000 test images (l1–l3) against a bare forward pass.

    python bench/stats.py [--model RUN] [--threads 2]        target: ratio ≤ 2
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import torch  # noqa: E402

from common import interleaved, setup  # noqa: E402
from convlens import stats  # noqa: E402
from convlens.data import load_mnist  # noqa: E402
from convlens.models import LabNet, load_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="a run folder (default: an untrained lab network)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    setup(args.threads)
    model = load_model(args.model).model if args.model else LabNet().eval()
    x, y = load_mnist("test").tensors()
    batches = list(stats.tensor_batches(x, y, 500))

    def forward():
        with torch.no_grad():
            for xb, _ in batches:
                model(xb)

    t = interleaved({"forward": forward, "stats": lambda: stats.collect(model, batches, ["l1", "l2", "l3"], 10)})
    print(f"bare forward {t['forward']:.3f} s, statistics pass {t['stats']:.3f} s, "
          f"ratio {t['stats'] / t['forward']:.2f} (target ≤ 2)")


if __name__ == "__main__":
    main()
