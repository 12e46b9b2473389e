"""nanogpt_jax.bench.optimizers: steps-to-loss on hand-made curves, and the report of a tiny AdamW-vs-Muon run.

Figures are never asserted against a speed: only their arithmetic, read back from the runs' own files.
"""

import contextlib
import io
import json

import pytest
from conftest import tiny_run_config

from nanogpt_jax import loggers
from nanogpt_jax.bench import optimizers
from nanogpt_jax.errors import UserError


def test_steps_to_loss_interpolates_between_evaluations():
    steps, losses = [0, 50, 100, 150], [4.0, 2.0, 1.5, 1.2]
    assert optimizers.steps_to_loss(steps, losses, 1.5) == 100.0  # met exactly at an evaluation
    assert optimizers.steps_to_loss(steps, losses, 1.8) == pytest.approx(50 + (2.0 - 1.8) / 0.5 * 50)  # 70
    assert optimizers.steps_to_loss(steps, losses, 3.0) == pytest.approx(25.0)
    assert optimizers.steps_to_loss(steps, losses, 4.5) == 0.0  # the first evaluation is already there
    assert optimizers.steps_to_loss(steps, losses, 1.0) is None  # never reached
    # the first crossing counts, even if the curve goes back up; missing and NaN points are skipped
    assert optimizers.steps_to_loss([0, 10, 20, 30], [3.0, 1.0, 2.0, 0.5], 1.5) == pytest.approx(7.5)
    assert optimizers.steps_to_loss([0, 10, 20], [3.0, float("nan"), 1.0], 2.0) == pytest.approx(10.0)


def test_train_seconds_add_compile_and_step_times():
    columns = {"step": [0, 1, 2, 3, 4], "train/compile_seconds": [5.0, None, None, None, None],
               "train/ms_per_step": [None, 100.0, 200.0, 300.0, None]}
    # after S steps: steps 0..S-1; step 4 has no time logged, so it counts the median (200 ms)
    assert optimizers.train_seconds(columns, [0, 1, 2, 2.5, 4, 5]) == pytest.approx([0, 5.0, 5.1, 5.2, 5.6, 5.8])


@pytest.fixture(scope="module")
def tiny_benchmark(token_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("optimizers")
    config = tiny_run_config(token_data, tmp / "unused", **{"train.max_iters": 12, "train.eval_interval": 10,
                                                            "log.tensorboard": False})
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        result = optimizers.run(config, [0.02], tmp / "bench", eval_interval=4)
    return result, tmp / "bench", printed.getvalue()


def test_report_figures_come_from_each_runs_files(tiny_benchmark):
    result, out, printed = tiny_benchmark
    adamw, muon = result["runs"]
    assert (adamw["name"], adamw["optimizer"], muon["name"], muon["optimizer"]) == ("adamw", "adamw", "muon_lr0.02",
                                                                                    "muon")
    for r in (adamw, muon):
        folder = out / r["name"]
        columns = loggers.read_metrics(folder / loggers.CSV_NAME)
        val = [(s, v) for s, v in zip(columns["step"], columns["val/loss"], strict=True) if v is not None]
        # every run evaluated every 4 steps and at the end, whatever the config's eval_interval
        assert [s for s, _ in val] == [0, 4, 8, 12] and r["curve"]["step"] == [0, 4, 8, 12]
        assert r["final_val_loss"] == val[-1][1] and r["curve"]["val_loss"] == [v for _, v in val]
        summary = json.loads((folder / "summary.json").read_text())
        assert (r["wall_seconds"], r["ms_per_step"]) == (summary["wall_seconds"], summary["ms_per_step"])
        # compile seconds + every step's ms (log_interval forced to 1: all 12 steps logged)
        ms = [m for m in columns["train/ms_per_step"] if m is not None]
        compile_s = next(c for c in columns["train/compile_seconds"] if c is not None)
        assert len(ms) == 11 and r["train_seconds"] == pytest.approx(compile_s + sum(ms) / 1e3)
    assert result["target_val_loss"] == adamw["final_val_loss"]
    assert adamw["steps_to_target"] == optimizers.steps_to_loss([0, 4, 8, 12], adamw["curve"]["val_loss"],
                                                                adamw["final_val_loss"])
    assert adamw["train_seconds_to_target"] == pytest.approx(
        optimizers.train_seconds(loggers.read_metrics(out / "adamw" / loggers.CSV_NAME),
                                 [adamw["steps_to_target"]])[0])
    # the files: JSON as returned, the table as printed, the chart
    assert json.loads((out / "optimizers.json").read_text())["runs"][1]["steps_to_target"] == muon["steps_to_target"]
    table = (out / "optimizers.md").read_text()
    assert table == optimizers.markdown(result) and table in printed
    assert table.splitlines()[2].startswith("| run | final val loss | steps to target |")
    assert f"| adamw | {adamw['final_val_loss']:,.4f} | {adamw['steps_to_target']:,.0f} |" in table
    assert (out / "optimizers.png").read_bytes()[:4] == b"\x89PNG"


def test_not_reached_in_the_table(tiny_benchmark):
    result, _, _ = tiny_benchmark
    unreached = {**result, "runs": [{**result["runs"][1], "steps_to_target": None, "train_seconds_to_target": None}]}
    assert "| muon_lr0.02 | " in optimizers.markdown(unreached)
    assert "| not reached | not reached |" in optimizers.markdown(unreached)


def test_taken_folders_and_bad_flags_are_refused_before_training(tiny_benchmark, token_data, tmp_path):
    _, out, _ = tiny_benchmark
    config = tiny_run_config(token_data, tmp_path / "unused")
    with pytest.raises(UserError, match="exist already; choose a new --out_dir"):
        optimizers.run(config, [0.02], out)
    with pytest.raises(UserError, match="at least one Muon learning rate"):
        optimizers.run(config, [], tmp_path / "new")
    with pytest.raises(UserError, match="optim.muon_lr"):
        optimizers.run(config, [-1.0], tmp_path / "new")
    assert not (tmp_path / "new").exists()
