"""Integrated gradients on EfficientNet-Lite0: completeness gap |Σ IG − (y(x) − y(x0))| / |y(x) − y(x0)|
by number of steps, for the shipped photos (zero and black baselines), and the steps the default chooses.

    python bench/ig_completeness.py [--photos 2] [--threads 2]
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import torch  # noqa: E402

from common import setup  # noqa: E402
from convlens.attribution.gradient import IntegratedGradients  # noqa: E402
from convlens.data.images import open_image, sample_photo_paths  # noqa: E402
from convlens.models import load_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--photos", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    setup(args.threads)
    warnings.simplefilter("ignore")
    loaded = load_model("efficientnet-lite0")
    paths = sample_photo_paths()[:args.photos]
    x = torch.stack([loaded.preprocess(open_image(p)) for p in paths])
    print(f"photos: {', '.join(p.name for p in paths)}")
    for baseline in ("zero", "min"):
        options = {"baseline": baseline, "input_range": loaded.input_range, "batch_size": 64}
        for steps in (32, 96, 288):
            gap = IntegratedGradients(loaded.model, steps=steps, **options).attribute(x).extras["completeness_gap"]
            print(f"baseline {baseline:<4} {steps:>3} steps: gap " + ", ".join(f"{g:.1%}" for g in gap.tolist()))
        auto = IntegratedGradients(loaded.model, **options).attribute(x).extras
        print(f"baseline {baseline:<4} default: steps {auto['steps'].tolist()}, gap "
              + ", ".join(f"{g:.1%}" for g in auto["completeness_gap"].tolist()))


if __name__ == "__main__":
    main()
