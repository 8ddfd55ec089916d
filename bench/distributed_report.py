"""`convlens report` on a labelled folder of MNIST test digits: 1 process × 1 thread against 2 processes ×
1 thread (torchrun, gloo), whole CLI jobs, interleaved, medians; beside the whole job, each stage's
median seconds (rank 0's wall time, from summary.json), so the split stages' speed-up shows apart from
rank 0's own work (activation maximization, figures, the page).

    python bench/distributed_report.py [--model RUN] [--images 5000] [--repeats 3] [--methods gradcam,saliency]
    target: accuracy and statistics near 2× on two free cores; the whole job bounded by rank 0's own stages
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from distributed_explain import SRC, bench_model, free_port

STAGES = ("accuracy", "stats", "actmax", "explain", "evaluate", "total")


def job(procs: int, folder: Path, out: Path, model: Path, methods: str) -> dict[str, float]:
    """Seconds of one whole `report` job (launch included) and of each of its stages."""
    report = ["-m", "convlens", "report", "--data", str(folder), "--model", str(model), "--methods", methods,
              "--quiet", "--out", str(out)]
    cmd = [sys.executable, *report, "--threads", "1"] if procs == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(procs), "--master-addr",
         "127.0.0.1", "--master-port", str(free_port()), *report]
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(proc.stderr[-2000:])
    seconds = {"job": time.perf_counter() - start}
    timings = json.loads((out / "summary.json").read_text())["run"]["timings"]
    return seconds | {stage: timings[stage]["seconds"] for stage in STAGES}


def digit_folder(folder: Path, count: int) -> Path:
    """The first ``count`` MNIST test digits as PNGs, one sub-folder per digit."""
    import numpy as np
    from PIL import Image

    from convlens.data import load_mnist

    x, y = load_mnist("test").tensors()
    for i in range(count):
        (folder / str(int(y[i]))).mkdir(parents=True, exist_ok=True)
        Image.fromarray((x[i, 0].numpy() * 255).astype(np.uint8), "L").save(folder / str(int(y[i])) / f"{i:05d}.png")
    return folder


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model")
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--methods", default="gradcam,saliency")
    a = ap.parse_args()
    sys.path.insert(0, str(SRC))
    tmp = Path(tempfile.mkdtemp(prefix="bench-report-"))
    model = bench_model(a.model, tmp)
    folder = digit_folder(tmp / "digits", a.images)
    runs: dict[int, list[dict[str, float]]] = {1: [], 2: []}
    for r in range(a.repeats):
        for p in runs:
            runs[p].append(job(p, folder, tmp / f"out-{p}-{r}", model, a.methods))
    med = {p: {k: statistics.median(run[k] for run in runs[p]) for k in runs[p][0]} for p in runs}
    print(f"report on {a.images} digits, --methods {a.methods}, median of {a.repeats}, "
          f"load {os.getloadavg()[0]:.1f}")
    print(f"{'':<10}{'1 × 1 s':>9}{'2 × 1 s':>9}{'speed-up':>10}")
    for key in ("job", *STAGES):
        print(f"{key:<10}{med[1][key]:>9.1f}{med[2][key]:>9.1f}{med[1][key] / max(med[2][key], 1e-9):>9.2f}×")


if __name__ == "__main__":
    main()
