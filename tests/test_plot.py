"""nanogpt-plot: PNGs from the CSV logger's files, several runs overlaid."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from nanogpt.cli.plot import main
from nanogpt.errors import DataError
from nanogpt.loggers import CSVLogger
from nanogpt.plot import plot_runs, read_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fake_run(out_dir: Path, steps: int = 50, scale: float = 1.0, tokens: bool = True) -> Path:
    """A metrics.csv as the CSV logger writes it during training."""
    logger = CSVLogger(out_dir / "metrics.csv", resume=False)
    for s in range(steps):
        lr = 1e-3 * min(1.0, (s + 1) / 10) * (0.5 + 0.5 * math.cos(math.pi * s / steps))
        metrics = {"train/loss": scale * (2 + 2 * math.exp(-s / 10)), "lr": lr, "iter_ms": 10.0}
        if tokens:
            metrics["tokens"] = 768 * s
        logger.log(s, metrics)
        if s % 10 == 0:
            logger.log(s, {"val/loss": scale * (2.2 + 2 * math.exp(-s / 10))})
    logger.close()
    return out_dir


def image_shape(path: Path) -> tuple[int, ...]:
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == PNG_MAGIC
    return imread(path).shape


def test_read_metrics_keeps_empty_cells_as_none(tmp_path):
    cols = read_metrics(fake_run(tmp_path, steps=12))
    assert cols["step"][:3] == [0.0, 1.0, 2.0] and cols["tokens"][2] == 1536.0
    assert cols["val/loss"][0] is not None and cols["val/loss"][1] is None
    assert cols["mfu"] == [None] * 12


def test_plot_overlays_several_runs(tmp_path):
    runs = [fake_run(tmp_path / "a"), fake_run(tmp_path / "b", 30, scale=1.1),
            fake_run(tmp_path / "c", tokens=False)]
    out = plot_runs([runs[0], runs[1] / "metrics.csv", runs[2]], tmp_path / "plots" / "loss.png")
    height, width, _ = image_shape(out)
    assert width > height > 300  # two panels side by side


def test_cli_writes_the_png(tmp_path, capsys):
    run = fake_run(tmp_path / "out-demo")
    main([str(run), "-o", str(tmp_path / "curves.png"), "--x", "step", "--no-lr"])
    assert "curves.png" in capsys.readouterr().out
    assert image_shape(tmp_path / "curves.png")[0] > 300


def test_cli_missing_metrics_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "nowhere")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "logger=[csv]" in err and err.count("\n") == 1


def test_empty_csv_is_a_data_error(tmp_path):
    (tmp_path / "metrics.csv").write_text("step,train/loss\n")
    with pytest.raises(DataError, match="no logged steps"):
        read_metrics(tmp_path)
