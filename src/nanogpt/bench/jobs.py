"""From a BenchJob to the training jobs it times: the shipped preset, the sweep, the data."""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from nanogpt.config import CONFIG_DIR, BenchJob, TrainJob, check_train_job, register_configs, to_dataclass
from nanogpt.errors import ConfigError
from nanogpt.model import GPTConfig


def compose_train_job(name: str, overrides: list[str] | None = None) -> TrainJob:
    """A shipped training preset composed as nanogpt-train would (inside a Hydra app or not)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import MissingConfigException

    register_configs()
    try:
        if GlobalHydra.instance().is_initialized():  # inside nanogpt-bench: reuse its search path
            cfg = compose(config_name=name, overrides=overrides or [])
        else:
            with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
                cfg = compose(config_name=name, overrides=overrides or [])
    except MissingConfigException:
        presets = sorted(p.stem for p in Path(CONFIG_DIR).glob("train*.yaml"))
        raise ConfigError(f"train_config={name!r} is not a shipped preset; use one of "
                          f"{', '.join(presets)}") from None
    return to_dataclass(cfg, "train_schema")


def base_job(bench: BenchJob) -> TrainJob:
    """The preset with the bench's model, context, device and accumulation applied."""
    job = compose_train_job(bench.train_config, bench.train_overrides)
    if bench.model is not None:
        job.model = copy.deepcopy(bench.model)
    if bench.block_size:
        job.model.block_size = bench.block_size
    job.init_from = "scratch"  # speed does not depend on the weights' values
    job.system.device = bench.device
    job.train.grad_accum_steps = bench.grad_accum_steps
    job.train.eval_iters = 1  # the bench never evaluates: keep the trainer's fixed val batches small
    return check_train_job(job)


def configure(base: TrainJob, data_dir: Path, out_dir: Path, batch_size: int, dtype: str,
              compile: bool) -> TrainJob:
    """One configuration of a sweep as a complete training job."""
    job = copy.deepcopy(base)
    job.data.data_dir, job.out_dir = str(data_dir), str(out_dir)
    job.data.batch_size, job.system.dtype, job.system.compile = batch_size, dtype, compile
    return check_train_job(job)


def sweep(bench: BenchJob, base: TrainJob, default_batch: int | None = None) -> list[tuple[int, str, bool]]:
    """Every (batch size, dtype, compile) combination; an empty list keeps the preset's value."""
    batches = bench.batch_sizes or [default_batch or base.data.batch_size]
    dtypes = bench.dtypes or [base.system.dtype]
    compiles = bench.compile or [base.system.compile]
    return list(itertools.product(batches, dtypes, compiles))


def model_settings(cfg: GPTConfig, params: int) -> dict[str, Any]:
    """The model part of a record's settings: shape as layers x heads x width, and size."""
    return {"model": f"{cfg.n_layer}x{cfg.n_head}x{cfg.n_embd}", "params": params,
            "block_size": cfg.block_size, "vocab_size": cfg.vocab_size}


def write_random_tokens(folder: Path, vocab_size: int, n_train: int = 1 << 20, n_val: int = 1 << 14,
                        seed: int = 0) -> Path:
    """Uniformly random token ids in the prepared format (train.bin, val.bin, meta.json)."""
    dtype = np.uint16 if vocab_size <= 1 << 16 else np.uint32
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, n in (("train", n_train), ("val", n_val)):
        rng.integers(0, vocab_size, n, dtype=dtype).tofile(folder / f"{split}.bin")
        splits[split] = {"tokens": n}
    meta = {"format": "nanogpt-bins/1", "tokenizer": "random", "vocab_size": vocab_size,
            "dtype": np.dtype(dtype).name, "eot_token": None, "splits": splits,
            "source": "nanogpt-bench random tokens"}
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


@contextlib.contextmanager
def bench_folders(bench: BenchJob, model: GPTConfig) -> Iterator[tuple[Path, Path]]:
    """(data dir, scratch out_dir): the given prepared data, else random tokens in a temp folder."""
    with tempfile.TemporaryDirectory(prefix="nanogpt-bench-") as tmp:
        data = Path(bench.data_dir) if bench.data_dir else write_random_tokens(
            Path(tmp) / "data", model.vocab_size, n_val=max(1 << 14, 4 * (model.block_size + 1)))
        yield data, Path(tmp) / "out"
