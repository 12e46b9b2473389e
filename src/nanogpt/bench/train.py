"""Timing the real training step (Trainer.train_step) and tracing a few of them with torch.profiler."""

from __future__ import annotations

import contextlib
import logging
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

from nanogpt.bench.env import environment, free_memory, peak_memory_mb, reset_peak_memory, timed
from nanogpt.bench.jobs import base_job, bench_folders, configure, model_settings, sweep
from nanogpt.bench.report import label, make_record
from nanogpt.config import BenchJob, TrainJob
from nanogpt.mfu import device_peak, mfu

log = logging.getLogger(__name__)


def _trainer(job: TrainJob) -> Any:
    """A fresh Trainer, with nothing of the previous configuration left in memory."""
    from nanogpt.trainer import Trainer  # heavy: imports the loggers and data modules

    if "torch._dynamo" in sys.modules:  # something was compiled before
        # an empty compile cache per configuration: honest compile times, the previous model's
        # graphs (and weights) released, and no sweep ever reaches dynamo's recompile limit
        # (past it, dynamo silently falls back to eager)
        torch._dynamo.reset()
    free_memory()
    return Trainer(job)


def _settings(bench: BenchJob, trainer: Any, job: TrainJob) -> dict[str, Any]:
    model = trainer.model
    return {
        "train_config": bench.train_config, **model_settings(model.config, model.num_params()),
        "batch_size": job.data.batch_size, "grad_accum_steps": job.train.grad_accum_steps,
        "tokens_per_step": trainer.tokens_per_step, "dtype": str(trainer.dtype).removeprefix("torch."),
        "compile": job.system.compile, "compile_cache": bench.compile_cache,
        "data": job.data.data_dir if bench.data_dir else "random", "warmup_steps": bench.warmup_steps,
        "steps": bench.steps,
    }


def _results(trainer: Any, first: float, steady: list[float], bench: BenchJob) -> dict[str, Any]:
    """ms/iter, tokens/s and MFU from the median steady step; the first step apart."""
    sec = statistics.median(steady)
    tps = trainer.tokens_per_step / sec
    dtype = str(trainer.dtype).removeprefix("torch.")
    peak = device_peak(trainer.device, dtype, bench.peak_flops)
    fpt = trainer.model.flops_per_token()
    return {
        "ms_per_iter": sec * 1000,
        "ms_per_iter_min": min(steady) * 1000, "ms_per_iter_max": max(steady) * 1000,
        "tokens_per_s": tps, "flops_per_token": fpt, "mfu": mfu(fpt, tps, peak.flops),
        "peak_flops": peak.flops, "peak_source": peak.source, "first_step_s": first,
        # the first call of a compiled model traces and compiles it: that call is the compile time
        "compile_s": first if trainer.job.system.compile else None,
    }


def train_record(bench: BenchJob, job: TrainJob) -> dict[str, Any]:
    """Build a Trainer for job, run warm-up then timed steps; one record."""
    trainer = _trainer(job)
    device = trainer.device
    memory_kind = reset_peak_memory(device)
    times = [timed(trainer.train_step, device) for _ in range(bench.warmup_steps + bench.steps)]
    results = _results(trainer, times[0], times[bench.warmup_steps:], bench)
    results.update(peak_memory_mb=peak_memory_mb(device), memory_kind=memory_kind)
    record = make_record("train", _settings(bench, trainer, job), results, environment(device))
    log.info("train %s: %.1f ms/iter, %.0f tokens/s", label(record), results["ms_per_iter"],
             results["tokens_per_s"])
    return record


def bench_train(bench: BenchJob) -> list[dict[str, Any]]:
    """One record per (batch size, dtype, compile) of the sweep."""
    base = base_job(bench)
    # inductor's on-disk caches would make a re-run's compile time look like seconds
    with bench_folders(bench, base.model) as (data, out), _compile_caches(bench.compile_cache):
        return [train_record(bench, configure(base, data, out, b, d, c)) for b, d, c in sweep(bench, base)]


def _compile_caches(enabled: bool) -> contextlib.AbstractContextManager:
    import torch.compiler.config

    return torch.compiler.config.patch(force_disable_caches=not enabled)


def _top_ops(prof: torch.profiler.profile, cuda: bool, n: int = 10) -> list[dict[str, Any]]:
    """The operators that took the most self time (device time on a GPU) over the traced steps."""
    def self_us(e: Any) -> float:
        return e.self_device_time_total if cuda else e.self_cpu_time_total

    events = sorted(prof.key_averages(), key=self_us, reverse=True)[:n]
    return [{"name": e.key, "calls": e.count, "self_ms": self_us(e) / 1000,
             "total_ms": (e.device_time_total if cuda else e.cpu_time_total) / 1000} for e in events]


def bench_profile(bench: BenchJob) -> list[dict[str, Any]]:
    """A torch.profiler trace (Chrome / TensorBoard format) of profile_steps train steps, after
    warm-up, for the first configuration of the sweep."""
    from torch.profiler import ProfilerActivity, profile, record_function, schedule, tensorboard_trace_handler

    base = base_job(bench)
    trace_dir = Path(bench.out) / f"{bench.name}-trace"
    with bench_folders(bench, base.model) as (data, out):
        trainer = _trainer(configure(base, data, out, *sweep(bench, base)[0]))
        for _ in range(bench.warmup_steps):
            trainer.train_step()
        cuda = trainer.device.type == "cuda"
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        steps = schedule(wait=0, warmup=1, active=bench.profile_steps, repeat=1)  # one warm-up step first
        handler = tensorboard_trace_handler(str(trace_dir), worker_name="nanogpt")
        with profile(activities=activities, schedule=steps, on_trace_ready=handler, acc_events=True) as prof:
            for _ in range(1 + bench.profile_steps):
                with record_function("train_step"):
                    trainer.train_step()
                prof.step()
        settings = _settings(bench, trainer, trainer.job)
        settings["steps"] = bench.profile_steps
        traces = sorted(str(p) for p in trace_dir.glob("*.json"))
        results = {"trace_dir": str(trace_dir), "traces": traces, "top_ops": _top_ops(prof, cuda)}
        record = make_record("profile", settings, results, environment(trainer.device))
    log.info("profile: trace written to %s (open in chrome://tracing, Perfetto or TensorBoard)", trace_dir)
    return [record]
