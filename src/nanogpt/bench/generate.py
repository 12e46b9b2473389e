"""Generation speed: prefill tokens/s and decode tokens/s, with and without the KV cache."""

from __future__ import annotations

import itertools
import logging
import statistics
from typing import Any

import torch

from nanogpt.bench.env import environment, free_memory, peak_memory_mb, reset_peak_memory, timed
from nanogpt.bench.jobs import base_job, model_settings
from nanogpt.bench.report import label, make_record
from nanogpt.config import BenchJob
from nanogpt.distributed import resolve_device
from nanogpt.model import GPT
from nanogpt.runtime import autocast, resolve_dtype

log = logging.getLogger(__name__)


def _median_time(fn: Any, device: torch.device, repeats: int) -> float:
    return statistics.median(timed(fn, device) for _ in range(repeats))


def generate_record(bench: BenchJob, model: GPT, batch_size: int, dtype: torch.dtype,
                    cache: bool) -> dict[str, Any]:
    """Time one prompt forward (prefill) and one greedy generate call for a (B, prompt) batch."""
    g, device = bench.generate, model.transformer.wte.weight.device
    rng = torch.Generator().manual_seed(0)
    prompt = torch.randint(model.config.vocab_size, (batch_size, g.prompt_tokens), generator=rng).to(device)
    generate = lambda: model.generate(prompt, g.new_tokens, temperature=0, use_cache=cache)  # greedy
    memory_kind = reset_peak_memory(device)
    # mixed precision through autocast, exactly as nanogpt-sample runs it
    with torch.no_grad(), autocast(device, dtype):
        model.generate(prompt, min(4, g.new_tokens), temperature=0, use_cache=cache)  # warm-up
        prefill_s = _median_time(lambda: model.predict(prompt, targets=False), device, 3)
        generate_s = _median_time(generate, device, g.repeats)
    results = {
        "prefill_tokens_per_s": batch_size * g.prompt_tokens / prefill_s,
        # the whole generate call, its prompt forward included: what a user waits for
        "decode_tokens_per_s": batch_size * g.new_tokens / generate_s,
        "ms_per_token": generate_s * 1000 / g.new_tokens, "prefill_ms": prefill_s * 1000,
        "generate_s": generate_s, "peak_memory_mb": peak_memory_mb(device), "memory_kind": memory_kind,
    }
    settings = {**model_settings(model.config, model.num_params()), "batch_size": batch_size,
                "prompt_tokens": g.prompt_tokens, "new_tokens": g.new_tokens,
                "dtype": str(dtype).removeprefix("torch."), "cache": cache, "repeats": g.repeats}
    record = make_record("generate", settings, results, environment(device))
    log.info("generate %s: decode %.1f tokens/s", label(record), results["decode_tokens_per_s"])
    return record


def bench_generate(bench: BenchJob) -> list[dict[str, Any]]:
    """One record per (batch size, dtype, cache); a random-weight model of the bench's shape.
    Generation runs eagerly (the compile list applies to training)."""
    base = base_job(bench)
    device = resolve_device(bench.device)
    torch.manual_seed(base.system.seed)
    model = GPT(base.model).to(device).eval()
    records = []
    dtypes = bench.dtypes or [base.system.dtype]
    combos = itertools.product(bench.batch_sizes or [1], dtypes, bench.generate.cache)
    for batch_size, dtype, cache in combos:
        records.append(generate_record(bench, model, batch_size, resolve_dtype(dtype, device), cache))
        free_memory()
    return records
