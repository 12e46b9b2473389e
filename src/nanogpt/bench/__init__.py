"""nanogpt-bench's library: honest speed, memory and MFU for training, generation and data loading.

    train     the real training step (Trainer.train_step): ms/iter, tokens/s, MFU, peak memory,
              compile time apart; sweeps over batch sizes, dtypes and compile
    generate  prefill and decode tokens/s, with and without the KV cache
    data      prepare tokens/s and loader batches/s (nanogpt.data.benchmark)
    profile   a torch.profiler trace of a few training steps

Each configuration gives one record (see report.py); `run` returns them.
"""

from __future__ import annotations

import datetime
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from nanogpt.bench.report import compare, compare_files, load_records, markdown, write_outputs
from nanogpt.config import BenchJob

log = logging.getLogger(__name__)


def default_name(mode: str, out: str | Path = "bench") -> str:
    """<mode>-<date>-<time>, with a suffix when that file exists (runs within one second)."""
    name = stem = f"{mode}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    n = 1
    while (Path(out) / f"{name}.json").exists():
        n += 1
        name = f"{stem}-{n}"
    return name


def run(job: BenchJob) -> list[dict[str, Any]]:
    """Run the job's mode over its sweep; one record per configuration."""
    from nanogpt.bench.data import bench_data
    from nanogpt.bench.generate import bench_generate
    from nanogpt.bench.train import bench_profile, bench_train

    if job.threads:
        torch.set_num_threads(job.threads)
    job = replace(job, name=job.name or default_name(job.mode, job.out))
    modes = {"train": bench_train, "generate": bench_generate, "data": bench_data, "profile": bench_profile}
    return modes[job.mode](job)


__all__ = ["compare", "compare_files", "default_name", "load_records", "markdown", "run", "write_outputs"]
