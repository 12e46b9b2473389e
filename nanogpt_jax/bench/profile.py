"""A `jax.profiler` trace of the config's train step, and where its time goes.

    python run_bench.py --config configs/shakespeare_char.py:cpu --config.bench.mode=profile --config.bench.steps=5
    tensorboard --logdir <out_dir>/profile          # the Profile tab (pip install tensorboard-plugin-profile)
    # or open <out_dir>/profile/plugins/profile/<run>/perfetto_trace.json.gz in https://ui.perfetto.dev

The step is built and compiled exactly as in train mode (`nanogpt_jax.bench.train.setup`, first
batch size of the sweep), run once plus bench.warmup times untraced, then bench.steps steps are
traced, each marked with a `StepTraceAnnotation` (TensorBoard's step view). The trace holds the XLA
operations of every step (on a CPU, one event per thunk on each worker thread; on GPU/TPU the
device's kernels). The report lists the operations that took the most time per step, with the
JAX operation each came from (the compiled HLO's `op_name` metadata), e.g.
`transpose(jvp(GPT))/GPT.hidden/h_0/mlp/c_proj/dot_general` is that matmul's backward pass.
"""

from __future__ import annotations

import collections
import gzip
import json
import re
import time
from pathlib import Path
from typing import Any

import jax
from ml_collections import ConfigDict

from nanogpt_jax import sharding
from nanogpt_jax.bench import train as train_bench


def hlo_op_names(hlo_text: str) -> dict[str, str]:
    """{HLO instruction name: the JAX op_name of its metadata} from a compiled module's text."""
    names = {}
    for m in re.finditer(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?metadata=\{[^}]*op_name=\"([^\"]*)\"", hlo_text, re.M):
        names[m.group(1)] = m.group(2)
    for m in re.finditer(r"^\s*(?:ROOT )?%?([\w.\-]+) = ", hlo_text, re.M):
        names.setdefault(m.group(1), "")
    return names


def top_ops(trace_file: Path, op_names: dict[str, str], steps: int, n: int = 15) -> list[dict[str, Any]]:
    """The n operations with the most time per step in a perfetto trace (summed over threads and streams):
    [{name, op_name, ms_per_step, share}] where share is of all the operations' time."""
    with gzip.open(trace_file, "rt") as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    total: collections.Counter = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e.get("name") in op_names:
            total[e["name"]] += e.get("dur", 0)  # microseconds
    all_us = sum(total.values()) or 1
    return [{"name": name, "op_name": op_names[name], "ms_per_step": us / 1e3 / steps, "share": us / all_us}
            for name, us in total.most_common(n)]


def bench_profile(config: ConfigDict) -> list[dict[str, Any]]:
    """Trace bench.steps train steps into <out_dir>/profile; one row (report.KEYS["profile"])."""
    batch_size = train_bench.batch_sizes(config)[0]
    s = train_bench.setup(config, batch_size)
    trace_dir = Path(config.out_dir) / "profile"
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
    ops = top_ops(max(perfetto, key=lambda p: p.stat().st_mtime), hlo_op_names(s.compiled.as_text()), steps) \
        if perfetto else []
    results = {"trace_dir": str(trace_dir), "trace_files": [str(p) for p in files], "ms_per_step": ms_per_step,
               "top_ops": ops}
    return [{"settings": {**s.settings, "steps": steps}, "results": results}]
