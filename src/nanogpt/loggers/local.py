"""Backends that write files under out_dir: a CSV table and TensorBoard event files.

Both rewind on resume: the first step logged after a resume drops what a previous attempt wrote at
that step and later, so each step appears once.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import IO, Any

from nanogpt.loggers.base import METRICS, flatten, require

COLUMNS = ("step", *METRICS)


class CSVLogger:
    """`step` then every metric, one row per step; an absent metric is an empty cell.

    Calls for the same step (train metrics, then the evaluation) are merged into one row, so a row
    is written when the next step arrives or at close."""

    def __init__(self, path: Path, resume: bool):
        self.path, self.resume = path, resume
        self.row: dict[str, Any] | None = None
        self.file: IO[str] | None = None
        self.writer: csv.DictWriter | None = None

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if self.row is not None and self.row["step"] != step:
            self._flush()
        if self.row is None:
            self.row = {"step": step}
        self.row.update(metrics)

    def log_summary(self, summary: dict[str, Any]) -> None:
        self._flush()

    def close(self) -> None:
        try:
            self._flush()
        finally:
            if self.file is not None:
                self.file.close()
                self.file = None

    def _flush(self) -> None:
        if self.row is None:
            return
        row, self.row = self.row, None
        if self.writer is None:
            self._open(row["step"])
        self.writer.writerow(row)
        self.file.flush()

    def _open(self, first_step: int) -> None:
        """Start the file: fresh, or on resume the old rows before `first_step` (atomically)."""
        kept = self._rows_before(first_step) if self.resume else []
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(kept)
        os.replace(tmp, self.path)
        self.file = open(self.path, "a", newline="")
        # extra keys are ignored: the columns stay the same from run to run
        self.writer = csv.DictWriter(self.file, COLUMNS, extrasaction="ignore")

    def _rows_before(self, step: int) -> list[dict[str, str]]:
        if not self.path.exists():
            return []
        with open(self.path, newline="") as f:
            return [row for row in csv.DictReader(f) if row.get("step") and int(row["step"]) < step]


class TensorBoardLogger:
    """Scalars under the metric names, the config in the HParams tab, the summary as text."""

    def __init__(self, log_dir: Path, run_config: dict[str, Any], resume: bool):
        self.tb = require("torch.utils.tensorboard", "logger=tensorboard")
        self.log_dir, self.run_config, self.resume = log_dir, run_config, resume
        self.writer: Any = None

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if self.writer is None:
            self._open(step)
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def log_summary(self, summary: dict[str, Any]) -> None:
        if self.writer is None:
            self._open(None)
        rows = "\n".join(f"| {k} | {v} |" for k, v in summary.items())
        self.writer.add_text("summary", f"| key | value |\n|---|---|\n{rows}")
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def _open(self, first_step: int | None) -> None:
        # purge_step tells TensorBoard to hide what earlier files hold at this step and later:
        # the steps a crashed attempt logged past its checkpoint, or a whole earlier run
        self.writer = self.tb.SummaryWriter(str(self.log_dir), purge_step=first_step, flush_secs=30)
        if not self.resume:
            self._log_hparams()

    def _log_hparams(self) -> None:
        """The config once, in the HParams tab (in this run's folder, not a sub-run as add_hparams)."""
        from torch.utils.tensorboard.summary import hparams

        values = {k: v if isinstance(v, (bool, int, float, str)) else json.dumps(v)
                  for k, v in flatten(self.run_config).items()}
        for summary in hparams(values, {"train/loss": 0.0, "val/loss": 0.0}):
            self.writer.file_writer.add_summary(summary)
