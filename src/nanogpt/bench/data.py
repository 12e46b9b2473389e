"""Data throughput: prepare tokens/s and loader batches/s, measured by nanogpt.data.benchmark."""

from __future__ import annotations

import logging
from typing import Any

from nanogpt.bench.env import environment
from nanogpt.bench.jobs import base_job
from nanogpt.bench.report import make_record
from nanogpt.config import BenchJob
from nanogpt.distributed import resolve_device

log = logging.getLogger(__name__)


def prepare_record(bench: BenchJob) -> dict[str, Any]:
    """Tokenize a synthetic corpus of data.prepare_mb MB in a fresh process (its own peak RSS)."""
    from nanogpt.data.benchmark import bench_prepare

    d = bench.data
    r = bench_prepare(d.prepare_mb, d.dataset, d.tokenizer, d.num_proc)
    settings = {"kind": "prepare", "dataset": d.dataset, "tokenizer": d.tokenizer, "corpus_mb": d.prepare_mb,
                "num_proc": r["num_proc"]}
    results = {key: r[key] for key in ("tokens_per_s", "mb_per_s", "seconds", "tokens", "peak_rss_mb",
                                       "peak_rss_workers_mb")}
    log.info("prepare: %.0f tokens/s", results["tokens_per_s"])
    return make_record("data", settings, results, environment(resolve_device("cpu")))


def loader_record(bench: BenchJob, batch_size: int, block_size: int, sampler: str) -> dict[str, Any]:
    """Batches/s of the training loader over a memory-mapped file of random tokens."""
    from nanogpt.data.benchmark import bench_loader

    device = resolve_device(bench.device)
    d = bench.data
    r = bench_loader(d.loader_tokens, batch_size, block_size, sampler, d.loader_iters, device=str(device))
    settings = {"kind": "loader", "sampler": sampler, "batch_size": batch_size, "block_size": block_size,
                "loader_tokens": d.loader_tokens, "iters": d.loader_iters}
    results = {"batches_per_s": r["batches_per_s"], "tokens_per_s": r["tokens_per_s"]}
    log.info("loader %s B=%d T=%d: %.0f batches/s", sampler, batch_size, block_size, r["batches_per_s"])
    return make_record("data", settings, results, environment(device))


def bench_data(bench: BenchJob) -> list[dict[str, Any]]:
    """The prepare benchmark (unless data.prepare_mb=0), then the loader for every batch size and
    sampler, at the model's block size."""
    base = base_job(bench)
    records = [prepare_record(bench)] if bench.data.prepare_mb > 0 else []
    for batch_size in bench.batch_sizes or [base.data.batch_size]:
        for sampler in bench.data.samplers:
            records.append(loader_record(bench, batch_size, base.model.block_size, sampler))
    return records
