"""The training run behind `python run_train.py --config configs/<name>.py`.

One loop, the same on a laptop CPU and on a TPU pod: build the mesh, the model and the state
(scratch, resume or GPT-2 weights), then step; every eval_interval estimate the train and val loss
on fixed batches and checkpoint; log every log_interval. Metrics are read back one step late so
the host never waits on the device. SIGTERM/SIGINT finish the current step, save and exit 0.

Exact resume: a checkpoint at step s holds the state after s optimizer steps; batches and dropout
keys are pure functions of (seed, step), so a resumed run repeats what the interrupted one did.
"""

from __future__ import annotations

import json
import math
import os
import signal
import statistics
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from ml_collections import ConfigDict

from nanogpt_jax import config as config_lib
from nanogpt_jax import data, distributed, evaluate, loggers, memory, metrics, run_folder, sharding, storage
from nanogpt_jax.batches import TrainBatches, eval_batches
from nanogpt_jax.checkpoint import Checkpointer, checkpoint_dir
from nanogpt_jax.errors import CheckpointError, UserError, out_of_memory_is_a_user_error
from nanogpt_jax.model import GPT, GPTConfig, implementations
from nanogpt_jax.optim import OptimConfig, make_optimizer
from nanogpt_jax.runlock import RunLock, check_free
from nanogpt_jax.step import (
    TrainState,
    abstract_state,
    init_state,
    make_eval_step,
    make_train_step,
    param_axes,
    param_shardings,
)

# ---- where the weights come from -----------------------------------------------------------


def _runtime_overrides(config: ConfigDict) -> dict[str, Any]:
    """The model options a run may change on a checkpoint's architecture: compute, not shape."""
    m = config.model
    return {"dropout": m.dropout, "dtype": config_lib.resolve_dtype(m.dtype), "remat": m.remat,
            "attention": m.attention, "loss": m.loss, "loss_chunk": m.loss_chunk}


def build_state(config: ConfigDict, mesh: jax.sharding.Mesh, ckpt: Checkpointer,
                meta: dict) -> tuple[GPT, TrainState, dict]:
    """The model and its TrainState from config.init_from, placed on `mesh`; plus the record of the
    checkpoint resumed from ({} otherwise)."""
    init = config.init_from
    optim_config = OptimConfig.from_section(config.optim)
    if init == "resume":
        step = ckpt.latest_step()
        if step is None:
            raise CheckpointError(f"init_from=resume: no checkpoint in {ckpt.directory}; train first or set "
                                  "--config.init_from=scratch")
        record = ckpt.record(step)
        # the optimizer state is the saved optimizer's: another's cannot continue it (no optim.name in the
        # record: a checkpoint from before there was a choice, so AdamW's)
        saved_optim = record.get("config", {}).get("optim", {}).get("name", "adamw")
        if saved_optim != optim_config.name:
            raise CheckpointError(f"init_from=resume: checkpoint step {step} in {ckpt.directory} was trained with "
                                  f"optim.name={saved_optim}, not {optim_config.name}; resume with "
                                  f"--config.optim.name={saved_optim}, or start a new run in another out_dir")
        shape = dict(record["model"])
        differs = [f"model.{k}={config.model[k]} (checkpoint: {shape[k]})" for k in ("n_layer", "n_head", "n_embd",
                   "block_size", "bias") if k in shape and config.model[k] != shape[k]]
        if differs:  # the weights fix the shape; say so rather than ignore the setting silently
            logging.warning("init_from=resume keeps the checkpoint's model shape; ignored: %s", ", ".join(differs))
        model = GPT(GPTConfig(**{**shape, **_runtime_overrides(config)}))
        optimizer = make_optimizer(optim_config, param_axes(model))
        state, record = ckpt.restore(abstract_state(model, optimizer, mesh), step)
        logging.info("resumed from %s at step %d", ckpt.directory, step)
        return model, state, record
    if init == "scratch":
        vocab = config.model.vocab_size or data.model_vocab_size(meta)
        model = GPT(config_lib.gpt_config(config, vocab_size=vocab))
        optimizer = make_optimizer(optim_config, param_axes(model))
        return model, init_state(model, optimizer, mesh, jax.random.key(config.seed)), {}
    from nanogpt_jax import convert  # GPT-2 weights by name or from an HF folder

    gpt_cfg = convert.pretrained_config(init, **_runtime_overrides(config), block_size=config.model.block_size,
                                        scan_layers=config.model.scan_layers)
    model = GPT(gpt_cfg)
    model, params = convert.load_pretrained(init, shardings=param_shardings(model, mesh), **asdict(gpt_cfg))
    optimizer = make_optimizer(optim_config, param_axes(model))
    return model, init_state(model, optimizer, mesh, jax.random.key(config.seed), params=params), {}


# ---- the loop -------------------------------------------------------------------------------


class _StopFlag:
    """Set by SIGTERM/SIGINT; the loop saves and exits cleanly at the next step boundary.

    With several processes all must stop at the same step (the save is collective), so SIGTERM is
    left to JAX's preemption service, which relays it to every process and names a common step
    (`distributed.preemption_sync_point`); a Ctrl-C is turned into a SIGTERM to go the same way.
    """

    def __init__(self, multiprocess: bool = False):
        self.signal: int | None = None
        self.multiprocess = multiprocess
        self._forwarded = False
        self._previous = {}
        self._wakeup: tuple[int, int] | None = None  # (read, write) ends of the pipe CPython writes signals to
        self._previous_wakeup = -1

    def __enter__(self) -> _StopFlag:
        for sig in (signal.SIGINT,) if self.multiprocess else (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        # CPython runs a Python handler once for however many times a signal arrived while the main thread
        # was in C (an XLA step): two Ctrl-Cs 50 ms apart would read as one. Its C handler also writes one
        # byte per delivery to the wakeup fd, which lets `_handle` count them.
        read_fd, write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        os.set_blocking(write_fd, False)
        self._wakeup = (read_fd, write_fd)
        self._previous_wakeup = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        return self

    def _sigints_delivered(self) -> int:
        """How many SIGINTs the C handler has seen since the last call (at least 1 inside a SIGINT handler)."""
        if self._wakeup is None:
            return 1
        try:
            delivered = os.read(self._wakeup[0], 4096)
        except BlockingIOError:
            delivered = b""
        return max(1, delivered.count(bytes([signal.SIGINT])))

    def _handle(self, signum, frame) -> None:
        sigints = self._sigints_delivered() if signum == signal.SIGINT else 0
        if signum == signal.SIGINT and (self.signal is not None or self._forwarded or sigints > 1):
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        if self.multiprocess:  # only SIGINT comes here
            self._forwarded = True
            logging.warning("received SIGINT: passing it on as SIGTERM, so that every process stops at one step")
            os.kill(os.getpid(), signal.SIGTERM)
            return
        self.signal = signum
        logging.warning("received %s: finishing this step, saving a checkpoint, then exiting",
                        signal.Signals(signum).name)

    def requested(self, step: int) -> bool:
        """Whether to stop before running `step`; call it once per step on every process."""
        if self.multiprocess and self.signal is None and distributed.preemption_sync_point(step):
            self.signal = signal.SIGTERM
            logging.warning("preemption notice: every process saves step %d, then exits", step)
        return self.signal is not None

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if self._wakeup is not None:
            signal.set_wakeup_fd(self._previous_wakeup)
            for fd in self._wakeup:
                os.close(fd)
            self._wakeup = None

    def __bool__(self) -> bool:
        return self.signal is not None


def _global_eval_batches(tokens: np.ndarray, *, batch_size: int, block_size: int, n_batches: int, seed: int,
                         mesh: jax.sharding.Mesh) -> list[tuple]:
    """The fixed eval batches of a split as global (B, T) arrays (every process holds them whole)."""
    shard = sharding.batch_sharding(mesh, 2)
    out = []
    for x, y in eval_batches(tokens, batch_size=batch_size, block_size=block_size, n_batches=n_batches, seed=seed):
        out.append(tuple(jax.make_array_from_callback(a.shape, shard, lambda idx, a=a: a[idx]) for a in (x, y)))
    return out


def estimate_loss(eval_fn, params, batches: dict[str, list]) -> dict[str, float]:
    """Mean loss over each split's fixed batches: {split: nats per token}."""
    out = {}
    for split, split_batches in batches.items():
        sums = [eval_fn(params, x, y) for x, y in split_batches]
        total, count = (sum(float(v) for v in col) for col in zip(*sums, strict=True))
        out[split] = total / count
    return out


def train(config: ConfigDict) -> dict:
    """Run training as the config says; returns the summary also written to out_dir/summary.json.

    The run folder is never damaged: every check that can refuse the run happens before anything
    is written, and nothing is written to out_dir until the first training step has run (so a
    shape that does not fit in memory leaves no trace). A resume with nothing left to train
    (latest checkpoint at or past max_iters) writes nothing and returns the run's summary.json.

    Raises UserError (one line) for bad input: config, data, checkpoints, out_dir, a shape that
    does not fit in device memory, a checkpoint save that failed.
    """
    distributed.initialize(config)  # before anything touches a device
    if jax.process_index() == 0 and not config.train.eval_only:  # (one process tries it: two at once would clash)
        check_free(config.out_dir)  # a live run in this folder: refused now, not after this run's compile
    try:
        resume_step = run_folder.check(config.out_dir, config.init_from, config.train.max_iters,
                                       config.train.eval_only)
    except run_folder.NothingToTrain as done:
        return _nothing_to_train(done)
    with out_of_memory_is_a_user_error(memory.advice(config)):
        run = _Run(config, resume_step)
    try:
        with out_of_memory_is_a_user_error(memory.advice(config)):
            distributed.report_status_with(run.status)  # what a lost process's line says about the run
            try:
                run.loop()
            except UserError as e:
                if jax.process_count() > 1:  # before close(): its wait could block on a process that will not come
                    distributed.fail_everywhere(str(e))
                raise
            finally:
                run.close()  # waits for pending saves; raises if one failed
                distributed.report_status_with(None)
        return run.write_summary()
    finally:
        run.release_folder()  # after the summary: until then the run is still writing


def _nothing_to_train(done: run_folder.NothingToTrain) -> dict:
    summary_path = done.out_dir / "summary.json"
    logging.info("%s; its figures: %s, loss curve: %s; to train on, raise --config.train.max_iters", done,
                 summary_path, done.out_dir / "loss.png")
    try:
        return json.loads(summary_path.read_text())
    except (OSError, ValueError):
        return {"iterations": done.step}


class _Run:
    """One training run's pieces, built from the config; `loop` runs it.

    Nothing is written until `open_outputs`, which the loop calls once the first step has run:
    until then the logged rows wait in `pending_rows` and the checkpointer is read-only.
    """

    def __init__(self, config: ConfigDict, resume_step: int | None):
        self.t_start = time.time()
        self.config = c = config
        # every check of the input before anything is written to out_dir
        self.mesh = mesh = sharding.make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.tensor)
        B, A = c.train.batch_size, c.train.gradient_accumulation_steps
        sharding.check_batch_size(B, sharding.batch_divisor(mesh))
        meta = data.load_meta(c.data.data_dir)  # a gs:// folder's meta.json is read in the bucket
        data.check_init_vocabulary(c.init_from, c.data.data_dir, meta)
        memory.check_fits(c, mesh)  # a shape too big is one line now, not a kernel OOM kill minutes later
        memory.keep_cpu_buffers_mapped(mesh.devices.flat[0].platform)  # CPU: no page faults per step
        run_folder.check_writable(c.out_dir)
        self.out_dir = storage.path(c.out_dir)
        self.resume_step = resume_step
        # read-only until the first step has run: restoring must not create or change anything
        self.ckpt = Checkpointer(checkpoint_dir(self.out_dir), read_only=True)
        try:
            self.model, self.state, resumed = build_state(c, mesh, self.ckpt, meta)
            gcfg = self.model.config
            T = gcfg.block_size
            dataset = data.Dataset(c.data.data_dir, block_size=T, model_vocab_size=gcfg.vocab_size,
                                   cache_dir=c.data.cache_dir)
            # run_eval.py's tasks at every evaluation, prepared (and checked) now rather than at the first eval
            self.eval_tasks = evaluate.Evaluator(c.eval, self.model, mesh, dataset.tokenizer, c.train.eval_tasks,
                                                 data_dir=c.data.data_dir, cache_dir=c.data.cache_dir) \
                if c.train.eval_tasks else None
        except BaseException:
            self.ckpt.close()
            raise
        self.tokens_per_step = A * B * T
        logging.info("model: %s, %s parameters; mesh %s", gcfg, metrics.format_params(self.model.num_params()),
                     dict(mesh.shape))
        logging.info("tokens per step: %d micro-steps x %d sequences x %d tokens = %s", A, B, T,
                     f"{self.tokens_per_step:,}")
        self.implementations = implementations(gcfg, mesh.devices.flat[0].platform, B // sharding.batch_divisor(mesh))
        logging.info("attention: %s; loss: %s", self.implementations["attention"], self.implementations["loss"])

        self.train_fn = make_train_step(self.model, OptimConfig.from_section(c.optim), mesh, self.state, grad_accum=A,
                                        seed=c.seed)
        self.eval_fn = make_eval_step(self.model, mesh, self.state.params)
        self.batches = TrainBatches(dataset.split("train"), batch_size=B, block_size=T, grad_accum=A,
                                    seed=c.seed, sharding=sharding.batch_sharding(mesh, 3))
        self.eval_batches = {s: _global_eval_batches(dataset.split(s), batch_size=B, block_size=T,
                                                     n_batches=c.train.eval_iters, seed=c.seed, mesh=mesh)
                             for s in ("train", "val")}
        self.start = int(self.state.step)
        best = resumed.get("best_val_loss")
        self.best_val = math.inf if best is None else best
        self.flops_per_token = gcfg.flops_per_token(T)
        self.peak = metrics.peak_flops(jax.devices()[0], gcfg.dtype, c.bench.peak_tflops)
        # a CPU's peak is a cached probe, which a busy machine makes too low: probed again at most once
        self.peak_remeasurable = jax.devices()[0].platform == "cpu" and c.bench.peak_tflops is None
        self.logger: loggers.MetricLogger | None = None  # opened by open_outputs
        self.lock: RunLock | None = None  # process 0 holds out_dir from open_outputs on
        self.pending_rows: list[tuple[int, dict]] = []
        self.record = {"config": json.loads(c.to_json()), "model": asdict(gcfg),
                       "data_dir": _absolute(c.data.data_dir), "tokenizer": dataset.meta.get("tokenizer")}
        self.step = self.start
        self.stopped_by: int | None = None
        self.step_times: list[float] = []
        self.last: dict[str, float] = {}
        self.t_last = time.perf_counter()

    def open_outputs(self) -> None:
        """Create out_dir, its checkpointer and its logs: the run has shown it can step.
        With train.eval_only only the console is opened: an evaluation writes no run folder."""
        c = self.config
        if c.train.eval_only:
            self.logger = loggers.MetricLogger(self.out_dir, tensorboard=False, csv=False, console=True)
        else:
            self._open_files()
        for step, row in self.pending_rows:
            self.logger.log(step, row)
        self.pending_rows.clear()

    def _open_files(self) -> None:
        c = self.config
        if jax.process_index() == 0:
            run_folder.prepare(self.out_dir)
            self.lock = RunLock(self.out_dir)
            self.lock.acquire()  # a second run into this folder stops here, before writing anything
        # On every process, since listing checkpoints is collective in orbax (process 0 alone hung a
        # 2-process resume); a refused lock ends the others through distributed.fail_everywhere.
        self._check_folder_unchanged()
        if jax.process_count() > 1:
            # Every process has looked before process 0 creates checkpoints/: one that looked after would see
            # the folder and list it through orbax (a collective) while process 0, which saw none, waited in
            # the next one (the checkpointer's write check): a deadlock.
            multihost_utils.sync_global_devices("nanogpt_jax: out_dir checked")
        self.ckpt.close()
        self.ckpt = Checkpointer(checkpoint_dir(self.out_dir), keep=c.train.keep_checkpoints)
        self.logger = loggers.MetricLogger(self.out_dir, tensorboard=c.log.tensorboard, csv=c.log.csv,
                                           wandb_project=c.log.wandb_project, config=c.to_dict(),
                                           resume_step=self.resume_step, total_steps=c.train.max_iters)

    def _check_folder_unchanged(self) -> None:
        """Under the lock: the folder is still as `run_folder.check` found it at the start (another run may
        have trained in it, and ended, while this one compiled)."""
        try:
            now = run_folder.check(self.config.out_dir, self.config.init_from, self.config.train.max_iters,
                                   self.config.train.eval_only)
        except run_folder.NothingToTrain as e:
            now = e.step
        if now != self.resume_step:
            raise UserError(
                f"another run wrote to out_dir {str(self.out_dir)!r} while this one started (its latest checkpoint "
                f"is now step {now}, it was {self.resume_step}); start again (--config.init_from=resume continues "
                "from its latest checkpoint)")

    def release_folder(self) -> None:
        """Let another run use out_dir (the lock also dies with the process)."""
        if self.lock is not None:
            self.lock.release()

    def log(self, step: int, row: dict) -> None:
        if self.logger is None:
            self.pending_rows.append((step, row))
        else:
            self.logger.log(step, row)

    def close(self) -> None:
        """Wait for pending saves (raising if one failed), then close the logs."""
        try:
            self.ckpt.close()
        finally:
            if self.logger is not None:
                self.logger.close()

    def save(self, val_loss: float | None) -> None:
        """Checkpoint the current state (asynchronously). Not at the run's first step: that state is
        the checkpoint resumed from, or the seed's / the pretrained weights, which need no copy."""
        if self.step == self.start:
            return
        best = None if math.isinf(self.best_val) else self.best_val
        self.ckpt.save(self.step, self.state, record={**self.record, "best_val_loss": best}, val_loss=val_loss)
        if self.logger is not None:  # a gs:// out_dir: the bucket's logs cover every step before this checkpoint
            self.logger.sync()

    def evaluate(self) -> None:
        """Loss on the fixed train and val batches; checkpoint on a new best (or always, if configured)."""
        losses = estimate_loss(self.eval_fn, self.state.params, self.eval_batches)
        row = {"train/eval_loss": losses["train"], "val/loss": losses["val"]}
        if self.eval_tasks is not None:  # logged under the names run_eval.py reports (eval/<task>/<metric>)
            row.update(self.eval_tasks.metrics(self.state.params))
        self.log(self.step, row)
        self.last.update(val_loss=losses["val"], train_eval_loss=losses["train"])
        improved = losses["val"] < self.best_val
        if improved:
            self.best_val = losses["val"]
        if improved or self.config.train.always_save_checkpoint:
            self.save(losses["val"])
        self.t_last = time.perf_counter()  # evaluation time is not step time

    def read_back(self, item: tuple[int, dict] | None) -> None:
        """Fetch one step's metrics (a step late, so the device is already busy with the next),
        log them, and stop on persistent non-finite steps."""
        if item is None:
            return
        step, m = item
        m = {k: float(v) for k, v in jax.device_get(m).items()}
        now = time.perf_counter()
        dt, self.t_last = now - self.t_last, now
        if step > self.start:  # the first step includes compilation
            self.step_times.append(dt)
        self.last["loss"] = m["loss"]
        t = self.config.train
        if m["skipped"] >= t.max_skipped:
            raise UserError(f"training stopped: {int(m['skipped'])} steps in a row up to step {step} had a "
                            f"non-finite loss or gradient norm (train.max_skipped={t.max_skipped}); no update was "
                            f"applied, the last checkpoint ({_latest(self.ckpt)}) is untouched; lower "
                            "optim.learning_rate or check the data")
        if step % t.log_interval == 0:
            row = {"train/loss": m["loss"], "train/lr": m["lr"], "train/grad_norm": m["grad_norm"],
                   "train/skipped": m["n_skipped"]}
            if step == self.start:  # compilation, not a step time: no speed, MFU or eta from it
                row["train/compile_seconds"] = dt
            else:
                tok_s = self.tokens_per_step / dt
                mfu = metrics.mfu(self.flops_per_token, tok_s, self.mesh.size, self.peak)
                if mfu is not None and mfu > 1 and self.peak_remeasurable:
                    self.peak_remeasurable = False
                    self.peak = metrics.remeasure_cpu_peak(self.model.config.dtype).flops
                    mfu = metrics.mfu(self.flops_per_token, tok_s, self.mesh.size, self.peak)
                    self.t_last = time.perf_counter()  # the probe's second is not the next step's time
                row.update({"train/ms_per_step": dt * 1e3, "train/tokens_per_sec": tok_s, "train/mfu": mfu})
            self.log(step, row)  # and a console line (None values are left out)
        self.ckpt.check()  # a background save that failed ends the run now, not at the next save

    def loop(self) -> None:
        max_iters, eval_interval = self.config.train.max_iters, self.config.train.eval_interval
        pending = None
        with _StopFlag(jax.process_count() > 1) as stop, self.batches.prefetch(self.start, max_iters) as prefetch:
            while True:
                if self.step % eval_interval == 0 or self.step == max_iters:
                    self.read_back(pending)
                    pending = None
                    self.evaluate()
                if self.step >= max_iters or self.config.train.eval_only or stop.requested(self.step):
                    break
                _, x, y = next(prefetch)
                self.state, step_metrics = self.train_fn(self.state, x, y)  # dispatched, not finished
                if self.logger is None:  # the first step: it compiled and ran, so the run can write now
                    jax.block_until_ready(step_metrics)
                    self.open_outputs()
                self.read_back(pending)
                pending = (self.step, step_metrics)
                self.step += 1
            self.read_back(pending)
            if stop and self.step > self.start:
                self.stopped_by = stop.signal
                self.save(None)
                logging.info("saved step %d after %s; resume with --config.init_from=resume", self.step,
                             signal.Signals(stop.signal).name)
            elif stop:
                self.stopped_by = stop.signal
                logging.info("stopped by %s before the first step; nothing was written",
                             signal.Signals(stop.signal).name)
            elif self.logger is None:  # no step to run (max_iters = the start step): the evaluation is the run
                self.open_outputs()

    def status(self) -> str:
        """Where the run is, for a line about a lost process: the step and the last committed checkpoint."""
        ckpt_dir = checkpoint_dir(storage.path(self.config.out_dir))
        # read from the folder: this process's own list may hold a save that never finished. Locally a step
        # folder gets its name when it is committed; on a bucket orbax must look for its commit marker.
        if storage.is_url(self.config.out_dir):
            steps = run_folder.saved_steps(ckpt_dir)
        else:
            steps = sorted(int(p.name) for p in Path(ckpt_dir).iterdir() if p.name.isdigit())
        last = f"step {steps[-1]}" if steps else "none yet"
        return (f"process {jax.process_index()} reached step {self.step}; the last committed checkpoint: {last} "
                f"in {ckpt_dir}")

    def write_summary(self) -> dict:
        """out_dir/summary.json: the run's figures in one place (process 0 writes it)."""
        ms = statistics.median(self.step_times) * 1e3 if self.step_times else None
        summary = {
            "iterations": self.step, "stopped_by_signal": self.stopped_by is not None,
            "train_loss": self.last.get("loss"), "train_eval_loss": self.last.get("train_eval_loss"),
            "val_loss": self.last.get("val_loss"),
            "best_val_loss": None if math.isinf(self.best_val) else self.best_val,
            "ms_per_step": ms, "tokens_per_step": self.tokens_per_step,
            "tokens_per_sec": self.tokens_per_step / (ms / 1e3) if ms else None,
            "mfu": None, "flops_formula": metrics.FLOPS_FORMULA,
            "wall_seconds": time.time() - self.t_start, "devices": self.mesh.size,
            "device_kind": jax.devices()[0].device_kind, "peak_device_memory_bytes": _peak_memory(),
            "compilations": self.train_fn.jitted._cache_size(), **self.implementations,
        }
        if ms:
            summary["mfu"] = metrics.mfu(self.flops_per_token, summary["tokens_per_sec"], self.mesh.size, self.peak)
        # nothing was written (stopped before the first step) or nothing may be (an eval_only run)
        if jax.process_index() == 0 and self.logger is not None and not self.config.train.eval_only:
            storage.write_atomic(self.out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
            if self.config.log.csv and self.last.get("val_loss") is not None:
                loggers.plot_loss(self.out_dir / "metrics.csv", self.out_dir / "loss.png")
        return summary


def _absolute(p: str) -> str:
    """A local path made absolute (the record must find it from any working folder); a URL as it is."""
    return str(p).rstrip("/") if storage.is_url(p) else str(Path(p).resolve())


def _latest(ckpt: Checkpointer) -> str:
    step = ckpt.latest_step()
    return "no checkpoint yet" if step is None else f"step {step}"


def _peak_memory() -> int | None:
    """Peak bytes in use on this process's first device (another process's cannot be asked)."""
    return metrics.peak_bytes_in_use(jax.local_devices()[0])
