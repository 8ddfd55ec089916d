"""End-to-end time of `convlens lab`: from scratch (target ≤ 5 min on 2 cores) and with every stage
cached (target ≤ 60 s).

    python bench/lab.py [--out DIR] [--threads 2]
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time


def run(out: str, threads: int) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "convlens", "lab", "--out", out, "--quiet", "--threads", str(threads)],
                   check=True)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="convlens-out/bench-lab")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    cold = run(args.out, args.threads)
    warm = run(args.out, args.threads)
    print(f"convlens lab from scratch: {cold:.0f} s (target ≤ 300 s); cached: {warm:.0f} s (target ≤ 60 s)")


if __name__ == "__main__":
    main()
