"""Training metrics to the console, TensorBoard, a CSV file and Weights & Biases; process 0 only.

Metric names, the same in every backend (TensorBoard tags, CSV columns, W&B keys, summary.json):

    train/loss            mean loss over every token of the optimizer step (nats)
    train/lr              learning rate used by the step
    train/grad_norm       global gradient norm, before clipping
    train/ms_per_step     wall milliseconds per optimizer step, over the last log interval (never the
                          first step after a start or resume, which includes compilation)
    train/compile_seconds wall seconds of that first step: compilation plus one step, logged once per start
    train/tokens_per_sec  tokens per second, all devices together
    train/mfu             model FLOPs utilisation, a fraction (the console prints %, and above 100%
                          "mfu >100% (peak too low?)"; the files keep the raw fraction); see metrics.py
    train/tokens          tokens trained on so far
    train/skipped         non-finite steps skipped so far (their updates were not applied)
    train/eval_loss       mean loss on eval_iters fixed train batches, at each evaluation
    val/loss              mean loss on eval_iters fixed val batches, at each evaluation

Any other key is logged as given. Files under out_dir: `tb/` (tensorboardX events, plus the config
as text under the tag `config`), `metrics.csv` (wide: `step`, then one column per name in order of
first appearance, one row per `log` call, empty cells for absent names; the header grows when a new
name appears), `wandb_run.json` (the W&B run id, so a resume continues the same run).

Resume (`resume_step=s`, the first step the new run logs): CSV rows at steps >= s are dropped (the
file is rewritten atomically); TensorBoard hides the earlier events at steps >= s (a SessionLog START
at s, tensorboardX's purge_step); W&B reopens the same run, whose history only appends, so steps it
already holds are not sent again. A fresh run (resume_step None) starts a new CSV, hides all earlier
events in out_dir/tb and starts a new W&B run.

A gs:// out_dir (any URL): the files are written as above in a local temporary folder and uploaded,
each whole in one upload (an object in a bucket is replaced whole: readers never see half a file),
at the first logged row, then at most every UPLOAD_SECONDS, at each `sync()` (the trainer calls it
after each checkpoint save, so the bucket's CSV holds every step before the newest checkpoint) and
at `close()`. A resume first
downloads the run's metrics.csv and wandb_run.json. TensorBoard reads the events from the bucket
(`tensorboard --logdir gs://.../tb`). W&B keeps its local files in ~/.cache/nanogpt_jax/wandb/.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
from absl import logging

from nanogpt_jax import storage
from nanogpt_jax.errors import DataError
from nanogpt_jax.metrics import format_mfu
from nanogpt_jax.progress import format_duration

if TYPE_CHECKING:
    from matplotlib.figure import Figure

CSV_NAME = "metrics.csv"
TB_DIR = "tb"
WANDB_STATE = "wandb_run.json"
UPLOAD_SECONDS = 30.0  # a gs:// out_dir's logs are uploaded at most this often (and at sync / close)


# ---- the console line --------------------------------------------------------------------------


def _si(x: float) -> str:
    """19300 -> '19.3k', 1.5e6 -> '1.50M'."""
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g}{suffix}" if x / div < 100 else f"{x / div:.0f}{suffix}"
    return f"{x:.3g}"


# (metric, how the console shows it); others are left to the files
_CONSOLE = (
    ("train/loss", lambda v: f"loss {v:.4f}"),
    ("train/eval_loss", lambda v: f"train {v:.4f}"),
    ("val/loss", lambda v: f"val {v:.4f}"),
    ("train/lr", lambda v: f"lr {v:.2e}"),
    ("train/grad_norm", lambda v: f"grad {v:.2f}"),
    ("train/ms_per_step", lambda v: f"{v:.1f} ms"),
    ("train/tokens_per_sec", lambda v: f"{_si(v)} tok/s"),
    ("train/mfu", lambda v: f"mfu {format_mfu(v)}"),
    ("train/compile_seconds", lambda v: f"compile {v:.1f}s"),
    ("train/skipped", lambda v: f"skipped {v:.0f}" if v else ""),
)


def format_line(step: int, metrics: dict[str, float], total_steps: int | None = None) -> str:
    """One console line, e.g. 'step 120/2000 | loss 3.2104 | lr 6.00e-04 | grad 0.92 | 41.2 ms |
    19.3k tok/s | mfu 51.2% | eta 1m17s'. Absent or None metrics are left out; the eta needs
    total_steps and train/ms_per_step."""
    parts = [f"step {step}" + (f"/{total_steps}" if total_steps else "")]
    parts += [fmt(metrics[k]) for k, fmt in _CONSOLE if metrics.get(k) is not None]
    ms = metrics.get("train/ms_per_step")
    if total_steps and ms is not None and step < total_steps:
        parts.append(f"eta {format_duration((total_steps - step) * ms / 1000)}")
    return " | ".join(p for p in parts if p)


class _Console:
    def __init__(self, total_steps: int | None):
        self.total_steps = total_steps

    def log(self, step: int, metrics: dict[str, float]) -> None:
        logging.info("%s", format_line(step, metrics, self.total_steps))

    def close(self) -> None:
        pass


# ---- CSV ----------------------------------------------------------------------------------------


def _read_csv(path: storage.AnyPath) -> tuple[list[str], list[dict[str, str]]]:
    """(header, rows) of a metrics CSV (a local path or a URL). A last line without its newline is
    a row cut short by a kill during the write: it is left out."""
    if isinstance(path, Path):
        with open(path, newline="") as f:
            text = f.read()
    else:
        text = path.read_bytes().decode()
    if not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    reader = csv.DictReader(io.StringIO(text))
    return list(reader.fieldnames or []), list(reader)


class _CSV:
    """out_dir/metrics.csv, wide; see the module docstring."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        columns, rows = ["step"], []
        if resume_step is not None and path.exists():
            columns, rows = _read_csv(path)
            rows = [r for r in rows if r.get("step") and int(float(r["step"])) < resume_step]
        self.columns = columns if columns[:1] == ["step"] else ["step"]
        self.file = None
        self._rewrite(rows)

    def _rewrite(self, rows: list[dict[str, str]]) -> None:
        """Write header + rows to a temporary file and move it in place: a crash leaves the old file
        or the new one, never half of one. Then append to it."""
        if self.file is not None:
            self.file.close()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, self.columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self.path)
        self.file = open(self.path, "a", newline="")  # noqa: SIM115 - kept open for the run
        self.writer = csv.DictWriter(self.file, self.columns)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        new = [k for k in metrics if k not in self.columns]
        if new:  # a name seen for the first time (e.g. val/loss at the first evaluation)
            self.file.close()
            self.file = None
            _, rows = _read_csv(self.path)
            self.columns = self.columns + new
            self._rewrite(rows)
        self.writer.writerow({"step": step, **metrics})  # str(float): shortest exact repr
        self.file.flush()

    def flush(self) -> None:
        pass  # every row is flushed as it is written

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


# ---- TensorBoard --------------------------------------------------------------------------------


class _TensorBoard:
    """tensorboardX events in out_dir/tb; the config as text (a JSON block) at the first step."""

    def __init__(self, log_dir: Path, config: dict[str, Any] | None, resume_step: int | None):
        from tensorboardX import SummaryWriter

        start = resume_step or 0
        # purge_step: TensorBoard hides what earlier files hold at steps >= start. The suffix keeps
        # files from the same second apart and in creation order (TensorBoard reads them sorted).
        self.writer = SummaryWriter(str(log_dir), purge_step=start, flush_secs=30, filename_suffix=f".{time.time_ns()}")
        if config is not None:
            text = json.dumps(config, indent=2, default=str)
            self.writer.add_text("config", "    " + text.replace("\n", "\n    "), start)  # markdown code

    def log(self, step: int, metrics: dict[str, float]) -> None:
        # one event holding every scalar of the row: add_scalar per name sent an event each through
        # tensorboardX's multiprocessing queue (~1 ms of the main thread per logged step on a 2-core CPU)
        from tensorboardX.proto.summary_pb2 import Summary

        self.writer.file_writer.add_summary(
            Summary(value=[Summary.Value(tag=name, simple_value=value) for name, value in metrics.items()]), step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


# ---- Weights & Biases ---------------------------------------------------------------------------


class _Wandb:
    """A W&B run (the wandb extra; WANDB_MODE=offline works without a network, `wandb sync` later).
    Its id and last logged step live in out_dir/wandb_run.json so a resume continues the run."""

    def __init__(self, out_dir: Path, project: str, config: dict[str, Any] | None, resume_step: int | None,
                 wandb_dir: Path | None = None):
        try:
            import wandb
        except ImportError:
            raise ImportError("the wandb package is not installed (pip install 'nanogpt_jax[wandb]')") from None
        self.state_path = out_dir / WANDB_STATE
        state = {}
        if resume_step is not None and self.state_path.exists():
            state = json.loads(self.state_path.read_text())
        # the run's history only appends: steps it already holds are not sent again
        self.last_step = state.get("last_step", -1)
        self.run = wandb.init(
            project=project,
            dir=str(wandb_dir or out_dir),
            id=state.get("id"),
            resume="allow",
            config=config,
            allow_val_change=True,
        )
        self._save()

    def _save(self) -> None:
        tmp = self.state_path.with_name(self.state_path.name + ".tmp")
        tmp.write_text(json.dumps({"id": self.run.id, "last_step": self.last_step}))
        os.replace(tmp, self.state_path)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if step <= self.last_step:
            return
        self.run.log(metrics, step=step)
        self.last_step = step
        self._save()

    def close(self) -> None:
        self.run.finish()


# ---- a bucket out_dir --------------------------------------------------------------------------


class _Mirror:
    """The local folder the backends write for a URL out_dir, and its upload to the bucket.

    Only files the backends own are uploaded (metrics.csv, wandb_run.json, tb/*), each when it
    changed since its last upload, whole, in one upload."""

    def __init__(self, remote: storage.AnyPath, resume_step: int | None):
        self.remote = remote
        self.local = Path(tempfile.mkdtemp(prefix="nanogpt_jax-logs-"))
        self.sent: dict[str, tuple[int, int]] = {}  # relative path -> (size, mtime_ns) at its last upload
        # the first logged row is uploaded at once, as a local run's is on disk: a run killed before its
        # first checkpoint leaves its logs in the bucket too (at most UPLOAD_SECONDS behind)
        self.last = -math.inf
        if resume_step is not None:  # the rows and W&B id of the run so far
            for name in (CSV_NAME, WANDB_STATE):
                try:
                    if (remote / name).exists():
                        (self.local / name).write_bytes((remote / name).read_bytes())
                except Exception as e:  # noqa: BLE001
                    raise storage.explain(e, remote / name, "read") from None

    def _files(self) -> list[Path]:
        files = [self.local / CSV_NAME, self.local / WANDB_STATE]
        tb = self.local / TB_DIR
        if tb.is_dir():
            files += sorted(p for p in tb.rglob("*") if p.is_file())
        return [p for p in files if p.is_file()]

    def sync(self, backends: dict[str, Any], force: bool = False) -> None:
        """Upload what changed; unless `force`, at most every UPLOAD_SECONDS."""
        if not force and time.monotonic() - self.last < UPLOAD_SECONDS:
            return
        self.last = time.monotonic()
        for name in ("csv", "tensorboard"):
            if name in backends:
                backends[name].flush()
        failed: list[tuple[str, Exception]] = []
        for p in self._files():
            rel = p.relative_to(self.local).as_posix()
            stat = p.stat()
            if self.sent.get(rel) == (stat.st_size, stat.st_mtime_ns):
                continue
            try:
                storage.upload(p, self.remote / rel)
                self.sent[rel] = (stat.st_size, stat.st_mtime_ns)
            except Exception as e:  # noqa: BLE001 - a network error must not stop training: the next sync retries
                failed.append((rel, e))
        if failed:  # one line per sync, not per file
            others = f" and {len(failed) - 1} other file{'s' if len(failed) > 2 else ''}" if len(failed) > 1 else ""
            logging.warning("uploading %s%s failed (%s); retrying at the next upload", self.remote / failed[0][0],
                            others, failed[0][1])

    def close(self) -> None:
        shutil.rmtree(self.local, ignore_errors=True)


# ---- the logger the trainer uses ----------------------------------------------------------------


class MetricLogger:
    """Sends each `log(step, metrics)` to the console, TensorBoard, CSV and W&B.

    Only process 0 logs (is_main None: `jax.process_index() == 0`); elsewhere every method does
    nothing and no file is written. A backend that cannot start or fails later (wandb missing, a
    full disk, a network error) is reported by one warning and dropped; the others keep logging and
    training goes on.

    Args:
        out_dir: run folder; files are listed in the module docstring.
        tensorboard, csv: enable those backends (log.tensorboard, log.csv).
        wandb_project: W&B project name (log.wandb_project); None = no W&B.
        config: the resolved run config as a plain dict (TensorBoard text, W&B config).
        resume_step: the first step this run logs when resuming; None = a fresh run.
        console: log a line per call through absl logging.
        total_steps: max_iters, for 'step i/n' and the eta on the console.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        *,
        tensorboard: bool = True,
        csv: bool = True,
        wandb_project: str | None = None,
        config: dict[str, Any] | None = None,
        resume_step: int | None = None,
        console: bool = True,
        total_steps: int | None = None,
        is_main: bool | None = None,
    ):
        self.is_main = jax.process_index() == 0 if is_main is None else is_main
        self.backends: dict[str, Any] = {}
        self._mirror: _Mirror | None = None
        if not self.is_main:
            return
        out = Path(out_dir) if not storage.is_url(out_dir) else None
        if out is None and (tensorboard or csv or wandb_project):
            self._mirror = _Mirror(storage.path(out_dir), resume_step)
            out = self._mirror.local
        starters: dict[str, Callable[[], Any]] = {}
        if console:
            starters["console"] = lambda: _Console(total_steps)
        if csv:
            starters["csv"] = lambda: _CSV(out / CSV_NAME, resume_step)
        if tensorboard:
            starters["tensorboard"] = lambda: _TensorBoard(out / TB_DIR, config, resume_step)
        if wandb_project:
            starters["wandb"] = lambda: _Wandb(out, wandb_project, config, resume_step, _wandb_dir(out_dir))
        if len(starters) > 1:
            out.mkdir(parents=True, exist_ok=True)
        for name, start in starters.items():
            try:
                self.backends[name] = start()
            except Exception as e:  # noqa: BLE001 - no logging backend may stop a training run
                logging.warning("%s logging is off: %s: %s", name, type(e).__name__, e)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Log `metrics` (name -> number; None values are skipped) at optimizer step `step`.
        Values may be Python, NumPy or JAX scalars; a JAX scalar waits for its computation."""
        if not self.backends:
            return
        values = {k: float(v) for k, v in metrics.items() if v is not None}
        for name, backend in list(self.backends.items()):
            try:
                backend.log(int(step), values)
            except Exception as e:  # noqa: BLE001
                self._drop(name, e)
        if self._mirror is not None:
            self._mirror.sync(self.backends)

    def sync(self) -> None:
        """With a gs:// out_dir, upload the logs now (the trainer calls it after each checkpoint save);
        locally nothing to do (the files are flushed as they are written)."""
        if self._mirror is not None:
            self._mirror.sync(self.backends, force=True)

    def _drop(self, name: str, error: Exception) -> None:
        logging.warning(
            "%s logging failed and is off for the rest of the run: %s: %s", name, type(error).__name__, error
        )
        backend = self.backends.pop(name)
        try:
            backend.close()  # release its files if it still can
        except Exception:  # noqa: BLE001
            pass

    def close(self) -> None:
        """Flush and close every backend (finishes the W&B run). Safe to call twice."""
        for name, backend in list(self.backends.items()):
            try:
                backend.close()
            except Exception as e:  # noqa: BLE001
                logging.warning("%s logging failed to close: %s: %s", name, type(e).__name__, e)
        self.backends.clear()
        if self._mirror is not None:
            self._mirror.sync({}, force=True)
            self._mirror.close()
            self._mirror = None

    def __enter__(self) -> MetricLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _wandb_dir(out_dir: str | os.PathLike) -> Path | None:
    """W&B's local folder: out_dir itself, or for a URL out_dir ~/.cache/nanogpt_jax/wandb/<bucket>/<path>."""
    if not storage.is_url(out_dir):
        return None
    folder = Path("~/.cache/nanogpt_jax/wandb").expanduser() / os.fspath(out_dir).split("://", 1)[1].strip("/")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


# ---- the loss curve -----------------------------------------------------------------------------


def read_metrics(csv_path: str | os.PathLike) -> dict[str, list[float | None]]:
    """The columns of a metrics.csv as lists of floats (None for an empty cell).
    Raises DataError (one line) if the file is missing or holds no rows."""
    path = storage.path(csv_path)
    if path.is_dir():
        path = path / CSV_NAME
    if not path.is_file():
        raise DataError(f"no metrics file at {path}: train with log.csv=True, then pass out_dir/{CSV_NAME}")
    columns, rows = _read_csv(path)
    if not rows:
        raise DataError(f"{path} holds no logged steps yet")
    return {c: [float(r[c]) if r.get(c) not in (None, "") else None for r in rows] for c in columns}


def loss_figure(csv_path: str | os.PathLike) -> Figure:
    """Train and val loss against step from a metrics.csv, as a matplotlib Figure (Agg, no display
    needed). A curve of fewer than two points gets markers (a line through one point is invisible).
    Raises DataError when the CSV is missing or has no loss."""
    from matplotlib.figure import Figure  # no pyplot: renders with Agg, no display, no global state

    columns = read_metrics(csv_path)
    curves = (
        ("train/loss", "train", {"lw": 1.0}),
        ("train/eval_loss", "train (eval)", {"ls": ":", "marker": "."}),
        ("val/loss", "val", {"ls": "--", "marker": "o", "ms": 3}),
    )
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    drawn = 0
    for name, label, style in curves:
        points = [(s, v) for s, v in zip(columns["step"], columns.get(name, []), strict=False) if v is not None]
        if len(points) < 2:
            style = {"marker": "o", "ms": 4, **style}
        if points:
            ax.plot(*zip(*points, strict=True), label=label, **style)
            drawn += 1
    if not drawn:
        raise DataError(f"{csv_path} has no train/loss or val/loss values to plot")
    ax.set(xlabel="step", ylabel="loss (nats)", title="train / val loss")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def plot_loss(csv_path: str | os.PathLike, png_path: str | os.PathLike) -> storage.AnyPath:
    """Draw `loss_figure(csv_path)` into a PNG. Returns the PNG path. Raises DataError when the CSV is
    missing or has no loss (then no PNG is written)."""
    fig = loss_figure(csv_path)
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=120)
    storage.write_atomic(png_path, image.getvalue())  # one upload to a bucket
    return storage.path(png_path)
