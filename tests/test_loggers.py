"""Each backend's output read back with that tool's own reader, before and after a resume."""

from __future__ import annotations

import csv
import json
import logging
import struct
import sys
from pathlib import Path

import pytest
from conftest import compose

from nanogpt.config import CONFIG_DIR, to_dataclass, to_dict
from nanogpt.errors import ConfigError
from nanogpt.loggers import METRICS, STATE_FILE, ConsoleLogger, MLflowLogger, TensorBoardLogger, build_loggers
from nanogpt.loggers.tracking import tracking_uri

PRESET = "train_shakespeare_char_cpu"


def build(out_dir: Path, names: list[str], resume: bool = False, overrides: tuple[str, ...] = ()):
    """build_loggers exactly as the trainer calls it, from the shipped config."""
    job = to_dataclass(compose(PRESET, [f"logger=[{','.join(names)}]", f"out_dir='{out_dir}'", *overrides]))
    return build_loggers(job.logger, job.out_dir, to_dict(job), resume=resume, max_iters=6)


def log_run(logger, steps, offset: float = 0.0) -> None:
    """What the trainer does: train metrics every step, the evaluation every 2nd (a separate call)."""
    for s in steps:
        logger.log(s, {"train/loss": 10.0 - s + offset, "lr": 1e-3, "grad_norm": 0.5, "tokens": 64 * s,
                       "iter_ms": 5.0, "mfu": None})
        if s % 2 == 0:
            logger.log(s, {"val/loss": 11.0 - s + offset, "tokens": 64 * s})
    logger.log_summary({"iterations": steps[-1], "train_loss": 10.0 - steps[-1], "mfu": None})
    logger.close()


def first_and_resumed(out_dir: Path, names: list[str], overrides: tuple[str, ...] = ()) -> None:
    """Log steps 0..4, stop; resume from 3 (checkpoint) with different numbers; log 3..6."""
    log_run(build(out_dir, names, overrides=overrides), range(5))
    log_run(build(out_dir, names, resume=True, overrides=overrides), range(3, 7), offset=0.5)


# ---- config --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(p.stem for p in (Path(CONFIG_DIR) / "logger").glob("*.yaml")))
def test_every_logger_yaml_selects_its_backend(name):
    cfg = to_dataclass(compose(PRESET, [f"logger=[{name}]"])).logger
    assert getattr(cfg, name) is not None and cfg.console is not None


def test_several_loggers_at_once_and_console_by_default():
    cfg = to_dataclass(compose(PRESET, ["logger=[csv,tensorboard]"])).logger
    assert cfg.csv.filename == "metrics.csv" and cfg.tensorboard.log_dir == "tensorboard"
    assert cfg.wandb is None and cfg.mlflow is None
    for overrides in ([], ["logger=[]"]):
        cfg = to_dataclass(compose(PRESET, overrides)).logger
        assert (cfg.csv, cfg.tensorboard, cfg.wandb, cfg.mlflow) == (None, None, None, None)
    cfg = to_dataclass(compose("train_gpt2", ["logger=[wandb]", "logger.wandb.tags=[a,b]"])).logger
    assert cfg.wandb.tags == ["a", "b"] and cfg.wandb.mode == "online"
    with pytest.raises(ConfigError, match="logger.wandb.mode"):
        to_dataclass(compose(PRESET, ["logger=[wandb]", "logger.wandb.mode=sometimes"]))


def test_tracking_uri_defaults_to_a_local_mlruns_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri(None) == f"sqlite:///{tmp_path.resolve() / 'mlruns' / 'mlflow.db'}"
    assert (tmp_path / "mlruns").is_dir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://localhost:5000")
    assert tracking_uri(None) == "http://localhost:5000"
    assert tracking_uri("sqlite:///x.db") == "sqlite:///x.db"


# ---- console and CSV -----------------------------------------------------------------------------


def test_console_prints_one_line_per_logged_step(caplog):
    with caplog.at_level(logging.INFO, logger="nanogpt"):
        ConsoleLogger(max_iters=100).log(7, {"train/loss": 2.5, "lr": 1e-3, "iter_ms": 12.0, "mfu": 0.25})
        ConsoleLogger(progress=False).log(8, {"train/loss": 2.4})
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["iter 7/100 | loss 2.5000 | lr 1.00e-03 | 12.0 ms | mfu 25.00%"]


def read_csv(out_dir: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(out_dir / "metrics.csv", newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames), list(reader)


def test_csv_one_row_per_step_with_stable_columns(tmp_path):
    log_run(build(tmp_path, ["csv"]), range(5))
    header, rows = read_csv(tmp_path)
    assert header == ["step", *METRICS]
    assert [int(r["step"]) for r in rows] == [0, 1, 2, 3, 4]
    assert float(rows[2]["train/loss"]) == 8.0 and float(rows[2]["val/loss"]) == 9.0  # merged calls
    assert rows[1]["val/loss"] == "" and rows[1]["mfu"] == ""  # absent: empty cell
    assert int(rows[4]["tokens"]) == 256


def test_csv_resume_rewinds_to_the_checkpoint(tmp_path):
    first_and_resumed(tmp_path, ["csv"])
    _, rows = read_csv(tmp_path)
    assert [int(r["step"]) for r in rows] == list(range(7))
    assert float(rows[2]["train/loss"]) == 8.0  # before the resume: kept
    assert float(rows[3]["train/loss"]) == 7.5  # from the resume on: the resumed run's numbers
    log_run(build(tmp_path, ["csv"]), range(2))  # a fresh run in the same out_dir starts over
    assert [r["step"] for r in read_csv(tmp_path)[1]] == ["0", "1"]


# ---- TensorBoard ---------------------------------------------------------------------------------


def read_events(log_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return acc


def test_tensorboard_event_files_hold_every_step_once_after_resume(tmp_path):
    first_and_resumed(tmp_path, ["tensorboard"])
    acc = read_events(tmp_path / "tensorboard")
    assert {"train/loss", "val/loss", "lr", "grad_norm", "tokens", "iter_ms"} <= set(acc.Tags()["scalars"])
    train = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert train == [(0, 10.0), (1, 9.0), (2, 8.0), (3, 7.5), (4, 6.5), (5, 5.5), (6, 4.5)]
    assert [e.step for e in acc.Scalars("val/loss")] == [0, 2, 4, 6]
    assert "_hparams_/session_start_info" in acc.PluginTagToContent("hparams")  # the config, once
    assert "summary/text_summary" in acc.Tags()["tensors"]


# ---- Weights & Biases (offline) ------------------------------------------------------------------


def wandb_records(path: Path):
    """Records of a .wandb file: a 7-byte W&B header, then LevelDB-log chunks (32 KiB blocks)
    of wandb's own protobuf Record messages."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, buf = path.read_bytes(), 7, 32768, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        buf, pos = buf + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # FULL or LAST chunk: a whole record
            record = pb.Record()
            record.ParseFromString(buf)
            yield record
            buf = b""


def wandb_runs(out_dir: Path) -> list[dict]:
    runs = []
    for path in sorted((out_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        run = {"history": {}}
        for r in wandb_records(path):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                run.update(id=r.run.run_id, name=r.run.display_name, tags=list(r.run.tags),
                           config={u.key: json.loads(u.value_json) for u in r.run.config.update})
            elif kind == "history":
                row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
                run["history"][row["_step"]] = row
        runs.append(run)
    return runs


@pytest.mark.slow
def test_wandb_offline_run_is_continued_on_resume(tmp_path):
    first_and_resumed(tmp_path, ["wandb"], ("logger.wandb.mode=offline", "logger.wandb.tags=[cpu]"))
    runs = wandb_runs(tmp_path)
    run_id = json.loads((tmp_path / STATE_FILE).read_text())["wandb"]["run_id"]
    assert len(runs) == 2 and {r["id"] for r in runs} == {run_id}  # the same run, twice
    assert runs[0]["name"] == tmp_path.name and runs[0]["tags"] == ["cpu"]
    assert runs[0]["config"]["optim"]["lr"] == 1e-3 and runs[0]["config"]["model"]["n_layer"] == 4
    steps = [s for r in runs for s in r["history"]]
    assert sorted(steps) == list(range(7))  # the resumed run skipped 3 and 4: no duplicates
    first = next(r for r in runs if 0 in r["history"])
    assert first["history"][2]["train/loss"] == 8.0 and first["history"][2]["val/loss"] == 9.0
    assert first["history"][4]["tokens"] == 256


# ---- MLflow --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_mlflow_run_is_reopened_on_resume(tmp_path):
    from mlflow.tracking import MlflowClient

    store = tmp_path / "mlruns"
    options = (f"logger.mlflow.tracking_uri='{store}'", "logger.mlflow.experiment=tests")
    first_and_resumed(tmp_path / "out", ["mlflow"], options)
    client = MlflowClient(tracking_uri=f"sqlite:///{store / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert len(runs) == 1  # the resume continued the run
    run = runs[0]
    assert run.info.run_name == "out" and run.info.status == "FINISHED"
    assert run.data.params["optim.lr"] == "0.001" and run.data.params["model.n_layer"] == "4"
    train = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert sorted(train) == [(0, 10.0), (1, 9.0), (2, 8.0), (3, 7.0), (4, 6.0), (5, 5.5), (6, 4.5)]
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "val/loss")) == [0, 2, 4, 6]
    assert run.data.metrics["summary/iterations"] == 6


# ---- optional packages and failures --------------------------------------------------------------


@pytest.mark.parametrize("name,module", [("wandb", "wandb"), ("mlflow", "mlflow"),
                                         ("tensorboard", "torch.utils.tensorboard")])
def test_missing_package_is_one_line_with_the_pip_command(tmp_path, monkeypatch, name, module):
    monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'nanogpt\[loggers\]'") as e:
        build(tmp_path, [name])
    assert "\n" not in str(e.value)


def test_a_failing_backend_is_reported_once_and_the_others_go_on(tmp_path, monkeypatch, caplog):
    def disk_full(self, step, metrics):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(TensorBoardLogger, "log", disk_full)
    with caplog.at_level(logging.WARNING, logger="nanogpt"):
        log_run(build(tmp_path, ["tensorboard", "csv"]), range(5))
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "tensorboard" in warnings[0] and "No space left" in warnings[0]
    assert [r["step"] for r in read_csv(tmp_path)[1]] == ["0", "1", "2", "3", "4"]


def test_a_backend_that_cannot_start_is_skipped(tmp_path, monkeypatch, caplog):
    def unreachable(self, *args):
        raise ConnectionError("tracking server unreachable")

    monkeypatch.setattr(MLflowLogger, "__init__", unreachable)
    with caplog.at_level(logging.WARNING, logger="nanogpt"):
        logger = build(tmp_path, ["mlflow", "csv"])
    assert set(logger.backends) == {"console", "csv"}
    assert "mlflow could not start" in caplog.text
    log_run(logger, range(2))
    assert len(read_csv(tmp_path)[1]) == 2
