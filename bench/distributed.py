"""Filter statistics over the 60,000 MNIST training images: 1 process × 1 thread, 1 × 2 threads and
2 processes × 1 thread (torchrun, gloo); speed-up against 1 × 1 and peak RSS per rank.

    python bench/distributed.py [--model RUN] [--repeats 3] [--split train]
    targets: 2 × 1 ≥ 1.6 × faster than 1 × 1, and no slower than 1 × 2; RSS per rank flat in dataset size

Each configuration is a fresh job (torchrun for the 2-process one) that times only the statistics pass
(shards folded, all-reduced): the slowest rank's time. Configurations run interleaved, medians reported.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
CONFIGS = {"1 proc × 1 thread": (1, 1), "1 proc × 2 threads": (1, 2), "2 procs × 1 thread": (2, 1)}


def worker(args) -> None:
    """One rank: time the sharded statistics pass; rank 0 prints the slowest rank's time and every RSS."""
    import torch

    torch.set_num_threads(args.threads)
    from convlens import distributed
    from convlens.analysis import collect_shards, data_source
    from convlens.models import LabNet, load_model
    from convlens.models.registry import LoadedModel, lab_profile
    from convlens.runtime import tune_malloc

    tune_malloc()
    distributed.setup()
    if args.model:
        loaded = load_model(args.model)
    else:
        torch.manual_seed(0)
        loaded = LoadedModel(LabNet().eval(), lab_profile("untrained lab network"))
    source = data_source(loaded, args.split, None, None)
    job = distributed.Job("statistics", source.count, source.step)
    distributed.all_reduce_int(0)  # every rank ready
    start = time.perf_counter()
    stats, _, _ = collect_shards(loaded, source, ["l1", "l2", "l3"], False, job)
    seconds = time.perf_counter() - start
    slowest = distributed.all_reduce_tree({"max": torch.tensor([seconds])})["max"].item()
    rss = distributed.gather_ordered(distributed.rank(),
                                     [resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024])
    if distributed.is_writer():
        print(json.dumps({"seconds": slowest, "rss_mb": rss, "count": int(stats.counts.sum())}))
    distributed.teardown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(procs: int, threads: int, args) -> dict:
    cmd = [__file__, "--worker", "--threads", str(threads), "--split", args.split]
    cmd += ["--model", args.model] if args.model else []
    if procs > 1:
        cmd = ["-m", "torch.distributed.run", "--nproc-per-node", str(procs), "--master-addr", "127.0.0.1",
               "--master-port", str(free_port())] + cmd
    env = {**os.environ, "OMP_NUM_THREADS": str(threads),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"{procs} × {threads} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="a run folder (default: an untrained lab network)")
    ap.add_argument("--split", default="train", choices=["train", "test"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    samples: dict[str, list[dict]] = {name: [] for name in CONFIGS}
    for _ in range(args.repeats):
        for name, (procs, threads) in CONFIGS.items():
            samples[name].append(run(procs, threads, args))
    median = {name: statistics.median(s["seconds"] for s in runs) for name, runs in samples.items()}
    base = median["1 proc × 1 thread"]
    print(f"statistics over {samples['2 procs × 1 thread'][0]['count']:,} {args.split} images (l1-l3), "
          f"median of {args.repeats}:")
    for name, runs in samples.items():
        rss = ", ".join(f"{r:.0f}" for r in runs[-1]["rss_mb"])
        print(f"  {name:<20} {median[name]:7.2f} s   speed-up {base / median[name]:4.2f}×   peak RSS/rank MB: {rss}")
    two, one_two = median["2 procs × 1 thread"], median["1 proc × 2 threads"]
    print(f"2 procs vs 1×1: {base / two:.2f}× (target ≥ 1.6); vs 1×2: {one_two / two:.2f}× (target ≥ 1.0)")
    if args.split == "train":
        small = run(2, 1, argparse.Namespace(**{**vars(args), "split": "test"}))
        print(f"peak RSS per rank, 2 procs: test split (10,000) {', '.join(f'{r:.0f}' for r in small['rss_mb'])} MB"
              f" vs train split (60,000) {', '.join(f'{r:.0f}' for r in samples['2 procs × 1 thread'][-1]['rss_mb'])}"
              " MB (the uint8 images are held: 7.8 vs 47 MB; float batches are made per batch)")


if __name__ == "__main__":
    main()
