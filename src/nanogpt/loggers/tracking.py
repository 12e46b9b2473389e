"""Experiment trackers: Weights & Biases and MLflow (optional, imported only when selected).

Their stores only append, so each keeps its run id in out_dir/loggers.json (RunState): a resumed
job continues the same run and skips the steps that run already holds.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from nanogpt.config import MLflowLoggerConfig, WandbLoggerConfig
from nanogpt.loggers.base import RunState, flatten, require

log = logging.getLogger("nanogpt")


def _numbers(summary: dict[str, Any]) -> dict[str, float]:
    """The summary's numeric values, named `summary/<key>` as in every backend."""
    return {f"summary/{k}": float(v) for k, v in summary.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


class WandbLogger:
    """A W&B run; its files go to out_dir/wandb (`wandb sync` them after an offline run)."""

    def __init__(self, cfg: WandbLoggerConfig, out_dir: Path, run_config: dict[str, Any],
                 state: RunState, resume: bool):
        wandb = require("wandb", "logger=wandb")
        previous = state.get("wandb") if resume else {}
        self.skip_to = previous.get("last_step", -1)
        self.run = wandb.init(project=cfg.project, entity=cfg.entity, name=cfg.name or out_dir.resolve().name,
                              tags=list(cfg.tags) or None, mode=cfg.mode, dir=str(out_dir),
                              id=previous.get("run_id"), resume="allow", config=run_config,
                              allow_val_change=True)
        self.state = state
        state.set("wandb", run_id=self.run.id)
        log.info("wandb run %s (%s) in %s", self.run.id, cfg.mode, out_dir / "wandb")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if step <= self.skip_to:
            return
        self.run.log(metrics, step=step)
        self.state.set("wandb", last_step=step)

    def log_summary(self, summary: dict[str, Any]) -> None:
        self.run.summary.update({f"summary/{k}": v for k, v in summary.items() if v is not None})

    def close(self) -> None:
        self.run.finish()


def tracking_uri(uri: str | None) -> str:
    """None: $MLFLOW_TRACKING_URI, else ./mlruns. A folder becomes a SQLite store inside it
    (MLflow 3 refuses a bare folder as its store)."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or "mlruns"
    if uri == "databricks" or len(urlparse(uri).scheme) > 1:  # > 1: not a Windows drive letter
        return uri
    folder = Path(uri).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'mlflow.db'}"


class MLflowLogger:
    """An MLflow run: metrics with their steps, the config as params, the summary as metrics."""

    def __init__(self, cfg: MLflowLoggerConfig, out_dir: Path, run_config: dict[str, Any],
                 state: RunState, resume: bool):
        require("mlflow", "logger=mlflow")
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=tracking_uri(cfg.tracking_uri))
        self.state = state
        previous = state.get("mlflow") if resume else {}
        self.run_id = self._reopen(previous.get("run_id"))
        self.skip_to = previous.get("last_step", -1) if self.run_id else -1
        if self.run_id is None:
            self.run_id = self._create(cfg, out_dir, run_config)
        state.set("mlflow", run_id=self.run_id)
        log.info("mlflow run %s at %s", self.run_id, self.client.tracking_uri)

    def _reopen(self, run_id: str | None) -> str | None:
        if run_id is None:
            return None
        try:
            run = self.client.get_run(run_id)
        except Exception as e:  # noqa: BLE001 - the store was moved or the run deleted
            log.warning("mlflow run %s not found (%s); starting a new one", run_id, e)
            return None
        if run.info.lifecycle_stage != "active":
            return None
        self.client.update_run(run_id, status="RUNNING")
        return run_id

    def _create(self, cfg: MLflowLoggerConfig, out_dir: Path, run_config: dict[str, Any]) -> str:
        from mlflow.entities import Param

        found = self.client.get_experiment_by_name(cfg.experiment)
        experiment_id = found.experiment_id if found else self.client.create_experiment(cfg.experiment)
        run = self.client.create_run(experiment_id, run_name=cfg.run_name or out_dir.resolve().name,
                                     tags={"out_dir": str(out_dir.resolve())})
        params = [Param(k, str(v)[:6000]) for k, v in flatten(run_config).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(run.info.run_id, params=params[i:i + 100])
        return run.info.run_id

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if step <= self.skip_to:
            return
        self._log_metrics(metrics, step)
        self.state.set("mlflow", last_step=step)

    def log_summary(self, summary: dict[str, Any]) -> None:
        self._log_metrics(_numbers(summary), self.state.get("mlflow").get("last_step", 0))

    def close(self) -> None:
        self.client.set_terminated(self.run_id)

    def _log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)
