"""Progress lines about long work, by the clock: 'hellaswag: 120/10042 examples, 14.2 examples/s, eta 11m02s'.

Evaluation tasks, the harness's requests, benchmarks and copies from a bucket (`storage`) log them on
process 0. It sits low in the house (it needs only jax's process index), so storage can use it without
the training loggers.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import jax
from absl import logging


def format_duration(seconds: float) -> str:
    """'1h02m', '3m05s' or '42s' for a duration in seconds (rounded down)."""
    seconds = int(seconds)
    h, m, s = seconds // 3600, seconds // 60 % 60, seconds % 60
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


PROGRESS_SECONDS = 10.0  # at most one progress line this often


class Progress:
    """A line every PROGRESS_SECONDS (by the clock, not per batch) about long work, on process 0:
    'hellaswag: 120/10042 examples, 14.2 examples/s, eta 11m02s'.

        progress = Progress("hellaswag", total=len(examples), unit="examples")
        for batch in batches:
            ...
            progress.update(len(batch))   # logs when PROGRESS_SECONDS have passed since the last line

    The rate counts from the start, so the first lines include compilation (the eta falls after).
    """

    def __init__(self, what: str, total: int, unit: str, clock: Callable[[], float] = time.monotonic):
        self.what, self.total, self.unit, self.clock = what, total, unit, clock
        self.done = 0
        self.t0 = self.last = clock()

    def update(self, n: int, note: str = "") -> str | None:
        """Count `n` more units done; returns the line when one was logged (else None)."""
        self.done += n
        now = self.clock()
        if now - self.last < PROGRESS_SECONDS or jax.process_index() != 0:
            return None
        self.last = now
        rate = self.done / max(now - self.t0, 1e-9)
        left = max(self.total - self.done, 0)
        line = (f"{self.what}: {self.done:,}/{self.total:,} {self.unit}, {rate:.1f} {self.unit}/s, "
                f"eta {format_duration(left / rate) if rate > 0 else '?'}" + (f" ({note})" if note else ""))
        logging.info("%s", line)
        return line
