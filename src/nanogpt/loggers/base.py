"""The Logger protocol, the console and null loggers, the fan-out that isolates failures, run state."""

from __future__ import annotations

import importlib
import json
import logging
import os
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

from nanogpt.errors import ConfigError

log = logging.getLogger("nanogpt")

# The names every backend uses; the trainer produces exactly these keys.
METRICS = ("train/loss", "val/loss", "lr", "grad_norm", "tokens", "tokens_per_sec", "mfu",
           "loss_scale", "iter_ms")
STATE_FILE = "loggers.json"  # in out_dir: W&B / MLflow run ids, so that a resume continues the run


class Logger(Protocol):
    def log(self, step: int, metrics: dict[str, float]) -> None: ...
    def log_summary(self, summary: dict[str, Any]) -> None: ...
    def close(self) -> None: ...


def require(module: str, backend: str) -> ModuleType:
    """Import an optional dependency, or fail with one line that names the pip command."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"{backend} needs the package {module.split('.')[0]!r}, which is not "
                          f"installed: pip install 'nanogpt[loggers]'") from None


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'optim': {'lr': 1}} -> {'optim.lr': 1}, for backends whose hyperparameters are flat."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


class ConsoleLogger:
    """One line per logged step through `logging` (the trainer's progress line)."""

    FORMATS = (("train/loss", "loss {:.4f}"), ("val/loss", "val {:.4f}"), ("lr", "lr {:.2e}"),
               ("grad_norm", "norm {:.2f}"), ("iter_ms", "{:.1f} ms"), ("tokens_per_sec", "{:,.0f} tok/s"),
               ("mfu", "mfu {:.2%}"))

    def __init__(self, max_iters: int | None = None, progress: bool = True):
        self.max_iters = max_iters
        self.progress = progress  # False: only evaluations and the summary

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.progress and "val/loss" not in metrics:
            return
        parts = [f"iter {step}" + (f"/{self.max_iters}" if self.max_iters else "")]
        parts += [fmt.format(metrics[key]) for key, fmt in self.FORMATS if metrics.get(key) is not None]
        log.info(" | ".join(parts))

    def log_summary(self, summary: dict[str, Any]) -> None:
        items = (f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items())
        log.info("summary: %s", " | ".join(items))

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


class RunState:
    """out_dir/loggers.json: per backend, its run id and the last step it holds.

    W&B and MLflow only append, so a resumed job reopens the same run and skips the steps that
    run already has (with exact resume they are the same numbers)."""

    def __init__(self, out_dir: Path, resume: bool):
        self.path = out_dir / STATE_FILE
        self.data: dict[str, dict[str, Any]] = {}
        if resume and self.path.exists():
            try:
                self.data = json.loads(self.path.read_text())
            except (OSError, ValueError) as e:
                log.warning("cannot read %s (%s); W&B/MLflow start new runs", self.path, e)
        self.dirty = False

    def get(self, backend: str) -> dict[str, Any]:
        return dict(self.data.get(backend, {}))

    def set(self, backend: str, **values: Any) -> None:
        self.data.setdefault(backend, {}).update(values)
        self.dirty = True

    def save(self) -> None:
        if not self.dirty:
            return
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        os.replace(tmp, self.path)  # atomic: a crash never leaves half a file
        self.dirty = False


class MultiLogger:
    """Fans each call out to the backends. A backend that raises is reported once and dropped:
    a full disk or an unreachable server never stops a long run."""

    def __init__(self, backends: dict[str, Logger], state: RunState | None = None):
        self.backends = dict(backends)
        self.state = state

    def log(self, step: int, metrics: dict[str, float]) -> None:
        metrics = {k: v for k, v in metrics.items() if v is not None}
        self._each("log", step, metrics)
        self.save_state()

    def log_summary(self, summary: dict[str, Any]) -> None:
        self._each("log_summary", summary)
        self.save_state()

    def close(self) -> None:
        self._each("close")
        self.backends.clear()

    def _each(self, method: str, *args: Any) -> None:
        for name, backend in list(self.backends.items()):
            try:
                getattr(backend, method)(*args)
            except Exception as e:  # noqa: BLE001 - any backend error must leave training alone
                self._drop(name, e, close=method != "close")

    def _drop(self, name: str, error: Exception, close: bool) -> None:
        log.warning("logger %s failed (%s: %s); it is off for the rest of this run",
                    name, type(error).__name__, error)
        backend = self.backends.pop(name)
        try:
            if close:
                backend.close()  # release files / finish the remote run if it still can
        except Exception:  # noqa: BLE001
            log.debug("closing the failed logger %s failed too", name, exc_info=True)

    def save_state(self) -> None:
        if self.state is None:
            return
        try:
            self.state.save()
        except OSError as e:
            log.warning("cannot write %s (%s); a resume will start new W&B/MLflow runs",
                        self.state.path, e)
            self.state = None
