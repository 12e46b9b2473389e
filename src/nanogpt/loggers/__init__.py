"""Where training metrics go. Every backend gets the same metric names (see METRICS).

The trainer calls `build_loggers(...)` once on rank 0 and then only `log`, `log_summary`, `close`.
Backends: console (always on), csv, tensorboard, wandb, mlflow; chosen with `logger=[csv,...]`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nanogpt.config import LoggerConfig
from nanogpt.errors import NanoGPTError
from nanogpt.loggers.base import (
    METRICS,
    STATE_FILE,
    ConsoleLogger,
    Logger,
    MultiLogger,
    NullLogger,
    RunState,
)
from nanogpt.loggers.local import CSVLogger, TensorBoardLogger
from nanogpt.loggers.tracking import MLflowLogger, WandbLogger

log = logging.getLogger("nanogpt")

# name in LoggerConfig -> (its config, out_dir, run_config, run state, resume) -> backend
BACKENDS: dict[str, Callable[[Any, Path, dict[str, Any], RunState, bool], Logger]] = {
    "csv": lambda c, out, _cfg, _state, resume: CSVLogger(out / c.filename, resume),
    "tensorboard": lambda c, out, cfg, _state, resume: TensorBoardLogger(out / c.log_dir, cfg, resume),
    "wandb": WandbLogger,
    "mlflow": MLflowLogger,
}


def build_loggers(cfg: LoggerConfig, out_dir: str, run_config: dict[str, Any], resume: bool,
                  max_iters: int | None = None) -> Logger:
    """The loggers selected in `cfg`, behind one Logger. `resume` continues the same runs.

    A missing optional package fails here (one line with the pip command); any other error in
    starting a backend is a warning, and training goes on without that backend."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = RunState(out, resume)
    backends: dict[str, Logger] = {"console": ConsoleLogger(max_iters, cfg.console.progress)}
    for name, make in BACKENDS.items():
        options = getattr(cfg, name)
        if options is None:
            continue
        try:
            backends[name] = make(options, out, run_config, state, resume)
        except NanoGPTError:
            raise
        except Exception as e:  # noqa: BLE001 - e.g. a tracking server that does not answer
            log.warning("logger %s could not start (%s: %s); training goes on without it",
                        name, type(e).__name__, e)
    logger = MultiLogger(backends, state)
    logger.save_state()  # the run ids, before the first step
    return logger


__all__ = ["METRICS", "STATE_FILE", "BACKENDS", "ConsoleLogger", "CSVLogger", "Logger", "MLflowLogger",
           "MultiLogger", "NullLogger", "RunState", "TensorBoardLogger", "WandbLogger", "build_loggers"]
