"""`convlens explain` over MNIST test PNGs: 1 process × 1 thread against 2 processes × 1 thread (torchrun,
gloo), whole CLI jobs, interleaved, medians; a 2-image job of each gives the fixed start-up cost, so
the per-image speed-up is printed beside the whole-job one.

    python bench/distributed_explain.py [--model RUN] [--images 1000] [--repeats 3]
        [--methods gradcam,saliency,integrated-gradients]
    target: 2 × 1 clearly faster than 1 × 1 on the whole job, per image near 2 on two free cores (each
    rank computes and draws its batches; rank 0 only pastes contact-sheet rows into pages and writes)
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def bench_model(given: str | None, tmp: Path) -> Path:
    """The lab network to time: ``given``, else one trained briefly (1 epoch on 2,000 digits) into ``tmp``."""
    if given:
        return Path(given)
    from convlens.training import make_recipe, train
    train(tmp / "run", make_recipe("best", epochs=1), seed=0, progress=False, subset=2000)
    return tmp / "run"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job(procs: int, folder: Path, out: Path, model: Path, methods: str) -> float:
    """Seconds of one whole `explain` job (launch included)."""
    explain = ["-m", "convlens", "explain", str(folder), "--model", str(model), "--methods", methods,
               "--quiet", "--out", str(out)]
    cmd = [sys.executable, *explain, "--threads", "1"] if procs == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(procs), "--master-addr",
         "127.0.0.1", "--master-port", str(free_port()), *explain]
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(proc.stderr[-2000:])
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model")
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--methods", default="gradcam,saliency,integrated-gradients")
    a = ap.parse_args()
    sys.path.insert(0, str(SRC))
    import numpy as np
    from PIL import Image

    from convlens.data import load_mnist

    tmp = Path(tempfile.mkdtemp(prefix="bench-explain-"))
    model = bench_model(a.model, tmp)
    x = load_mnist("test").tensors()[0]
    folders = {}
    for n in (2, a.images):
        folders[n] = tmp / f"images{n}"
        folders[n].mkdir()
        for i in range(n):
            Image.fromarray((x[i, 0].numpy() * 255).astype(np.uint8), "L").save(folders[n] / f"img{i:05d}.png")
    times = {(p, n): [] for p in (1, 2) for n in folders}
    for r in range(a.repeats):
        for (p, n) in times:
            times[(p, n)].append(job(p, folders[n], tmp / f"out-{p}-{n}-{r}", model, a.methods))
    med = {k: statistics.median(v) for k, v in times.items()}
    per_image = {p: (med[(p, a.images)] - med[(p, 2)]) / (a.images - 2) for p in (1, 2)}
    print(f"{a.images} images, {a.methods}, median of {a.repeats}, load {os.getloadavg()[0]:.1f}")
    for p in (1, 2):
        print(f"{p} proc(s) × 1 thread: job {med[(p, a.images)]:.1f} s, start-up {med[(p, 2)]:.1f} s, "
              f"{1000 * per_image[p]:.1f} ms/image")
    print(f"speed-up 2 × 1 vs 1 × 1: whole job {med[(1, a.images)] / med[(2, a.images)]:.2f}×, "
          f"per image {per_image[1] / per_image[2]:.2f}×")


if __name__ == "__main__":
    main()
