"""Images through a model in bounded batches: memory stays flat in the number of images.

``iter_image_batches`` reads and preprocesses at most ``batch_size`` images at a time;
``SkipReporter`` names every unreadable file once; ``plan_batch_size`` estimates what a batch
costs and picks a size that fits in the memory available (or says how much a run needs).
"""
from __future__ import annotations

import os
import resource
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from PIL import Image

from .data.images import open_image
from .errors import ConvlensError

MAX_BATCH = 32


class SkipReporter:
    """Prints ``convlens: skipped: …`` for each unreadable image.

    Lines are held back until one image has been read, so a run whose only image is bad ends in
    one error line (from :meth:`finish`), not a 'skipped' line followed by a second error.
    """

    def __init__(self) -> None:
        self.failures: list[str] = []
        self._pending: list[str] = []
        self.any_read = False

    def failed(self, message: str) -> None:
        self.failures.append(message)
        if self.any_read:
            print(f"convlens: skipped: {message}", file=sys.stderr)
        else:
            self._pending.append(message)

    def succeeded(self) -> None:
        if not self.any_read:
            self.any_read = True
            for message in self._pending:
                print(f"convlens: skipped: {message}", file=sys.stderr)
            self._pending = []

    def finish(self) -> None:
        """Raise when no image at all could be read."""
        if self.any_read:
            return
        if len(self.failures) == 1:
            raise ConvlensError(self.failures[0])
        for message in self._pending:
            print(f"convlens: skipped: {message}", file=sys.stderr)
        raise ConvlensError(f"none of the {len(self.failures)} given images could be read")


def iter_image_batches(paths: Sequence[Path], mode: str, preprocess: Callable[[Image.Image], torch.Tensor],
                       batch_size: int, reporter: SkipReporter) -> Iterator[tuple[list[int], torch.Tensor]]:
    """(indices into ``paths``, stacked tensors) for batches of up to ``batch_size`` readable images."""
    indices: list[int] = []
    tensors: list[torch.Tensor] = []
    for i, path in enumerate(paths):
        try:
            tensors.append(preprocess(open_image(path, mode)))
        except ConvlensError as exc:
            reporter.failed(str(exc))
            continue
        reporter.succeeded()
        indices.append(i)
        if len(tensors) == batch_size:
            yield indices, torch.stack(tensors)
            indices, tensors = [], []
    if tensors:
        yield indices, torch.stack(tensors)
    reporter.finish()


# ---------------------------------------------------------------- memory planning
def activation_bytes(model: torch.nn.Module, sample: torch.Tensor) -> int:
    """Bytes of every leaf module's output for one input ``sample`` (C, H, W): what a backward pass
    keeps, roughly, per image."""
    total = 0

    def count(_module, _inputs, output):
        nonlocal total
        if isinstance(output, torch.Tensor):
            total += output.nelement() * output.element_size()

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(count) for m in leaves]
    try:
        with torch.no_grad():
            model(sample[None])
    finally:
        for h in handles:
            h.remove()
    return total


def available_bytes() -> int | None:
    """Memory this process may still use: the least of the kernel's MemAvailable, the cgroup's
    limit minus its usage, and the address-space limit minus what is mapped; None when unknown."""
    limits = []
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    limits.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),):
        try:
            text = Path(limit_file).read_text().strip()
            if text != "max":
                limits.append(int(text) - int(Path(usage_file).read_text()))
        except (OSError, ValueError):
            pass
    soft, _hard = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        limits.append(soft - mapped_bytes())
    return min(limits) if limits else None


def mapped_bytes() -> int:
    try:
        with open(f"/proc/{os.getpid()}/statm") as fh:
            return int(fh.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


@dataclass
class BatchPlan:
    batch_size: int
    per_image: int   # bytes each image of a batch adds
    fixed: int       # bytes a batch costs whatever its size (inner chunks of IG / SmoothGrad)
    available: int | None

    def need(self, batch_size: int) -> int:
        return self.fixed + self.per_image * batch_size


def plan_batch_size(activations: int, result_bytes: int, inner_chunk: int, requested: int | None = None,
                    available: int | None = None, cap: int = MAX_BATCH) -> BatchPlan:
    """Pick how many images go through the methods at once.

    A backward pass holds up to the summed leaf-module outputs (``activations``) per sample (measured
    on EfficientNet-Lite0: integrated gradients over 64 samples peaked at 0.6× that); an
    inner-chunked method (integrated gradients, SmoothGrad) runs ``inner_chunk`` samples whatever
    the batch; each image also keeps ``result_bytes`` of maps. Uses half of what is available;
    raises when not even one image fits.
    """
    per_image = activations + result_bytes
    fixed = activations * inner_chunk
    plan = BatchPlan(requested or cap, per_image, fixed, available)
    if available is None:
        return plan
    if plan.need(1) > available:
        raise ConvlensError(f"this run needs about {gib(plan.need(1))} of memory ({gib(per_image)} per image, "
                            f"{gib(fixed)} for inner batches); only {gib(available)} is available")
    if requested is None:
        fits = (available // 2 - fixed) // per_image
        plan.batch_size = int(max(1, min(cap, fits)))
    return plan


def gib(n: int) -> str:
    """Bytes as GiB, MiB or KiB, whichever reads best."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20)):
        if n >= size:
            return f"{n / size:.1f} {unit}" if unit == "GiB" else f"{n / size:.0f} {unit}"
    return f"{max(n, 0) / 2**10:.0f} KiB"


class SliceReporter(SkipReporter):
    """For one slice of a larger job (a rank's shard, a step): names each unreadable file at once and
    never raises; the job decides at its end whether anything at all was read."""

    def __init__(self) -> None:
        super().__init__()
        self.any_read = True

    def finish(self) -> None:
        pass
