"""Benchmarks: `python run_bench.py --config <config> --config.bench.mode=<train|generate|data|profile>`.

    train     the config's jitted train step: compile time, ms/step (median, p10, p90), tokens/s,
              tokens/s per device, MFU, memory (nanogpt_jax.bench.train)
    generate  prefill ms and decode tokens/s, batch 1 and 8, float32 and bfloat16, with and without
              the KV cache, of the model init_from names (random weights with scratch)
              (nanogpt_jax.bench.generate)
    data      the training loader's batches/s and host ms per batch (nanogpt_jax.bench.data)
    profile   a jax.profiler trace of a few train steps into <out_dir>/profile and the operations
              that take the most time (nanogpt_jax.bench.profile)

Every mode prints a markdown table and writes bench.out, by default bench/<mode>.json (JSON: the
figures, the environment, the config), a .md beside it and, for two rows or more (e.g. a sweep
over bench.batch_sizes), a .png chart. bench.compare=<an earlier report> prints new / old ratios
of the matching rows.
The modules also run alone with their own flags: `python -m nanogpt_jax.bench.<name>`.
"""

from __future__ import annotations

from typing import Any

from ml_collections import ConfigDict

from nanogpt_jax import config as config_lib
from nanogpt_jax.bench import report
from nanogpt_jax.errors import ConfigError, DataError


def _rows(config: ConfigDict) -> list[dict[str, Any]]:
    mode = config.bench.mode
    if mode == "train":
        from nanogpt_jax.bench.train import bench_train

        return bench_train(config)
    if mode == "profile":
        from nanogpt_jax.bench.profile import bench_profile

        return bench_profile(config)
    if mode == "generate":
        from nanogpt_jax.bench.generate import bench_rows

        return bench_rows(config)
    from nanogpt_jax.bench.data import bench_rows

    return bench_rows(config)


def run(config: ConfigDict) -> dict[str, Any]:
    """Run the benchmark bench.mode names; print its table, write bench.out (+ .md, .png); returns
    the report (see nanogpt_jax.bench.report).

    Raises ConfigError/DataError (one line) for bad settings, bad data, or a bench.compare file that is
    unreadable or of another mode, before anything is written. A compare file with no matching
    configuration is said in one line after the table.
    """
    b = config.bench
    old = report.load(b.compare) if b.compare else None
    if old is not None and old["mode"] != b.mode:
        raise DataError(f"bench.compare={b.compare!r} is a {old['mode']} report; compare it with "
                        f"--config.bench.mode={old['mode']}")
    result = report.make_report(b.mode, _rows(config), config.to_dict())
    out = b.out or f"bench/{b.mode}.json"  # one file per mode: a generate run keeps the train figures
    paths = report.write(result, out)
    comparison = None
    if old is not None:
        try:
            comparison = report.compare(old, result, b.compare, out)
        except DataError as e:  # the figures are written; say why there are no ratios
            comparison = f"compare: {e}\n"
    report.print_report(result, paths, comparison)
    return result


def check_config(config: ConfigDict) -> None:
    """The bench section's own checks (registered in config.EXTRA_CHECKS)."""
    if "bench" not in config:
        return
    b = config.bench
    if b.mode not in report.MODES:
        raise ConfigError(f"bench.mode={b.mode!r}: must be one of {', '.join(report.MODES)}")
    bad = [v for v in b.batch_sizes if not isinstance(v, int) or v < 1]
    if bad:
        raise ConfigError(f"bench.batch_sizes={tuple(b.batch_sizes)!r}: each must be a positive integer")
    if b.peak_tflops is not None and b.peak_tflops <= 0:
        raise ConfigError(f"bench.peak_tflops={b.peak_tflops}: must be > 0 (TFLOP/s of one device)")


if check_config not in config_lib.EXTRA_CHECKS:
    config_lib.EXTRA_CHECKS.append(check_config)
