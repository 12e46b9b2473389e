"""The training step benchmark: the config's real jitted step, timed, with MFU and memory.

    python run_bench.py --config configs/shakespeare_char.py:cpu
    python run_bench.py --config configs/owt.py --config.bench.batch_sizes=4,8,16   # a sweep (chart)

What runs is what `run_train.py` runs: the mesh from `mesh.*` (`sharding.make_mesh`), the model from
`model.*`, `step.init_state` and `step.make_train_step` with the config's optimizer and
gradient_accumulation_steps. Weights are random (init_from is ignored: the step costs the same).
Tokens are random ids by default; `bench.data=True` reads data.data_dir's train.bin through the
training loader and its prefetch thread instead (the loader's time then shows where it is not
hidden). The vocabulary is model.vocab_size, else the data's (data.data_dir's meta.json when it
exists, padded as run_train.py pads it), else 50304.

Per batch size: the step is lowered and compiled ahead of time (compile_s; no step runs in it),
called once (first_step_s: allocation, thread pools), run bench.warmup times, then timed
bench.steps times, each step waited for. Reported: median, p10 and p90 ms per step, tokens/s
(from the median), tokens/s per device, MFU (`metrics.mfu`, FLOPs per token by
`metrics.FLOPS_FORMULA`, the peak from `metrics.device_peak`: the datasheet table by device_kind,
a matmul probe on a CPU, or bench.peak_tflops; unknown -> no MFU), and memory per device: the
compiled step's arguments, outputs, temporaries (`compiled.memory_analysis()`) and the device's
peak bytes in use where the backend reports it (GPU, TPU; not the CPU).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
from absl import logging
from ml_collections import ConfigDict

from nanogpt_jax import config as config_lib
from nanogpt_jax import data, memory, metrics, sharding, storage
from nanogpt_jax.batches import TrainBatches
from nanogpt_jax.bench import report
from nanogpt_jax.model import GPT, implementations
from nanogpt_jax.optim import OptimConfig, make_optimizer
from nanogpt_jax.step import TrainState, init_state, make_train_step, param_axes


@dataclasses.dataclass
class Setup:
    """One benchmarked configuration: the model, its state on the mesh, the compiled step, batches."""

    model: GPT
    mesh: jax.sharding.Mesh
    state: TrainState
    compiled: Any  # the AOT-compiled train step: (state, x_ABT, y_ABT) -> (state, metrics)
    compile_s: float
    batches: Callable[[int], tuple[jax.Array, jax.Array]]  # step -> (x_ABT, y_ABT) on the mesh
    settings: dict[str, Any]
    close: Callable[[], None] = lambda: None


def model_vocab_size(config: ConfigDict) -> int | None:
    """model.vocab_size, else the data's (as run_train.py pads it) when data.data_dir has meta, else None."""
    if config.model.vocab_size:
        return config.model.vocab_size
    if storage.path(config.data.data_dir).is_dir():  # a local folder or a bucket's (gs://)
        try:
            return data.model_vocab_size(data.load_meta(config.data.data_dir))
        except Exception:  # noqa: BLE001 - a folder without usable meta: fall back to the default vocabulary
            return None
    return None


def _random_batches(shape: tuple[int, int, int], vocab: int, shard: jax.sharding.Sharding,
                    n: int = 4) -> Callable[[int], tuple[jax.Array, jax.Array]]:
    """n distinct (x, y) batches of random ids already on the mesh, cycled by step."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        w = rng.integers(0, vocab, shape[:-1] + (shape[-1] + 1,), dtype=np.int32)
        out.append(tuple(jax.device_put(a, shard) for a in (w[..., :-1], w[..., 1:])))
    return lambda step: out[step % n]


def setup(config: ConfigDict, batch_size: int) -> Setup:
    """Build and compile the config's train step for global batch `batch_size`.

    Raises ConfigError for a batch size the mesh cannot split, DataError for bad data (bench.data).
    """
    c = config
    mesh = sharding.make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.tensor)
    A = c.train.gradient_accumulation_steps
    memory.keep_cpu_buffers_mapped(mesh.devices.flat[0].platform)  # as run_train.py: CPU steps reuse heap memory
    sharding.check_batch_size(batch_size, sharding.batch_divisor(mesh), "bench batch size")
    vocab = model_vocab_size(c)
    gcfg = config_lib.gpt_config(c, **({"vocab_size": vocab} if vocab else {}))
    model = GPT(gcfg)
    T = gcfg.block_size
    oc = OptimConfig.from_section(c.optim)
    state = init_state(model, make_optimizer(oc, param_axes(model)), mesh, jax.random.key(c.seed))
    step = make_train_step(model, oc, mesh, state, grad_accum=A, seed=c.seed)
    shard = sharding.batch_sharding(mesh, 3)
    close = lambda: None  # noqa: E731
    if c.bench.data:
        dataset = data.Dataset(c.data.data_dir, block_size=T, model_vocab_size=gcfg.vocab_size, splits=("train",),
                               cache_dir=c.data.cache_dir)
        loader = TrainBatches(dataset.split("train"), batch_size=batch_size, block_size=T, grad_accum=A,
                              seed=c.seed, sharding=shard)
        prefetch = loader.prefetch(0)  # as the training loop reads them: built ahead by a background thread
        it: Iterator = iter(prefetch)
        batches = lambda step: next(it)[1:]  # noqa: E731 - steps are taken in order
        close = prefetch.close
        source = str(Path(c.data.data_dir))
    else:
        batches = _random_batches((A, batch_size, T), gcfg.vocab_size, shard)
        source = "random"
    x, y = batches(0)
    t0 = time.perf_counter()
    with sharding.activate(mesh):
        compiled = step.jitted.lower(state, x, y).compile()
    compile_s = time.perf_counter() - t0
    settings = {
        "model": f"{gcfg.n_layer}x{gcfg.n_head}x{gcfg.n_embd}", "params": gcfg.num_params(),
        "vocab_size": gcfg.vocab_size, "batch_size": batch_size, "block_size": T, "grad_accum": A,
        "tokens_per_step": A * batch_size * T, "dtype": gcfg.dtype,
        **implementations(gcfg, mesh.devices.flat[0].platform, batch_size // sharding.batch_divisor(mesh), T),
        "remat": gcfg.remat, "scan_layers": gcfg.scan_layers, "mesh": dict(mesh.shape), "data": source,
    }
    first = [x, y]  # the batch compiled against is the first one run

    def next_batch(i: int) -> tuple[jax.Array, jax.Array]:
        if i == 0:
            return tuple(first)
        return batches(i)

    return Setup(model, mesh, state, compiled, compile_s, next_batch, settings, close)


def run_steps(s: Setup, start: int, n: int) -> tuple[list[float], list[float]]:
    """Run n steps from `start`, waiting for each; (wall seconds of each, its loss)."""
    times, losses = [], []
    with sharding.activate(s.mesh):
        for i in range(start, start + n):
            t0 = time.perf_counter()
            x, y = s.batches(i)
            s.state, m = s.compiled(s.state, x, y)
            jax.block_until_ready(s.state)  # the whole update, not only the loss
            times.append(time.perf_counter() - t0)
            losses.append(m["loss"])
    return times, [float(v) for v in losses]


def train_row(config: ConfigDict, batch_size: int) -> dict[str, Any]:
    """One row of the train report: settings and results (report.KEYS["train"])."""
    s = setup(config, batch_size)
    try:
        [first_s], [loss_first] = run_steps(s, 0, 1)
        run_steps(s, 1, config.bench.warmup)
        # a long sweep's rows take minutes: say which one is being timed (and that compiling is over)
        logging.info("train %s: compiled in %.1f s; timing %d steps", report.label({"settings": s.settings}),
                     s.compile_s, config.bench.steps)
        times, losses = run_steps(s, 1 + config.bench.warmup, config.bench.steps)
    finally:
        s.close()
    gcfg = s.model.config
    peak = metrics.device_peak(jax.devices()[0], gcfg.dtype, config.bench.peak_tflops)
    results = report.train_figures(times, tokens_per_step=s.settings["tokens_per_step"], n_devices=s.mesh.size,
                                   flops_per_token=gcfg.flops_per_token(gcfg.block_size), peak=peak)
    results.update(compile_s=s.compile_s, first_step_s=first_s, loss_first=loss_first, loss_last=losses[-1],
                   memory=report.memory_figures(s.compiled, jax.devices()[0]), step_times_ms=[t * 1e3 for t in times])
    logging.info("train %s: compile %.1f s, %.1f ms/step, %.0f tokens/s", report.label({"settings": s.settings}),
                 s.compile_s, results["ms_per_step"], results["tokens_per_s"])
    return {"settings": s.settings, "results": results}


def batch_sizes(config: ConfigDict) -> tuple[int, ...]:
    """bench.batch_sizes, or the config's train.batch_size alone."""
    return tuple(config.bench.batch_sizes) or (config.train.batch_size,)


def bench_train(config: ConfigDict) -> list[dict[str, Any]]:
    """One row per batch size of the sweep."""
    return [train_row(config, b) for b in batch_sizes(config)]
