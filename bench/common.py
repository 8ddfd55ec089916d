"""Helpers shared by the benchmark scripts: timing medians and a fixed thread count."""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def setup(threads: int = 2, malloc: bool = True) -> None:
    """Pick the thread count once (changing it later slows torch down badly); ``malloc``: the CLI's malloc
    tuning (False: glibc's defaults, as a Python API user runs)."""
    torch.set_num_threads(threads)
    if malloc:
        from convlens.runtime import tune_malloc
        tune_malloc()


def median_time(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved(fns: dict[str, Callable[[], object]], repeats: int = 5, warmup: int = 1) -> dict[str, float]:
    """Medians of several functions timed in alternation, so machine noise hits them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(v) for name, v in samples.items()}
