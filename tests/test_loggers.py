"""MetricLogger: console line, tensorboardX events read back by TensorBoard, CSV, resume, W&B
(a fake module), failing backends, the loss plot."""

from __future__ import annotations

import csv
import json
import logging
import sys
from types import SimpleNamespace

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from nanogpt_jax import loggers, storage
from nanogpt_jax.errors import DataError
from nanogpt_jax.loggers import MetricLogger, format_line, plot_loss


def _train(step: int, offset: float = 0.0) -> dict[str, float]:
    return {"train/loss": 4.0 - step / 100 + offset, "train/lr": 1e-3, "train/grad_norm": 0.5}


def _csv_rows(out_dir) -> tuple[list[str], list[dict[str, str]]]:
    with open(out_dir / "metrics.csv", newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames), list(reader)


def _events(out_dir) -> EventAccumulator:
    acc = EventAccumulator(str(out_dir / "tb"))
    acc.Reload()
    return acc


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_format_line():
    metrics = {
        "train/loss": 3.21041,
        "train/lr": 6e-4,
        "train/grad_norm": 0.9213,
        "train/ms_per_step": 41.23,
        "train/tokens_per_sec": 19_312.0,
        "train/mfu": 0.5123,
        "train/skipped": 0.0,
        "train/tokens": 1e6,
    }
    assert format_line(120, metrics, total_steps=2000) == (
        "step 120/2000 | loss 3.2104 | lr 6.00e-04 | grad 0.92 | 41.2 ms | 19.3k tok/s | mfu 51.2% | eta 1m17s"
    )
    assert format_line(5, {"val/loss": 1.5, "train/mfu": None, "train/skipped": 2}) == "step 5 | val 1.5000 | skipped 2"


def test_first_step_shows_its_compile_time_and_no_eta():
    # train.py logs the first step after a start or resume with compile_seconds instead of a step time
    first = {"train/loss": 4.2, "train/compile_seconds": 12.34}
    assert format_line(0, first, total_steps=2000) == "step 0/2000 | loss 4.2000 | compile 12.3s"


def test_mfu_above_100_percent_on_the_console_raw_in_the_files(tmp_path, caplog):
    from nanogpt_jax import metrics

    metrics._warn_above_100.cache_clear()
    with caplog.at_level(logging.INFO), MetricLogger(tmp_path, tensorboard=False, total_steps=100) as logger:
        logger.log(10, {"train/loss": 2.0, "train/mfu": 1.37})
        logger.log(20, {"train/loss": 1.9, "train/mfu": 1.41})
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert lines[-1] == "step 20/100 | loss 1.9000 | mfu >100% (peak too low?)"
    assert len(_warnings(caplog)) == 1 and "above 100%" in _warnings(caplog)[0]  # warned once
    assert [r["train/mfu"] for r in _csv_rows(tmp_path)[1]] == ["1.37", "1.41"]  # the raw figure


def test_tensorboard_events_and_config_read_back(tmp_path):
    with MetricLogger(tmp_path, config={"model": {"n_layer": 2}, "optim": {"lr": 1e-3}}) as logger:
        for step in (0, 10, 20):
            logger.log(step, _train(step))
        logger.log(20, {"val/loss": 3.5})
    acc = _events(tmp_path)
    assert {"train/loss", "train/lr", "train/grad_norm", "val/loss"} <= set(acc.Tags()["scalars"])
    assert [(e.step, round(e.value, 4)) for e in acc.Scalars("train/loss")] == [(0, 4.0), (10, 3.9), (20, 3.8)]
    assert [(e.step, e.value) for e in acc.Scalars("val/loss")] == [(20, 3.5)]
    (text,) = acc.Tensors("config/text_summary")
    assert '"n_layer": 2' in text.tensor_proto.string_val[0].decode()


def test_csv_header_grows_and_values_are_exact(tmp_path, caplog):
    with caplog.at_level(logging.INFO), MetricLogger(tmp_path, tensorboard=False, total_steps=100) as logger:
        logger.log(0, {"train/loss": 0.1 + 0.2})
        logger.log(0, {"val/loss": 3.5})
        logger.log(10, {"train/loss": 2.0, "train/mfu": None, "train/lr": 1e-3})
    header, rows = _csv_rows(tmp_path)
    assert header == ["step", "train/loss", "val/loss", "train/lr"]
    assert [tuple(r.values()) for r in rows] == [
        ("0", "0.30000000000000004", "", ""),  # shortest exact float repr: resume comparisons stay exact
        ("0", "", "3.5", ""),
        ("10", "2.0", "", "0.001"),
    ]
    assert not (tmp_path / "tb").exists()
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert lines[-1] == "step 10/100 | loss 2.0000 | lr 1.00e-03"  # the console line, through absl


def test_resume_drops_the_later_steps(tmp_path):
    logger = MetricLogger(tmp_path, config={"run": 1})
    for step in range(0, 60, 10):
        logger.log(step, _train(step))
    logger.close()  # the interrupted run got to step 50; its checkpoint is at step 30
    with open(tmp_path / "metrics.csv", "a") as f:
        f.write("6")  # killed while writing the row of step 60

    with MetricLogger(tmp_path, config={"run": 2}, resume_step=30) as logger:
        for step in (30, 40):
            logger.log(step, _train(step, offset=1.0))
    _, rows = _csv_rows(tmp_path)
    assert [(r["step"], round(float(r["train/loss"]), 4)) for r in rows] == [
        ("0", 4.0),
        ("10", 3.9),
        ("20", 3.8),
        ("30", 4.7),
        ("40", 4.6),
    ]
    assert not list(tmp_path.glob("*.tmp"))
    acc = _events(tmp_path)
    assert [(e.step, round(e.value, 4)) for e in acc.Scalars("train/loss")] == [
        (0, 4.0),
        (10, 3.9),
        (20, 3.8),
        (30, 4.7),
        (40, 4.6),
    ]
    assert [e.step for e in acc.Tensors("config/text_summary")] == [0, 30]

    # a fresh run in the same folder starts over
    with MetricLogger(tmp_path) as logger:
        logger.log(0, _train(0, offset=2.0))
    _, rows = _csv_rows(tmp_path)
    assert [(r["step"], r["train/loss"]) for r in rows] == [("0", "6.0")]
    assert [(e.step, e.value) for e in _events(tmp_path).Scalars("train/loss")] == [(0, 6.0)]


def test_failing_backend_warns_once_and_the_others_keep_logging(tmp_path, caplog, monkeypatch):
    def broken(self, step, metrics):
        raise OSError("No space left on device")

    monkeypatch.setattr(loggers._TensorBoard, "log", broken)
    with caplog.at_level(logging.WARNING), MetricLogger(tmp_path) as logger:
        for step in range(3):
            logger.log(step, _train(step))
        assert set(logger.backends) == {"console", "csv"}
    (warning,) = _warnings(caplog)
    assert "tensorboard" in warning and "No space left" in warning
    assert [r["step"] for r in _csv_rows(tmp_path)[1]] == ["0", "1", "2"]


class _FakeWandb:
    """Stands in for the wandb module: records init arguments and logged steps."""

    def __init__(self, fail: bool = False):
        self.fail, self.inits, self.logged, self.finished = fail, [], [], 0

    def init(self, **kwargs):
        if self.fail:
            raise RuntimeError("wandb.errors.CommError: network unreachable")
        self.inits.append(kwargs)
        return SimpleNamespace(
            id=kwargs.get("id") or "run-abc",
            finish=self._finish,
            log=lambda metrics, step: self.logged.append((step, dict(metrics))),
        )

    def _finish(self):
        self.finished += 1


def test_wandb_logs_and_resume_continues_the_same_run(tmp_path, monkeypatch):
    fake = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    with MetricLogger(tmp_path, wandb_project="nanogpt", config={"seed": 1}) as logger:
        for step in (0, 10, 20):
            logger.log(step, {"train/loss": 1.0 * step})
    assert fake.inits[0]["project"] == "nanogpt" and fake.inits[0]["id"] is None
    assert fake.inits[0]["resume"] == "allow" and fake.inits[0]["config"] == {"seed": 1}
    assert [s for s, _ in fake.logged] == [0, 10, 20] and fake.finished == 1
    assert json.loads((tmp_path / "wandb_run.json").read_text()) == {"id": "run-abc", "last_step": 20}

    with MetricLogger(tmp_path, wandb_project="nanogpt", resume_step=10) as logger:
        for step in (10, 20, 30):  # W&B already holds 10 and 20: only 30 is new
            logger.log(step, {"train/loss": 1.0 * step})
    assert fake.inits[1]["id"] == "run-abc"
    assert [s for s, _ in fake.logged] == [0, 10, 20, 30]


@pytest.mark.parametrize("module", [None, _FakeWandb(fail=True)], ids=["not installed", "init fails"])
def test_wandb_missing_or_failing_warns_once(tmp_path, caplog, monkeypatch, module):
    monkeypatch.setitem(sys.modules, "wandb", module)  # None: `import wandb` raises ImportError
    with caplog.at_level(logging.WARNING), MetricLogger(tmp_path, wandb_project="p", tensorboard=False) as logger:
        logger.log(0, {"train/loss": 1.0})
        logger.log(1, {"train/loss": 0.5})
    (warning,) = _warnings(caplog)
    assert warning.startswith("wandb logging is off")
    assert "pip install" in warning if module is None else "network unreachable" in warning
    assert len(_csv_rows(tmp_path)[1]) == 2


def test_other_processes_write_nothing(tmp_path):
    logger = MetricLogger(tmp_path / "run", is_main=False, config={"a": 1})
    logger.log(0, {"train/loss": 1.0})
    logger.close()
    assert not (tmp_path / "run").exists()


def test_plot_loss_writes_a_png(tmp_path):
    with MetricLogger(tmp_path, tensorboard=False, console=False) as logger:
        for step in range(0, 100, 10):
            logger.log(step, _train(step))
            if step % 50 == 0:
                logger.log(step, {"val/loss": 4.1 - step / 100, "train/eval_loss": 4.0 - step / 100})
    png = plot_loss(tmp_path / "metrics.csv", tmp_path / "plots" / "loss.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    with pytest.raises(DataError, match="no metrics file"):
        plot_loss(tmp_path / "missing.csv", tmp_path / "x.png")
    with MetricLogger(tmp_path / "other", tensorboard=False, console=False) as logger:
        logger.log(0, {"train/lr": 1e-3})
    with pytest.raises(DataError, match="no train/loss or val/loss"):
        plot_loss(tmp_path / "other" / "metrics.csv", tmp_path / "y.png")
    assert not (tmp_path / "y.png").exists()


def test_plot_loss_marks_a_curve_of_one_point(tmp_path):
    with MetricLogger(tmp_path, tensorboard=False, console=False) as logger:
        logger.log(0, {"val/loss": 4.1})
        logger.log(0, _train(0))  # one train point: a line alone would draw nothing
        logger.log(10, {"val/loss": 3.9})
    fig = loggers.loss_figure(tmp_path / "metrics.csv")
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    assert list(lines["train"].get_xdata()) == [0]
    assert lines["train"].get_marker() not in (None, "None", "", " ")
    assert lines["val"].get_marker() == "o"  # unchanged for longer curves
    png = plot_loss(tmp_path / "metrics.csv", tmp_path / "loss.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_bucket_run_has_its_first_row_in_the_bucket_at_once(gcs_server):
    """A gs:// out_dir's logs go up at the first logged row, then at most every UPLOAD_SECONDS: a run killed
    before its first checkpoint leaves its logs in the bucket, as a local run leaves them on disk."""
    out = storage.path(gcs_server()) / "run"
    logger = MetricLogger(out, tensorboard=False, total_steps=100)
    logger.log(0, {"train/loss": 4.2})
    assert (out / "metrics.csv").read_text().splitlines()[1].startswith("0,")
    logger.log(1, {"train/loss": 4.1})  # within UPLOAD_SECONDS: not uploaded yet
    assert len((out / "metrics.csv").read_text().splitlines()) == 2
    logger.close()
    assert len((out / "metrics.csv").read_text().splitlines()) == 3
