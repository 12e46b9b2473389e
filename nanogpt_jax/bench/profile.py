"""A `jax.profiler` trace of the config's train step, and where its time goes.

    python run_bench.py --config configs/shakespeare_char.py:cpu --config.bench.mode=profile --config.bench.steps=5
    tensorboard --logdir <out_dir>/profile          # the Profile tab (pip install tensorboard-plugin-profile)
    # or open <out_dir>/profile/plugins/profile/<run>/perfetto_trace.json.gz in https://ui.perfetto.dev

The step is built and compiled exactly as in train mode (`nanogpt_jax.bench.train.setup`, first
batch size of the sweep), run once plus bench.warmup times untraced, then bench.steps steps are
traced, each marked with a `StepTraceAnnotation` (TensorBoard's step view). The trace holds the XLA
operations of every step (on a CPU, one event per thunk on each worker thread; on GPU/TPU the
device's kernels). The report lists where the time goes: the JAX operations (the compiled HLO's `op_name`
metadata, every layer's copy together, e.g. `backward GPT.hidden/h_*/mlp/c_proj/dot_general`: that
matmul's gradients in all layers) and the single compiled operations that took the most time per
step. Times are summed over threads, so they can exceed the step's wall time where operations run
side by side; on a CPU a matmul's helper threads are not in the trace, so its time is its wall time.
"""

from __future__ import annotations

import collections
import gzip
import json
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
from ml_collections import ConfigDict

from nanogpt_jax import sharding, storage
from nanogpt_jax.bench import train as train_bench


def hlo_op_names(hlo_text: str) -> dict[str, str]:
    """{HLO instruction name: the JAX op_name of its metadata} from a compiled module's text."""
    names = {}
    for m in re.finditer(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?metadata=\{[^}]*op_name=\"([^\"]*)\"", hlo_text, re.M):
        names[m.group(1)] = m.group(2)
    for m in re.finditer(r"^\s*(?:ROOT )?%?([\w.\-]+) = ", hlo_text, re.M):
        names.setdefault(m.group(1), "")
    return names


def op_times(trace_file: Path, op_names: dict[str, str]) -> collections.Counter:
    """Microseconds spent in each compiled operation over a perfetto trace (summed over threads and
    streams; events whose name is not an HLO instruction, e.g. the runtime's own, are left out)."""
    with gzip.open(trace_file, "rt") as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    total: collections.Counter = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e.get("name") in op_names:
            total[e["name"]] += e.get("dur", 0)
    return total


def source(op_name: str) -> str:
    """A JAX op_name without the jit/loop wrappers and the layer index, forward or backward:
    "jit(step)/while/body/closed_call/transpose(jvp(GPT))/GPT.hidden/h_3/mlp/c_fc/dot_general"
    -> "backward GPT.hidden/h_*/mlp/c_fc/dot_general"."""
    part = "backward " if "transpose(jvp(" in op_name else ("forward " if "jvp(" in op_name else "")
    name = re.sub(r"^jit\([^)]*\)/|(while/body/|closed_call/)|(transpose\()?jvp\([^)]*\)\)?/", "", op_name)
    return part + re.sub(r"/h_\d+/", "/h_*/", name)


def top_ops(times: collections.Counter, op_names: dict[str, str], steps: int, n: int = 15) -> list[dict[str, Any]]:
    """The n operations with the most time per step: [{name, op_name, ms_per_step, share}], share of
    all the operations' time."""
    all_us = sum(times.values()) or 1
    return [{"name": name, "op_name": op_names[name], "ms_per_step": us / 1e3 / steps, "share": us / all_us}
            for name, us in times.most_common(n)]


def top_sources(times: collections.Counter, op_names: dict[str, str], steps: int, n: int = 15) -> list[dict]:
    """Time per step grouped by `source` (every layer's copy of an op together): [{source, ops,
    ms_per_step, share}]."""
    all_us = sum(times.values()) or 1
    by: collections.Counter = collections.Counter()
    count: collections.Counter = collections.Counter()
    for name, us in times.items():
        key = source(op_names[name]) or "(no JAX op: copies and layout changes)"
        by[key] += us
        count[key] += 1
    return [{"source": key, "ops": count[key], "ms_per_step": us / 1e3 / steps, "share": us / all_us}
            for key, us in by.most_common(n)]


def bench_profile(config: ConfigDict) -> list[dict[str, Any]]:
    """Trace bench.steps train steps into <out_dir>/profile; one row (report.KEYS["profile"])."""
    batch_size = train_bench.batch_sizes(config)[0]
    s = train_bench.setup(config, batch_size)
    # the profiler writes local files: into a temporary folder when out_dir is a bucket, uploaded after
    remote = storage.join(config.out_dir, "profile") if storage.is_url(config.out_dir) else None
    trace_dir = Path(tempfile.mkdtemp(prefix="nanogpt_profile_")) if remote else Path(config.out_dir) / "profile"
    steps = config.bench.steps
    try:
        train_bench.run_steps(s, 0, 1 + config.bench.warmup)
        with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
            t0 = time.perf_counter()
            with sharding.activate(s.mesh):
                for i in range(1 + config.bench.warmup, 1 + config.bench.warmup + steps):
                    with jax.profiler.StepTraceAnnotation("train", step_num=i):
                        x, y = s.batches(i)
                        s.state, _ = s.compiled(s.state, x, y)
                        jax.block_until_ready(s.state)
            ms_per_step = (time.perf_counter() - t0) / steps * 1e3
    finally:
        s.close()
    files = sorted(p for p in trace_dir.rglob("*") if p.is_file())
    perfetto = [p for p in files if p.name.endswith("perfetto_trace.json.gz")]
    names = hlo_op_names(s.compiled.as_text())
    times = op_times(max(perfetto, key=lambda p: p.stat().st_mtime), names) if perfetto else collections.Counter()
    trace_files = [str(p) for p in files]
    if remote:
        trace_files = [storage.join(remote, *f.relative_to(trace_dir).parts) for f in files]
        for f, url in zip(files, trace_files, strict=True):
            storage.upload(f, url)
        shutil.rmtree(trace_dir)
    results = {"trace_dir": remote or str(trace_dir), "trace_files": trace_files, "ms_per_step": ms_per_step,
               "op_ms_per_step": sum(times.values()) / 1e3 / steps, "top_ops": top_ops(times, names, steps),
               "top_sources": top_sources(times, names, steps)}
    return [{"settings": {**s.settings, "steps": steps}, "results": results}]
