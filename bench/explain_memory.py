"""Peak memory (RSS) of `convlens explain` over folders of 10, 100 and 1,000 small images.

Each run is its own process; its peak RSS comes from os.wait4. The lab network (untrained,
seeded: memory does not depend on the weights) and 28×28 digits; default methods.
Usage: python bench/explain_memory.py [N ...] [--methods a,b] [--batch-size B] [--model efficientnet-lite0]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def make_run(folder: Path) -> Path:
    import torch

    from convlens.io import save_torch
    from convlens.models.labnet import LabNet
    from convlens.training import checkpoint_dict

    torch.manual_seed(0)
    save_torch(folder / "model.pt", checkpoint_dict(LabNet(), {"seed": 0}))
    return folder


def make_images(folder: Path, n: int) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray((rng.random((28, 28)) * 255).astype(np.uint8)).save(folder / f"{i:05d}.png")
    return folder


def peak_rss(args: list[str]) -> tuple[float, float, int]:
    """(peak RSS in MiB, seconds, exit code) of ``python -m convlens ARGS``."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "convlens", *args], stdout=subprocess.DEVNULL)
    _pid, status, usage = os.wait4(proc.pid, 0)
    return usage.ru_maxrss / 1024, time.perf_counter() - start, os.waitstatus_to_exitcode(status)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("sizes", nargs="*", type=int, default=[10, 100, 1000])
    parser.add_argument("--methods")
    parser.add_argument("--batch-size")
    parser.add_argument("--model", help="default: the lab network (untrained, seeded)")
    a = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        run = a.model or make_run(tmp)
        print(f"{'images':>7} {'peak RSS MiB':>13} {'seconds':>8} {'files':>6}")
        for n in a.sizes:
            images = make_images(tmp / f"in{n}", n)
            out = tmp / f"out{n}"
            extra = (["--methods", a.methods] if a.methods else []) + (["--batch-size", a.batch_size] if a.batch_size else [])
            rss, seconds, code = peak_rss(["explain", str(images), "--model", str(run), "--out", str(out),
                                           "--quiet", "--threads", "1", *extra])
            files = len(os.listdir(out)) if out.is_dir() else 0
            print(f"{n:>7} {rss:>13.0f} {seconds:>8.1f} {files:>6}" + (f"  exit {code}" if code else ""), flush=True)


if __name__ == "__main__":
    main()
