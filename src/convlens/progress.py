"""Progress reporting: a tqdm bar on a terminal, plain lines in a log.

On a terminal (stderr is a TTY) every loop gets a tqdm bar. Otherwise (CI logs, ``make lab > log 2>&1``)
no carriage-return frames are written:

- a loop made with ``per_item=True`` (lab stages, training epochs) prints one line per finished item,
  with its description, position, postfix and seconds;
- any other loop prints one summary line when it ends, unless it runs inside another active progress
  (batches of an epoch, steps of an optimization), which already reports.
"""
from __future__ import annotations

import sys
import time
import weakref
from typing import Iterable, Iterator, TextIO

_open: "weakref.WeakSet[PlainProgress]" = weakref.WeakSet()  # open plain progresses (nested loops stay quiet)


def stream_is_terminal(stream: TextIO | None = None) -> bool:
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def plural(unit: str, count: int) -> str:
    if count == 1:
        return unit
    return unit + ("es" if unit.endswith(("ch", "s", "sh", "x")) else "s")


class PlainProgress:
    """The non-terminal reporter, with the part of tqdm's interface convlens uses."""

    def __init__(self, iterable: Iterable | None, desc: str, total: int | None, unit: str, per_item: bool,
                 initial: int, stream: TextIO | None):
        self.iterable, self.desc, self.unit, self.per_item = iterable, desc, unit, per_item
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.n, self.start_n, self.postfix = initial, initial, ""
        self.stream = sys.stderr if stream is None else stream
        self.quiet = not per_item and len(_open) > 0
        self.closed = False
        self.started = self.item_started = time.perf_counter()
        _open.add(self)

    def write_line(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def position(self) -> str:
        return f"{self.n}/{self.total}" if self.total is not None else str(self.n)

    def set_description(self, desc: str, refresh: bool = True) -> None:
        self.desc = desc

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **kwargs) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.per_item:
            now = time.perf_counter()
            extra = f", {self.postfix}" if self.postfix else ""
            self.write_line(f"{self.desc}: {self.unit} {self.position()}{extra} ({now - self.item_started:.1f} s)")
            self.item_started = now

    def close(self, report: bool = True) -> None:
        """End the progress; a summary line (loops that are not ``per_item``) unless ``report`` is False."""
        if self.closed:
            return
        self.closed = True
        _open.discard(self)
        if report and not self.per_item and not self.quiet:
            extra = f", {self.postfix}" if self.postfix else ""
            count = self.n - self.start_n
            self.write_line(f"{self.desc}: {count} {plural(self.unit, count)}{extra} "
                            f"in {time.perf_counter() - self.started:.1f} s")

    def __iter__(self) -> Iterator:
        completed = False
        try:
            for item in self.iterable:
                yield item
                self.update()
            completed = True
        finally:  # a loop left early (break, an error in its body) ends without a summary line
            self.close(report=completed)

    def __enter__(self) -> "PlainProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class NoProgress:
    """Progress switched off: iterates and accepts the same calls, reports nothing."""

    def __init__(self, iterable: Iterable | None):
        self.iterable = iterable

    def __iter__(self) -> Iterator:
        return iter(self.iterable)

    def __enter__(self) -> "NoProgress":
        return self

    def __exit__(self, *exc) -> None:
        pass

    def set_description(self, *args, **kwargs) -> None:
        pass

    set_postfix = update = close = set_description


def progress(iterable: Iterable | None = None, *, desc: str, total: int | None = None, unit: str = "item",
             enabled: bool = True, per_item: bool = False, initial: int = 0, stream: TextIO | None = None):
    """Wrap ``iterable`` (or count manual ``update()`` calls) in a progress report.

    ``per_item``: the loop is a coarse one (stages, epochs): its bar stays on a terminal, and in a log
    every finished item is one line. Otherwise the bar is transient and a log gets one line at the end.
    """
    if not enabled:
        return NoProgress(iterable)
    if stream_is_terminal(stream):
        from tqdm import tqdm

        return tqdm(iterable, desc=desc, total=total, unit=unit, leave=per_item, initial=initial,
                    file=stream, dynamic_ncols=True)
    return PlainProgress(iterable, desc, total, unit, per_item, initial, stream)
