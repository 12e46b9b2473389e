"""Loss curves from the CSV logger's files: train/val loss (and lr) against tokens, runs overlaid."""

from __future__ import annotations

import csv
from pathlib import Path

from nanogpt.config import CSVLoggerConfig
from nanogpt.errors import DataError
from nanogpt.loggers.base import require

METRICS_CSV = CSVLoggerConfig.filename  # "metrics.csv" in out_dir


def find_csv(run: str | Path) -> Path:
    """A CSV file as given, or the metrics file inside an out_dir."""
    path = Path(run)
    if path.is_dir():
        path = path / METRICS_CSV
    if not path.is_file():
        raise DataError(f"no metrics file at {path}: train with logger=[csv] (it writes "
                        f"<out_dir>/{METRICS_CSV}), then pass the out_dir or the CSV file")
    return path


def read_metrics(path: str | Path) -> dict[str, list[float | None]]:
    """Columns of a metrics CSV as lists of numbers (None for an empty cell)."""
    with open(find_csv(path), newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise DataError(f"{path} holds no logged steps yet")
    return {key: [float(row[key]) if row.get(key) not in (None, "") else None for row in rows]
            for key in rows[0]}


def _series(columns: dict[str, list[float | None]], x: str, y: str) -> tuple[list[float], list[float]]:
    """The (x, y) points where both are present."""
    xs, ys = columns.get(x, []), columns.get(y, [])
    pairs = [(a, b) for a, b in zip(xs, ys, strict=False) if a is not None and b is not None]
    return [a for a, _ in pairs], [b for _, b in pairs]


def _label(run: str | Path) -> str:
    path = Path(run).resolve()
    return path.name if path.is_dir() else f"{path.parent.name}/{path.stem}"


def plot_runs(runs: list[str | Path], output: str | Path = "loss.png", x: str = "tokens",
              lr: bool = True) -> Path:
    """Write a PNG of train (solid) and val (dashed) loss against `x` (tokens or step) for each run,
    with the learning rate in a second panel when `lr`. Returns the PNG's path."""
    require("matplotlib", "nanogpt-plot")
    from matplotlib.figure import Figure  # no pyplot: renders with Agg, needs no display
    from matplotlib.ticker import EngFormatter

    tables = [read_metrics(run) for run in runs]
    if not all(any(v is not None for v in t.get(x, [])) for t in tables):
        x = "step"  # one axis for all runs: a run without token counts puts every run on steps
    fig = Figure(figsize=(11 if lr else 7, 4.5), layout="constrained")
    axes = fig.subplots(1, 2 if lr else 1, squeeze=False)[0]
    for i, (run, columns) in enumerate(zip(runs, tables, strict=True)):
        color, name = f"C{i % 10}", _label(run)
        axes[0].plot(*_series(columns, x, "train/loss"), color=color, lw=1.2, label=f"{name} train")
        axes[0].plot(*_series(columns, x, "val/loss"), color=color, ls="--", marker="o", ms=3,
                     label=f"{name} val")
        if lr:
            axes[1].plot(*_series(columns, x, "lr"), color=color, label=name)
    axes[0].set(xlabel=x, ylabel="loss", title="train / val loss")
    axes[0].legend(fontsize="small")
    if lr:
        axes[1].set(xlabel=x, ylabel="learning rate", title="lr")
        axes[1].ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_formatter(EngFormatter())  # 20k, 1.5M: token counts stay readable
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=120)
    return output
