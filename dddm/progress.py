"""Progress of the long loops (training steps, sampling and feature batches).

On a terminal: a tqdm bar. Anywhere else (a log file, DVC's output under a Prefect task, CI), a bar
redrawn per step is one log line per step, so there the progress is one log line per interval
(`DDDM_PROGRESS_INTERVAL_S`, 30 s by default) with the count, the rate, the ETA and the loop's own
figures (epoch, loss, img/s), and one line at the end of a loop that ran longer than that; a shorter loop
says nothing. A line also waits for a tenth of the loop to pass (or for ten minutes), so a loop says at
most about ten lines however slow the machine is, and a run's log does not grow with its epochs.
"""

from __future__ import annotations

import logging
import os
import sys
import time

log = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 30.0
SHARE = 0.1  # of the loop, between two lines
LONGEST_SILENCE_S = 600.0


def interval_s() -> float:
    value = os.environ.get("DDDM_PROGRESS_INTERVAL_S", "")
    try:
        return float(value) if value else DEFAULT_INTERVAL_S
    except ValueError:
        raise ValueError(f"DDDM_PROGRESS_INTERVAL_S: {value!r} is not a number of seconds") from None


def duration(seconds: float) -> str:
    """12 s, 3 min 05 s, 2 h 04 min."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class IntervalLog:
    """tqdm's interface (update, set_postfix, close, a context manager) writing a log line at most once
    per `interval` seconds and per tenth of the loop (or per LONGEST_SILENCE_S), and a last one on close
    when the loop ran longer than `interval` (unless the last said it all)."""

    def __init__(self, total: int, desc: str, initial: int = 0, unit: str = "it", interval: float | None = None,
                 logger: logging.Logger = log, clock=time.monotonic):
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.interval = interval_s() if interval is None else interval
        self.logger, self.clock = logger, clock
        self.postfix: dict = {}
        self.initial = self.reported = initial
        self.start = self.last = clock()
        self.closed = False

    def update(self, n: int = 1) -> None:
        self.n += n
        waited = self.clock() - self.last
        if waited >= self.interval and (self.n - self.reported >= SHARE * self.total or waited >= LONGEST_SILENCE_S):
            self._report()

    def set_postfix(self, **figures) -> None:
        self.postfix = figures

    def line(self) -> str:
        elapsed = self.clock() - self.start
        rate = (self.n - self.initial) / elapsed if elapsed > 0 else 0.0
        parts = [f"{self.desc}: {self.n}/{self.total} {self.unit}"]
        parts += [f"{k} {v}" for k, v in self.postfix.items()]
        if self.n >= self.total:
            parts.append(f"done in {duration(elapsed)}")
        elif rate > 0:
            parts.append(f"{rate:.3g} {self.unit}/s, ETA {duration((self.total - self.n) / rate)}")
        return ", ".join(parts)

    def _report(self) -> None:
        self.logger.info(self.line())
        self.last, self.reported = self.clock(), self.n

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.n != self.reported and self.clock() - self.start >= self.interval:
                self._report()

    def __enter__(self) -> IntervalLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(total: int, desc: str, *, initial: int = 0, unit: str = "it", disable: bool = False):
    """A tqdm bar on a terminal, else an IntervalLog; with `disable`, a bar that shows nothing."""
    from tqdm.auto import tqdm

    if disable or sys.stderr.isatty():
        return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=disable)
    return IntervalLog(total, desc, initial=initial, unit=unit)
