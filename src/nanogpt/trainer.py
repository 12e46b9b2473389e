"""The training loop as a short class. It knows nothing of Hydra or argv: it takes a TrainJob.

out_dir holds ckpt.pt (latest, for resume: written at every evaluation and on preemption),
best.pt (lowest val loss so far) and summary.json (written at the end). Under
system.strategy=fsdp the checkpoints are sharded folders, ckpt.dcp/ and best.dcp/ (nanogpt.fsdp).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from nanogpt import distributed as D
from nanogpt import fsdp
from nanogpt.checkpoint import BEST, LATEST, load_checkpoint, model_from_payload, model_payload, save_checkpoint
from nanogpt.config import TrainJob, to_dict
from nanogpt.data.loader import TrainBatches, check_vocab, open_split, read_meta, val_batches
from nanogpt.errors import ConfigError, NanoGPTError
from nanogpt.loggers import NullLogger, build_loggers
from nanogpt.mfu import device_peak_flops, mfu
from nanogpt.model import GPT
from nanogpt.optim import build_optimizer, lr_at
from nanogpt.runtime import (
    StopSignal,
    autocast,
    compile_if_possible,
    resolve_dtype,
    rng_state,
    seed_everything,
    set_rng_state,
)

log = logging.getLogger(__name__)


class TrainingError(NanoGPTError):
    """The run cannot go on (e.g. the loss stays non-finite)."""


class Trainer:
    def __init__(self, job: TrainJob, info: D.DistInfo | None = None):
        self.job, self.info = job, info or D.setup(job.system.device)
        self.device = self.info.device
        self.dtype = resolve_dtype(job.system.dtype, self.device)
        self.out_dir = Path(job.out_dir)
        self.sharded = job.system.strategy == "fsdp"
        self.micro_steps = self._micro_steps()
        self.iter_num, self.best_val_loss, self.tokens_seen, self.bad_steps = 0, math.inf, 0, 0
        self.last_val_loss: float | None = None
        seed_everything(job.system.seed)  # identical initial weights on every rank
        payload = self._init_model()
        self.meta = read_meta(job.data.data_dir)
        check_vocab(self.meta, self.model.config.vocab_size)
        self._init_data()
        self.train_model = self._wrap(self.model)  # first: FSDP replaces the parameters with shards
        self.optimizer = build_optimizer(self.model, job.optim, self.device.type)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        torch.manual_seed(job.system.seed + self.info.rank)  # dropout differs per rank
        if payload is not None:
            self.load_state_dict(payload)
        self.tokens_per_step = job.data.batch_size * self.model.config.block_size * job.train.grad_accum_steps
        self.logger = NullLogger()

    # ---- set-up ---------------------------------------------------------------------------

    def _micro_steps(self) -> int:
        accum, world = self.job.train.grad_accum_steps, self.info.world_size
        if accum % world:
            raise ConfigError(f"train.grad_accum_steps={accum} is not divisible by the {world} ranks; "
                              f"use a multiple of {world}")
        return accum // world

    def _init_model(self) -> dict[str, Any] | None:
        """Build the model; returns the checkpoint payload when resuming."""
        init, cfg = self.job.init_from, self.job.model
        payload = None
        if init == "scratch":
            self.model = GPT(cfg)
        elif init == "resume" and self.sharded:  # its weights are loaded once it is sharded
            payload, self.model = fsdp.resume_model(self.out_dir, dropout=cfg.dropout)
        elif init == "resume":
            payload = load_checkpoint(self.out_dir, prefer=LATEST)
            self.model = model_from_payload(payload, dropout=cfg.dropout)
        else:
            from nanogpt.hf import load_pretrained

            self.model = load_pretrained(init, dropout=cfg.dropout, block_size=cfg.block_size)
        log.info("model: %s parameters (%s)", f"{self.model.num_params():,}", init)
        if not self.sharded:  # fully_shard moves only this rank's shards to the device
            self.model.to(self.device)
        return payload

    def _init_data(self) -> None:
        d, T = self.job.data, self.model.config.block_size
        self.train_batches = TrainBatches(
            open_split(d.data_dir, "train"), d.batch_size, T, sampler=d.sampler, seed=self.job.system.seed,
            rank=self.info.rank, world_size=self.info.world_size, device=self.device,
        )
        self.val_batches = val_batches(
            open_split(d.data_dir, "val"), d.batch_size, T, self.job.train.eval_iters,
            **self._eval_ranks(), device=self.device,
        )

    def _eval_ranks(self) -> dict[str, int]:
        """Each rank's share of evaluation; under FSDP forward passes are collectives: all ranks run all."""
        info = D.DistInfo() if self.sharded else self.info
        return {"rank": info.rank, "world_size": info.world_size}

    def _wrap(self, model: GPT) -> torch.nn.Module:
        """Activation checkpointing and FSDP (in place, nanogpt.fsdp) or DDP, then torch.compile."""
        wrapped: torch.nn.Module = model
        fsdp.prepare(model, self.job, self.info, self.dtype)
        if self.info.enabled and not self.sharded:
            ids = [self.device.index] if self.device.type == "cuda" else None
            wrapped = DDP(model, device_ids=ids)
        self.ddp = wrapped if isinstance(wrapped, DDP) else None
        return compile_if_possible(wrapped, self.device) if self.job.system.compile else wrapped

    # ---- state ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: weights, optimizer, scaler, RNG of every rank,
        sampler position, counters and the resolved config. Collective under DDP."""
        return model_payload(self.model, optimizer=self.optimizer.state_dict(), **self.run_state())

    def run_state(self) -> dict[str, Any]:
        """The state_dict without weights and optimizer (all an FSDP checkpoint adds to its shards)."""
        rngs: list[Any] = [None] * self.info.world_size
        if self.info.enabled:
            torch.distributed.all_gather_object(rngs, rng_state())
        else:
            rngs = [rng_state()]
        return dict(config=to_dict(self.job), scaler=self.scaler.state_dict(), rng=rngs,
                    sampler=self.train_batches.state_dict(), iter_num=self.iter_num,
                    best_val_loss=self.best_val_loss, tokens_seen=self.tokens_seen, data_meta=self.meta)

    def load_state_dict(self, payload: dict[str, Any]) -> None:
        if self.sharded:  # weights and optimizer from the shards, resharded to this world size
            fsdp.load_sharded(self.model, self.optimizer, payload)
        else:
            self.optimizer.load_state_dict(payload["optimizer"])
        if payload.get("scaler"):
            self.scaler.load_state_dict(payload["scaler"])
        self.train_batches.load_state_dict(payload["sampler"])
        self.iter_num, self.best_val_loss = payload["iter_num"], payload["best_val_loss"]
        self.tokens_seen = payload.get("tokens_seen", 0)
        rngs = payload.get("rng") or []
        if len(rngs) == self.info.world_size:
            set_rng_state(rngs[self.info.rank])
        else:
            log.warning("checkpoint has RNG state for %d ranks, running %d: resume is not bit-exact",
                        len(rngs), self.info.world_size)
        log.info("resumed from %s at iter %d (best val loss %.4f)",
                 payload.get("checkpoint_dir", self.out_dir / LATEST), self.iter_num, self.best_val_loss)

    def save(self, name: str) -> None:
        if self.sharded:  # every rank writes its shards
            fsdp.save_sharded(self.model, self.optimizer, self.run_state(), self.out_dir / name, self.info)
            return
        payload = self.state_dict()  # every rank takes part (RNG gather)
        if self.info.is_main:
            save_checkpoint(payload, self.out_dir / name)
        D.barrier(self.info)

    # ---- one step, one evaluation ---------------------------------------------------------

    def train_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step over `micro_steps` micro-batches; returns (mean loss, grad norm)."""
        lr = lr_at(self.iter_num, self.job.optim)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(self.micro_steps):
            x, y = self.train_batches.next()
            last = micro == self.micro_steps - 1
            # gradients are all-reduced only on the last micro-step: the others just accumulate
            sync = self.ddp.no_sync() if self.ddp is not None and not last else contextlib.nullcontext()
            with sync, autocast(self.device, self.dtype):
                _, loss = self.train_model(x, y)
            self.scaler.scale(loss / self.micro_steps).backward()
            loss_sum += loss.detach()
        self.scaler.unscale_(self.optimizer)
        clip = self.job.optim.grad_clip or math.inf
        grad_norm = fsdp.clip_grad_norm(self.model.parameters(), clip)  # global norm, also over shards
        self._apply_step(grad_norm)
        self.optimizer.zero_grad(set_to_none=True)
        self.iter_num += 1
        self.tokens_seen += self.tokens_per_step
        return loss_sum / self.micro_steps, grad_norm

    def _apply_step(self, grad_norm: torch.Tensor) -> None:
        """Step unless the gradient is non-finite (identical on all ranks after the all-reduce)."""
        finite = bool(torch.isfinite(grad_norm))
        if self.scaler.is_enabled():
            self.scaler.step(self.optimizer)  # skips the step itself on inf/NaN (fp16 overflow)
            self.scaler.update()
        elif finite:
            self.optimizer.step()
        if finite:
            self.bad_steps = 0
            return
        self.bad_steps += 1
        log.warning("non-finite loss or gradient at iter %d: step skipped (%d in a row)",
                    self.iter_num, self.bad_steps)
        if self.bad_steps >= self.job.train.max_bad_steps:
            raise TrainingError(
                f"loss/gradient non-finite for {self.bad_steps} steps in a row at iter {self.iter_num}; "
                f"the last good checkpoint is {self.out_dir / LATEST}. Lower optim.lr, set optim.grad_clip, "
                "or use system.dtype=bfloat16, then resume with init_from=resume"
            )

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over the fixed validation windows (the same ones every time)."""
        self.model.eval()
        total = torch.zeros(2, device=self.device)  # (loss sum, tokens)
        for x, y in self.val_batches:
            with autocast(self.device, self.dtype):
                _, loss = self.model(x, y)
            total += torch.stack([loss.float() * y.numel(), torch.tensor(float(y.numel()), device=self.device)])
        D.all_reduce_sum(total, self.info)
        self.model.train()
        return (total[0] / total[1]).item()

    def exact_val_loss(self) -> float:
        """Loss over every token of the val split (what `nanogpt-eval tasks=[loss]` reports)."""
        from nanogpt.evaluate import split_loss

        result = split_loss(self.model, open_split(self.job.data.data_dir, "val"),
                            batch_size=self.job.data.batch_size, device=self.device, dtype=self.dtype,
                            **self._eval_ranks())
        log.info("exact val loss over %s tokens: %.4f", f"{result['tokens']:,}", result["loss"])
        return result["loss"]

    def run_eval_tasks(self) -> None:
        """The nanogpt-eval tasks chosen by train.eval_tasks (e.g. hellaswag), sent to the loggers."""
        from nanogpt.data.tokenizer import tokenizer_from_meta
        from nanogpt.evaluate import run_tasks

        t = self.job.train
        metrics = run_tasks(self.model, tokenizer_from_meta(self.meta), list(t.eval_tasks),
                            data_dir=self.job.data.data_dir, hellaswag_limit=t.eval_hellaswag_limit,
                            batch_size=self.job.data.batch_size, device=self.device, dtype=self.dtype,
                            **self._eval_ranks())
        self.logger.log(self.iter_num, metrics)

    def _evaluate_and_checkpoint(self) -> None:
        val = self.evaluate()
        self.last_val_loss = val
        self.logger.log(self.iter_num, {"val/loss": val, "tokens": self.tokens_seen})
        if not math.isfinite(val):
            log.warning("val loss is %s at iter %d: no checkpoint written", val, self.iter_num)
            return
        improved = val < self.best_val_loss
        self.best_val_loss = min(self.best_val_loss, val)
        if self.job.train.eval_only:
            return
        self.save(LATEST)
        if improved:
            self.save(BEST)

    # ---- the loop -------------------------------------------------------------------------

    def train(self) -> dict[str, Any]:
        """Train to train.max_iters (or until SIGTERM/SIGINT); returns the summary."""
        t = self.job.train
        resumed_at = self.iter_num if self.job.init_from == "resume" else None
        if self.info.is_main:
            self.logger = build_loggers(self.job.logger, str(self.out_dir), to_dict(self.job),
                                        resume=resumed_at is not None, max_iters=t.max_iters)
        self.model.train()
        wall0, train_loss, intervals = time.time(), None, []
        with StopSignal() as stop:
            clock = _Clock(self.device, self.iter_num)
            while True:
                due = self.iter_num % t.eval_interval == 0 or self.iter_num >= t.max_iters
                if t.eval_only or (due and self.iter_num != resumed_at):  # resume: already evaluated
                    self._evaluate_and_checkpoint()
                    if t.eval_tasks and t.eval_tasks_interval and self.iter_num % t.eval_tasks_interval == 0:
                        self.run_eval_tasks()
                    clock.reset(self.iter_num)  # evaluation time is not training time
                if self.iter_num >= t.max_iters or t.eval_only:
                    break
                loss, grad_norm = self.train_step()
                if self.iter_num % t.log_interval == 0 or self.iter_num == t.max_iters:
                    train_loss = self._log_step(loss, grad_norm, clock, intervals)
                if self._should_stop(stop):
                    self.save(LATEST)
                    log.warning("stopped at iter %d by %s; continue with init_from=resume",
                                self.iter_num, stop.requested)
                    break
        exact = self.exact_val_loss() if t.final_eval and not stop.requested else None
        if t.eval_tasks and not t.eval_tasks_interval and not stop.requested:
            self.run_eval_tasks()
        summary = self._summary(train_loss, intervals, time.time() - wall0, exact)
        self.logger.log_summary(summary)
        self.logger.close()
        return summary

    def _should_stop(self, stop: StopSignal) -> bool:
        """All ranks stop together when any one of them was signalled."""
        if not self.info.enabled:
            return stop.requested is not None
        flag = torch.tensor([1.0 if stop.requested else 0.0], device=self.device)
        return bool(D.all_reduce_sum(flag, self.info).item() > 0)

    def _log_step(self, loss: torch.Tensor, grad_norm: torch.Tensor, clock: _Clock,
                  intervals: list[float]) -> float:
        loss = D.all_reduce_sum(loss.detach().clone(), self.info) / self.info.world_size
        ms = clock.ms_per_iter(self.iter_num)
        intervals.append(ms)
        tps = self.tokens_per_step / (ms / 1000)
        metrics = {"train/loss": loss.item(), "lr": lr_at(self.iter_num - 1, self.job.optim),
                   "grad_norm": grad_norm.item(), "tokens": self.tokens_seen, "tokens_per_sec": tps,
                   "mfu": self._mfu(tps), "iter_ms": ms}
        if self.scaler.is_enabled():
            metrics["loss_scale"] = self.scaler.get_scale()
        self.logger.log(self.iter_num, {k: v for k, v in metrics.items() if v is not None})
        return metrics["train/loss"]

    def _mfu(self, tokens_per_sec: float) -> float | None:
        dtype = str(self.dtype).removeprefix("torch.")
        peak = device_peak_flops(self.device, dtype)
        fpt = self.model.flops_per_token()
        return mfu(fpt, tokens_per_sec, peak * self.info.world_size if peak else None)

    def _summary(self, train_loss: float | None, intervals: list[float], wall: float,
                 val_loss_exact: float | None) -> dict[str, Any]:
        # the first interval holds warm-up (and compilation): leave it out when there are others
        steady = intervals[1:] if len(intervals) > 1 else intervals
        ms = statistics.median(steady) if steady else None
        tps = self.tokens_per_step / (ms / 1000) if ms else None
        summary = {
            "iterations": self.iter_num, "train_loss": train_loss, "val_loss": self.last_val_loss,
            "val_loss_exact": val_loss_exact,
            "best_val_loss": self.best_val_loss if math.isfinite(self.best_val_loss) else None,
            "ms_per_iter": ms, "tokens_per_sec": tps, "mfu": self._mfu(tps) if tps else None,
            "tokens_seen": self.tokens_seen, "wall_seconds": wall, "world_size": self.info.world_size,
            "device": str(self.device), "dtype": str(self.dtype).removeprefix("torch."),
        }
        peaks = fsdp.peak_memory_per_rank(self.info)  # GB: CUDA max allocated, else peak RSS
        summary.update(strategy="fsdp" if self.sharded else "ddp", peak_mem_gb=max(peaks), peak_mem_gb_per_rank=peaks)
        if self.info.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary


class _Clock:
    """Milliseconds per iteration between log points (synchronising the GPU before reading)."""

    def __init__(self, device: torch.device, it: int):
        self.device = device
        self.reset(it)

    def reset(self, it: int) -> None:
        self._sync()
        self.t, self.it = time.perf_counter(), it

    def ms_per_iter(self, it: int) -> float:
        self._sync()
        now = time.perf_counter()
        ms = (now - self.t) * 1000 / max(1, it - self.it)
        self.t, self.it = now, it
        return ms

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
