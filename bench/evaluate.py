"""Faithfulness timing: 100 MNIST test images × all fast methods × deletion + insertion on the lab
network (target ≤ 60 s), and the five shipped photos on EfficientNet-Lite0 (target ≤ 3 min).

    python bench/evaluate.py --model RUN [--threads 2] [--skip-imagenet]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import setup  # noqa: E402
from convlens.evaluation.run import evaluate  # noqa: E402
from convlens.models import load_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="a trained run folder")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-imagenet", action="store_true")
    args = ap.parse_args()
    setup(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        s = evaluate(load_model(args.model), Path(tmp) / "mnist", mnist_test=100, sanity_images=0, progress=False)
        print(f"MNIST, 100 images × {len(s['methods'])} methods, deletion+insertion+AD/IC: "
              f"{time.perf_counter() - start:.1f} s (target ≤ 60 s)")
        if not args.skip_imagenet:
            start = time.perf_counter()
            s = evaluate(load_model("efficientnet-lite0"), Path(tmp) / "imagenet", sanity_images=0, progress=False)
            print(f"EfficientNet-Lite0, {len(s['images'])} photos × {len(s['methods'])} methods: "
                  f"{time.perf_counter() - start:.1f} s (target ≤ 180 s)")


if __name__ == "__main__":
    main()
