"""Where training metrics go. Every backend gets the same metric names (see METRICS).

The trainer calls `build_loggers(...)` once on rank 0 and then only `log`, `log_summary`, `close`.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from nanogpt.config import LoggerConfig

log = logging.getLogger("nanogpt")

# The names every backend uses; the trainer produces exactly these keys.
METRICS = ("train/loss", "val/loss", "lr", "grad_norm", "tokens", "tokens_per_sec", "mfu",
           "loss_scale", "iter_ms")


class Logger(Protocol):
    def log(self, step: int, metrics: dict[str, float]) -> None: ...
    def log_summary(self, summary: dict[str, Any]) -> None: ...
    def close(self) -> None: ...


class ConsoleLogger:
    """One line per logged step on stdout (through `logging`)."""

    def __init__(self, max_iters: int | None = None):
        self.max_iters = max_iters

    def log(self, step: int, metrics: dict[str, float]) -> None:
        parts = [f"iter {step}" + (f"/{self.max_iters}" if self.max_iters else "")]
        for key, fmt in (("train/loss", "loss {:.4f}"), ("val/loss", "val {:.4f}"), ("lr", "lr {:.2e}"),
                         ("iter_ms", "{:.1f} ms"), ("tokens_per_sec", "{:,.0f} tok/s"), ("mfu", "mfu {:.2%}")):
            if metrics.get(key) is not None:
                parts.append(fmt.format(metrics[key]))
        log.info(" | ".join(parts))

    def log_summary(self, summary: dict[str, Any]) -> None:
        log.info("summary: %s", summary)

    def close(self) -> None:
        pass


class NullLogger:
    """For ranks other than 0."""

    def log(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def log_summary(self, summary: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def build_loggers(cfg: LoggerConfig, out_dir: str, run_config: dict[str, Any], resume: bool,
                  max_iters: int | None = None) -> Logger:
    """The loggers selected in `cfg`, behind one Logger. `resume` continues the same runs."""
    return ConsoleLogger(max_iters)
