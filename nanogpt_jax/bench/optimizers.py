"""AdamW against Muon on one recipe: steps and seconds to AdamW's final val loss, over a Muon learning-rate sweep.

    python -m nanogpt_jax.bench.optimizers --config configs/shakespeare_char.py:cpu \\
        --muon_lrs 0.01,0.02,0.04 --out_dir bench/optimizers

Trains the config once with optim.name=adamw, then once with optim.name=muon per --muon_lrs value, each
through `train.train` into its own folder under --out_dir (adamw/, muon_lr0.02/, ...). Everything else is
the config's for every run (data, seed, schedule, steps, AdamW's keys, which Muon also uses on the
embeddings, biases and gains), except train.eval_interval, set to --eval_interval (default 50, finer than a
recipe's) so that a loss is reached between evaluations close together, and train.log_interval=1, so that
every step's time is logged. Each run's metrics.csv and summary.json are then read back:

- target: AdamW's final val loss (`val/loss` of its last evaluation, at step train.max_iters; the loss on
  train.eval_iters fixed val batches, the same batches in every run).
- steps to target: `steps_to_loss`, the first evaluation at or below the target, linearly interpolated
  with the evaluation before it; None ("not reached") if no evaluation gets there.
- train seconds to target: `train_seconds`, the first step's compile seconds plus every step's time up
  to that (fractional) step, from `train/compile_seconds` and `train/ms_per_step`. Evaluations and
  checkpoint saves are left out: how many there are is the benchmark's choice (eval_interval), not the
  optimizer's.
- run wall seconds: summary.json's `wall_seconds`, the whole `train.train` call (start-up, compilation,
  evaluations and checkpoints included); ms/step: its median step time.

Writes <out_dir>/optimizers.json (`SCHEMA`: the figures, each run's val curve, the environment and the
config), optimizers.md (the table, as printed) and optimizers.png (`chart`: val loss against step and
against train seconds). Figures only, nothing is asserted; a shared machine's load shows in the seconds
(the JSON keeps the 1-minute load average before each run).
"""

from __future__ import annotations

import datetime
import io
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from absl import logging
from ml_collections import ConfigDict

from nanogpt_jax import loggers, storage
from nanogpt_jax import train as train_lib
from nanogpt_jax.bench import report
from nanogpt_jax.config import validate
from nanogpt_jax.errors import UserError

SCHEMA = "nanogpt_jax-bench-optimizers/1"
NAME = "optimizers"  # <out_dir>/optimizers.json, .md, .png
DEFAULT_EVAL_INTERVAL = 50  # steps between evaluations in every run of the benchmark

COLUMNS: list[report.Column] = [
    ("run", "name", str), ("final val loss", "final_val_loss", report.num(4)),
    ("steps to target", "steps_to_target", report.num(0)),
    ("train s to target", "train_seconds_to_target", report.num(1)),
    ("train s (all steps)", "train_seconds", report.num(1)), ("run wall s", "wall_seconds", report.num(1)),
    ("ms/step", "ms_per_step", report.num(1)),
]
_NOT_REACHED = {"steps_to_target": "not reached", "train_seconds_to_target": "not reached"}


# ---- figures ---------------------------------------------------------------------------------


def steps_to_loss(steps: Sequence[float], losses: Sequence[float], target: float) -> float | None:
    """The step at which a loss curve first reaches `target`.

    Args:
        steps, losses: the evaluations in step order (nats); None or NaN losses are skipped.
        target: the loss to reach (nats).
    Returns:
        s0 + (l0 - target) / (l0 - l1) x (s1 - s0) for the first evaluation (s1, l1) with l1 <= target and
        the evaluation (s0, l0) before it (a straight line between the two); s1 itself when it is the first
        evaluation; None when no evaluation reaches the target.
    """
    before = None
    for s, loss in zip(steps, losses, strict=True):
        if loss is None or math.isnan(loss):
            continue
        if loss <= target:
            if before is None:
                return float(s)
            s0, l0 = before
            return s0 + (l0 - target) / (l0 - loss) * (s - s0)
        before = (s, loss)
    return None


def train_seconds(columns: dict[str, list[float | None]], at_steps: Sequence[float]) -> list[float]:
    """Training seconds spent before each of `at_steps` (optimizer steps done, may be fractional).

    Step 0's time is `train/compile_seconds` (compilation and the first step), step s's (s >= 1) its
    `train/ms_per_step` / 1000, as a metrics.csv holds them (`loggers.read_metrics`); a step without a
    logged time (log_interval > 1) counts the median of the logged ones. After S steps the seconds are the
    sum of steps 0..S-1, linear between whole steps. Evaluations and checkpoint saves are not in these
    times (train.py excludes them from the step timer).
    """
    times: dict[int, float] = {}
    for s, compile_s, ms in zip(columns["step"], columns.get("train/compile_seconds", [None] * len(columns["step"])),
                                columns.get("train/ms_per_step", [None] * len(columns["step"])), strict=True):
        if compile_s is not None:
            times[int(s)] = compile_s
        elif ms is not None:
            times[int(s)] = ms / 1e3
    n = int(math.ceil(max(at_steps, default=0)))
    fill = float(np.median([t for s, t in times.items() if s > 0])) if len(times) > 1 else 0.0
    per_step = np.array([times.get(s, fill) for s in range(n)], dtype=np.float64)
    done = np.concatenate([[0.0], np.cumsum(per_step)])  # done[S]: seconds after S steps
    return [float(np.interp(s, np.arange(n + 1), done)) for s in at_steps]


def run_figures(name: str, out_dir: str | os.PathLike, target: float | None = None) -> dict[str, Any]:
    """One finished run's figures from its metrics.csv and summary.json (see the module docstring);
    target None: its own final val loss (the AdamW run's). Raises DataError if metrics.csv is missing."""
    columns = loggers.read_metrics(Path(out_dir) / loggers.CSV_NAME)
    summary = json.loads((Path(out_dir) / "summary.json").read_text())
    curve = [(s, v) for s, v in zip(columns["step"], columns.get("val/loss", []), strict=False) if v is not None]
    steps = [s for s, _ in curve]
    val = [v for _, v in curve]
    final = val[-1] if val else None
    target = final if target is None else target
    reached = steps_to_loss(steps, val, target) if target is not None else None
    last_step = max(columns["step"])
    seconds = train_seconds(columns, [*steps, last_step] + ([reached] if reached is not None else []))
    return {"name": name, "out_dir": str(out_dir), "final_step": int(last_step), "final_val_loss": final,
            "best_val_loss": min(val) if val else None, "steps_to_target": reached,
            "train_seconds_to_target": seconds[-1] if reached is not None else None,
            "train_seconds": seconds[len(steps)], "wall_seconds": summary.get("wall_seconds"),
            "ms_per_step": summary.get("ms_per_step"), "curve": {"step": steps, "val_loss": val,
                                                                 "train_seconds": seconds[:len(steps)]}}


# ---- runs ------------------------------------------------------------------------------------


def run_name(muon_lr: float | None) -> str:
    """A run's folder under out_dir: adamw, or muon_lr<value> (muon_lr0.02)."""
    return "adamw" if muon_lr is None else f"muon_lr{muon_lr:g}"


def run_config(config: ConfigDict, out_dir: str | os.PathLike, muon_lr: float | None,
               eval_interval: int) -> ConfigDict:
    """A copy of `config` for one run: adamw (muon_lr None) or muon at `muon_lr`, into out_dir, evaluated
    every `eval_interval` steps, every step logged. Raises ConfigError for an impossible value."""
    c = config.copy_and_resolve_references()
    c.out_dir = str(out_dir)
    c.train.eval_interval = eval_interval
    c.train.log_interval = 1
    c.optim.name = "adamw" if muon_lr is None else "muon"
    if muon_lr is not None:
        c.optim.muon_lr = float(muon_lr)
    validate(c)
    return c


def run(config: ConfigDict, muon_lrs: Sequence[float], out_dir: str | os.PathLike = "bench/optimizers",
        eval_interval: int = DEFAULT_EVAL_INTERVAL) -> dict[str, Any]:
    """Train AdamW and Muon at each of `muon_lrs` (see the module docstring), write the report files
    into `out_dir`, print the table; returns the report.

    Raises UserError (one line) before anything trains for no learning rates, a bad eval_interval, a
    config value a run cannot take, or a run folder under out_dir that exists already.
    """
    if not muon_lrs:
        raise UserError("--muon_lrs: give at least one Muon learning rate, e.g. --muon_lrs 0.01,0.02,0.04")
    if eval_interval < 1:
        raise UserError(f"--eval_interval={eval_interval}: must be >= 1 (steps between evaluations)")
    out = Path(out_dir)
    plan = [(lr, out / run_name(lr)) for lr in [None, *muon_lrs]]
    taken = [str(folder) for _, folder in plan if folder.exists()]
    if taken:
        raise UserError(f"{', '.join(taken)} exist already; choose a new --out_dir (every run trains from scratch)")
    configs = [run_config(config, folder, lr, eval_interval) for lr, folder in plan]  # all checked first
    runs, target = [], None
    for i, ((lr, folder), c) in enumerate(zip(plan, configs, strict=True)):
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        logging.info("optimizers: run %d/%d, %s into %s", i + 1, len(plan), run_name(lr), folder)
        train_lib.train(c)
        figures = run_figures(run_name(lr), folder, target)
        target = figures["final_val_loss"] if target is None else target
        runs.append({**figures, "optimizer": c.optim.name, "muon_lr": lr, "load_avg_1m_before": load})
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    result = {"schema": SCHEMA, "time": now, "target_val_loss": target, "eval_interval": eval_interval,
              "max_iters": config.train.max_iters, "env": report.environment(), "config": config.to_dict(),
              "runs": runs}
    paths = write(result, out)
    sys.stdout.write(markdown(result) + "\nwrote " + ", ".join(str(p) for p in paths) + "\n")
    sys.stdout.flush()
    return result


# ---- report ----------------------------------------------------------------------------------


def markdown(result: dict) -> str:
    """The table (one line per run) under a line naming the target, then the machine."""
    env = result["env"]
    lines = [f"target: AdamW's final val loss {result['target_val_loss']:.4f} (step {result['max_iters']}); "
             f"evaluations every {result['eval_interval']} steps", ""]
    lines += report.markdown_table(COLUMNS, result["runs"], unknown=_NOT_REACHED)
    lines += ["", f"{env['device_count']} x {env['device_kind']} ({env['backend']}), {env['cpu']} ({env['cpu_count']} "
              f"CPUs); jax {env['jax']}, optax {env['optax']}; {result['time']}"]
    return "\n".join(lines) + "\n"


def chart(result: dict, path: str | os.PathLike) -> Path:
    """Val loss against step (left) and against train seconds (right), one line per run, the target dashed."""
    from matplotlib.figure import Figure  # no pyplot: renders with Agg, needs no display

    fig = Figure(figsize=(10, 4), layout="constrained")
    by_step, by_time = fig.subplots(1, 2, sharey=True)
    target = result["target_val_loss"]
    for i, r in enumerate(result["runs"]):
        label = "AdamW" if r["muon_lr"] is None else f"Muon, muon_lr {r['muon_lr']:g}"
        style = {"color": f"C{i}", "lw": 1.2, "marker": ".", "ms": 3, "label": label}
        by_step.plot(r["curve"]["step"], r["curve"]["val_loss"], **style)
        by_time.plot(r["curve"]["train_seconds"], r["curve"]["val_loss"], **style)
    losses = [v for r in result["runs"] for v in r["curve"]["val_loss"]]
    for ax, xlabel in ((by_step, "step"), (by_time, "train seconds (compilation + steps; no evaluations)")):
        ax.axhline(target, color="k", ls="--", lw=0.8)
        ax.set(xlabel=xlabel)
        ax.grid(alpha=0.3)
    by_step.set(ylabel="val loss (nats)", ylim=(min(losses) - 0.05, min(max(losses), target + 0.9)))
    by_step.legend(title=f"target {target:.3f} (dashed)", fontsize="small")
    fig.suptitle(f"AdamW vs Muon: val loss, evaluations every {result['eval_interval']} steps")
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=90)
    storage.write_atomic(path, image.getvalue())
    return Path(path)


def write(result: dict, out_dir: str | os.PathLike) -> list[Path]:
    """<out_dir>/optimizers.json, .md and .png; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    storage.write_atomic(out / f"{NAME}.json", json.dumps(report.jsonable(result), indent=1) + "\n")
    storage.write_atomic(out / f"{NAME}.md", markdown(result))
    return [out / f"{NAME}.json", out / f"{NAME}.md", chart(result, out / f"{NAME}.png")]


def _main() -> None:
    from absl import flags

    from nanogpt_jax import cli

    flags.DEFINE_list("muon_lrs", ["0.01", "0.02", "0.04"], "Muon peak learning rates (optim.muon_lr), one run each.")
    flags.DEFINE_string("out_dir", "bench/optimizers", "Folder of the runs (one subfolder each) and the report.")
    flags.DEFINE_integer("eval_interval", DEFAULT_EVAL_INTERVAL, "Steps between evaluations, in every run.")

    def main(config: ConfigDict) -> None:
        F = flags.FLAGS
        try:
            lrs = [float(v) for v in F.muon_lrs]
        except ValueError:
            raise UserError(f"--muon_lrs={','.join(F.muon_lrs)}: give numbers, e.g. 0.01,0.02,0.04") from None
        run(config, lrs, F.out_dir, F.eval_interval)

    cli.main(main)


if __name__ == "__main__":
    # absl flags are process-global: defined only when this module is the script (as bench/eval.py's)
    _main()
